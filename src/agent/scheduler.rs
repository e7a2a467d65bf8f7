//! The fetch scheduler: turns pre-access events for missing ranges into as
//! few range requests as possible, and answers each event exactly once.
//!
//! Missing bytes are rounded out to fetch units. Units and read-ahead stop at
//! the ends of the source's regions ([`RangeSource::region`]: the segments of
//! a layout), so a read of one segment never asks another segment's source
//! (reading one file of a bucket image fetches only that object). A unit is
//! named by its first byte. A unit already in flight
//! gets the event added as a waiter instead of a second request; adjacent new
//! units are coalesced into one request (up to `max_request` bytes). Data is
//! written through the cache fd opened before the mark, marked present only
//! after a complete write, and then every waiter whose units are all present
//! is allowed. A unit that fails after bounded retries denies its waiters
//! with EIO; nothing is left blocked and nothing reads zeros.
//!
//! Sequential streams are detected from event ranges: a miss that starts
//! where a recent one ended doubles that stream's read-ahead window (up to
//! `max_window`), and the extra units ride in the same request. Random
//! misses fetch one unit; a miss inside a small file fetches the whole file.
//! Background prefetch (`prefetch`) keeps a few big requests in flight (half
//! the permits) and starts new ones only while no reader waits: demand
//! always goes first.
//!
//! A source that has just exhausted a retry budget is *degraded*: until a
//! fetch succeeds again, new fetches get a single attempt. One read(2) can
//! raise several events in a row (readahead, then the page itself), and a
//! dead remote must not cost each of them the whole budget.
//!
//! Whatever happens to a fetch task — success, failure, a panic, the task
//! being dropped — its units are completed exactly once ([`UnitsGuard`]), and
//! a waiter is allowed only if every byte it asked for is present when its
//! last unit completes; anything else is denied with EIO. The scheduler only
//! knows waiters through [`Waiter`], so it is unit-tested without a kernel.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cache::CacheFile;
use crate::remote::{fetch_with_retry, RangeSource, RetryPolicy};


use super::stats::Stats;

/// Something blocked on a range: answered exactly once, by value.
pub trait Waiter: Send + 'static {
    fn allow(self);
    fn deny(self, errno: i32);
}

pub struct SchedulerConfig {
    pub fetch_unit: u64,
    /// Largest read-ahead window of a sequential stream.
    pub max_window: u64,
    pub max_request: u64,
    pub parallel: usize,
    pub retry: RetryPolicy,
    /// Files up to this size are fetched whole on a miss (0: never).
    pub whole_file_max: u64,
}

/// Default of [`SchedulerConfig::whole_file_max`]: most programs read whole
/// files, and one request then replaces many events.
pub const WHOLE_FILE_MAX: u64 = 4 << 20;

pub struct Scheduler<W: Waiter> {
    cache: Arc<CacheFile>,
    source: Arc<dyn RangeSource>,
    stats: Arc<Stats>,
    cfg: SchedulerConfig,
    permits: Semaphore,
    inner: Mutex<Inner<W>>,
    /// Each regular file's data (sorted, disjoint), for whole-file fetches.
    file_extents: parking_lot::RwLock<Arc<Vec<Range<u64>>>>,
    runtime: tokio::runtime::Handle,
    /// When a fetch last failed after all its retries, until one succeeds.
    degraded_since: Mutex<Option<Instant>>,
    /// Background prefetch tasks running, and bytes they fetched.
    pub prefetch_tasks: std::sync::atomic::AtomicU64,
    pub prefetched_bytes: std::sync::atomic::AtomicU64,
    /// The blob digest, hashed as contiguous data lands (see `digest`).
    pub in_order: Arc<super::digest::InOrderDigest>,
}

/// Bytes of one background prefetch request at most: with half the permits
/// in flight this keeps a link of 5 ms × 500 MB/s busy and the agent's
/// memory near its 32 MiB budget.
const PREFETCH_REQUEST: u64 = 2 << 20;

/// How long a failed source stays degraded without a success.
const DEGRADED_FOR: Duration = Duration::from_secs(60);

struct Inner<W> {
    /// Fetch unit (its first byte) -> waiters (ids) for it.
    inflight: HashMap<u64, Vec<u64>>,
    waiters: HashMap<u64, Waiting<W>>,
    next_id: u64,
    streams: Streams,
}

