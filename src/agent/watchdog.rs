//! The supervisor's watchdog: tells a worker that has *stopped* from one that
//! is merely slow, without touching the network or the worker.
//!
//! A worker is **stopped** when it owes readers an answer — a permission
//! event is recorded in a journal slot, or the kernel holds events for the
//! group that nobody has read — and one of its two heartbeats in the journal
//! header has not advanced for the bound:
//!
//! * the event loop's, advanced on every turn (at least every 200 ms: the
//!   poll timeout) and while a hand-over waits on purpose;
//! * the async runtime's, advanced every second by a timer task (fetches and
//!   their completions run there).
//!
//! The bound is [`STALL_BOUND`] once the worker has beaten at all since it was
//! started; a resumed worker that has not beaten yet (it is starting: opening
//! the source, making the metadata local) gets [`startup_bound`]. A first
//! worker is never judged before it has beaten: no mount exists before it is
//! ready, and a metadata walk over a slow link may take minutes.
//!
//! A slow network never stops the heartbeats: fetches run beside the event
//! loop and the runtime's timer, each bounded by `fetch_timeout` per request
//! and `retry_timeout` per fetch. SIGSTOP, a deadlock in the event path or a
//! wedged runtime stop them. The supervisor then kills the worker (SIGKILL
//! through its pidfd, which also ends a stopped process) and starts a
//! successor at once, which answers the orphaned events from the journal: a
//! reader waits at most `STALL_BOUND` + a successor's start + one fetch.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use super::journal::{self, Beats, Heartbeat};

/// How long a serving worker's heartbeat may stand still while it owes answers.
pub const STALL_BOUND: Duration = Duration::from_secs(5);

/// How long a resumed worker may take to start beating while it owes answers:
/// one request to open its source, one fetch (with retries) of missing
/// metadata, and local work.
pub fn startup_bound(fetch_timeout: Duration, retry_timeout: Duration) -> Duration {
    fetch_timeout + retry_timeout + Duration::from_secs(15)
}

/// What the watchdog knows about the worker it watches.
#[derive(Debug, Clone)]
pub struct Watch {
    beats: Beats,
    /// When each heartbeat last moved (or when watching began).
    events_moved: Instant,
    runtime_moved: Instant,
    events_seen: bool,
    runtime_seen: bool,
    /// Both heartbeats have moved since watching began.
    beating: bool,
    /// A successor (judged during its start with `startup`).
    resumed: bool,
}

/// Why the watchdog gave up on a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub quiet: Duration,
    pub pending: usize,
    pub queued: bool,
}

impl Watch {
    pub fn new(beats: Beats, now: Instant, resumed: bool) -> Watch {
        Watch { beats, events_moved: now, runtime_moved: now, events_seen: false, runtime_seen: false, beating: false, resumed }
    }

    /// Takes a new reading of the heartbeats.
    pub fn observe(&mut self, beats: Beats, now: Instant) {
        if beats.0 != self.beats.0 {
            self.events_moved = now;
            self.events_seen = true;
        }
        if beats.1 != self.beats.1 {
            self.runtime_moved = now;
            self.runtime_seen = true;
        }
        self.beating = self.events_seen && self.runtime_seen;
        self.beats = beats;
    }

    /// How long the quieter heartbeat has stood still.
    pub fn quiet(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.events_moved.min(self.runtime_moved))
    }

    /// The bound that applies now, if any.
    pub fn bound(&self, startup: Duration) -> Option<Duration> {
        if self.beating {
            Some(STALL_BOUND)
        } else if self.resumed {
            Some(startup)
        } else {
            None
        }
    }

    /// The verdict: `Some` when the worker has stopped (see the module doc).
    /// `owes` is asked only when the heartbeats are quiet for too long.
    pub fn verdict(&self, now: Instant, startup: Duration, owes: impl FnOnce() -> (usize, bool)) -> Option<Stopped> {
        let bound = self.bound(startup)?;
        let quiet = self.quiet(now);
        if quiet < bound {
            return None;
        }
        let (pending, queued) = owes();
        (pending > 0 || queued).then_some(Stopped { quiet, pending, queued })
    }
}

/// The supervisor's read-only view of a worker's journal.
pub struct JournalView<W: AsRef<[AtomicU64]>> {
    heartbeat: Heartbeat<W>,
    slots: W,
}

