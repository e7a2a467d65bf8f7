//! Converting an ordinary image (Docker schema 2 or OCI; tar or tar+gzip
//! layers) into EROFS, and pushing the result.
//!
//! Each layer is streamed from the registry once: its bytes go through a
//! bounded channel to the tar reader on this thread while the download task
//! hashes them; the layer's size and digest are checked when it ends, and its
//! uncompressed digest against the config's `rootfs.diff_ids`. File data is
//! spooled to a private temp dir (removed on success and on failure), which
//! also receives the EROFS image(s). Nothing is pushed before every layer has
//! been read, checked and written.
//!
//! Flattening ([`apply_layer`]) follows overlay rules: layers apply in
//! order, a later entry replaces an earlier one (a directory over a directory
//! merges), a whiteout (`.wh.NAME`, read as char 0:0) deletes the lower
//! entry, an opaque directory (`.wh..wh..opq`) hides every lower entry, a
//! directory only implied by an upper layer keeps the lower one's metadata,
//! hard links stay one inode. The markers do not survive flattening.
//! `per_layer` instead writes one EROFS layer per source layer with the
//! markers kept (whiteouts as char 0:0, `trusted.overlay.opaque=y`) for a
//! merge at mount time.
//!
//! The pushed config is the source's JSON with `rootfs.diff_ids` replaced by
//! the EROFS layers' digests (they are not compressed: the uncompressed
//! digest is the blob's); history and everything else are kept. The images
//! are written with a UUID derived from their content: the same source gives
//! the same blobs and manifest.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::tar::{tree_from_tar, DataMode, TarStats};
use super::{BuildError, LocalFiles};
use crate::erofs::writer::{self, Compression, ImageSummary, Inode, InodeId, Kind, Metadata, Tree, WriteError, WriterOptions};
use crate::oci::auth::Access;
use crate::oci::manifest::{self, Descriptor, Platform};
use crate::oci::push::{self, Blob, PushedBlob, Repository, UploadOptions};
use crate::oci::{OciError, OciOptions, Reference};

