//! Where the state lives: [`StateDir`] (runtime, per boot) and [`CacheDir`] (persistent).

use std::path::{Path, PathBuf};

use crate::atomic::{create_private_dir_all, ensure_private_subdir};
use crate::keys::validate_cache_key;
use crate::StateError;

/// Longest path a unix socket address holds (`sun_path` is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The runtime state directory: `mounts/` and `agents/`, both 0700.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub const DEFAULT_ROOT: &'static str = "/run/erofs-fanotify";
    /// Overrides [`Self::DEFAULT_ROOT`] (tests and unprivileged experiments use private ones).
    pub const ENV_VAR: &'static str = "EROFS_FANOTIFY_STATE_DIR";

    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// `$EROFS_FANOTIFY_STATE_DIR` if set and non-empty, else `/run/erofs-fanotify`.
    pub fn from_env() -> Self {
        match std::env::var_os(Self::ENV_VAR) {
            Some(v) if !v.is_empty() => StateDir::new(v),
            _ => StateDir::new(Self::DEFAULT_ROOT),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mounts")
    }

    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// Creates the root (0700 if new) and `mounts/`, `agents/` (forced to 0700).
    /// The record writers call this themselves; it is cheap and idempotent.
    pub fn create(&self) -> Result<(), StateError> {
        create_private_dir_all(&self.root)?;
        ensure_private_subdir(&self.mounts_dir())?;
        ensure_private_subdir(&self.agents_dir())
    }

    /// `mounts/<mnt_id>.json`.
    pub fn mount_record_path(&self, mnt_id: u64) -> PathBuf {
        self.mounts_dir().join(format!("{mnt_id}.json"))
    }

    /// `agents/<key>.json`.
    pub fn agent_record_path(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        Ok(self.agents_dir().join(format!("{key}.json")))
    }

    /// `agents/<key>.lock`.
    pub fn agent_lock_path(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        Ok(self.agents_dir().join(format!("{key}.lock")))
    }

    /// `agents/<key>.sock`; an error if the path does not fit a unix socket address
    /// (the default root leaves room for the longest key: 103 bytes).
    /// The worker's event journal (see the agent's `journal` module).
    pub fn agent_journal_path(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        use sha2::Digest;
        let short = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..8]);
        Ok(self.agents_dir().join(format!("{short}.journal")))
    }

    pub fn agent_socket_path(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        // Unix socket paths are short (108 bytes): name the socket by a hash
        // of the key rather than the key itself.
        use sha2::Digest;
        let short = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..8]);
        let path = self.agents_dir().join(format!("{short}.sock"));
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(StateError::SocketPathTooLong { path, len });
        }
        Ok(path)
    }
}

/// The persistent cache directory: one `<key>/` entry per blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    pub const DEFAULT_ROOT: &'static str = "/var/cache/erofs-fanotify";
    /// Overrides [`Self::DEFAULT_ROOT`] when no `cache_dir=` option is given.
    pub const ENV_VAR: &'static str = "EROFS_FANOTIFY_CACHE_DIR";

    pub fn new(root: impl Into<PathBuf>) -> Self {
        CacheDir { root: root.into() }
    }

    /// `$EROFS_FANOTIFY_CACHE_DIR` if set and non-empty, else `/var/cache/erofs-fanotify`.
    pub fn from_env() -> Self {
        match std::env::var_os(Self::ENV_VAR) {
            Some(v) if !v.is_empty() => CacheDir::new(v),
            _ => CacheDir::new(Self::DEFAULT_ROOT),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root with mode 0700 if it does not exist (an existing one keeps its mode).
    pub fn create(&self) -> Result<(), StateError> {
        create_private_dir_all(&self.root)
    }

    /// `<root>/<key>`, after validating the key.
    pub fn entry_dir(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        Ok(self.root.join(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn layout_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        s.create().unwrap();
        s.create().unwrap();
        for d in [s.root().to_path_buf(), s.mounts_dir(), s.agents_dir()] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
                0o700,
                "{d:?}"
            );
        }
        assert_eq!(
            s.mount_record_path(42),
            dir.path().join("state/mounts/42.json")
        );
        assert_eq!(
            s.agent_lock_path("k").unwrap(),
            dir.path().join("state/agents/k.lock")
        );
        assert!(s.agent_record_path("../x").is_err());
    }

    #[test]
    fn socket_paths_are_short_and_distinct() {
        let s = StateDir::new(StateDir::DEFAULT_ROOT);
        let key = format!("sha256-{}", "a".repeat(64));
        let other = format!("sha256-{}", "b".repeat(64));
        // "/run/erofs-fanotify/agents/" + 16 hex digits + ".sock"
        assert_eq!(s.agent_socket_path(&key).unwrap().as_os_str().len(), 48);
        assert_ne!(s.agent_socket_path(&key).unwrap(), s.agent_socket_path(&other).unwrap());
        let long = StateDir::new(format!("/{}", "d".repeat(90)));
        assert!(matches!(
            long.agent_socket_path(&key),
            Err(StateError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn cache_entry_dir_validates() {
        let c = CacheDir::new("/c");
        assert_eq!(
            c.entry_dir("sha256-ab").unwrap(),
            PathBuf::from("/c/sha256-ab")
        );
        assert!(c.entry_dir("a/b").is_err());
        assert!(c.entry_dir("..").is_err());
    }
}
