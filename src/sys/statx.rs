//! Mount ids through `statx(2)`.
//!
//! Per-mount state is keyed by the mount id of the mountpoint.
//! `STATX_MNT_ID_UNIQUE` (Linux >= 6.8) is a 64-bit id never reused since
//! boot, the same one statmount/listmount and fanotify mount events use;
//! the older `STATX_MNT_ID` is the small, reusable id of /proc/PID/mountinfo.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use super::{cvt, path_to_cstring};

/// A mount id and which kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MountId {
    pub id: u64,
    /// `true`: `STATX_MNT_ID_UNIQUE` (never reused); `false`: the reusable
    /// `STATX_MNT_ID` of older kernels.
    pub unique: bool,
}

/// The id of the mount `path` is on (for a mountpoint: the mount on top).
/// Symlinks are followed, like `stat(1)`.
pub fn mount_id(path: &Path) -> io::Result<MountId> {
    let c_path = path_to_cstring(path)?;
    mount_id_at(libc::AT_FDCWD, &c_path, 0)
}

/// The id of the mount an open file is on.
pub fn mount_id_fd(file: BorrowedFd) -> io::Result<MountId> {
    mount_id_at(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

fn mount_id_at(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_int,
) -> io::Result<MountId> {
    for (request, unique) in [
        (libc::STATX_MNT_ID_UNIQUE, true),
        (libc::STATX_MNT_ID, false),
    ] {
        let stx = statx(dirfd, path, flags, request)?;
        // Kernels ignore mask bits they do not know; stx_mask says what was
        // actually filled in.
        if stx.stx_mask & request != 0 {
            return Ok(MountId {
                id: stx.stx_mnt_id,
                unique,
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "statx returns no mount id (kernel < 5.8)",
    ))
}

fn statx(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_int,
    mask: libc::c_uint,
) -> io::Result<libc::statx> {
    let mut buf = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is a valid C string and `buf` a writable statx buffer,
    // both outliving the call.
    cvt(unsafe {
        libc::statx(
            dirfd,
            path.as_ptr(),
            flags | libc::AT_STATX_SYNC_AS_STAT,
            mask,
            buf.as_mut_ptr(),
        )
    })?;
    // SAFETY: zero-initialised and then filled by the kernel; every field
    // is a plain integer, so any bit pattern is valid.
    Ok(unsafe { buf.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_ids_of_distinct_mounts_differ() {
        let root = mount_id(Path::new("/")).unwrap();
        let proc_ = mount_id(Path::new("/proc")).unwrap();
        assert_ne!(root.id, proc_.id);
        assert_eq!(root.unique, proc_.unique);
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(mount_id_fd(std::os::fd::AsFd::as_fd(&file)).unwrap(), proc_);
    }

    #[test]
    fn missing_path_is_an_error() {
        let err = mount_id(Path::new("/nonexistent/erofs-fanotify-test")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
