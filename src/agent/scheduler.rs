//! The fetch scheduler: turns pre-access events for missing ranges into as
//! few range requests as possible, and answers each event exactly once.
//!
//! Missing bytes are rounded out to fetch units. A unit already in flight
//! gets the event added as a waiter instead of a second request; adjacent new
//! units are coalesced into one request (up to `max_request` bytes). Data is
//! written through the cache fd opened before the mark, marked present only
//! after a complete write, and then every waiter whose units are all present
//! is allowed. A unit that fails after bounded retries denies its waiters
//! with EIO; nothing is left blocked and nothing reads zeros.
//!
//! A source that has just exhausted a retry budget is *degraded*: until a
//! fetch succeeds again, new fetches get a single attempt. One read(2) can
//! raise several events in a row (readahead, then the page itself), and a
//! dead remote must not cost each of them the whole budget.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cache::CacheFile;
use crate::fanotify::PermissionEvent;
use crate::remote::{fetch_with_retry, RangeSource, RetryPolicy};

use super::stats::Stats;

pub struct SchedulerConfig {
    pub fetch_unit: u64,
    pub max_request: u64,
    pub parallel: usize,
    pub retry: RetryPolicy,
}

pub struct Scheduler {
    cache: Arc<CacheFile>,
    source: Arc<dyn RangeSource>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
    permits: Semaphore,
    inner: Mutex<Inner>,
    runtime: tokio::runtime::Handle,
    /// When a fetch last failed after all its retries, until one succeeds.
    degraded_since: Mutex<Option<Instant>>,
}

/// How long a failed source stays degraded without a success.
const DEGRADED_FOR: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Inner {
    /// Fetch unit index -> waiters (ids) for it.
    inflight: HashMap<u64, Vec<u64>>,
    waiters: HashMap<u64, Waiter>,
    next_id: u64,
}

struct Waiter {
    event: PermissionEvent,
    remaining: usize,
    since: Instant,
}

impl Scheduler {
    /// Fetches run on `runtime`; `submit` may be called from any thread.
    pub fn new(
        cache: Arc<CacheFile>,
        source: Arc<dyn RangeSource>,
        stats: Arc<Stats>,
        cfg: SchedulerConfig,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Scheduler> {
        let permits = Semaphore::new(cfg.parallel.max(1));
        Arc::new(Scheduler {
            cache,
            source,
            stats,
            cfg,
            permits,
            inner: Mutex::new(Inner::default()),
            runtime,
            degraded_since: Mutex::new(None),
        })
    }

    /// Takes an event whose range (clamped to the blob) is not fully present.
    pub fn submit(self: &Arc<Self>, event: PermissionEvent, range: Range<u64>) {
        let unit = self.cfg.fetch_unit;
        let mut units = BTreeSet::new();
        for m in self.cache.missing(range.clone()) {
            if m.start < m.end {
                units.extend(m.start / unit..=(m.end - 1) / unit);
            }
        }
        let mut to_start = Vec::new();
        let waiting = {
            let mut inner = match self.inner.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let id = inner.next_id;
            inner.next_id += 1;
            let mut remaining = 0usize;
            for u in units {
                if let Some(ids) = inner.inflight.get_mut(&u) {
                    ids.push(id);
                    remaining += 1;
                    continue;
                }
                // Re-check under the lock: a fetch that completed since
                // `missing()` marks present before it takes the lock.
                let needed = self.unit_range(u);
                let needed = needed.start.max(range.start)..needed.end.min(range.end);
                if self.cache.contains(needed) {
                    continue;
                }
                inner.inflight.insert(u, vec![id]);
                remaining += 1;
                to_start.push(u);
            }
            if remaining > 0 {
                inner.waiters.insert(id, Waiter { event, remaining, since: Instant::now() });
                None
            } else {
                Some(event)
            }
        };
        if let Some(event) = waiting {
            Stats::add(&self.stats.fast_path_events, 1);
            event.allow();
        }
        for run in runs(&to_start, (self.cfg.max_request / unit).max(1)) {
            let this = Arc::clone(self);
            self.runtime.spawn(async move { this.fetch_units(run).await });
        }
    }

    fn unit_range(&self, u: u64) -> Range<u64> {
        let size = self.cache.blob_size();
        let start = u.saturating_mul(self.cfg.fetch_unit).min(size);
        start..start.saturating_add(self.cfg.fetch_unit).min(size)
    }

    async fn fetch_units(self: Arc<Self>, units: Range<u64>) {
        let span = self.unit_range(units.start).start..self.unit_range(units.end - 1).end;
        // Fetch only from the first to the last missing byte of the run.
        let missing = self.cache.missing(span);
        let ok = match (missing.first(), missing.last()) {
            (Some(first), Some(last)) => self.fetch_and_write(first.start..last.end).await,
            _ => true,
        };
        self.complete(units, ok);
    }

    async fn fetch_and_write(&self, range: Range<u64>) -> bool {
        let _permit = match self.permits.acquire().await {
            Ok(p) => p,
            Err(_) => return false,
        };
        Stats::add(&self.stats.fetch_requests, 1);
        let policy = self.policy();
        let started = Instant::now();
        let result = fetch_with_retry(self.source.as_ref(), range.clone(), &policy).await;
        self.stats.fetch_latency.observe(started.elapsed());
        self.set_degraded(result.is_err());
        match result {
            Ok(fetched) => {
                Stats::add(&self.stats.fetch_errors, u64::from(fetched.failed_attempts));
                Stats::add(&self.stats.fetched_bytes, fetched.bytes.len() as u64);
                let cache = Arc::clone(&self.cache);
                let start = range.start;
                let written = tokio::task::spawn_blocking(move || cache.write_range(start, &fetched.bytes)).await;
                match written {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::error!(?range, error = %e, "writing fetched data to the cache file failed");
                        false
                    }
                    Err(e) => {
                        tracing::error!(?range, error = %e, "cache write task failed");
                        false
                    }
                }
            }
            Err((e, attempts)) => {
                Stats::add(&self.stats.fetch_errors, u64::from(attempts));
                tracing::error!(?range, attempts, error = %e, "fetch failed; readers get EIO");
                false
            }
        }
    }

