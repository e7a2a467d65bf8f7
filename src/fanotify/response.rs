//! Ownership of events: who closes each event fd and who answers each
//! permission event.
//!
//! A permission event must be answered exactly once, and its fd closed
//! after the answer (closing first could let the number be reused by a new
//! event before the response names it). [`PermissionEvent`] owns both
//! duties: `allow`/`deny` consume it, and dropping it unanswered denies with
//! EIO. Deny, not allow: allowing a range that was never fetched hands the
//! reader zeros from a hole, and leaving it unanswered blocks the reader
//! forever.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::event::{FileRange, Malformed, RawEvent};
use super::group::{Group, Response};
use crate::sys::fanotify as sys;

/// Runs after the response is written and before the event fd is closed
/// (the journal frees the event's slot there; see `agent::journal`).
pub struct AnswerHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for AnswerHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnswerHook")
    }
}

/// A pending permission event (pre-access, or another `*_PERM` event).
#[derive(Debug)]
pub struct PermissionEvent {
    /// `None` once answered.
    fd: Option<OwnedFd>,
    on_answered: Option<AnswerHook>,
    fd_number: i32,
    group: Arc<Group>,
    mask: u64,
    pid: i32,
    range: Option<FileRange>,
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

    /// Lets the blocked reader proceed. Failures are logged.
    /// Sets what runs between the response and the closing of the fd.
    pub fn set_on_answered(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.on_answered = Some(AnswerHook(Box::new(hook)));
    }

    pub fn allow(self) {
        self.answer_logged(Response::Allow);
    }

    /// Fails the blocked read with `errno` (EIO if the kernel does not
    /// accept that errno). Failures are logged.
    pub fn deny(self, errno: i32) {
        self.answer_logged(Response::Deny(errno));
    }

    /// Answers and reports whether the kernel took the response.
    pub fn respond(mut self, response: Response) -> io::Result<()> {
        self.answer(response)
    }

    fn answer_logged(mut self, response: Response) {
        if let Err(e) = self.answer(response) {
            tracing::error!(
                fd = self.fd_number,
                pid = self.pid,
                ?response,
                "fanotify response failed: {e}"
            );
        }
    }

    /// Writes the response, then closes the fd (in that order, see the
    /// module doc). Idempotent: a second call does nothing.
    fn answer(&mut self, response: Response) -> io::Result<()> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        let result = self.group.respond(fd.as_raw_fd(), response);
        if let Some(AnswerHook(hook)) = self.on_answered.take() {
            hook();
        }
        drop(fd);
        result
    }
}

impl Drop for PermissionEvent {
    fn drop(&mut self) {
        if self.fd.is_some() {
            tracing::warn!(
                fd = self.fd_number,
                pid = self.pid,
                range = ?self.range,
                "permission event dropped unanswered; denying with EIO"
            );
            if let Err(e) = self.answer(Response::Deny(libc::EIO)) {
                tracing::error!(
                    fd = self.fd_number,
                    "denying dropped permission event failed: {e}"
                );
            }
        }
    }
}

/// One event, its fd ownership settled.
#[derive(Debug)]
pub enum Event {
    Permission(PermissionEvent),
    /// A notification (`FAN_OPEN`, `FAN_CLOSE_NOWRITE`, ...); its fd, if
    /// any, is already closed.
    Notification {
        mask: u64,
        pid: i32,
    },
    /// The queue overflowed and events were lost (cannot happen with
    /// `FAN_UNLIMITED_QUEUE`).
    Overflow,
}

/// Takes ownership of `raw.fd` (unless it is `FAN_NOFD`) and sorts the event.
/// Call exactly once per event from `parse_batch`.
pub fn classify(raw: RawEvent, group: &Arc<Group>) -> Event {
    let fd = sys::adopt_event_fd(raw.fd);
    if raw.mask & sys::FAN_Q_OVERFLOW != 0 {
        return Event::Overflow;
    }
    if raw.mask & sys::PERMISSION_EVENTS != 0 {
        if let Some(fd) = fd {
            return Event::Permission(PermissionEvent {
                fd: Some(fd),
                on_answered: None,
                fd_number: raw.fd,
                group: Arc::clone(group),
                mask: raw.mask,
                pid: raw.pid,
                range: raw.range,
            });
        }
        // The kernel always gives permission events an fd; without one
        // there is nothing to answer.
        tracing::warn!(
            mask = raw.mask,
            pid = raw.pid,
            fd = raw.fd,
            "permission event without fd"
        );
    }
    Event::Notification {
        mask: raw.mask,
        pid: raw.pid,
    }
}

