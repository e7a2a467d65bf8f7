//! The pipelined metadata walk (see the module docs for the model).
//!
//! Each inode is a small state machine (header → inline xattrs → body →
//! directory blocks) that advances as far as the bytes read so far allow and
//! otherwise names the ranges it needs. There is no per-level barrier: the
//! walk runs every task it can, sends the union of what they still need as
//! one batch to the [`MetaReader`], and continues with whatever batch arrives
//! first — a child's inode is asked for as soon as the directory block naming
//! it is in, while other batches are still in flight. A walk then costs about
//! one round trip per directory level plus the inodes of the last one, and
//! few requests: each batch is one (multi-range) request at the reader.
//!
//! Before the walk starts, the first block (superblock, root inode and the
//! records packed after it) is read for a guess: if the regular files found
//! there all keep their data above everything the block names as metadata,
//! the image may keep its metadata in one run below its first data block (as
//! our writer does), and that run is asked for at once, as one range. A wrong
//! guess costs bytes, never correctness: the walk still reads and checks
//! everything, and fetches whatever it finds outside the guessed run.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use super::format::{
    align_up, for_each_dirent, xattr_entry_size, ChunkLayout, ChunkTarget, DataLayout, FileKind,
    IndexBytes, InodeHeader, Superblock, ZIndexLayout, ZMapHeader, COMPACT_INODE_SIZE,
    EXTENDED_INODE_SIZE, INODE_SLOT_SIZE, SUPERBLOCK_OFFSET,
};
use super::{ImageMap, MetaReader, WalkError, WalkLimits, WalkOptions, PAGE_SIZE};
use crate::ranges;

/// Compression and chunk indexes are read through a window of this size, so
/// memory stays bounded whatever the file size.
const INDEX_WINDOW: u64 = 64 * 1024;

/// Per-file data extents kept at most (beyond this, misses fall back to the
/// agent's fetch units).
const MAX_FILE_EXTENTS: usize = 1 << 21;

/// Walks the metadata of the EROFS image behind `reader` (a blob of
/// `image_size` bytes) and classifies its bytes; see [`ImageMap`].
pub fn walk(
    reader: &mut dyn MetaReader,
    image_size: u64,
    limits: &WalkLimits,
) -> Result<ImageMap, WalkError> {
    walk_with(reader, image_size, limits, &WalkOptions::default())
}

/// [`walk`] with options (the contiguous-metadata guess).
pub fn walk_with(
    reader: &mut dyn MetaReader,
    image_size: u64,
    limits: &WalkLimits,
    opts: &WalkOptions,
) -> Result<ImageMap, WalkError> {
    if image_size < SUPERBLOCK_OFFSET + 128 {
        return Err(WalkError::NotErofs);
    }
    let mut io = Io {
        reader,
        image_size,
        covered: RangeSet::default(),
        requested: RangeSet::default(),
        batches: Vec::new(),
        submits: 0,
        round_trips: 0,
        bytes: 0,
        max_bytes: limits.max_meta_bytes,
    };
    // The head: the superblock's block and what follows it, read at once
    // (a source's first request brings it anyway); the guess looks at it.
    let first_len = PAGE_SIZE.min(image_size);
    let head_len = opts.first_read.max(first_len).min(image_size);
    io.fetch_now(0..head_len)?;
    let mut first = io.read(0..first_len)?;
    let sb = Superblock::parse(&first)?;
    let bs = sb.block_size();
    if bs > first_len && image_size >= bs {
        io.fetch_now(0..bs)?;
        first = io.read(0..bs)?;
    }
    sb.verify_checksum(&first)?;
    let first_len = head_len.max(first.len() as u64);
    drop(first);

    let guess = guess_contiguous(&mut io, &sb, image_size, limits, first_len, opts);
    let mut st = State::new(sb, image_size, limits);
    st.walk(&mut io, guess.clone())?;
    Ok(st.finish(&io, guess))
}

// ---------------------------------------------------------------------------
// Byte ranges already prefetched

/// Disjoint, merged ranges keyed by start: O(log n) lookups and inserts, so
/// the cost of a walk does not grow with depth × ranges.
#[derive(Default)]
struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    fn from_ranges(ranges: Vec<Range<u64>>) -> Self {
        let mut set = RangeSet::default();
        for r in ranges::normalize(ranges) {
            set.map.insert(r.start, r.end);
        }
        set
    }

    fn covers(&self, r: &Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        self.map
            .range(..=r.start)
            .next_back()
            .is_some_and(|(_, &end)| end >= r.end)
    }

    /// The parts of `wants` (sorted, merged) that this set does not cover.
    fn missing(&self, wants: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for w in wants {
            let mut pos = w.start;
            if let Some((_, &end)) = self.map.range(..=pos).next_back() {
                pos = pos.max(end);
            }
            if pos >= w.end {
                continue;
            }
            for (&s, &e) in self.map.range(pos..w.end) {
                if s > pos {
                    out.push(pos..s);
                }
                pos = pos.max(e);
            }
            if pos < w.end {
                out.push(pos..w.end);
            }
        }
        out
    }

    /// Adds a range, merging it with the ranges it touches or overlaps
    /// (so that `covers` sees one range across a boundary).
    fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.map.range(start..=end).next() {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }
}

// ---------------------------------------------------------------------------
// Reads through the MetaReader, keeping its contract

/// A batch handed to the reader, until all of it is readable.
struct Batch {
    ranges: Vec<Range<u64>>,
    /// Dependent round trips up to and including this batch.
    round_trip: u32,
}

struct Io<'r> {
    reader: &'r mut dyn MetaReader,
    image_size: u64,
    /// Readable now.
    covered: RangeSet,
    /// Readable or asked for (a superset of `covered`).
    requested: RangeSet,
    /// Asked for, not all readable yet.
    batches: Vec<Batch>,
    submits: u32,
    /// Round trips of the batches that arrived so far (the longest chain).
    round_trips: u32,
    bytes: u64,
    max_bytes: u64,
}

