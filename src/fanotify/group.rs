//! The fanotify group: one descriptor that owns the marks and receives the
//! events.
//!
//! Lifetime matters more than anything else here: when the *last* descriptor
//! of the group closes, the kernel allows every pending event and readers of
//! holes see zeros. The supervisor keeps one descriptor for that reason and
//! a worker inherits another ([`Group::from_owned`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::sys::fanotify as sys;

/// The recommended `read()` buffer: ~340 pre-access events (48 bytes each).
/// Each event read installs one fd in our table, so larger is not better.
pub const READ_BUFFER_SIZE: usize = 16 * 1024;

/// How to answer a permission event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Allow,
    /// Deny; the blocked syscall fails with this errno. Errnos the kernel
    /// does not accept become EIO (see [`Response::to_raw`]).
    Deny(i32),
}

impl Response {
    /// The `response` word of `struct fanotify_response`. A deny errno
    /// outside `{EPERM, EIO, EAGAIN, EBUSY, ETXTBSY, ENOSPC, EDQUOT}` is
    /// replaced by EIO: the kernel would reject the write with EINVAL and the
    /// reader would stay blocked.
    pub fn to_raw(self) -> u32 {
        match self {
            Response::Allow => sys::FAN_ALLOW,
            Response::Deny(errno) if sys::DENY_ERRNOS.contains(&errno) => {
                sys::fan_deny_errno(errno)
            }
            Response::Deny(_) => sys::fan_deny_errno(libc::EIO),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error("fanotify pre-content groups need CAP_SYS_ADMIN in the initial user namespace (run as root)")]
    NotPermitted,
    #[error("kernel lacks fanotify pre-content events (need Linux >= 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")]
    Unsupported,
    #[error("filesystem of {} does not support pre-content marks (tmpfs?); put cache_dir on ext4, xfs or btrfs", path.display())]
    MarkUnsupported { path: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

/// A fanotify group of class `FAN_CLASS_PRE_CONTENT`. `Sync`: reads and
/// responses may come from different threads.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// Creates a non-blocking, close-on-exec pre-content group whose event
    /// fds are opened `O_RDWR` (so the cache can be filled through them
    /// without raising events) and close-on-exec.
    pub fn new_pre_content() -> Result<Group, FanotifyError> {
        let base = libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        let event_f_flags = (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // Only the unlimited queue: a bounded one overflows under load, and an
        // overflow loses permission events' wakeups (readers would hang).
        let fd = sys::fanotify_init(base | libc::FAN_UNLIMITED_QUEUE, event_f_flags).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EPERM) => FanotifyError::NotPermitted,
                Some(libc::EINVAL) | Some(libc::ENOSYS) => FanotifyError::Unsupported,
                _ => FanotifyError::Io {
                    what: "fanotify_init with an unlimited event queue (FAN_UNLIMITED_QUEUE)".into(),
                    source: e,
                },
            }
        })?;
        let group = Group { fd };
        group.probe_pre_access()?;
        Ok(group)
    }

    /// Kernels before 6.14 create pre-content groups but do not know
    /// `FAN_PRE_ACCESS`. Removing a pre-access mark that does not exist
    /// tells them apart without side effects: the mask is validated first
    /// (EINVAL on old kernels), then the missing mark gives ENOENT.
    fn probe_pre_access(&self) -> Result<(), FanotifyError> {
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_INODE;
        match sys::fanotify_mark(self.as_fd(), flags, sys::FAN_PRE_ACCESS, Path::new("/")) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(FanotifyError::Unsupported),
            // ENOENT expected; anything else is not about kernel support.
            _ => Ok(()),
        }
    }

    /// Adopts an inherited group descriptor (e.g. in a worker process).
    pub fn from_owned(fd: OwnedFd) -> Group {
        Group { fd }
    }

    /// Gives up the descriptor (e.g. to hand it to a supervisor's children).
    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }

    /// Another descriptor of the same group (close-on-exec).
    pub fn try_clone(&self) -> io::Result<Group> {
        Ok(Group {
            fd: self.fd.try_clone()?,
        })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Puts an inode mark for `mask` on the file at `path` (adds to an
    /// existing mark's mask). Must happen before the EROFS mount: a later
    /// mark is not seen by an existing superblock.
    pub fn mark_inode(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_INODE;
        sys::fanotify_mark(self.as_fd(), flags, mask, path)
            .map_err(|e| mark_error(e, path, mask, "add"))
    }

    /// Puts (adds to) an inode mark for `mask` on the open file `file`: no path
    /// lookup, so the mark is on exactly the inode we write, whatever a path
    /// names meanwhile.
    pub fn mark_file(&self, file: BorrowedFd<'_>, mask: u64, shown: &Path) -> Result<(), FanotifyError> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_INODE;
        sys::fanotify_mark_fd(self.as_fd(), flags, mask, file).map_err(|e| mark_error(e, shown, mask, "add"))
    }

    /// Removes `mask` from the inode mark on the open file `file`.
    pub fn unmark_file(&self, file: BorrowedFd<'_>, mask: u64, shown: &Path) -> Result<(), FanotifyError> {
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_INODE;
        sys::fanotify_mark_fd(self.as_fd(), flags, mask, file).map_err(|e| mark_error(e, shown, mask, "remove"))
    }

    /// Removes `mask` from the inode mark on `path`. Removing the
    /// pre-access bit before the file is complete makes holes read as zeros.
    pub fn unmark_inode(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_INODE;
        sys::fanotify_mark(self.as_fd(), flags, mask, path)
            .map_err(|e| mark_error(e, path, mask, "remove"))
    }

    /// Reads one batch of events into `buf` (see [`READ_BUFFER_SIZE`]):
    /// the bytes read and the fds the kernel installed for them, owned.
    /// `WouldBlock` when no event is queued; EINTR is retried. Parse the
    /// bytes with `fanotify::event::parse_batch` and settle each event with
    /// `fanotify::classify` / `dispose_malformed`.
    pub fn read_batch(&self, buf: &mut [u8]) -> io::Result<(usize, sys::EventFds<'_>)> {
        loop {
            match sys::read_events(self.as_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Answers the permission event whose fd *number* is `fd`. Works for an
    /// fd opened by another process sharing the group (a predecessor
    /// worker), since the kernel matches the number only.
    pub fn respond(&self, fd: i32, response: Response) -> io::Result<()> {
        sys::write_response(self.as_fd(), fd, response.to_raw())
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Lets `tokio::io::unix::AsyncFd` watch an `Arc<Group>` directly.
impl AsRawFd for Group {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn mark_error(e: io::Error, path: &Path, mask: u64, op: &str) -> FanotifyError {
    match e.raw_os_error() {
        Some(libc::EPERM) => FanotifyError::NotPermitted,
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::ENODEV) => {
            FanotifyError::MarkUnsupported {
                path: path.to_path_buf(),
            }
        }
        // EINVAL for a pre-access mark on a regular file or directory can
        // only mean the kernel does not know the event.
        Some(libc::EINVAL)
            if mask & sys::FAN_PRE_ACCESS != 0
                && std::fs::metadata(path).is_ok_and(|m| m.is_file() || m.is_dir()) =>
        {
            FanotifyError::Unsupported
        }
        _ => FanotifyError::Io {
            what: format!("fanotify mark {op} on {}", path.display()),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_errnos_are_sanitised() {
        assert_eq!(Response::Allow.to_raw(), 0x01);
        assert_eq!(Response::Deny(libc::EIO).to_raw(), 0x02 | (5 << 24));
        assert_eq!(Response::Deny(libc::EPERM).to_raw(), 0x02 | (1 << 24));
        assert_eq!(Response::Deny(libc::ENOSPC).to_raw(), 0x02 | (28 << 24));
        for bad in [libc::ENOENT, libc::EINVAL, 0, -5, 300, libc::EUCLEAN] {
            assert_eq!(
                Response::Deny(bad).to_raw(),
                sys::fan_deny_errno(libc::EIO),
                "errno {bad}"
            );
        }
    }

    #[test]
    fn error_messages() {
        let e = FanotifyError::MarkUnsupported {
            path: "/dev/shm/x".into(),
        };
        assert_eq!(
            e.to_string(),
            "filesystem of /dev/shm/x does not support pre-content marks (tmpfs?); put cache_dir on ext4, xfs or btrfs"
        );
        assert!(FanotifyError::Unsupported.to_string().contains("6.14"));
    }
}
