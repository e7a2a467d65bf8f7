//! Cache entries: `<cache_dir>/<key>/{blob, bitmap, entry.json, agent.log}`.
//!
//! `blob` is the sparse cache file the EROFS mount reads (0600 in a 0700 directory: any other
//! reader of the marked file would raise events). `entry.json` is written **last** when an
//! entry is made and removed **first** when one is remade, so it doubles as the commit marker:
//! an entry without it is half-made and is rebuilt, never trusted. It records a `generation`
//! that is new each time `blob` is created; the persisted bitmap names it, so a bitmap can
//! never be applied to a different incarnation of the file, even one that reuses the inode.
//!
//! Concurrency: the caller holds the entry's [`crate::AgentLock`] while it opens, changes or
//! removes an entry; nothing here locks.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bitmap_file::{BitmapIdentity, LoadedBitmap};
use crate::fsat::Dir;
use crate::keys::validate_digest;
use crate::{unix_now, CacheDir, StateError};

const BLOB: &str = "blob";
const BITMAP: &str = "bitmap";
const META: &str = "entry.json";

const MAX_META_BYTES: u64 = 64 << 20;

/// The content of `entry.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub key: String,
    /// Where the blob was last fetched from, without credentials.
    pub source: String,
    pub digest: Option<String>,
    pub blob_size: u64,
    /// New (random) each time `blob` is created; part of the bitmap's identity.
    pub generation: u64,
    /// Inode number of `blob` when it was created; a different inode means someone replaced it.
    pub blob_inode: u64,
    pub created_unix: u64,
    pub last_used_unix: u64,
    /// The image's metadata extents (`[start, end)` byte ranges) that must be local before
    /// mounting, so that a later mount of this blob needs no metadata walk.
    pub required: Option<Vec<[u64; 2]>>,
    /// Where the blobs of a multi-blob address space sit (written by the agent, opaque here;
    /// cleared whenever `blob` is recreated). Other entries read it to share a blob's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<serde_json::Value>,
}

/// An opened cache entry. See the module doc. It holds descriptors of the cache root and of its
/// own directory: every file of the entry is reached through them, never through a symlink.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    root: Arc<Dir>,
    dir: Arc<Dir>,
    key: String,
    meta: EntryMeta,
}

/// A fresh generation number: random from the kernel, or time and pid if that fails.
fn new_generation() -> u64 {
    let mut buf = [0u8; 8];
    let random = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    let g = match random {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ (u64::from(std::process::id()) << 40)
        }
    };
    g.max(1)
}

impl CacheEntry {
    /// Opens the entry `key`, or creates it with an empty sparse `blob` of `blob_size` bytes.
    /// Returns `created == true` when `blob` is new (nothing in it is present).
    ///
    /// An existing entry is reused only if `entry.json` is intact and matches (`key`,
    /// `blob_size`, `digest`) and `blob` is the regular file it recorded, of the right size.
    /// Otherwise it is **recreated** (with a warning naming the reason): a mismatch means a
    /// half-made or damaged entry, and its data cannot be trusted. `source` is updated.
    pub fn open_or_create(
        cache: &CacheDir,
        key: &str,
        blob_size: u64,
        source: &str,
        digest: Option<&str>,
    ) -> Result<(CacheEntry, bool), StateError> {
        if let Some(d) = digest {
            validate_digest(d)?;
        }
        cache.entry_dir(key)?;
        let root = cache
            .root_dir(true)?
            .ok_or_else(|| StateError::io("create directory", cache.root(), io::ErrorKind::NotFound.into()))?;
        let dir = root
            .subdir(key, true, true)?
            .ok_or_else(|| StateError::io("create directory", cache.root().join(key), io::ErrorKind::NotFound.into()))?;
        let mut entry = CacheEntry {
            root: Arc::new(root),
            dir: Arc::new(dir),
            key: key.to_owned(),
            meta: placeholder_meta(key, blob_size, source, digest),
        };

        match entry.check_existing(key, blob_size, digest)? {
            Ok(mut meta) => {
                meta.source = source.to_owned();
                meta.last_used_unix = unix_now();
                entry.meta = meta;
                entry.write_meta()?;
                return Ok((entry, false));
            }
            Err(Some(reason)) => {
                tracing::warn!(entry = %entry.dir().display(), %reason, "recreating cache entry");
            }
            Err(None) => {}
        }
        entry.recreate()?;
        Ok((entry, true))
    }

