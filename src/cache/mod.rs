//! The agent's view of a blob's cache: a sparse file plus a presence map.
//!
//! The cache file has the blob's size and is mounted by EROFS directly. A roaring bitmap of
//! 4 KiB blocks ([`bitmap::PresenceMap`]) says which blocks already hold the blob's bytes;
//! holes are never used as the truth (a block of real zeros and a hole look the same).
//!
//! * [`bitmap`]: the pure block arithmetic (clamping event ranges to EOF, which blocks an
//!   event still needs, what a write made present). Unit-tested without I/O.
//! * [`file`]: [`CacheFile`], the open cache file with the map behind a mutex: cheap
//!   `contains` for the event fast path, `write_range` that writes before it marks.
//!
//! Persistence belongs to the `erofs-fanotify-state` crate (layout, checksums, identity);
//! [`open_entry`] and [`persist`] join the two: a persisted bitmap is used only if it was
//! written for this very file, and a bit is saved only once its data is on disk.

pub mod bitmap;
pub mod file;

pub use bitmap::{PresenceError, PresenceMap, BLOCK, MAX_BLOB_SIZE};
pub use file::{CacheFile, CacheFileError};

use erofs_fanotify_state::{CacheEntry, LoadedBitmap, StateError};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    File(#[from] CacheFileError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Opens the entry's cache file (call before the fanotify mark) and restores the presence
/// bitmap saved for it, if that bitmap is intact and names this file. A discarded bitmap is
/// logged and the blocks count as missing (they will be fetched again).
pub fn open_entry(entry: &CacheEntry) -> Result<CacheFile, CacheError> {
    open_entry_with(entry, None)
}

/// Like [`open_entry`], using `file` (the cache file opened before the mark)
/// instead of opening `blob` again when given.
pub fn open_entry_with(entry: &CacheEntry, file: Option<std::fs::File>) -> Result<CacheFile, CacheError> {
    let empty = PresenceMap::new(entry.blob_size()).map_err(CacheFileError::from)?;
    let file = match file {
        Some(f) => f,
        // Through the entry's directory descriptor, never through a symlink.
        None => entry.open_blob()?,
    };
    let plain = CacheFile::from_file(file, &entry.blob_path(), empty)?;
    let identity = entry.bitmap_identity(plain.inode());
    let map = match entry.load_bitmap(&identity)? {
        LoadedBitmap::Missing => return Ok(plain),
        LoadedBitmap::Loaded(bits) => match PresenceMap::from_roaring(entry.blob_size(), bits) {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!(entry = %entry.dir().display(), error = %e, "discarding persisted bitmap");
                return Ok(plain);
            }
        },
        LoadedBitmap::Discarded(reason) => {
            tracing::warn!(entry = %entry.dir().display(), %reason, "discarding persisted bitmap");
            return Ok(plain);
        }
    };
    Ok(plain.replace_presence(map))
}

/// Saves the presence bitmap durably: snapshot, then `fdatasync` of the cache file, then an
/// atomic write of the bitmap. Safe to call at any time from any thread.
pub fn persist(entry: &CacheEntry, file: &CacheFile) -> Result<(), CacheError> {
    let bits = file.durable_snapshot()?;
    entry.save_bitmap(&bits, &entry.bitmap_identity(file.inode()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use erofs_fanotify_state::CacheDir;

    #[test]
    fn persisted_presence_survives_reopen_but_not_recreation() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let size = 10 * BLOCK + 1;
        let (entry, created) =
            CacheEntry::open_or_create(&cache, "url-ab-40961", size, "http://h/x", None).unwrap();
        assert!(created);
        let file = open_entry(&entry).unwrap();
        assert_eq!(file.populated_bytes(), 0);
        file.write_range(0, &vec![1u8; 2 * BLOCK as usize]).unwrap();
        file.write_range(10 * BLOCK, &[2]).unwrap();
        persist(&entry, &file).unwrap();
        drop(file);

        let (entry, created) =
            CacheEntry::open_or_create(&cache, "url-ab-40961", size, "http://h/x", None).unwrap();
        assert!(!created);
        let file = open_entry(&entry).unwrap();
        assert_eq!(file.populated_bytes(), 2 * BLOCK + 1);
        assert!(file.contains(0..2 * BLOCK));
        drop(file);

        // A bitmap from another incarnation of the entry is not applied.
        let saved = std::fs::read(entry.bitmap_path()).unwrap();
        entry.remove().unwrap();
        let (entry, created) =
            CacheEntry::open_or_create(&cache, "url-ab-40961", size, "http://h/x", None).unwrap();
        assert!(created);
        std::fs::write(entry.bitmap_path(), saved).unwrap();
        let file = open_entry(&entry).unwrap();
        assert_eq!(file.populated_bytes(), 0);
    }
}
