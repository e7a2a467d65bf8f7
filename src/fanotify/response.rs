//! Ownership of events: who closes each event fd and who answers each
//! permission event.
//!
//! A permission event must be answered exactly once, and its fd closed
//! after the answer (closing first could let the number be reused by a new
//! event before the response names it). [`PermissionEvent`] owns both
//! duties: [`PermissionEvent::respond`] writes the answer and hands back the
//! still-open fd as [`Answered`], so the caller can forget the event number
//! wherever it recorded it (the agent's journal) before the fd closes;
//! dropping an event unanswered denies it with EIO. Deny, not allow: allowing
//! a range that was never fetched hands the reader zeros from a hole, and
//! leaving it unanswered blocks the reader forever.
//!
//! This layer calls nothing above it: no hooks, no callbacks into the agent.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::event::{FileRange, Malformed, RawEvent};
use super::group::{Group, Response};
use crate::sys::fanotify::{self as sys, EventFds};

/// A pending permission event (pre-access, or another `*_PERM` event).
#[derive(Debug)]
pub struct PermissionEvent {
    /// `None` once answered.
    fd: Option<OwnedFd>,
    fd_number: i32,
    group: Arc<Group>,
    mask: u64,
    pid: i32,
    range: Option<FileRange>,
}

/// A written response whose event fd is still open: drop it (closing the fd)
/// only after the event number is forgotten everywhere it was recorded.
#[must_use = "dropping closes the event fd"]
#[derive(Debug)]
pub struct Answered {
    /// Whether the kernel took the response.
    pub result: io::Result<()>,
    _fd: Option<OwnedFd>,
}

impl PermissionEvent {
    /// The range a pre-access event is about (page-aligned, not clipped to
    /// the file size).
    pub fn range(&self) -> Option<FileRange> {
        self.range
    }

    /// The process (or thread, with `FAN_REPORT_TID`) that is blocked; 0 if
    /// it is in a pid namespace we cannot see into.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn mask(&self) -> u64 {
        self.mask
    }

    pub fn is_pre_access(&self) -> bool {
        self.mask & sys::FAN_PRE_ACCESS != 0
    }

    /// The event fd number, the key of the response (e.g. to let a
    /// successor answer after this process dies).
    pub fn fd_number(&self) -> i32 {
        self.fd_number
    }

    /// The marked file, opened `O_RDWR` by the kernel for this event. Writes
    /// through it raise no events, so fetched data can be stored with it.
    pub fn file(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    /// Writes the response and returns the fd, still open (see [`Answered`]).
    pub fn respond(mut self, response: Response) -> Answered {
        let fd = self.fd.take();
        let result = match &fd {
            Some(_) => self.group.respond(self.fd_number, response),
            None => Ok(()),
        };
        Answered { result, _fd: fd }
    }

    /// Answers, logs a failure, closes the fd.
    pub fn answer(self, response: Response) {
        let (fd, pid) = (self.fd_number, self.pid);
        if let Err(e) = self.respond(response).result {
            tracing::error!(fd, pid, ?response, "fanotify response failed: {e}");
        }
    }

    /// Lets the blocked reader proceed.
    pub fn allow(self) {
        self.answer(Response::Allow);
    }

    /// Fails the blocked read with `errno` (EIO if the kernel does not
    /// accept that errno).
    pub fn deny(self, errno: i32) {
        self.answer(Response::Deny(errno));
    }
}

impl Drop for PermissionEvent {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            tracing::warn!(fd = self.fd_number, pid = self.pid, range = ?self.range,
                "permission event dropped unanswered; denying with EIO");
            if let Err(e) = self.group.respond(self.fd_number, Response::Deny(libc::EIO)) {
                tracing::error!(fd = self.fd_number, "denying dropped permission event failed: {e}");
            }
            drop(fd);
        }
    }
}

/// One event, its fd ownership settled.
#[derive(Debug)]
pub enum Event {
    Permission(PermissionEvent),
    /// A notification (`FAN_OPEN`, `FAN_CLOSE_NOWRITE`, ...); its fd, if
    /// any, is already closed.
    Notification { mask: u64, pid: i32 },
    /// The queue overflowed and events were lost (cannot happen with
    /// `FAN_UNLIMITED_QUEUE`).
    Overflow,
}