    /// Whether an intact entry `key` (same size and digest) already holds its
    /// metadata extent map, read without creating or changing anything: a
    /// front end then knows the agent will not walk (no index lookup needed).
    pub fn knows_required(cache: &CacheDir, key: &str, blob_size: u64, digest: Option<&str>) -> bool {
        match CacheEntry::open_existing(cache, key) {
            Ok(Some(e)) => e.meta.blob_size == blob_size && e.meta.digest.as_deref() == digest && e.meta.required.is_some(),
            _ => false,
        }
    }

    /// Opens the existing, intact entry `key` without changing it; `Ok(None)` if there is none (or
    /// it is half-made or damaged). For reading an entry without its source (offline).
    pub fn open_existing(cache: &CacheDir, key: &str) -> Result<Option<CacheEntry>, StateError> {
        cache.entry_dir(key)?;
        let Some(root) = cache.root_dir(false)? else { return Ok(None) };
        let Some(dir) = root.subdir(key, false, false)? else { return Ok(None) };
        let Some(bytes) = dir.read_capped(META, MAX_META_BYTES)? else { return Ok(None) };
        let Ok(meta) = serde_json::from_slice::<EntryMeta>(&bytes) else { return Ok(None) };
        let (size, digest) = (meta.blob_size, meta.digest.clone());
        let entry = CacheEntry { root: Arc::new(root), dir: Arc::new(dir), key: key.to_owned(), meta };
        Ok(match entry.check_existing(key, size, digest.as_deref())? {
            Ok(meta) => Some(CacheEntry { meta, ..entry }),
            Err(_) => None,
        })
    }

