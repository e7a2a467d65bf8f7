//! Which blocks a workload asked for. While a trace is being recorded
//! (`-o record_trace`, or `erofs-fanotify trace MNT --start`), every
//! pre-access event (fast path or not) marks its 4 KiB blocks; otherwise the
//! event path pays one atomic load. `erofs-fanotify trace` dumps the blocks
//! as ranges; a later mount replays them as prefetch (`-o prefetch_trace=FILE`).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use roaring::RoaringBitmap;

const BLOCK: u64 = 4096;

#[derive(Default)]
pub struct Trace {
    recording: AtomicBool,
    blocks: Mutex<RoaringBitmap>,
}

impl Trace {
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }

    pub fn record(&self, range: &Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let first = range.start / BLOCK;
        let last = (range.end - 1) / BLOCK;
        let (Ok(first), Ok(last)) = (u32::try_from(first), u32::try_from(last)) else { return };
        self.blocks.lock().insert_range(first..=last);
    }

    /// Recorded byte ranges, merged, optionally clearing the record.
    pub fn ranges(&self, reset: bool) -> Vec<Range<u64>> {
        let mut b = self.blocks.lock();
        let mut out: Vec<Range<u64>> = Vec::new();
        for block in b.iter() {
            let start = u64::from(block) * BLOCK;
            match out.last_mut() {
                Some(last) if last.end == start => last.end += BLOCK,
                _ => out.push(start..start + BLOCK),
            }
        }
        if reset {
            b.clear();
        }
        out
    }
}

/// The text form of a trace file.
pub fn format_trace(digest: Option<&str>, blob_size: u64, ranges: &[Range<u64>]) -> String {
    let mut s = String::from("# erofs-fanotify trace v1\n");
    if let Some(d) = digest {
        s.push_str(&format!("# digest {d}\n"));
    }
    s.push_str(&format!("# blob_size {blob_size}\n"));
    for r in ranges {
        s.push_str(&format!("{} {}\n", r.start, r.end));
    }
    s
}

/// Parses a trace file; `digest` is returned when the header names one.
/// Untrusted input: line and range counts are capped, ranges must be sane.
pub fn parse_trace(text: &str) -> Result<(Option<String>, Vec<Range<u64>>), String> {
    const MAX_RANGES: usize = 1 << 20;
    let mut digest = None;
    let mut ranges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(d) = rest.trim().strip_prefix("digest ") {
                digest = Some(d.trim().to_string());
            }
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected \"START END\"", n + 1));
        };
        let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
            return Err(format!("line {}: not numbers", n + 1));
        };
        if a >= b {
            return Err(format!("line {}: empty or inverted range", n + 1));
        }
        if ranges.len() >= MAX_RANGES {
            return Err(format!("more than {MAX_RANGES} ranges"));
        }
        ranges.push(a..b);
    }
    Ok((digest, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_into_block_ranges_and_round_trip() {
        let t = Trace::default();
        t.record(&(0..4096));
        t.record(&(4096..10_000));
        t.record(&(1 << 20..(1 << 20) + 1));
        let ranges = t.ranges(false);
        assert_eq!(ranges, vec![0..12_288, 1 << 20..(1 << 20) + 4096]);
        let text = format_trace(Some("sha256:ab"), 5 << 20, &ranges);
        let (digest, parsed) = parse_trace(&text).unwrap();
        assert_eq!(digest.as_deref(), Some("sha256:ab"));
        assert_eq!(parsed, ranges);
        assert_eq!(t.ranges(true).len(), 2);
        assert!(t.ranges(false).is_empty());
    }

    #[test]
    fn bad_trace_lines_are_errors() {
        assert!(parse_trace("1 2 3").is_err());
        assert!(parse_trace("5 5").is_err());
        assert!(parse_trace("x y").is_err());
        assert!(parse_trace("# only a comment\n\n").unwrap().1.is_empty());
    }
}
