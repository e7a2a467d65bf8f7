//! `erofs-mount -o oci.tarindex[=PATH][,oci.zinfo=PATH] REF`: one tar or
//! tar+gzip layer of an ordinary image, mounted through a tar index.
//!
//! With paths (erofs-utils' options) the files are used as given. With a
//! bare `oci.tarindex` the index is made here: the layer is streamed once
//! (range requests of [`STREAM_CHUNK`]), indexed, and stored in the cache
//! dir for later mounts (`build::layer_store`), with its span digests and
//! tar size, its blob digest checked against the image's.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, Bytes};

use crate::agent::sources::{tar_index_layout, SourceSpec, TarIndexFiles};
use crate::build::layer::LayerOptions;
use crate::build::layer_store;
use crate::http::ClientConfig;
use crate::mount::MountOptions;
use crate::oci::{OciBlobSpec, OciError};
use crate::remote::{fetch_with_retry, RangeSource, RetryPolicy};

use super::CliError;

/// Bytes per request while streaming a layer to index it.
const STREAM_CHUNK: u64 = 8 << 20;

pub fn resolve(source: &str, opts: &MountOptions) -> Result<SourceSpec, CliError> {
    if opts.tar_index.is_none() && !opts.tar_index_build {
        return Err(CliError::new("oci.zinfo= goes with oci.tarindex= (the layer's tar index)"));
    }
    let blob = resolve_tar_layer(source, opts)?;
    let name = format!("{} (tar index)", blob.reference);
    let files = match &opts.tar_index {
        Some(index) => {
            let absolute =
                |p: &Path| std::fs::canonicalize(p).map_err(|e| CliError::new(format!("{}: {}", p.display(), super::mount_cmd::io_reason(&e))));
            let zinfo = opts.zinfo.as_deref().map(absolute).transpose()?;
            if zinfo.is_none() && blob.media_type.contains("gzip") {
                return Err(CliError::new(format!(
                    "layer {} is gzip-compressed ({}): give its zinfo with oci.zinfo=PATH",
                    blob.digest, blob.media_type
                )));
            }
            TarIndexFiles { index: absolute(index)?, zinfo, tar_size: None, span_sha256: None }
        }
        None => {
            if opts.zinfo.is_some() {
                return Err(CliError::new("oci.zinfo= needs oci.tarindex=PATH (a bare oci.tarindex makes both)"));
            }
            let stored = match layer_store::load(&opts.cache_dir, &blob.digest) {
                Some(s) => s,
                None => index_at_mount(&blob, &opts.cache_dir)?,
            };
            TarIndexFiles {
                index: stored.index,
                zinfo: stored.zinfo,
                tar_size: Some(stored.meta.tar_size),
                span_sha256: stored.meta.span_sha256,
            }
        }
    };
    tar_index_layout(&name, SourceSpec::Oci(Box::new(blob)), &files).map_err(CliError::new)
}

/// The image's layer as `opts.oci` picks it; a tar media type is what a
/// tar index is for (resolved again by its digest, which skips the EROFS check).
fn resolve_tar_layer(source: &str, opts: &MountOptions) -> Result<OciBlobSpec, CliError> {
    match crate::oci::resolve_reference(source, &opts.oci) {
        Ok(spec) => Ok(spec),
        Err(OciError::NotErofs { digest, media_type, .. }) if media_type.contains("tar") => {
            let by_digest = crate::oci::OciOptions { blob: Some(digest), layer: None, ..opts.oci.clone() };
            crate::oci::resolve_reference(source, &by_digest).map_err(|e| CliError::new(e.to_string()))
        }
        Err(e) => Err(CliError::new(e.to_string())),
    }
}

/// Streams the layer once and stores its index (one-time cost per layer and host).
fn index_at_mount(blob: &OciBlobSpec, cache_dir: &Path) -> Result<layer_store::StoredIndex, CliError> {
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(format!("cannot start the async runtime: {e}")))?;
    let http = ClientConfig::default();
    let (source, _) = runtime
        .block_on(crate::oci::open_blob(blob, &http))
        .map_err(|e| CliError::new(format!("cannot read layer {} to index it: {e}", blob.digest)))?;
    let reader = BlobReader { runtime, source, pos: 0, buf: Bytes::new(), retry: RetryPolicy::default() };
    let stored = layer_store::build_into(cache_dir, reader, &blob.digest, blob.size, &LayerOptions::default())
        .map_err(|e| CliError::new(format!("cannot index layer {}: {e}", blob.digest)))?;
    tracing::info!(
        layer = %blob.digest,
        bytes = blob.size,
        seconds = started.elapsed().as_secs_f64(),
        "indexed the layer at mount (stored for later mounts)"
    );
    Ok(stored)
}

/// The blob in order, [`STREAM_CHUNK`] per range request.
struct BlobReader {
    runtime: tokio::runtime::Runtime,
    source: Arc<dyn RangeSource>,
    pos: u64,
    buf: Bytes,
    retry: RetryPolicy,
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            let size = self.source.size();
            if self.pos >= size || out.is_empty() {
                return Ok(0);
            }
            let end = self.pos.saturating_add(STREAM_CHUNK).min(size);
            let fetched = self
                .runtime
                .block_on(fetch_with_retry(self.source.as_ref(), self.pos..end, &self.retry))
                .map_err(|(e, _)| std::io::Error::other(e.to_string()))?;
            if fetched.bytes.len() as u64 != end - self.pos {
                return Err(std::io::Error::other(format!("the registry returned {} bytes for {}..{end}", fetched.bytes.len(), self.pos)));
            }
            self.pos = end;
            self.buf = fetched.bytes;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        Ok(n)
    }
}
