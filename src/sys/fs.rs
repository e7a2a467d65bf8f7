//! Filesystem type of a path (`statfs(2)` magic numbers).
//!
//! fanotify refuses pre-content marks on filesystems that did not opt in
//! (tmpfs, overlayfs, ...). Checking the cache directory up front turns a
//! late EOPNOTSUPP into a clear message at mount time.

use std::io;
use std::mem::MaybeUninit;
use std::path::Path;

use super::{cvt, path_to_cstring};

pub const EXT4_SUPER_MAGIC: i64 = 0xEF53;
pub const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
pub const RAMFS_MAGIC: i64 = 0x8584_58F6;
pub const OVERLAYFS_SUPER_MAGIC: i64 = 0x794C_7630;
pub const EROFS_SUPER_MAGIC_V1: i64 = 0xE0F5_E1E2;
pub const NFS_SUPER_MAGIC: i64 = 0x6969;
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
pub const PROC_SUPER_MAGIC: i64 = 0x9FA0;

/// `f_type` of `statfs(path)`, as the unsigned 32-bit magic (so values like
/// btrfs' 0x9123683E compare equal on every architecture).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c_path = path_to_cstring(path)?;
    let mut buf = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is a valid C string and `buf` a writable statfs
    // buffer, both outliving the call.
    cvt(unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and filled by the kernel; plain integers.
    let st = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type is i32 or i64 depending on the target
    Ok((st.f_type as i64) & 0xFFFF_FFFF)
}

/// Memory-backed filesystems (tmpfs, ramfs): no pre-content marks, and a
/// cache there would live in RAM anyway.
pub fn is_tmpfs(path: &Path) -> io::Result<bool> {
    Ok(is_memory_fs_magic(fs_magic(path)?))
}

pub fn is_memory_fs_magic(magic: i64) -> bool {
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// Filesystems known (measured on Linux 6.18) to accept pre-content marks
/// and behave correctly for the cache file.
pub fn is_known_pre_content_fs(magic: i64) -> bool {
    matches!(
        magic,
        EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC | BTRFS_SUPER_MAGIC
    )
}

/// A name for messages ("ext4", "tmpfs", ...), or `None` if unknown.
pub fn fs_name(magic: i64) -> Option<&'static str> {
    Some(match magic {
        EXT4_SUPER_MAGIC => "ext4",
        XFS_SUPER_MAGIC => "xfs",
        BTRFS_SUPER_MAGIC => "btrfs",
        TMPFS_MAGIC => "tmpfs",
        RAMFS_MAGIC => "ramfs",
        OVERLAYFS_SUPER_MAGIC => "overlayfs",
        EROFS_SUPER_MAGIC_V1 => "erofs",
        NFS_SUPER_MAGIC => "nfs",
        FUSE_SUPER_MAGIC => "fuse",
        PROC_SUPER_MAGIC => "proc",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_of_known_mounts() {
        assert_eq!(fs_magic(Path::new("/proc")).unwrap(), PROC_SUPER_MAGIC);
        assert!(!is_tmpfs(Path::new("/proc")).unwrap());
        assert_eq!(fs_name(PROC_SUPER_MAGIC), Some("proc"));
        if Path::new("/dev/shm").is_dir() && fs_magic(Path::new("/dev/shm")).unwrap() == TMPFS_MAGIC
        {
            assert!(is_tmpfs(Path::new("/dev/shm")).unwrap());
        }
        let magic = fs_magic(Path::new("/var/tmp")).unwrap();
        assert!(fs_name(magic).is_some() || magic != 0);
    }

    #[test]
    fn classification() {
        assert!(is_known_pre_content_fs(EXT4_SUPER_MAGIC));
        assert!(is_known_pre_content_fs(BTRFS_SUPER_MAGIC));
        assert!(!is_known_pre_content_fs(TMPFS_MAGIC));
        assert!(is_memory_fs_magic(RAMFS_MAGIC));
        assert_eq!(fs_name(1), None);
        assert!(fs_magic(Path::new("/nonexistent/x")).is_err());
    }
}
