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
use crate::erofs::{self, WalkLimits, WalkOptions};
use crate::http::ClientConfig;
use crate::remote::verified::{ChunkDigests, VerifiedSource};
use crate::remote::{RangeSource, RetryPolicy};

use super::merge::open_layers;
use super::metadata::{load_file_extents, save_file_extents, CacheMetaReader, Fetcher};
use super::sources::SourceSpec;
use super::stats::Stats;
use super::context::WorkerContext;
use super::{AgentConfig, AgentError};

/// What stage 1 hands to the next: a cache file holding the metadata.
pub(super) struct Prepared {
    pub entry: CacheEntry,
    pub created_entry: bool,
    pub cache: Arc<CacheFile>,
    pub source: Arc<dyn RangeSource>,
    pub layout: crate::segments::Layout,
    /// Credential-free, for records, logs and status.
    pub shown: String,
    pub digest: Option<String>,
    pub stats: Arc<Stats>,
    pub retry: RetryPolicy,
    pub fetcher: Arc<Fetcher>,
    /// The metadata ranges (local now).
    pub required: Vec<Range<u64>>,
    /// Each regular file's data (sorted, disjoint; empty when unknown): a
    /// miss inside one fetches it whole.
    pub file_extents: Vec<Range<u64>>,
    /// Set when the source could not be opened and the entry is served from the cache (offline).
    pub offline: Option<String>,
}

