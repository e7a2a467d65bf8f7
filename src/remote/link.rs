//! What a request to a source costs, measured from the requests we make.
//!
//! Mount latency is requests and round trips, not bytes (DESIGN §5): two
//! missing ranges are worth fetching as one when the bytes between them
//! take less time to transfer than a second request takes to answer. That
//! break-even gap is `bandwidth × latency` for separate requests, and
//! `bandwidth × part_cost` for two parts of one multi-range request (a part
//! costs the server a little work, ~0.5 ms on Debian's docker-registry). A
//! loopback registry gives gaps of megabytes, a 100 Mbit/s link with 50 ms
//! of latency gives a few hundred KiB for requests and a few KiB for parts.
//!
//! [`LinkMeter`] keeps exponentially weighted averages per source: latency
//! is the time to the response headers (one round trip plus the server's
//! work), bandwidth is the body rate of responses big enough to measure, the
//! part cost is what a multi-range body takes beyond its bytes. Until a
//! quantity has been measured, [`LinkEstimate::default`] stands in (a
//! 100 Mbit/s link with 20 ms latency). Pure: callers hand in durations.

use std::time::Duration;

use parking_lot::Mutex;

/// Smallest merge gap: one page (a smaller one merges nothing that matters).
pub const MIN_GAP: u64 = 4096;
/// Largest gap merged into one range of a request, whatever the link says
/// (bounded so a fast link does not fetch a big image as "gap": at 2 MiB a cold mount of a 128 MB
/// image of small files fetched 55 MB, at 256 KiB still 55 MB in 223 requests; 64 KiB, the fixed gap of
/// before, keeps it lazy).
pub const MAX_REQUEST_GAP: u64 = 64 << 10;
/// Largest gap merged between two parts of a multi-range request.
pub const MAX_PART_GAP: u64 = 64 << 10;

/// Weight of a new sample in the averages.
const ALPHA: f64 = 0.3;
/// Bodies shorter than this say little about bandwidth (scheduling noise).
const MIN_BANDWIDTH_SAMPLE: u64 = 128 << 10;

/// The measured (or assumed) costs of a source's requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkEstimate {
    /// Request sent → response headers: a round trip plus the server's work.
    pub latency: Duration,
    /// Body bytes per second of one response.
    pub bandwidth: f64,
    /// Extra time one more part of a multi-range response costs.
    pub part_cost: Duration,
}

impl Default for LinkEstimate {
    fn default() -> Self {
        LinkEstimate {
            latency: Duration::from_millis(20),
            bandwidth: 12.5e6,
            part_cost: Duration::from_micros(500),
        }
    }
}

impl LinkEstimate {
    /// Gap worth fetching rather than making a second request.
    pub fn request_gap(&self) -> u64 {
        gap(self.bandwidth, self.latency, MAX_REQUEST_GAP)
    }

    /// Gap worth fetching rather than adding a part to a multi-range request.
    pub fn part_gap(&self) -> u64 {
        gap(self.bandwidth, self.part_cost, MAX_PART_GAP)
    }

    /// Bytes that take one latency to transfer: how much must be in flight
    /// to keep the link busy.
    pub fn bytes_in_flight(&self) -> u64 {
        (self.bandwidth * self.latency.as_secs_f64()).max(0.0) as u64
    }
}

fn gap(bandwidth: f64, cost: Duration, max: u64) -> u64 {
    let bytes = bandwidth * cost.as_secs_f64();
    if !bytes.is_finite() || bytes <= MIN_GAP as f64 {
        return MIN_GAP;
    }
    (bytes as u64).min(max)
}

/// One finished request, as the source saw it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Request sent → response headers.
    pub first_byte: Duration,
    /// Headers → last body byte.
    pub body: Duration,
    /// Body bytes (data of all parts).
    pub bytes: u64,
    /// Ranges the response carried (1 for a plain range request).
    pub parts: usize,
}

#[derive(Default)]
struct Averages {
    latency: Option<f64>,
    bandwidth: Option<f64>,
    part_cost: Option<f64>,
    samples: u64,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
}

/// Running averages of one source's request costs.
#[derive(Default)]
pub struct LinkMeter {
    avg: Mutex<Averages>,
}

