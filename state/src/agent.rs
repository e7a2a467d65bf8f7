//! The running agent of one cache entry: `agents/<key>.json`, `.sock` and `.lock`.
//!
//! One blob, one agent: a second mount of the same blob joins the running agent through its
//! control socket instead of starting another (two agents would both write the cache file).
//! [`AgentLock`] enforces it: an exclusive `flock` on `agents/<key>.lock`, held for the agent's
//! life and released by the kernel when the process dies, so a crash never leaves a stale lock.
//! Lock files are never removed: unlinking a lock file while another process waits on it
//! would let two holders exist.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::atomic::{read_capped, remove_if_exists, write_atomic};
use crate::{AgentIdentity, StateDir, StateError};

const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Who serves a cache entry and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub identity: AgentIdentity,
    pub socket: PathBuf,
    pub cache_key: String,
}

/// Writes `agents/<record.cache_key>.json` atomically, mode 0600.
pub fn write_agent_record(state: &StateDir, record: &AgentRecord) -> Result<(), StateError> {
    let path = state.agent_record_path(&record.cache_key)?;
    state.create()?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Serialize {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &json, 0o600)
}

/// Reads `agents/<key>.json`; `Ok(None)` if absent, `CorruptRecord` if unparsable or if it
/// names another key. Whether the agent still runs is for the caller: `identity.is_alive()`.
pub fn read_agent_record(state: &StateDir, key: &str) -> Result<Option<AgentRecord>, StateError> {
    let path = state.agent_record_path(key)?;
    let Some(bytes) = read_capped(&path, MAX_RECORD_BYTES)? else {
        return Ok(None);
    };
    let record: AgentRecord =
        serde_json::from_slice(&bytes).map_err(|e| StateError::corrupt(&path, e.to_string()))?;
    if record.cache_key != key {
        return Err(StateError::corrupt(
            &path,
            format!("holds cache key {:?}", record.cache_key),
        ));
    }
    Ok(Some(record))
}

/// Removes `agents/<key>.json`; true if it existed.
pub fn remove_agent_record(state: &StateDir, key: &str) -> Result<bool, StateError> {
    remove_if_exists(&state.agent_record_path(key)?)
}

/// An exclusive `flock` on `agents/<key>.lock`, released on drop (or when the process dies).
///
/// `flock` belongs to the open file description: a forked child shares it, an exec'd program
/// does not (the fd is close-on-exec), and two opens in one process exclude each other.
#[derive(Debug)]
pub struct AgentLock {
    file: Flock<File>,
    path: PathBuf,
}

impl AgentLock {
    fn open(state: &StateDir, key: &str) -> Result<(File, PathBuf), StateError> {
        let path = state.agent_lock_path(key)?;
        state.create()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StateError::io("open lock", &path, e))?;
        Ok((file, path))
    }

    fn try_flock(file: File, path: &Path) -> Result<Result<Flock<File>, File>, StateError> {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Ok(lock)),
            Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
            Err((_, errno)) => Err(StateError::io("flock", path, errno.into())),
        }
    }

    /// Takes the lock if it is free; `Ok(None)` if another holder has it.
    pub fn try_lock(state: &StateDir, key: &str) -> Result<Option<AgentLock>, StateError> {
        let (file, path) = Self::open(state, key)?;
        Ok(Self::try_flock(file, &path)?
            .ok()
            .map(|file| AgentLock { file, path }))
    }

    /// Takes the lock, waiting up to `timeout` for the holder to release it.
    /// (Polls: a blocking `flock` cannot be given a deadline without signals.)
    pub fn lock(state: &StateDir, key: &str, timeout: Duration) -> Result<AgentLock, StateError> {
        let (mut file, path) = Self::open(state, key)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match Self::try_flock(file, &path)? {
                Ok(file) => return Ok(AgentLock { file, path }),
                Err(f) => file = f,
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(StateError::LockTimeout { path, waited });
            }
            std::thread::sleep(pause.min(timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for AgentLock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sha256-abcd";

    #[test]
    fn record_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(read_agent_record(&state, KEY).unwrap(), None);
        let r = AgentRecord {
            identity: AgentIdentity::current().unwrap(),
            socket: state.agent_socket_path(KEY).unwrap(),
            cache_key: KEY.into(),
        };
        write_agent_record(&state, &r).unwrap();
        assert_eq!(read_agent_record(&state, KEY).unwrap(), Some(r.clone()));
        assert!(read_agent_record(&state, KEY)
            .unwrap()
            .unwrap()
            .identity
            .is_alive());
        std::fs::write(state.agent_record_path(KEY).unwrap(), b"{\"identity\":").unwrap();
        assert!(matches!(
            read_agent_record(&state, KEY),
            Err(StateError::CorruptRecord { .. })
        ));
        let other = AgentRecord {
            cache_key: "other".into(),
            ..r
        };
        std::fs::write(
            state.agent_record_path(KEY).unwrap(),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            read_agent_record(&state, KEY),
            Err(StateError::CorruptRecord { .. })
        ));
        assert!(remove_agent_record(&state, KEY).unwrap());
        assert!(!remove_agent_record(&state, KEY).unwrap());
        assert!(read_agent_record(&state, "../etc").is_err());
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let held = AgentLock::try_lock(&state, KEY)
            .unwrap()
            .expect("free lock");
        assert!(AgentLock::try_lock(&state, KEY).unwrap().is_none());
        let t0 = Instant::now();
        let err = AgentLock::lock(&state, KEY, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, StateError::LockTimeout { .. }));
        assert!(t0.elapsed() >= Duration::from_millis(100));
        // Another key is independent.
        assert!(AgentLock::try_lock(&state, "sha256-other")
            .unwrap()
            .is_some());
        drop(held);
        assert!(AgentLock::try_lock(&state, KEY).unwrap().is_some());
    }

    #[test]
    fn blocking_lock_waits_for_release() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let held = AgentLock::lock(&state, KEY, Duration::from_secs(1)).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        let got = AgentLock::lock(&state, KEY, Duration::from_secs(10)).unwrap();
        assert_eq!(got.path(), state.agent_lock_path(KEY).unwrap());
        releaser.join().unwrap();
    }

    #[test]
    fn lock_is_held_against_other_processes() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let _held = AgentLock::try_lock(&state, KEY).unwrap().unwrap();
        let path = state.agent_lock_path(KEY).unwrap();
        // flock(1) from util-linux: exit code 1 when the lock is busy with -n.
        let status = std::process::Command::new("flock")
            .arg("-n")
            .arg(&path)
            .arg("true")
            .status();
        if let Ok(status) = status {
            assert_eq!(status.code(), Some(1));
        }
    }
}
