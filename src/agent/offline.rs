//! Serving a cache entry while its source cannot be reached (issue 12, item 9).
//!
//! A content-addressed blob (its digest is known) whose cache entry holds the metadata needs no
//! network to mount: the bytes the cache holds are the blob's, and a complete entry was checked
//! against the digest. Such a mount starts with a [`DeferredSource`] in place of the opened source:
//! it opens the real one on the first fetch that needs it, and again after each failure, so reads of
//! missing data work once the network is back and get `EIO` after the retry bound until then.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use crate::http::ClientConfig;
use crate::remote::{FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

use erofs_fanotify_state::{self as state, CacheDir, CacheEntry};

use super::metadata::Fetcher;
use super::prepare::Prepared;
use super::sources::{open_source, SourceSpec};
use super::stats::Stats;
use super::worker::WorkerContext;
use super::{AgentConfig, AgentError};

/// How long a transient failure to open the source is retried: long enough for a blip (a 503, a
/// reset), short enough that a mount of a host that is down fails soon with its one line.
const OPEN_RETRY_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the source again after the transient failure `first`, with backoff, until
/// `min(retry_timeout, 5 s)` has passed; a permanent failure ends it at once.
pub(super) async fn open_retrying(
    cfg: &AgentConfig,
    http: &ClientConfig,
    first: super::sources::OpenError,
) -> Result<super::sources::OpenedSource, AgentError> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    let mut last = first;
    let bound = cfg.retry_timeout().min(OPEN_RETRY_BOUND);
    while last.is_transient() && started.elapsed() + pause < bound {
        tracing::info!(error = %last, "opening the source failed; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
        match open_source(&cfg.source, http).await {
            Ok(opened) => return Ok(opened),
            Err(e) => last = e,
        }
    }
    Err(AgentError::Source(last.to_string()))
}

/// Stage 1 when the source cannot be opened: the cache entry of a blob named by digest, with its
/// metadata local, is served from the cache. Anything less fails with `why` (the open error), and
/// leaves the entry as it was.
pub(super) fn prepare_offline(
    cfg: &AgentConfig,
    ctx: &WorkerContext,
    http: ClientConfig,
    why: String,
) -> Result<Prepared, AgentError> {
    let refuse = || AgentError::Source(why.clone());
    let Some(digest) = cfg.source.digest() else { return Err(refuse()) };
    if state::check_cache_filesystem(&cfg.cache_dir).is_err() {
        return Err(refuse());
    }
    let cache_dir = CacheDir::new(cfg.cache_dir.clone());
    let entry: CacheEntry = match CacheEntry::open_existing(&cache_dir, &cfg.cache_key) {
        Ok(Some(entry)) if entry.meta().digest.as_deref() == Some(digest.as_str()) => entry,
        _ => return Err(refuse()),
    };
    let Some(required) = entry.required_ranges() else { return Err(refuse()) };
    let cache = Arc::new(super::prepare::open_cache_file(&entry, ctx)?);
    if required.iter().any(|r| !cache.contains(r.clone())) {
        return Err(refuse());
    }
    let size = entry.blob_size();
    let mut probe = vec![0u8; crate::remote::PROBE_LEN.min(size) as usize];
    cache.read_at(0, &mut probe).map_err(|_| refuse())?;
    let shown = cfg.source.describe();
    crate::erofs::probe_superblock(&probe)
        .map_err(|e| AgentError::NotErofs(format!("{shown}: the cached entry is not an EROFS image ({e})")))?;
    let note = format!(
        "offline: the source was unreachable at start ({why}); serving the cached entry ({} of {size} bytes present)",
        cache.populated_bytes()
    );
    tracing::warn!(source = %shown, "{note}");
    let source: Arc<dyn RangeSource> = Arc::new(DeferredSource::new(cfg.source.clone(), http, size));
    let stats = Arc::new(Stats::default());
    let retry = crate::remote::RetryPolicy { deadline: cfg.retry_timeout(), ..Default::default() };
    let fetcher = Arc::new(Fetcher::new(Arc::clone(&cache), Arc::clone(&source), Arc::clone(&stats), retry.clone(), (2 * cfg.fetch_parallel).min(32)));
    let layout = crate::segments::Layout::single(digest.clone(), Arc::clone(&source));
    let file_extents = super::metadata::load_file_extents(entry.dir(), size).unwrap_or_default();
    Ok(Prepared {
        entry,
        created_entry: false,
        cache,
        source,
        layout,
        shown,
        digest: Some(digest),
        stats,
        retry,
        fetcher,
        required,
        file_extents,
        offline: Some(note),
    })
}

pub struct DeferredSource {
    spec: SourceSpec,
    http: ClientConfig,
    size: u64,
    shown: String,
    opened: Mutex<Option<Arc<dyn RangeSource>>>,
    /// One open at a time; the others wait for its outcome.
    opening: tokio::sync::Mutex<()>,
}

impl DeferredSource {
    pub fn new(spec: SourceSpec, http: ClientConfig, size: u64) -> DeferredSource {
        let shown = spec.describe();
        DeferredSource { spec, http, size, shown, opened: Mutex::new(None), opening: tokio::sync::Mutex::new(()) }
    }

    fn current(&self) -> Option<Arc<dyn RangeSource>> {
        self.opened.lock().clone()
    }

    async fn open(&self) -> Result<Arc<dyn RangeSource>, FetchError> {
        let _one = self.opening.lock().await;
        if let Some(source) = self.current() {
            return Ok(source);
        }
        let opened = open_source(&self.spec, &self.http)
            .await
            .map_err(|e| FetchError::Transient(format!("{} is unreachable: {e}", self.shown)))?;
        let size = opened.source.size();
        if size != self.size {
            // Not the blob the cache holds: never mix its bytes in.
            return Err(FetchError::Permanent(format!("{} is now {size} bytes, the cached blob {}", self.shown, self.size)));
        }
        tracing::info!(source = %self.shown, "the source is reachable again");
        *self.opened.lock() = Some(Arc::clone(&opened.source));
        Ok(opened.source)
    }
}

impl RangeSource for DeferredSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            let source = match self.current() {
                Some(source) => source,
                None => self.open().await?,
            };
            source.fetch(range).await
        })
    }

    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(async move {
            let source = match self.current() {
                Some(source) => source,
                None => self.open().await?,
            };
            source.fetch_many(ranges).await
        })
    }

    /// Until the source is reachable again: nothing known (planned as if it took multi-range).
    fn multi_range(&self) -> MultiRange {
        self.current().map_or(MultiRange::Unknown, |s| s.multi_range())
    }

    fn link(&self) -> LinkEstimate {
        self.current().map(|s| s.link()).unwrap_or_default()
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn served_by(&self) -> Option<String> {
        self.current().and_then(|s| s.served_by())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_source_is_a_transient_error_and_no_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let spec = SourceSpec::Url { url: format!("http://127.0.0.1:{port}/v2/x/blobs/sha256:{}", "a".repeat(64)) };
        let s = DeferredSource::new(spec, ClientConfig::default(), 4096);
        assert_eq!(s.size(), 4096);
        let err = rt.block_on(s.fetch(0..10)).unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("unreachable"), "{err}");
        assert!(s.served_by().is_none());
    }
}
