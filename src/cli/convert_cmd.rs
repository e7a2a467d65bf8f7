//! `erofs-fanotify convert SRC_REF DST_REF [--platform P] [--compress lz4]
//! [--order FILE] [--per-layer] [-o oci.*]`: pulls an ordinary image (tar or
//! tar+gzip layers), flattens its layers into one EROFS image made for lazy
//! mounts (or writes one EROFS layer per source layer with `--per-layer`),
//! and pushes it with the source's config (`rootfs.diff_ids` updated).
//! Prints the manifest digest. See `crate::build::convert`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use crate::build::convert::{self, ConvertOptions, ConvertProgress};
use crate::erofs::writer::{self, Compression};
use crate::oci::push::UploadOptions;
use crate::oci::Reference;

use super::push_cmd;
use super::CliError;

pub struct ConvertArgs {
    pub src: String,
    pub dst: String,
    pub platform: Option<String>,
    pub compress: Option<String>,
    pub order: Option<PathBuf>,
    pub per_layer: bool,
    pub options: Vec<String>,
    pub chunk_size: Option<String>,
    /// Where the private temp dir goes (default: $TMPDIR, else /var/tmp).
    pub tmpdir: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

/// One line per step on a terminal.
struct TermSteps {
    tty: bool,
}

impl TermSteps {
    fn line(&self, text: &str) {
        if self.tty {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K{text}");
            let _ = e.flush();
        }
    }
}

impl ConvertProgress for TermSteps {
    fn layer(&self, index: usize, count: usize, digest: &str, size: u64) {
        self.line(&format!("reading layer {}/{count} {} ({} MiB)...", index + 1, short(digest), size >> 20));
    }
    fn writing(&self, what: &str) {
        self.line(&format!("writing {what}..."));
    }
    fn pushing(&self, what: &str, size: u64) {
        self.line(&format!("pushing {} ({} MiB)...", short(what), size >> 20));
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

pub fn run(args: ConvertArgs) -> Result<(), CliError> {
    let o = push_cmd::oci_options(&args.options)?;
    let platform = push_cmd::platform(args.platform.as_deref(), &o)?;
    let compression = match args.compress.as_deref() {
        None | Some("none") => Compression::None,
        Some("lz4") => Compression::Lz4 { pcluster_bytes: writer::DEFAULT_LZ4_PCLUSTER },
        Some(other) => return Err(err(format!("unknown compression {other:?} (supported: lz4)"))),
    };
    let src = Reference::parse(&args.src).map_err(err)?;
    let dst = Reference::parse(&args.dst).map_err(err)?;
    let order = match &args.order {
        Some(p) => Some(std::fs::read(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?),
        None => None,
    };
    let temp_base = args
        .tmpdir
        .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let opts = ConvertOptions {
        platform,
        compression,
        order,
        per_layer: args.per_layer,
        upload: UploadOptions { chunk_size: push_cmd::chunk_size(args.chunk_size.as_deref())?, mount_from: None },
        temp_base,
    };
    let rt = push_cmd::runtime()?;
    let steps = TermSteps { tty: std::io::stderr().is_terminal() };
    let done = convert::convert(&rt, &src, &dst, &o, &opts, &steps).map_err(err)?;
    steps.line("");
    let bytes: u64 = done.layers.iter().map(|l| l.blob.size).sum();
    tracing::info!(
        source = %src, source_digest = %done.source_digest, platform = ?done.source_platform,
        digest = %done.manifest_digest, layers = done.layers.len(), bytes,
        source_requests = done.requests.0, destination_requests = done.requests.1, "converted"
    );
    if steps.tty {
        eprintln!(
            "converted {src} ({} layers) into {} EROFS layer(s), {bytes} bytes: {}@{}",
            done.source_layers,
            done.layers.len(),
            dst.name(),
            done.manifest_digest
        );
    }
    println!("{}", done.manifest_digest);
    Ok(())
}
