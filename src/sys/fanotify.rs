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

/// The event fds the kernel installed in our table for one `read(2)` of a
/// group, owned from the moment the read returns. Events are matched to their
/// fd by number with [`EventFds::take`]; an fd nobody took is answered
/// `FAN_DENY | EIO` before it is closed (harmless for a notification, and a
/// permission event is never left pending behind a closed fd).
#[derive(Debug)]
pub struct EventFds<'g> {
    group: BorrowedFd<'g>,
    /// Sorted by number; `None` once taken.
    fds: Vec<(i32, Option<OwnedFd>)>,
}

impl EventFds<'_> {
    /// The owned fd with number `n`, once.
    pub fn take(&mut self, n: i32) -> Option<OwnedFd> {
        let i = self.fds.binary_search_by_key(&n, |(number, _)| *number).ok()?;
        self.fds[i].1.take()
    }

    /// Fds not taken yet.
    pub fn remaining(&self) -> usize {
        self.fds.iter().filter(|(_, fd)| fd.is_some()).count()
    }
}

impl Drop for EventFds<'_> {
    fn drop(&mut self) {
        for (number, fd) in self.fds.drain(..) {
            if fd.is_some() {
                let _ = write_response(self.group, number, fan_deny_errno(libc::EIO));
            }
        }
    }
}

/// `read(2)` of a batch of events into `buf`; returns the bytes read and the
/// fds of the events in them. `WouldBlock` when the group is non-blocking and
/// empty; `Interrupted` is returned as is.
pub fn read_events<'g>(group: BorrowedFd<'g>, buf: &mut [u8]) -> io::Result<(usize, EventFds<'g>)> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = cvt_long(unsafe {
        libc::read(group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) as libc::c_long
    })? as usize;
    let mut fds = Vec::new();
    for number in event_fd_numbers(&buf[..n.min(buf.len())]) {
        // SAFETY: the kernel installed `number` in our table for an event of
        // this very read and nothing else knows it yet; `event_fd_numbers`
        // yields each event's fd field once (sorted, deduplicated), walking
        // headers of the known version only.
        fds.push((number, Some(unsafe { OwnedFd::from_raw_fd(number) })));
    }
    Ok((n, EventFds { group, fds }))
}

/// The fd fields of the events in one batch (just the fixed headers; the
/// full parse is `crate::fanotify::event`). Stops at the first header that is
/// not of the known version or whose length does not fit: the rest of the
/// batch cannot be walked (the kernel never writes such batches).
fn event_fd_numbers(batch: &[u8]) -> Vec<i32> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(header) = batch.get(at..at + FAN_EVENT_METADATA_LEN) {
        let event_len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let fd = i32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
        if header[4] != FANOTIFY_METADATA_VERSION || event_len < FAN_EVENT_METADATA_LEN || event_len > batch.len() - at {
            break;
        }
        if fd >= 0 {
            out.push(fd);
        }
        at += event_len;
    }
    out.sort_unstable();
    out.dedup();
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(event_len: u32, vers: u8, fd: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&event_len.to_ne_bytes());
        b.push(vers);
        b.push(0);
        b.extend_from_slice(&(FAN_EVENT_METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&FAN_PRE_ACCESS.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&1i32.to_ne_bytes());
        b.resize(event_len.max(24) as usize, 0);
        b
    }

    #[test]
    fn fd_numbers_of_well_formed_and_broken_batches() {
        let v = FANOTIFY_METADATA_VERSION;
        let mut batch = header(24, v, 7);
        batch.extend(header(48, v, -1));
        batch.extend(header(24, v, 9));
        assert_eq!(event_fd_numbers(&batch), vec![7, 9]);
        // A wrong version or an impossible length ends the walk.
        let mut broken = header(24, v, 7);
        broken.extend(header(24, v + 1, 8));
        broken.extend(header(24, v, 9));
        assert_eq!(event_fd_numbers(&broken), vec![7]);
        let mut long = header(24, v, 7);
        long.extend(header(24, v, 8));
        long[24..28].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(event_fd_numbers(&long), vec![7]);
        assert!(event_fd_numbers(&[1, 2, 3]).is_empty());
    }
}
