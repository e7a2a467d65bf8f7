//! The agent: one process per cached blob, serving every mount of it.
//!
//! Processes: a `supervisor` holds the fanotify group and never touches the
//! network; a worker does everything below (see contrib/docs/agent-processes.md).
//!
//! A worker's life, one file per stage (`worker` runs them in order):
//! 1. `prepare`: open the source (`sources` picks the kind), create or reuse
//!    the cache entry, make the EROFS metadata local (the kernel reads
//!    metadata without events; `metadata` fetches it coalesced).
//! 2. `live`: put the fanotify inode mark on the cache file — before any
//!    mount — open the control socket, write the agent record.
//! 3. `serve`: run the event loop thread and the control socket until no
//!    mount needs the agent.
//! 4. `handover`: leave, or hand over to a successor on upgrade; a
//!    successor answers the events its predecessor left (`journal`).
//!
//! The event path is `event_loop` alone: a pre-access event whose range is
//! present is allowed at once; anything else goes to the `scheduler`, which
//! fetches missing fetch units (one request per unit however many events
//! wait on it), writes them through the fd opened before the mark, marks them
//! present, and only then allows the waiting events; after bounded retries
//! they get EIO. `lifecycle` knows which superblocks use the cache file
//! (FAN_OPEN and FAN_CLOSE_* on the mark, plus /sys/fs/erofs/erofs-N) and
//! decides when the agent may leave. `control` is the unix socket the front
//! ends talk to; `protocol` holds its message types.

pub mod added_sources;
pub mod complete;
mod context;
pub mod control;
pub mod digest;
pub mod event_loop;
mod handover;
pub mod journal;
pub mod lifecycle;
mod live;
pub mod merge;
pub mod share;
pub mod metadata;
pub mod offline;
mod prepare;
pub mod protocol;
pub mod scheduler;
mod serve;
pub mod sources;
pub mod stats;
pub mod supervisor;
pub mod takeover;
pub mod trace;
pub mod watchdog;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the front end hands a new agent (on its stdin, never on the command line:
/// a source URL may carry credentials).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentConfig {
    pub source: sources::SourceSpec,
    pub cache_dir: PathBuf,
    pub cache_key: String,
    pub state_dir: PathBuf,
    pub fetch_unit: u64,
    pub fetch_timeout_ms: u64,
    pub retry_timeout_ms: u64,
    pub fetch_parallel: usize,
    pub read_ahead_kb: u32,
    /// Record a trace of what readers ask for from the start (`-o record_trace`).
    #[serde(default)]
    pub record_trace: bool,
    /// Metadata ranges known from an index artifact (`-o index=`): fetched
    /// up front in few requests, so the walk finds them local.
    #[serde(default)]
    pub known_metadata: Option<crate::index::KnownRanges>,
}

impl AgentConfig {
    pub fn fetch_timeout(&self) -> Duration {
        Duration::from_millis(self.fetch_timeout_ms)
    }
    pub fn retry_timeout(&self) -> Duration {
        Duration::from_millis(self.retry_timeout_ms)
    }
}

/// Errors that stop the agent from starting; each reads as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    NotErofs(String),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Cache(String),
    #[error("{0}")]
    Fanotify(String),
    #[error("{0}")]
    Io(String),
}
