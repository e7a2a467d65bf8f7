//! Complete and detach: once every block is present, check the whole cache
//! file against the blob digest and, if it matches, remove the pre-access
//! part of the mark so reads cost nothing any more. OPEN/CLOSE stay marked:
//! they are rare and the lifecycle needs them.
//!
//! A mismatch means the remote served wrong bytes: presence is forgotten, the
//! metadata refetched, and data refetched as it is read. A second mismatch
//! leaves the agent serving lazily and says so in `status`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cache::CacheFile;
use crate::fanotify::{Group, FAN_PRE_ACCESS};

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
    pub cache: Arc<CacheFile>,
    pub group: Arc<Group>,
    pub blob_path: PathBuf,
    pub digest: Option<String>,
    pub fetcher: Arc<Fetcher>,
    pub scheduler: Arc<super::event_loop::AgentScheduler>,
    pub required: Vec<Range<u64>>,
    state: Mutex<CompletionState>,
    running: AtomicBool,
    mismatches: AtomicU32,
}

/// Mismatches tolerated before giving up on detaching.
const MAX_MISMATCHES: u32 = 1;

impl Completion {
    pub fn new(
        cache: Arc<CacheFile>,
        group: Arc<Group>,
        blob_path: PathBuf,
        digest: Option<String>,
        fetcher: Arc<Fetcher>,
        scheduler: Arc<super::event_loop::AgentScheduler>,
        required: Vec<Range<u64>>,
    ) -> Arc<Completion> {
        Arc::new(Completion {
            cache,
            group,
            blob_path,
            digest,
            fetcher,
            scheduler,
            required,
            state: Mutex::new(CompletionState::Lazy),
            running: AtomicBool::new(false),
            mismatches: AtomicU32::new(0),
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
        if !self.cache.is_complete()
            || self.mismatches() > MAX_MISMATCHES
            || matches!(self.state(), CompletionState::Complete | CompletionState::CompleteUnverified)
            || self.running.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.verify_and_detach().await;
            this.running.store(false, Ordering::SeqCst);
        });
    }

    async fn verify_and_detach(&self) {
        self.set(CompletionState::Verifying);
        let verdict = match self.digest.clone() {
            None => None,
            Some(want) => {
                let cache = Arc::clone(&self.cache);
                let digest = Arc::clone(&self.scheduler.in_order);
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
                    digest = self.digest.as_deref().unwrap_or(""),
                    mismatches = n,
                    "the complete cache file does not match the blob digest; refetching"
                );
                if n <= MAX_MISMATCHES {
                    self.scheduler.in_order.reset();
                    if let Err(e) = self.cache.clear_presence() {
                        tracing::error!(error = %e, "cannot reset presence");
                        return;
                    }
                    // Metadata raises no events: fetch it again now.
                    if let Err(e) = self.fetcher.ensure_present(&self.required).await {
                        tracing::error!(error = %e, "cannot refetch the metadata");
                    }
                    // The whole file was wrong somewhere: fetch all of it again.
                    let size = self.cache.blob_size();
                    tokio::spawn(Arc::clone(&self.scheduler).prefetch(std::iter::once(0..size).collect(), None));
                }
            }
            verified => {
                if let Err(e) = self.group.unmark_file(std::os::fd::AsFd::as_fd(self.cache.as_file()), FAN_PRE_ACCESS, &self.blob_path) {
                    tracing::error!(error = %e, "cannot remove the pre-access mark");
                    self.set(CompletionState::Lazy);
                    return;
                }
                let state = if verified == Some(true) {
                    CompletionState::Complete
                } else {
                    CompletionState::CompleteUnverified
                };
                tracing::info!(state = state.as_str(), "cache file complete; reads no longer raise events");
                self.set(state);
            }
        }
    }
}
