//! `erofs-mount -o oci.tarindex[=PATH][,oci.zinfo=PATH] REF`: one tar or
//! tar+gzip layer of an ordinary image, mounted through a tar index.
//!
//! With paths (erofs-utils' options) the files are used as given. With a
//! bare `oci.tarindex` the index is made here: the layer is streamed once
//! (range requests of [`STREAM_CHUNK`]), indexed, and stored in the cache
//! dir for later mounts (`build::layer_store`), with its span digests and
//! tar size, its blob digest checked against the image's.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, Bytes};

use crate::agent::sources::{tar_image_layout, tar_index_layout, SourceSpec, TarImageLayer, TarIndexFiles};
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
    let picked = opts.oci.layer.is_some() || opts.oci.blob.is_some();
    // A directory of `index build --output`: the whole image from it.
    if let Some(dir) = opts.tar_index.as_deref().filter(|p| p.is_dir()) {
        if opts.zinfo.is_some() || picked {
            return Err(CliError::new(format!(
                "oci.tarindex={} is a directory of whole-image indexes; oci.zinfo=, oci.layer= and oci.blob= go with one layer's index file",
                dir.display()
            )));
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| CliError::new(format!("{}: {}", dir.display(), super::mount_cmd::io_reason(&e))))?;
        let (layers, config) = image_layers(source, &opts.oci)?;
        return whole_image(source, layers, config, &dir, None);
    }
    // A bare oci.tarindex on an image of several layers: every layer, indexed here once and stored.
    if opts.tar_index_build && !picked && opts.zinfo.is_none() {
        if let Ok((crate::oci::ResolvedImage::Layers(layers), config)) = crate::oci::resolve_image_and_config(source, &opts.oci) {
            return whole_image(source, layers, config, &layer_store::in_cache(&opts.cache_dir), Some(&LayerOptions::default()));
        }
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
            // erofs-utils' files name no diff_id: a plain tar is still checked by its blob digest.
            // A plain tar layer is its own tar: its size is the blob's.
            let tar_size = zinfo.is_none().then_some(blob.size);
            TarIndexFiles { index: absolute(index)?, zinfo, tar_size, span_sha256: None, diff_id: None }
        }
        None => {
            if opts.zinfo.is_some() {
                return Err(CliError::new("oci.zinfo= needs oci.tarindex=PATH (a bare oci.tarindex makes both)"));
            }
            let root = layer_store::in_cache(&opts.cache_dir);
            let stored = match layer_store::load(&root, &blob.digest) {
                Some(s) => s,
                None => index_at_mount(&blob, &root, &LayerOptions::default())?,
            };
            TarIndexFiles {
                index: stored.index,
                zinfo: stored.zinfo,
                tar_size: Some(stored.meta.tar_size),
                span_sha256: stored.meta.span_sha256,
                diff_id: Some(stored.meta.diff_id),
            }
        }
    };
    tar_index_layout(&name, SourceSpec::Oci(Box::new(blob)), &files).map_err(CliError::new)
}