    /// `Ok(Ok(meta))` if the existing entry can be reused; `Ok(Err(None))` if there is no entry,
    /// `Ok(Err(Some(reason)))` if there is one that must be remade; `Err` if something in it is
    /// not ours (a symlink, a foreign or group/world-writable file): refused, never remade.
    fn check_existing(
        &self,
        key: &str,
        blob_size: u64,
        digest: Option<&str>,
    ) -> Result<Result<EntryMeta, Option<String>>, StateError> {
        // Refuse what is not ours before anything else (without opening the blob: it may be
        // marked already, and an open raises an event).
        for name in [META, BLOB, BITMAP] {
            self.dir.check_file(name)?;
        }
        let bytes = match self.dir.read_capped(META, MAX_META_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Ok(match self.dir.stat(BLOB)? {
                    Some(_) => Err(Some("half-made (blob without entry.json)".into())),
                    None => Err(None),
                })
            }
            Err(StateError::Unsafe { path, reason }) => return Err(StateError::Unsafe { path, reason }),
            Err(e) => return Ok(Err(Some(e.to_string()))),
        };
        let mut meta: EntryMeta = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => return Ok(Err(Some(format!("entry.json does not parse: {e}")))),
        };
        if meta.key != key {
            return Ok(Err(Some(format!("entry.json names key {:?}", meta.key))));
        }
        if meta.blob_size != blob_size {
            return Ok(Err(Some(format!(
                "blob size {} recorded, {blob_size} expected",
                meta.blob_size
            ))));
        }
        if meta.digest.as_deref() != digest {
            return Ok(Err(Some(format!(
                "digest {:?} recorded, {digest:?} expected",
                meta.digest
            ))));
        }
        let blob = self.blob_path();
        let Some(st) = self.dir.stat(BLOB)? else {
            return Ok(Err(Some(format!("{}: missing", blob.display()))));
        };
        if st.st_size as u64 != blob_size {
            return Ok(Err(Some(format!(
                "blob is {} bytes, {blob_size} expected",
                st.st_size
            ))));
        }
        if st.st_ino != meta.blob_inode {
            return Ok(Err(Some(format!(
                "blob is inode {}, entry.json recorded {}",
                st.st_ino, meta.blob_inode
            ))));
        }
        if let Some(required) = &meta.required {
            if required.iter().any(|&[s, e]| s > e || e > blob_size) {
                tracing::warn!(entry = %self.dir().display(), "dropping invalid metadata extent map");
                meta.required = None;
            }
        }
        Ok(Ok(meta))
    }

    /// Removes whatever is there and makes a fresh, empty entry: entry.json first (the
    /// commit marker), then blob and bitmap; then the new blob; entry.json last.
    fn recreate(&mut self) -> Result<(), StateError> {
        self.dir.remove(META)?;
        self.dir.remove(BLOB)?;
        self.dir.remove(BITMAP)?;
        self.dir.fsync()?;

        let blob = self.blob_path();
        let file = self.dir.create_new(BLOB, 0o600)?;
        file.set_len(self.meta.blob_size)
            .map_err(|e| StateError::io("set size of", &blob, e))?;
        file.sync_all()
            .map_err(|e| StateError::io("fsync", &blob, e))?;
        let ino = file
            .metadata()
            .map_err(|e| StateError::io("stat", &blob, e))?
            .ino();
        drop(file);

        let now = unix_now();
        self.meta.generation = new_generation();
        self.meta.blob_inode = ino;
        self.meta.created_unix = now;
        self.meta.last_used_unix = now;
        self.meta.required = None;
        self.meta.layout = None;
        self.write_meta()
    }

    fn write_meta(&self) -> Result<(), StateError> {
        let path = self.meta_path();
        let json = serde_json::to_vec_pretty(&self.meta).map_err(|e| StateError::Serialize {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.dir.write_atomic(META, &json, 0o600)
    }

    /// Opens `blob` read-write (the cache file), through the entry's descriptor, checking that it
    /// is still the file `entry.json` recorded.
    pub fn open_blob(&self) -> Result<fs::File, StateError> {
        let blob = self.blob_path();
        let file = self
            .dir
            .open_file(BLOB, true)?
            .ok_or_else(|| StateError::io("open", &blob, io::ErrorKind::NotFound.into()))?;
        let ino = file.metadata().map_err(|e| StateError::io("stat", &blob, e))?.ino();
        if ino != self.meta.blob_inode {
            return Err(StateError::corrupt(&blob, format!("is inode {ino}, entry.json recorded {}", self.meta.blob_inode)));
        }
        Ok(file)
    }

    /// Loads the persisted bitmap (see [`crate::load_bitmap`]) through the entry's descriptor.
    pub fn load_bitmap(&self, expected: &BitmapIdentity) -> Result<LoadedBitmap, StateError> {
        crate::bitmap_file::load_bitmap_in(&self.dir, BITMAP, expected)
    }

    /// Saves the bitmap (see [`crate::save_bitmap`]) through the entry's descriptor.
    pub fn save_bitmap(&self, bitmap: &roaring::RoaringBitmap, identity: &BitmapIdentity) -> Result<(), StateError> {
        crate::bitmap_file::save_bitmap_in(&self.dir, BITMAP, bitmap, identity)
    }

    pub fn key(&self) -> &str {
        &self.key
    }
    /// The entry's path, for messages (its files are reached through a descriptor).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn blob_path(&self) -> PathBuf {
        self.dir.join(BLOB)
    }
    pub fn bitmap_path(&self) -> PathBuf {
        self.dir.join(BITMAP)
    }
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(META)
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn meta(&self) -> &EntryMeta {
        &self.meta
    }
    pub fn blob_size(&self) -> u64 {
        self.meta.blob_size
    }
    pub fn generation(&self) -> u64 {
        self.meta.generation
    }

    /// What the persisted bitmap of this entry must have been written for. `inode` is that
    /// of the open cache file (fstat), which `open_or_create` checked against `blob_inode`.
    pub fn bitmap_identity(&self, inode: u64) -> BitmapIdentity {
        BitmapIdentity {
            blob_size: self.meta.blob_size,
            digest: self.meta.digest.clone(),
            inode,
            generation: self.meta.generation,
        }
    }

    /// The metadata extent map as ranges, if one was saved.
    pub fn required_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        self.meta
            .required
            .as_ref()
            .map(|v| v.iter().map(|&[s, e]| s..e).collect())
    }

    /// Saves the metadata extent map (ranges are clamped to the blob size).
    pub fn set_required(&mut self, ranges: &[std::ops::Range<u64>]) -> Result<(), StateError> {
        let size = self.meta.blob_size;
        self.meta.required = Some(
            ranges
                .iter()
                .map(|r| [r.start.min(size), r.end.min(size)])
                .filter(|[s, e]| s < e)
                .collect(),
        );
        self.write_meta()
    }

    /// The saved layout of the address space, if any.
    pub fn layout(&self) -> Option<&serde_json::Value> {
        self.meta.layout.as_ref()
    }

    /// Saves the layout of the address space (see [`EntryMeta::layout`]).
    pub fn set_layout(&mut self, layout: serde_json::Value) -> Result<(), StateError> {
        self.meta.layout = Some(layout);
        self.write_meta()
    }

    /// Reads `entry.json` of the entry `key` without opening or checking its blob: for a
    /// caller that must learn the recorded size before [`CacheEntry::open_or_create`] (which
    /// checks everything), and for readers of other entries. `None` if absent or unreadable.
    pub fn peek(cache: &CacheDir, key: &str) -> Option<EntryMeta> {
        cache.entry_dir(key).ok()?;
        let root = cache.root_dir(false).ok()??;
        let dir = root.subdir(key, false, false).ok()??;
        let bytes = dir.read_capped(META, MAX_META_BYTES).ok()??;
        let meta: EntryMeta = serde_json::from_slice(&bytes).ok()?;
        (meta.key == key).then_some(meta)
    }

    /// Records a use now (for cache eviction by age).
    pub fn touch(&mut self) -> Result<(), StateError> {
        self.meta.last_used_unix = unix_now();
        self.write_meta()
    }

    /// Deletes the whole entry (a failed first mount leaves no half-made entry behind).
    pub fn remove(self) -> Result<(), StateError> {
        // entry.json first: should the rest fail, what is left is recognisably half-made.
        self.dir.remove(META)?;
        for name in self.dir.names()? {
            self.dir.remove(&name)?;
        }
        // The directory by name, through the root: it is ours only if it is still the one we hold.
        match self.root.stat(&self.key)? {
            Some(st) if st.st_ino == self.dir_inode()? => self.root.remove_tree(&self.key),
            _ => Ok(()),
        }
    }

    fn dir_inode(&self) -> Result<u64, StateError> {
        nix::sys::stat::fstat(self.dir.as_fd())
            .map(|st| st.st_ino)
            .map_err(|e| StateError::io("stat", self.dir(), e.into()))
    }
}

