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

pub struct SharedMap {
    // Kept open for the life of the mapping (and of the process, see the journal).
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes
// through &self/&mut self, so Rust's aliasing rules hold within the process.
unsafe impl Send for SharedMap {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Opens (creating, mode 0600) `path`, sizes it to `len` and maps it shared.
    pub fn open(path: &Path, len: usize) -> io::Result<SharedMap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
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
        Ok(SharedMap { file, ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference
        // within the process; other processes touch the file only after we die.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `open`; no slices
        // borrowed from it outlive `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut map = SharedMap::open(&path, 8192).unwrap();
        map.bytes_mut()[100..104].copy_from_slice(b"abcd");
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 8192);
        assert_eq!(&on_disk[100..104], b"abcd");
        drop(map);
        let again = SharedMap::open(&path, 8192).unwrap();
        assert_eq!(&again.bytes()[100..104], b"abcd");
    }
}
