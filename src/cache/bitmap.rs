//! Which 4 KiB blocks of a blob are present in the cache file: pure arithmetic, no I/O.
//!
//! Bit `n` of the roaring bitmap means bytes `n*4096 .. min((n+1)*4096, blob_size)` hold the
//! blob's data. The last block may be partial: it counts as present once its real bytes are
//! written. Event ranges from fanotify are page-aligned and not clipped to EOF, so every query
//! first clamps its range to the blob.
//!
//! Block numbers are `u32` (roaring's domain), so a map covers at most 2^32 blocks = 16 TiB.

use std::ops::{Range, RangeInclusive};

use roaring::RoaringBitmap;

/// Bytes per presence bit.
pub const BLOCK: u64 = erofs_fanotify_state::BITMAP_BLOCK_SIZE;

/// Largest blob a presence map can describe (2^32 blocks).
pub const MAX_BLOB_SIZE: u64 = (u32::MAX as u64 + 1) * BLOCK;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("blob of {0} bytes is larger than the 16 TiB a presence map can track")]
    BlobTooLarge(u64),
    #[error(
        "presence bitmap marks block {block}, but a {blob_size}-byte blob has {blocks} blocks"
    )]
    BlockPastEnd {
        block: u32,
        blob_size: u64,
        blocks: u64,
    },
}

/// The presence map of one blob.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceMap {
    blob_size: u64,
    blocks: RoaringBitmap,
}

impl PresenceMap {
    /// An empty map (nothing present) for a blob of `blob_size` bytes.
    pub fn new(blob_size: u64) -> Result<Self, PresenceError> {
        if blob_size > MAX_BLOB_SIZE {
            return Err(PresenceError::BlobTooLarge(blob_size));
        }
        Ok(PresenceMap {
            blob_size,
            blocks: RoaringBitmap::new(),
        })
    }

    /// A map from a saved bitmap; refused if it marks blocks past the end of the blob.
    pub fn from_roaring(blob_size: u64, blocks: RoaringBitmap) -> Result<Self, PresenceError> {
        let mut map = PresenceMap::new(blob_size)?;
        if let Some(max) = blocks.max() {
            if u64::from(max) >= map.len_blocks() {
                return Err(PresenceError::BlockPastEnd {
                    block: max,
                    blob_size,
                    blocks: map.len_blocks(),
                });
            }
        }
        map.blocks = blocks;
        Ok(map)
    }

    /// A copy of the bitmap, for persisting.
    pub fn to_roaring(&self) -> RoaringBitmap {
        self.blocks.clone()
    }

    pub fn as_roaring(&self) -> &RoaringBitmap {
        &self.blocks
    }

    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Number of blocks in the blob (present or not); the last one may be partial.
    pub fn len_blocks(&self) -> u64 {
        self.blob_size.div_ceil(BLOCK)
    }

    /// Number of present blocks.
    pub fn present_blocks(&self) -> u64 {
        self.blocks.len()
    }

    /// `range` clipped to `0..blob_size`; an inverted range becomes empty.
    pub fn clamp(&self, range: Range<u64>) -> Range<u64> {
        let start = range.start.min(self.blob_size);
        let end = range.end.min(self.blob_size).max(start);
        start..end
    }

    /// The blocks touched by the clamped `range`, or `None` if it is empty.
    fn touched_blocks(&self, range: Range<u64>) -> Option<RangeInclusive<u32>> {
        let r = self.clamp(range);
        if r.is_empty() {
            return None;
        }
        // r.end <= blob_size <= 2^44, so the last block index fits in u32.
        let first = r.start / BLOCK;
        let last = r.end.div_ceil(BLOCK) - 1;
        Some(first as u32..=last as u32)
    }

    /// True if every block touched by `range` (clamped) is present; true for an empty range.
    /// This is the event loop's fast path.
    pub fn contains(&self, range: Range<u64>) -> bool {
        match self.touched_blocks(range) {
            None => true,
            Some(blocks) => self.blocks.contains_range(blocks),
        }
    }

