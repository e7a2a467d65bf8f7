//! The I/O loop: read event batches from the group and route them. Kept
//! small on purpose: decisions live in the scheduler and the lifecycle.
//!
//! Batches are read straight into the journal's shared batch area and each
//! permission event gets a journal slot before anything answers it, so a
//! successor can answer what this worker leaves behind (see `journal`).

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cache::CacheFile;
use crate::fanotify::{self, Event, Group};
use crate::sys::fanotify::PERMISSION_EVENTS;
use crate::sys::shm::SharedMap;

use super::journal::Journal;
use super::lifecycle::Lifecycle;
use super::scheduler::Scheduler;
use super::stats::Stats;

pub type SharedJournal = Arc<Mutex<Journal<SharedMap>>>;

pub fn lock_journal(journal: &SharedJournal) -> MutexGuard<'_, Journal<SharedMap>> {
    match journal.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

pub struct EventLoop {
    pub group: Arc<Group>,
    pub cache: Arc<CacheFile>,
    pub scheduler: Arc<Scheduler>,
    pub lifecycle: Arc<Lifecycle>,
    pub stats: Arc<Stats>,
    pub journal: SharedJournal,
    /// Set to stop reading (a live upgrade hands the group to a successor).
    pub stop: Arc<AtomicBool>,
    pub trace: Arc<super::trace::Trace>,
}

impl EventLoop {
    /// Runs on its own thread: the fast path never waits for the async
    /// runtime, and fetches are handed to the scheduler's runtime.
    pub fn run(self) -> io::Result<()> {
        while !self.stop.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(self.group.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            while !self.stop.load(Ordering::SeqCst) {
                let batch = {
                    let mut journal = lock_journal(&self.journal);
                    let n = match self.group.read_batch(journal.batch_for_read()) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    if n == 0 {
                        break;
                    }
                    let parsed = fanotify::parse_batch(journal.batch(n));
                    let slots: Vec<Option<u32>> = parsed
                        .events
                        .iter()
                        .map(|ev| {
                            (ev.mask & PERMISSION_EVENTS != 0 && ev.fd >= 0)
                                .then(|| journal.record(ev.fd, ev.range))
                                .flatten()
                        })
                        .collect();
                    journal.clear_batch();
                    (parsed, slots)
                };
                self.dispatch(batch.0, batch.1);
            }
        }
        Ok(())
    }

    fn dispatch(&self, parsed: fanotify::ParsedBatch, slots: Vec<Option<u32>>) {
        for bad in parsed.malformed {
            tracing::error!(error = %bad.error, "malformed fanotify event");
            fanotify::dispose_malformed(&self.group, bad);
        }
        for (raw, slot) in parsed.events.into_iter().zip(slots) {
            match fanotify::classify(raw, &self.group) {
                Event::Permission(mut event) => {
                    if let Some(slot) = slot {
                        let journal = Arc::clone(&self.journal);
                        event.set_on_answered(move || lock_journal(&journal).answered(slot));
                    }
                    self.on_pre_access(event)
                }
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
        self.trace.record(&range);
        if self.cache.contains(range.clone()) {
            Stats::add(&self.stats.fast_path_events, 1);
            event.allow();
        } else {
            self.scheduler.submit(event, range);
        }
    }
}