/// Takes `raw`'s fd out of the batch's fds and sorts the event. Call once per
/// event of `parse_batch`.
pub fn classify(raw: RawEvent, fds: &mut EventFds<'_>, group: &Arc<Group>) -> Event {
    let fd = fds.take(raw.fd);
    if raw.mask & sys::FAN_Q_OVERFLOW != 0 {
        return Event::Overflow;
    }
    if raw.mask & sys::PERMISSION_EVENTS != 0 {
        if let Some(fd) = fd {
            return Event::Permission(PermissionEvent {
                fd: Some(fd),
                fd_number: raw.fd,
                group: Arc::clone(group),
                mask: raw.mask,
                pid: raw.pid,
                range: raw.range,
            });
        }
        // The kernel always gives permission events an fd; without one
        // there is nothing to answer.
        tracing::warn!(mask = raw.mask, pid = raw.pid, fd = raw.fd, "permission event without fd");
    }
    Event::Notification { mask: raw.mask, pid: raw.pid }
}

/// Settles the fd of an event `parse_batch` could not parse: a permission
/// event (or one whose mask is unknown) is denied with EIO, then the fd is
/// closed. A deny for an fd that is not a pending permission event just
/// fails with ENOENT, so trying is harmless. Call once per [`Malformed`].
pub fn dispose_malformed(group: &Group, fds: &mut EventFds<'_>, malformed: Malformed) {
    tracing::debug!(fd = ?malformed.fd, mask = ?malformed.mask, "disposing of malformed event: {}", malformed.error);
    let Some((number, fd)) = malformed.fd.and_then(|n| Some((n, fds.take(n)?))) else {
        return;
    };
    if malformed.mask.is_none_or(|mask| mask & sys::PERMISSION_EVENTS != 0) {
        match group.respond(number, Response::Deny(libc::EIO)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::error!(fd = number, "denying malformed event failed: {e}"),
        }
    }
    drop(fd);
}

#[cfg(test)]
mod tests {
    //! Root tests: real groups, real marks on files under /var/tmp (ext4).