pub type SharedJournalView = JournalView<crate::sys::shm::SharedWords>;

impl<W: AsRef<[AtomicU64]>> JournalView<W> {
    pub fn new(header: W, slots: W) -> Option<JournalView<W>> {
        Some(JournalView { heartbeat: Heartbeat::reader(header)?, slots })
    }

    pub fn beats(&self) -> Beats {
        self.heartbeat.beats()
    }

    pub fn pending(&self) -> usize {
        journal::pending_slots(self.slots.as_ref())
    }
}

/// Maps the held journal `file` for reading (sizing it as the worker would).
pub fn open_view(file: std::fs::File) -> std::io::Result<SharedJournalView> {
    let map = crate::sys::shm::SharedMap::from_file(file, journal::JOURNAL_LEN)?;
    let (header, _batch, slots) = journal::map(map)?;
    JournalView::new(header, slots).ok_or_else(|| std::io::Error::other("journal header of the wrong size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTUP: Duration = Duration::from_secs(30);

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_beating_worker_is_never_stopped_however_much_it_owes() {
        let t0 = Instant::now();
        let mut w = Watch::new((10, 3), t0, false);
        for i in 1..100u64 {
            // The event loop turns 5 times a second, the runtime once.
            w.observe((10 + 5 * i, 3 + i), at(t0, i as f64));
            assert_eq!(w.verdict(at(t0, i as f64 + 0.9), STARTUP, || (500, true)), None);
        }
    }

    #[test]
    fn a_quiet_worker_is_stopped_only_when_it_owes_answers() {
        let t0 = Instant::now();
        let mut w = Watch::new((0, 0), t0, false);
        w.observe((5, 1), at(t0, 1.0));
        assert!(w.verdict(at(t0, 5.9), STARTUP, || (3, false)).is_none(), "within the bound");
        assert!(w.verdict(at(t0, 7.0), STARTUP, || (0, false)).is_none(), "owes nothing");
        let v = w.verdict(at(t0, 7.0), STARTUP, || (3, false)).expect("stopped");
        assert_eq!((v.pending, v.queued), (3, false));
        assert!(v.quiet >= STALL_BOUND);
        assert!(w.verdict(at(t0, 7.0), STARTUP, || (0, true)).is_some(), "events queued in the kernel count");
    }

    #[test]
    fn one_stuck_heartbeat_is_enough() {
        let t0 = Instant::now();
        let mut w = Watch::new((0, 0), t0, false);
        w.observe((1, 1), at(t0, 0.5));
        // The runtime keeps ticking; the event loop is wedged.
        for i in 1..10u64 {
            w.observe((1, 1 + i), at(t0, 0.5 + i as f64));
        }
        assert!(w.verdict(at(t0, 9.5), STARTUP, || (1, false)).is_some());
    }

    #[test]
    fn first_workers_are_not_judged_before_they_beat_and_successors_get_the_startup_bound() {
        let t0 = Instant::now();
        let first = Watch::new((0, 0), t0, false);
        assert!(first.verdict(at(t0, 3600.0), STARTUP, || (9, true)).is_none());
        let resumed = Watch::new((7, 7), t0, true);
        assert!(resumed.verdict(at(t0, 29.0), STARTUP, || (9, true)).is_none());
        assert!(resumed.verdict(at(t0, 31.0), STARTUP, || (9, true)).is_some());
        // Counters that only one heartbeat moved do not count as beating yet.
        let mut half = Watch::new((7, 7), t0, true);
        half.observe((8, 7), at(t0, 1.0));
        assert_eq!(half.bound(STARTUP), Some(STARTUP));
        half.observe((9, 8), at(t0, 2.0));
        assert_eq!(half.bound(STARTUP), Some(STALL_BOUND));
    }

    #[test]
    fn a_view_reads_what_a_worker_writes() {
        let header: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
        let slots: Vec<AtomicU64> = (0..journal::MAX_ENTRIES * 4).map(|_| AtomicU64::new(0)).collect();
        let opened = journal::open(&header[..], vec![0u8; journal::BATCH_LEN], &slots[..]).unwrap();
        opened.heartbeat.beat_events();
        opened.heartbeat.beat_runtime();
        opened.slots.record(12, None);
        let view = JournalView::new(&header[..], &slots[..]).unwrap();
        assert_eq!(view.beats(), (1, 1));
        assert_eq!(view.pending(), 1);
    }
}
