//! Tar indexes made on this host, kept for later mounts of the same layer:
//! `<cache_dir>/.tar-indexes/<blob hex>/{index.erofs, layer.zinfo, layer.json}`
//! (a dot directory: cache listing and pruning skip it), and the merged
//! metadata of whole images made of them: `merged-<hash>/{merged.erofs,
//! merged.json}`. `index build --output DIR` writes the same layout into DIR
//! (every function takes the store's root). Made by streaming
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

/// The store of a cache dir.
pub fn in_cache(cache_dir: &Path) -> PathBuf {
    cache_dir.join(STORE_DIR)
}

/// `<root>/<hex>` for a `sha256:<hex>` digest.
pub fn store_dir(root: &Path, blob_digest: &str) -> Result<PathBuf, BuildError> {
    let hex = blob_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| BuildError::Source(format!("{blob_digest:?} is not a sha256 digest")))?;
    Ok(root.join(hex))
}

/// The stored index of `blob_digest`, when one is complete and names that blob.
pub fn load(root: &Path, blob_digest: &str) -> Option<StoredIndex> {
    let dir = store_dir(root, blob_digest).ok()?;
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

/// Streams the layer `raw` once and stores its index under `root`.
/// `blob_digest`/`blob_size` are what the image names: a stream that does
/// not match them stores nothing.
pub fn build_into(
    root: &Path,
    raw: impl Read,
    blob_digest: &str,
    blob_size: u64,
    opts: &LayerOptions,
) -> Result<StoredIndex, BuildError> {
    let dir = store_dir(root, blob_digest)?;
    let tmp = building_dir(root)?;
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
    publish(tmp, &dir, || load(root, blob_digest))
}

/// Renames a whole temporary directory into place and loads it back. Another mount may have
/// stored the same thing meanwhile: its copy is as good.
fn publish<T>(tmp: tempfile::TempDir, dir: &Path, load_back: impl Fn() -> Option<T>) -> Result<T, BuildError> {
    let built = tmp.keep();
    if let Err(e) = fs::rename(&built, dir) {
        let _ = fs::remove_dir_all(&built);
        if load_back().is_none() {
            return Err(BuildError::io(format!("cannot store {}", dir.display()), e));
        }
    }
    load_back().ok_or_else(|| BuildError::Source(format!("what is stored in {} is incomplete", dir.display())))
}

/// Stores a layer's index files made elsewhere (an index artifact), whole
/// or not at all; the index must place its tar as a tar index does, inside
/// the tar the meta names.
pub fn store_files(root: &Path, meta: &LayerMeta, index: &[u8], zinfo: Option<&[u8]>) -> Result<StoredIndex, BuildError> {
    let placed = crate::segments::tar_index::placement(index).map_err(|e| BuildError::Source(format!("the tar index of {}: {e}", meta.blob_digest)))?;
    if placed.tar_len > meta.tar_size.next_multiple_of(512) || meta.gzip != zinfo.is_some() {
        return Err(BuildError::Source(format!("the tar index of {} does not fit its tar", meta.blob_digest)));
    }
    if let Some(z) = zinfo {
        crate::gzip::Zinfo::parse(z.to_vec()).map_err(|e| BuildError::Source(format!("the zinfo of {}: {e}", meta.blob_digest)))?;
    }
    let dir = store_dir(root, &meta.blob_digest)?;
    let tmp = building_dir(root)?;
    fs::write(tmp.path().join(INDEX_FILE), index).map_err(|e| BuildError::io("cannot write the index file", e))?;
    if let Some(z) = zinfo {
        fs::write(tmp.path().join(ZINFO_FILE), z).map_err(|e| BuildError::io("cannot write the zinfo", e))?;
    }
    let json = serde_json::to_vec_pretty(meta).map_err(|e| BuildError::Source(format!("layer.json: {e}")))?;
    fs::write(tmp.path().join(META_FILE), json).map_err(|e| BuildError::io("cannot write layer.json", e))?;
    publish(tmp, &dir, || load(root, &meta.blob_digest))
}

/// A temporary directory in `root` (made, 0700), renamed into place when whole.
fn building_dir(root: &Path) -> Result<tempfile::TempDir, BuildError> {
    fs::create_dir_all(root).map_err(|e| BuildError::io(format!("cannot create {}", root.display()), e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
    }
    tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(root)
        .map_err(|e| BuildError::io(format!("cannot create a directory in {}", root.display()), e))
}

pub const MERGED_FILE: &str = "merged.erofs";
pub const MERGED_META_FILE: &str = "merged.json";

/// What `merged.json` records: the layers the merged metadata is of, and
/// where their tars lie in its address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedMeta {
    /// The layers' blob digests, in manifest order.
    pub layers: Vec<String>,
    /// Bytes of `merged.erofs` (the address space's first bytes).
    pub image_len: u64,
    /// Bytes of the whole address space.
    pub size: u64,
    /// Per layer: `[base, len]` of its tar in the address space.
    pub tars: Vec<[u64; 2]>,
}

/// A stored merged image.
#[derive(Clone, Debug)]
pub struct StoredMerged {
    pub image: PathBuf,
    pub meta: MergedMeta,
}

/// `<root>/merged-<hash>`: named by the ordered layer digests (and the
/// version of the merge that wrote it).
pub fn merged_dir(root: &Path, layers: &[String]) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"erofs-fanotify tar merge v1\0");
    for l in layers {
        h.update(l.as_bytes());
        h.update(b"\0");
    }
    root.join(format!("merged-{}", &hex::encode(h.finalize())[..32]))
}