impl Io<'_> {
    fn covers(&self, r: &Range<u64>) -> bool {
        self.covered.covers(r)
    }

    /// The page-aligned parts of `wants` neither readable nor asked for.
    ///
    /// Everything the walker reads is metadata, so the pages around it are
    /// required anyway: rounding out to pages costs nothing and hands the
    /// reader whole pages it can store as they are.
    fn unrequested(&self, wants: Vec<Range<u64>>) -> Vec<Range<u64>> {
        let wants = ranges::align_out(&wants, PAGE_SIZE, self.image_size);
        self.requested.missing(&wants)
    }

    /// Hands `ranges` (sorted, merged, unrequested) to the reader as one
    /// batch; returns what became readable at once.
    fn submit(&mut self, ranges: Vec<Range<u64>>) -> Result<Vec<Range<u64>>, WalkError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        self.bytes = self.bytes.saturating_add(ranges::total_len(&ranges));
        if self.bytes > self.max_bytes {
            return Err(WalkError::LimitExceeded(format!(
                "metadata reads exceed {} bytes",
                self.max_bytes
            )));
        }
        tracing::trace!(ranges = ranges.len(), "erofs walk: submit");
        for r in &ranges {
            self.requested.insert(r.clone());
        }
        self.submits += 1;
        self.batches.push(Batch { ranges: ranges.clone(), round_trip: self.round_trips + 1 });
        let now = self.reader.submit(&ranges)?;
        Ok(self.arrived(now))
    }

    /// Records ranges the reader says are readable; returns them (clamped).
    fn arrived(&mut self, got: Vec<Range<u64>>) -> Vec<Range<u64>> {
        let size = self.image_size;
        let got: Vec<Range<u64>> = got
            .into_iter()
            .map(|r| r.start.min(size)..r.end.min(size))
            .filter(|r| r.start < r.end)
            .collect();
        for r in &got {
            self.covered.insert(r.clone());
            self.requested.insert(r.clone());
        }
        let covered = &self.covered;
        let mut done = 0;
        self.batches.retain(|b| {
            let complete = b.ranges.iter().all(|r| covered.covers(r));
            if complete {
                done = done.max(b.round_trip);
            }
            !complete
        });
        self.round_trips = self.round_trips.max(done);
        got
    }

    fn in_flight(&self) -> bool {
        !self.batches.is_empty()
    }

    /// Waits for the next arrival.
    fn wait(&mut self) -> Result<Vec<Range<u64>>, WalkError> {
        let got = self.reader.wait()?;
        if got.is_empty() {
            return Err(WalkError::Io("internal: the reader delivered nothing".into()));
        }
        Ok(self.arrived(got))
    }

    /// Makes `r` readable now (the superblock).
    fn fetch_now(&mut self, r: Range<u64>) -> Result<(), WalkError> {
        let missing = self.unrequested(vec![r.clone()]);
        self.submit(missing)?;
        while !self.covers(&r) {
            if !self.in_flight() {
                return Err(WalkError::Io("internal: a read was never delivered".into()));
            }
            self.wait()?;
        }
        Ok(())
    }

    fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let r = offset..offset.saturating_add(buf.len() as u64);
        if r.end > self.image_size {
            return Err(WalkError::Corrupt(format!(
                "read {}..{} beyond the image size {}",
                r.start, r.end, self.image_size
            )));
        }
        if !self.covers(&r) {
            return Err(WalkError::Io(format!(
                "internal: read {}..{} outside the prefetched ranges",
                r.start, r.end
            )));
        }
        self.reader.read_at(offset, buf)
    }

    /// Reads a short range (callers bound the length).
    fn read(&mut self, r: Range<u64>) -> Result<Vec<u8>, WalkError> {
        let len = usize::try_from(r.end.saturating_sub(r.start))
            .map_err(|_| WalkError::Corrupt("read length overflows".into()))?;
        let mut buf = vec![0u8; len];
        self.read_into(r.start, &mut buf)?;
        Ok(buf)
    }
}

/// Index bytes read through a sliding window (see [`INDEX_WINDOW`]).
struct WindowSrc<'a, 'r> {
    io: &'a mut Io<'r>,
    region: Range<u64>,
    start: u64,
    buf: Vec<u8>,
}

impl<'a, 'r> WindowSrc<'a, 'r> {
    fn new(io: &'a mut Io<'r>, region: Range<u64>) -> Self {
        WindowSrc {
            io,
            region,
            start: 0,
            buf: Vec::new(),
        }
    }
}

impl IndexBytes for WindowSrc<'_, '_> {
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], WalkError> {
        let end = pos.saturating_add(len as u64);
        if pos < self.region.start || end > self.region.end {
            return Err(WalkError::Corrupt(format!(
                "index read {pos}..{end} outside the index area {}..{}",
                self.region.start, self.region.end
            )));
        }
        let cached_end = self.start + self.buf.len() as u64;
        if !(pos >= self.start && end <= cached_end) {
            // Centre the window on the request: lookups walk both ways.
            let wstart = self.region.start.max(pos.saturating_sub(INDEX_WINDOW / 2));
            let wend = self
                .region
                .end
                .min(wstart.saturating_add(INDEX_WINDOW))
                .max(end);
            self.buf.resize((wend - wstart) as usize, 0);
            self.io.read_into(wstart, &mut self.buf)?;
            self.start = wstart;
        }
        let o = (pos - self.start) as usize;
        self.buf
            .get(o..o + len)
            .ok_or_else(|| WalkError::Corrupt("index window".into()))
    }
}

// ---------------------------------------------------------------------------
// Walk state

struct Seen {
    is_dir: Option<bool>,
    refs: u32,
}

