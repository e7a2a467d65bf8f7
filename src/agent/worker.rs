//! A worker's life, in order: [`prepare`](super::prepare) the cache entry
//! and the metadata, [`go_live`](super::live) (mark, control socket, agent
//! record), [`serve`](super::serve) until no mount needs us, then
//! [leave or hand over](super::handover). This file holds what runs them:
//! the async runtime, the ready report to the front end, and the parts every
//! stage shares.
//!
//! A worker started in *resume* mode replaces one that died or was upgraded:
//! it skips the metadata walk (the map is stored with the cache entry),
//! re-adopts the mount records, and answers the orphaned events of the
//! journal once their ranges are present.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use erofs_fanotify_state::{CacheEntry, StateDir};
use parking_lot::Mutex;
use tokio::net::UnixListener;

use crate::cache::CacheFile;
use crate::fanotify::Group;

use super::complete::Completion;
use super::control::ControlContext;
use super::event_loop::AgentScheduler;
use super::journal::{Orphan, SharedBatch, SharedHeartbeat, SharedSlots};
use super::lifecycle::Lifecycle;
use super::metadata::Fetcher;
use super::stats::Stats;
use super::supervisor::StatusPipe;
use super::AgentConfig;

/// Worker exit codes (the supervisor reads the status words; these are for logs).
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_STARTUP_FAILED: i32 = 2;
pub const EXIT_UPGRADE: i32 = 3;

/// What a worker gets from its supervisor and from recovery.
pub struct WorkerContext {
    pub group: Arc<Group>,
    pub status: Arc<StatusPipe>,
    /// The front end's ready pipe (first worker only).
    pub ready: Option<Box<dyn Write + Send>>,
    pub resume: bool,
    /// The journal: the batch area goes to the event loop (taken when serving
    /// starts), the slots are shared.
    pub batch: Option<SharedBatch>,
    pub slots: Arc<SharedSlots>,
    /// Beaten by the event loop and the runtime; read by the supervisor's watchdog.
    pub heartbeat: Arc<SharedHeartbeat>,
    /// When the previous worker of this journal last turned its event loop (Unix ms, 0: never).
    pub predecessor_alive_ms: u64,
    pub orphans: Vec<Orphan>,
    /// Placeholders occupying orphan fd numbers until those are answered.
    pub reserved: Vec<(i32, OwnedFd)>,
    /// The cache file opened before the mark: inherited by a resumed worker,
    /// set by the first one; passed on to successors and new supervisors.
    pub cache_fd: Arc<Mutex<Option<std::fs::File>>>,
}

/// Everything a prepared, live worker serves with.
pub(super) struct Agent {
    pub cfg: AgentConfig,
    pub state: StateDir,
    pub entry: CacheEntry,
    pub created_entry: bool,
    pub cache: Arc<CacheFile>,
    pub group: Arc<Group>,
    pub lifecycle: Arc<Lifecycle>,
    pub stats: Arc<Stats>,
    pub scheduler: Arc<AgentScheduler>,
    pub fetcher: Arc<Fetcher>,
    pub completion: Arc<Completion>,
    pub control: Arc<ControlContext>,
    pub listener: Option<UnixListener>,
}

/// Runs a worker to completion and returns its exit code.
pub fn run_worker(cfg: AgentConfig, mut ctx: WorkerContext) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(ready) = ctx.ready.take() {
                report(ready, Err(format!("cannot start the async runtime: {e}")));
            }
            return EXIT_STARTUP_FAILED;
        }
    };
    rt.block_on(async move {
        let started = match super::prepare::prepare(&cfg, &ctx).await {
            Ok(prepared) => super::live::go_live(&cfg, &ctx, prepared).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(agent) => {
                ctx.status.say("ready");
                if let Some(ready) = ctx.ready.take() {
                    if !report(ready, Ok(())) {
                        // The front end that started us is gone: nobody will
                        // prepare a mount, so do not wait out the grace period.
                        tracing::warn!("the front end left before the agent was ready");
                        agent.lifecycle.end_startup_grace();
                    }
                }
                agent.serve(ctx).await
            }
            Err(e) => {
                tracing::error!(error = %e, "worker startup failed");
                if let Some(ready) = ctx.ready.take() {
                    report(ready, Err(e.to_string()));
                }
                // Not "exit_clean": a supervisor whose first worker never
                // became ready leaves; a resumed one tries again.
                EXIT_STARTUP_FAILED
            }
        }
    })
}

/// Writes the ready line; false when nobody reads it any more.
fn report(mut ready: Box<dyn Write + Send>, result: Result<(), String>) -> bool {
    let line = match result {
        Ok(()) => serde_json::json!({ "ready": true }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    writeln!(ready, "{line}").and_then(|_| ready.flush()).is_ok()
}

pub fn journal_path(state: &StateDir, key: &str) -> Result<std::path::PathBuf, String> {
    state.agent_journal_path(key).map_err(|e| e.to_string())
}