fn placeholder_meta(key: &str, blob_size: u64, source: &str, digest: Option<&str>) -> EntryMeta {
    EntryMeta {
        key: key.to_owned(),
        source: source.to_owned(),
        digest: digest.map(str::to_owned),
        blob_size,
        generation: 0,
        blob_inode: 0,
        created_unix: 0,
        last_used_unix: 0,
        required: None,
        layout: None,
    }
}

/// The filesystem a cache directory lives on, as far as we care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFsKind {
    Ext4,
    Xfs,
    Btrfs,
    /// Not known to work nor known to fail: allowed, the fanotify mark decides.
    Other(u64),
}

const EXT4_MAGIC: u64 = 0xEF53;
const XFS_MAGIC: u64 = 0x5846_5342;
const BTRFS_MAGIC: u64 = 0x9123_683E;

/// Filesystems where fanotify pre-content marks are refused or make no sense for a cache.
const REFUSED: &[(u64, &str)] = &[
    (0x0102_1994, "tmpfs"),
    (0x8584_58f6, "ramfs"),
    (0x9584_58f6, "hugetlbfs"),
    (0x794c_7630, "overlayfs"),
    (0x6969, "nfs"),
    (0x6573_5546, "fuse"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x517B, "smb"),
    (0x0102_1997, "9p"),
    (0x00C3_6400, "ceph"),
    (0x7371_7368, "squashfs"),
    (0xE0F5_E1E2, "erofs"),
    (0x28cd_3d45, "cramfs"),
    (0x9660, "iso9660"),
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
];