/// Layers of these types are read (tar, possibly gzip; the gzip magic decides).
const TAR_LAYER_TYPES: [&str; 8] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/x-tar",
];
/// Chunks of a layer in flight between the download and the tar reader.
const CHANNEL_CHUNKS: usize = 32;
/// A layer download that delivers nothing for this long has stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Downloads resumed (with a Range request) after a cut.
const DOWNLOAD_RESUMES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("layer {index} ({digest}) of {image}: {why}")]
    Layer { index: usize, digest: String, image: String, why: String },
    #[error("{0}")]
    Image(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Write(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ConvertError {
    let context = context.into();
    move |source| ConvertError::Io { context, source }
}

pub struct ConvertOptions {
    /// The index entry to take when the source is an index.
    pub platform: Platform,
    pub compression: Compression,
    /// An `--order` list (paths, one per line, `#` comments): their data first.
    pub order: Option<Vec<u8>>,
    pub per_layer: bool,
    pub upload: UploadOptions,
    /// Where the private temp dir is made.
    pub temp_base: PathBuf,
}

/// One EROFS layer that was pushed.
#[derive(Clone, Debug)]
pub struct ConvertedLayer {
    pub blob: PushedBlob,
    pub summary: ImageSummary,
}

#[derive(Clone, Debug)]
pub struct Converted {
    pub manifest_digest: String,
    pub source_digest: String,
    pub source_platform: Option<String>,
    pub layers: Vec<ConvertedLayer>,
    pub source_layers: usize,
    /// Requests to the source and the destination registries.
    pub requests: (u64, u64),
}

/// Sees each step, for a progress display.
pub trait ConvertProgress {
    fn layer(&self, _index: usize, _count: usize, _digest: &str, _size: u64) {}
    fn writing(&self, _what: &str) {}
    fn pushing(&self, _what: &str, _size: u64) {}
}

pub struct Quiet;
impl ConvertProgress for Quiet {}

/// Pulls `src`, converts it and pushes it to `dst`.
pub fn convert(
    rt: &tokio::runtime::Runtime,
    src: &Reference,
    dst: &Reference,
    o: &OciOptions,
    opts: &ConvertOptions,
    progress: &dyn ConvertProgress,
) -> Result<Converted, ConvertError> {
    let source = Arc::new(Repository::connect(src, o, Access::default())?);
    let image = rt.block_on(source.resolve_image(&opts.platform))?;
    let layers = image.manifest.layers().clone();
    check_layers(src, &layers)?;
    let config_bytes = rt.block_on(source.get_blob(image.manifest.config().digest().as_ref(), push::MAX_CONFIG_BYTES))?;
    let diff_ids = config_diff_ids(&config_bytes)
        .map_err(|why| ConvertError::Image(format!("the config of {src}: {why}")))?;
    if let Some(ids) = &diff_ids {
        if ids.len() != layers.len() {
            return Err(ConvertError::Image(format!(
                "the config of {src} lists {} diff_ids for {} layers",
                ids.len(),
                layers.len()
            )));
        }
    }
    let temp = tempfile::Builder::new()
        .prefix("erofs-fanotify-convert-")
        .tempdir_in(&opts.temp_base)
        .map_err(io_err(format!("cannot create a temp dir in {}", opts.temp_base.display())))?;

    // Read every layer; write the EROFS image(s).
    let mut images: Vec<(PathBuf, ImageSummary)> = Vec::new();
    let mut merged = Tree::new(Metadata::with_permissions(0o755));
    for (index, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        progress.layer(index, layers.len(), &digest, layer.size());
        let spool_path = temp.path().join(format!("layer-{index}.spool"));
        let (tree, stats) = read_layer(rt, &source, src, index, layer, diff_ids.as_ref().and_then(|d| d.get(index)), &spool_path)?;
        tracing::info!(index, %digest, entries = stats.entries, whiteouts = stats.whiteouts, opaque = stats.opaque_dirs, "layer read");
        if opts.per_layer {
            progress.writing(&format!("EROFS layer {index}"));
            let out = temp.path().join(format!("layer-{index}.erofs"));
            let summary = write_image(&tree, &out, opts)?;
            drop(tree);
            let _ = std::fs::remove_file(&spool_path);
            images.push((out, summary));
        } else {
            apply_layer(&mut merged, &tree, &stats.explicit_dirs)
                .map_err(|e| ConvertError::Layer { index, digest: digest.clone(), image: src.to_string(), why: e.to_string() })?;
        }
    }
    if !opts.per_layer {
        progress.writing("the EROFS image");
        let out = temp.path().join("image.erofs");
        let summary = write_image(&merged, &out, opts)?;
        drop(merged);
        images.push((out, summary));
    }

    // Push: the layers, the config, the manifest (all made, and a digest
    // in `dst` checked, before anything is sent).
    let mut blobs = Vec::new();
    for (path, summary) in images {
        let blob = Blob::from_file(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
        blobs.push((blob, summary));
    }
    let ids: Vec<String> = blobs.iter().map(|(b, _)| b.digest.clone()).collect();
    let config = Blob::from_bytes(rewrite_config(&config_bytes, &ids).map_err(|why| ConvertError::Image(format!("the config of {src}: {why}")))?);
    let sizes: Vec<(String, u64)> = blobs.iter().map(|(b, _)| (b.digest.clone(), b.size)).collect();
    let m = push::erofs_image_manifest((&config.digest, config.size), &sizes)?;
    let bytes = push::to_json(&m)?;
    let digest = push::sha256_digest(&bytes);
    if let Some(want) = dst.digest.as_ref().filter(|w| **w != digest) {
        return Err(ConvertError::Image(format!("{dst} names digest {want}, but the converted manifest is {digest}")));
    }
    let dest = Repository::connect(dst, o, Access { push: true, mount_from: opts.upload.mount_from.iter().cloned().collect() })?;
    let mut converted = Vec::new();
    for (blob, summary) in blobs {
        progress.pushing(&blob.digest, blob.size);
        let pushed = rt.block_on(dest.push_blob(&blob, &opts.upload))?;
        converted.push(ConvertedLayer { blob: pushed, summary });
    }
    rt.block_on(dest.push_blob(&config, &opts.upload))?;
    let manifest_digest = rt.block_on(dest.put_manifest_at(dst, manifest::OCI_MANIFEST, &bytes))?;
    drop(temp);
    Ok(Converted {
        manifest_digest,
        source_digest: image.digest,
        source_platform: image.platform.as_ref().map(manifest::platform_name),
        layers: converted,
        source_layers: layers.len(),
        requests: (source.requests(), dest.requests()),
    })
}

fn check_layers(src: &Reference, layers: &[Descriptor]) -> Result<(), ConvertError> {
    if layers.is_empty() {
        return Err(ConvertError::Image(format!("image {src} has no layers")));
    }
    for (i, l) in layers.iter().enumerate() {
        let mt = l.media_type().to_string();
        if TAR_LAYER_TYPES.contains(&mt.as_str()) {
            continue;
        }
        let why = if manifest::EROFS_MEDIA_TYPES.contains(&mt.as_str()) {
            format!("layer {i} of {src} is EROFS already; mount it as it is")
        } else if mt.contains("zstd") {
            format!("layer {i} of {src} is zstd-compressed ({mt}); convert reads tar and tar+gzip layers")
        } else {
            format!("layer {i} of {src} has media type {mt:?}; convert reads tar and tar+gzip layers")
        };
        return Err(ConvertError::Image(why));
    }
    Ok(())
}

/// `rootfs.diff_ids` of a config (None when it has none).
pub fn config_diff_ids(config: &[u8]) -> Result<Option<Vec<String>>, String> {
    let v: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("malformed JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let Some(ids) = v.get("rootfs").and_then(|r| r.get("diff_ids")) else { return Ok(None) };
    let ids = ids.as_array().ok_or("rootfs.diff_ids is not a list")?;
    ids.iter()
        .map(|d| d.as_str().ok_or_else(|| "a diff_id is not a string".to_string()).and_then(crate::oci::reference::parse_digest))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The source config with `rootfs` = `{type: layers, diff_ids}`; everything
/// else (platform, `config`, history, dates) as it was.
pub fn rewrite_config(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>, String> {
    let mut v: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("malformed JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    obj.insert("rootfs".into(), serde_json::json!({"type": "layers", "diff_ids": diff_ids}));
    push::to_json(&v).map_err(|e| e.to_string())
}

// ---- one layer ----

enum Msg {
    Data(Bytes),
    /// Every byte delivered and the size and digest checked.
    End,
    Fail(String),
}

/// The blocking side of a layer download.
struct LayerStream {
    rx: tokio::sync::mpsc::Receiver<Msg>,
    cur: Bytes,
    ended: bool,
    failure: Arc<Mutex<Option<String>>>,
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.cur.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur.split_to(n));
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.cur = b,
                Some(Msg::End) => self.ended = true,
                Some(Msg::Fail(m)) => {
                    *self.failure.lock() = Some(m.clone());
                    return Err(io::Error::other(m));
                }
                None => {
                    let m = "the download stopped".to_string();
                    *self.failure.lock() = Some(m.clone());
                    return Err(io::Error::other(m));
                }
            }
        }
    }
}

/// Streams blob `digest` of `size` bytes into `tx`, resuming with Range
/// requests after a cut, and ends with `End` (size and digest right) or `Fail`.
async fn download(repo: Arc<Repository>, digest: String, size: u64, tx: tokio::sync::mpsc::Sender<Msg>) {
    let result = async {
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut resumes = 0u32;
        'fetch: loop {
            let mut resp = match repo.open_blob(&digest, got).await {
                Ok(r) => r,
                Err(e) if e.is_transient() && resumes < DOWNLOAD_RESUMES => {
                    resumes += 1;
                    tokio::time::sleep(Duration::from_millis(500 << resumes)).await;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            if let Some(len) = resp.content_length() {
                if got.checked_add(len) != Some(size) {
                    return Err(format!("the registry sends {} bytes, the manifest says {size}", got.saturating_add(len)));
                }
            }
            loop {
                let chunk = match tokio::time::timeout(STALL_TIMEOUT, resp.chunk()).await {
                    Ok(Ok(Some(c))) => c,
                    Ok(Ok(None)) => break 'fetch,
                    Ok(Err(_)) | Err(_) if resumes < DOWNLOAD_RESUMES => {
                        resumes += 1;
                        tracing::warn!(%digest, at = got, "layer download cut; resuming");
                        continue 'fetch;
                    }
                    Ok(Err(e)) => return Err(format!("the download was cut after {got} bytes: {}", crate::http::error_chain(&e))),
                    Err(_) => return Err(format!("the download stalled after {got} bytes")),
                };
                got = got.saturating_add(chunk.len() as u64);
                if got > size {
                    return Err(format!("the registry sends more than the {size} bytes the manifest says"));
                }
                hasher.update(&chunk);
                if tx.send(Msg::Data(chunk)).await.is_err() {
                    return Ok(()); // the reader gave up; it reports why
                }
            }
        }
        if got != size {
            return Err(format!("the registry sent {got} of the {size} bytes the manifest says"));
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(format!("the blob does not match its digest (got {actual})"));
        }
        Ok(())
    }
    .await;
    let _ = tx.send(match result {
        Ok(()) => Msg::End,
        Err(m) => Msg::Fail(m),
    })
    .await;
}

/// Hashes what passes through (the uncompressed tar, for the diff_id).
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Downloads, checks and reads one layer into a tree (file data spooled to `spool_path`).
fn read_layer(
    rt: &tokio::runtime::Runtime,
    repo: &Arc<Repository>,
    image: &Reference,
    index: usize,
    layer: &Descriptor,
    diff_id: Option<&String>,
    spool_path: &Path,
) -> Result<(Tree, TarStats), ConvertError> {
    let digest = layer.digest().to_string();
    let layer_err = |why: String| ConvertError::Layer { index, digest: digest.clone(), image: image.to_string(), why };
    let digest_checked = crate::oci::reference::parse_digest(&digest).map_err(&layer_err)?;
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
    let task = rt.spawn(download(repo.clone(), digest_checked, layer.size(), tx));
    let failure = Arc::new(Mutex::new(None));
    let mut stream = LayerStream { rx, cur: Bytes::new(), ended: false, failure: failure.clone() };
    let mut spool = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(spool_path)
        .map_err(io_err(format!("cannot create {}", spool_path.display())))?;

    let read = (|| -> Result<(Tree, TarStats, Option<String>), String> {
        let mut buffered = BufReader::with_capacity(1 << 16, &mut stream);
        let head = buffered.fill_buf().map_err(|e| e.to_string())?;
        let (gzip, zstd) = (head.starts_with(&[0x1f, 0x8b]), head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
        if zstd {
            return Err("the layer is zstd-compressed; convert reads tar and tar+gzip layers".into());
        }
        let decoded: Box<dyn Read + '_> = if gzip { Box::new(flate2::read::MultiGzDecoder::new(buffered)) } else { Box::new(buffered) };
        let mut tar = Hashing { inner: decoded, hasher: Sha256::new() };
        let (tree, stats) = tree_from_tar(&mut tar, DataMode::Spool { file: &mut spool, path: spool_path.to_path_buf() })
            .map_err(|e: BuildError| e.to_string())?;
        io::copy(&mut tar, &mut io::sink()).map_err(|e| e.to_string())?;
        let uncompressed = format!("sha256:{}", hex::encode(tar.hasher.finalize()));
        Ok((tree, stats, Some(uncompressed)))
    })();
    // The blob's own verdict comes first: a corrupt download also breaks the
    // gzip or tar reading, and the digest says why. Read it to its end.
    let _ = io::copy(&mut stream, &mut io::sink());
    drop(stream);
    let _ = rt.block_on(task);
    if let Some(why) = failure.lock().take() {
        return Err(layer_err(why));
    }
    let (tree, stats, uncompressed) = read.map_err(&layer_err)?;
    if let (Some(want), Some(got)) = (diff_id, uncompressed) {
        if *want != got {
            return Err(layer_err(format!("its uncompressed content is {got}, the image config's diff_id says {want}")));
        }
    }
    Ok((tree, stats))
}

// ---- flattening ----

const OPAQUE: &[u8] = b"trusted.overlay.opaque";
/// Set by the tar reader on directories holding whiteouts (for overlayfs).
const ORIGIN: &[u8] = b"trusted.overlay.origin";

fn is_opaque(inode: &Inode) -> bool {
    inode.xattrs.get(OPAQUE).is_some_and(|v| v.as_slice() == b"y")
}

fn without_markers(inode: &Inode) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let mut x = inode.xattrs.clone();
    x.remove(OPAQUE);
    x.remove(ORIGIN);
    x
}

/// Applies one layer's tree (as the tar reader made it: whiteouts as char
/// 0:0, opaque directories marked) onto `merged` with overlay rules.
/// `explicit` are the layer's directories that had entries of their own
/// (others only imply a path and keep the lower directory's metadata).
pub fn apply_layer(merged: &mut Tree, layer: &Tree, explicit: &BTreeSet<InodeId>) -> Result<(), WriteError> {
    // Non-directories of the layer already placed: hard links stay one inode.
    let mut placed: HashMap<InodeId, InodeId> = HashMap::new();
    let mut todo = vec![(merged.root(), layer.root())];
    while let Some((mdir, ldir)) = todo.pop() {
        let l = layer.get(ldir);
        if explicit.contains(&ldir) {
            let m = merged.get_mut(mdir);
            m.meta = l.meta;
            m.xattrs = without_markers(l);
        }
        if is_opaque(l) {
            let lower: Vec<Vec<u8>> = match &merged.get(mdir).kind {
                Kind::Directory(entries) => entries.keys().cloned().collect(),
                _ => Vec::new(),
            };
            for name in lower {
                merged.unlink(mdir, &name);
            }
        }
        let Kind::Directory(entries) = &l.kind else { continue };
        for (name, &lchild) in entries {
            let lc = layer.get(lchild);
            if lc.kind.is_whiteout() {
                merged.unlink(mdir, name);
                continue;
            }
            if lc.kind.is_dir() {
                let target = match merged.lookup(mdir, name) {
                    Some(m) if merged.get(m).kind.is_dir() => m,
                    _ => {
                        let mut d = Inode::dir(lc.meta);
                        d.xattrs = without_markers(lc);
                        let id = merged.add(d);
                        merged.link(mdir, name, id)?;
                        id
                    }
                };
                todo.push((target, lchild));
            } else {
                let id = match placed.get(&lchild) {
                    Some(&id) => id,
                    None => {
                        let id = merged.add(lc.clone());
                        placed.insert(lchild, id);
                        id
                    }
                };
                merged.link(mdir, name, id)?;
            }
        }
    }
    Ok(())
}

/// The inodes of an `--order` list present in `tree`, in order.
pub fn order_ids(tree: &Tree, list: &[u8]) -> (Vec<InodeId>, usize) {
    let mut out = Vec::new();
    let mut missing = 0;
    for line in list.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line).trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        match tree.lookup_path(line) {
            Some(id) => out.push(id),
            None => missing += 1,
        }
    }
    (out, missing)
}

fn write_image(tree: &Tree, out: &Path, opts: &ConvertOptions) -> Result<ImageSummary, ConvertError> {
    let mut wo = WriterOptions { compression: opts.compression, derive_uuid: true, ..WriterOptions::default() };
    if let Some(list) = &opts.order {
        let (ids, missing) = order_ids(tree, list);
        if missing > 0 {
            tracing::info!("{missing} paths of the order list are not in {}", out.display());
        }
        wo.data_order = ids;
    }
    let files = LocalFiles;
    let plan = writer::plan(tree, &wo, &files).map_err(|e| ConvertError::Write(format!("cannot lay out the EROFS image: {e}")))?;
    let mut f = std::fs::File::create_new(out).map_err(io_err(format!("cannot create {}", out.display())))?;
    let summary = plan.write(&mut f, &files).map_err(|e| ConvertError::Write(format!("cannot write the EROFS image: {e}")))?;
    f.sync_all().map_err(io_err(format!("cannot write {}", out.display())))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tar::tree_from_tar;

    fn hdr(path: &str, ty: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(ty);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_cksum();
        h
    }

    fn layer(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> (Tree, TarStats) {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        let data = b.into_inner().unwrap();
        tree_from_tar(&data[..], DataMode::Index { block_bits: 9 }).unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        b.append(&hdr(path, tar::EntryType::Regular, data.len() as u64, 0o644, 1), data).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, mtime: u64) {
        b.append(&hdr(path, tar::EntryType::Directory, 0, mode, mtime), &[][..]).unwrap();
    }

    fn names(t: &Tree, path: &str) -> Vec<String> {
        match &t.get(t.lookup_path(path.as_bytes()).unwrap()).kind {
            Kind::Directory(e) => e.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect(),
            _ => panic!("{path} is not a directory"),
        }
    }

    #[test]
    fn layers_flatten_with_overlay_rules() {
        let base = layer(|b| {
            dir(b, "etc/", 0o755, 10);
            file(b, "etc/a", b"a");
            file(b, "etc/b", b"b");
            dir(b, "opq/", 0o700, 11);
            file(b, "opq/old", b"old");
            dir(b, "opq/sub/", 0o755, 12);
            file(b, "opq/sub/deep", b"deep");
            file(b, "gone", b"x");
            dir(b, "keep/", 0o750, 13);
            file(b, "keep/x", b"x");
            let mut l = hdr("etc/a-link", tar::EntryType::Link, 0, 0o644, 1);
            l.set_link_name("etc/a").unwrap();
            l.set_cksum();
            b.append(&l, &[][..]).unwrap();
        });
        let upper = layer(|b| {
            file(b, "etc/b", b"B2");
            file(b, ".wh.gone", b"");
            file(b, "etc/.wh.a", b"");
            file(b, "opq/.wh..wh..opq", b"");
            file(b, "opq/new", b"new");
            // keep/ is only implied: its metadata stays the lower one's.
            file(b, "keep/y", b"y");
            file(b, "fresh/one", b"1");
            let mut l = hdr("fresh/two", tar::EntryType::Link, 0, 0o644, 1);
            l.set_link_name("fresh/one").unwrap();
            l.set_cksum();
            b.append(&l, &[][..]).unwrap();
        });
        let mut merged = Tree::new(Metadata::with_permissions(0o755));
        apply_layer(&mut merged, &base.0, &base.1.explicit_dirs).unwrap();
        apply_layer(&mut merged, &upper.0, &upper.1.explicit_dirs).unwrap();
        assert_eq!(names(&merged, ""), ["etc", "fresh", "keep", "opq"]);
        assert_eq!(names(&merged, "etc"), ["a-link", "b"], "the whiteout removes one name of a hard link");
        let b = merged.get(merged.lookup_path(b"etc/b").unwrap());
        assert!(matches!(&b.kind, Kind::Regular { size: 2, .. }), "the upper file wins");
        assert_eq!(names(&merged, "opq"), ["new"], "opaque: nothing of the lower directory");
        let opq = merged.get(merged.lookup_path(b"opq").unwrap());
        assert!(opq.xattrs.is_empty(), "no overlay markers in a flattened image: {:?}", opq.xattrs);
        let keep = merged.get(merged.lookup_path(b"keep").unwrap());
        assert_eq!((keep.meta.permissions, keep.meta.mtime), (0o750, 13), "implied directory keeps the lower metadata");
        assert_eq!(names(&merged, "keep"), ["x", "y"]);
        assert_eq!(merged.lookup_path(b"fresh/one"), merged.lookup_path(b"fresh/two"), "hard link stays one inode");
        let etc = merged.get(merged.lookup_path(b"etc").unwrap());
        assert!(!etc.xattrs.contains_key(ORIGIN));
    }

    #[test]
    fn a_later_file_replaces_a_directory_and_back() {
        let base = layer(|b| {
            dir(b, "x/", 0o755, 1);
            file(b, "x/inner", b"i");
            file(b, "y", b"y");
        });
        let upper = layer(|b| {
            file(b, "x", b"now a file");
            dir(b, "y/", 0o711, 2);
            file(b, "y/z", b"z");
        });
        let mut merged = Tree::new(Metadata::with_permissions(0o755));
        apply_layer(&mut merged, &base.0, &base.1.explicit_dirs).unwrap();
        apply_layer(&mut merged, &upper.0, &upper.1.explicit_dirs).unwrap();
        assert!(matches!(merged.get(merged.lookup_path(b"x").unwrap()).kind, Kind::Regular { .. }));
        assert_eq!(names(&merged, "y"), ["z"]);
        assert_eq!(merged.get(merged.lookup_path(b"y").unwrap()).meta.permissions, 0o711);
        // An opaque root hides everything below.
        let wipe = layer(|b| {
            file(b, ".wh..wh..opq", b"");
            file(b, "only", b"o");
        });
        apply_layer(&mut merged, &wipe.0, &wipe.1.explicit_dirs).unwrap();
        assert_eq!(names(&merged, ""), ["only"]);
    }

    #[test]
    fn configs_keep_everything_but_rootfs() {
        let src = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]},"created":"2024-01-01T00:00:00Z","history":[{"created_by":"a"},{"created_by":"b","empty_layer":true},{"created_by":"c"}],"rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111","sha256:2222222222222222222222222222222222222222222222222222222222222222"]}}"#;
        let ids = config_diff_ids(src).unwrap().unwrap();
        assert_eq!(ids.len(), 2);
        let new_id = format!("sha256:{}", "ab".repeat(32));
        let out = rewrite_config(src, std::slice::from_ref(&new_id)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let before: serde_json::Value = serde_json::from_slice(src).unwrap();
        assert_eq!(v["rootfs"], serde_json::json!({"type": "layers", "diff_ids": [new_id]}));
        for k in ["architecture", "os", "config", "created", "history"] {
            assert_eq!(v[k], before[k], "{k} kept");
        }
        assert_eq!(rewrite_config(src, std::slice::from_ref(&new_id)).unwrap(), out, "deterministic");
        assert_eq!(config_diff_ids(br#"{"os":"linux"}"#).unwrap(), None);
        assert!(config_diff_ids(b"[1]").is_err());
        assert!(config_diff_ids(br#"{"rootfs":{"diff_ids":["md5:00"]}}"#).is_err());
        assert!(rewrite_config(b"nope", &[]).is_err());
    }

    #[test]
    fn layer_media_types() {
        let r = Reference::parse("r.example/x:1").unwrap();
        let d = |mt: &str| push::descriptor(mt, &format!("sha256:{}", "0a".repeat(32)), 10).unwrap();
        assert!(check_layers(&r, &[d("application/vnd.docker.image.rootfs.diff.tar.gzip"), d("application/vnd.oci.image.layer.v1.tar")]).is_ok());
        let e = check_layers(&r, &[d("application/vnd.oci.image.layer.v1.tar+zstd")]).unwrap_err();
        assert!(e.to_string().contains("zstd"), "{e}");
        let e = check_layers(&r, &[d("application/vnd.erofs")]).unwrap_err();
        assert!(e.to_string().contains("EROFS already"), "{e}");
        assert!(check_layers(&r, &[]).is_err());
    }

    #[test]
    fn order_lists() {
        let (t, _) = layer(|b| {
            file(b, "a", b"1");
            file(b, "d/b", b"2");
        });
        let (ids, missing) = order_ids(&t, b"# first\n/d/b\r\na\n\nnot-there\n");
        assert_eq!(ids, vec![t.lookup_path(b"d/b").unwrap(), t.lookup_path(b"a").unwrap()]);
        assert_eq!(missing, 1);
    }
}
