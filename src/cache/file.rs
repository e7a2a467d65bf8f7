//! The sparse cache file of one blob, and which of its blocks hold data.
//!
//! The file descriptor is opened **before** the fanotify mark is placed: writes and reads
//! through an fd opened earlier raise no pre-content events, so the agent can fill the file
//! from any thread without answering its own events (a write through a later fd would
//! deadlock the event loop).
//!
//! Order matters for correctness: [`CacheFile::write_range`] writes the bytes first and only
//! then marks the blocks present, so a concurrent event never sees a present block that still
//! reads as a hole. For persisting, [`CacheFile::durable_snapshot`] copies the map first and
//! then `fdatasync`s, so every bit in the copy is backed by data on disk.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use parking_lot::{Mutex, MutexGuard};

use roaring::RoaringBitmap;

use super::bitmap::{PresenceError, PresenceMap};

#[derive(Debug, thiserror::Error)]
pub enum CacheFileError {
    #[error("{op} cache file {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache file {} is {actual} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("cache file {} is not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error("range {offset}+{len} is outside the {blob_size}-byte blob")]
    OutOfBounds {
        offset: u64,
        len: u64,
        blob_size: u64,
    },
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

/// The cache file plus its in-memory presence map. Shared by the event loop (queries) and
/// the fetchers (writes); all methods take `&self`.
#[derive(Debug)]
pub struct CacheFile {
    file: File,
    path: PathBuf,
    blob_size: u64,
    inode: u64,
    map: Mutex<PresenceMap>,
}

impl CacheFile {
    /// Opens `path` read-write with nothing marked present. Call before the fanotify mark.
    pub fn open(path: &Path, blob_size: u64) -> Result<Self, CacheFileError> {
        Self::open_with_presence(path, PresenceMap::new(blob_size)?)
    }

    /// Opens `path` read-write with a restored presence map (e.g. a persisted bitmap that
    /// passed its identity check). The file must be a regular file of `map.blob_size()` bytes.
    pub fn open_with_presence(path: &Path, map: PresenceMap) -> Result<Self, CacheFileError> {
        let io = |op| {
            move |source| CacheFileError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("open"))?;
        Self::from_file(file, path, map)
    }

    /// Wraps an already open cache file (a restarted worker gets the fd its
    /// predecessor opened before the fanotify mark: writes through it raise
    /// no events, while an fd opened now would block on our own mark).
    pub fn from_file(file: File, path: &Path, map: PresenceMap) -> Result<Self, CacheFileError> {
        let io = |op| {
            move |source| CacheFileError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.file_type().is_file() {
            return Err(CacheFileError::NotRegular {
                path: path.to_owned(),
            });
        }
        let blob_size = map.blob_size();
        if meta.len() != blob_size {
            return Err(CacheFileError::SizeMismatch {
                path: path.to_owned(),
                actual: meta.len(),
                expected: blob_size,
            });
        }
        Ok(CacheFile {
            file,
            path: path.to_owned(),
            blob_size,
            inode: meta.ino(),
            map: Mutex::new(map),
        })
    }

    /// The map is updated by single calls that cannot leave it half-changed, so a panic
    /// elsewhere while holding the lock does not make it wrong: ignore poisoning.
    fn map(&self) -> MutexGuard<'_, PresenceMap> {
        self.map.lock()
    }

