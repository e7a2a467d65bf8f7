//! Thin wrappers over the Linux system calls the agent needs: the only place
//! with `unsafe`.
//!
//! Each submodule wraps one kernel interface and hands out safe types
//! (`OwnedFd`, `io::Result`, plain structs). No policy lives here: deciding
//! what an errno *means* for the user (e.g. "cache dir is on tmpfs") is left
//! to the callers (`fanotify::group`, `mount`, `agent`). Every `unsafe` block
//! carries a `// SAFETY:` comment.
//!
//! - [`fanotify`]: `fanotify_init`, `fanotify_mark`, reading events and
//!   writing responses; constants the `libc` crate lacks (`FAN_PRE_ACCESS`,
//!   the range info record).
//! - [`mount`]: file-backed EROFS mounts through the new mount API
//!   (fsopen/fsconfig/fsmount/move_mount), `umount2`.
//! - [`statx`]: mount ids (`STATX_MNT_ID_UNIQUE`).
//! - [`process`]: pidfds, process start times, mount namespaces.
//! - [`fs`]: FIEMAP (where a mounted file's data lies in the image), `statfs` magic numbers.
//! - [`shm`]: a shared file mapping (the event journal).
//! - [`zlib`]: a safe inflate stream over libz-rs-sys (prime, dictionary, Z_BLOCK).

pub mod fanotify;
pub mod fs;
pub mod mount;
pub mod process;
pub mod shm;
pub mod statx;
pub mod zlib;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Converts a `-1`-on-error return value into `io::Result`, reading `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`cvt`] for `syscall(2)` and `read(2)`-style `long` results.
fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A path as a NUL-terminated C string; a path containing NUL is rejected
/// (the kernel would silently truncate it).
fn path_to_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path contains a NUL byte: {}", path.display()),
        )
    })
}

/// Test helper: `umount` that retries while EBUSY. Tests in the same binary
/// spawn processes concurrently, and a child between fork and exec briefly
/// holds copies of our (close-on-exec) fds, including files in the mount.
#[cfg(test)]
pub(crate) fn umount_retrying_busy(target: &Path) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match mount::umount(target, false) {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}
