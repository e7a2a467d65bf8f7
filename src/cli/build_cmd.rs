//! `erofs-fanotify build SRC OUT.erofs [--compress lz4] [--order FILE]
//! [--reproducible] [--tar-index]`: an EROFS image with all metadata in one
//! run after the superblock, from a directory or a tar stream (`.tar`,
//! `.tar.gz`, `-` for stdin).
//!
//! The image is written to a temp file beside OUT and renamed into place on
//! success; on any failure nothing is left behind.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::build::{self, tar::DataMode, BuildError, LocalFiles};
use crate::erofs::writer::{self, Compression, InodeId, Tree, WriterOptions};

use super::CliError;

pub struct BuildArgs {
    pub src: PathBuf,
    pub out: PathBuf,
    /// `None` or `Some("lz4")`.
    pub compress: Option<String>,
    pub order: Option<PathBuf>,
    pub reproducible: bool,
    pub tar_index: bool,
    /// Uncompressed bytes per lz4 pcluster.
    pub pcluster_size: Option<u32>,
    /// `--zinfo FILE` (with `--tar-index` of a gzip layer): write its zinfo.
    pub zinfo: Option<PathBuf>,
    /// `--zinfo-span SIZE`: distance between zinfo checkpoints.
    pub zinfo_span: Option<u64>,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

/// A one-line progress display on a terminal (nothing otherwise).
struct TermProgress {
    tty: bool,
    last: Mutex<(Instant, &'static str)>,
}

impl TermProgress {
    fn new() -> Self {
        TermProgress {
            tty: std::io::stderr().is_terminal(),
            last: Mutex::new((Instant::now(), "")),
        }
    }

    fn line(&self, text: &str) {
        if self.tty {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K{text}");
            let _ = e.flush();
        }
    }

    fn done(&self) {
        self.line("");
    }
}

impl writer::Progress for TermProgress {
    fn update(&self, phase: &'static str, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        if let Ok(mut last) = self.last.lock() {
            if last.1 == phase && last.0.elapsed().as_millis() < 200 && done < total {
                return;
            }
            *last = (Instant::now(), phase);
        }
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        self.line(&format!("{phase}: {pct:>3}% ({} of {} MiB)", done >> 20, total >> 20));
    }
}

/// Reads the `--order` file: one image path per line, `#` comments.
fn read_order(path: &Path, tree: &Tree) -> Result<Vec<InodeId>, CliError> {
    let text = std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    let mut missing = 0u64;
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        match tree.lookup_path(trimmed) {
            Some(id) => out.push(id),
            None => missing += 1,
        }
    }
    if missing > 0 {
        tracing::warn!("{missing} paths of {} are not in the image", path.display());
    }
    Ok(out)
}

pub(crate) fn random_uuid() -> Result<[u8; 16], CliError> {
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut u))
        .map_err(|e| err(format!("cannot read /dev/urandom: {e}")))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

fn is_tar_source(src: &Path) -> bool {
    if src == Path::new("-") {
        return true;
    }
    // A directory, or a symlink the directory walker must judge (a dangling
    // or looping SRC is its error to report).
    match std::fs::metadata(src) {
        Ok(m) => !m.is_dir(),
        Err(_) => std::fs::symlink_metadata(src).map(|m| !m.file_type().is_symlink()).unwrap_or(true),
    }
}

