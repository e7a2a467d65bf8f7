//! Tar indexes made on this host, kept for later mounts of the same layer:
//! `<cache_dir>/.tar-indexes/<blob hex>/{index.erofs, layer.zinfo, layer.json}`
//! (a dot directory: cache listing and pruning skip it). Made by streaming
//! the layer once ([`build_into`]): the tar index, the zinfo, the span
//! digests, the tar's size, and the blob digest checked against the one
//! the image names, so what is stored derives from the authentic blob.
//!
//! A stored index is written whole into a temporary directory and renamed
//! into place: a reader sees all of it or nothing.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::input::StreamObserver;
use super::layer::{index_layer, LayerOptions};
use super::BuildError;

pub const STORE_DIR: &str = ".tar-indexes";
pub const INDEX_FILE: &str = "index.erofs";
pub const ZINFO_FILE: &str = "layer.zinfo";
pub const META_FILE: &str = "layer.json";
/// `layer.json` is small; anything larger is not ours.
const MAX_META: u64 = 64 << 20;

/// What `layer.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// `sha256:<hex>` of the compressed (or plain) layer blob.
    pub blob_digest: String,
    pub blob_size: u64,
    /// `sha256:<hex>` of the uncompressed tar.
    pub diff_id: String,
    pub tar_size: u64,
    pub gzip: bool,
    /// `gzip::span_digest` of each zinfo span (gzip layers).
    #[serde(default)]
    pub span_sha256: Option<Vec<String>>,
}

/// A stored index of one layer.
#[derive(Clone, Debug)]
pub struct StoredIndex {
    pub index: PathBuf,
    /// Gzip layers only.
    pub zinfo: Option<PathBuf>,
    pub meta: LayerMeta,
}

/// `<cache_dir>/.tar-indexes/<hex>` for a `sha256:<hex>` digest.
pub fn store_dir(cache_dir: &Path, blob_digest: &str) -> Result<PathBuf, BuildError> {
    let hex = blob_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| BuildError::Source(format!("{blob_digest:?} is not a sha256 digest")))?;
    Ok(cache_dir.join(STORE_DIR).join(hex))
}

/// The stored index of `blob_digest`, when one is complete and names that blob.
pub fn load(cache_dir: &Path, blob_digest: &str) -> Option<StoredIndex> {
    let dir = store_dir(cache_dir, blob_digest).ok()?;
    let file = fs::File::open(dir.join(META_FILE)).ok()?;
    let mut text = Vec::new();
    file.take(MAX_META).read_to_end(&mut text).ok()?;
    let meta: LayerMeta = serde_json::from_slice(&text).ok()?;
    if meta.blob_digest != blob_digest {
        return None;
    }
    let index = dir.join(INDEX_FILE);
    let zinfo = dir.join(ZINFO_FILE);
    if !index.is_file() || (meta.gzip && !zinfo.is_file()) {
        return None;
    }
    Some(StoredIndex { index, zinfo: meta.gzip.then_some(zinfo), meta })
}

/// Keeps the compressed bytes as they stream by, for the span digests.
struct Spool(Option<BufWriter<fs::File>>, Option<io::Error>);

impl StreamObserver for Spool {
    fn compressed(&mut self, bytes: &[u8]) {
        if let Some(w) = &mut self.0 {
            if let Err(e) = w.write_all(bytes) {
                self.1 = Some(e);
                self.0 = None;
            }
        }
    }
}

struct SharedSpool(std::sync::Arc<parking_lot::Mutex<Spool>>);

impl StreamObserver for SharedSpool {
    fn compressed(&mut self, bytes: &[u8]) {
        self.0.lock().compressed(bytes);
    }
}

