//! Cleaning up after agents that are gone: `agents/` must not fill `/run` with journals (320 KiB
//! each), logs and locks of agents that no longer exist.
//!
//! An agent is **alive** while its record names a live process, or its journal is held (its
//! supervisor and worker hold a shared `flock` on it for their life, also while a worker restarts), or
//! its agent lock is held (a front end is starting or joining it). Files of agents that are not alive:
//!
//! * journals nobody holds are removed (taken with an exclusive `flock` first, so none is removed
//!   under a process that is just opening it);
//! * records, sockets and lock files are removed (under the agent lock);
//! * logs are kept as long as they are young ([`SweepPolicy::log_max_age`]) and fit the budget
//!   ([`SweepPolicy::dead_log_budget`], newest first); the rest are removed;
//! * a restart config (`<key>.config`, for restarting an agent after all its processes died) is kept
//!   while a mount record names the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::paths::journal_name;
use crate::{list_mount_records, read_agent_record, validate_cache_key, AgentLock, StateDir, StateError};

/// Bounds for the logs of agents that are gone.
#[derive(Debug, Clone)]
pub struct SweepPolicy {
    pub log_max_age: Duration,
    /// Total bytes of logs of dead agents kept (newest first).
    pub dead_log_budget: u64,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        SweepPolicy { log_max_age: Duration::from_secs(7 * 86_400), dead_log_budget: 8 << 20 }
    }
}

/// What a sweep removed.
#[derive(Debug, Default, Clone)]
pub struct SweepReport {
    pub removed: Vec<PathBuf>,
    pub freed_bytes: u64,
}

/// The key a file of `agents/` belongs to, by its name (`None` for hashed names and foreign files).
fn key_of(name: &str) -> Option<&str> {
    let key = [".json", ".lock", ".log", ".log.1", ".config"].iter().find_map(|suffix| name.strip_suffix(suffix))?;
    validate_cache_key(key).ok().map(|_| key)
}

/// Removes what agents that are gone left in `agents/` (see the module doc). `now_unix`: the clock
/// for log ages.
pub fn sweep_agents_dir(state: &StateDir, policy: &SweepPolicy, now_unix: u64) -> Result<SweepReport, StateError> {
    let mut report = SweepReport::default();
    let Some(dir) = state.agents(false)? else { return Ok(report) };
    let names = dir.names()?;
    let keys: BTreeSet<&str> = names.iter().filter_map(|n| key_of(n)).collect();
    let live: BTreeSet<&str> = keys
        .iter()
        .copied()
        .filter(|k| matches!(read_agent_record(state, k), Ok(Some(r)) if r.identity.is_alive()))
        .collect();
    let hash_of: BTreeMap<String, &str> = keys.iter().filter_map(|k| Some((journal_name(k).ok()?, *k))).collect();
    let mounted: BTreeSet<String> = list_mount_records(state)
        .map(|records| records.into_iter().flatten().map(|r| r.cache_key).collect())
        .unwrap_or_default();

    // Journals: held ones belong to living agents (and so do their keys and sockets).
    let mut held_journals = BTreeSet::new();
    for name in names.iter().filter(|n| n.ends_with(".journal") && !n.starts_with('.')) {
        if hash_of.get(name).is_some_and(|k| live.contains(k)) {
            held_journals.insert(name.clone());
            continue;
        }
        let Some(file) = dir.open_file(name, false).ok().flatten() else { continue };
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => {
                if dir.names_file(name, &locked)? && dir.remove(name)? {
                    report.removed.push(dir.join(name));
                    report.freed_bytes += size;
                }
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                held_journals.insert(name.clone());
            }
            Err((_, e)) => return Err(StateError::io("flock", dir.join(name), e.into())),
        }
    }

    let mut dead_logs = Vec::new();
    for key in keys.iter().copied().filter(|k| !live.contains(k)) {
        let journal = journal_name(key)?;
        if held_journals.contains(&journal) {
            continue;
        }
        // A front end holds it: an agent is starting or being joined.
        let Some(lock) = AgentLock::try_lock(state, key)? else { continue };
        for name in [format!("{key}.json"), journal.replace(".journal", ".sock")] {
            let size = dir.stat(&name)?.map_or(0, |st| st.st_size as u64);
            if dir.remove(&name)? {
                report.removed.push(dir.join(&name));
                report.freed_bytes += size;
            }
        }
        if !mounted.contains(key) {
            let name = format!("{key}.config");
            if dir.remove(&name)? {
                report.removed.push(dir.join(&name));
            }
        }
        for name in [format!("{key}.log"), format!("{key}.log.1")] {
            if let Some(st) = dir.stat(&name)? {
                dead_logs.push((st.st_mtime.max(0) as u64, st.st_size.max(0) as u64, name));
            }
        }
        report.removed.push(lock.path().to_path_buf());
        lock.remove()?;
    }

    // Newest first: young logs are kept while they fit the budget.
    dead_logs.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
    let mut kept = 0u64;
    for (mtime, size, name) in dead_logs {
        let young = now_unix.saturating_sub(mtime) <= policy.log_max_age.as_secs();
        if young && kept + size <= policy.dead_log_budget {
            kept += size;
            continue;
        }
        if dir.remove(&name)? {
            report.removed.push(dir.join(&name));
            report.freed_bytes += size;
        }
    }
    Ok(report)
}

