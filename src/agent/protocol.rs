//! Messages on the agent's control socket: one JSON object per line.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check.
    Ping,
    /// A front end is about to mount: the agent must not leave while this
    /// connection is open. Answered with `Prepared`.
    Prepare,
    /// The mount exists: record it (same connection as `Prepare`).
    Attach(AttachInfo),
    /// `erofs-umount` has unmounted this mount id.
    Unmounted { mnt_id: u64 },
    /// Counters for `status`.
    Stats,
    /// Hand over to a worker started from the binary now on disk.
    Upgrade,
    /// A later mount names this blob by `source`: serve it from there too (see `added_sources`).
    AddSource { source: super::sources::SourceSpec },
    /// Fetch in the background: the whole blob, or the given byte ranges.
    Prefetch { all: bool, ranges: Vec<[u64; 2]>, rate: Option<u64> },
    /// The byte ranges readers asked for while recording (since the start or
    /// the last reset); `record` starts (true) or stops (false) recording.
    Trace {
        reset: bool,
        #[serde(default)]
        record: Option<bool>,
    },
}

/// The agent-wide settings of a running agent (from the first mount's options).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    pub cache_dir: std::path::PathBuf,
    pub fetch_unit: u64,
    pub fetch_timeout_ms: u64,
    pub retry_timeout_ms: u64,
    pub fetch_parallel: usize,
    pub read_ahead_kb: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachInfo {
    pub mnt_id: u64,
    pub mnt_id_unique: bool,
    pub mountpoint: String,
    pub sysfs_name: String,
    pub mount_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong { pid: i32 },
    Upgrading { pid: i32 },
    Prefetching { bytes: u64 },
    /// `added`: false when the source already serves the blob.
    SourceAdded { added: bool, source: String },
    Trace {
        digest: Option<String>,
        blob_size: u64,
        ranges: Vec<[u64; 2]>,
        #[serde(default)]
        recording: bool,
    },
    Prepared {
        cache_path: String,
        blob_size: u64,
        read_ahead_kb: u32,
        /// `(st_dev, st_ino)` of the cache file the agent serves: the front end mounts only that file
        /// (0, 0 from agents that do not say).
        #[serde(default)]
        cache_dev: u64,
        #[serde(default)]
        cache_ino: u64,
        /// What the agent runs with, for a front end to compare its own options to.
        #[serde(default)]
        settings: Option<AgentSettings>,
    },
    Attached,
    /// `remaining_mounts`: records the agent still holds; with none left it
    /// leaves as soon as the superblock has closed the cache file.
    Unmounted { remaining_mounts: usize },
    Stats(Box<MountStatus>),
    Error { message: String },
}

/// One mount's status: what `erofs-fanotify status --json` prints (one
/// object per mount), what metrics are made from, and what the tests read.
/// The agent fills its counters; the front end adds what the mount record
/// says (mountpoint, mount id, ...), so there is one type for all of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MountStatus {
    /// From the mount record (empty in the agent's reply).
    #[serde(default)]
    pub mountpoint: String,
    #[serde(default)]
    pub mnt_id: u64,
    #[serde(default)]
    pub cache_key: String,
    #[serde(default)]
    pub sysfs_name: String,
    /// running, unresponsive (alive but not answering), gone.
    #[serde(default)]
    pub agent_state: String,
    pub source: String,
    pub digest: Option<String>,
    pub blob_size: u64,
    pub populated_bytes: u64,
    pub fetched_bytes: u64,
    pub events: u64,
    pub fast_path_events: u64,
    pub fetch_requests: u64,
    pub fetch_errors: u64,
    /// Requests to the blob before the mount was ready: the probe, and those of `fetch_requests` made by the walk and the metadata fetch.
    #[serde(default)]
    pub mount_requests: u64,
    /// Dependent round trips of the metadata walk (0: none was needed).
    #[serde(default)]
    pub walk_round_trips: u64,
    pub denied_events: u64,
    /// fanotify queue overflows (events lost; the queue is unlimited, so this should stay 0).
    #[serde(default)]
    pub overflows: u64,
    pub superblocks: u64,
    pub agent_pid: i32,
    #[serde(default)]
    pub served_by: Option<String>,
    /// lazy, verifying, complete, complete-unverified, digest-mismatch
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub verify_failures: u32,
    /// A background prefetch is running; bytes it fetched so far.
    #[serde(default)]
    pub prefetch_active: bool,
    #[serde(default)]
    pub prefetched_bytes: u64,
    /// Where the image's bytes come from: one entry per segment of its address space.
    #[serde(default)]
    pub segments: Vec<SegmentStatus>,
    #[serde(default)]
    pub fetch_latency: super::stats::HistogramSnapshot,
    #[serde(default)]
    pub event_wait: super::stats::HistogramSnapshot,
    /// The index artifact whose metadata ranges the mount used (none: walked).
    #[serde(default)]
    pub index: Option<String>,
    /// Set when the agent started without reaching its source and serves the cache (offline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<String>,
    /// A gap in which no agent answered this entry's events (its agents died): reads were allowed
    /// unanswered and holes read as zeros, until this agent took the mounts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<FailOpenWindow>,
}

/// One region of the image's address space and its source.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentStatus {
    /// A digest, or what the source is (credential-free).
    pub label: String,
    pub start: u64,
    pub size: u64,
    pub present_bytes: u64,
    /// Why every read of the segment fails: it did not match its digest at completion, twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// When the fail-open gap began (the dead agent's last heartbeat; 0 when unknown) and ended (the
/// re-mark), in Unix ms, and what the takeover did about it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailOpenWindow {
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    pub duration_ms: u64,
    /// Mounts taken over, and files whose page cache was dropped.
    pub mounts: u64,
    pub files_dropped: u64,
}