    /// The missing blocks touched by `range` (clamped), as merged byte ranges: block-aligned,
    /// except that the last block of the blob ends at `blob_size`.
    pub fn missing(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let Some(blocks) = self.touched_blocks(range) else {
            return Vec::new();
        };
        let (first, last) = (u64::from(*blocks.start()), u64::from(*blocks.end()));
        let mut out = Vec::new();
        let mut next_missing = first; // first block not yet accounted for
        let mut present = self.blocks.range(blocks);
        while let Some(run) = present.next_range() {
            let (run_start, run_end) = (u64::from(*run.start()), u64::from(*run.end()));
            if run_start > next_missing {
                out.push(self.block_bytes(next_missing..run_start));
            }
            next_missing = run_end + 1;
        }
        if next_missing <= last {
            out.push(self.block_bytes(next_missing..last + 1));
        }
        out
    }

    /// Byte range of blocks `b.start..b.end`, the end clipped to the blob.
    fn block_bytes(&self, b: Range<u64>) -> Range<u64> {
        b.start * BLOCK..(b.end * BLOCK).min(self.blob_size)
    }

    /// Marks present the blocks fully covered by `range`: blocks cut by either end stay
    /// missing, except the blob's partial last block, which `range.end >= blob_size` covers.
    /// Returns the number of blocks that became present.
    pub fn insert(&mut self, range: Range<u64>) -> u64 {
        let first = range.start.div_ceil(BLOCK);
        let end = if range.end >= self.blob_size {
            self.len_blocks()
        } else {
            range.end / BLOCK
        };
        if range.start >= range.end || first >= end {
            return 0;
        }
        // end <= len_blocks <= 2^32, so end - 1 fits in u32.
        self.blocks.insert_range(first as u32..=(end - 1) as u32)
    }

    /// Marks missing every block touched by `range` (clamped): the blocks of a region whose bytes
    /// proved wrong. Returns the number of blocks that were present.
    pub fn remove(&mut self, range: Range<u64>) -> u64 {
        match self.touched_blocks(range) {
            None => 0,
            Some(blocks) => self.blocks.remove_range(blocks),
        }
    }

    /// Exact number of blob bytes present (the partial last block by its real length).
    pub fn populated_bytes(&self) -> u64 {
        let full = self.blocks.len() * BLOCK;
        let tail = self.blob_size % BLOCK;
        let last = self.len_blocks().checked_sub(1);
        match last {
            Some(last) if tail != 0 && self.blocks.contains(last as u32) => full - (BLOCK - tail),
            _ => full,
        }
    }

    /// Bytes present among the blocks touched by `range` (clamped), counting whole blocks
    /// (the blob's partial last block by its real length).
    pub fn populated_in(&self, range: Range<u64>) -> u64 {
        let Some(blocks) = self.touched_blocks(range) else { return 0 };
        let last = u64::from(*blocks.end());
        let present = self.blocks.range_cardinality(blocks);
        let tail = self.blob_size % BLOCK;
        let partial_last = tail != 0 && last + 1 == self.len_blocks() && self.blocks.contains(last as u32);
        present * BLOCK - if partial_last { BLOCK - tail } else { 0 }
    }

