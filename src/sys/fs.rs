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

/// `FS_IOC_FIEMAP` = _IOWR('f', 11, struct fiemap) (32-byte header).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_HEADER: usize = 32;
const FIEMAP_EXTENT: usize = 56;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;

/// Physical byte ranges backing `file`, from `FS_IOC_FIEMAP`. On EROFS (file
/// backed) they are offsets in the image. Inline and unknown extents are
/// skipped: they live in metadata, which is local anyway.
pub fn fiemap(file: &std::fs::File) -> io::Result<Vec<std::ops::Range<u64>>> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 256;
    let mut out = Vec::new();
    let mut start = 0u64;
    // Extents come in batches; cap the number of rounds for a hostile fs.
    for _ in 0..4096 {
        let mut buf = vec![0u64; (FIEMAP_HEADER + BATCH * FIEMAP_EXTENT) / 8];
        {
            let bytes: &mut [u8] = bytemuck_u64(&mut buf);
            bytes[0..8].copy_from_slice(&start.to_ne_bytes());
            bytes[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
            bytes[24..28].copy_from_slice(&(BATCH as u32).to_ne_bytes());
        }
        // SAFETY: `buf` is a zeroed, 8-byte aligned struct fiemap with room
        // for BATCH extents, as fm_extent_count says.
        cvt(unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) })?;
        let bytes: &[u8] = bytemuck_u64(&mut buf);
        let mapped = u32::from_ne_bytes(bytes[20..24].try_into().unwrap_or([0; 4])) as usize;
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let e = &bytes[FIEMAP_HEADER + i * FIEMAP_EXTENT..FIEMAP_HEADER + (i + 1) * FIEMAP_EXTENT];
            let word = |o: usize| u64::from_ne_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
            let (logical, physical, length) = (word(0), word(8), word(16));
            let flags = u32::from_ne_bytes(e[40..44].try_into().unwrap_or([0; 4]));
            if flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED) == 0 && length > 0 {
                out.push(physical..physical.saturating_add(length));
            }
            start = logical.saturating_add(length);
            last |= flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last || mapped < BATCH {
            break;
        }
    }
    Ok(out)
}

fn bytemuck_u64(buf: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length
    // covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) }
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

#[cfg(test)]
mod fiemap_tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn fiemap_of_an_erofs_file_points_into_the_image() {
        if !crate::sys::root_or_skip("fiemap_of_an_erofs_file_points_into_the_image") {
            return;
        }
        if Command::new("mkfs.erofs").arg("--help").output().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "mkfs.erofs missing under CI=true");
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(tree.join("f"), &data).unwrap();
        let image = dir.path().join("img");
        let st = Command::new("mkfs.erofs").arg(&image).arg(&tree).output().unwrap();
        assert!(st.status.success());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        crate::sys::mount::mount_erofs_file(&image, &mnt, None).unwrap();
        let result = fiemap(&std::fs::File::open(mnt.join("f")).unwrap());
        crate::sys::mount::umount(&mnt, false).unwrap();
        let extents = result.unwrap();
        assert!(!extents.is_empty());
        let img = std::fs::read(&image).unwrap();
        // The whole-block part of the file is where FIEMAP says.
        let first = &extents[0];
        let n = (first.end - first.start).min(data.len() as u64) as usize;
        assert_eq!(&img[first.start as usize..first.start as usize + n], &data[..n]);
    }
}