/// `source` behind a check of every fetched chunk against the index artifact's digests, when the
/// mount's index gave them (`remote::verified`); `None` without digests.
pub(super) fn verified_source(source: &Arc<dyn RangeSource>, cfg: &AgentConfig) -> Result<Option<Arc<dyn RangeSource>>, AgentError> {
    // Chunk digests are of one blob: a merged layout of several is not checked this way.
    let Some(chunks) = cfg.known_metadata.as_ref().and_then(|k| k.chunks.as_ref()).filter(|_| !matches!(cfg.source, SourceSpec::Layers(_))) else {
        return Ok(None);
    };
    let digests = ChunkDigests::new(chunks.size, &chunks.sha256, source.size())
        .map_err(|e| AgentError::Image(format!("the index's chunk digests do not fit {}: {e}", cfg.source.describe())))?;
    tracing::info!(chunk_size = chunks.size, chunks = chunks.sha256.len(), "every fetched chunk is checked against the index's sha256");
    Ok(Some(Arc::new(VerifiedSource::new(Arc::clone(source), digests))))
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
    let retry = RetryPolicy { deadline: cfg.retry_timeout(), ..RetryPolicy::default() };
    let shown = cfg.source.describe();
    state::check_cache_filesystem(&cfg.cache_dir).map_err(|e| AgentError::Cache(e.to_string()))?;
    let cache_dir = CacheDir::new(cfg.cache_dir.clone());
    let mut layers = match &cfg.source {
        SourceSpec::Layers(spec) => {
            let recorded = CacheEntry::peek(&cache_dir, &cfg.cache_key).and_then(|m| m.layout);
            Some((spec, open_layers(spec, &http, &retry, cfg.fetch_unit, recorded.as_ref(), Some((&cache_dir, &cfg.cache_key))).await.map_err(|e| AgentError::Source(e.to_string()))?))
        }
        _ => None,
    };
    let (source, layout, probe) = match &layers {
        Some((_, l)) => (Arc::clone(&l.source), l.layout.clone(), l.head.clone()),
        None => {
            let opened = match super::sources::open_source(&cfg.source, &http).await {
                Ok(opened) => opened,
                // From the cache when it can serve; else a transient failure is retried within retry_timeout.
                Err(e) => match super::offline::prepare_offline(cfg, ctx, http.clone(), e.to_string()) {
                    Ok(prepared) => return Ok(prepared),
                    Err(_) if e.is_transient() => super::offline::open_retrying(cfg, &http, e).await?,
                    Err(refused) => return Err(refused),
                },
            };
            (opened.source, opened.layout, Some(opened.probe))
        }
    };
    if let Some(probe) = &probe {
        erofs::probe_superblock(probe).map_err(|e| AgentError::NotErofs(format!("{shown} is not an EROFS image ({e})")))?;
    }
    let size = source.size();
    let digest = cfg.source.digest();
    let (mut entry, created_entry) = CacheEntry::open_or_create(&cache_dir, &cfg.cache_key, size, &shown, digest.as_deref())
        .map_err(|e| AgentError::Cache(format!("cannot create the cache entry in {}: {e}", cfg.cache_dir.display())))?;
    let guard = NewEntryGuard { entry: created_entry.then(|| entry.clone()) };
    if created_entry {
        ctx.status.say("entry_created");
    }
    let cache = Arc::new(open_cache_file(&entry, ctx)?);
    let present_before = cache.populated_bytes();
    let mut source = source;
    let mut layout = layout;
    let mut probe = probe;
    // With the index's chunk digests every byte is checked before it is written (the fetcher's
    // source here; the live agent wraps its own, with the sources later mounts add): the probe
    // (part of a chunk) is not written, the walk fetches its chunk whole.
    let verified = verified_source(&source, cfg)?;
    if verified.is_some() {
        probe = None;
    }
    if let Some((spec, opened)) = &mut layers {
        if let (None, Some(len)) = (&opened.head, opened.merged_len) {
            if !cache.contains(0..len) {
                // The record outlived the bytes (a damaged bitmap was discarded): merge again.
                tracing::warn!("the recorded merged metadata is not in the cache file; merging again");
                *opened = open_layers(spec, &http, &retry, cfg.fetch_unit, None, Some((&cache_dir, &cfg.cache_key))).await.map_err(|e| AgentError::Source(e.to_string()))?;
                (source, layout, probe) = (Arc::clone(&opened.source), opened.layout.clone(), opened.head.clone());
                if opened.layout.size() != size {
                    return Err(AgentError::Image(format!("{shown}: the merge gave another address space than recorded")));
                }
            }
        }
        if let Some(rec) = opened.record.take() {
            if let Err(e) = entry.set_layout(rec) {
                tracing::warn!(error = %e, "cannot record the merged layout with the cache entry");
            }
        }
    }
    if let Some(probe) = &probe {
        cache.write_range(0, probe).map_err(|e| AgentError::Cache(format!("cannot write the cache file: {e}")))?;
    }
    if let Some((_, opened)) = &mut layers {
        for (at, bytes) in std::mem::take(&mut opened.fetched) {
            if at.checked_add(bytes.len() as u64).is_some_and(|end| end <= size) {
                cache.write_range(at, &bytes).map_err(|e| AgentError::Cache(format!("cannot write the cache file: {e}")))?;
            }
        }
    }
    // The merged metadata is local now: the walk below reads only it.
    let metadata_end = layers.as_ref().map(|(_, l)| l.metadata_end);

    let stats = Arc::new(Stats::default());
    // The metadata walk is latency bound: more requests in flight.
    let fetch_source = verified.unwrap_or_else(|| Arc::clone(&source));
    let fetcher = Arc::new(Fetcher::new(Arc::clone(&cache), fetch_source, Arc::clone(&stats), retry.clone(), (2 * cfg.fetch_parallel).min(32)));
    let probed = probe.as_ref().map_or(0, |p| p.len() as u64);
    let (required, file_extents) = match entry.required_ranges() {
        Some(required) => (required, load_file_extents(entry.dir(), size).unwrap_or_default()),
        None => {
            if let Some(known) = &cfg.known_metadata {
                fetch_known(&fetcher, known, size).await?;
                *stats.index.lock() = Some(known.artifact.clone());
            }
            // Several blobs: only the primary (the merged image, or a
            // multi-blob image's primary) holds metadata; the rest of the
            // blobs (devices' data, layers' own metadata, data of deleted
            // files) is never read without an event. One source: the
            // metadata lives in the primary device, the segment at byte 0;
            // what lies past it (a tar index's tar, flatdev blobs) is data of
            // extra devices, never required.
            // The walk sees the whole space (file data may lie past the
            // primary: a bucket image's objects, a tar index's tar).
            let metadata_len = metadata_end.unwrap_or_else(|| layout.segment_at(0).map_or(size, |s| s.end().min(size)));
            let map = walk_metadata(&fetcher, size, probed, &shown).await?;
            Stats::add(&stats.walk_round_trips, u64::from(map.round_trips));
            let required = clip(&map.required, metadata_len);
            if let Err(e) = entry.set_required(&required) {
                tracing::warn!(error = %e, "cannot store the metadata map with the cache entry");
            }
            if let Err(e) = save_file_extents(entry.dir(), &map.file_extents) {
                tracing::warn!(error = %e, "cannot store the file extents with the cache entry");
            }
            (required, map.file_extents)
        }
    };
    fetcher
        .ensure_present(&required)
        .await
        .map_err(|e| AgentError::Source(format!("cannot fetch the image metadata: {e}")))?;
    // The probe (opening the source) was the first request to the blob.
    Stats::add(&stats.mount_requests, 1 + Stats::get(&stats.fetch_requests));
    tracing::debug!(requests = Stats::get(&stats.mount_requests), "metadata local");
    if cache.populated_bytes() != present_before {
        // Persisted now, not only every few seconds: a successor of a worker killed right after the
        // mount finds the metadata present instead of fetching it all again.
        if let Err(e) = crate::cache::persist(&entry, &cache) {
            tracing::warn!(error = %e, "cannot persist the bitmap after the metadata walk");
        }
    }
    guard.keep();
    Ok(Prepared { entry, created_entry, cache, source, layout, shown, digest, stats, retry, fetcher, required, file_extents, offline: None })
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

/// Ranges known up front go out at once with a wide merge gap: on the
/// registry a request costs more than a MiB of gap (DESIGN §4). The walk
/// that follows reads them locally and fetches only what they missed, so a
/// wrong list costs requests, never content: the kernel is never handed
/// metadata the walk did not see.
const KNOWN_RANGES_GAP: u64 = 1 << 20;

async fn fetch_known(fetcher: &Arc<Fetcher>, known: &crate::index::KnownRanges, size: u64) -> Result<(), AgentError> {
    let ranges: Vec<Range<u64>> = known.ranges.iter().map(|&[a, b]| a..b.min(size)).filter(|r| r.start < r.end).collect();
    let before = Stats::get(&fetcher.stats.fetch_requests);
    fetcher
        .ensure_present_with_gap(&ranges, KNOWN_RANGES_GAP)
        .await
        .map_err(|e| AgentError::Source(format!("cannot fetch the image metadata: {e}")))?;
    tracing::info!(
        artifact = %known.artifact,
        ranges = ranges.len(),
        bytes = crate::ranges::total_len(&ranges),
        requests = Stats::get(&fetcher.stats.fetch_requests) - before,
        "metadata ranges from the index artifact fetched"
    );
    Ok(())
}

async fn walk_metadata(fetcher: &Arc<Fetcher>, size: u64, probed: u64, shown: &str) -> Result<erofs::ImageMap, AgentError> {
    let reader = CacheMetaReader::new(Arc::clone(fetcher), tokio::runtime::Handle::current());
    // The walk starts with what the probe brought (local already).
    let opts = WalkOptions { first_read: probed.max(4096), ..WalkOptions::default() };
    let walked = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        erofs::walk_with(&mut reader, size, &WalkLimits::default(), &opts)
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
        round_trips = map.round_trips,
        batches = map.prefetch_calls,
        requests = Stats::get(&fetcher.stats.fetch_requests),
        "metadata walk done"
    );
    Ok(map)
}

/// The parts of sorted `ranges` below `end`.
fn clip(ranges: &[Range<u64>], end: u64) -> Vec<Range<u64>> {
    ranges.iter().filter(|r| r.start < end).map(|r| r.start..r.end.min(end)).collect()
}
