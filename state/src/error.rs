//! The error type of the state crate.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong reading or writing the on-disk state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A system call on `path` failed; `op` says what we were doing.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A cache key that could escape its directory or is otherwise malformed.
    #[error("invalid cache key {0:?}")]
    InvalidKey(String),

    /// A digest that is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),

    /// A JSON record that exists but cannot be trusted.
    #[error("corrupt record {}: {reason}", path.display())]
    CorruptRecord { path: PathBuf, reason: String },

    /// A record that cannot be serialized (e.g. a path that is not UTF-8).
    #[error("cannot serialize record for {}: {reason}", path.display())]
    Serialize { path: PathBuf, reason: String },

    /// The cache directory lives on a filesystem where pre-content marks cannot work.
    #[error("cache_dir {} is on {fs}; fanotify pre-content marks need ext4, xfs or btrfs", path.display())]
    UnsupportedCacheFilesystem { path: PathBuf, fs: &'static str },

    /// Another process held the lock for the whole timeout.
    #[error("timed out after {waited:?} waiting for lock {}", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },

    /// A unix socket path longer than `sun_path` allows (107 bytes).
    #[error("socket path {} is {len} bytes; unix sockets allow at most 107", path.display())]
    SocketPathTooLong { path: PathBuf, len: usize },

    /// Something under a state or cache root that is not ours: a symbolic link, an object owned by
    /// someone else or writable by group or others, or not the kind of object it should be.
    #[error("refusing {}: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: String },

    /// `/proc/PID/stat` could not be parsed.
    #[error("cannot parse {}", path.display())]
    ProcStat { path: PathBuf },
}

impl StateError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StateError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn unsafe_entry(path: impl Into<PathBuf>, reason: String) -> Self {
        StateError::Unsafe {
            path: path.into(),
            reason,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StateError::CorruptRecord {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