    /// True if every block of the blob is present (always for an empty blob).
    pub fn is_complete(&self) -> bool {
        self.blocks.len() == self.len_blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_forgets_every_touched_block() {
        let mut m = PresenceMap::new(10 * BLOCK + 100).unwrap();
        m.insert(0..10 * BLOCK + 100);
        assert!(m.is_complete());
        // A range cutting blocks 2 and 4 forgets both: a block partly wrong is wrong.
        assert_eq!(m.remove(2 * BLOCK + 1..4 * BLOCK + 1), 3);
        assert_eq!(m.missing(0..10 * BLOCK + 100), vec![2 * BLOCK..5 * BLOCK]);
        assert_eq!(m.remove(2 * BLOCK..3 * BLOCK), 0, "already missing");
        assert_eq!(m.remove(20 * BLOCK..30 * BLOCK), 0, "past the blob");
        assert_eq!(m.remove(10 * BLOCK..11 * BLOCK), 1, "the partial last block");
        assert!(!m.contains(10 * BLOCK..10 * BLOCK + 100));
    }

    #[test]
    fn populated_bytes_within_a_range() {
        let mut m = PresenceMap::new(10 * BLOCK + 100).unwrap();
        m.insert(0..2 * BLOCK);
        m.insert(5 * BLOCK..10 * BLOCK + 100);
        assert_eq!(m.populated_in(0..10 * BLOCK + 100), m.populated_bytes());
        assert_eq!(m.populated_in(BLOCK..6 * BLOCK), 2 * BLOCK, "block 1 and block 5");
        assert_eq!(m.populated_in(10 * BLOCK..u64::MAX), 100, "the partial last block");
        assert_eq!(m.populated_in(3 * BLOCK..4 * BLOCK), 0);
        assert_eq!(m.populated_in(7..7), 0);
    }

    const B: u64 = BLOCK;

    fn map(size: u64) -> PresenceMap {
        PresenceMap::new(size).unwrap()
    }

    #[test]
    fn sizes_and_limits() {
        assert_eq!(map(0).len_blocks(), 0);
        assert_eq!(map(1).len_blocks(), 1);
        assert_eq!(map(B).len_blocks(), 1);
        assert_eq!(map(B + 1).len_blocks(), 2);
        assert_eq!(map(MAX_BLOB_SIZE).len_blocks(), 1 << 32);
        assert_eq!(
            PresenceMap::new(MAX_BLOB_SIZE + 1),
            Err(PresenceError::BlobTooLarge(MAX_BLOB_SIZE + 1))
        );
        assert_eq!(
            PresenceMap::new(u64::MAX),
            Err(PresenceError::BlobTooLarge(u64::MAX))
        );
    }

    #[test]
    fn empty_blob() {
        let mut m = map(0);
        assert!(m.is_complete());
        assert!(m.contains(0..4096));
        assert!(m.contains(0..0));
        assert!(m.missing(0..u64::MAX).is_empty());
        assert_eq!(m.insert(0..4096), 0);
        assert_eq!(m.populated_bytes(), 0);
        assert_eq!(m.clamp(10..20), 0..0);
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // inverted ranges are one of the cases
    fn clamp_cases() {
        let m = map(10_000);
        assert_eq!(m.clamp(0..4096), 0..4096);
        assert_eq!(m.clamp(8192..12288), 8192..10_000);
        assert_eq!(m.clamp(12288..16384), 10_000..10_000);
        assert_eq!(m.clamp(5..3), 5..5);
        assert_eq!(m.clamp(0..u64::MAX), 0..10_000);
        assert_eq!(m.clamp(u64::MAX..u64::MAX), 10_000..10_000);
    }

    #[test]
    fn small_blob_single_partial_block() {
        let mut m = map(100);
        assert!(!m.is_complete());
        assert!(!m.contains(0..4096));
        assert_eq!(m.missing(0..16384), vec![0..100]);
        assert_eq!(m.insert(0..50), 0, "partial cover of the only block");
        assert_eq!(m.insert(0..100), 1);
        assert_eq!(m.insert(0..100), 0, "already present");
        assert!(m.is_complete());
        assert_eq!(m.populated_bytes(), 100);
        assert!(m.contains(0..16384));
        assert!(m.contains(50..51));
        assert!(m.missing(0..u64::MAX).is_empty());
    }

    #[test]
    fn exact_multiple() {
        let mut m = map(4 * B);
        assert_eq!(m.insert(0..4 * B), 4);
        assert!(m.is_complete());
        assert_eq!(m.populated_bytes(), 4 * B);
        let mut m = map(4 * B);
        assert_eq!(m.insert(3 * B..u64::MAX), 1);
        assert_eq!(m.populated_bytes(), B);
        assert_eq!(m.missing(0..u64::MAX), vec![0..3 * B]);
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)] // inverted ranges are one of the cases
    fn insert_only_fully_covered_blocks() {
        let mut m = map(10 * B + 10);
        assert_eq!(m.insert(1..B), 0);
        assert_eq!(m.insert(1..2 * B + 1), 1, "only block 1 is fully covered");
        assert!(m.contains(B..2 * B));
        assert!(!m.contains(0..B));
        assert!(!m.contains(2 * B..3 * B));
        // The partial last block: covered once the range reaches blob_size.
        assert_eq!(m.insert(10 * B..10 * B + 9), 0);
        assert_eq!(m.insert(10 * B..10 * B + 10), 1);
        assert_eq!(m.populated_bytes(), B + 10);
        // A range starting inside the partial last block covers nothing.
        let mut m2 = map(10 * B + 10);
        assert_eq!(m2.insert(10 * B + 1..u64::MAX), 0);
        // Empty, inverted and past-EOF ranges.
        assert_eq!(m2.insert(5..5), 0);
        assert_eq!(m2.insert(9 * B..0), 0);
        assert_eq!(m2.insert(11 * B..12 * B), 0);
        assert_eq!(m2.insert(u64::MAX - 1..u64::MAX), 0);
        assert_eq!(m2.present_blocks(), 0);
    }

    #[test]
    fn missing_ranges_are_merged_block_ranges() {
        let mut m = map(20 * B + 100);
        m.insert(2 * B..4 * B);
        m.insert(6 * B..7 * B);
        // Unaligned query, expanded to the blocks it touches.
        assert_eq!(
            m.missing(B + 5..8 * B - 1),
            vec![B..2 * B, 4 * B..6 * B, 7 * B..8 * B]
        );
        assert_eq!(m.missing(2 * B..4 * B), Vec::<Range<u64>>::new());
        assert_eq!(m.missing(3 * B + 1..3 * B + 2), Vec::<Range<u64>>::new());
        // Past EOF: clipped to blob_size.
        assert_eq!(m.missing(19 * B..64 * B), vec![19 * B..20 * B + 100]);
        assert_eq!(m.missing(21 * B..64 * B), Vec::<Range<u64>>::new());
        assert_eq!(
            m.missing(0..u64::MAX),
            vec![0..2 * B, 4 * B..6 * B, 7 * B..20 * B + 100]
        );
        // Query starting in a present run and ending in a missing one.
        assert_eq!(m.missing(3 * B..5 * B), vec![4 * B..5 * B]);
    }

    #[test]
    fn contains_is_consistent_with_missing() {
        let mut m = map(300 * B + 7);
        for i in (0..300).step_by(7) {
            m.insert(i * B..(i + 3) * B);
        }
        m.insert(300 * B..u64::MAX);
        for start in (0..310 * B).step_by(1021) {
            for len in [0, 1, B, 3 * B, 16 * B, 64 * B] {
                let r = start..start + len;
                assert_eq!(
                    m.contains(r.clone()),
                    m.missing(r.clone()).is_empty(),
                    "{r:?}"
                );
            }
        }
    }

    #[test]
    fn across_roaring_containers() {
        // Block 65535/65536 is a container boundary.
        let mut m = map(200_000 * B);
        m.insert(65_000 * B..70_000 * B);
        assert!(m.contains(65_535 * B..65_537 * B));
        assert_eq!(
            m.missing(64_999 * B..70_001 * B),
            vec![64_999 * B..65_000 * B, 70_000 * B..70_001 * B]
        );
    }

    #[test]
    fn largest_blob() {
        let mut m = map(MAX_BLOB_SIZE);
        assert_eq!(m.insert(MAX_BLOB_SIZE - B..u64::MAX), 1);
        assert!(m.contains(MAX_BLOB_SIZE - B..u64::MAX));
        assert!(m.contains(u64::MAX - 10..u64::MAX));
        assert_eq!(m.populated_bytes(), B);
        assert_eq!(
            m.missing(MAX_BLOB_SIZE - 2 * B..u64::MAX),
            vec![MAX_BLOB_SIZE - 2 * B..MAX_BLOB_SIZE - B]
        );
        let m = map(MAX_BLOB_SIZE - 1);
        assert_eq!(
            m.missing(MAX_BLOB_SIZE - B..u64::MAX),
            vec![MAX_BLOB_SIZE - B..MAX_BLOB_SIZE - 1]
        );
    }

    #[test]
    fn roaring_conversions() {
        let mut m = map(10 * B);
        m.insert(0..3 * B);
        let r = m.to_roaring();
        assert_eq!(PresenceMap::from_roaring(10 * B, r.clone()).unwrap(), m);
        let mut bad = r;
        bad.insert(10);
        assert!(matches!(
            PresenceMap::from_roaring(10 * B, bad),
            Err(PresenceError::BlockPastEnd { block: 10, .. })
        ));
        assert!(PresenceMap::from_roaring(0, RoaringBitmap::new())
            .unwrap()
            .is_complete());
    }

    #[test]
    fn populated_bytes_counts_partial_tail_once() {
        let mut m = map(3 * B + 1);
        m.insert(3 * B..3 * B + 1);
        assert_eq!(m.populated_bytes(), 1);
        m.insert(0..B);
        assert_eq!(m.populated_bytes(), B + 1);
        m.insert(0..u64::MAX);
        assert_eq!(m.populated_bytes(), 3 * B + 1);
        assert!(m.is_complete());
    }
}
