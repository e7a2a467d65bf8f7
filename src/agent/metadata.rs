//! Making ranges local before the mount: the metadata walk's reader and the
//! bulk "ensure present" used for the walk's output (or for ranges known
//! beforehand, e.g. from an index artifact: hand them to
//! [`Fetcher::ensure_present`]).
//!
//! Requests are planned by the link's measured break-even gap and go out as
//! multi-range requests where the source takes them
//! ([`crate::remote::plan_requests`]), several at a time; data goes through
//! the cache file, so what the walk fetched is reused by the kernel and by
//! later mounts. The walk's reader is pipelined: each batch of the walk is
//! fetched by its own task while the walk goes on with what has arrived.

use std::ops::Range;
use std::sync::{mpsc, Arc};

use futures_util::stream::{self, TryStreamExt};
use tokio::sync::Semaphore;

use crate::cache::CacheFile;
use crate::erofs::{MetaReader, WalkError};
use crate::ranges;
use crate::remote::{fetch_many_with_retry, plan_requests, RangeSource, RequestLimits, RetryPolicy};

use super::stats::Stats;

/// Largest range [`Fetcher::ensure_present_with_gap`] makes of ranges and their gaps.
const MAX_MERGED_RANGE: u64 = 8 << 20;

pub struct Fetcher {
    pub cache: Arc<CacheFile>,
    pub source: Arc<dyn RangeSource>,
    pub stats: Arc<Stats>,
    pub retry: RetryPolicy,
    /// Requests in flight at most, over all callers.
    permits: Semaphore,
    parallel: usize,
}

impl Fetcher {
    pub fn new(cache: Arc<CacheFile>, source: Arc<dyn RangeSource>, stats: Arc<Stats>, retry: RetryPolicy, parallel: usize) -> Fetcher {
        let parallel = parallel.max(1);
        Fetcher { cache, source, stats, retry, permits: Semaphore::new(parallel), parallel }
    }

    /// The requests that would fetch the missing part of `wanted` now.
    pub fn plan(&self, wanted: &[Range<u64>]) -> Vec<Vec<Range<u64>>> {
        let size = self.cache.blob_size();
        let mut missing = Vec::new();
        for r in ranges::align_out(wanted, 4096, size) {
            missing.extend(self.cache.missing(r));
        }
        if missing.is_empty() {
            return Vec::new();
        }
        plan_requests(missing, &self.source.link(), self.source.multi_range(), &RequestLimits::default())
    }

    /// As [`Fetcher::ensure_present`], with ranges whose gap is at most `gap` fetched as one
    /// (gaps included): for ranges known up front, where a request costs more than the gap.
    pub async fn ensure_present_with_gap(&self, wanted: &[Range<u64>], gap: u64) -> Result<(), String> {
        let merged = ranges::coalesce(wanted.to_vec(), gap, MAX_MERGED_RANGE);
        self.ensure_present(&merged).await
    }

    /// Fetches whatever part of `wanted` is missing, in few parallel requests.
    pub async fn ensure_present(&self, wanted: &[Range<u64>]) -> Result<(), String> {
        let requests = self.plan(wanted);
        stream::iter(requests.into_iter().map(Ok::<_, String>))
            .map_ok(|r| self.fetch_request(r))
            .try_buffer_unordered(self.parallel)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// One planned request (one multi-range request, or a few where the
    /// source falls back), written to the cache file.
    async fn fetch_request(&self, asked: Vec<Range<u64>>) -> Result<(), String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let result = fetch_many_with_retry(self.source.as_ref(), asked.clone(), &self.retry).await;
        self.stats.fetch_latency.observe(started.elapsed());
        let fetched = result.map_err(|(e, attempts)| {
            Stats::add(&self.stats.fetch_requests, u64::from(attempts));
            Stats::add(&self.stats.fetch_errors, u64::from(attempts));
            e.to_string()
        })?;
        Stats::add(&self.stats.fetch_requests, u64::from(fetched.parts.requests.max(1)));
        Stats::add(&self.stats.fetch_errors, u64::from(fetched.failed_attempts));
        let parts = fetched.parts.bytes;
        if parts.len() != asked.len() || parts.iter().zip(&asked).any(|(b, r)| b.len() as u64 != r.end - r.start) {
            return Err(format!("{}: the source returned other bytes than asked", self.source.describe()));
        }
        let bytes: u64 = parts.iter().map(|b| b.len() as u64).sum();
        tracing::debug!(parts = asked.len(), bytes, requests = fetched.parts.requests, elapsed = ?started.elapsed(), "metadata request");
        Stats::add(&self.stats.fetched_bytes, bytes);
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || {
            for (r, bytes) in asked.iter().zip(&parts) {
                cache.write_range(r.start, bytes)?;
            }
            Ok::<_, crate::cache::CacheFileError>(())
        })
        .await
        .map_err(|e| format!("cache write task failed: {e}"))?
        .map_err(|e| format!("cannot write the cache file: {e}"))
    }
}

/// What one fetched batch reports to the walk.
type Arrival = (Vec<Range<u64>>, Result<(), String>);

