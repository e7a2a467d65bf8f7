//! Stage 1: the cache entry and the metadata. Open the source, check that it
//! is EROFS, create (or reuse) the cache entry, open the cache file before
//! any mark exists, and make every byte the kernel reads without an event
//! local (the metadata map is stored with the entry, so a later mount of the
//! same blob needs no walk).
//!
//! On error nothing is left behind: a cache entry created here is removed
//! (the guard below), and nothing outside the entry exists yet.

use std::ops::Range;
use std::sync::Arc;

use erofs_fanotify_state::{self as state, CacheDir, CacheEntry};

use crate::cache::CacheFile;
use crate::erofs::{self, WalkLimits};
use crate::http::ClientConfig;
use crate::remote::{RangeSource, RetryPolicy};

use super::metadata::{CacheMetaReader, Fetcher};
use super::stats::Stats;
use super::worker::WorkerContext;
use super::{AgentConfig, AgentError};

/// What stage 1 hands to the next: a cache file holding the metadata.
pub(super) struct Prepared {
    pub entry: CacheEntry,
    pub created_entry: bool,
    pub cache: Arc<CacheFile>,
    pub source: Arc<dyn RangeSource>,
    /// Credential-free, for records, logs and status.
    pub shown: String,
    pub digest: Option<String>,
    pub stats: Arc<Stats>,
    pub retry: RetryPolicy,
    pub fetcher: Arc<Fetcher>,
    /// The metadata ranges (local now).
    pub required: Vec<Range<u64>>,
    /// Set when the source could not be opened and the entry is served from the cache (offline).
    pub offline: Option<String>,
}

/// Removes a cache entry this worker created unless the preparation got through.
struct NewEntryGuard {
    entry: Option<CacheEntry>,
}

impl NewEntryGuard {
    fn keep(mut self) {
        self.entry = None;
    }
}

impl Drop for NewEntryGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            if let Err(e) = entry.remove() {
                tracing::warn!(error = %e, "cannot remove the half-made cache entry");
            }
        }
    }
}

pub(super) async fn prepare(cfg: &AgentConfig, ctx: &WorkerContext) -> Result<Prepared, AgentError> {
    let http = ClientConfig { request_timeout: cfg.fetch_timeout(), ..ClientConfig::default() };
    let opened = match super::sources::open_source(&cfg.source, &http).await {
        Ok(opened) => opened,
        // From the cache when it can serve; else a transient failure is retried within retry_timeout.
        Err(e) => match super::offline::prepare_offline(cfg, ctx, http.clone(), e.to_string()) {
            Ok(prepared) => return Ok(prepared),
            Err(_) if e.is_transient() => super::offline::open_retrying(cfg, &http, e).await?,
            Err(refused) => return Err(refused),
        },
    };
    let (source, probe) = (opened.source, opened.probe);
    let shown = cfg.source.describe();
    erofs::probe_superblock(&probe).map_err(|e| AgentError::NotErofs(format!("{shown} is not an EROFS image ({e})")))?;
    let size = source.size();
    let digest = cfg.source.digest();

    state::check_cache_filesystem(&cfg.cache_dir).map_err(|e| AgentError::Cache(e.to_string()))?;
    let cache_dir = CacheDir::new(cfg.cache_dir.clone());
    let (mut entry, created_entry) = CacheEntry::open_or_create(&cache_dir, &cfg.cache_key, size, &shown, digest.as_deref())
        .map_err(|e| AgentError::Cache(format!("cannot create the cache entry in {}: {e}", cfg.cache_dir.display())))?;
    let guard = NewEntryGuard { entry: created_entry.then(|| entry.clone()) };
    if created_entry {
        ctx.status.say("entry_created");
    }
    let cache = Arc::new(open_cache_file(&entry, ctx)?);
    let present_before = cache.populated_bytes();
    cache
        .write_range(0, &probe)
        .map_err(|e| AgentError::Cache(format!("cannot write the cache file: {e}")))?;

    let stats = Arc::new(Stats::default());
    let retry = RetryPolicy { deadline: cfg.retry_timeout(), ..RetryPolicy::default() };
    let fetcher = Arc::new(Fetcher {
        cache: Arc::clone(&cache),
        source: Arc::clone(&source),
        stats: Arc::clone(&stats),
        retry: retry.clone(),
        // The metadata walk is latency bound: more requests in flight.
        parallel: (2 * cfg.fetch_parallel).min(32),
    });
    let required = match entry.required_ranges() {
        Some(required) => required,
        None => {
            let map = walk_metadata(&fetcher, size, &shown).await?;
            if let Err(e) = entry.set_required(&map.required) {
                tracing::warn!(error = %e, "cannot store the metadata map with the cache entry");
            }
            map.required
        }
    };
    fetcher
        .ensure_present(&required)
        .await
        .map_err(|e| AgentError::Source(format!("cannot fetch the image metadata: {e}")))?;
    if cache.populated_bytes() != present_before {
        // Persisted now, not only every few seconds: a successor of a worker killed right after the
        // mount finds the metadata present instead of fetching it all again.
        if let Err(e) = crate::cache::persist(&entry, &cache) {
            tracing::warn!(error = %e, "cannot persist the bitmap after the metadata walk");
        }
    }
    guard.keep();
    Ok(Prepared { entry, created_entry, cache, source, shown, digest, stats, retry, fetcher, required, offline: None })
}

/// Opens the cache file before the mark: writes through this fd raise no
/// events. A resumed worker must use the fd its predecessor opened (one
/// opened now would raise events to ourselves: the mark exists); the first
/// worker shares its fd with the supervisor for successors. A trusted
/// persisted bitmap is restored; a damaged one is discarded.
pub(super) fn open_cache_file(entry: &CacheEntry, ctx: &WorkerContext) -> Result<CacheFile, AgentError> {
    let inherited = ctx.cache_fd.lock().as_ref().and_then(|f| f.try_clone().ok());
    if ctx.resume && inherited.is_none() {
        return Err(AgentError::Cache("a resumed worker needs the cache fd opened before the mark".into()));
    }
    let cache = crate::cache::open_entry_with(entry, inherited)
        .map_err(|e| AgentError::Cache(format!("cannot open the cache file {}: {e}", entry.blob_path().display())))?;
    if !ctx.resume {
        match cache.as_file().try_clone() {
            Ok(f) => {
                ctx.status.send_fd(std::os::fd::AsFd::as_fd(&f));
                *ctx.cache_fd.lock() = Some(f);
            }
            Err(e) => tracing::warn!(error = %e, "cannot keep a cache fd for successors"),
        }
    }
    Ok(cache)
}

async fn walk_metadata(fetcher: &Arc<Fetcher>, size: u64, shown: &str) -> Result<erofs::ImageMap, AgentError> {
    let reader = CacheMetaReader { fetcher: Arc::clone(fetcher), handle: tokio::runtime::Handle::current() };
    let walked = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        erofs::walk(&mut reader, size, &WalkLimits::default())
    })
    .await;
    let map = match walked {
        Ok(Ok(map)) => map,
        Ok(Err(e)) => return Err(AgentError::Image(format!("{shown}: cannot read the EROFS metadata: {e}"))),
        Err(e) => return Err(AgentError::Image(format!("metadata walk failed: {e}"))),
    };
    tracing::info!(
        inodes = map.inodes,
        required_bytes = crate::ranges::total_len(&map.required),
        required_ranges = map.required.len(),
        "metadata walk done"
    );
    Ok(map)
}