    use super::*;
    use crate::fanotify::event::parse_batch;
    use crate::fanotify::group::{FanotifyError, READ_BUFFER_SIZE};
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    const MASK: u64 = sys::FAN_PRE_ACCESS | sys::FAN_OPEN | sys::FAN_CLOSE_NOWRITE;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        data: Vec<u8>,
        group: Arc<Group>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::Builder::new().prefix("fanotify-test").tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("cache");
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        // Written through an fd opened before the mark: raises no events.
        let mut f = File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let group = Arc::new(Group::new_pre_content().unwrap());
        group.mark_inode(&path, MASK).unwrap();
        Fixture { _dir: dir, path, data, group }
    }

    /// Waits (poll(2), bounded) until the group has events.
    fn wait_readable(group: &Group, deadline: Instant) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no event before the deadline");
        let mut fds = [PollFd::new(group.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX));
    }

    /// Reads events until a permission event comes, handing notifications to `seen`.
    /// With `malformed`, the permission event is treated as unparsable and disposed of.
    fn next_permission(group: &Arc<Group>, seen: &mut Vec<u64>, malformed: bool) -> Option<PermissionEvent> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; READ_BUFFER_SIZE];
        loop {
            wait_readable(group, deadline);
            let (n, mut fds) = match group.read_batch(&mut buf) {
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read: {e}"),
            };
            let batch = parse_batch(&buf[..n]);
            assert!(batch.malformed.is_empty(), "{:?}", batch.malformed);
            let mut pending = Vec::new();
            for raw in batch.events {
                if malformed && raw.mask & sys::FAN_PRE_ACCESS != 0 {
                    let bad = Malformed {
                        fd: Some(raw.fd),
                        mask: None,
                        error: crate::fanotify::event::EventParseError::DuplicateRange,
                    };
                    dispose_malformed(group, &mut fds, bad);
                    return None;
                }
                match classify(raw, &mut fds, group) {
                    Event::Permission(p) => pending.push(p),
                    Event::Notification { mask, .. } => seen.push(mask),
                    Event::Overflow => panic!("overflow"),
                }
            }
            assert_eq!(fds.remaining(), 0, "every fd of the batch was taken");
            if let Some(p) = pending.pop() {
                assert!(pending.is_empty(), "one reader, one event at a time");
                return Some(p);
            }
        }
    }

    fn spawn_reader(path: &Path, offset: u64, len: usize) -> mpsc::Receiver<io::Result<Vec<u8>>> {
        let path = path.to_path_buf();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let result = (|| {
                let mut f = File::open(&path)?;
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = vec![0u8; len];
                f.read_exact(&mut buf)?;
                Ok(buf)
            })();
            let _ = tx.send(result);
        });
        rx
    }

    #[test]
    #[ignore = "needs root + fanotify pre-content events (Linux >= 6.14) + ext4 /var/tmp"]
    fn allow_lets_the_read_complete() {
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 8192, 4096);
        let mut seen = Vec::new();
        let event = next_permission(&fx.group, &mut seen, false).unwrap();
        assert!(event.is_pre_access());
        let range = event.range().expect("pre-access events carry a range");
        assert!(range.offset <= 8192 && range.end() >= 8192 + 4096, "{range:?}");
        assert!(event.pid() > 0);
        assert!(seen.iter().any(|m| m & sys::FAN_OPEN != 0), "FAN_OPEN before the read: {seen:?}");
        // The reader is blocked until we answer.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // The event fd reads the file without raising events.
        let file = File::from(event.file().unwrap().try_clone_to_owned().unwrap());
        let mut probe = [0u8; 16];
        file.read_exact_at(&mut probe, 8192).unwrap();
        drop(file);
        assert_eq!(&probe[..], &fx.data[8192..8208]);
        event.allow();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(got, fx.data[8192..8192 + 4096]);
    }

    /// Every way of not allowing fails the read with EIO, and answers once.
    #[test]
    #[ignore = "needs root + fanotify pre-content events (Linux >= 6.14) + ext4 /var/tmp"]
    fn every_refusal_fails_the_read_with_eio() {
        type Refuse = fn(PermissionEvent, &Group);
        let cases: &[(&str, Refuse)] = &[
            ("deny EIO", |e, _| e.deny(libc::EIO)),
            ("deny with an errno the kernel refuses", |e, _| {
                e.respond(Response::Deny(libc::ENOENT)).result.unwrap()
            }),
            ("dropped unanswered", |e, group| {
                let number = e.fd_number();
                drop(e);
                assert!(group.respond(number, Response::Allow).is_err(), "answered once");
            }),
        ];
        for (what, refuse) in cases {
            let fx = fixture();
            let rx = spawn_reader(&fx.path, 65536, 4096);
            let event = next_permission(&fx.group, &mut Vec::new(), false).unwrap();
            refuse(event, &fx.group);
            let err = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{what}");
        }
        // A malformed permission event is denied too.
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 0, 4096);
        assert!(next_permission(&fx.group, &mut Vec::new(), true).is_none());
        let err = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "malformed");
    }

    #[test]
    #[ignore = "needs root + fanotify pre-content events (Linux >= 6.14) + ext4 /var/tmp"]
    fn respond_by_number_from_another_group_fd() {
        // The successor-worker model: answer with the fd number through a
        // different descriptor of the same group.
        let fx = fixture();
        let clone = fx.group.try_clone().unwrap();
        let rx = spawn_reader(&fx.path, 0, 100);
        let event = next_permission(&fx.group, &mut Vec::new(), false).unwrap();
        clone.respond(event.fd_number(), Response::Allow).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(), fx.data[..100]);
        // Already answered: the drop's deny fails quietly (ENOENT, logged).
        drop(event);
    }

    #[test]
    #[ignore = "needs root + fanotify pre-content events (Linux >= 6.14) + ext4 /var/tmp"]
    fn unmark_stops_events() {
        let fx = fixture();
        fx.group.unmark_inode(&fx.path, MASK).unwrap();
        let f = File::open(&fx.path).unwrap();
        let mut b = [0u8; 10];
        f.read_exact_at(&mut b, 0).unwrap();
        let mut buf = vec![0u8; READ_BUFFER_SIZE];
        assert_eq!(fx.group.read_batch(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // Removing a mark that no longer exists is an error, not a panic.
        assert!(matches!(fx.group.unmark_inode(&fx.path, MASK), Err(FanotifyError::Io { .. })));
    }

    #[test]
    #[ignore = "needs root + fanotify pre-content events (Linux >= 6.14) + ext4 /var/tmp"]
    fn mark_on_tmpfs_is_unsupported() {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let dir = tempfile::Builder::new().prefix("fanotify-tmpfs").tempdir_in("/var/tmp").unwrap();
        mount(Some("tmpfs"), dir.path(), Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("size=1m")).unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = umount2(self.0, MntFlags::MNT_DETACH);
            }
        }
        let _guard = Unmount(dir.path());
        let magic = nix::sys::statfs::statfs(dir.path()).unwrap().filesystem_type();
        assert_eq!(magic, nix::sys::statfs::TMPFS_MAGIC);
        let file = dir.path().join("cache");
        std::fs::write(&file, b"x").unwrap();
        let group = Group::new_pre_content().unwrap();
        match group.mark_inode(&file, MASK) {
            Err(FanotifyError::MarkUnsupported { path }) => assert_eq!(path, file),
            other => panic!("expected MarkUnsupported, got {other:?}"),
        }
        // The file itself can be marked for plain notifications.
        group.mark_inode(&file, sys::FAN_OPEN).unwrap();
    }
}
