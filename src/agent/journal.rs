//! The event journal: what a worker has read from the group and not yet
//! answered, kept where its successor can find it.
//!
//! When a worker dies, the kernel keeps its pending permission events (the
//! supervisor still holds the group), and a successor may answer them by
//! their original fd number. The journal lives in a shared mapping of a file
//! in the state dir, in two halves:
//!
//! * the **batch area** ([`Batch`], owned by the event loop thread): the
//!   worker read(2)s the group straight into it, so events dequeued by a
//!   worker that dies before recording them are still there; it is zeroed
//!   once the batch has been recorded;
//! * the **slot table** ([`Slots`], shared, lock-free): one slot of four
//!   64-bit words per pending permission event (state + fd number, range). A
//!   slot is freed only after the response was written and before the event
//!   fd is closed, so while a slot names fd N, no newer event of the same
//!   worker can have number N. Only the event loop thread allocates; any
//!   thread frees (one atomic store), so answering never takes a lock.
//!
//! A successor collects both as orphans, occupies their fd numbers in its own
//! table (so none of its new events can share a number with an orphan),
//! fetches their ranges, and answers them.
//!
//! The **header** (the first 64 bytes, 8 words) holds the magic and the
//! worker's heartbeats ([`Heartbeat`]): one counter the event loop advances on
//! every turn, one the async runtime advances every second, and the wall-clock
//! time of the last turn. The supervisor reads them (and counts pending slots,
//! [`pending_slots`]) to tell a stopped worker from a slow one; an agent that
//! starts after its predecessors all died reads the time to say how long the
//! kernel served holes unchecked.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::fanotify::event::{parse_batch, FileRange};
use crate::sys::fanotify::PERMISSION_EVENTS;

const MAGIC: &[u8; 8] = b"EFJRNL02";
/// The header: 8 words (magic, heartbeats).
pub const HEADER_LEN: usize = 64;
const HEADER_WORDS: usize = HEADER_LEN / 8;
const H_MAGIC: usize = 0;
const H_EVENT_BEATS: usize = 1;
const H_RUNTIME_BEATS: usize = 2;
const H_ALIVE_MS: usize = 3;
/// Size of one read(2) of the group.
pub const BATCH_LEN: usize = 64 * 1024;
/// Bytes before the slot table (header + batch area): where the mapping splits.
pub const SLOTS_OFF: usize = HEADER_LEN + BATCH_LEN;
const SLOT_WORDS: usize = 4;
/// Pending permission events tracked at once (one per blocked reader task).
pub const MAX_ENTRIES: usize = 8192;
/// Bytes of the whole journal.
pub const JOURNAL_LEN: usize = SLOTS_OFF + MAX_ENTRIES * SLOT_WORDS * 8;

/// Word 0 of a slot: `state << 32 | fd as u32`.
const FREE: u64 = 0;
const FILLING: u64 = 1;
const PENDING: u64 = 2;
const NO_RANGE: u64 = u64::MAX;

/// Storage of the batch area: a shared mapping in the agent, a Vec in tests.
pub trait BatchBytes {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl BatchBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl BatchBytes for crate::sys::shm::SharedBytes {
    fn bytes(&self) -> &[u8] {
        crate::sys::shm::SharedBytes::bytes(self)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        crate::sys::shm::SharedBytes::bytes_mut(self)
    }
}

/// A permission event a dead worker left unanswered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub fd: i32,
    pub range: Option<FileRange>,
    pub slot: u32,
}

/// The batch area (the bytes of the last read).
pub struct Batch<B: BatchBytes> {
    buf: B,
    /// Bytes written by the last read (to zero them).
    used: usize,
}

/// The slot table.
pub struct Slots<W: AsRef<[AtomicU64]>> {
    words: W,
    /// Where the next free-slot search starts (allocation is single threaded).
    cursor: AtomicUsize,
    pending: AtomicUsize,
}

/// The header words: heartbeats written by the worker, read by its supervisor.
pub struct Heartbeat<H: AsRef<[AtomicU64]>> {
    words: H,
}

/// The agent's journal parts.
pub type SharedHeartbeat = Heartbeat<crate::sys::shm::SharedWords>;
pub type SharedBatch = Batch<crate::sys::shm::SharedBytes>;
pub type SharedSlots = Slots<crate::sys::shm::SharedWords>;

/// What [`open`] found.
pub struct Opened<H: AsRef<[AtomicU64]>, B: BatchBytes, W: AsRef<[AtomicU64]>> {
    pub heartbeat: Heartbeat<H>,
    pub batch: Batch<B>,
    pub slots: Slots<W>,
    /// Events a previous worker left unanswered.
    pub orphans: Vec<Orphan>,
    /// Wall-clock time (Unix ms) of the previous worker's last event-loop turn; 0 if none.
    pub last_alive_ms: u64,
}

