//! What a worker's stages share: the context a worker starts with, and the
//! assembled parts a live worker serves with.

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

/// Where the worker's event journal lives.
pub fn journal_path(state: &StateDir, key: &str) -> Result<std::path::PathBuf, String> {
    state.agent_journal_path(key).map_err(|e| e.to_string())
}

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

