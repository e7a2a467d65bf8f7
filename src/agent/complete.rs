//! Complete and detach: once every block is present, check the whole cache
//! file against the blob digest and, if it matches, remove the pre-access
//! part of the mark so reads cost nothing any more. OPEN/CLOSE stay marked:
//! they are rare and the lifecycle needs them.
//!
//! A mismatch means the remote served wrong bytes: presence is forgotten, the
//! metadata refetched, and data refetched as it is read. A second mismatch
//! leaves the agent serving lazily and says so in `status`.
//!
//! An address space of several sources has no digest of its own: each segment
//! whose source has one (a tar's diff_id, a layer blob's digest) is hashed from
//! the cache file instead, with the bytes of its source outside the segment (a
//! tar's trailing records) fetched to complete it. A segment that does not
//! match is forgotten (and the page cache of the mounts dropped: readers may
//! hold its wrong bytes) and fetched again; a second mismatch refuses it for
//! good (every read of it is EIO): its source serves wrong bytes the same way
//! each time, as a forged zinfo does.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::cache::CacheFile;
use crate::fanotify::{Group, FAN_PRE_ACCESS};
use crate::remote::refused::RefusedRanges;
use crate::segments::{Layout, Segment};

use super::lifecycle::Lifecycle;
use super::metadata::Fetcher;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionState {
    Lazy,
    Verifying,
    /// Verified against the digest and detached.
    Complete,
    /// No digest to verify against; detached after every range was fetched
    /// with checked Content-Range and length.
    CompleteUnverified,
    DigestMismatch,
}

impl CompletionState {
    pub fn as_str(self) -> &'static str {
        match self {
            CompletionState::Lazy => "lazy",
            CompletionState::Verifying => "verifying",
            CompletionState::Complete => "complete",
            CompletionState::CompleteUnverified => "complete-unverified",
            CompletionState::DigestMismatch => "digest-mismatch",
        }
    }
}

pub struct Completion {
    pub parts: CompletionParts,
    state: Mutex<CompletionState>,
    running: AtomicBool,
    mismatches: AtomicU32,
    /// A check that could not be made (its source unreachable) is tried again after this.
    retry_after: Mutex<Option<std::time::Instant>>,
}

/// Mismatches tolerated before giving up on detaching.
const MAX_MISMATCHES: u32 = 1;

/// Bytes of a segment's source outside the segment fetched to check it (a tar's trailing records
/// are a few KiB); more and the segment is not checked.
const MAX_OUTSIDE: u64 = 16 << 20;

/// How long a check that could not be made waits before the next try.
const CHECK_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// What completing a mount's cache file needs.
pub struct CompletionParts {
    pub cache: Arc<CacheFile>,
    pub group: Arc<Group>,
    pub blob_path: PathBuf,
    pub digest: Option<String>,
    pub fetcher: Arc<Fetcher>,
    pub scheduler: Arc<super::event_loop::AgentScheduler>,
    pub required: Vec<Range<u64>>,
    /// Checked segment by segment when there is no digest of the whole space.
    pub layout: Layout,
    /// Regions refused after a second mismatch (the scheduler's source consults it).
    pub refused: Arc<RefusedRanges>,
    /// Whose mounts' page cache is dropped when a segment proves wrong.
    pub lifecycle: Arc<Lifecycle>,
}

impl Completion {
    pub fn new(parts: CompletionParts) -> Arc<Completion> {
        Arc::new(Completion {
            parts,
            state: Mutex::new(CompletionState::Lazy),
            running: AtomicBool::new(false),
            mismatches: AtomicU32::new(0),
            retry_after: Mutex::new(None),
        })
    }

    pub fn state(&self) -> CompletionState {
        *self.state.lock()
    }

    pub fn mismatches(&self) -> u32 {
        self.mismatches.load(Ordering::SeqCst)
    }

    fn set(&self, s: CompletionState) {
        *self.state.lock() = s;
    }