/// The walker's view of the image: batches are fetched through the
/// [`Fetcher`] by tasks on the runtime (pipelined), reads come from the
/// cache file. Runs on a blocking thread.
pub struct CacheMetaReader {
    fetcher: Arc<Fetcher>,
    handle: tokio::runtime::Handle,
    tx: mpsc::Sender<Arrival>,
    rx: mpsc::Receiver<Arrival>,
    outstanding: usize,
}

impl CacheMetaReader {
    pub fn new(fetcher: Arc<Fetcher>, handle: tokio::runtime::Handle) -> CacheMetaReader {
        let (tx, rx) = mpsc::channel();
        CacheMetaReader { fetcher, handle, tx, rx, outstanding: 0 }
    }
}

impl MetaReader for CacheMetaReader {
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError> {
        let fetcher = Arc::clone(&self.fetcher);
        let wanted = ranges.to_vec();
        self.handle
            .block_on(async move { fetcher.ensure_present(&wanted).await })
            .map_err(WalkError::Io)
    }

    fn submit(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, WalkError> {
        let cache = &self.fetcher.cache;
        if ranges.iter().all(|r| cache.contains(r.clone())) {
            return Ok(ranges.to_vec());
        }
        let fetcher = Arc::clone(&self.fetcher);
        let tx = self.tx.clone();
        let batch = ranges.to_vec();
        self.outstanding += 1;
        self.handle.spawn(async move {
            let result = fetcher.ensure_present(&batch).await;
            // The walk may have stopped (an error elsewhere): nobody listens.
            let _ = tx.send((batch, result));
        });
        Ok(Vec::new())
    }

    fn wait(&mut self) -> Result<Vec<Range<u64>>, WalkError> {
        if self.outstanding == 0 {
            return Err(WalkError::Io("internal: nothing is being fetched".into()));
        }
        let (batch, result) = self
            .rx
            .recv()
            .map_err(|_| WalkError::Io("internal: a metadata fetch task vanished".into()))?;
        self.outstanding -= 1;
        result.map_err(WalkError::Io)?;
        Ok(batch)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| WalkError::Corrupt(format!("read at {offset} overflows")))?;
        if end > self.fetcher.cache.blob_size() {
            return Err(WalkError::Corrupt(format!("read {offset}..{end} past the end of the image")));
        }
        if !self.fetcher.cache.contains(offset..end) {
            self.prefetch(std::slice::from_ref(&(offset..end)))?;
        }
        self.fetcher
            .cache
            .read_at(offset, buf)
            .map_err(|e| WalkError::Io(format!("cannot read the cache file: {e}")))
    }
}

/// Per-file data extents kept with a cache entry (so a later mount, which
/// needs no walk, still fetches whole files): little-endian `u64` pairs.
pub const FILE_EXTENTS_FILE: &str = "file-extents.bin";
/// Extents read back at most (the walk keeps no more).
const MAX_STORED_EXTENTS: usize = 1 << 21;

pub fn save_file_extents(dir: &std::path::Path, extents: &[Range<u64>]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(extents.len().min(MAX_STORED_EXTENTS) * 16);
    for r in extents.iter().take(MAX_STORED_EXTENTS) {
        buf.extend_from_slice(&r.start.to_le_bytes());
        buf.extend_from_slice(&r.end.to_le_bytes());
    }
    let tmp = dir.join(format!("{FILE_EXTENTS_FILE}.tmp"));
    std::fs::write(&tmp, &buf)?;
    std::fs::rename(&tmp, dir.join(FILE_EXTENTS_FILE))
}

