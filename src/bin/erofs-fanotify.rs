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
    /// Print (or save) the byte ranges readers of a mount asked for, for -o prefetch_trace=FILE
    Trace {
        mountpoint: PathBuf,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Start a new trace after this one
        #[arg(long)]
        reset: bool,
    },
    /// Replace the agent's worker with the binary now on disk, without failing reads
    Upgrade {
        mountpoint: Option<PathBuf>,
        #[arg(long, conflicts_with = "mountpoint")]
        all: bool,
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
        Cmd::Trace { mountpoint, output, reset } => {
            cli::init_cli_logging();
            cli::trace_cmd::run(&mountpoint, output, reset).map(|_| 0)
        }
        Cmd::Upgrade { mountpoint, all } => {
            cli::init_cli_logging();
            upgrade_cmd::run(mountpoint, all).map(|_| 0)
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

fn mount_file(image: &std::path::Path, mountpoint: &std::path::Path, read_ahead_kb: u32) -> Result<(), cli::CliError> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| cli::CliError::new(format!("cannot find {}: {e}", image.display())))?;
    erofs_fanotify::sys::mount::mount_erofs_file(&image, mountpoint, Some(read_ahead_kb))
        .map(|_| ())
        .map_err(|e| cli::CliError::new(format!("cannot mount {}: {e}", image.display())))
}