/// `erofs-mount REF` (no `oci.tarindex`) of an image of tar layers: through
/// the indexes stored in the cache dir, when every layer has one (an earlier
/// `oci.tarindex` mount made them); else one line on how to make them.
pub fn resolve_indexed(source: &str, opts: &MountOptions, layers: Vec<OciBlobSpec>, config: Option<OciBlobSpec>) -> Result<SourceSpec, CliError> {
    let root = layer_store::in_cache(&opts.cache_dir);
    if layers.iter().all(|l| layer_store::load(&root, &l.digest).is_some()) {
        return whole_image(source, layers, config, &root, None);
    }
    if opts.index != crate::index::IndexMode::Off {
        match from_artifact(&layers, opts, &root) {
            Ok(Some(artifact)) => {
                tracing::info!(%artifact, "using the index artifact's tar indexes");
                return whole_image_via(source, layers, config, &root, None, Some(&artifact));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot use the image's index artifact"),
        }
    }
    Err(not_indexed(source, &layers))
}

/// Fetches the layers' tar indexes from the image's index artifact into the
/// store (the layers it already holds are kept). `Ok(None)`: no artifact.
fn from_artifact(layers: &[OciBlobSpec], opts: &MountOptions, root: &Path) -> Result<Option<String>, String> {
    let Some(first) = layers.first() else { return Ok(None) };
    let wanted: Vec<(String, u64)> = layers.iter().map(|l| (l.digest.clone(), l.size)).collect();
    let found = crate::index::lookup::tar_layers_for_mount(&first.reference, &opts.oci, &wanted)?;
    for w in &found.warnings {
        tracing::warn!("{w}");
    }
    let Some((artifact, files)) = found.found else {
        tracing::info!(why = found.none_because.as_deref().unwrap_or(""), "no tar index artifact");
        return Ok(None);
    };
    for f in files {
        if layer_store::load(root, &f.digest).is_some() {
            continue;
        }
        let meta = layer_store::LayerMeta {
            blob_digest: f.digest.clone(),
            blob_size: f.size,
            diff_id: f.diff_id,
            tar_size: f.tar_size,
            gzip: f.gzip,
            span_sha256: f.span_sha256,
        };
        layer_store::store_files(root, &meta, &f.index, f.zinfo.as_deref()).map_err(|e| format!("index artifact {artifact}: {e}"))?;
    }
    Ok(Some(artifact))
}

/// [`resolve_indexed`] for an image of one tar layer.
pub fn resolve_indexed_one(source: &str, opts: &MountOptions) -> Result<SourceSpec, CliError> {
    let (layers, config) = image_layers(source, &opts.oci)?;
    resolve_indexed(source, opts, layers, config)
}

fn not_indexed(source: &str, layers: &[OciBlobSpec]) -> CliError {
    let media = layers.first().map(|l| l.media_type.as_str()).unwrap_or("tar");
    CliError::new(format!(
        "{source} is an ordinary image ({} layer(s) of {media}) and this host holds no index of it: mount it with \
         -o oci.tarindex (indexes each layer once, at mount, and keeps the indexes), or make them first with \
         `erofs-fanotify index build {source} --output DIR` and mount with -o oci.tarindex=DIR",
        layers.len()
    ))
}

/// Every layer of the image (one or several) and its config.
fn image_layers(source: &str, oci: &crate::oci::OciOptions) -> Result<(Vec<OciBlobSpec>, Option<OciBlobSpec>), CliError> {
    match crate::oci::resolve_image_and_config(source, oci) {
        Ok((crate::oci::ResolvedImage::Layers(layers), config)) => Ok((layers, config)),
        Ok((crate::oci::ResolvedImage::Blob(b), config)) => Ok((vec![*b], config)),
        Err(OciError::NotErofs { digest, .. }) => {
            let by_digest = crate::oci::OciOptions { blob: Some(digest), layer: None, ..oci.clone() };
            match crate::oci::resolve_image_and_config(source, &by_digest).map_err(|e| CliError::new(e.to_string()))? {
                (crate::oci::ResolvedImage::Blob(b), config) => Ok((vec![*b], config)),
                (crate::oci::ResolvedImage::Layers(layers), config) => Ok((layers, config)),
            }
        }
        Err(e) => Err(CliError::new(e.to_string())),
    }
}

/// What `index build` made.
pub struct BuiltImageIndex {
    pub layers: usize,
    /// Layers indexed now (the others were in the directory already).
    pub indexed: usize,
    pub merged: PathBuf,
    pub merged_len: u64,
}

/// `erofs-fanotify index build REF --output DIR`: every tar layer's index
/// (streamed once each, blob digest and diff_id checked) and their merged
/// metadata, into DIR; `-o oci.tarindex=DIR` mounts the image from them. `opts` apply to the
/// layers indexed now (those DIR already holds are kept as they are).
pub fn build_image_index(source: &str, oci: &crate::oci::OciOptions, out: &Path, opts: &LayerOptions) -> Result<BuiltImageIndex, CliError> {
    let (layers, config) = image_layers(source, oci)?;
    std::fs::create_dir_all(out).map_err(|e| CliError::new(format!("cannot create {}: {}", out.display(), super::mount_cmd::io_reason(&e))))?;
    let missing = layers.iter().filter(|l| layer_store::load(out, &l.digest).is_none()).count();
    let spec = whole_image(source, layers.clone(), config, out, Some(opts))?;
    drop(spec);
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let merged = layer_store::load_merged(out, &digests).ok_or_else(|| CliError::new(format!("the merged index in {} is incomplete", out.display())))?;
    Ok(BuiltImageIndex { layers: layers.len(), indexed: missing, merged: merged.image, merged_len: merged.meta.image_len })
}

/// Whether a media type names a tar layer (plain or gzip; Docker's and OCI's).
pub fn is_tar_layer(media_type: &str) -> bool {
    media_type.contains("tar") && !media_type.contains("zstd")
}

/// Alignment of each tar in a whole image's address space: a fetch unit of
/// up to 4 MiB never spans two tars.
const TAR_ALIGN_IN_IMAGE: u64 = 4 << 20;

/// An image of tar layers, whole: each layer's stored index (made here
/// with `build` when it is missing and `build` is given, else it must be in `root`), checked against the
/// config's diff_ids, and their merged metadata (stored in `root` too).
fn whole_image(
    source: &str,
    layers: Vec<OciBlobSpec>,
    config: Option<OciBlobSpec>,
    root: &Path,
    build: Option<&LayerOptions>,
) -> Result<SourceSpec, CliError> {
    whole_image_via(source, layers, config, root, build, None)
}

/// [`whole_image`]; `artifact`: the index artifact the indexes came from (named in `status`).
fn whole_image_via(
    source: &str,
    layers: Vec<OciBlobSpec>,
    config: Option<OciBlobSpec>,
    root: &Path,
    build: Option<&LayerOptions>,
    artifact: Option<&str>,
) -> Result<SourceSpec, CliError> {
    let reference = layers.first().map(|l| l.reference.as_str()).unwrap_or(source);
    let name = match artifact {
        Some(a) => format!("{reference} (tar index from artifact {a})"),
        None => format!("{reference} (tar index)"),
    };
    for (i, l) in layers.iter().enumerate() {
        if !is_tar_layer(&l.media_type) {
            return Err(CliError::new(format!(
                "layer {i} of {source} ({}) is {}, not a tar layer: a tar index mounts images of tar and tar+gzip layers only",
                l.digest, l.media_type
            )));
        }
    }
    let mut stored = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        let s = match (layer_store::load(root, &l.digest), build) {
            (Some(s), _) => s,
            (None, Some(opts)) => index_at_mount(l, root, opts)?,
            (None, None) => {
                return Err(CliError::new(format!(
                    "{} holds no index of layer {i} ({}) of {source}; make them with `erofs-fanotify index build {source} --output {}`",
                    root.display(),
                    l.digest,
                    root.display()
                )))
            }
        };
        stored.push(s);
    }
    check_diff_ids(source, &stored, config.as_ref())?;
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let merged = match layer_store::load_merged(root, &digests) {
        Some(m) => m,
        None => merge_stored(&stored, root, &digests).map_err(|e| CliError::new(format!("cannot merge the layers of {source}: {e}")))?,
    };
    let parts = layers
        .into_iter()
        .zip(stored)
        .zip(&merged.meta.tars)
        .map(|((blob, s), [base, len])| TarImageLayer {
            blob: SourceSpec::Oci(Box::new(blob)),
            files: TarIndexFiles {
                index: s.index,
                zinfo: s.zinfo,
                tar_size: Some(s.meta.tar_size),
                span_sha256: s.meta.span_sha256,
                diff_id: Some(s.meta.diff_id),
            },
            base: *base,
            len: *len,
        })
        .collect();
    tar_image_layout(&name, &merged.image, merged.meta.size, parts).map_err(CliError::new)
}

