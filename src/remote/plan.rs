//! Turning missing byte ranges into few requests.
//!
//! Ranges closer than the link's break-even gap ([`LinkEstimate`]) are
//! merged (the gap is fetched and kept); what remains goes out in
//! multi-range requests of at most [`RequestLimits::max_parts`] parts and
//! [`RequestLimits::max_request_bytes`] bytes where the source takes them,
//! else one request per merged range. A source whose support is not known
//! yet is planned as if it had it: on a fallback it fetches the parts itself,
//! merged with the request gap (see `multi`).

use std::ops::Range;

use super::link::LinkEstimate;
use super::MultiRange;
use crate::ranges;

/// Parts of one multi-range request, at most. 200 ranges make a `Range`
/// header of ~5 KB: below the 8 KB line limit of common servers.
pub const MAX_PARTS: usize = 200;

#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Body bytes one request may carry (bodies are held in memory).
    pub max_request_bytes: u64,
    /// Parts one multi-range request may carry.
    pub max_parts: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { max_request_bytes: 8 << 20, max_parts: MAX_PARTS }
    }
}

/// Plans requests for `missing` (any order; overlaps merged). Each inner
/// list is one request's ranges: sorted, disjoint, non-empty, together at
/// most `max_request_bytes` unless a single merged range is longer (then it
/// is split). Their union covers `missing`.
pub fn plan_requests(
    missing: Vec<Range<u64>>,
    est: &LinkEstimate,
    multi: MultiRange,
    limits: &RequestLimits,
) -> Vec<Vec<Range<u64>>> {
    let max_bytes = limits.max_request_bytes.max(4096);
    let gap = match multi {
        MultiRange::Unsupported => est.request_gap(),
        MultiRange::Supported | MultiRange::Unknown => est.part_gap(),
    };
    let merged = split_long(ranges::coalesce(missing, gap, max_bytes), max_bytes);
    if multi == MultiRange::Unsupported {
        return merged.into_iter().map(|r| vec![r]).collect();
    }
    let mut out: Vec<Vec<Range<u64>>> = Vec::new();
    let mut bytes = 0u64;
    for r in merged {
        let len = r.end - r.start;
        match out.last_mut() {
            Some(req) if req.len() < limits.max_parts.max(1) && bytes + len <= max_bytes => {
                req.push(r);
                bytes += len;
            }
            _ => {
                out.push(vec![r]);
                bytes = len;
            }
        }
    }
    out
}

/// Splits ranges longer than `max` into pieces of `max` (the last shorter).
fn split_long(list: Vec<Range<u64>>, max: u64) -> Vec<Range<u64>> {
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        let mut s = r.start;
        while s < r.end {
            let e = r.end.min(s.saturating_add(max));
            out.push(s..e);
            s = e;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn est(latency_ms: u64, bandwidth: f64, part_us: u64) -> LinkEstimate {
        LinkEstimate { latency: Duration::from_millis(latency_ms), bandwidth, part_cost: Duration::from_micros(part_us) }
    }

    /// 100 ranges of one page, 64 KiB apart.
    fn scattered() -> Vec<Range<u64>> {
        (0..100u64).map(|i| i * (64 << 10)..i * (64 << 10) + 4096).collect()
    }

    #[test]
    fn a_fast_link_merges_into_few_big_ranges_a_slow_one_keeps_them_tight() {
        let limits = RequestLimits::default();
        // Loopback-like: 500 MB/s, parts 0.5 ms → 250 kB part gap: one range.
        let fast = plan_requests(scattered(), &est(5, 5e8, 500), MultiRange::Supported, &limits);
        assert_eq!(fast.len(), 1);
        assert_eq!(fast[0].len(), 1);
        // 100 Mbit/s: 6 kB part gap: 100 parts, one request.
        let slow = plan_requests(scattered(), &est(50, 12.5e6, 500), MultiRange::Supported, &limits);
        assert_eq!(slow.len(), 1);
        assert_eq!(slow[0].len(), 100);
        assert_eq!(ranges::total_len(&slow[0]), 100 * 4096);
    }

    #[test]
    fn without_multi_range_each_merged_range_is_a_request() {
        let limits = RequestLimits::default();
        // 100 Mbit/s × 50 ms = 625 kB request gap: all merge.
        let edge = plan_requests(scattered(), &est(50, 12.5e6, 500), MultiRange::Unsupported, &limits);
        assert_eq!(edge.len(), 1);
        // 10 Mbit/s × 1 ms = 1.25 kB → the minimum gap: 100 requests.
        let tight = plan_requests(scattered(), &est(1, 1.25e6, 500), MultiRange::Unsupported, &limits);
        assert_eq!(tight.len(), 100);
        assert!(tight.iter().all(|r| r.len() == 1));
    }

    #[test]
    fn requests_respect_parts_and_bytes() {
        let limits = RequestLimits { max_request_bytes: 10 * 4096, max_parts: 4 };
        let plan = plan_requests(scattered(), &est(50, 12.5e6, 1), MultiRange::Unknown, &limits);
        assert_eq!(plan.len(), 25);
        assert!(plan.iter().all(|r| r.len() == 4));
        // A long range is split at the byte limit.
        let plan = plan_requests(std::iter::once(0..100 * 4096).collect(), &est(50, 12.5e6, 1), MultiRange::Supported, &limits);
        assert_eq!(plan.len(), 10);
        let flat: Vec<_> = plan.into_iter().flatten().collect();
        assert_eq!(ranges::normalize(flat), vec![0..100 * 4096]);
    }
}