    /// Called periodically: starts verification once the file is complete.
    pub fn poll(self: &Arc<Self>) {
        if !self.parts.cache.is_complete()
            || self.mismatches() > MAX_MISMATCHES
            || matches!(self.state(), CompletionState::Complete | CompletionState::CompleteUnverified)
            || self.retry_after.lock().is_some_and(|t| std::time::Instant::now() < t)
            || self.running.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if this.parts.digest.is_none() && this.parts.layout.segments().iter().any(|s| s.sha256.is_some()) {
                this.verify_segments_and_detach().await;
            } else {
                this.verify_and_detach().await;
            }
            this.running.store(false, Ordering::SeqCst);
        });
    }

    /// Removes the pre-access mark: reads cost nothing any more.
    fn detach(&self, state: CompletionState) {
        if let Err(e) = self.parts.group.unmark_file(std::os::fd::AsFd::as_fd(self.parts.cache.as_file()), FAN_PRE_ACCESS, &self.parts.blob_path) {
            tracing::error!(error = %e, "cannot remove the pre-access mark");
            self.set(CompletionState::Lazy);
            return;
        }
        tracing::info!(state = state.as_str(), "cache file complete; reads no longer raise events");
        self.set(state);
    }

    /// Every segment with a digest hashed from the cache file; a mismatch is fetched again once,
    /// then refused.
    async fn verify_segments_and_detach(&self) {
        self.set(CompletionState::Verifying);
        let mut bad: Vec<(usize, String)> = Vec::new();
        let mut unchecked = 0usize;
        for (i, seg) in self.parts.layout.segments().iter().enumerate() {
            let Some(want) = seg.sha256.as_deref() else {
                unchecked += 1;
                continue;
            };
            match self.segment_sha256(seg).await {
                Ok(got) if got == want => tracing::info!(segment = %seg.label, "segment matches its digest"),
                Ok(got) => {
                    tracing::error!(segment = %seg.label, expected = want, got = %got, "the segment's bytes in the cache file do not match its digest");
                    bad.push((i, got));
                }
                Err(e) => {
                    tracing::warn!(segment = %seg.label, error = %e, "cannot check the segment against its digest; trying again later");
                    *self.retry_after.lock() = Some(std::time::Instant::now() + CHECK_RETRY);
                    self.set(CompletionState::Lazy);
                    return;
                }
            }
        }
        if bad.is_empty() {
            self.detach(if unchecked == 0 { CompletionState::Complete } else { CompletionState::CompleteUnverified });
            return;
        }
        let n = self.mismatches.fetch_add(1, Ordering::SeqCst) + 1;
        self.set(CompletionState::DigestMismatch);
        let segments = self.parts.layout.segments();
        let mut again = Vec::new();
        for (i, got) in &bad {
            let seg = &segments[*i];
            let range = seg.start..seg.end();
            if n > MAX_MISMATCHES {
                let why = format!(
                    "{} does not match its digest {} (got {got}) twice: its source serves wrong bytes (a forged or wrong index?); every read of it fails",
                    seg.label,
                    seg.sha256.as_deref().unwrap_or("")
                );
                tracing::error!(segment = %seg.label, "segment refused: {why}");
                self.parts.refused.refuse(range.clone(), why);
            } else {
                again.push(range.clone());
            }
            self.parts.cache.forget(range);
        }
        self.parts.scheduler.in_order.reset();
        // Readers may hold the wrong bytes in the mounts' page cache: drop it, so the next read raises an
        // event and gets the refetched bytes (or EIO).
        let mounts = self.parts.lifecycle.mounts();
        match tokio::task::spawn_blocking(move || super::takeover::drop_page_caches(&mounts)).await {
            Ok(files) => tracing::info!(files, "page cache of the mounts dropped after a digest mismatch"),
            Err(e) => tracing::error!(error = %e, "cannot drop the mounts' page cache"),
        }
        let required: Vec<Range<u64>> =
            self.parts.required.iter().filter(|r| bad.iter().any(|(i, _)| segments[*i].start < r.end && r.start < segments[*i].end())).cloned().collect();
        if !required.is_empty() {
            if let Err(e) = self.parts.fetcher.ensure_present(&required).await {
                tracing::error!(error = %e, "cannot refetch the metadata");
            }
        }
        if !again.is_empty() {
            tracing::error!(mismatches = n, segments = again.len(), "fetching the mismatching segments again");
            tokio::spawn(Arc::clone(&self.parts.scheduler).prefetch(again, None));
        }
    }

    /// `sha256:<hex>` of a segment's whole source: its bytes in the cache file, with the source's
    /// bytes before and after the segment fetched.
    async fn segment_sha256(&self, seg: &Segment) -> Result<String, String> {
        let size = seg.source.size();
        let end = seg.source_offset.checked_add(seg.len).filter(|&e| e <= size).ok_or("the segment lies past its source")?;
        let outside = seg.source_offset + (size - end);
        if outside > MAX_OUTSIDE {
            return Err(format!("{outside} bytes of its source lie outside the segment"));
        }
        let fetch = |r: Range<u64>| async move {
            if r.is_empty() {
                return Ok(bytes::Bytes::new());
            }
            let b = seg.source.fetch(r.clone()).await.map_err(|e| e.to_string())?;
            if b.len() as u64 != r.end - r.start {
                return Err(format!("the source returned {} bytes for {r:?}", b.len()));
            }
            Ok(b)
        };
        let head = fetch(0..seg.source_offset).await?;
        let tail = fetch(end..size).await?;
        let cache = Arc::clone(&self.parts.cache);
        let flat = seg.start..seg.end();
        tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            h.update(&head);
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = flat.start;
            while pos < flat.end {
                let n = (flat.end - pos).min(buf.len() as u64) as usize;
                cache.read_at(pos, &mut buf[..n]).map_err(|e| e.to_string())?;
                h.update(&buf[..n]);
                pos += n as u64;
            }
            h.update(&tail);
            Ok(format!("sha256:{}", hex::encode(h.finalize())))
        })
        .await
        .map_err(|e| format!("the hashing task failed: {e}"))?
    }

    async fn verify_and_detach(&self) {
        self.set(CompletionState::Verifying);
        let verdict = match self.parts.digest.clone() {
            None => None,
            Some(want) => {
                let cache = Arc::clone(&self.parts.cache);
                let digest = Arc::clone(&self.parts.scheduler.in_order);
                // Most of it was hashed as it landed: only the rest is read now.
                match tokio::task::spawn_blocking(move || digest.finish(&cache)).await {
                    Ok(Ok(got)) => Some(got == want),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read the cache file to verify it");
                        self.set(CompletionState::Lazy);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "verification task failed");
                        self.set(CompletionState::Lazy);
                        return;
                    }
                }
            }
        };
        match verdict {
            Some(false) => {
                let n = self.mismatches.fetch_add(1, Ordering::SeqCst) + 1;
                self.set(CompletionState::DigestMismatch);
                tracing::error!(
                    digest = self.parts.digest.as_deref().unwrap_or(""),
                    mismatches = n,
                    "the complete cache file does not match the blob digest; refetching"
                );
                if n <= MAX_MISMATCHES {
                    self.parts.scheduler.in_order.reset();
                    if let Err(e) = self.parts.cache.clear_presence() {
                        tracing::error!(error = %e, "cannot reset presence");
                        return;
                    }
                    // Metadata raises no events: fetch it again now.
                    if let Err(e) = self.parts.fetcher.ensure_present(&self.parts.required).await {
                        tracing::error!(error = %e, "cannot refetch the metadata");
                    }
                    // The whole file was wrong somewhere: fetch all of it again.
                    let size = self.parts.cache.blob_size();
                    tokio::spawn(Arc::clone(&self.parts.scheduler).prefetch(std::iter::once(0..size).collect(), None));
                }
            }
            verified => self.detach(if verified == Some(true) { CompletionState::Complete } else { CompletionState::CompleteUnverified }),
        }
    }
}