impl<W> Default for Inner<W> {
    fn default() -> Self {
        Inner { inflight: HashMap::new(), waiters: HashMap::new(), next_id: 0, streams: Streams::default() }
    }
}

/// Recent miss streams: where each ended and its current window.
#[derive(Default)]
struct Streams {
    recent: std::collections::VecDeque<(u64, u64)>,
}

const MAX_STREAMS: usize = 32;

impl Streams {
    /// Records a miss at `range`; returns the read-ahead window to fetch
    /// past its end (0 for a random miss).
    fn on_miss(&mut self, range: &Range<u64>, unit: u64, max_window: u64) -> u64 {
        let near = |end: u64| range.start <= end.saturating_add(unit) && range.start.saturating_add(unit) >= end;
        if let Some(i) = self.recent.iter().position(|&(end, _)| near(end)) {
            if let Some((_, window)) = self.recent.remove(i) {
                let grown = (window.max(unit / 2) * 2).min(max_window);
                // The next miss of this stream comes where the read-ahead ends.
                self.recent.push_front((range.end.saturating_add(grown), grown));
                return grown;
            }
        }
        if self.recent.len() >= MAX_STREAMS {
            self.recent.pop_back();
        }
        self.recent.push_front((range.end, 0));
        0
    }
}

struct Waiting<W> {
    waiter: W,
    /// What it asked for (clamped to the blob): all present before it is allowed.
    range: Range<u64>,
    remaining: usize,
    since: Instant,
}

/// Completes a fetch task's units exactly once: by [`UnitsGuard::finish`],
/// or as failed when the task panics or is dropped before finishing.
struct UnitsGuard<W: Waiter> {
    scheduler: Arc<Scheduler<W>>,
    /// The bytes of whole, adjacent units.
    units: Option<Range<u64>>,
}

impl<W: Waiter> UnitsGuard<W> {
    fn finish(mut self, ok: bool) {
        if let Some(units) = self.units.take() {
            self.scheduler.complete(units, ok);
        }
    }
}

impl<W: Waiter> Drop for UnitsGuard<W> {
    fn drop(&mut self) {
        if let Some(units) = self.units.take() {
            tracing::error!(?units, "a fetch task ended without completing; its readers get EIO");
            self.scheduler.complete(units, false);
        }
    }
}

