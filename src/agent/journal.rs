//! The event journal: what a worker has read from the group and not yet
//! answered, kept where its successor can find it.
//!
//! When a worker dies, the kernel keeps its pending permission events (the
//! supervisor still holds the group), and a successor may answer them by
//! their original fd number. The journal lives in a shared mapping of a file
//! in the state dir:
//!
//! * the **batch area**: the worker read(2)s the group straight into it, so
//!   events dequeued by a worker that dies before recording them are still
//!   there; it is zeroed once the batch has been recorded;
//! * the **entry table**: one slot per pending permission event (fd number,
//!   range). A slot is freed only after the response was written and before
//!   the event fd is closed, so while a slot names fd N, no newer event of the
//!   same worker can have number N.
//!
//! A successor collects both as orphans, occupies their fd numbers in its own
//! table (so none of its new events can share a number with an orphan),
//! fetches their ranges, and answers them.

use crate::fanotify::event::{parse_batch, FileRange};
use crate::sys::fanotify::PERMISSION_EVENTS;

const MAGIC: &[u8; 8] = b"EFJRNL01";
const HEADER_LEN: usize = 64;
/// Size of one read(2) of the group.
pub const BATCH_LEN: usize = 64 * 1024;
const ENTRY_LEN: usize = 32;
/// Pending permission events tracked at once (one per blocked reader task).
pub const MAX_ENTRIES: usize = 8192;
const ENTRIES_OFF: usize = HEADER_LEN + BATCH_LEN;
/// Bytes of the whole journal.
pub const JOURNAL_LEN: usize = ENTRIES_OFF + MAX_ENTRIES * ENTRY_LEN;

const FREE: u32 = 0;
const PENDING: u32 = 1;
const NO_RANGE: u64 = u64::MAX;

/// Storage of a journal: a shared mapping in the agent, a Vec in tests.
pub trait JournalBytes {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl JournalBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl JournalBytes for crate::sys::shm::SharedMap {
    fn bytes(&self) -> &[u8] {
        crate::sys::shm::SharedMap::bytes(self)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        crate::sys::shm::SharedMap::bytes_mut(self)
    }
}

/// A permission event a dead worker left unanswered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub fd: i32,
    pub range: Option<FileRange>,
    pub slot: u32,
}

pub struct Journal<B: JournalBytes> {
    buf: B,
    free: Vec<u32>,
    /// Bytes of the batch area written by the last read (to zero them).
    batch_used: usize,
}

impl<B: JournalBytes> Journal<B> {
    /// Opens a journal, returning the orphans a previous worker left.
    /// Storage of the wrong size or without the magic starts empty.
    pub fn open(mut buf: B) -> Result<(Journal<B>, Vec<Orphan>), String> {
        if buf.bytes().len() != JOURNAL_LEN {
            return Err(format!("journal is {} bytes, expected {JOURNAL_LEN}", buf.bytes().len()));
        }
        if &buf.bytes()[..8] != MAGIC {
            buf.bytes_mut().fill(0);
            buf.bytes_mut()[..8].copy_from_slice(MAGIC);
        }
        let mut journal = Journal { buf, free: Vec::new(), batch_used: BATCH_LEN };
        let mut orphans = Vec::new();
        for slot in (0..MAX_ENTRIES as u32).rev() {
            match journal.read_entry(slot) {
                Some((fd, range)) => orphans.push(Orphan { fd, range, slot }),
                None => journal.free.push(slot),
            }
        }
        // Events dequeued into the batch area but never recorded.
        let parsed = parse_batch(&journal.buf.bytes()[HEADER_LEN..ENTRIES_OFF]);
        for ev in parsed.events {
            if ev.mask & PERMISSION_EVENTS == 0 || ev.fd < 0 || orphans.iter().any(|o| o.fd == ev.fd) {
                continue;
            }
            if let Some(slot) = journal.record(ev.fd, ev.range) {
                orphans.push(Orphan { fd: ev.fd, range: ev.range, slot });
            }
        }
        journal.clear_batch();
        orphans.sort_by_key(|o| o.slot);
        Ok((journal, orphans))
    }

    fn entry(&self, slot: u32) -> &[u8] {
        let off = ENTRIES_OFF + slot as usize * ENTRY_LEN;
        &self.buf.bytes()[off..off + ENTRY_LEN]
    }

    fn read_entry(&self, slot: u32) -> Option<(i32, Option<FileRange>)> {
        let e = self.entry(slot);
        let word = |i: usize| u64::from_le_bytes(e[i..i + 8].try_into().unwrap_or([0; 8]));
        let state = u32::from_le_bytes(e[0..4].try_into().unwrap_or([0; 4]));
        if state != PENDING {
            return None;
        }
        let fd = i32::from_le_bytes(e[4..8].try_into().unwrap_or([0; 4]));
        if fd < 0 {
            return None;
        }
        let (offset, count) = (word(8), word(16));
        let range = (offset != NO_RANGE).then_some(FileRange { offset, count });
        Some((fd, range))
    }