    fn check_bounds(&self, offset: u64, len: usize) -> Result<(), CacheFileError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.blob_size => Ok(()),
            _ => Err(CacheFileError::OutOfBounds {
                offset,
                len,
                blob_size: self.blob_size,
            }),
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheFileError + '_ {
        move |source| CacheFileError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Writes `data` at `offset` (all of it), then marks present the blocks it fully covers
    /// (the partial last block counts when `data` reaches the end of the blob). Fetchers
    /// should write whole blocks: a block only partly written stays missing.
    pub fn write_range(&self, offset: u64, data: &[u8]) -> Result<(), CacheFileError> {
        self.check_bounds(offset, data.len())?;
        self.file
            .write_all_at(data, offset)
            .map_err(self.io_err("write"))?;
        let end = offset + data.len() as u64;
        self.map().insert(offset..end);
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`. Raises no event (fd opened before the
    /// mark), so missing blocks read as zeros: check [`Self::contains`] first.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CacheFileError> {
        self.check_bounds(offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io_err("read"))
    }

    /// See [`PresenceMap::contains`]: the event fast path.
    pub fn contains(&self, range: Range<u64>) -> bool {
        self.map().contains(range)
    }

    /// See [`PresenceMap::missing`].
    pub fn missing(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.map().missing(range)
    }

    pub fn populated_bytes(&self) -> u64 {
        self.map().populated_bytes()
    }

    /// See [`PresenceMap::populated_in`].
    pub fn populated_in(&self, range: Range<u64>) -> u64 {
        self.map().populated_in(range)
    }

    pub fn is_complete(&self) -> bool {
        self.map().is_complete()
    }

    /// Forgets the blocks touched by `range` (the data stays; events refetch it).
    pub fn forget(&self, range: Range<u64>) -> u64 {
        self.map().remove(range)
    }

    /// Forgets what is present (the data stays; events refetch it).
    pub fn clear_presence(&self) -> Result<(), CacheFileError> {
        let fresh = PresenceMap::new(self.blob_size)?;
        *self.map() = fresh;
        Ok(())
    }

    /// The same file with `map` as its presence (a trusted persisted bitmap).
    pub fn replace_presence(self, map: PresenceMap) -> CacheFile {
        CacheFile { map: Mutex::new(map), ..self }
    }

    /// A copy of the presence bitmap. Not durable by itself: see [`Self::durable_snapshot`].
    pub fn snapshot(&self) -> RoaringBitmap {
        self.map().to_roaring()
    }

    /// `fdatasync` of the cache file.
    pub fn sync_data(&self) -> Result<(), CacheFileError> {
        self.file.sync_data().map_err(self.io_err("fdatasync"))
    }

    /// A snapshot taken **before** an `fdatasync`: every bit in it is backed by data on disk,
    /// so it may be saved with `erofs_fanotify_state::save_bitmap`.
    pub fn durable_snapshot(&self) -> Result<RoaringBitmap, CacheFileError> {
        let snapshot = self.snapshot();
        self.sync_data()?;
        Ok(snapshot)
    }

    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Inode number of the cache file (part of the persisted bitmap's identity).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd the fanotify mark is placed through, and that the mount may use.
    pub fn as_file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bitmap::BLOCK;
    use std::sync::Arc;

    fn sparse(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("blob");
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn write_then_present_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * BLOCK + 123;
        let cf = CacheFile::open(&sparse(dir.path(), size), size).unwrap();
        assert_eq!(cf.blob_size(), size);
        assert_eq!(
            cf.inode(),
            std::fs::metadata(dir.path().join("blob")).unwrap().ino()
        );
        assert!(!cf.contains(0..BLOCK));
        assert_eq!(cf.missing(0..u64::MAX), vec![0..size]);

        let data: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
        cf.write_range(BLOCK, &data).unwrap();
        assert!(cf.contains(BLOCK..3 * BLOCK));
        assert!(!cf.contains(0..2 * BLOCK));
        assert_eq!(cf.populated_bytes(), 2 * BLOCK);
        let mut back = vec![0u8; data.len()];
        cf.read_at(BLOCK, &mut back).unwrap();
        assert_eq!(back, data);

        // The partial tail block, written up to EOF.
        cf.write_range(5 * BLOCK, &[7u8; 123]).unwrap();
        assert!(cf.contains(5 * BLOCK..u64::MAX));
        assert_eq!(cf.populated_bytes(), 2 * BLOCK + 123);
        assert_eq!(
            cf.missing(0..u64::MAX),
            vec![0..BLOCK, 3 * BLOCK..5 * BLOCK]
        );

        // A partial write marks nothing.
        cf.write_range(0, &[1u8; 100]).unwrap();
        assert!(!cf.contains(0..1));

        cf.write_range(0, &vec![0u8; BLOCK as usize]).unwrap();
        cf.write_range(3 * BLOCK, &vec![0u8; 2 * BLOCK as usize])
            .unwrap();
        assert!(cf.is_complete());
        assert_eq!(cf.populated_bytes(), size);
        let snap = cf.durable_snapshot().unwrap();
        assert_eq!(snap.len(), 6);
        assert_eq!(
            std::fs::metadata(cf.path()).unwrap().len(),
            size,
            "writes must not grow the file"
        );
    }

    #[test]
    fn bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cf = CacheFile::open(&sparse(dir.path(), 10_000), 10_000).unwrap();
        assert!(matches!(
            cf.write_range(9_999, &[0, 0]),
            Err(CacheFileError::OutOfBounds { .. })
        ));
        assert!(matches!(
            cf.write_range(u64::MAX, &[0]),
            Err(CacheFileError::OutOfBounds { .. })
        ));
        let mut buf = [0u8; 2];
        assert!(matches!(
            cf.read_at(9_999, &mut buf),
            Err(CacheFileError::OutOfBounds { .. })
        ));
        assert!(matches!(
            cf.read_at(u64::MAX - 1, &mut buf),
            Err(CacheFileError::OutOfBounds { .. })
        ));
        cf.write_range(10_000, &[]).unwrap();
        cf.read_at(9_998, &mut buf).unwrap();
        assert_eq!(cf.populated_bytes(), 0);
    }

    #[test]
    fn open_checks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(dir.path(), 100);
        assert!(matches!(
            CacheFile::open(&p, 101),
            Err(CacheFileError::SizeMismatch {
                actual: 100,
                expected: 101,
                ..
            })
        ));
        assert!(matches!(
            CacheFile::open(&dir.path().join("none"), 1),
            Err(CacheFileError::Io { .. })
        ));
        assert!(matches!(
            CacheFile::open(dir.path(), 1),
            Err(CacheFileError::Io { .. } | CacheFileError::NotRegular { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(
            matches!(CacheFile::open(&link, 100), Err(CacheFileError::Io { .. })),
            "symlink followed"
        );
        assert!(matches!(
            CacheFile::open(&p, u64::MAX),
            Err(CacheFileError::Presence(_))
        ));
    }

    #[test]
    fn restored_presence() {
        let dir = tempfile::tempdir().unwrap();
        let p = sparse(dir.path(), 8 * BLOCK);
        let mut bits = RoaringBitmap::new();
        bits.insert_range(2..4);
        let map = PresenceMap::from_roaring(8 * BLOCK, bits.clone()).unwrap();
        let cf = CacheFile::open_with_presence(&p, map).unwrap();
        assert!(cf.contains(2 * BLOCK..4 * BLOCK));
        assert_eq!(cf.snapshot(), bits);
    }

    #[test]
    fn concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = 256u64;
        let cf =
            Arc::new(CacheFile::open(&sparse(dir.path(), blocks * BLOCK), blocks * BLOCK).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let cf = Arc::clone(&cf);
                std::thread::spawn(move || {
                    for b in (t..blocks).step_by(4) {
                        cf.write_range(b * BLOCK, &vec![b as u8; BLOCK as usize])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cf.is_complete());
        let mut buf = vec![0u8; BLOCK as usize];
        for b in [0, 1, 77, 255] {
            cf.read_at(b * BLOCK, &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == b as u8));
        }
    }
}