impl<W: Waiter> Scheduler<W> {
    /// Fetches run on `runtime`; `submit` may be called from any thread.
    pub fn new(
        cache: Arc<CacheFile>,
        source: Arc<dyn RangeSource>,
        stats: Arc<Stats>,
        cfg: SchedulerConfig,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Scheduler<W>> {
        let permits = Semaphore::new(cfg.parallel.max(1));
        Arc::new(Scheduler {
            cache,
            source,
            stats,
            cfg,
            permits,
            inner: Mutex::new(Inner::default()),
            file_extents: Default::default(),
            runtime,
            degraded_since: Mutex::new(None),
            prefetch_tasks: Default::default(),
            prefetched_bytes: Default::default(),
            in_order: Default::default(),
        })
    }

    /// Takes a waiter whose range (clamped to the blob) is not fully present.
    pub fn submit(self: &Arc<Self>, waiter: W, range: Range<u64>) {
        let unit = self.cfg.fetch_unit;
        let mut units = BTreeSet::new();
        for m in self.cache.missing(range.clone()) {
            self.for_each_unit(m, |u| {
                units.insert(u.start);
            });
        }
        let mut to_start = Vec::new();
        let waiting = {
            let mut inner = self.inner.lock();
            let id = inner.next_id;
            inner.next_id += 1;
            let window = inner.streams.on_miss(&range, unit, self.cfg.max_window);
            let mut remaining = 0usize;
            for u in units {
                if let Some(ids) = inner.inflight.get_mut(&u) {
                    ids.push(id);
                    remaining += 1;
                    continue;
                }
                // Re-check under the lock: a fetch that completed since
                // `missing()` marks present before it takes the lock.
                let needed = self.unit_at(u);
                let needed = needed.start.max(range.start)..needed.end.min(range.end);
                if self.cache.contains(needed) {
                    continue;
                }
                inner.inflight.insert(u, vec![id]);
                remaining += 1;
                to_start.push(u);
            }
            // Read-ahead units of a sequential stream, and the rest of the
            // file the miss lies in: fetched in the same requests, waited on
            // by nobody yet.
            let size = self.cache.blob_size();
            let mut extra = Vec::new();
            if window > 0 {
                // Not past the region of the last byte asked for, nor (when
                // files are known) past the file being read: the next file in
                // the image is often not read at all.
                let stop = self.region_of(range.end.saturating_sub(1)).end;
                let limit = self.file_end(&range).unwrap_or(size).min(stop);
                extra.push(range.end..range.end.saturating_add(window).min(limit));
            }
            if remaining > 0 {
                extra.extend(self.whole_file(&range));
            }
            for ahead in extra {
                for m in self.cache.missing(ahead) {
                    self.for_each_unit(m, |u| {
                        if !inner.inflight.contains_key(&u.start) && !self.cache.contains(u.clone()) {
                            inner.inflight.insert(u.start, Vec::new());
                            to_start.push(u.start);
                        }
                    });
                }
            }
            to_start.sort_unstable();
            to_start.dedup();
            if remaining > 0 {
                inner.waiters.insert(id, Waiting { waiter, range, remaining, since: Instant::now() });
                None
            } else {
                Some(waiter)
            }
        };
        if let Some(waiter) = waiting {
            Stats::add(&self.stats.fast_path_events, 1);
            waiter.allow();
        }
        for run in runs(&to_start, (self.cfg.max_request / unit).max(1), |u| self.unit_at(u).end) {
            let guard = UnitsGuard { scheduler: Arc::clone(self), units: Some(run.clone()) };
            let this = Arc::clone(self);
            self.runtime.spawn(async move { this.fetch_units(run, guard).await });
        }
    }

    /// Background fetch of `ranges`, a few requests at a time, started only
    /// while no reader waits; `rate` caps bytes per second. Units fetched here are in
    /// flight like any other: a reader that needs one waits for it.
    pub async fn prefetch(self: Arc<Self>, ranges: Vec<Range<u64>>, rate: Option<u64>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.prefetch_tasks.fetch_add(1, SeqCst);
        self.prefetch_ranges(ranges, rate).await;
        self.prefetch_tasks.fetch_sub(1, SeqCst);
    }

    async fn prefetch_ranges(self: &Arc<Self>, ranges: Vec<Range<u64>>, rate: Option<u64>) {
        let unit = self.cfg.fetch_unit;
        // Bodies are held whole: in-flight prefetch bytes are agent memory.
        let per_request = (self.cfg.max_request.min(PREFETCH_REQUEST) / unit).max(1);
        let started = Instant::now();
        let mut sent = 0u64;
        let mut in_flight = tokio::task::JoinSet::new();
        for r in crate::ranges::normalize(ranges) {
            let r = r.start.min(self.cache.blob_size())..r.end.min(self.cache.blob_size());
            if r.is_empty() {
                continue;
            }
            let mut pos = r.start;
            while pos < r.end {
                // Several big requests in flight keep the link busy; the
                // rest of the permits stay free for demand.
                while in_flight.len() >= self.prefetch_parallel() {
                    in_flight.join_next().await;
                }
                while self.waiting() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let claimed: Vec<u64> = {
                    let mut inner = self.inner.lock();
                    let mut claimed = Vec::new();
                    let mut batch = 0;
                    while pos < r.end && batch < per_request {
                        let u = self.unit_at(pos);
                        if !inner.inflight.contains_key(&u.start) && !self.cache.contains(u.clone()) {
                            inner.inflight.insert(u.start, Vec::new());
                            claimed.push(u.start);
                        }
                        pos = u.end;
                        batch += 1;
                    }
                    claimed
                };
                for run in runs(&claimed, per_request, |u| self.unit_at(u).end) {
                    let bytes = run.end - run.start;
                    let guard = UnitsGuard { scheduler: Arc::clone(self), units: Some(run.clone()) };
                    in_flight.spawn(Arc::clone(self).fetch_units(run, guard));
                    sent += bytes;
                    Stats::add(&self.prefetched_bytes, bytes);
                    if let Some(rate) = rate.filter(|&r| r > 0) {
                        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
        }
        while in_flight.join_next().await.is_some() {}
        tracing::info!(bytes = sent, "prefetch done");
    }

    /// Prefetch requests in flight at most: half the permits (at least one),
    /// so a reader's miss never waits behind background fetches.
    fn prefetch_parallel(&self) -> usize {
        (self.cfg.parallel / 2).max(1)
    }

    /// Sets each regular file's data extent (sorted, disjoint): a miss
    /// inside a file of at most `whole_file_max` bytes fetches all of it.
    pub fn set_file_extents(&self, extents: Vec<Range<u64>>) {
        *self.file_extents.write() = Arc::new(extents);
    }

    /// The extents of the files `range` starts and ends in, each when it is
    /// small enough to fetch whole.
    fn whole_file(&self, range: &Range<u64>) -> Vec<Range<u64>> {
        let max = self.cfg.whole_file_max;
        if max == 0 || range.is_empty() {
            return Vec::new();
        }
        let extents = Arc::clone(&self.file_extents.read());
        let mut out: Vec<Range<u64>> = Vec::new();
        for at in [range.start, range.end - 1] {
            if let Some(e) = crate::erofs::extent_at(&extents, at) {
                // Never into another region (another source: a bucket image's
                // neighbouring object, the next layer's blob).
                let region = self.region_of(at);
                let e = e.start.max(region.start)..e.end.min(region.end);
                if !e.is_empty() && e.end - e.start <= max && !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Where read-ahead from `range` must stop: the end of the file it lies
    /// in, or `range.end` when files are known and it lies in none; `None`
    /// when no file extents are known.
    fn file_end(&self, range: &Range<u64>) -> Option<u64> {
        let extents = Arc::clone(&self.file_extents.read());
        if extents.is_empty() || range.is_empty() {
            return None;
        }
        Some(crate::erofs::extent_at(&extents, range.end - 1).map_or(range.end, |e| e.end))
    }

    /// The region of the source holding byte `offset` (clamped to the blob; the whole blob if the
    /// source answers a region that does not hold it).
    fn region_of(&self, offset: u64) -> Range<u64> {
        let size = self.cache.blob_size();
        let r = self.source.region(offset);
        let r = r.start..r.end.min(size);
        if r.start <= offset && offset < r.end {
            r
        } else {
            0..size
        }
    }

    /// The fetch unit holding byte `offset`: its fetch-unit-aligned window, cut at the ends of
    /// its region. Named by its first byte.
    fn unit_at(&self, offset: u64) -> Range<u64> {
        let unit = self.cfg.fetch_unit.max(1);
        let region = self.region_of(offset);
        let base = offset - offset % unit;
        base.max(region.start)..base.saturating_add(unit).min(region.end)
    }

    /// Calls `f` with each unit that holds a byte of `range`, in order.
    fn for_each_unit(&self, range: Range<u64>, mut f: impl FnMut(Range<u64>)) {
        let mut pos = range.start;
        while pos < range.end.min(self.cache.blob_size()) {
            let u = self.unit_at(pos);
            if u.end <= pos {
                break;
            }
            pos = u.end;
            f(u);
        }
    }

    async fn fetch_units(self: Arc<Self>, units: Range<u64>, guard: UnitsGuard<W>) {
        // Fetch only from the first to the last missing byte of the run.
        let missing = self.cache.missing(units);
        let ok = match (missing.first(), missing.last()) {
            (Some(first), Some(last)) => self.fetch_and_write(first.start..last.end).await,
            _ => true,
        };
        guard.finish(ok);
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
            Ok(fetched) if fetched.bytes.len() as u64 != range.end - range.start => {
                Stats::add(&self.stats.fetch_errors, 1);
                tracing::error!(?range, got = fetched.bytes.len(), "the source returned the wrong number of bytes; readers get EIO");
                false
            }
            Ok(fetched) => {
                Stats::add(&self.stats.fetch_errors, u64::from(fetched.failed_attempts));
                Stats::add(&self.stats.fetched_bytes, fetched.bytes.len() as u64);
                let cache = Arc::clone(&self.cache);
                let start = range.start;
                let digest = Arc::clone(&self.in_order);
                let written = tokio::task::spawn_blocking(move || {
                    let written = cache.write_range(start, &fetched.bytes);
                    if written.is_ok() {
                        digest.advance(&cache);
                    }
                    written
                })
                .await;
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
            let mut inner = self.inner.lock();
            let mut starts = Vec::new();
            self.for_each_unit(units, |u| starts.push(u.start));
            for u in starts {
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
            // A fetch that said it succeeded proves nothing: the bytes must be there.
            if self.cache.contains(w.range.clone()) {
                w.waiter.allow();
            } else {
                tracing::error!(range = ?w.range, "a fetch reported success but the range is not present; EIO");
                Stats::add(&self.stats.denied_events, 1);
                w.waiter.deny(libc::EIO);
            }
        }
        for w in failed {
            self.stats.event_wait.observe(w.since.elapsed());
            Stats::add(&self.stats.denied_events, 1);
            w.waiter.deny(libc::EIO);
        }
    }

    fn policy(&self) -> RetryPolicy {
        let degraded = self.degraded_since.lock().is_some_and(|t| t.elapsed() < DEGRADED_FOR);
        if degraded {
            RetryPolicy { max_attempts: 1, ..self.cfg.retry.clone() }
        } else {
            self.cfg.retry.clone()
        }
    }

    fn set_degraded(&self, failed: bool) {
        *self.degraded_since.lock() = if failed { Some(Instant::now()) } else { None };
    }

    /// Events still waiting (for status and tests).
    pub fn waiting(&self) -> usize {
        self.inner.lock().waiters.len()
    }
}

/// Splits sorted units (first bytes; `end_of` gives each one's end) into runs of adjacent units,
/// each at most `max` units long, as byte ranges.
fn runs(units: &[u64], max: u64, end_of: impl Fn(u64) -> u64) -> Vec<Range<u64>> {
    let mut out: Vec<(Range<u64>, u64)> = Vec::new();
    for &u in units {
        match out.last_mut() {
            Some((r, n)) if r.end == u && *n < max => {
                r.end = end_of(u);
                *n += 1;
            }
            _ => out.push((u..end_of(u), 1)),
        }
    }
    out.into_iter().map(|(r, _)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::mpsc;

    /// A waiter that reports its answer on a channel.
    struct Probe {
        id: u32,
        tx: mpsc::Sender<(u32, Result<(), i32>)>,
    }

    impl Waiter for Probe {
        fn allow(self) {
            let _ = self.tx.send((self.id, Ok(())));
        }
        fn deny(self, errno: i32) {
            let _ = self.tx.send((self.id, Err(errno)));
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Behaviour {
        Serve,
        Fail,
        Panic,
        /// Reports success without the bytes the range needs (a short body the source did not catch).
        Short,
    }

    /// An in-memory blob that counts requests; `gate` holds fetches until released.
    struct Blob {
        data: Vec<u8>,
        requests: AtomicU64,
        ranges: Mutex<Vec<Range<u64>>>,
        behaviour: Behaviour,
        gate: tokio::sync::Semaphore,
        /// Regions end here (as two segments of a layout would).
        split: Option<u64>,
    }

    impl RangeSource for Blob {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, crate::remote::FetchError>> {
            Box::pin(async move {
                let _open = self.gate.acquire().await;
                self.requests.fetch_add(1, SeqCst);
                self.ranges.lock().push(range.clone());
                match self.behaviour {
                    Behaviour::Serve => Ok(Bytes::copy_from_slice(&self.data[range.start as usize..range.end as usize])),
                    Behaviour::Fail => Err(crate::remote::FetchError::Permanent("gone".into())),
                    Behaviour::Panic => panic!("a source bug"),
                    Behaviour::Short => Ok(Bytes::copy_from_slice(&self.data[range.start as usize..range.start as usize + 100])),
                }
            })
        }
        fn describe(&self) -> String {
            "test blob".into()
        }
        fn region(&self, offset: u64) -> Range<u64> {
            match self.split {
                Some(s) if offset < s => 0..s,
                Some(s) => s..self.size(),
                None => 0..self.size(),
            }
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        _rt: tokio::runtime::Runtime,
        blob: Arc<Blob>,
        cache: Arc<CacheFile>,
        scheduler: Arc<Scheduler<Probe>>,
        tx: mpsc::Sender<(u32, Result<(), i32>)>,
        rx: mpsc::Receiver<(u32, Result<(), i32>)>,
    }

    const UNIT: u64 = 64 << 10;

    fn rig(behaviour: Behaviour, held: bool) -> Rig {
        rig_split(behaviour, held, None)
    }

    fn rig_split(behaviour: Behaviour, held: bool, split: Option<u64>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let size = 40 * UNIT + 1000;
        let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let path = dir.path().join("blob");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let cache = Arc::new(CacheFile::open(&path, size).unwrap());
        let gate = tokio::sync::Semaphore::new(if held { 0 } else { tokio::sync::Semaphore::MAX_PERMITS });
        let blob = Arc::new(Blob { data, requests: AtomicU64::new(0), ranges: Mutex::new(Vec::new()), behaviour, gate, split });
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let cfg = SchedulerConfig {
            fetch_unit: UNIT,
            max_window: 8 * UNIT,
            max_request: 4 * UNIT,
            parallel: 4,
            retry: RetryPolicy { max_attempts: 1, deadline: Duration::from_secs(5), ..RetryPolicy::default() },
            whole_file_max: 3 * UNIT,
        };
        let scheduler = Scheduler::new(Arc::clone(&cache), blob.clone(), Arc::new(Stats::default()), cfg, rt.handle().clone());
        let (tx, rx) = mpsc::channel();
        Rig { _dir: dir, _rt: rt, blob, cache, scheduler, tx, rx }
    }

    impl Rig {
        fn submit(&self, id: u32, range: Range<u64>) {
            self.scheduler.submit(Probe { id, tx: self.tx.clone() }, range);
        }
        fn answers(&self, n: usize) -> Vec<(u32, Result<(), i32>)> {
            let mut got: Vec<_> = (0..n).map(|_| self.rx.recv_timeout(Duration::from_secs(10)).expect("an answer")).collect();
            got.sort_by_key(|a| a.0);
            got
        }
        fn release(&self) {
            self.blob.gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS >> 4);
        }
    }

    #[test]
    fn a_miss_is_fetched_once_for_all_its_waiters_and_then_allowed() {
        // The last unit: a sequential stream there has nothing to read ahead.
        let r = rig(Behaviour::Serve, true);
        let (last, size) = (40 * UNIT, r.cache.blob_size());
        r.submit(1, last..last + 100);
        r.submit(2, last + 100..last + 200);
        r.submit(3, last + 500..size);
        assert_eq!(r.scheduler.waiting(), 3, "all three wait for the same unit");
        r.release();
        assert_eq!(r.answers(3), vec![(1, Ok(())), (2, Ok(())), (3, Ok(()))]);
        assert_eq!(r.blob.requests.load(SeqCst), 1, "one request for one unit");
        assert!(r.cache.contains(last..size));
        // Present now: answered at once, no request.
        r.submit(4, last..size);
        assert_eq!(r.answers(1), vec![(4, Ok(()))]);
        assert_eq!(r.blob.requests.load(SeqCst), 1);
    }

    #[test]
    fn adjacent_missing_units_travel_in_one_request() {
        let r = rig(Behaviour::Serve, true);
        r.submit(1, 0..3 * UNIT);
        r.release();
        assert_eq!(r.answers(1), vec![(1, Ok(()))]);
        assert_eq!(r.blob.requests.load(SeqCst), 1);
        assert_eq!(r.blob.ranges.lock().clone(), vec![0..3 * UNIT]);
        // Longer than max_request: split.
        r.submit(2, 8 * UNIT..14 * UNIT);
        assert_eq!(r.answers(1), vec![(2, Ok(()))]);
        assert_eq!(r.blob.requests.load(SeqCst), 3);
    }

    #[test]
    fn the_end_of_the_blob_is_clamped() {
        let r = rig(Behaviour::Serve, false);
        let size = r.cache.blob_size();
        r.submit(1, size - 500..size);
        assert_eq!(r.answers(1), vec![(1, Ok(()))]);
        assert_eq!(r.blob.ranges.lock().clone(), vec![40 * UNIT..size]);
    }

    #[test]
    fn failures_panics_and_short_successes_deny_with_eio() {
        for behaviour in [Behaviour::Fail, Behaviour::Panic, Behaviour::Short] {
            let r = rig(behaviour, false);
            r.submit(1, 0..4096);
            r.submit(2, 10 * UNIT..10 * UNIT + 4096);
            assert_eq!(r.answers(2), vec![(1, Err(libc::EIO)), (2, Err(libc::EIO))]);
            assert_eq!(r.scheduler.waiting(), 0, "nothing left waiting");
            assert!(!r.cache.contains(0..4096));
            // The dead entry does not swallow later events: they are fetched again.
            r.submit(3, 0..4096);
            assert_eq!(r.answers(1), vec![(3, Err(libc::EIO))]);
        }
    }

    #[test]
    fn sequential_misses_read_ahead_in_the_same_request() {
        let r = rig(Behaviour::Serve, false);
        r.submit(1, 0..4096);
        assert_eq!(r.answers(1), vec![(1, Ok(()))]);
        r.submit(2, UNIT..UNIT + 4096);
        assert_eq!(r.answers(1), vec![(2, Ok(()))]);
        // The second miss continued the stream: its request carried read-ahead units.
        let ranges = r.blob.ranges.lock().clone();
        assert_eq!(ranges[0], 0..UNIT);
        assert!(ranges[1].end > 2 * UNIT, "{ranges:?}");
    }

    #[test]
    fn units_and_read_ahead_stop_at_a_region_end() {
        // Regions 0..split and split..end, split inside a unit.
        let split = 5 * UNIT + 8192;
        let r = rig_split(Behaviour::Serve, false, Some(split));
        // A sequential stream up to the region's end: read-ahead stops there.
        r.submit(1, 3 * UNIT..3 * UNIT + 4096);
        r.submit(2, 4 * UNIT..4 * UNIT + 4096);
        r.submit(3, 5 * UNIT..split);
        assert_eq!(r.answers(3), vec![(1, Ok(())), (2, Ok(())), (3, Ok(()))]);
        let ranges = r.blob.ranges.lock().clone();
        assert!(ranges.iter().all(|f| f.end <= split), "a fetch crossed the region end: {ranges:?}");
        assert!(!r.cache.contains(split..split + 1));
        // The next region's first unit is cut at its start: only its own bytes are fetched.
        r.submit(4, split..split + 100);
        assert_eq!(r.answers(1), vec![(4, Ok(()))]);
        assert_eq!(r.blob.ranges.lock().last().cloned(), Some(split..6 * UNIT));
        // A range across the boundary is both regions' units, in one request.
        r.submit(5, 10 * UNIT..10 * UNIT + 10);
        assert_eq!(r.answers(1), vec![(5, Ok(()))]);
    }

    #[test]
    fn a_unit_cut_by_a_region_is_found_again_by_its_first_byte() {
        let split = 2 * UNIT + 4096;
        let r = rig_split(Behaviour::Serve, true, Some(split));
        r.submit(1, split - 4096..split);
        r.submit(2, split - 100..split);
        r.submit(3, split..split + 4096);
        assert_eq!(r.scheduler.waiting(), 3);
        r.release();
        assert_eq!(r.answers(3), vec![(1, Ok(())), (2, Ok(())), (3, Ok(()))]);
        let mut ranges = r.blob.ranges.lock().clone();
        ranges.sort_by_key(|f| f.start);
        // One request per region (the second one continues the stream: read-ahead in its region).
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert_eq!(ranges[0], 2 * UNIT..split);
        assert_eq!(ranges[1].start, split);
        assert!(r.scheduler.inner.lock().inflight.is_empty());
    }

    #[test]
    fn sequential_misses_grow_the_window_and_random_ones_do_not() {
        let mut s = Streams::default();
        let unit = 1 << 20;
        let max = 8 << 20;
        let m = |start: u64| start..start + 262_144;
        // Each miss comes where the previous fetch (unit-rounded) ended.
        assert_eq!(s.on_miss(&m(0), unit, max), 0);
        assert_eq!(s.on_miss(&m(1 << 20), unit, max), unit);
        assert_eq!(s.on_miss(&m(3 << 20), unit, max), 2 * unit);
        assert_eq!(s.on_miss(&m(6 << 20), unit, max), 4 * unit);
        assert_eq!(s.on_miss(&m(11 << 20), unit, max), 8 * unit);
        assert_eq!(s.on_miss(&m(20 << 20), unit, max), 8 * unit, "capped");
        // A miss far away is a new (random) stream.
        assert_eq!(s.on_miss(&(900 << 20..(900 << 20) + 4096), unit, max), 0);
    }

    #[test]
    fn a_miss_inside_a_small_file_fetches_the_whole_file_in_one_request() {
        let r = rig(Behaviour::Serve, false);
        // Files: 2.5 units at 10 units, 6 units (too big) at 20 units.
        let small = 10 * UNIT..10 * UNIT + 5 * UNIT / 2;
        let big = 20 * UNIT..26 * UNIT;
        r.scheduler.set_file_extents(vec![small.clone(), big.clone()]);
        // A 16 KiB read in the middle of the small file.
        let mid = 11 * UNIT + 4096;
        r.submit(1, mid..mid + 16384);
        assert_eq!(r.answers(1), vec![(1, Ok(()))]);
        assert!(r.cache.contains(small.clone()), "the whole file is present");
        assert_eq!(r.blob.requests.load(SeqCst), 1, "in one request: {:?}", r.blob.ranges.lock());
        // Reading the rest of it raises no request.
        r.submit(2, small.start..small.end);
        assert_eq!(r.answers(1), vec![(2, Ok(()))]);
        assert_eq!(r.blob.requests.load(SeqCst), 1);
        // A file above the bound: only the unit of the miss.
        r.submit(3, big.start + 3 * UNIT..big.start + 3 * UNIT + 4096);
        assert_eq!(r.answers(1), vec![(3, Ok(()))]);
        assert_eq!(r.blob.ranges.lock().last().cloned(), Some(23 * UNIT..24 * UNIT));
        assert!(!r.cache.contains(big.start..big.start + UNIT));
        // A miss outside every file: only its unit.
        r.submit(4, 30 * UNIT..30 * UNIT + 100);
        assert_eq!(r.answers(1), vec![(4, Ok(()))]);
        assert_eq!(r.blob.ranges.lock().last().cloned(), Some(30 * UNIT..31 * UNIT));
    }

    #[test]
    fn read_ahead_stops_at_the_end_of_the_file_being_read() {
        let r = rig(Behaviour::Serve, false);
        // Two big files back to back (above the whole-file bound): 0..5 units, 5..12 units.
        r.scheduler.set_file_extents(vec![0..5 * UNIT, 5 * UNIT..12 * UNIT]);
        r.submit(1, 0..4096);
        r.submit(2, UNIT..UNIT + 4096);
        r.submit(3, 3 * UNIT..3 * UNIT + 4096);
        assert_eq!(r.answers(3).len(), 3);
        // The stream grew its window, but nothing of the second file was fetched.
        assert!(r.cache.contains(3 * UNIT..5 * UNIT), "{:?}", r.blob.ranges.lock());
        assert!(!r.cache.contains(5 * UNIT..5 * UNIT + 4096), "{:?}", r.blob.ranges.lock());
    }

    #[test]
    fn prefetch_keeps_several_requests_in_flight_and_leaves_permits_for_demand() {
        let r = rig(Behaviour::Serve, true);
        let task = r._rt.spawn(Arc::clone(&r.scheduler).prefetch(std::iter::once(0..16 * UNIT).collect(), None));
        // Gate held: the prefetch claims units for half the permits (2 requests of 4 units).
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.scheduler.inner.lock().inflight.len() < 8 {
            assert!(Instant::now() < deadline, "prefetch did not put two requests in flight");
            std::thread::yield_now();
        }
        assert_eq!(r.scheduler.inner.lock().inflight.len(), 8, "no more than half the permits");
        r.release();
        r._rt.block_on(task).unwrap();
        assert!(r.cache.contains(0..16 * UNIT));
        assert_eq!(r.blob.requests.load(SeqCst), 4);
    }

    #[test]
    fn runs_split_on_gaps_and_length() {
        let end = |u: u64| u + 10;
        assert_eq!(runs(&[10, 20, 30, 50, 60, 90], 8, end), vec![10..40, 50..70, 90..100]);
        assert_eq!(runs(&[0, 10, 20, 30, 40], 2, end), vec![0..20, 20..40, 40..50]);
        assert!(runs(&[], 4, end).is_empty());
        // Units cut short at a region's end are still adjacent to the next region's first.
        let cut = |u: u64| if u == 0 { 7 } else { u + 10 };
        assert_eq!(runs(&[0, 7, 17], 8, cut), vec![0..27]);
    }
}
