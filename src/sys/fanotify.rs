//! Raw fanotify calls and the constants the `libc` crate lacks.
//!
//! `nix::sys::fanotify` drops the pre-access bit and the range info record,
//! so events are read here as raw bytes and parsed by the pure
//! `crate::fanotify::event`. Layouts (see `include/uapi/linux/fanotify.h`):
//!
//! ```text
//! struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved;
//!                                  u16 metadata_len; u64 mask; s32 fd; s32 pid; }  // 24 bytes
//! struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }          // 4 bytes
//! struct fanotify_event_info_range { hdr; u32 pad; u64 offset; u64 count; }     // 24 bytes
//! struct fanotify_response { s32 fd; u32 response; }
//! ```

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::{cvt, cvt_long, path_to_cstring};

/// Pre-content event: a read of a marked file is about to look at a range
/// (Linux >= 6.14). Missing from `libc`.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// Info record carrying the `{offset, count}` of a pre-content event.
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;

/// Permission events the kernel waits on for a response.
pub const FAN_OPEN_PERM: u64 = libc::FAN_OPEN_PERM;
pub const FAN_ACCESS_PERM: u64 = libc::FAN_ACCESS_PERM;
pub const FAN_OPEN_EXEC_PERM: u64 = libc::FAN_OPEN_EXEC_PERM;
/// Every mask bit that makes an event a permission event (needs a response).
pub const PERMISSION_EVENTS: u64 =
    FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM | FAN_PRE_ACCESS;

pub const FAN_OPEN: u64 = libc::FAN_OPEN;
pub const FAN_CLOSE_NOWRITE: u64 = libc::FAN_CLOSE_NOWRITE;
pub const FAN_Q_OVERFLOW: u64 = libc::FAN_Q_OVERFLOW;
pub const FAN_NOFD: i32 = libc::FAN_NOFD;

pub const FAN_ALLOW: u32 = libc::FAN_ALLOW;
pub const FAN_DENY: u32 = libc::FAN_DENY;

pub const FANOTIFY_METADATA_VERSION: u8 = libc::FANOTIFY_METADATA_VERSION;
/// `sizeof(struct fanotify_event_metadata)`.
pub const FAN_EVENT_METADATA_LEN: usize = 24;
/// `sizeof(struct fanotify_event_info_header)`.
pub const FAN_EVENT_INFO_HEADER_LEN: usize = 4;
/// `sizeof(struct fanotify_event_info_range)`.
pub const FAN_EVENT_INFO_RANGE_LEN: usize = 24;

/// Errnos the kernel accepts in `FAN_DENY_ERRNO()`; any other makes the
/// response write fail with EINVAL and leaves the reader blocked.
pub const DENY_ERRNOS: [i32; 7] = [
    libc::EPERM,
    libc::EIO,
    libc::EAGAIN,
    libc::EBUSY,
    libc::ETXTBSY,
    libc::ENOSPC,
    libc::EDQUOT,
];

/// `FAN_DENY_ERRNO(errno)`: deny, and make the blocked syscall fail with
/// `errno`. Does not check `errno` (see [`DENY_ERRNOS`]).
pub fn fan_deny_errno(errno: i32) -> u32 {
    FAN_DENY | ((errno as u32 & 0xff) << 24)
}

/// `fanotify_init(2)`.
pub fn fanotify_init(flags: u32, event_f_flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = cvt(unsafe { libc::fanotify_init(flags, event_f_flags) })?;
    // SAFETY: on success `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` on `path` (relative paths resolve against the cwd).
pub fn fanotify_mark(group: BorrowedFd, flags: u32, mask: u64, path: &Path) -> io::Result<()> {
    let c_path = path_to_cstring(path)?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the
    // call; `group` is a live descriptor.
    cvt(unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            libc::AT_FDCWD,
            c_path.as_ptr(),
        )
    })?;
    Ok(())
}

/// `fanotify_mark(2)` on the inode behind an open descriptor (`path` NULL,
/// `dirfd` = the file): no path lookup, so no race with renames.
pub fn fanotify_mark_fd(
    group: BorrowedFd,
    flags: u32,
    mask: u64,
    file: BorrowedFd,
) -> io::Result<()> {
    // SAFETY: both descriptors are live; a NULL path is documented to mean
    // "the object `dirfd` refers to".
    cvt(unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            mask,
            file.as_raw_fd(),
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// `read(2)` of a batch of events. `WouldBlock` when the group is
/// non-blocking and empty; `Interrupted` is returned as is.
pub fn read(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = cvt_long(unsafe {
        libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) as libc::c_long
    })?;
    Ok(n as usize)
}

/// Writes one `struct fanotify_response` for the event whose fd number is
/// `fd`. The write is all-or-nothing (8 bytes).
pub fn write_response(group: BorrowedFd, fd: i32, response: u32) -> io::Result<()> {
    let reply = libc::fanotify_response { fd, response };
    let len = std::mem::size_of::<libc::fanotify_response>();
    // SAFETY: `reply` is a plain `repr(C)` struct valid for reads of `len`
    // bytes for the duration of the call.
    let n = cvt_long(unsafe {
        libc::write(
            group.as_raw_fd(),
            (&reply as *const libc::fanotify_response).cast(),
            len,
        ) as libc::c_long
    })?;
    if n as usize != len {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short fanotify response write ({n} of {len} bytes)"),
        ));
    }
    Ok(())
}

/// Takes ownership of an event fd number just read from a fanotify group.
///
/// The kernel installs one descriptor per event in our table when `read()`
/// returns; nobody else owns it. Contract (not checkable here): call this
/// at most once per fd number read, and only for numbers read from a group
/// (never for numbers from elsewhere), or an unrelated descriptor could be
/// closed twice. Negative numbers (`FAN_NOFD`, errors) give `None`.
pub fn adopt_event_fd(fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: per the contract above, `fd` is an open descriptor the kernel
    // installed for this event and no other owner exists.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