/// Streams the layer `raw` once and stores its index under `cache_dir`.
/// `blob_digest`/`blob_size` are what the image names: a stream that does
/// not match them stores nothing.
pub fn build_into(
    cache_dir: &Path,
    raw: impl Read,
    blob_digest: &str,
    blob_size: u64,
    opts: &LayerOptions,
) -> Result<StoredIndex, BuildError> {
    let dir = store_dir(cache_dir, blob_digest)?;
    let parent = dir.parent().ok_or_else(|| BuildError::Source("no store directory".into()))?;
    fs::create_dir_all(parent).map_err(|e| BuildError::io(format!("cannot create {}", parent.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o700));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(parent)
        .map_err(|e| BuildError::io(format!("cannot create a directory in {}", parent.display()), e))?;
    let spool_path = tmp.path().join("blob.spool");
    let spool_file = fs::File::create(&spool_path).map_err(|e| BuildError::io("cannot create the spool file", e))?;
    let spool = std::sync::Arc::new(parking_lot::Mutex::new(Spool(Some(BufWriter::new(spool_file)), None)));
    let index_path = tmp.path().join(INDEX_FILE);
    let mut index_out = fs::File::create(&index_path).map_err(|e| BuildError::io("cannot create the index file", e))?;
    let layer = index_layer(raw, &mut index_out, Some(Box::new(SharedSpool(spool.clone()))), opts)?;
    index_out.sync_all().map_err(|e| BuildError::io("cannot write the index file", e))?;
    drop(index_out);
    if layer.blob_digest != blob_digest || layer.blob_size != blob_size {
        return Err(BuildError::Source(format!(
            "the layer read has digest {} ({} bytes), not {blob_digest} ({blob_size} bytes) as the image says",
            layer.blob_digest, layer.blob_size
        )));
    }
    let span_sha256 = match &layer.zinfo {
        Some(built) => {
            let mut s = spool.lock();
            if let Some(e) = s.1.take() {
                return Err(BuildError::io("cannot spool the layer", e));
            }
            if let Some(w) = s.0.take() {
                w.into_inner()
                    .map_err(|e| BuildError::io("cannot spool the layer", e.into_error()))?
                    .sync_all()
                    .map_err(|e| BuildError::io("cannot spool the layer", e))?;
            }
            drop(s);
            let mut f = fs::File::open(&spool_path).map_err(|e| BuildError::io("cannot read the spool file", e))?;
            let digests = crate::gzip::span_digests(&built.zinfo, &mut f, layer.blob_size)
                .map_err(|e| BuildError::Source(format!("span digests: {e}")))?;
            fs::write(tmp.path().join(ZINFO_FILE), built.zinfo.as_bytes())
                .map_err(|e| BuildError::io("cannot write the zinfo", e))?;
            Some(digests)
        }
        None => None,
    };
    let _ = fs::remove_file(&spool_path);
    let meta = LayerMeta {
        blob_digest: blob_digest.to_string(),
        blob_size,
        diff_id: layer.diff_id.clone(),
        tar_size: layer.tar_size,
        gzip: layer.gzip,
        span_sha256,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| BuildError::Source(format!("layer.json: {e}")))?;
    fs::write(tmp.path().join(META_FILE), json).map_err(|e| BuildError::io("cannot write layer.json", e))?;
    // Another mount may have stored the same layer meanwhile: its copy is as good.
    let built = tmp.keep();
    if let Err(e) = fs::rename(&built, &dir) {
        let _ = fs::remove_dir_all(&built);
        if load(cache_dir, blob_digest).is_none() {
            return Err(BuildError::io(format!("cannot store the index in {}", dir.display()), e));
        }
    }
    load(cache_dir, blob_digest).ok_or_else(|| BuildError::Source(format!("the stored index in {} is incomplete", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn layer() -> (Vec<u8>, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_path("big").unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        (tar, gz.finish().unwrap())
    }

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn stores_a_layer_once_and_refuses_a_wrong_blob() {
        let (tar, gz) = layer();
        let cache = tempfile::tempdir().unwrap();
        let d = digest(&gz);
        assert!(load(cache.path(), &d).is_none());
        let opts = LayerOptions { span_size: 1 << 20, uuid: None };
        let s = build_into(cache.path(), &gz[..], &d, gz.len() as u64, &opts).unwrap();
        assert_eq!(s.meta.tar_size, tar.len() as u64);
        assert_eq!(s.meta.diff_id, digest(&tar));
        let z = crate::gzip::Zinfo::parse(fs::read(s.zinfo.as_ref().unwrap()).unwrap()).unwrap();
        let want = crate::gzip::span_digests(&z, &mut io::Cursor::new(&gz), gz.len() as u64).unwrap();
        assert_eq!(s.meta.span_sha256.as_ref(), Some(&want));
        let again = load(cache.path(), &d).unwrap();
        assert_eq!(again.meta, s.meta);
        // Only the stored directory is left (no spool, no temporary directory).
        let names: Vec<_> = fs::read_dir(cache.path().join(STORE_DIR)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let mut files: Vec<_> = fs::read_dir(store_dir(cache.path(), &d).unwrap()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        assert_eq!(files, vec![INDEX_FILE, META_FILE, ZINFO_FILE]);

        // A stream that is not the named blob stores nothing.
        let other = digest(b"other");
        let e = build_into(cache.path(), &gz[..], &other, gz.len() as u64, &opts).unwrap_err();
        assert!(e.to_string().contains("as the image says"), "{e}");
        assert!(load(cache.path(), &other).is_none());
        assert!(!store_dir(cache.path(), &other).unwrap().exists());
        assert_eq!(fs::read_dir(cache.path().join(STORE_DIR)).unwrap().count(), 1);

        // A plain tar: no zinfo, no span digests.
        let t = digest(&tar);
        let s = build_into(cache.path(), &tar[..], &t, tar.len() as u64, &opts).unwrap();
        assert!(s.zinfo.is_none() && s.meta.span_sha256.is_none() && !s.meta.gzip);
        assert!(store_dir(cache.path(), "sha256:xyz").is_err());
    }
}