pub fn run(args: BuildArgs) -> Result<(), CliError> {
    if args.tar_index {
        return run_tar_index(args);
    }
    if args.zinfo.is_some() || args.zinfo_span.is_some() {
        return Err(err("--zinfo and --zinfo-span go with --tar-index"));
    }
    let started = Instant::now();
    let compression = match args.compress.as_deref() {
        None | Some("none") => Compression::None,
        Some("lz4") => Compression::Lz4 {
            pcluster_bytes: args.pcluster_size.unwrap_or(writer::DEFAULT_LZ4_PCLUSTER),
        },
        Some(other) => return Err(err(format!("unknown compression {other:?} (supported: lz4)"))),
    };
    let out_dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_name = args
        .out
        .file_name()
        .ok_or_else(|| err(format!("{} is not a file name", args.out.display())))?
        .to_string_lossy()
        .into_owned();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{out_name}."))
        .suffix(".tmp")
        .tempfile_in(&out_dir)
        .map_err(|e| err(format!("cannot create a file in {}: {e}", out_dir.display())))?;
    let progress = TermProgress::new();

    // The tree (and a spool file for tar data that cannot be referenced in place).
    let tar = is_tar_source(&args.src);
    let mut spool: Option<tempfile::NamedTempFile> = None;
    let tree = if !tar {
        progress.line("reading the source tree...");
        build::dir::tree_from_dir(&args.src).map_err(err)?.0
    } else {
        progress.line("reading the tar stream...");
        let input = build::input::open_tar(&args.src, None).map_err(err)?;
        let (tree, _stats) = if let Some(path) = input.seekable_path.clone() {
            build::tar::tree_from_tar(input.reader, DataMode::InPlace(path))
        } else {
            let s = tempfile::Builder::new()
                .prefix(&format!(".{out_name}."))
                .suffix(".spool")
                .tempfile_in(&out_dir)
                .map_err(|e| err(format!("cannot create a spool file in {}: {e}", out_dir.display())))?;
            let path = s.path().to_path_buf();
            let mut file = s.reopen().map_err(|e| err(format!("cannot open the spool file: {e}")))?;
            spool = Some(s);
            build::tar::tree_from_tar(input.reader, DataMode::Spool { file: &mut file, path })
        }
        .map_err(|e: BuildError| err(format!("{}: {e}", args.src.display())))?;
        tree
    };

    let mut opts = WriterOptions {
        compression,
        derive_uuid: args.reproducible,
        uuid: if args.reproducible { [0; 16] } else { random_uuid()? },
        ..WriterOptions::default()
    };
    if let Some(order) = &args.order {
        opts.data_order = read_order(order, &tree)?;
    }
    let files = LocalFiles;
    let plan = writer::plan_with_progress(&tree, &opts, &files, &progress).map_err(err)?;
    let summary = plan
        .write_with_progress(tmp.as_file_mut(), &files, &progress)
        .map_err(|e| err(format!("{}: {e}", args.out.display())))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| err(format!("cannot write {}: {e}", args.out.display())))?;
    progress.done();
    tracing::info!("image summary: {summary:?}");
    drop(spool);
    use std::os::unix::fs::PermissionsExt;
    let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    tmp.persist(&args.out)
        .map_err(|e| err(format!("cannot rename the image to {}: {}", args.out.display(), e.error)))?;
    println!(
        "{}: {} bytes ({} inodes), metadata {} bytes in one range [0, {}), data {} bytes, {:.2} s",
        args.out.display(),
        summary.image_size,
        summary.inodes,
        summary.metadata_end,
        summary.metadata_end,
        summary.data_bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A temp file beside `out`, renamed into place by the caller.
fn temp_beside(out: &Path, suffix: &str) -> Result<tempfile::NamedTempFile, CliError> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| err(format!("{} is not a file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(suffix)
        .tempfile_in(&dir)
        .map_err(|e| err(format!("cannot create a file in {}: {e}", dir.display())))
}

fn persist(tmp: tempfile::NamedTempFile, out: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .sync_all()
        .map_err(|e| err(format!("cannot write {}: {e}", out.display())))?;
    let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    tmp.persist(out)
        .map_err(|e| err(format!("cannot rename to {}: {}", out.display(), e.error)))?;
    Ok(())
}

/// `build --tar-index [--zinfo Z] LAYER OUT`: one pass over the layer (the
/// zinfo builder inflates it, the tar reader reads what it yields); the
/// index and the zinfo are both written or neither.
fn run_tar_index(args: BuildArgs) -> Result<(), CliError> {
    let started = Instant::now();
    if args.compress.is_some() {
        return Err(err("--tar-index images hold no data: --compress does not apply"));
    }
    if args.order.is_some() {
        return Err(err("--tar-index images hold no data: --order does not apply"));
    }
    if !is_tar_source(&args.src) {
        return Err(err(format!("{}: --tar-index needs a tar or tar.gz layer, not a directory", args.src.display())));
    }
    let raw: Box<dyn Read> = if args.src == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&args.src).map_err(|e| err(format!("cannot open {}: {e}", args.src.display())))?,
        )
    };
    let opts = build::layer::LayerOptions {
        span_size: args.zinfo_span.unwrap_or(crate::gzip::DEFAULT_SPAN_SIZE),
        uuid: if args.reproducible { None } else { Some(random_uuid()?) },
    };
    let mut tmp = temp_beside(&args.out, ".tmp")?;
    let progress = TermProgress::new();
    progress.line("reading the layer...");
    let layer = build::layer::index_layer(raw, tmp.as_file_mut(), None, &opts)
        .map_err(|e| err(format!("{}: {e}", args.src.display())))?;
    progress.done();
    let zinfo_tmp = match (&args.zinfo, &layer.zinfo) {
        (Some(path), Some(built)) => {
            let mut z = temp_beside(path, ".tmp")?;
            z.as_file_mut()
                .write_all(built.zinfo.as_bytes())
                .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
            Some((z, path.clone()))
        }
        (Some(_), None) => {
            return Err(err(format!("{} is not gzip: --zinfo applies to gzip layers only", args.src.display())))
        }
        (None, _) => None,
    };
    persist(tmp, &args.out)?;
    if let Some((z, path)) = zinfo_tmp {
        persist(z, &path)?;
    }
    println!(
        "{}: tar index of {} inodes, {} bytes; device 1 = the tar ({} bytes, {} blocks of 512 at block {}: back it with [index | tar]); {:.2} s",
        args.out.display(),
        layer.inodes,
        layer.index_size,
        layer.tar_size,
        layer.device_blocks,
        layer.uniaddr,
        started.elapsed().as_secs_f64()
    );
    if let (Some(path), Some(built)) = (&args.zinfo, &layer.zinfo) {
        println!(
            "{}: zinfo of {} spans (span {} bytes), {} gzip member(s)",
            path.display(),
            built.zinfo.span_count(),
            built.zinfo.span_size(),
            built.members
        );
    }
    println!("diff_id {} blob {} ({} bytes)", layer.diff_id, layer.blob_digest, layer.blob_size);
    Ok(())
}

/// `--zinfo-span SIZE`: uncompressed bytes between zinfo checkpoints (`4M`), above 0 and below 4 GiB.
pub fn parse_zinfo_span(value: Option<&str>) -> Result<Option<u64>, CliError> {
    match value.map(|v| (v, crate::mount::options::parse_size(v))) {
        None => Ok(None),
        Some((_, Some(n))) if n > 0 && n <= u64::from(u32::MAX) => Ok(Some(n)),
        Some((v, _)) => Err(CliError::new(format!("--zinfo-span {v:?}: expected a size like 4M, below 4G"))),
    }
}