/// Maps a journal file in its three parts (header words, batch bytes, slot
/// words), for [`open`] or, in the supervisor, for reading the heartbeats.
pub fn map(
    map: crate::sys::shm::SharedMap,
) -> std::io::Result<(crate::sys::shm::SharedWords, crate::sys::shm::SharedBytes, crate::sys::shm::SharedWords)> {
    map.split3(HEADER_LEN, SLOTS_OFF)
}

/// Opens a journal in its three parts, returning the orphans a previous
/// worker left. Storage of the wrong size is an error; without the magic it
/// starts empty.
pub fn open<H: AsRef<[AtomicU64]>, B: BatchBytes, W: AsRef<[AtomicU64]>>(
    header: H,
    batch: B,
    words: W,
) -> Result<Opened<H, B, W>, String> {
    if header.as_ref().len() != HEADER_WORDS
        || batch.bytes().len() != BATCH_LEN
        || words.as_ref().len() != MAX_ENTRIES * SLOT_WORDS
    {
        return Err(format!(
            "journal parts are {} words, {} bytes and {} words, expected {HEADER_WORDS}, {BATCH_LEN} and {}",
            header.as_ref().len(),
            batch.bytes().len(),
            words.as_ref().len(),
            MAX_ENTRIES * SLOT_WORDS
        ));
    }
    let heartbeat = Heartbeat { words: header };
    let mut batch = Batch { buf: batch, used: BATCH_LEN };
    let slots = Slots { words, cursor: AtomicUsize::new(0), pending: AtomicUsize::new(0) };
    let magic = u64::from_ne_bytes(*MAGIC);
    if heartbeat.words.as_ref()[H_MAGIC].load(Ordering::Acquire) != magic {
        batch.buf.bytes_mut().fill(0);
        for w in heartbeat.words.as_ref().iter().chain(slots.words.as_ref()) {
            w.store(0, Ordering::Relaxed);
        }
        heartbeat.words.as_ref()[H_MAGIC].store(magic, Ordering::Release);
    }
    let last_alive_ms = heartbeat.words.as_ref()[H_ALIVE_MS].load(Ordering::Relaxed);
    let mut orphans = Vec::new();
    for slot in 0..MAX_ENTRIES as u32 {
        match slots.read(slot) {
            Some((fd, range)) => orphans.push(Orphan { fd, range, slot }),
            None => slots.word(slot, 0).store(FREE, Ordering::Relaxed),
        }
    }
    slots.pending.store(orphans.len(), Ordering::Relaxed);
    // Events dequeued into the batch area but never recorded.
    let parsed = parse_batch(batch.buf.bytes());
    for ev in parsed.events {
        if ev.mask & PERMISSION_EVENTS == 0 || ev.fd < 0 || orphans.iter().any(|o| o.fd == ev.fd) {
            continue;
        }
        if let Some(slot) = slots.record(ev.fd, ev.range) {
            orphans.push(Orphan { fd: ev.fd, range: ev.range, slot });
        }
    }
    batch.clear();
    Ok(Opened { heartbeat, batch, slots, orphans, last_alive_ms })
}

/// Heartbeat counters `(event loop, runtime)` as last written.
pub type Beats = (u64, u64);

impl<H: AsRef<[AtomicU64]>> Heartbeat<H> {
    /// Wraps header words for reading (the supervisor); never writes.
    pub fn reader(words: H) -> Option<Heartbeat<H>> {
        (words.as_ref().len() == HEADER_WORDS).then_some(Heartbeat { words })
    }

    /// The event loop made a turn (or, handing over, waits on purpose).
    pub fn beat_events(&self) {
        let w = self.words.as_ref();
        w[H_EVENT_BEATS].fetch_add(1, Ordering::Relaxed);
        w[H_ALIVE_MS].store(now_unix_ms(), Ordering::Relaxed);
    }

    /// The async runtime ran its timer.
    pub fn beat_runtime(&self) {
        self.words.as_ref()[H_RUNTIME_BEATS].fetch_add(1, Ordering::Relaxed);
    }

