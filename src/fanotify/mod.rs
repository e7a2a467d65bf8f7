//! fanotify pre-content events: the hook that lets us fill the cache file
//! before the kernel reads it.
//!
//! Model. The agent puts an *inode mark* (`FAN_PRE_ACCESS | FAN_OPEN |
//! FAN_CLOSE_NOWRITE`) on the sparse cache file before EROFS is mounted
//! from it. When EROFS misses its page cache for a data block, the reading
//! task blocks and the group receives a pre-access event carrying the file
//! range; the agent makes that range present, then answers *allow* (or
//! *deny* with an errno, which the reader gets). OPEN/CLOSE_NOWRITE tell
//! when superblocks start and stop using the file.
//!
//! Each seam lives in its own file:
//! - [`event`]: pure parsing of the bytes one `read()` returns into
//!   [`RawEvent`]s (with their range) and [`Malformed`] leftovers. No
//!   syscalls; fully unit-tested.
//! - [`group`]: the group descriptor: init, inode mark/unmark, read,
//!   respond by fd number, and the typed [`FanotifyError`].
//! - [`response`]: ownership. [`Group::read_batch`] returns the batch's
//!   event fds owned ([`EventFds`]); [`classify`] takes each event's fd; a
//!   [`PermissionEvent`] answers exactly once and denies with EIO if
//!   dropped unanswered, so a reader is never left blocked and never given
//!   zeros; [`dispose_malformed`] settles fds of unparsable events. Nothing
//!   here calls back into the agent.
//!
//! Rules the kernel imposes (see DESIGN.md §3): the mark must precede the
//! mount; only `EPERM, EIO, EAGAIN, EBUSY, ETXTBSY, ENOSPC, EDQUOT` may be
//! used to deny; when the last group fd closes pending events are *allowed*
//! (fail-open), so the group fd must outlive the mounts.

pub mod event;
pub mod group;
pub mod response;

pub use crate::sys::fanotify::{FAN_CLOSE_NOWRITE, FAN_OPEN, FAN_PRE_ACCESS};
pub use event::{parse_batch, EventParseError, FileRange, Malformed, ParsedBatch, RawEvent};
pub use group::{FanotifyError, Group, Response, READ_BUFFER_SIZE};
pub use crate::sys::fanotify::EventFds;
pub use response::{classify, dispose_malformed, Answered, Event, PermissionEvent};

#[cfg(test)]
mod tests {
    //! End to end on the real kernel: mark a cache file, mount EROFS from
    //! it, and serve the events.

    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    #[ignore = "needs root + fanotify pre-content events + EROFS file-backed mounts + mkfs.erofs"]
    fn erofs_reads_through_a_marked_cache_file() {
        let dir = tempfile::Builder::new().prefix("fanotify-e2e").tempdir_in("/var/tmp").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(src.join("blob"), &data).unwrap();
        let image = dir.path().join("image.erofs");
        let out = Command::new("mkfs.erofs").arg(&image).arg(&src).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let group = Arc::new(Group::new_pre_content().unwrap());
        group.mark_inode(&image, FAN_PRE_ACCESS | FAN_OPEN | FAN_CLOSE_NOWRITE).unwrap();

        // Serve events on a thread (allow everything: the file is complete)
        // until the superblock's CLOSE_NOWRITE arrives after the umount.
        let unmounted = Arc::new(AtomicBool::new(false));
        let server = {
            let (group, unmounted) = (Arc::clone(&group), Arc::clone(&unmounted));
            std::thread::spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let (mut ranges, mut notifications) = (Vec::new(), Vec::new());
                let mut buf = vec![0u8; READ_BUFFER_SIZE];
                let deadline = Instant::now() + Duration::from_secs(30);
                let closed = |n: &[u64]| n.iter().any(|m| m & FAN_CLOSE_NOWRITE != 0);
                while !(unmounted.load(Ordering::SeqCst) && closed(&notifications)) && Instant::now() < deadline {
                    let mut fds = [PollFd::new(group.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(50u16));
                    let (n, mut owned) = match group.read_batch(&mut buf) {
                        Ok(read) => read,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("{e}"),
                    };
                    let batch = parse_batch(&buf[..n]);
                    for m in batch.malformed {
                        dispose_malformed(&group, &mut owned, m);
                    }
                    for raw in batch.events {
                        match classify(raw, &mut owned, &group) {
                            Event::Permission(p) => {
                                ranges.extend(p.range());
                                p.allow();
                            }
                            Event::Notification { mask, .. } => notifications.push(mask),
                            Event::Overflow => {}
                        }
                    }
                }
                (ranges, notifications)
            })
        };

        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();
        let mount = crate::sys::mount::mount_erofs_file(&image, &target, Some(512)).unwrap();
        // Lazily unmounts if an assertion fails before the real umount.
        struct Guard<'a>(&'a std::path::Path, bool);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if self.1 {
                    let _ = crate::sys::mount::umount(self.0, true);
                }
            }
        }
        let mut guard = Guard(&target, true);
        let read = std::fs::read(target.join("blob"));
        crate::sys::umount_retrying_busy(&target).unwrap();
        guard.1 = false;
        unmounted.store(true, Ordering::SeqCst);
        let (ranges, notifications) = server.join().unwrap();

        assert_eq!(read.unwrap(), data);
        assert!(!ranges.is_empty(), "data blocks raise pre-access events");
        assert!(ranges.iter().all(|r| r.offset % 4096 == 0), "{ranges:?}");
        assert!(notifications.iter().any(|m| m & FAN_OPEN != 0), "{notifications:?}");
        assert!(notifications.iter().any(|m| m & FAN_CLOSE_NOWRITE != 0), "{notifications:?}");
        assert!(!mount.sysfs_dir().exists(), "superblock gone after umount");
    }
}