struct State<'l> {
    sb: Superblock,
    bs: u64,
    image_size: u64,
    limits: &'l WalkLimits,
    /// Regular-file data, as the kernel maps it.
    data: Vec<Range<u64>>,
    /// Known metadata, and the data of directories and symlinks.
    meta: Vec<Range<u64>>,
    /// The data of the regular file being mapped (one task step at a time).
    file_pieces: Vec<Range<u64>>,
    /// Each regular file's data, contiguous pieces merged.
    file_extents: Vec<Range<u64>>,
    seen: HashMap<u64, Seen>,
    shared_xattrs: HashSet<u32>,
    new_shared_xattrs: Vec<u32>,
    /// Inodes named by directories read since the last look: (nid, offset, depth).
    new_inodes: Vec<(u64, u64, u32)>,
    inodes: u64,
    directories: u64,
    regular_files: u64,
    symlinks: u64,
    depth: u32,
    other_device_bytes: u64,
}

enum Step {
    Need(Vec<Range<u64>>),
    Done,
}

/// A unit of work of the walk.
enum Job {
    Inode(InodeTask),
    /// A shared xattr entry at this offset, waiting for its header.
    Xattr(u64),
}

/// Jobs waiting for bytes, keyed by the page they wait for.
#[derive(Default)]
struct Parked {
    by_page: BTreeMap<u64, Vec<usize>>,
    count: usize,
}

impl Parked {
    fn park(&mut self, job: usize, page: u64) {
        self.by_page.entry(page).or_default().push(job);
        self.count += 1;
    }

