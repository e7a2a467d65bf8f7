//! The I/O loop: read event batches from the group fd and route them.
//! Kept small on purpose: decisions live in the scheduler and lifecycle.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cache::CacheFile;
use crate::fanotify::{self, Event, Group};

use super::lifecycle::Lifecycle;
use super::scheduler::Scheduler;
use super::stats::Stats;

pub struct EventLoop {
    pub group: Arc<Group>,
    pub cache: Arc<CacheFile>,
    pub scheduler: Arc<Scheduler>,
    pub lifecycle: Arc<Lifecycle>,
    pub stats: Arc<Stats>,
}

impl EventLoop {
    /// Runs on its own thread: the fast path never waits for the async
    /// runtime, and fetches are handed to the scheduler's runtime.
    pub fn run(self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds = [PollFd::new(self.group.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            loop {
                match self.group.read_batch(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.dispatch(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn dispatch(&self, batch: &[u8]) {
        let parsed = fanotify::parse_batch(batch);
        for bad in parsed.malformed {
            tracing::error!(error = %bad.error, "malformed fanotify event");
            fanotify::dispose_malformed(&self.group, bad);
        }
        for raw in parsed.events {
            match fanotify::classify(raw, &self.group) {
                Event::Permission(event) => self.on_pre_access(event),
                Event::Notification { mask, .. } => {
                    if mask & libc::FAN_OPEN != 0 {
                        self.lifecycle.on_open();
                    }
                    if mask & (libc::FAN_CLOSE_NOWRITE | libc::FAN_CLOSE_WRITE) != 0 {
                        self.lifecycle.on_close();
                    }
                }
                Event::Overflow => {
                    tracing::warn!("fanotify queue overflowed");
                    self.lifecycle.on_overflow();
                }
            }
        }
    }

    fn on_pre_access(&self, event: fanotify::PermissionEvent) {
        Stats::add(&self.stats.events, 1);
        let size = self.cache.blob_size();
        // Ranges are page aligned and not clipped to EOF; no range means the whole file.
        let range = match event.range() {
            Some(r) => r.offset.min(size)..r.offset.saturating_add(r.count).min(size),
            None => 0..size,
        };
        if self.cache.contains(range.clone()) {
            Stats::add(&self.stats.fast_path_events, 1);
            event.allow();
        } else {
            self.scheduler.submit(event, range);
        }
    }
}
