//! The running agent of one cache entry: `agents/<key>.json`, `.sock` and `.lock`.
//!
//! One blob, one agent: a second mount of the same blob joins the running agent through its
//! control socket instead of starting another (two agents would both write the cache file).
//! [`AgentLock`] enforces it: an exclusive `flock` on `agents/<key>.lock`, held while a front end
//! finds or starts the agent and while the agent leaves, and released by the kernel when the
//! process dies, so a crash never leaves a stale lock. A lock file may be removed by its holder
//! ([`AgentLock::remove`]): whoever takes a lock checks afterwards that the path still names the
//! file it locked and starts over if not, so two holders never exist.
//!
//! The journal (`agents/<hash>.journal`) is held with a shared `flock` by the agent's processes
//! for their whole life ([`JournalHold`]); a journal nobody holds belongs to no living agent and
//! is removed by [`crate::sweep_agents_dir`].

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::fsat::Dir;
use crate::{AgentIdentity, StateDir, StateError};

const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Who serves a cache entry and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub identity: AgentIdentity,
    pub socket: PathBuf,
    pub cache_key: String,
    /// The agent's configuration without credentials, so that an agent that died can be started
    /// again for its live mounts (`erofs-fanotify upgrade`).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

fn agents_dir(state: &StateDir) -> Result<Dir, StateError> {
    state
        .agents(true)?
        .ok_or_else(|| StateError::io("create directory", state.agents_dir(), std::io::ErrorKind::NotFound.into()))
}

/// Writes `agents/<record.cache_key>.json` atomically, mode 0600.
pub fn write_agent_record(state: &StateDir, record: &AgentRecord) -> Result<(), StateError> {
    let path = state.agent_record_path(&record.cache_key)?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Serialize {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    agents_dir(state)?.write_atomic(&format!("{}.json", record.cache_key), &json, 0o600)
}

/// Reads `agents/<key>.json`; `Ok(None)` if absent, `CorruptRecord` if unparsable or if it
/// names another key. Whether the agent still runs is for the caller: `identity.is_alive()`.
pub fn read_agent_record(state: &StateDir, key: &str) -> Result<Option<AgentRecord>, StateError> {
    let path = state.agent_record_path(key)?;
    let Some(dir) = state.agents(false)? else {
        return Ok(None);
    };
    let Some(bytes) = dir.read_capped(&format!("{key}.json"), MAX_RECORD_BYTES)? else {
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
    state.agent_record_path(key)?;
    match state.agents(false)? {
        Some(dir) => dir.remove(&format!("{key}.json")),
        None => Ok(false),
    }
}

/// An exclusive `flock` on `agents/<key>.lock`, released on drop (or when the process dies).
///
/// `flock` belongs to the open file description: a forked child shares it, an exec'd program
/// does not (the fd is close-on-exec), and two opens in one process exclude each other.
#[derive(Debug)]
pub struct AgentLock {
    file: Flock<File>,
    path: PathBuf,
    dir: Dir,
    name: String,
}

impl AgentLock {
    fn try_flock(file: File, path: &Path) -> Result<Result<Flock<File>, File>, StateError> {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Ok(lock)),
            Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
            Err((_, errno)) => Err(StateError::io("flock", path, errno.into())),
        }
    }

    /// Takes the lock, waiting up to `timeout` (`None`: do not wait). `Ok(None)`: held by another.
    fn acquire(state: &StateDir, key: &str, timeout: Option<Duration>) -> Result<Option<AgentLock>, StateError> {
        let path = state.agent_lock_path(key)?;
        let name = format!("{key}.lock");
        let dir = agents_dir(state)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let mut file = dir.open_or_create(&name, 0o600)?;
            let locked = loop {
                match Self::try_flock(file, &path)? {
                    Ok(lock) => break lock,
                    Err(f) => file = f,
                }
                let waited = start.elapsed();
                match timeout {
                    None => return Ok(None),
                    Some(t) if waited >= t => return Err(StateError::LockTimeout { path, waited }),
                    Some(t) => std::thread::sleep(pause.min(t - waited)),
                }
                pause = (pause * 2).min(Duration::from_millis(50));
            };
            // Removed (and maybe made anew) by its holder while we waited: start over.
            if dir.names_file(&name, &locked)? {
                return Ok(Some(AgentLock { file: locked, path, dir, name }));
            }
        }
    }

    /// Takes the lock if it is free; `Ok(None)` if another holder has it.
    pub fn try_lock(state: &StateDir, key: &str) -> Result<Option<AgentLock>, StateError> {
        Self::acquire(state, key, None)
    }

    /// Takes the lock, waiting up to `timeout` for the holder to release it.
    /// (Polls: a blocking `flock` cannot be given a deadline without signals.)
    pub fn lock(state: &StateDir, key: &str, timeout: Duration) -> Result<AgentLock, StateError> {
        Self::acquire(state, key, Some(timeout))?.ok_or_else(|| StateError::LockTimeout { path: state.agents_dir(), waited: timeout })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file while holding the lock, then releases it (see the module doc).
    pub fn remove(self) -> Result<(), StateError> {
        self.dir.remove(&self.name)?;
        Ok(())
    }
}

impl AsFd for AgentLock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// A shared `flock` on an agent's journal, held by its supervisor and worker for their life, with
/// the journal file opened read-write (for the shared mapping).
#[derive(Debug)]
pub struct JournalHold {
    file: Flock<File>,
}

impl JournalHold {
    /// Opens (creating, 0600) and holds the journal of `key`.
    pub fn open(state: &StateDir, key: &str) -> Result<JournalHold, StateError> {
        let name = crate::paths::journal_name(key)?;
        let dir = agents_dir(state)?;
        loop {
            let file = dir.open_or_create(&name, 0o600)?;
            // Blocking: only a sweep holds it exclusively, for an instant, before removing it.
            let held = Flock::lock(file, FlockArg::LockShared)
                .map_err(|(_, e)| StateError::io("flock", dir.join(&name), e.into()))?;
            if dir.names_file(&name, &held)? {
                return Ok(JournalHold { file: held });
            }
        }
    }

    /// The journal file (for mapping; the lock stays with this hold).
    pub fn file(&self) -> &File {
        &self.file
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
            config: Some(serde_json::json!({"source": {"kind": "url"}})),
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
