//! The agent: one process per cached blob, serving every mount of it.
//!
//! Model:
//! 1. `startup` opens the remote, creates (or reuses) the cache entry, makes
//!    the EROFS metadata local (the kernel reads metadata without events), then
//!    puts one fanotify inode mark on the cache file — before any mount.
//! 2. `event_loop` reads the group fd. A pre-access event whose range is
//!    already present is allowed at once (the fast path: one bitmap lookup).
//!    Anything else goes to the `scheduler`, which fetches missing fetch units
//!    (one request per unit however many events wait on it), writes them
//!    through the fd opened before the mark, marks them present, and only
//!    then allows the waiting events; after bounded retries they get EIO.
//! 3. `lifecycle` knows which superblocks use the cache file (FAN_OPEN and
//!    FAN_CLOSE_* on the mark, plus /sys/fs/erofs/erofs-N) and decides when
//!    the agent may leave: never while a superblock might still read the file,
//!    because closing the group would let pending reads see zeros.
//! 4. `control` is the unix socket the front ends talk to (prepare, attach,
//!    unmounted, stats); `protocol` holds its message types.

pub mod complete;
pub mod control;
pub mod event_loop;
pub mod journal;
pub mod lifecycle;
pub mod metadata;
pub mod protocol;
pub mod scheduler;
pub mod startup;
pub mod stats;
pub mod supervisor;
pub mod trace;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the front end hands a new agent (on its stdin, never on the command line:
/// a source URL may carry credentials).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentConfig {
    pub source: crate::remote::SourceSpec,
    pub cache_dir: PathBuf,
    pub cache_key: String,
    pub state_dir: PathBuf,
    pub fetch_unit: u64,
    pub fetch_timeout_ms: u64,
    pub retry_timeout_ms: u64,
    pub fetch_parallel: usize,
    pub read_ahead_kb: u32,
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
