//! Byte-range arithmetic on sorted, non-overlapping `Range<u64>` lists.
//!
//! Used by the metadata walker (complement of data extents), the metadata
//! prefetch (coalescing into few requests) and the fetch scheduler.

use std::ops::Range;

/// Sorts and merges overlapping or touching ranges; drops empty ones.
pub fn normalize(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Merges ranges whose gap is at most `max_gap` bytes, so that one request
/// covers several nearby ranges (a round trip costs more than a few KiB).
/// A merged range never grows beyond `max_len` unless a single input range does.
pub fn coalesce(ranges: Vec<Range<u64>>, max_gap: u64, max_len: u64) -> Vec<Range<u64>> {
    let ranges = normalize(ranges);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last)
                if r.start.saturating_sub(last.end) <= max_gap
                    && r.end.saturating_sub(last.start) <= max_len =>
            {
                last.end = last.end.max(r.end)
            }
            _ => out.push(r),
        }
    }
    out
}

/// The parts of `0..total` not covered by `ranges` (which need not be normalized).
pub fn complement(ranges: &[Range<u64>], total: u64) -> Vec<Range<u64>> {
    let norm = normalize(ranges.to_vec());
    let mut out = Vec::new();
    let mut pos = 0u64;
    for r in norm {
        let start = r.start.min(total);
        if start > pos {
            out.push(pos..start);
        }
        pos = pos.max(r.end.min(total));
    }
    if pos < total {
        out.push(pos..total);
    }
    out
}

/// Rounds every range outwards to multiples of `align` (a power of two),
/// clamps it to `total`, and normalizes the result.
pub fn align_out(ranges: &[Range<u64>], align: u64, total: u64) -> Vec<Range<u64>> {
    debug_assert!(align.is_power_of_two());
    normalize(
        ranges
            .iter()
            .map(|r| {
                let s = r.start & !(align - 1);
                let e = r.end.saturating_add(align - 1) & !(align - 1);
                s.min(total)..e.min(total)
            })
            .collect(),
    )
}

/// Total number of bytes in a list of ranges (assumed non-overlapping).
pub fn total_len(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_overlapping_and_touching() {
        assert_eq!(normalize(vec![5..7, 0..2, 2..3, 6..9, 4..4]), vec![0..3, 5..9]);
    }

    #[test]
    fn coalesce_respects_gap_and_length() {
        assert_eq!(coalesce(vec![0..10, 15..20, 40..50], 5, 100), vec![0..20, 40..50]);
        assert_eq!(coalesce(vec![0..10, 15..20], 5, 15), vec![0..10, 15..20]);
    }

    #[test]
    fn complement_of_middle_and_clamped() {
        assert_eq!(complement(&[2..4, 6..20], 10), vec![0..2, 4..6]);
        assert_eq!(complement(&[], 5), vec![0..5]);
        assert_eq!(complement(std::slice::from_ref(&(0..5)), 5), Vec::<Range<u64>>::new());
    }

    #[test]
    fn align_out_rounds_and_clamps() {
        assert_eq!(align_out(&[1..2, 4097..4098], 4096, 6000), vec![0..6000]);
        assert_eq!(align_out(std::slice::from_ref(&(8193..8194)), 4096, 100_000), vec![8192..12288]);
    }

    #[test]
    fn total_len_sums() {
        assert_eq!(total_len(&[0..3, 10..15]), 8);
    }
}
