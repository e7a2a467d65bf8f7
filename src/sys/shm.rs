//! A file mapped MAP_SHARED: bytes written to it survive the death of the
//! writing process (they live in the file's page cache), which is what the
//! agent's event journal needs. Even read(2) of the fanotify group can land
//! directly in the mapping, so there is no window between dequeuing events
//! and recording them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The mapping itself, shared by the two halves of [`SharedMap::split`].
struct Mapping {
    // Kept open for the life of the mapping (and of the process, see the journal).
    _file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the halves handed
// out by `split` are disjoint, one accessed through `&mut` only, the other
// through atomics only, so Rust's aliasing rules hold within the process.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `open`; the halves
        // that borrowed from it hold this `Arc`, so none outlives it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A shared mapping of a whole file, not yet split.
pub struct SharedMap {
    map: Mapping,
}

/// The byte part of a split mapping: one owner, plain reads and writes.
pub struct SharedBytes {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
}

/// The word half of a split mapping: shared, accessed with atomics only.
pub struct SharedWords {
    map: Arc<Mapping>,
    off: usize,
    words: usize,
}

impl SharedMap {
    /// Opens (creating, mode 0600, never through a symlink) `path`, sizes it
    /// to `len` and maps it shared.
    pub fn open(path: &Path, len: usize) -> io::Result<SharedMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        Self::from_file(file, len)
    }

    /// Sizes the open read-write `file` to `len` and maps it shared.
    pub fn from_file(file: File, len: usize) -> io::Result<SharedMap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        if file.metadata()?.len() != len as u64 {
            file.set_len(len as u64)?;
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file we just sized
        // to `len`; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMap { map: Mapping { _file: file, ptr, len } })
    }

    /// Splits into bytes `[0, at)` and 64-bit words `[at, len)`; `at` and the
    /// length of the word half must be multiples of 8 (the mapping itself is
    /// page aligned).
    pub fn split(self, at: usize) -> io::Result<(SharedBytes, SharedWords)> {
        let len = self.map.len;
        if at > len || at % 8 != 0 || (len - at) % 8 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "split point not word aligned"));
        }
        let map = Arc::new(self.map);
        let words = SharedWords { map: Arc::clone(&map), off: at, words: (len - at) / 8 };
        Ok((SharedBytes { map, off: 0, len: at }, words))
    }

    /// Splits into words `[0, a)`, bytes `[a, b)` and words `[b, len)`; `a`,
    /// `b` and `len` must be multiples of 8 with `a <= b`.
    pub fn split3(self, a: usize, b: usize) -> io::Result<(SharedWords, SharedBytes, SharedWords)> {
        let len = self.map.len;
        if a > b || b > len || a % 8 != 0 || b % 8 != 0 || len % 8 != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "split points not word aligned"));
        }
        let map = Arc::new(self.map);
        let head = SharedWords { map: Arc::clone(&map), off: 0, words: a / 8 };
        let tail = SharedWords { map: Arc::clone(&map), off: b, words: (len - b) / 8 };
        Ok((head, SharedBytes { map, off: a, len: b - a }, tail))
    }
}

impl SharedBytes {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `[off, off + len)` is mapped readable while `map` lives, and
        // no other part covers it.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(self.off), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` on the only owner of this part
        // makes this the only reference to it within the process (other
        // processes touch these bytes only after we die).
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl AsRef<[AtomicU64]> for SharedWords {
    fn as_ref(&self) -> &[AtomicU64] {
        // SAFETY: `[off, off + 8 * words)` is mapped, 8-byte aligned (page
        // aligned base, `off` a multiple of 8), lives as long as `map`, and is
        // only ever accessed through these atomics within the process.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(self.off).cast::<AtomicU64>(), self.words) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn writes_to_both_halves_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut bytes, words) = SharedMap::open(&path, 8192).unwrap().split(4096).unwrap();
        bytes.bytes_mut()[100..104].copy_from_slice(b"abcd");
        words.as_ref()[1].store(0x0102_0304_0506_0708, Ordering::SeqCst);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 8192);
        assert_eq!(&on_disk[100..104], b"abcd");
        assert_eq!(&on_disk[4104..4112], &0x0102_0304_0506_0708u64.to_ne_bytes());
        drop((bytes, words));
        let (again, _) = SharedMap::open(&path, 8192).unwrap().split(4096).unwrap();
        assert_eq!(&again.bytes()[100..104], b"abcd");
        assert!(SharedMap::open(&path, 8192).unwrap().split(4095).is_err());
        let (head, mid, tail) = SharedMap::open(&path, 8192).unwrap().split3(64, 4096).unwrap();
        assert_eq!((head.as_ref().len(), mid.bytes().len(), tail.as_ref().len()), (8, 4032, 512));
        assert_eq!(&mid.bytes()[36..40], b"abcd", "the byte part starts at its offset");
        assert_eq!(tail.as_ref()[1].load(Ordering::SeqCst), 0x0102_0304_0506_0708);
        assert!(SharedMap::open(&path, 8192).unwrap().split3(100, 4096).is_err());
    }
}