/// Removes the journal of `key` if nobody holds it (its agent is gone); true if removed.
pub fn remove_unheld_journal(state: &StateDir, key: &str) -> Result<bool, StateError> {
    let name = journal_name(key)?;
    let Some(dir) = state.agents(false)? else { return Ok(false) };
    let Some(file) = dir.open_file(&name, false)? else { return Ok(false) };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(dir.names_file(&name, &locked)? && dir.remove(&name)?),
        Err((_, Errno::EWOULDBLOCK)) => Ok(false),
        Err((_, e)) => Err(StateError::io("flock", dir.join(&name), e.into())),
    }
}

/// Whether a process (an agent's supervisor or worker) holds the journal of `key`: a live agent
/// does, even between a dead worker and its successor. False when there is no journal.
pub fn journal_held(state: &StateDir, key: &str) -> Result<bool, StateError> {
    let name = journal_name(key)?;
    let Some(dir) = state.agents(false)? else { return Ok(false) };
    let Some(file) = dir.open_file(&name, false)? else { return Ok(false) };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => Ok(false),
        Err((_, Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(StateError::io("flock", dir.join(&name), e.into())),
    }
}

/// Puts the log of `key` back as it was: removed when it did not exist (`None`), else cut back to
/// `len` bytes (what a failed start appended goes; its cause was printed).
pub fn restore_agent_log(state: &StateDir, key: &str, len: Option<u64>) -> Result<(), StateError> {
    validate_cache_key(key)?;
    let Some(dir) = state.agents(false)? else { return Ok(()) };
    let name = format!("{key}.log");
    match len {
        None => {
            dir.remove(&name)?;
        }
        Some(len) => {
            if let Some(file) = dir.open_file(&name, true)? {
                if file.metadata().map(|m| m.len() > len).unwrap_or(false) {
                    file.set_len(len).map_err(|e| StateError::io("truncate", dir.join(&name), e))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{write_agent_record, AgentIdentity, AgentRecord, JournalHold};

    fn key(c: char) -> String {
        format!("sha256-{}", c.to_string().repeat(64))
    }

    fn touch(state: &StateDir, name: &str, bytes: usize, age_secs: u64) {
        let path = state.agents_dir().join(name);
        std::fs::write(&path, vec![b'x'; bytes]).unwrap();
        let when = std::time::SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
    }

    fn names(state: &StateDir) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(state.agents_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn files_of_dead_agents_go_and_live_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create().unwrap();
        let (live, dead, busy) = (key('a'), key('b'), key('c'));
        // A live agent: record naming us, its journal held, its log.
        write_agent_record(
            &state,
            &AgentRecord { identity: AgentIdentity::current().unwrap(), socket: state.agent_socket_path(&live).unwrap(), cache_key: live.clone(), config: None },
        )
        .unwrap();
        let _hold = JournalHold::open(&state, &live).unwrap();
        touch(&state, &format!("{live}.log"), 10, 30 * 86_400);
        // A dead agent: a record of a process that does not exist, its journal, lock, old log.
        write_agent_record(
            &state,
            &AgentRecord { identity: AgentIdentity { pid: i32::MAX - 1, start_time: 1 }, socket: state.agent_socket_path(&dead).unwrap(), cache_key: dead.clone(), config: None },
        )
        .unwrap();
        drop(JournalHold::open(&state, &dead).unwrap());
        drop(AgentLock::try_lock(&state, &dead).unwrap().unwrap());
        touch(&state, &format!("{dead}.log"), 10, 30 * 86_400);
        // A mount starting: its lock is held, nothing of it is touched.
        let starting = AgentLock::try_lock(&state, &busy).unwrap().unwrap();
        touch(&state, &format!("{busy}.log"), 10, 30 * 86_400);
        let report = sweep_agents_dir(&state, &SweepPolicy::default(), crate::unix_now()).unwrap();
        let left = names(&state);
        let journal = |k: &str| journal_name(k).unwrap();
        assert!(left.contains(&journal(&live)) && left.contains(&format!("{live}.json")) && left.contains(&format!("{live}.log")), "{left:?}");
        for gone in [journal(&dead), format!("{dead}.json"), format!("{dead}.lock"), format!("{dead}.log")] {
            assert!(!left.contains(&gone), "{gone} survived: {left:?}");
        }
        assert!(left.contains(&format!("{busy}.lock")) && left.contains(&format!("{busy}.log")), "{left:?}");
        assert_eq!(report.removed.len(), 4, "{report:?}");
        drop(starting);
    }

    #[test]
    fn dead_logs_are_bounded_by_age_and_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create().unwrap();
        let policy = SweepPolicy { log_max_age: Duration::from_secs(86_400), dead_log_budget: 2500 };
        touch(&state, &format!("{}.log", key('1')), 1000, 10);
        touch(&state, &format!("{}.log", key('2')), 1000, 20);
        touch(&state, &format!("{}.log", key('3')), 1000, 30);
        touch(&state, &format!("{}.log.1", key('4')), 10, 2 * 86_400);
        sweep_agents_dir(&state, &policy, crate::unix_now()).unwrap();
        assert_eq!(names(&state), vec![format!("{}.log", key('1')), format!("{}.log", key('2'))]);
    }

    #[test]
    fn journals_go_only_when_unheld_and_logs_go_back_as_they_were() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.create().unwrap();
        let k = key('e');
        let hold = JournalHold::open(&state, &k).unwrap();
        assert!(!remove_unheld_journal(&state, &k).unwrap(), "a held journal stays");
        drop(hold);
        assert!(remove_unheld_journal(&state, &k).unwrap());
        assert!(!state.agent_journal_path(&k).unwrap().exists());
        touch(&state, &format!("{k}.log"), 100, 0);
        restore_agent_log(&state, &k, Some(40)).unwrap();
        assert_eq!(std::fs::metadata(state.agent_log_path(&k).unwrap()).unwrap().len(), 40);
        restore_agent_log(&state, &k, None).unwrap();
        assert!(names(&state).is_empty(), "{:?}", names(&state));
    }

    #[test]
    fn a_removed_lock_file_never_gives_two_holders() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        let k = key('f');
        let first = AgentLock::try_lock(&state, &k).unwrap().unwrap();
        let state2 = state.clone();
        let k2 = k.clone();
        let waiter = std::thread::spawn(move || AgentLock::lock(&state2, &k2, Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        first.remove().unwrap();
        let second = waiter.join().unwrap();
        assert!(AgentLock::try_lock(&state, &k).unwrap().is_none(), "two holders");
        assert!(state.agent_lock_path(&k).unwrap().exists());
        drop(second);
        assert!(AgentLock::try_lock(&state, &k).unwrap().is_some());
    }
}