/// Settles the fd of an event `parse_batch` could not parse: a permission
/// event (or one whose mask is unknown) is denied with EIO, then the fd is
/// closed. A deny for an fd that is not a pending permission event just
/// fails with ENOENT, so trying is harmless. Call once per [`Malformed`].
pub fn dispose_malformed(group: &Group, malformed: Malformed) {
    tracing::debug!(fd = ?malformed.fd, mask = ?malformed.mask, "disposing of malformed event: {}", malformed.error);
    let Some(fd) = malformed.fd.and_then(sys::adopt_event_fd) else {
        return;
    };
    if malformed
        .mask
        .is_none_or(|mask| mask & sys::PERMISSION_EVENTS != 0)
    {
        match group.respond(fd.as_raw_fd(), Response::Deny(libc::EIO)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => tracing::error!(fd = fd.as_raw_fd(), "denying malformed event failed: {e}"),
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
    use crate::sys::root_or_skip;
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
        let dir = tempfile::Builder::new()
            .prefix("fanotify-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let path = dir.path().join("cache");
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        // Written through an fd opened before the mark: raises no events.
        let mut f = File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let group = Arc::new(Group::new_pre_content().unwrap());
        group.mark_inode(&path, MASK).unwrap();
        Fixture {
            _dir: dir,
            path,
            data,
            group,
        }
    }

    /// Reads events until `pred` picks one, handing notifications to `seen`.
    fn next_permission(group: &Arc<Group>, seen: &mut Vec<u64>) -> PermissionEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; READ_BUFFER_SIZE];
        let mut pending = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "no permission event within 10 s");
            match group.read_batch(&mut buf) {
                Ok(n) => {
                    let batch = parse_batch(&buf[..n]);
                    assert!(batch.malformed.is_empty(), "{:?}", batch.malformed);
                    for raw in batch.events {
                        match classify(raw, group) {
                            Event::Permission(p) => pending.push(p),
                            Event::Notification { mask, .. } => seen.push(mask),
                            Event::Overflow => panic!("overflow"),
                        }
                    }
                    if let Some(p) = pending.pop() {
                        assert!(pending.is_empty(), "one reader, one event at a time");
                        return p;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("read: {e}"),
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
    fn allow_lets_the_read_complete() {
        if !root_or_skip("allow_lets_the_read_complete") {
            return;
        }
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 8192, 4096);
        let mut seen = Vec::new();
        let event = next_permission(&fx.group, &mut seen);
        assert!(event.is_pre_access());
        let range = event.range().expect("pre-access events carry a range");
        assert!(
            range.offset <= 8192 && range.end() >= 8192 + 4096,
            "{range:?}"
        );
        assert!(event.pid() > 0);
        assert!(
            seen.iter().any(|m| m & sys::FAN_OPEN != 0),
            "FAN_OPEN before the read: {seen:?}"
        );
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

    #[test]
    fn deny_fails_the_read_with_eio() {
        if !root_or_skip("deny_fails_the_read_with_eio") {
            return;
        }
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 0, 4096);
        let event = next_permission(&fx.group, &mut Vec::new());
        event.deny(libc::EIO);
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn deny_with_unaccepted_errno_still_unblocks() {
        if !root_or_skip("deny_with_unaccepted_errno_still_unblocks") {
            return;
        }
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 0, 4096);
        let event = next_permission(&fx.group, &mut Vec::new());
        event.respond(Response::Deny(libc::ENOENT)).unwrap();
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn dropped_event_denies_with_eio() {
        if !root_or_skip("dropped_event_denies_with_eio") {
            return;
        }
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 65536, 4096);
        let event = next_permission(&fx.group, &mut Vec::new());
        let number = event.fd_number();
        drop(event);
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        // Answered once: a second response for that number is refused.
        assert!(fx.group.respond(number, Response::Allow).is_err());
    }

    #[test]
    fn respond_by_number_from_another_group_fd() {
        // The successor-worker model: answer with the fd number through a
        // different descriptor of the same group.
        if !root_or_skip("respond_by_number_from_another_group_fd") {
            return;
        }
        let fx = fixture();
        let clone = fx.group.try_clone().unwrap();
        let rx = spawn_reader(&fx.path, 0, 100);
        let event = next_permission(&fx.group, &mut Vec::new());
        clone.respond(event.fd_number(), Response::Allow).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
            fx.data[..100]
        );
        // Already answered: the drop's deny fails quietly (ENOENT, logged).
        drop(event);
    }

    #[test]
    fn malformed_permission_events_are_denied() {
        if !root_or_skip("malformed_permission_events_are_denied") {
            return;
        }
        let fx = fixture();
        let rx = spawn_reader(&fx.path, 0, 4096);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; READ_BUFFER_SIZE];
        loop {
            assert!(Instant::now() < deadline);
            match fx.group.read_batch(&mut buf) {
                Ok(n) => {
                    let batch = parse_batch(&buf[..n]);
                    let mut malformed = batch.malformed;
                    let mut done = false;
                    for raw in batch.events {
                        if raw.mask & sys::FAN_PRE_ACCESS != 0 {
                            // Pretend the parser had choked on it.
                            malformed.push(Malformed {
                                fd: Some(raw.fd),
                                mask: None,
                                error: crate::fanotify::event::EventParseError::DuplicateRange,
                            });
                            done = true;
                        } else {
                            let _ = classify(raw, &fx.group);
                        }
                    }
                    for m in malformed {
                        dispose_malformed(&fx.group, m);
                    }
                    if done {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn unmark_stops_events() {
        if !root_or_skip("unmark_stops_events") {
            return;
        }
        let fx = fixture();
        fx.group.unmark_inode(&fx.path, MASK).unwrap();
        let f = File::open(&fx.path).unwrap();
        let mut b = [0u8; 10];
        f.read_exact_at(&mut b, 0).unwrap();
        let mut buf = vec![0u8; READ_BUFFER_SIZE];
        assert_eq!(
            fx.group.read_batch(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // Removing a mark that no longer exists is an error, not a panic.
        assert!(matches!(
            fx.group.unmark_inode(&fx.path, MASK),
            Err(FanotifyError::Io { .. })
        ));
    }

    #[test]
    fn mark_on_tmpfs_is_unsupported() {
        if !root_or_skip("mark_on_tmpfs_is_unsupported") {
            return;
        }
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let dir = tempfile::Builder::new()
            .prefix("fanotify-tmpfs")
            .tempdir_in("/var/tmp")
            .unwrap();
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("size=1m"),
        )
        .unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = umount2(self.0, MntFlags::MNT_DETACH);
            }
        }
        let _guard = Unmount(dir.path());
        assert!(crate::sys::fs::is_tmpfs(dir.path()).unwrap());
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