/// The stored merged image of `layers`, when it is whole and names them.
pub fn load_merged(root: &Path, layers: &[String]) -> Option<StoredMerged> {
    let dir = merged_dir(root, layers);
    let mut text = Vec::new();
    fs::File::open(dir.join(MERGED_META_FILE)).ok()?.take(MAX_META).read_to_end(&mut text).ok()?;
    let meta: MergedMeta = serde_json::from_slice(&text).ok()?;
    let image = dir.join(MERGED_FILE);
    (meta.layers == layers && meta.is_placed() && fs::metadata(&image).ok()?.len() == meta.image_len).then_some(StoredMerged { image, meta })
}

impl MergedMeta {
    /// One tar per layer, each after the image and inside the address space.
    fn is_placed(&self) -> bool {
        self.tars.len() == self.layers.len()
            && self.tars.iter().all(|[base, len]| *base >= self.image_len && base.checked_add(*len).is_some_and(|e| e <= self.size))
    }
}

/// Stores a merged image (whole, or not at all).
pub fn store_merged(root: &Path, image: &[u8], meta: &MergedMeta) -> Result<StoredMerged, BuildError> {
    if image.len() as u64 != meta.image_len || !meta.is_placed() {
        return Err(BuildError::Source(format!("internal: a merged image of {} bytes recorded as {}", image.len(), meta.image_len)));
    }
    let dir = merged_dir(root, &meta.layers);
    let tmp = building_dir(root)?;
    fs::write(tmp.path().join(MERGED_FILE), image).map_err(|e| BuildError::io("cannot write the merged image", e))?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| BuildError::Source(format!("merged.json: {e}")))?;
    fs::write(tmp.path().join(MERGED_META_FILE), json).map_err(|e| BuildError::io("cannot write merged.json", e))?;
    publish(tmp, &dir, || load_merged(root, &meta.layers))
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
        let dir = tempfile::tempdir().unwrap();
        let root = in_cache(dir.path());
        let cache = &root;
        let d = digest(&gz);
        assert!(load(cache, &d).is_none());
        let opts = LayerOptions { span_size: 1 << 20, uuid: None };
        let s = build_into(cache, &gz[..], &d, gz.len() as u64, &opts).unwrap();
        assert_eq!(s.meta.tar_size, tar.len() as u64);
        assert_eq!(s.meta.diff_id, digest(&tar));
        let z = crate::gzip::Zinfo::parse(fs::read(s.zinfo.as_ref().unwrap()).unwrap()).unwrap();
        let want = crate::gzip::span_digests(&z, &mut io::Cursor::new(&gz), gz.len() as u64).unwrap();
        assert_eq!(s.meta.span_sha256.as_ref(), Some(&want));
        let again = load(cache, &d).unwrap();
        assert_eq!(again.meta, s.meta);
        // Only the stored directory is left (no spool, no temporary directory).
        let names: Vec<_> = fs::read_dir(cache).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let mut files: Vec<_> = fs::read_dir(store_dir(cache, &d).unwrap()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        assert_eq!(files, vec![INDEX_FILE, META_FILE, ZINFO_FILE]);

        // A stream that is not the named blob stores nothing.
        let other = digest(b"other");
        let e = build_into(cache, &gz[..], &other, gz.len() as u64, &opts).unwrap_err();
        assert!(e.to_string().contains("as the image says"), "{e}");
        assert!(load(cache, &other).is_none());
        assert!(!store_dir(cache, &other).unwrap().exists());
        assert_eq!(fs::read_dir(cache).unwrap().count(), 1);

        // A plain tar: no zinfo, no span digests.
        let t = digest(&tar);
        let s = build_into(cache, &tar[..], &t, tar.len() as u64, &opts).unwrap();
        assert!(s.zinfo.is_none() && s.meta.span_sha256.is_none() && !s.meta.gzip);
        assert!(store_dir(cache, "sha256:xyz").is_err());
    }

    #[test]
    fn merged_images_are_stored_whole_and_found_by_their_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let layers = vec![digest(b"a"), digest(b"b")];
        assert!(load_merged(&root, &layers).is_none());
        let meta = MergedMeta { layers: layers.clone(), image_len: 8192, size: 8192 + 3 * 4096, tars: vec![[8192, 4096], [16384, 4096]] };
        let s = store_merged(&root, &[7u8; 8192], &meta).unwrap();
        assert_eq!(s.meta, meta);
        assert_eq!(fs::read(&s.image).unwrap(), vec![7u8; 8192]);
        assert_eq!(load_merged(&root, &layers).unwrap().meta, meta);
        // Another order is another image; a record whose tars lie outside the space is not used.
        let reversed: Vec<String> = layers.iter().rev().cloned().collect();
        assert!(load_merged(&root, &reversed).is_none());
        let bad = MergedMeta { layers: reversed.clone(), tars: vec![[8192, 4096], [16384, 1 << 40]], ..meta.clone() };
        assert!(store_merged(&root, &[7u8; 8192], &bad).is_err());
        assert!(store_merged(&root, &[7u8; 100], &meta).is_err());
        // Only the stored directory is left.
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
    }
}