/// The stored extents, if present and sane (sorted, disjoint, inside the
/// blob); anything else reads as none.
pub fn load_file_extents(dir: &std::path::Path, blob_size: u64) -> Option<Vec<Range<u64>>> {
    let buf = std::fs::read(dir.join(FILE_EXTENTS_FILE)).ok()?;
    if buf.len() % 16 != 0 || buf.len() / 16 > MAX_STORED_EXTENTS {
        return None;
    }
    let mut out: Vec<Range<u64>> = Vec::with_capacity(buf.len() / 16);
    for c in buf.chunks_exact(16) {
        let (s, e) = c.split_at(8);
        let s = u64::from_le_bytes(s.try_into().ok()?);
        let e = u64::from_le_bytes(e.try_into().ok()?);
        let sorted = out.last().is_none_or(|l| l.end <= s);
        if s >= e || e > blob_size || !sorted {
            return None;
        }
        out.push(s..e);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erofs::{walk_with, WalkLimits, WalkOptions};
    use crate::remote::{FetchError, LinkEstimate, MultiRange, Parts};
    use bytes::Bytes;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::time::Duration;

    /// An in-memory blob behind a link of 5 ms per request that takes
    /// multi-range requests; counts requests and the most in flight.
    struct SlowBlob {
        data: Vec<u8>,
        requests: AtomicU64,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
    }

    impl SlowBlob {
        async fn serve(&self, ranges: &[Range<u64>]) -> Vec<Bytes> {
            self.requests.fetch_add(1, SeqCst);
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, SeqCst);
            ranges.iter().map(|r| Bytes::copy_from_slice(&self.data[r.start as usize..r.end as usize])).collect()
        }
    }

    impl RangeSource for SlowBlob {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move { Ok(self.serve(&[range]).await.remove(0)) })
        }
        fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
            Box::pin(async move { Ok(Parts { bytes: self.serve(&ranges).await, requests: 1 }) })
        }
        fn multi_range(&self) -> MultiRange {
            MultiRange::Supported
        }
        fn link(&self) -> LinkEstimate {
            LinkEstimate { latency: Duration::from_millis(5), bandwidth: 12.5e6, part_cost: Duration::from_micros(500) }
        }
        fn describe(&self) -> String {
            "slow blob".into()
        }
    }

    /// A tree 10 levels deep, 3 directories of 60 files on each level.
    fn deep_image() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut p = dir.path().join("tree");
        for level in 0..10 {
            for d in 0..3 {
                let sub = p.join(format!("dir-{d}"));
                std::fs::create_dir_all(&sub).unwrap();
                for f in 0..60 {
                    std::fs::write(sub.join(format!("file-with-a-longer-name-{f:03}")), vec![level as u8; 100 + 97 * f]).unwrap();
                }
            }
            p = p.join("dir-0");
        }
        let (t, _) = crate::build::dir::tree_from_dir(&dir.path().join("tree")).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        crate::erofs::writer::write_image(&t, &Default::default(), &crate::build::LocalFiles, &mut out).unwrap();
        out.into_inner()
    }

    /// The agent's walk: batches go out as multi-range requests, pipelined;
    /// without the contiguous guess it still costs about a round trip per
    /// level and a request per batch, with the guess two round trips.
    #[test]
    fn the_agent_walk_costs_a_request_per_batch_and_a_round_trip_per_level() {
        let data = deep_image();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        for guess in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("blob");
            std::fs::File::create(&path).unwrap().set_len(data.len() as u64).unwrap();
            let cache = Arc::new(CacheFile::open(&path, data.len() as u64).unwrap());
            let blob = Arc::new(SlowBlob { data: data.clone(), requests: AtomicU64::new(0), in_flight: AtomicU64::new(0), max_in_flight: AtomicU64::new(0) });
            let stats = Arc::new(Stats::default());
            let fetcher = Arc::new(Fetcher::new(Arc::clone(&cache), blob.clone(), Arc::clone(&stats), RetryPolicy::default(), 8));
            // The agent's head is the probe (64 KiB); the plain walk reads one page first.
            let opts = if guess { WalkOptions { first_read: 64 << 10, contiguous_guess_max: 64 << 20 } } else { WalkOptions { first_read: 4096, contiguous_guess_max: 0 } };
            let mut reader = CacheMetaReader::new(Arc::clone(&fetcher), rt.handle().clone());
            let size = data.len() as u64;
            let map = std::thread::spawn(move || walk_with(&mut reader, size, &WalkLimits::default(), &opts)).join().unwrap().unwrap();
            let requests = blob.requests.load(SeqCst);
            eprintln!(
                "guess {guess}: depth {} round trips {} batches {} requests {} (max {} in flight)",
                map.depth, map.round_trips, map.prefetch_calls, requests, blob.max_in_flight.load(SeqCst)
            );
            assert_eq!(map.depth, 11);
            assert_eq!(map.directories, 31);
            assert_eq!(Stats::get(&stats.fetch_requests), requests);
            assert!(requests <= u64::from(map.prefetch_calls), "{requests} requests for {} batches", map.prefetch_calls);
            // Then the rest of what the mount needs, as prepare does: little more.
            rt.block_on(fetcher.ensure_present(&map.required)).unwrap();
            assert!(map.required.iter().all(|r| cache.contains(r.clone())));
            let after = blob.requests.load(SeqCst);
            assert!(after <= requests + 2, "{after} requests after the walk's {requests}");
            if guess {
                assert!(map.round_trips <= 2, "{} round trips", map.round_trips);
                assert!(requests <= 2, "{requests}");
            } else {
                assert!(map.round_trips >= map.depth && map.round_trips <= 2 * map.depth + 3, "{} round trips", map.round_trips);
                assert!(requests <= 2 * u64::from(map.depth) + 3, "{requests}");
            }
        }
    }

    #[test]
    fn file_extents_round_trip_and_bad_files_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let list = vec![4096..8192, 8192..20480, 1 << 20..3 << 20];
        save_file_extents(dir.path(), &list).unwrap();
        assert_eq!(load_file_extents(dir.path(), 4 << 20), Some(list.clone()));
        assert_eq!(load_file_extents(dir.path(), 2 << 20), None, "past the blob");
        std::fs::write(dir.path().join(FILE_EXTENTS_FILE), [0u8; 17]).unwrap();
        assert_eq!(load_file_extents(dir.path(), 4 << 20), None, "truncated");
        save_file_extents(dir.path(), &[8192..9000, 4096..5000]).unwrap();
        assert_eq!(load_file_extents(dir.path(), 4 << 20), None, "unsorted");
    }
}