    fn complete(&self, units: Range<u64>, ok: bool) {
        let mut ready = Vec::new();
        let mut failed = Vec::new();
        {
            let mut inner = match self.inner.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            for u in units {
                for id in inner.inflight.remove(&u).unwrap_or_default() {
                    if ok {
                        if let Some(w) = inner.waiters.get_mut(&id) {
                            w.remaining -= 1;
                            if w.remaining == 0 {
                                ready.extend(inner.waiters.remove(&id));
                            }
                        }
                    } else {
                        failed.extend(inner.waiters.remove(&id));
                    }
                }
            }
        }
        for w in ready {
            self.stats.event_wait.observe(w.since.elapsed());
            w.event.allow();
        }
        for w in failed {
            self.stats.event_wait.observe(w.since.elapsed());
            Stats::add(&self.stats.denied_events, 1);
            w.event.deny(libc::EIO);
        }
    }

    fn policy(&self) -> RetryPolicy {
        let degraded = match self.degraded_since.lock() {
            Ok(g) => g.is_some_and(|t| t.elapsed() < DEGRADED_FOR),
            Err(_) => false,
        };
        if degraded {
            RetryPolicy { max_attempts: 1, ..self.cfg.retry.clone() }
        } else {
            self.cfg.retry.clone()
        }
    }

    fn set_degraded(&self, failed: bool) {
        if let Ok(mut g) = self.degraded_since.lock() {
            *g = if failed { Some(Instant::now()) } else { None };
        }
    }

    /// Events still waiting (for status and tests).
    pub fn waiting(&self) -> usize {
        self.inner.lock().map(|i| i.waiters.len()).unwrap_or(0)
    }
}

/// Splits sorted unit indices into runs of consecutive indices, each at most `max` long.
fn runs(units: &[u64], max: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &u in units {
        match out.last_mut() {
            Some(r) if r.end == u && r.end - r.start < max => r.end += 1,
            _ => out.push(u..u + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_split_on_gaps_and_length() {
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9], 8), vec![1..4, 5..7, 9..10]);
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![0..2, 2..4, 4..5]);
        assert!(runs(&[], 4).is_empty());
    }
}