/// Classifies a `statfs` magic number: `Err(name)` for a refused filesystem.
fn classify(magic: u64) -> Result<CacheFsKind, &'static str> {
    match magic {
        EXT4_MAGIC => Ok(CacheFsKind::Ext4),
        XFS_MAGIC => Ok(CacheFsKind::Xfs),
        BTRFS_MAGIC => Ok(CacheFsKind::Btrfs),
        m => match REFUSED.iter().find(|(r, _)| *r == m) {
            Some((_, name)) => Err(name),
            None => Ok(CacheFsKind::Other(m)),
        },
    }
}

/// Checks that `path` (or, if it does not exist yet, its nearest existing ancestor) is on a
/// filesystem where the cache file can carry a pre-content mark. tmpfs, network and stacked
/// filesystems are refused with a message naming the path and the filesystem; ext4, xfs and
/// btrfs are fine; anything else is allowed and the mark attempt decides.
pub fn check_cache_filesystem(path: &Path) -> Result<CacheFsKind, StateError> {
    let mut probe = path;
    let st = loop {
        match nix::sys::statfs::statfs(probe) {
            Ok(st) => break st,
            Err(nix::errno::Errno::ENOENT) => match probe.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => probe = parent,
                _ => {
                    return Err(StateError::io(
                        "statfs",
                        path,
                        io::ErrorKind::NotFound.into(),
                    ))
                }
            },
            Err(e) => return Err(StateError::io("statfs", probe, e.into())),
        }
    };
    let magic = st.filesystem_type().0 as u32 as u64;
    classify(magic).map_err(|fs| StateError::UnsupportedCacheFilesystem {
        path: path.to_owned(),
        fs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DIGEST: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn key() -> String {
        crate::cache_key_for_digest(DIGEST).unwrap()
    }

    #[test]
    fn create_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path().join("cache"));
        let (e, created) =
            CacheEntry::open_or_create(&cache, &key(), 1 << 30, "reg/a:1", Some(DIGEST)).unwrap();
        assert!(created);
        let st = fs::metadata(e.blob_path()).unwrap();
        assert_eq!(st.len(), 1 << 30);
        assert!(
            st.blocks() < 64,
            "blob is not sparse: {} blocks",
            st.blocks()
        );
        assert_eq!(st.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(e.dir()).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(
            fs::metadata(cache.root()).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(e.meta().blob_inode, st.ino());
        assert_ne!(e.generation(), 0);

        let (mut e2, created) =
            CacheEntry::open_or_create(&cache, &key(), 1 << 30, "mirror/a:1", Some(DIGEST))
                .unwrap();
        assert!(!created);
        assert_eq!(e2.generation(), e.generation());
        assert_eq!(e2.meta().source, "mirror/a:1");
        assert_eq!(e2.bitmap_identity(st.ino()).generation, e.generation());

        assert!(!CacheEntry::knows_required(&cache, &key(), 1 << 30, Some(DIGEST)));
        e2.set_required(&[0..4096, 8192..(2 << 30), 5..5]).unwrap();
        e2.set_layout(serde_json::json!({"blobs": [1, 2]})).unwrap();
        assert_eq!(CacheEntry::peek(&cache, &key()).unwrap().layout, Some(serde_json::json!({"blobs": [1, 2]})));
        assert!(CacheEntry::peek(&cache, "other").is_none());
        assert!(CacheEntry::knows_required(&cache, &key(), 1 << 30, Some(DIGEST)));
        assert!(!CacheEntry::knows_required(&cache, &key(), 1 << 29, Some(DIGEST)), "another size");
        let (e3, _) =
            CacheEntry::open_or_create(&cache, &key(), 1 << 30, "x", Some(DIGEST)).unwrap();
        assert_eq!(e3.required_ranges(), Some(vec![0..4096, 8192..(1 << 30)]));
        e3.remove().unwrap();
        assert!(!cache.entry_dir(&key()).unwrap().exists());
    }

    #[test]
    fn mismatches_recreate_with_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let k = key();
        let (e, _) = CacheEntry::open_or_create(&cache, &k, 10_000, "s", Some(DIGEST)).unwrap();
        fs::write(e.bitmap_path(), b"old").unwrap();
        let gen0 = e.generation();

        // Different size.
        let (e, created) =
            CacheEntry::open_or_create(&cache, &k, 20_000, "s", Some(DIGEST)).unwrap();
        assert!(created);
        assert_ne!(e.generation(), gen0);
        assert_eq!(fs::metadata(e.blob_path()).unwrap().len(), 20_000);
        assert!(!e.bitmap_path().exists(), "old bitmap survived");

        // Blob truncated behind our back.
        fs::OpenOptions::new()
            .write(true)
            .open(e.blob_path())
            .unwrap()
            .set_len(5)
            .unwrap();
        let (e, created) =
            CacheEntry::open_or_create(&cache, &k, 20_000, "s", Some(DIGEST)).unwrap();
        assert!(created);

        // Blob replaced by another file (new inode).
        let gen1 = e.generation();
        // The old inode stays alive through a second link, so the new file cannot get its number.
        fs::hard_link(e.blob_path(), dir.path().join("old-blob")).unwrap();
        fs::remove_file(e.blob_path()).unwrap();
        fs::write(e.blob_path(), vec![0u8; 20_000]).unwrap();
        let (e, created) =
            CacheEntry::open_or_create(&cache, &k, 20_000, "s", Some(DIGEST)).unwrap();
        assert!(created);
        assert_ne!(e.generation(), gen1);

        // Corrupt entry.json.
        fs::write(e.meta_path(), b"{").unwrap();
        let (_, created) =
            CacheEntry::open_or_create(&cache, &k, 20_000, "s", Some(DIGEST)).unwrap();
        assert!(created);

        // Half-made: blob without entry.json.
        fs::remove_file(cache.entry_dir(&k).unwrap().join("entry.json")).unwrap();
        let (_, created) =
            CacheEntry::open_or_create(&cache, &k, 20_000, "s", Some(DIGEST)).unwrap();
        assert!(created);

        // Digest mismatch (a url-keyed entry opened with a digest).
        let (_, created) = CacheEntry::open_or_create(&cache, &k, 20_000, "s", None).unwrap();
        assert!(created);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        assert!(CacheEntry::open_or_create(&cache, "../x", 1, "s", None).is_err());
        assert!(CacheEntry::open_or_create(&cache, "k", 1, "s", Some("sha256:zz")).is_err());
    }

    #[test]
    fn zero_size_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let (e, created) =
            CacheEntry::open_or_create(&cache, "url-00-0", 0, "http://h/x", None).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(e.blob_path()).unwrap().len(), 0);
        let (_, created) =
            CacheEntry::open_or_create(&cache, "url-00-0", 0, "http://h/x", None).unwrap();
        assert!(!created);
    }

    #[test]
    fn filesystem_classification() {
        assert_eq!(classify(0xEF53), Ok(CacheFsKind::Ext4));
        assert_eq!(classify(0x5846_5342), Ok(CacheFsKind::Xfs));
        assert_eq!(classify(0x9123_683E), Ok(CacheFsKind::Btrfs));
        assert_eq!(classify(0x0102_1994), Err("tmpfs"));
        assert_eq!(classify(0x794c_7630), Err("overlayfs"));
        assert_eq!(classify(0x1234), Ok(CacheFsKind::Other(0x1234)));
    }

    #[test]
    fn filesystem_check_on_real_paths() {
        // /dev/shm is tmpfs on any usual Linux system.
        if let Ok(st) = nix::sys::statfs::statfs("/dev/shm") {
            if st.filesystem_type().0 as u64 == 0x0102_1994 {
                let err = check_cache_filesystem(Path::new("/dev/shm/not/yet/there")).unwrap_err();
                assert_eq!(
                    err.to_string(),
                    "cache_dir /dev/shm/not/yet/there is on tmpfs; fanotify pre-content marks need ext4, xfs or btrfs"
                );
            }
        }
        // Whatever the temp dir is on, a nonexistent child resolves to its ancestor.
        let dir = tempfile::tempdir().unwrap();
        let a = check_cache_filesystem(dir.path());
        let b = check_cache_filesystem(&dir.path().join("a/b"));
        assert_eq!(a.map_err(|e| e.to_string()), b.map_err(|e| e.to_string()));
    }
}