    pub fn beats(&self) -> Beats {
        let w = self.words.as_ref();
        (w[H_EVENT_BEATS].load(Ordering::Relaxed), w[H_RUNTIME_BEATS].load(Ordering::Relaxed))
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// Pending permission events recorded in a slot table (read-only: for the
/// supervisor, which never frees or allocates slots).
pub fn pending_slots(words: &[AtomicU64]) -> usize {
    words
        .chunks(SLOT_WORDS)
        .filter(|slot| slot.first().is_some_and(|head| head.load(Ordering::Acquire) >> 32 == PENDING))
        .count()
}

impl<B: BatchBytes> Batch<B> {
    /// The batch area, zeroed, for the next read(2) of the group.
    pub fn area_for_read(&mut self) -> &mut [u8] {
        self.clear();
        self.buf.bytes_mut()
    }

    /// The first `n` bytes read into the batch area.
    pub fn read(&mut self, n: usize) -> &[u8] {
        self.used = n.min(BATCH_LEN);
        &self.buf.bytes()[..self.used]
    }

    /// Forgets the batch once its events are recorded.
    pub fn clear(&mut self) {
        let used = self.used;
        self.buf.bytes_mut()[..used].fill(0);
        self.used = 0;
    }
}

impl<W: AsRef<[AtomicU64]>> Slots<W> {
    fn word(&self, slot: u32, i: usize) -> &AtomicU64 {
        &self.words.as_ref()[slot as usize * SLOT_WORDS + i]
    }

    fn read(&self, slot: u32) -> Option<(i32, Option<FileRange>)> {
        let head = self.word(slot, 0).load(Ordering::Acquire);
        if head >> 32 != PENDING {
            return None;
        }
        let fd = head as u32 as i32;
        if fd < 0 {
            return None;
        }
        let (offset, count) = (self.word(slot, 1).load(Ordering::Relaxed), self.word(slot, 2).load(Ordering::Relaxed));
        Some((fd, (offset != NO_RANGE).then_some(FileRange { offset, count })))
    }

    /// Records a pending permission event; `None` when the table is full
    /// (the event is still served, just not recoverable after a crash).
    /// Called by one thread at a time (the event loop).
    pub fn record(&self, fd: i32, range: Option<FileRange>) -> Option<u32> {
        let start = self.cursor.load(Ordering::Relaxed);
        for i in 0..MAX_ENTRIES {
            let slot = ((start + i) % MAX_ENTRIES) as u32;
            let head = self.word(slot, 0);
            if head.compare_exchange(FREE, FILLING << 32, Ordering::Acquire, Ordering::Relaxed).is_err() {
                continue;
            }
            let (offset, count) = range.map_or((NO_RANGE, 0), |r| (r.offset, r.count));
            self.word(slot, 1).store(offset, Ordering::Relaxed);
            self.word(slot, 2).store(count, Ordering::Relaxed);
            // State last: a successor never sees PENDING with stale fields.
            head.store(PENDING << 32 | u64::from(fd as u32), Ordering::Release);
            self.cursor.store(slot as usize + 1, Ordering::Relaxed);
            self.pending.fetch_add(1, Ordering::Relaxed);
            return Some(slot);
        }
        None
    }

    /// The event of `slot` has been answered (its fd is not closed yet).
    pub fn answered(&self, slot: u32) {
        if slot as usize >= MAX_ENTRIES {
            return;
        }
        if self.word(slot, 0).swap(FREE, Ordering::Release) != FREE {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Words = Vec<AtomicU64>;

    fn words(n: usize) -> Words {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn storage() -> (Words, Vec<u8>, Words) {
        (words(HEADER_WORDS), vec![0u8; BATCH_LEN], words(MAX_ENTRIES * SLOT_WORDS))
    }

    fn open3(parts: (Words, Vec<u8>, Words)) -> Opened<Words, Vec<u8>, Words> {
        open(parts.0, parts.1, parts.2).unwrap()
    }

    fn reopen(o: Opened<Words, Vec<u8>, Words>) -> Opened<Words, Vec<u8>, Words> {
        open3((o.heartbeat.words, o.batch.buf, o.slots.words))
    }

    fn event_bytes(fd: i32, mask: u64, range: Option<(u64, u64)>) -> Vec<u8> {
        let info_len = if range.is_some() { 24 } else { 0 };
        let len = 24 + info_len;
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.push(3); // version
        b.push(0);
        b.extend_from_slice(&24u16.to_le_bytes());
        b.extend_from_slice(&mask.to_le_bytes());
        b.extend_from_slice(&fd.to_le_bytes());
        b.extend_from_slice(&1234i32.to_le_bytes());
        if let Some((offset, count)) = range {
            b.push(6); // FAN_EVENT_INFO_TYPE_RANGE
            b.push(0);
            b.extend_from_slice(&24u16.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
        }
        b
    }

    #[test]
    fn fresh_journal_has_no_orphans() {
        let o = open3(storage());
        assert!(o.orphans.is_empty());
        assert_eq!(o.slots.pending(), 0);
        assert_eq!(o.last_alive_ms, 0);
        assert!(open(words(8), vec![0u8; 10], Vec::<AtomicU64>::new()).is_err());
    }

    #[test]
    fn recorded_and_unanswered_events_become_orphans() {
        let o = open3(storage());
        let slots = &o.slots;
        let a = slots.record(7, Some(FileRange { offset: 4096, count: 8192 })).unwrap();
        let b = slots.record(9, None).unwrap();
        let c = slots.record(11, Some(FileRange { offset: 0, count: 4096 })).unwrap();
        assert_eq!(slots.pending(), 3);
        slots.answered(b);
        slots.answered(b);
        assert_eq!(slots.pending(), 2, "answering twice counts once");
        let o = reopen(o);
        let (slots2, orphans) = (&o.slots, &o.orphans);
        assert_eq!(slots2.pending(), 2);
        let fds: Vec<i32> = orphans.iter().map(|o| o.fd).collect();
        assert!(fds.contains(&7) && fds.contains(&11) && !fds.contains(&9));
        let seven = orphans.iter().find(|o| o.fd == 7).unwrap();
        assert_eq!(seven.range, Some(FileRange { offset: 4096, count: 8192 }));
        assert!([a, c].contains(&seven.slot));
    }

    #[test]
    fn events_left_in_the_batch_area_become_orphans_once() {
        let mut o = open3(storage());
        let mut bytes = event_bytes(5, crate::sys::fanotify::FAN_PRE_ACCESS, Some((0, 16384)));
        bytes.extend(event_bytes(6, libc::FAN_OPEN, None));
        bytes.extend(event_bytes(8, crate::sys::fanotify::FAN_PRE_ACCESS, Some((65536, 4096))));
        let area = o.batch.area_for_read();
        area[..bytes.len()].copy_from_slice(&bytes);
        // fd 8 was recorded before the crash, fd 5 not yet.
        o.slots.record(8, Some(FileRange { offset: 65536, count: 4096 }));
        let o = reopen(o);
        let mut fds: Vec<i32> = o.orphans.iter().map(|o| o.fd).collect();
        fds.sort();
        assert_eq!(fds, vec![5, 8], "notification events are not orphans; no duplicates");
        // The batch area was cleared: a second successor finds the same two, recorded.
        let again = reopen(o);
        assert_eq!(again.orphans.len(), 2);
    }

    #[test]
    fn a_full_table_refuses_more() {
        let o = open3(storage());
        let slots = &o.slots;
        for i in 0..MAX_ENTRIES {
            assert!(slots.record(i as i32 + 3, None).is_some());
        }
        assert!(slots.record(1, None).is_none());
        slots.answered(17);
        assert_eq!(slots.record(1, None), Some(17));
    }

    #[test]
    fn slots_are_freed_from_other_threads() {
        let o = open3(storage());
        let slots = std::sync::Arc::new(o.slots);
        let taken: Vec<u32> = (0..1000).map(|i| slots.record(i + 3, None).unwrap()).collect();
        let freers: Vec<_> = taken
            .chunks(250)
            .map(|part| {
                let (slots, part) = (std::sync::Arc::clone(&slots), part.to_vec());
                std::thread::spawn(move || part.into_iter().for_each(|s| slots.answered(s)))
            })
            .collect();
        for f in freers {
            f.join().unwrap();
        }
        assert_eq!(slots.pending(), 0);
    }

    #[test]
    fn heartbeats_and_pending_slots_are_readable_by_another_party() {
        let o = open3(storage());
        o.heartbeat.beat_events();
        o.heartbeat.beat_events();
        o.heartbeat.beat_runtime();
        assert_eq!(o.heartbeat.beats(), (2, 1));
        let reader = Heartbeat::reader(&o.heartbeat.words[..]).unwrap();
        assert_eq!(reader.beats(), (2, 1));
        assert!(Heartbeat::reader(&o.heartbeat.words[..3]).is_none());
        let a = o.slots.record(7, None).unwrap();
        o.slots.record(9, None).unwrap();
        assert_eq!(pending_slots(&o.slots.words), 2);
        o.slots.answered(a);
        assert_eq!(pending_slots(&o.slots.words), 1);
        // A successor sees when the predecessor was last alive.
        let again = reopen(o);
        assert!(again.last_alive_ms > 1_600_000_000_000, "{}", again.last_alive_ms);
        assert_eq!(again.heartbeat.beats(), (2, 1), "the counters go on across workers");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let (h, mut b, w) = storage();
            h[0].store(u64::from_ne_bytes(*MAGIC), Ordering::Relaxed);
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for x in b.iter_mut().step_by(7) {
                *x = next() as u8;
            }
            for x in w.iter().step_by(3) {
                x.store(next(), Ordering::Relaxed);
            }
            let _ = open(h, b, w);
        }
    }
}