/// Each layer's tar must be what the image config says it is.
fn check_diff_ids(source: &str, stored: &[layer_store::StoredIndex], config: Option<&OciBlobSpec>) -> Result<(), CliError> {
    let Some(config) = config else {
        return Err(CliError::new(format!("{source}: the image names no config, so its layers' diff_ids cannot be checked")));
    };
    let want = crate::oci::fetch_diff_ids(config).map_err(|e| CliError::new(e.to_string()))?;
    if want.len() != stored.len() {
        return Err(CliError::new(format!(
            "{source}: the image config lists {} diff_ids for {} layers",
            want.len(),
            stored.len()
        )));
    }
    for (i, (s, w)) in stored.iter().zip(&want).enumerate() {
        if &s.meta.diff_id != w {
            return Err(CliError::new(format!(
                "layer {i} of {source} ({}) unpacks to a tar with diff_id {}, but the image config says {w}",
                s.meta.blob_digest, s.meta.diff_id
            )));
        }
    }
    Ok(())
}

/// Reads the stored indexes, merges them and stores the result.
fn merge_stored(stored: &[layer_store::StoredIndex], root: &Path, digests: &[String]) -> Result<layer_store::StoredMerged, String> {
    use crate::erofs::{reader::read_tree, WalkLimits};
    use crate::merge::tar::{merge_tar_indexes, TarLayer};
    let mut trees = Vec::with_capacity(stored.len());
    let mut placements = Vec::with_capacity(stored.len());
    for s in stored {
        let bytes = std::fs::read(&s.index).map_err(|e| format!("cannot read {}: {e}", s.index.display()))?;
        let placed = crate::segments::tar_index::placement(&bytes).map_err(|e| format!("{}: {e}", s.index.display()))?;
        let tree = read_tree(bytes.as_slice(), &WalkLimits::default()).map_err(|e| format!("{}: {e}", s.index.display()))?;
        trees.push(tree);
        placements.push(placed);
    }
    let layers: Vec<TarLayer> = stored
        .iter()
        .zip(&trees)
        .zip(&placements)
        .map(|((s, tree), p)| TarLayer {
            name: crate::merge::short(&s.meta.blob_digest),
            tree,
            tar_start: p.tar_start,
            tar_len: p.tar_len,
            diff_id: s.meta.diff_id.clone(),
        })
        .collect();
    let merged = merge_tar_indexes(&layers, TAR_ALIGN_IN_IMAGE).map_err(|e| e.to_string())?;
    tracing::info!(
        layers = layers.len(),
        image_len = merged.image.len(),
        entries = merged.stats.entries,
        whiteouts = merged.stats.whiteouts,
        opaque_dirs = merged.stats.opaque_dirs,
        "tar layers merged"
    );
    let meta = layer_store::MergedMeta {
        layers: digests.to_vec(),
        image_len: merged.image.len() as u64,
        size: merged.size,
        tars: merged.blobs.iter().map(|b| [b.base, b.size]).collect(),
    };
    layer_store::store_merged(root, &merged.image, &meta).map_err(|e| e.to_string())
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
fn index_at_mount(blob: &OciBlobSpec, root: &Path, opts: &LayerOptions) -> Result<layer_store::StoredIndex, CliError> {
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
    let stored = layer_store::build_into(root, reader, &blob.digest, blob.size, opts)
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