    /// The batch area, zeroed, for the next read(2) of the group.
    pub fn batch_for_read(&mut self) -> &mut [u8] {
        self.clear_batch();
        &mut self.buf.bytes_mut()[HEADER_LEN..ENTRIES_OFF]
    }

    /// The first `n` bytes read into the batch area.
    pub fn batch(&mut self, n: usize) -> &[u8] {
        self.batch_used = n.min(BATCH_LEN);
        &self.buf.bytes()[HEADER_LEN..HEADER_LEN + self.batch_used]
    }

    /// Forgets the batch once its events are recorded.
    pub fn clear_batch(&mut self) {
        let used = self.batch_used;
        self.buf.bytes_mut()[HEADER_LEN..HEADER_LEN + used].fill(0);
        self.batch_used = 0;
    }

    /// Records a pending permission event; `None` when the table is full
    /// (the event is still served, just not recoverable after a crash).
    pub fn record(&mut self, fd: i32, range: Option<FileRange>) -> Option<u32> {
        let slot = self.free.pop()?;
        let (offset, count) = range.map_or((NO_RANGE, 0), |r| (r.offset, r.count));
        let off = ENTRIES_OFF + slot as usize * ENTRY_LEN;
        let e = &mut self.buf.bytes_mut()[off..off + ENTRY_LEN];
        e[4..8].copy_from_slice(&fd.to_le_bytes());
        e[8..16].copy_from_slice(&offset.to_le_bytes());
        e[16..24].copy_from_slice(&count.to_le_bytes());
        // State last: a torn entry is never PENDING with stale fields.
        e[0..4].copy_from_slice(&PENDING.to_le_bytes());
        Some(slot)
    }

    /// The event of `slot` has been answered (its fd is not closed yet).
    pub fn answered(&mut self, slot: u32) {
        if slot as usize >= MAX_ENTRIES {
            return;
        }
        let off = ENTRIES_OFF + slot as usize * ENTRY_LEN;
        self.buf.bytes_mut()[off..off + 4].copy_from_slice(&FREE.to_le_bytes());
        self.free.push(slot);
    }

    pub fn pending(&self) -> usize {
        MAX_ENTRIES - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (j, orphans) = Journal::open(vec![0u8; JOURNAL_LEN]).unwrap();
        assert!(orphans.is_empty());
        assert_eq!(j.pending(), 0);
        assert!(Journal::open(vec![0u8; 10]).is_err());
    }

    #[test]
    fn recorded_and_unanswered_events_become_orphans() {
        let (mut j, _) = Journal::open(vec![0u8; JOURNAL_LEN]).unwrap();
        let a = j.record(7, Some(FileRange { offset: 4096, count: 8192 })).unwrap();
        let b = j.record(9, None).unwrap();
        let c = j.record(11, Some(FileRange { offset: 0, count: 4096 })).unwrap();
        j.answered(b);
        let (j2, orphans) = Journal::open(j.buf).unwrap();
        assert_eq!(j2.pending(), 2);
        let fds: Vec<i32> = orphans.iter().map(|o| o.fd).collect();
        assert!(fds.contains(&7) && fds.contains(&11) && !fds.contains(&9));
        let seven = orphans.iter().find(|o| o.fd == 7).unwrap();
        assert_eq!(seven.range, Some(FileRange { offset: 4096, count: 8192 }));
        assert!([a, c].contains(&seven.slot));
    }

    #[test]
    fn events_left_in_the_batch_area_become_orphans_once() {
        let (mut j, _) = Journal::open(vec![0u8; JOURNAL_LEN]).unwrap();
        let mut batch = event_bytes(5, crate::sys::fanotify::FAN_PRE_ACCESS, Some((0, 16384)));
        batch.extend(event_bytes(6, libc::FAN_OPEN, None));
        batch.extend(event_bytes(8, crate::sys::fanotify::FAN_PRE_ACCESS, Some((65536, 4096))));
        let area = j.batch_for_read();
        area[..batch.len()].copy_from_slice(&batch);
        // fd 8 was recorded before the crash, fd 5 not yet.
        j.record(8, Some(FileRange { offset: 65536, count: 4096 }));
        let (mut j2, orphans) = Journal::open(j.buf).unwrap();
        let mut fds: Vec<i32> = orphans.iter().map(|o| o.fd).collect();
        fds.sort();
        assert_eq!(fds, vec![5, 8], "notification events are not orphans; no duplicates");
        // The batch area was cleared: a second successor finds the same two, recorded.
        let (_, again) = Journal::open(std::mem::take(&mut j2.buf)).unwrap();
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn a_full_table_refuses_more() {
        let (mut j, _) = Journal::open(vec![0u8; JOURNAL_LEN]).unwrap();
        for i in 0..MAX_ENTRIES {
            assert!(j.record(i as i32 + 3, None).is_some());
        }
        assert!(j.record(1, None).is_none());
        j.answered(0);
        assert!(j.record(1, None).is_some());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let mut buf = vec![0u8; JOURNAL_LEN];
            buf[..8].copy_from_slice(MAGIC);
            for b in buf[8..].iter_mut().step_by(7) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            let _ = Journal::open(buf);
        }
    }
}
