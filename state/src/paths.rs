//! Where the state lives: [`StateDir`] (runtime, per boot) and [`CacheDir`] (persistent).

use std::path::{Path, PathBuf};

use crate::fsat::Dir;
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
        self.agents(true)?;
        self.mounts(true)?;
        Ok(())
    }

    /// `agents/`, opened (and with `create`, made) through the root's descriptor; it must be ours.
    pub(crate) fn agents(&self, create: bool) -> Result<Option<Dir>, StateError> {
        self.sub("agents", create)
    }

    /// `mounts/`, as [`Self::agents`].
    pub(crate) fn mounts(&self, create: bool) -> Result<Option<Dir>, StateError> {
        self.sub("mounts", create)
    }

    fn sub(&self, name: &str, create: bool) -> Result<Option<Dir>, StateError> {
        match Dir::open_root(&self.root, create)? {
            Some(root) => root.subdir(name, create, true),
            None => Ok(None),
        }
    }

    /// Opens `agents/<key>.log` for appending (created 0600), through `agents/`'s descriptor.
    pub fn open_agent_log(&self, key: &str) -> Result<std::fs::File, StateError> {
        validate_cache_key(key)?;
        let dir = self
            .agents(true)?
            .ok_or_else(|| StateError::io("create directory", self.agents_dir(), std::io::ErrorKind::NotFound.into()))?;
        dir.open_append(&format!("{key}.log"), 0o600)
    }

    /// `agents/<key>.log`: the log of the agent of `key` (its stderr).
    pub fn agent_log_path(&self, key: &str) -> Result<PathBuf, StateError> {
        validate_cache_key(key)?;
        Ok(self.agents_dir().join(format!("{key}.log")))
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

    /// The worker's event journal (see the agent's `journal` module).
    pub fn agent_journal_path(&self, key: &str) -> Result<PathBuf, StateError> {
        Ok(self.agents_dir().join(journal_name(key)?))
    }

    /// `agents/<key>.sock`; an error if the path does not fit a unix socket address
    /// (the default root leaves room for the longest key: 103 bytes).
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

/// `<hash of key>.journal` (short, like the socket's name).
pub(crate) fn journal_name(key: &str) -> Result<String, StateError> {
    validate_cache_key(key)?;
    use sha2::Digest;
    let short = hex::encode(&sha2::Sha256::digest(key.as_bytes())[..8]);
    Ok(format!("{short}.journal"))
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
        Dir::open_root(&self.root, true).map(|_| ())
    }

    pub(crate) fn root_dir(&self, create: bool) -> Result<Option<Dir>, StateError> {
        Dir::open_root(&self.root, create)
    }

    /// Removes the entry `key` (its files, then its directory) through the root's descriptor: a
    /// symlink in its place is removed itself, never followed. `entry.json` goes first, so an
    /// interrupted removal leaves an entry the next mount recognises as half-made.
    pub fn remove_entry(&self, key: &str) -> Result<(), StateError> {
        validate_cache_key(key)?;
        let Some(root) = self.root_dir(false)? else { return Ok(()) };
        if let Ok(Some(entry)) = root.subdir(key, false, false) {
            entry.remove("entry.json")?;
        }
        root.remove_tree(key)
    }

    /// The `entry.json` of `key`, if the entry is ours and it parses.
    pub fn read_entry_meta(&self, key: &str) -> Result<Option<crate::EntryMeta>, StateError> {
        validate_cache_key(key)?;
        let Some(root) = self.root_dir(false)? else { return Ok(None) };
        let Some(entry) = root.subdir(key, false, false)? else { return Ok(None) };
        let Some(bytes) = entry.read_capped("entry.json", 64 << 20)? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| StateError::corrupt(entry.join("entry.json"), e.to_string()))
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
