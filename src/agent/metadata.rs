//! Making ranges local before the mount: the metadata walk's reader and the
//! bulk "ensure present" used for the walk's output.
//!
//! Requests are coalesced (a round trip costs far more than a few KiB of
//! gap) and issued in parallel; data goes through the cache file, so what the
//! walk fetched is reused by the kernel and by later mounts.

use std::ops::Range;
use std::sync::Arc;

use futures_util::stream::{self, TryStreamExt};

use crate::cache::CacheFile;
use crate::erofs::{MetaReader, WalkError};
use crate::ranges;
use crate::remote::{fetch_with_retry, RangeSource, RetryPolicy};

use super::stats::Stats;

/// Gaps up to this size are fetched rather than split into two requests.
const COALESCE_GAP: u64 = 64 << 10;
/// Upper bound of one coalesced request.
const MAX_REQUEST: u64 = 8 << 20;

pub struct Fetcher {
    pub cache: Arc<CacheFile>,
    pub source: Arc<dyn RangeSource>,
    pub stats: Arc<Stats>,
    pub retry: RetryPolicy,
    pub parallel: usize,
}

impl Fetcher {
    /// Fetches whatever part of `wanted` is missing, in few parallel requests.
    pub async fn ensure_present(&self, wanted: &[Range<u64>]) -> Result<(), String> {
        self.ensure_present_with_gap(wanted, COALESCE_GAP).await
    }

    /// As [`Fetcher::ensure_present`], merging ranges whose gap is at most `gap`.
    pub async fn ensure_present_with_gap(&self, wanted: &[Range<u64>], gap: u64) -> Result<(), String> {
        let size = self.cache.blob_size();
        let mut missing = Vec::new();
        for r in ranges::align_out(wanted, 4096, size) {
            missing.extend(self.cache.missing(r));
        }
        let requests = ranges::coalesce(missing, gap, MAX_REQUEST);
        stream::iter(requests.into_iter().map(Ok::<_, String>))
            .map_ok(|r| self.fetch_one(r))
            .try_buffer_unordered(self.parallel.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn fetch_one(&self, range: Range<u64>) -> Result<(), String> {
        Stats::add(&self.stats.fetch_requests, 1);
        let fetched = fetch_with_retry(self.source.as_ref(), range.clone(), &self.retry)
            .await
            .map_err(|(e, attempts)| {
                Stats::add(&self.stats.fetch_errors, u64::from(attempts));
                e.to_string()
            })?;
        Stats::add(&self.stats.fetch_errors, u64::from(fetched.failed_attempts));
        Stats::add(&self.stats.fetched_bytes, fetched.bytes.len() as u64);
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || cache.write_range(range.start, &fetched.bytes))
            .await
            .map_err(|e| format!("cache write task failed: {e}"))?
            .map_err(|e| format!("cannot write the cache file: {e}"))
    }
}

/// The walker's view of the image: prefetch through the [`Fetcher`], read
/// from the cache file. Runs on a blocking thread; drives async fetches with
/// the runtime handle.
pub struct CacheMetaReader {
    pub fetcher: Arc<Fetcher>,
    pub handle: tokio::runtime::Handle,
}

impl MetaReader for CacheMetaReader {
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError> {
        let fetcher = Arc::clone(&self.fetcher);
        let wanted = ranges.to_vec();
        self.handle
            .block_on(async move { fetcher.ensure_present(&wanted).await })
            .map_err(WalkError::Io)
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