impl LinkMeter {
    pub fn observe(&self, s: Sample) {
        let mut a = self.avg.lock();
        a.samples += 1;
        a.latency = Some(ewma(a.latency, s.first_byte.as_secs_f64()));
        let body = s.body.as_secs_f64();
        if s.bytes < MIN_BANDWIDTH_SAMPLE || body <= 0.0 {
            return;
        }
        if s.parts <= 1 {
            a.bandwidth = Some(ewma(a.bandwidth, s.bytes as f64 / body));
        } else if let Some(bw) = a.bandwidth {
            // What the body took beyond its bytes is the parts' cost.
            let extra = (body - s.bytes as f64 / bw).max(0.0);
            let per_part = (extra / s.parts as f64).clamp(1e-6, 0.05);
            a.part_cost = Some(ewma(a.part_cost, per_part));
        }
    }

    pub fn estimate(&self) -> LinkEstimate {
        let a = self.avg.lock();
        let d = LinkEstimate::default();
        LinkEstimate {
            latency: a.latency.map_or(d.latency, Duration::from_secs_f64),
            bandwidth: a.bandwidth.unwrap_or(d.bandwidth),
            part_cost: a.part_cost.map_or(d.part_cost, Duration::from_secs_f64),
        }
    }

    /// Requests measured so far.
    pub fn samples(&self) -> u64 {
        self.avg.lock().samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    /// A link of `latency_ms` and `mbit` Mbit/s, as ten requests of 1 MiB see it.
    fn link(latency_ms: f64, mbit: f64) -> LinkMeter {
        let m = LinkMeter::default();
        let bw = mbit * 1e6 / 8.0;
        for _ in 0..10 {
            m.observe(Sample { first_byte: ms(latency_ms), body: Duration::from_secs_f64((1 << 20) as f64 / bw), bytes: 1 << 20, parts: 1 });
        }
        m
    }

    #[test]
    fn a_fast_link_merges_big_gaps_and_a_slow_one_tight_ones() {
        // Loopback: 5 ms per request at ~4 Gbit/s → 2.5 MB break-even, capped.
        let fast = link(5.0, 4000.0).estimate();
        assert_eq!(fast.request_gap(), MAX_REQUEST_GAP);
        // 2 ms at 100 Mbit/s → 25 kB.
        let edge = link(2.0, 100.0).estimate();
        assert!((24_000..26_000).contains(&edge.request_gap()), "{}", edge.request_gap());
        // 1 ms at 10 Mbit/s → 1.25 kB: one page at least.
        let slow = link(1.0, 10.0).estimate();
        assert_eq!(slow.request_gap(), MIN_GAP);
        assert!(fast.request_gap() > edge.request_gap() && edge.request_gap() > slow.request_gap());
        // Parts cost ~0.5 ms by default: a few kB at 100 Mbit/s, more on loopback.
        assert!(edge.part_gap() < 16 << 10, "{}", edge.part_gap());
        assert_eq!(fast.part_gap(), MAX_PART_GAP);
    }

    #[test]
    fn averages_follow_the_link() {
        let m = link(5.0, 1000.0);
        let before = m.estimate();
        for _ in 0..30 {
            m.observe(Sample { first_byte: ms(50.0), body: ms(80.0), bytes: 1 << 20, parts: 1 });
        }
        let after = m.estimate();
        assert!(after.latency > before.latency * 8, "{after:?}");
        assert!(after.bandwidth < before.bandwidth / 5.0, "{after:?}");
    }

    #[test]
    fn small_bodies_do_not_move_bandwidth_and_parts_measure_their_cost() {
        let m = link(5.0, 800.0);
        let bw = m.estimate().bandwidth;
        m.observe(Sample { first_byte: ms(5.0), body: ms(100.0), bytes: 4096, parts: 1 });
        assert_eq!(m.estimate().bandwidth, bw);
        // 100 parts, 1 MiB, 1.3 ms of bytes + 100 ms more: ~1 ms per part.
        for _ in 0..20 {
            let bytes_time = (1 << 20) as f64 / bw;
            m.observe(Sample { first_byte: ms(5.0), body: Duration::from_secs_f64(bytes_time + 0.1), bytes: 1 << 20, parts: 100 });
        }
        let part = m.estimate().part_cost.as_secs_f64();
        assert!((0.0009..0.0011).contains(&part), "{part}");
    }

    #[test]
    fn unmeasured_links_use_the_default() {
        let m = LinkMeter::default();
        assert_eq!(m.estimate(), LinkEstimate::default());
        assert_eq!(m.samples(), 0);
        // 20 ms at 100 Mbit/s is 250 kB of break-even, capped.
        assert_eq!(LinkEstimate::default().request_gap(), MAX_REQUEST_GAP);
    }
}