    /// Jobs waiting for a page inside `got`.
    fn wake(&mut self, got: &[Range<u64>], out: &mut Vec<usize>) {
        for r in got {
            let first = r.start - r.start % PAGE_SIZE;
            let pages: Vec<u64> = self.by_page.range(first..r.end).map(|(&p, _)| p).collect();
            for p in pages {
                if let Some(jobs) = self.by_page.remove(&p) {
                    self.count -= jobs.len();
                    out.extend(jobs);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl<'l> State<'l> {
    fn new(sb: Superblock, image_size: u64, limits: &'l WalkLimits) -> Self {
        let bs = sb.block_size();
        State {
            sb,
            bs,
            image_size,
            limits,
            data: Vec::new(),
            meta: Vec::new(),
            file_pieces: Vec::new(),
            file_extents: Vec::new(),
            seen: HashMap::new(),
            shared_xattrs: HashSet::new(),
            new_shared_xattrs: Vec::new(),
            new_inodes: Vec::new(),
            inodes: 0,
            directories: 0,
            regular_files: 0,
            symlinks: 0,
            depth: 0,
            other_device_bytes: 0,
        }
    }

    fn walk(&mut self, io: &mut Io, guess: Option<Range<u64>>) -> Result<(), WalkError> {
        // Block 0 holds the superblock and the compression configs.
        self.meta
            .push(0..self.bs.max(PAGE_SIZE).min(self.image_size));
        if let Some(devt) = self.sb.device_table() {
            self.check_meta(&devt, "device table")?;
            self.meta.push(devt);
        }

        let root = self.sb.root_nid;
        let root_off = self.inode_offset(root, "root")?;
        self.seen.insert(
            root,
            Seen {
                is_dir: None,
                refs: 1,
            },
        );
        let mut jobs: Vec<Option<Job>> = vec![Some(Job::Inode(InodeTask::new(root, root_off, 0)))];
        let packed = self.sb.packed_nid;
        if packed != 0 && packed != root {
            // The packed inode holds fragments (and maybe long xattr prefixes):
            // a regular file read through its own address space.
            let off = self.inode_offset(packed, "packed inode")?;
            self.seen.insert(
                packed,
                Seen {
                    is_dir: None,
                    refs: 1,
                },
            );
            jobs.push(Some(Job::Inode(InodeTask::new(packed, off, 0))));
        }
        let mut runnable: Vec<usize> = (0..jobs.len()).rev().collect();
        let mut free: Vec<usize> = Vec::new();
        let mut parked = Parked::default();
        if let Some(g) = guess {
            let ranges = io.unrequested(vec![g]);
            let now = io.submit(ranges)?;
            parked.wake(&now, &mut runnable);
        }

        loop {
            let mut needs: Vec<Range<u64>> = Vec::new();
            while let Some(i) = runnable.pop() {
                let Some(job) = jobs.get_mut(i).and_then(Option::as_mut) else {
                    continue;
                };
                let step = match job {
                    Job::Inode(task) => {
                        self.file_pieces.clear();
                        let step = task.advance(io, self)?;
                        self.take_file_pieces();
                        step
                    }
                    Job::Xattr(pos) => self.shared_xattr(io, *pos)?,
                };
                match step {
                    Step::Need(rs) => {
                        let first_missing = rs
                            .iter()
                            .find_map(|r| io.covered.missing(std::slice::from_ref(r)).first().map(|m| m.start));
                        let Some(at) = first_missing else {
                            return Err(WalkError::Io("internal: a task needs bytes it has".into()));
                        };
                        parked.park(i, at - at % PAGE_SIZE);
                        needs.extend(rs);
                    }
                    Step::Done => {
                        jobs[i] = None;
                        free.push(i);
                    }
                }
                // What the step found: inodes named by a directory, shared xattrs.
                for (nid, off, depth) in std::mem::take(&mut self.new_inodes) {
                    self.depth = self.depth.max(depth);
                    runnable.push(put(&mut jobs, &mut free, Job::Inode(InodeTask::new(nid, off, depth))));
                }
                for id in std::mem::take(&mut self.new_shared_xattrs) {
                    let pos = self.sb.shared_xattr_offset(id).ok_or_else(|| {
                        WalkError::Corrupt(format!("shared xattr {id}: offset overflows"))
                    })?;
                    self.check_meta(&(pos..pos.saturating_add(4)), &format!("shared xattr {id}"))?;
                    runnable.push(put(&mut jobs, &mut free, Job::Xattr(pos)));
                }
            }
            // Adjacent inode slots and blocks merge: keep the lists short.
            if self.meta.len() > 1 << 16 {
                self.meta = ranges::normalize(std::mem::take(&mut self.meta));
            }
            if self.data.len() > 1 << 16 {
                self.data = ranges::normalize(std::mem::take(&mut self.data));
            }
            let now = io.submit(io.unrequested(needs))?;
            parked.wake(&now, &mut runnable);
            if !runnable.is_empty() {
                continue;
            }
            if parked.is_empty() {
                break;
            }
            if !io.in_flight() {
                return Err(WalkError::Io("internal: walk made no progress".into()));
            }
            let got = io.wait()?;
            parked.wake(&got, &mut runnable);
        }

        if self.seen.get(&root).and_then(|s| s.is_dir) != Some(true) {
            return Err(WalkError::Corrupt(format!(
                "root nid {root} is not a directory"
            )));
        }
        if packed != 0 && packed != root && self.seen.get(&packed).and_then(|s| s.is_dir) == Some(true) {
            return Err(WalkError::Corrupt(format!(
                "packed nid {packed} is a directory"
            )));
        }
        Ok(())
    }

    /// A shared xattr entry: its header says how long it is.
    fn shared_xattr(&mut self, io: &mut Io, pos: u64) -> Result<Step, WalkError> {
        let head = pos..pos + 4;
        if !io.covers(&head) {
            return Ok(Step::Need(vec![head]));
        }
        let h = io.read(head)?;
        let len = xattr_entry_size(&h)
            .ok_or_else(|| WalkError::Corrupt("shared xattr header".into()))?;
        let r = pos..pos.saturating_add(len);
        self.check_meta(&r, "shared xattr entry")?;
        self.meta.push(r);
        Ok(Step::Done)
    }

    /// Keeps the data pieces of the file just mapped as its extents.
    fn take_file_pieces(&mut self) {
        if self.file_pieces.is_empty() || self.file_extents.len() >= MAX_FILE_EXTENTS {
            return;
        }
        let pieces = ranges::normalize(std::mem::take(&mut self.file_pieces));
        let room = MAX_FILE_EXTENTS - self.file_extents.len();
        self.file_extents.extend(pieces.into_iter().take(room));
    }

    fn inode_offset(&self, nid: u64, what: &str) -> Result<u64, WalkError> {
        let off = self
            .sb
            .inode_offset(nid)
            .filter(|off| {
                off.checked_add(INODE_SLOT_SIZE)
                    .is_some_and(|e| e <= self.image_size)
            })
            .ok_or_else(|| {
                WalkError::Corrupt(format!(
                    "{what}: nid {nid} lies outside the image ({} bytes)",
                    self.image_size
                ))
            })?;
        Ok(off)
    }

    fn check_meta(&self, r: &Range<u64>, what: &str) -> Result<(), WalkError> {
        if r.start > r.end || r.end > self.image_size {
            return Err(WalkError::Corrupt(format!(
                "{what} at {}..{} lies outside the image ({} bytes)",
                r.start, r.end, self.image_size
            )));
        }
        Ok(())
    }

    /// Records a parsed inode; rejects a directory reachable twice.
    fn on_inode(&mut self, h: &InodeHeader) -> Result<(), WalkError> {
        let is_dir = h.kind == FileKind::Directory;
        if let Some(seen) = self.seen.get_mut(&h.nid) {
            seen.is_dir = Some(is_dir);
            if is_dir && seen.refs > 1 {
                return Err(cycle(h.nid));
            }
        }
        self.inodes += 1;
        match h.kind {
            FileKind::Directory => self.directories += 1,
            FileKind::Regular => self.regular_files += 1,
            FileKind::Symlink => self.symlinks += 1,
            _ => {}
        }
        Ok(())
    }

    fn add_child(&mut self, nid: u64, depth: u32, parent: u64) -> Result<(), WalkError> {
        let inodes_seen = self.seen.len() as u64;
        let image_size = self.image_size;
        match self.seen.entry(nid) {
            Entry::Occupied(mut e) => {
                let seen = e.get_mut();
                seen.refs = seen.refs.saturating_add(1);
                if seen.is_dir == Some(true) {
                    return Err(cycle(nid));
                }
            }
            Entry::Vacant(v) => {
                if depth > self.limits.max_depth {
                    return Err(WalkError::LimitExceeded(format!(
                        "directory nesting deeper than {}",
                        self.limits.max_depth
                    )));
                }
                if inodes_seen >= self.limits.max_inodes {
                    return Err(WalkError::LimitExceeded(format!(
                        "more than {} inodes",
                        self.limits.max_inodes
                    )));
                }
                let off = self
                    .sb
                    .inode_offset(nid)
                    .filter(|off| {
                        off.checked_add(INODE_SLOT_SIZE)
                            .is_some_and(|e| e <= image_size)
                    })
                    .ok_or_else(|| {
                        WalkError::Corrupt(format!(
                            "directory nid {parent}: entry points to nid {nid} outside the image"
                        ))
                    })?;
                v.insert(Seen {
                    is_dir: None,
                    refs: 1,
                });
                self.new_inodes.push((nid, off, depth));
            }
        }
        Ok(())
    }

    fn add_shared_xattr(&mut self, id: u32) -> Result<(), WalkError> {
        if self.shared_xattrs.insert(id) {
            if self.shared_xattrs.len() as u64 > self.limits.max_shared_xattrs {
                return Err(WalkError::LimitExceeded(format!(
                    "more than {} shared xattrs",
                    self.limits.max_shared_xattrs
                )));
            }
            self.new_shared_xattrs.push(id);
        }
        Ok(())
    }

    /// Records block-mapped data of an inode: regular-file data is lazily
    /// fetchable, anything else is required.
    fn add_data(&mut self, h: &InodeHeader, r: Range<u64>) -> Result<(), WalkError> {
        if r.start >= r.end {
            return Ok(());
        }
        if r.end > self.image_size {
            if self.sb.extra_devices > 0 {
                // A flat multi-device address space: beyond our blob is
                // another device's data, fetched (or not) elsewhere.
                self.other_device_bytes = self
                    .other_device_bytes
                    .saturating_add(r.end - r.start.max(self.image_size));
                if r.start >= self.image_size {
                    return Ok(());
                }
            } else {
                return Err(WalkError::Corrupt(format!(
                    "inode nid {}: data {}..{} lies outside the image ({} bytes)",
                    h.nid, r.start, r.end, self.image_size
                )));
            }
        }
        let r = r.start..r.end.min(self.image_size);
        if h.kind == FileKind::Regular {
            self.file_pieces.push(r.clone());
            self.data.push(r);
        } else {
            self.meta.push(r);
        }
        Ok(())
    }

    fn finish(self, io: &Io, guess: Option<Range<u64>>) -> ImageMap {
        let size = self.image_size;
        let file_extents = file_extents(self.file_extents, size);
        let data = ranges::normalize(self.data);
        // Safety net: never count a byte known to be metadata as data.
        let meta = RangeSet::from_ranges(self.meta);
        let data_only = meta.missing(&data);
        let overlap = ranges::total_len(&data) - ranges::total_len(&data_only);
        if overlap > 0 {
            tracing::warn!(
                bytes = overlap,
                "erofs walk: file data overlaps metadata; treating the overlap as required"
            );
        }
        let required = ranges::align_out(&ranges::complement(&data_only, size), PAGE_SIZE, size);
        let data_extents = ranges::complement(&required, size);
        if self.other_device_bytes > 0 {
            tracing::debug!(
                bytes = self.other_device_bytes,
                "erofs walk: data on extra devices"
            );
        }
        let map = ImageMap {
            block_size: self.bs as u32,
            image_size: size,
            data_extents,
            required,
            inodes: self.inodes,
            directories: self.directories,
            regular_files: self.regular_files,
            symlinks: self.symlinks,
            shared_xattrs: self.shared_xattrs.len() as u64,
            depth: self.depth,
            prefetch_calls: io.submits,
            round_trips: io.round_trips,
            file_extents,
            contiguous_guess: guess.as_ref().map(|g| [g.start, g.end]),
        };
        tracing::info!(
            inodes = map.inodes,
            required_bytes = map.required_bytes(),
            required_ranges = map.required.len(),
            data_bytes = map.data_bytes(),
            batches = map.prefetch_calls,
            round_trips = map.round_trips,
            depth = map.depth,
            contiguous_guess = ?guess,
            "erofs walk: done"
        );
        map
    }
}

/// The guess of a contiguous metadata run (see the module docs): from the
/// first block alone, the regular files found there and what the root
/// directory (and its children in the block) name as metadata. Returns the
/// run to ask for at once, `first_len..E` with `E` the end of the last named
/// metadata, when no data seen starts below `E` and the run is at most
/// `opts.contiguous_guess_max` bytes; the walk checks everything anyway.
fn guess_contiguous(
    io: &mut Io,
    sb: &Superblock,
    image_size: u64,
    limits: &WalkLimits,
    first_len: u64,
    opts: &WalkOptions,
) -> Option<Range<u64>> {
    if opts.contiguous_guess_max == 0 || sb.meta_blkaddr != 0 || first_len >= image_size {
        return None;
    }
    let mut scratch = State::new(sb.clone(), image_size, limits);
    let mut data_start = u64::MAX;
    let mut meta_end = first_len;
    let in_block = |off: u64| off.checked_add(COMPACT_INODE_SIZE).is_some_and(|e| e <= first_len);
    // Runs one inode as far as the first block allows; returns what it needs.
    let mut run = |nid: u64, off: u64, scratch: &mut State, data_start: &mut u64| -> Vec<Range<u64>> {
        scratch.file_pieces.clear();
        let mut task = InodeTask::new(nid, off, 1);
        let needs = match task.advance(io, scratch) {
            Ok(Step::Need(rs)) => rs,
            _ => Vec::new(),
        };
        for p in &scratch.file_pieces {
            if p.start >= first_len {
                *data_start = (*data_start).min(p.start);
            }
        }
        needs
    };
    // The root and its children in the block: what they name is metadata.
    let root_off = sb.inode_offset(sb.root_nid).filter(|&o| in_block(o))?;
    let mut named: Vec<(u64, u64)> = Vec::new();
    for r in run(sb.root_nid, root_off, &mut scratch, &mut data_start) {
        meta_end = meta_end.max(r.end);
    }
    for (nid, off, _) in std::mem::take(&mut scratch.new_inodes) {
        meta_end = meta_end.max(off.saturating_add(INODE_SLOT_SIZE));
        named.push((nid, off));
    }
    for (nid, off) in named.iter().copied().filter(|&(_, o)| in_block(o)) {
        for r in run(nid, off, &mut scratch, &mut data_start) {
            meta_end = meta_end.max(r.end);
        }
        for (_, o, _) in std::mem::take(&mut scratch.new_inodes) {
            meta_end = meta_end.max(o.saturating_add(INODE_SLOT_SIZE));
        }
    }
    // Every other slot of the block, in case it holds a file: data starts only.
    let first_slot = align_up(SUPERBLOCK_OFFSET + sb.sb_size() as u64, INODE_SLOT_SIZE)?;
    let mut off = first_slot;
    while in_block(off) {
        if off != root_off && !named.iter().any(|&(_, o)| o == off) {
            run(off / INODE_SLOT_SIZE, off, &mut scratch, &mut data_start);
            scratch.new_inodes.clear();
        }
        off += INODE_SLOT_SIZE;
    }
    // The run ends where the last named metadata ends (our writer puts the
    // root's directory blocks last in it, so that is all of it); nothing
    // beyond is guessed: the lowest data start seen is not the lowest of all
    // (files whose inodes lie past the first block may have data before it).
    // Data seen below the named metadata: metadata and data interleave, no run.
    // No data in sight and the named end past half the image: not our layout
    // (mkfs.erofs writes the root's directory block late, near the image's
    // end: guessing up to it would fetch most of the data).
    let seen_data = data_start != u64::MAX;
    let end = if meta_end > first_len && meta_end <= data_start && (seen_data || meta_end <= image_size / 2) {
        Some(align_up(meta_end, PAGE_SIZE).unwrap_or(meta_end).min(image_size))
    } else {
        None
    };
    let end = end.unwrap_or(0);
    let plausible = end > first_len && end <= image_size && end - first_len <= opts.contiguous_guess_max;
    tracing::debug!(data_start, meta_end, end, plausible, "erofs walk: contiguous metadata guess");
    plausible.then_some(first_len..end)
}

/// Files' extents for the agent's lookup: page-aligned, sorted by start,
/// overlapping ones (shared blocks) merged, touching ones kept apart.
fn file_extents(mut list: Vec<Range<u64>>, size: u64) -> Vec<Range<u64>> {
    for r in list.iter_mut() {
        let s = r.start - r.start % PAGE_SIZE;
        let e = r.end.saturating_add(PAGE_SIZE - 1) / PAGE_SIZE * PAGE_SIZE;
        *r = s.min(size)..e.min(size);
    }
    list.retain(|r| r.start < r.end);
    list.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(list.len());
    for r in list {
        match out.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Stores a job in a free slot; returns its index.
fn put(jobs: &mut Vec<Option<Job>>, free: &mut Vec<usize>, job: Job) -> usize {
    match free.pop() {
        Some(i) => {
            jobs[i] = Some(job);
            i
        }
        None => {
            jobs.push(Some(job));
            jobs.len() - 1
        }
    }
}

fn cycle(nid: u64) -> WalkError {
    WalkError::Corrupt(format!(
        "directory nid {nid} is reachable twice (directory cycle or hard-linked directory)"
    ))
}

fn with_context(e: WalkError, ctx: &str) -> WalkError {
    match e {
        WalkError::Corrupt(m) => WalkError::Corrupt(format!("{ctx}: {m}")),
        other => other,
    }
}

// ---------------------------------------------------------------------------
// One inode

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Xattrs,
    Body,
    DirBlocks,
    Done,
}

struct InodeTask {
    nid: u64,
    offset: u64,
    depth: u32,
    stage: Stage,
    hdr: Option<InodeHeader>,
    /// Physical pieces of a directory's data, one per logical block, in order.
    dir_blocks: Vec<Range<u64>>,
}

impl InodeTask {
    fn new(nid: u64, offset: u64, depth: u32) -> Self {
        InodeTask {
            nid,
            offset,
            depth,
            stage: Stage::Header,
            hdr: None,
            dir_blocks: Vec::new(),
        }
    }


    fn header(&self) -> Result<InodeHeader, WalkError> {
        self.hdr
            .clone()
            .ok_or_else(|| WalkError::Io("internal: inode header missing".into()))
    }

    fn advance(&mut self, io: &mut Io, st: &mut State) -> Result<Step, WalkError> {
        loop {
            match self.stage {
                Stage::Header => {
                    // A compact inode may end a metadata block right before a
                    // data block: read 64 bytes only if the inode is extended.
                    let compact = self.offset..self.offset + COMPACT_INODE_SIZE;
                    if !io.covers(&compact) {
                        return Ok(Step::Need(vec![compact]));
                    }
                    let mut buf = io.read(compact)?;
                    if buf.first().is_some_and(|f| f & 1 != 0) {
                        let extended = self.offset..self.offset.saturating_add(EXTENDED_INODE_SIZE);
                        st.check_meta(&extended, &format!("inode nid {}", self.nid))?;
                        if !io.covers(&extended) {
                            return Ok(Step::Need(vec![extended]));
                        }
                        buf = io.read(extended)?;
                    }
                    let h = InodeHeader::parse(self.nid, self.offset, &buf)?;
                    st.on_inode(&h)?;
                    self.hdr = Some(h);
                    self.stage = Stage::Xattrs;
                }
                Stage::Xattrs => {
                    if let Some(need) = self.xattrs(io, st)? {
                        return Ok(Step::Need(need));
                    }
                    self.stage = Stage::Body;
                }
                Stage::Body => {
                    if let Some(need) = self.body(io, st)? {
                        return Ok(Step::Need(need));
                    }
                }
                Stage::DirBlocks => {
                    let missing: Vec<Range<u64>> = self
                        .dir_blocks
                        .iter()
                        .filter(|r| !io.covers(r))
                        .cloned()
                        .collect();
                    if !missing.is_empty() {
                        return Ok(Step::Need(missing));
                    }
                    self.read_dirents(io, st)?;
                    self.stage = Stage::Done;
                }
                Stage::Done => return Ok(Step::Done),
            }
        }
    }

    /// Reads the shared xattr ids of the inline xattr body.
    fn xattrs(
        &mut self,
        io: &mut Io,
        st: &mut State,
    ) -> Result<Option<Vec<Range<u64>>>, WalkError> {
        let h = self.header()?;
        if h.xattr_icount == 0 {
            return Ok(None);
        }
        let body_end = h.body_end().ok_or_else(|| overflow(h.nid))?;
        let whole = self.offset..body_end;
        st.check_meta(&whole, &format!("inode nid {}", h.nid))?;
        let xstart = self.offset + h.inode_size();
        let head = xstart..xstart + 12;
        if !io.covers(&head) {
            return Ok(Some(vec![whole]));
        }
        let hb = io.read(head)?;
        let shared = u64::from(hb.get(4).copied().unwrap_or(0));
        let ids = xstart + 12..xstart + 12 + 4 * shared;
        if ids.end > body_end {
            return Err(WalkError::Corrupt(format!(
                "inode nid {}: {shared} shared xattrs do not fit its xattr body",
                h.nid
            )));
        }
        if !io.covers(&ids) {
            return Ok(Some(vec![whole]));
        }
        let idb = io.read(ids)?;
        for c in idb.chunks_exact(4) {
            let id = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            st.add_shared_xattr(id)?;
        }
        Ok(None)
    }

    /// Maps the inode's data; sets the next stage or returns what it needs.
    fn body(&mut self, io: &mut Io, st: &mut State) -> Result<Option<Vec<Range<u64>>>, WalkError> {
        let h = self.header()?;
        let nid = h.nid;
        let bs = st.bs;
        let body_end = h.body_end().ok_or_else(|| overflow(nid))?;
        let what = format!("inode nid {nid}");
        st.check_meta(&(self.offset..body_end), &what)?;
        let is_dir = h.kind == FileKind::Directory;
        if is_dir && h.size > st.limits.max_dir_size {
            return Err(WalkError::LimitExceeded(format!(
                "directory nid {nid} is {} bytes (limit {})",
                h.size, st.limits.max_dir_size
            )));
        }
        if !matches!(
            h.kind,
            FileKind::Regular | FileKind::Directory | FileKind::Symlink
        ) {
            // Devices, fifos and sockets have no data; i_u is rdev.
            st.meta.push(self.offset..body_end);
            self.stage = Stage::Done;
            return Ok(None);
        }
        match h.layout {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                let nblocks = h.blocks(st.sb.blkszbits);
                let inline = h.layout == DataLayout::FlatInline;
                let (whole, tail_len) = if inline && nblocks > 0 {
                    (nblocks - 1, h.size - (nblocks - 1) * bs)
                } else if inline {
                    (0, 0)
                } else {
                    (nblocks, 0)
                };
                let meta_end = body_end
                    .checked_add(tail_len)
                    .ok_or_else(|| overflow(nid))?;
                st.check_meta(&(self.offset..meta_end), &what)?;
                st.meta.push(self.offset..meta_end);
                let blocks = if whole == 0 {
                    None
                } else if let Some(startblk) = h.flat_startblk() {
                    let start = startblk.checked_mul(bs).ok_or_else(|| overflow(nid))?;
                    let end = whole
                        .checked_mul(bs)
                        .and_then(|l| start.checked_add(l))
                        .ok_or_else(|| overflow(nid))?;
                    Some(start..end)
                } else {
                    None
                };
                if is_dir {
                    let Some(blocks) =
                        blocks
                            .clone()
                            .or(if whole == 0 { Some(0..0) } else { None })
                    else {
                        return Err(WalkError::Corrupt(format!(
                            "directory nid {nid} has no data blocks"
                        )));
                    };
                    if blocks.end > st.image_size {
                        return Err(WalkError::Corrupt(format!(
                            "directory nid {nid}: blocks {}..{} lie outside the image",
                            blocks.start, blocks.end
                        )));
                    }
                    let mut pieces = Vec::new();
                    let mut logical = 0u64;
                    let mut pos = blocks.start;
                    while pos < blocks.end {
                        let len = bs.min(h.size - logical);
                        pieces.push(pos..pos + len);
                        pos += bs;
                        logical += bs;
                    }
                    if tail_len > 0 {
                        pieces.push(body_end..meta_end);
                    }
                    self.dir_blocks = pieces;
                    self.stage = Stage::DirBlocks;
                } else {
                    if let Some(b) = blocks {
                        st.add_data(&h, b)?;
                    }
                    self.stage = Stage::Done;
                }
                Ok(None)
            }
            DataLayout::ChunkBased => self.chunked(io, st, &h),
            DataLayout::CompressedFull | DataLayout::CompressedCompact => {
                self.compressed(io, st, &h, body_end)
            }
        }
    }

    fn chunked(
        &mut self,
        io: &mut Io,
        st: &mut State,
        h: &InodeHeader,
    ) -> Result<Option<Vec<Range<u64>>>, WalkError> {
        let nid = h.nid;
        let bs = st.bs;
        let layout = ChunkLayout::new(h, st.sb.blkszbits)?;
        let index_bytes = layout.index_bytes().ok_or_else(|| overflow(nid))?;
        if index_bytes > st.limits.max_index_bytes {
            return Err(WalkError::LimitExceeded(format!(
                "inode nid {nid}: {index_bytes} bytes of chunk indexes"
            )));
        }
        let index_end = layout
            .start
            .checked_add(index_bytes)
            .ok_or_else(|| overflow(nid))?;
        let whole = self.offset..index_end;
        st.check_meta(&whole, &format!("inode nid {nid} chunk indexes"))?;
        if !io.covers(&whole) {
            return Ok(Some(vec![whole]));
        }
        st.meta.push(whole);

        let is_dir = h.kind == FileKind::Directory;
        let chunk_size = layout.chunk_size();
        let mask = st.sb.device_id_mask();
        let per_window = (INDEX_WINDOW / layout.unit).max(1);
        let mut pieces: Vec<Range<u64>> = Vec::new();
        let mut chunk = 0u64;
        while chunk < layout.nchunks {
            let n = per_window.min(layout.nchunks - chunk);
            let pos = layout.start + chunk * layout.unit;
            let buf = io.read(pos..pos + n * layout.unit)?;
            for (k, entry) in buf.chunks_exact(layout.unit as usize).enumerate() {
                let i = chunk + k as u64;
                let logical = i * chunk_size;
                // The last chunk ends at the block holding EOF.
                let len = chunk_size.min((h.size - logical).div_ceil(bs) * bs);
                let target = layout.decode(entry, mask).ok_or_else(|| {
                    WalkError::Corrupt(format!("inode nid {nid}: chunk index {i}"))
                })?;
                match target {
                    ChunkTarget::Primary(blk) => {
                        let start = blk.checked_mul(bs).ok_or_else(|| overflow(nid))?;
                        let end = start.checked_add(len).ok_or_else(|| overflow(nid))?;
                        if is_dir {
                            if end > st.image_size {
                                return Err(WalkError::Corrupt(format!(
                                    "directory nid {nid}: chunk {i} lies outside the image"
                                )));
                            }
                            let mut off = 0;
                            while off < len {
                                let piece = bs.min(h.size - (logical + off));
                                pieces.push(start + off..start + off + piece);
                                off += bs;
                            }
                        } else {
                            st.add_data(h, start..end)?;
                        }
                    }
                    ChunkTarget::Hole if is_dir => {
                        return Err(WalkError::Corrupt(format!(
                            "directory nid {nid}: chunk {i} is a hole"
                        )));
                    }
                    ChunkTarget::Hole => {}
                    ChunkTarget::OtherDevice { device, .. } if is_dir => {
                        return Err(WalkError::Unsupported(format!(
                            "directory nid {nid}: data on extra device {device}"
                        )));
                    }
                    ChunkTarget::OtherDevice { .. } => {
                        st.other_device_bytes = st.other_device_bytes.saturating_add(len);
                    }
                }
            }
            chunk += n;
        }
        if is_dir {
            self.dir_blocks = pieces;
            self.stage = Stage::DirBlocks;
        } else {
            self.stage = Stage::Done;
        }
        Ok(None)
    }

    fn compressed(
        &mut self,
        io: &mut Io,
        st: &mut State,
        h: &InodeHeader,
        body_end: u64,
    ) -> Result<Option<Vec<Range<u64>>>, WalkError> {
        let nid = h.nid;
        if h.kind == FileKind::Directory {
            return Err(WalkError::Unsupported(format!(
                "directory nid {nid} is compressed (directory decompression is not implemented)"
            )));
        }
        if h.size == 0 {
            st.meta.push(self.offset..body_end);
            self.stage = Stage::Done;
            return Ok(None);
        }
        let header_pos = align_up(body_end, 8).ok_or_else(|| overflow(nid))?;
        let header = self.offset..header_pos + 8;
        st.check_meta(&header, &format!("inode nid {nid} compression header"))?;
        if h.kind == FileKind::Symlink {
            // Symlink data is required whatever its pclusters are.
            st.meta.push(header);
            self.stage = Stage::Done;
            return Ok(None);
        }
        if !io.covers(&header) {
            return Ok(Some(vec![header]));
        }
        let hb = io.read(header_pos..header_pos + 8)?;
        let zh = ZMapHeader::parse(&hb)
            .ok_or_else(|| WalkError::Corrupt(format!("inode nid {nid}: map header")))?;
        if zh.whole_fragment {
            // The whole file lives in the packed inode.
            st.meta.push(header);
            self.stage = Stage::Done;
            return Ok(None);
        }
        if h.layout == DataLayout::CompressedFull
            && zh.advise & super::format::zadvise::EXTENTS != 0
        {
            // Extent-based compressed files (erofs-utils 1.9+): not decoded;
            // their data stays required, which is safe.
            tracing::warn!(
                nid,
                "erofs walk: extent-based compressed file; its data will be fetched eagerly"
            );
            st.meta.push(header);
            self.stage = Stage::Done;
            return Ok(None);
        }
        let layout = ZIndexLayout::new(h, header_pos, &zh, st.sb.blkszbits)?;
        let index_bytes = layout.index_end() - header_pos;
        if index_bytes > st.limits.max_index_bytes {
            return Err(WalkError::LimitExceeded(format!(
                "inode nid {nid}: {index_bytes} bytes of compression indexes"
            )));
        }
        let ztailpacking =
            zh.advise & super::format::zadvise::INLINE_PCLUSTER != 0 && zh.idata_size > 0;
        let fragment = zh.advise & super::format::zadvise::FRAGMENT_PCLUSTER != 0;
        let mut meta_end = layout.index_end();
        if ztailpacking {
            let last_lcn = layout.nlclusters.saturating_sub(1);
            let inline_start = layout.next_pack_off(last_lcn)?;
            let inline_end = inline_start
                .checked_add(u64::from(zh.idata_size))
                .ok_or_else(|| overflow(nid))?;
            meta_end = meta_end.max(inline_end);
        }
        let whole = self.offset..meta_end;
        st.check_meta(&whole, &format!("inode nid {nid} compression indexes"))?;
        if !io.covers(&whole) {
            return Ok(Some(vec![whole]));
        }
        st.meta.push(whole);

        let index_region = header_pos + 8..layout.index_end();
        let mut src = WindowSrc::new(io, index_region);
        let tail = if ztailpacking || fragment {
            Some(
                layout
                    .tail_head(&mut src)
                    .map_err(|e| with_context(e, "tail extent"))?,
            )
        } else {
            None
        };
        let mut pieces = Vec::new();
        if !(fragment && tail == Some(0)) {
            layout.pclusters(&mut src, tail, &mut pieces)?;
        }
        for p in pieces {
            st.add_data(h, p)?;
        }
        self.stage = Stage::Done;
        Ok(None)
    }

    fn read_dirents(&mut self, io: &mut Io, st: &mut State) -> Result<(), WalkError> {
        let nid = self.nid;
        let child_depth = self.depth.saturating_add(1);
        let blocks = std::mem::take(&mut self.dir_blocks);
        for (i, piece) in blocks.into_iter().enumerate() {
            if piece.end - piece.start > st.bs {
                return Err(WalkError::Io(
                    "internal: directory piece larger than a block".into(),
                ));
            }
            st.meta.push(piece.clone());
            let buf = io.read(piece)?;
            let mut children = Vec::new();
            for_each_dirent(&buf, |d| {
                if !d.is_dot_or_dotdot() {
                    children.push(d.nid);
                }
                Ok(())
            })
            .map_err(|e| with_context(e, &format!("directory nid {nid} block {i}")))?;
            for child in children {
                st.add_child(child, child_depth, nid)?;
            }
        }
        Ok(())
    }
}

fn overflow(nid: u64) -> WalkError {
    WalkError::Corrupt(format!("inode nid {nid}: offset arithmetic overflows"))
}

#[cfg(test)]
mod range_set_tests {
    use super::RangeSet;

    #[test]
    fn insert_merges_and_missing_subtracts() {
        let mut set = RangeSet::default();
        for r in [10..20, 30..40, 20..25, 50..60, 24..31] {
            set.insert(r);
        }
        assert_eq!(
            set.map.iter().map(|(&s, &e)| s..e).collect::<Vec<_>>(),
            vec![10..40, 50..60]
        );
        assert!(set.covers(&(12..40)) && set.covers(&(5..5)) && !set.covers(&(39..41)));
        assert_eq!(
            set.missing(&[0..12, 38..55, 58..70, 100..101]),
            vec![0..10, 40..50, 60..70, 100..101]
        );
        assert!(set.missing(&[10..40, 52..53]).is_empty());
    }
}
