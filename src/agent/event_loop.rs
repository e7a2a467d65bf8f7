//! The event path, in one place: read a batch of events from the group,
//! journal the permission events, and answer each pre-access event.
//!
//! Fast path (the range is present, the common case with a warm cache): one
//! presence lookup, one response write, a lock-free journal slot release,
//! the close of the event fd. Tracing what readers ask for costs one atomic
//! load unless a trace is being recorded. Everything else goes to the
//! scheduler, which answers through the same [`Pending`] once the range is
//! present (or with EIO).
//!
//! Batches are read straight into the journal's shared batch area and each
//! permission event gets a journal slot before anything answers it, so a
//! successor can answer what this worker leaves behind (see `journal`).

use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cache::CacheFile;
use crate::fanotify::{self, Event, Group, PermissionEvent, Response};
use crate::sys::fanotify::PERMISSION_EVENTS;

use super::journal::{SharedBatch, SharedHeartbeat, SharedSlots};
use super::lifecycle::Lifecycle;
use super::scheduler::{Scheduler, Waiter};
use super::stats::Stats;
use super::trace::Trace;

/// A permission event the agent owes an answer, with its journal slot:
/// answering writes the response, frees the slot, then closes the fd (in
/// that order, see `journal`). Dropped unanswered, it denies with EIO.
pub struct Pending {
    event: Option<PermissionEvent>,
    slot: Option<u32>,
    slots: Arc<SharedSlots>,
}

impl Pending {
    fn answer(&mut self, response: Response) {
        let Some(event) = self.event.take() else { return };
        let (fd, pid) = (event.fd_number(), event.pid());
        let answered = event.respond(response);
        if let Some(slot) = self.slot.take() {
            self.slots.answered(slot);
        }
        if let Err(e) = &answered.result {
            tracing::error!(fd, pid, ?response, "fanotify response failed: {e}");
        }
        drop(answered);
    }
}

impl Waiter for Pending {
    fn allow(mut self) {
        self.answer(Response::Allow);
    }

    fn deny(mut self, errno: i32) {
        self.answer(Response::Deny(errno));
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.event.is_some() {
            tracing::warn!("pending event dropped unanswered; denying with EIO");
            self.answer(Response::Deny(libc::EIO));
        }
    }
}

pub type AgentScheduler = Scheduler<Pending>;

pub struct EventLoop {
    pub group: Arc<Group>,
    pub cache: Arc<CacheFile>,
    pub scheduler: Arc<AgentScheduler>,
    pub lifecycle: Arc<Lifecycle>,
    pub stats: Arc<Stats>,
    pub batch: SharedBatch,
    pub slots: Arc<SharedSlots>,
    /// Beaten on every turn: the supervisor's watchdog tells a stopped worker by it.
    pub heartbeat: Arc<SharedHeartbeat>,
    /// Set to stop reading (a live upgrade hands the group to a successor).
    pub stop: Arc<AtomicBool>,
    pub trace: Arc<Trace>,
}

impl EventLoop {
    /// Runs on its own thread: the fast path never waits for the async
    /// runtime, and fetches are handed to the scheduler's runtime.
    pub fn run(mut self) -> io::Result<()> {
        while !self.stop.load(Ordering::SeqCst) {
            self.heartbeat.beat_events();
            let mut fds = [PollFd::new(self.group.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            while !self.stop.load(Ordering::SeqCst) && self.read_one_batch()? {
                self.heartbeat.beat_events();
            }
        }
        Ok(())
    }

    /// Reads and settles one batch; `false` when the group had nothing.
    fn read_one_batch(&mut self) -> io::Result<bool> {
        let group = Arc::clone(&self.group);
        let (n, mut fds) = match group.read_batch(self.batch.area_for_read()) {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(false);
        }
        let parsed = fanotify::parse_batch(self.batch.read(n));
        let slots: Vec<Option<u32>> = parsed
            .events
            .iter()
            .map(|ev| (ev.mask & PERMISSION_EVENTS != 0 && ev.fd >= 0).then(|| self.slots.record(ev.fd, ev.range)).flatten())
            .collect();
        self.batch.clear();
        for bad in parsed.malformed {
            tracing::error!(error = %bad.error, "malformed fanotify event");
            fanotify::dispose_malformed(&group, &mut fds, bad);
        }
        for (raw, slot) in parsed.events.into_iter().zip(slots) {
            match fanotify::classify(raw, &mut fds, &group) {
                Event::Permission(event) => {
                    let range = self.clamped(&event);
                    let pending = Pending { event: Some(event), slot, slots: Arc::clone(&self.slots) };
                    self.on_pre_access(pending, range);
                }
                Event::Notification { mask, .. } => {
                    if let Some(slot) = slot {
                        self.slots.answered(slot);
                    }
                    if mask & libc::FAN_OPEN != 0 {
                        self.lifecycle.on_open();
                    }
                    if mask & (libc::FAN_CLOSE_NOWRITE | libc::FAN_CLOSE_WRITE) != 0 {
                        self.lifecycle.on_close();
                    }
                }
                Event::Overflow => {
                    tracing::warn!("fanotify queue overflowed");
                    Stats::add(&self.stats.overflows, 1);
                    self.lifecycle.on_overflow();
                }
            }
        }
        Ok(true)
    }

    /// Ranges are page aligned and not clipped to EOF; no range means the whole file.
    fn clamped(&self, event: &PermissionEvent) -> Range<u64> {
        let size = self.cache.blob_size();
        match event.range() {
            Some(r) => r.offset.min(size)..r.end().min(size),
            None => 0..size,
        }
    }

    fn on_pre_access(&self, pending: Pending, range: Range<u64>) {
        Stats::add(&self.stats.events, 1);
        if self.trace.is_recording() {
            self.trace.record(&range);
        }
        if self.cache.contains(range.clone()) {
            Stats::add(&self.stats.fast_path_events, 1);
            pending.allow();
        } else {
            self.scheduler.submit(pending, range);
        }
    }
}
