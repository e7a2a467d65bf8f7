//! Counters and histograms shown by `status` and the metrics; lock-free so
//! the fast path stays cheap.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct Stats {
    pub events: AtomicU64,
    pub fast_path_events: AtomicU64,
    pub fetch_requests: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub fetched_bytes: AtomicU64,
    /// Requests made before the mount was ready (probe, walk, metadata).
    pub mount_requests: AtomicU64,
    /// Dependent round trips of the metadata walk (0: no walk was needed).
    pub walk_round_trips: AtomicU64,
    pub denied_events: AtomicU64,
    /// Queue overflows seen (lost events: cannot happen with the unlimited queue).
    pub overflows: AtomicU64,
    /// Seconds per range request (all attempts of one fetch).
    pub fetch_latency: Histogram,
    /// Seconds a reader waited for its event's answer (slow path only).
    pub event_wait: Histogram,
    /// The index artifact whose metadata ranges the mount used (for `status`).
    pub index: parking_lot::Mutex<Option<String>>,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// Upper bounds (seconds) of the histogram buckets, Prometheus style.
pub const BUCKETS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0, 30.0];

/// A fixed-bucket histogram of durations.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: BUCKETS.to_vec(),
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_seconds: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as sent over the control socket: `counts[i]` observations fell
/// in `(buckets[i-1], buckets[i]]` (not cumulative); `count` includes the
/// ones above the last bound.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[2], 1);
        assert_eq!(s.counts.iter().sum::<u64>(), 2, "60 s is above every bound");
        assert!((s.sum_seconds - 60.0035).abs() < 1e-6);
    }
}
