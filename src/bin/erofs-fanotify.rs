use std::path::PathBuf;

use clap::{Parser, Subcommand};
use erofs_fanotify::cli::{self, agent_cmd, status_cmd, upgrade_cmd};

#[derive(Parser)]
#[command(name = "erofs-fanotify", version, about = "Lazy EROFS mounts backed by fanotify pre-content events")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show every mount (or one): source, bytes present, fetches, agent
    Status {
        mountpoint: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Fetch data of a live mount in the background (whole image, a trace, or files)
    Prefetch {
        mountpoint: PathBuf,
        /// The whole image
        #[arg(long)]
        all: bool,
        /// A trace saved by `erofs-fanotify trace`
        #[arg(long)]
        trace: Option<PathBuf>,
        /// A file listing paths inside the image, one per line
        #[arg(long)]
        files: Option<PathBuf>,
        /// Cap in bytes per second (e.g. 20M)
        #[arg(long)]
        rate: Option<String>,
        /// Wait, with a progress bar on a terminal, until done
        #[arg(long)]
        wait: bool,
    },
    /// Record (--start) and print or save the byte ranges readers of a mount asked for, for -o prefetch_trace=FILE
    Trace {
        mountpoint: PathBuf,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Start a new trace after this one
        #[arg(long)]
        reset: bool,
        /// Start recording (a mount records from the start with -o record_trace)
        #[arg(long, conflicts_with_all = ["stop", "output", "reset"])]
        start: bool,
        /// Stop recording after printing what was recorded
        #[arg(long)]
        stop: bool,
    },
    /// Replace the agent's worker with the binary now on disk, without failing reads
    Upgrade {
        mountpoint: Option<PathBuf>,
        #[arg(long, conflicts_with = "mountpoint")]
        all: bool,
    },
    /// Print Prometheus text metrics of every mount (or write them for node_exporter's textfile collector)
    Metrics {
        /// Write atomically to FILE (e.g. /var/lib/prometheus/node-exporter/erofs-fanotify.prom)
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print a shell completion script (for erofs-fanotify, erofs-mount or erofs-umount)
    Completions {
        shell: clap_complete::Shell,
        /// The command to complete
        #[arg(long = "for", value_name = "COMMAND", default_value = "erofs-fanotify",
              value_parser = ["erofs-fanotify", "erofs-mount", "erofs-umount"])]
        command: String,
    },
    /// Print the man page of erofs-fanotify, or write every page (erofs-fanotify.8, erofs-mount.8, ...) to DIR
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// OCI runtime hook: mount the image named by the container's annotations (createRuntime), unmount it (poststop)
    Hook {
        /// createRuntime/prestart or poststop; default: from the state's status
        #[arg(long)]
        stage: Option<String>,
    },
    /// Build an EROFS image made for lazy mounts (all metadata in one run after the superblock)
    Build {
        /// A directory, a tar stream (.tar, .tar.gz) or - for stdin; with --s3, BUCKET[/PREFIX]
        src: PathBuf,
        /// The image to write (replaced atomically)
        out: PathBuf,
        /// Compress file data (lz4)
        #[arg(long, value_name = "ALGORITHM", value_parser = ["lz4"])]
        compress: Option<String>,
        /// Paths (one per line, # comments) whose data comes first, in that order
        #[arg(long, value_name = "FILE")]
        order: Option<PathBuf>,
        /// Fixed UUID derived from the content: the same input gives the same bytes
        #[arg(long)]
        reproducible: bool,
        /// Write a tar index (512-byte blocks, file data referenced in the tar as device 1)
        #[arg(long)]
        tar_index: bool,
        /// Uncompressed bytes per lz4 physical cluster (a multiple of 4096, up to 1 MiB)
        #[arg(long, value_name = "BYTES", hide = true)]
        pcluster_size: Option<u32>,
        /// With --tar-index of a gzip layer: also write its zinfo (gzip random-access checkpoints)
        #[arg(long, value_name = "FILE", requires = "tar_index")]
        zinfo: Option<PathBuf>,
        /// Uncompressed bytes between zinfo checkpoints (default 4M)
        #[arg(long, value_name = "SIZE", requires = "zinfo")]
        zinfo_span: Option<String>,
        /// Image a bucket: SRC is BUCKET[/PREFIX] at this S3 endpoint; every file reads from its object when mounted
        #[arg(long, value_name = "ENDPOINT")]
        s3: Option<String>,
        /// With --s3: s3.* options as for mounting (s3.region=, s3.urlstyle=, s3.sig=, s3.passwd_file=, s3.profile=, s3.endpoint= mirrors)
        #[arg(short = 'o', long = "options", value_name = "OPTS", requires = "s3")]
        options: Vec<String>,
    },
    /// Write the merged metadata image a mount of a multi-layer image uses (for inspection)
    Merge {
        /// The image reference (all its layers are merged, in manifest order)
        reference: String,
        /// The file to write (replaced atomically)
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// Mount options for the registry (oci.insecure, oci.platform=, ...) and fetch_unit=
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Push an EROFS image as a one-layer OCI image (layer application/vnd.erofs); prints the manifest digest
    Push {
        /// The EROFS image file
        image: PathBuf,
        /// Where to push: [registry/]repo[:tag] or [registry/]repo@sha256:... (the manifest's digest)
        reference: String,
        /// OS/ARCH[/VARIANT] written in the image config (default: this machine's)
        #[arg(long)]
        platform: Option<String>,
        /// Registry options as for mounting: oci.insecure, oci.username=, oci.password=, oci.cafile=
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// Upload blobs up to SIZE in one request, larger ones in chunks of SIZE (default 64M)
        #[arg(long, value_name = "SIZE", hide = true)]
        chunk_size: Option<String>,
    },
    /// Convert an ordinary image (tar/tar+gzip layers) into EROFS and push it; prints the manifest digest
    Convert {
        /// The image to convert: [registry/]repo[:tag|@digest] (Docker v2 or OCI, manifest or index)
        src: String,
        /// Where to push the result: [registry/]repo[:tag] or [registry/]repo@sha256:...
        dst: String,
        /// The entry of an index to convert (default: this machine's platform)
        #[arg(long)]
        platform: Option<String>,
        /// Compress file data (lz4)
        #[arg(long, value_name = "ALGORITHM", value_parser = ["lz4"])]
        compress: Option<String>,
        /// Paths (one per line, # comments) whose data comes first, in that order
        #[arg(long, value_name = "FILE")]
        order: Option<PathBuf>,
        /// One EROFS layer per source layer (whiteouts and opaque directories kept as overlay markers)
        #[arg(long)]
        per_layer: bool,
        /// Registry options for both images: oci.insecure, oci.username=, oci.password=, oci.cafile=
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// Directory for the private temp dir (layer data and images; default $TMPDIR or /var/tmp)
        #[arg(long, value_name = "DIR")]
        tmpdir: Option<PathBuf>,
        #[arg(long, value_name = "SIZE", hide = true)]
        chunk_size: Option<String>,
    },
    /// Index artifacts: the ranges of an image known before mounting it
    Index {
        #[command(subcommand)]
        action: IndexCmd,
    },
    /// List or prune the local cache of blobs
    Cache {
        #[command(subcommand)]
        action: CacheCmd,
    },
    /// Mount a local EROFS image file-backed, without an agent (for comparisons)
    #[command(hide = true)]
    MountFile {
        image: PathBuf,
        mountpoint: PathBuf,
        #[arg(long, default_value_t = 512)]
        read_ahead_kb: u32,
    },
    /// Run the agent (started by erofs-mount; reads its config on stdin)
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        foreground: bool,
        /// Take over the running worker PID whose supervisor died
        #[arg(long)]
        adopt: Option<i32>,
    },
    /// Run a worker (started by the agent's supervisor)
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Index an image once and push an index artifact (subject: the image manifest): EROFS layers walked for their ranges,
    /// or every tar layer of an ordinary image given its tar index and zinfo; prints its digest
    Push {
        /// The image: [registry/]repo[:tag|@sha256:...]
        reference: String,
        /// Registry options as for mounting: oci.insecure, oci.username=, oci.password=, oci.cafile=, oci.platform=
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// An access trace from `erofs-fanotify trace`, optionally named (NAME=FILE); may repeat
        #[arg(long = "trace", value_name = "[NAME=]FILE")]
        traces: Vec<String>,
        /// Directory for the temporary copies of the layers (default $TMPDIR or /var/tmp)
        #[arg(long, value_name = "DIR")]
        tmpdir: Option<PathBuf>,
        /// Ordinary images: uncompressed bytes between zinfo checkpoints of gzip layers (default 4M; each checkpoint
        /// adds 32 KiB to the zinfo a mount fetches first)
        #[arg(long, value_name = "SIZE")]
        zinfo_span: Option<String>,
    },
    /// Index an ordinary image (tar or tar+gzip layers) into a directory: each layer's tar index and zinfo, and the
    /// merged metadata of all layers; mount it with -o oci.tarindex=DIR
    Build {
        /// The image: [registry/]repo[:tag|@sha256:...]
        reference: String,
        /// Registry options as for mounting: oci.insecure, oci.username=, oci.password=, oci.cafile=, oci.platform=
        #[arg(short = 'o', value_name = "OPTS")]
        options: Vec<String>,
        /// The directory to write (made if missing; layers already indexed in it are kept)
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
        /// Uncompressed bytes between zinfo checkpoints of gzip layers indexed now (default 4M)
        #[arg(long, value_name = "SIZE")]
        zinfo_span: Option<String>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cache entries: key, size, bytes present, last use, whether a mount uses it
    Ls {
        #[arg(long, default_value = erofs_fanotify::mount::options::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove unused entries (never one in use), least recently used first
    Prune {
        #[arg(long, default_value = erofs_fanotify::mount::options::DEFAULT_CACHE_DIR)]
        cache_dir: PathBuf,
        /// Remove unused entries until the cache takes at most SIZE on disk (e.g. 20G)
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Remove unused entries not used for DURATION (e.g. 7d, 12h, 30m)
        #[arg(long, value_name = "DURATION")]
        unused_for: Option<String>,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Status { mountpoint, json } => {
            cli::init_cli_logging();
            status_cmd::run(mountpoint, json).map(|_| 0)
        }
        Cmd::Prefetch { mountpoint, all, trace, files, rate, wait } => {
            cli::init_cli_logging();
            cli::prefetch_cmd::run(cli::prefetch_cmd::PrefetchArgs { mountpoint, all, trace, files, rate, wait }).map(|_| 0)
        }
        Cmd::Trace { mountpoint, output, reset, start, stop } => {
            cli::init_cli_logging();
            let record = if start { Some(true) } else if stop { Some(false) } else { None };
            cli::trace_cmd::run(&mountpoint, output, reset, record).map(|_| 0)
        }
        Cmd::Upgrade { mountpoint, all } => {
            cli::init_cli_logging();
            upgrade_cmd::run(mountpoint, all).map(|_| 0)
        }
        Cmd::Completions { shell, command } => {
            let mut cmd = cli_command(&command);
            clap_complete::generate(shell, &mut cmd, command, &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man { dir } => man_pages(dir).map(|_| 0),
        Cmd::Hook { stage } => {
            cli::init_cli_logging();
            cli::hook_cmd::run(stage).map(|_| 0)
        }
        Cmd::Metrics { output } => {
            cli::init_cli_logging();
            cli::metrics_cmd::run(output).map(|_| 0)
        }
        Cmd::Cache { action } => {
            cli::init_cli_logging();
            match action {
                CacheCmd::Ls { cache_dir, json } => cli::cache_cmd::run_ls(&cache_dir, json),
                CacheCmd::Prune { cache_dir, max_size, unused_for } => {
                    cli::cache_cmd::run_prune(&cache_dir, max_size.as_deref(), unused_for.as_deref())
                }
            }
            .map(|_| 0)
        }
        Cmd::Build { src, out, compress, order, reproducible, tar_index, pcluster_size, zinfo, zinfo_span, s3, options } => {
            cli::init_cli_logging();
            match s3 {
                Some(endpoint)
                    if compress.is_none() && order.is_none() && !tar_index && pcluster_size.is_none() && zinfo.is_none() =>
                {
                    let source = src.to_string_lossy().into_owned();
                    cli::bucket_build_cmd::run(cli::bucket_build_cmd::BucketBuildArgs { endpoint, source, out, options, reproducible })
                }
                Some(_) => Err(cli::CliError::new("--s3 images hold no data: --compress, --order, --tar-index and --zinfo do not apply")),
                None => cli::build_cmd::parse_zinfo_span(zinfo_span.as_deref()).and_then(|zinfo_span| {
                    cli::build_cmd::run(cli::build_cmd::BuildArgs {
                        src,
                        out,
                        compress,
                        order,
                        reproducible,
                        tar_index,
                        pcluster_size,
                        zinfo,
                        zinfo_span,
                    })
                }),
            }
            .map(|_| 0)
        }
        Cmd::Merge { reference, output, options } => {
            cli::init_cli_logging();
            cli::merge_cmd::run(cli::merge_cmd::MergeArgs { reference, output, options }).map(|_| 0)
        }
        Cmd::Push { image, reference, platform, options, chunk_size } => {
            cli::init_cli_logging();
            cli::push_cmd::run(cli::push_cmd::PushArgs { image, reference, platform, options, chunk_size }).map(|_| 0)
        }
        Cmd::Convert { src, dst, platform, compress, order, per_layer, options, tmpdir, chunk_size } => {
            cli::init_cli_logging();
            cli::convert_cmd::run(cli::convert_cmd::ConvertArgs { src, dst, platform, compress, order, per_layer, options, chunk_size, tmpdir })
                .map(|_| 0)
        }
        Cmd::Index { action: IndexCmd::Push { reference, options, traces, tmpdir, zinfo_span } } => {
            cli::init_cli_logging();
            cli::index_cmd::push(cli::index_cmd::IndexPushArgs { reference, options, traces, tmpdir, zinfo_span }).map(|_| 0)
        }
        Cmd::Index { action: IndexCmd::Build { reference, options, output, zinfo_span } } => {
            cli::init_cli_logging();
            cli::index_cmd::build_tar_image(&reference, &options, &output, zinfo_span.as_deref()).map(|_| 0)
        }
        Cmd::Agent { foreground, adopt } => agent_cmd::run_supervisor(foreground, adopt),
        Cmd::Worker { resume } => agent_cmd::run_worker(resume),
        Cmd::MountFile { image, mountpoint, read_ahead_kb } => {
            cli::init_cli_logging();
            mount_file(&image, &mountpoint, read_ahead_kb).map(|_| 0)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            cli::print_error("erofs-fanotify", &e);
            std::process::exit(1);
        }
    }
}

/// The clap definition of one of our commands.
fn cli_command(name: &str) -> clap::Command {
    use clap::CommandFactory;
    match name {
        "erofs-mount" => erofs_fanotify::cli::mount_cmd::MountArgs::command(),
        "erofs-umount" => erofs_fanotify::cli::umount_cmd::UmountArgs::command(),
        _ => Args::command(),
    }
}

/// Man pages (section 8: these are administration commands) from the clap definitions. The
/// subcommands of erofs-fanotify get their own pages (erofs-fanotify-cache.8, ...).
fn man_pages(dir: Option<PathBuf>) -> Result<(), cli::CliError> {
    let render = |cmd: clap::Command| -> Result<Vec<u8>, cli::CliError> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).section("8").render(&mut out).map_err(|e| cli::CliError::new(format!("cannot render a man page: {e}")))?;
        Ok(out)
    };
    let Some(dir) = dir else {
        let page = render(cli_command("erofs-fanotify"))?;
        std::io::Write::write_all(&mut std::io::stdout(), &page).map_err(|e| cli::CliError::new(e.to_string()))?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir).map_err(|e| cli::CliError::new(format!("cannot create {}: {e}", dir.display())))?;
    let mut pages: Vec<(String, clap::Command)> = Vec::new();
    for name in ["erofs-fanotify", "erofs-mount", "erofs-umount"] {
        pages.push((name.to_string(), cli_command(name)));
    }
    let main = cli_command("erofs-fanotify");
    for sub in main.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("erofs-fanotify-{}", sub.get_name());
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(leaked)));
    }
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, render(cmd)?).map_err(|e| cli::CliError::new(format!("cannot write {}: {e}", path.display())))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn mount_file(image: &std::path::Path, mountpoint: &std::path::Path, read_ahead_kb: u32) -> Result<(), cli::CliError> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| cli::CliError::new(format!("cannot find {}: {e}", image.display())))?;
    erofs_fanotify::sys::mount::mount_erofs_file(&image, mountpoint, Some(read_ahead_kb))
        .map(|_| ())
        .map_err(|e| cli::CliError::new(format!("cannot mount {}: {e}", image.display())))
}
