//! Stage 4: the end of a worker — leaving when no mount needs the agent, or
//! handing over to a successor (live upgrade) — and the start of a
//! successor's work: answering the events its predecessor left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use erofs_fanotify_state::{self as state, AgentLock};

use crate::fanotify::Response;

use super::context::{journal_path, Agent, WorkerContext, EXIT_CLEAN, EXIT_UPGRADE};

impl Agent {
    /// No mount uses the cache file and the agent lock is held: become
    /// unreachable first (so the next front end starts a fresh agent), then
    /// keep or remove the entry, then say so to the supervisor.
    pub(super) fn leave(mut self, ctx: &WorkerContext, stop: Arc<AtomicBool>, ever_attached: bool, exit_lock: AgentLock) -> i32 {
        tracing::info!("no mount uses the cache file any more; leaving");
        stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.control.socket_path);
        let _ = state::remove_agent_record(&self.state, &self.cfg.cache_key);
        if !ever_attached && self.created_entry {
            // A mount that never happened must not leave a cache entry behind.
            if let Err(e) = self.entry.clone().remove() {
                tracing::warn!(error = %e, "cannot remove the unused cache entry");
            }
        } else {
            self.persist();
        }
        if let Ok(path) = journal_path(&self.state, &self.cfg.cache_key) {
            let _ = std::fs::remove_file(path);
        }
        // Files that agents gone before us left (their journals, old logs, locks).
        match state::sweep_agents_dir(&self.state, &state::SweepPolicy::default(), state::unix_now()) {
            Ok(report) if !report.removed.is_empty() => {
                tracing::info!(files = report.removed.len(), bytes = report.freed_bytes, "removed files of agents that are gone")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot clean the state directory"),
        }
        ctx.status.say("exit_clean");
        drop(exit_lock);
        EXIT_CLEAN
    }

    /// Live upgrade: stop reading events, answer everything in flight,
    /// persist, and let the supervisor start the binary now on disk. Events
    /// raised meanwhile wait in the kernel for the successor.
    pub(super) async fn hand_over(
        mut self,
        ctx: &WorkerContext,
        stop: Arc<AtomicBool>,
        event_thread: Option<std::thread::JoinHandle<()>>,
    ) -> i32 {
        tracing::info!("handing over to a new worker");
        stop.store(true, Ordering::SeqCst);
        if let Some(t) = event_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while (self.scheduler.waiting() > 0 || ctx.slots.pending() > 0) && tokio::time::Instant::now() < deadline {
            // The event loop stopped on purpose: not a stopped worker.
            ctx.heartbeat.beat_events();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.persist();
        ctx.status.say("exit_upgrade");
        EXIT_UPGRADE
    }

    /// Events a dead predecessor read and never answered: answer each once
    /// its range is present (EIO if it cannot be fetched), then free its
    /// slot and its fd number (the placeholder holding it is dropped last).
    pub(super) fn answer_orphans(&self, ctx: &mut WorkerContext) {
        if ctx.orphans.is_empty() {
            return;
        }
        tracing::warn!(count = ctx.orphans.len(), "answering events left by a previous worker");
        for orphan in std::mem::take(&mut ctx.orphans) {
            let fetcher = Arc::clone(&self.fetcher);
            let group = Arc::clone(&self.group);
            let slots = Arc::clone(&ctx.slots);
            let placeholder = ctx.reserved.iter().position(|(n, _)| *n == orphan.fd).map(|i| ctx.reserved.swap_remove(i));
            let size = self.cache.blob_size();
            if placeholder.is_none() {
                // Its number could not be reserved (one of our own descriptors holds it,
                // or it is above our fd limit): answer it now, before this worker reads
                // any event of its own, so no new event can share the number meanwhile.
                let range = orphan.range.map_or(0..size, |r| r.offset.min(size)..r.end().min(size));
                let response = if self.cache.contains(range.clone()) { Response::Allow } else { Response::Deny(libc::EIO) };
                match self.group.respond(orphan.fd, response) {
                    Ok(()) => tracing::warn!(fd = orphan.fd, ?range, ?response, "orphaned event with an unreservable number answered at once"),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => tracing::error!(fd = orphan.fd, error = %e, "answering an orphaned event failed"),
                }
                ctx.slots.answered(orphan.slot);
                continue;
            }
            tokio::spawn(async move {
                let range = match orphan.range {
                    Some(r) => r.offset.min(size)..r.end().min(size),
                    None => 0..size,
                };
                let response = match fetcher.ensure_present(std::slice::from_ref(&range)).await {
                    Ok(()) => Response::Allow,
                    Err(e) => {
                        tracing::error!(fd = orphan.fd, error = %e, "cannot fetch an orphaned event's range; EIO");
                        Response::Deny(libc::EIO)
                    }
                };
                match group.respond(orphan.fd, response) {
                    Ok(()) => tracing::info!(fd = orphan.fd, ?range, "orphaned event answered"),
                    // Answered by the predecessor just before it died.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => tracing::error!(fd = orphan.fd, error = %e, "answering an orphaned event failed"),
                }
                slots.answered(orphan.slot);
                drop(placeholder);
            });
        }
    }
}
