//! Which process an agent is, in a form that survives pid reuse.
//!
//! A pid alone can be recycled by an unrelated process after the agent dies. The pair
//! (pid, start time in clock ticks since boot, field 22 of `/proc/PID/stat`) cannot: a new
//! process with the same pid starts later. Records are per boot (`/run`), so ticks since boot
//! are a sound clock.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::StateError;

/// A process, identified so that pid reuse is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub pid: i32,
    /// `starttime` from `/proc/PID/stat` (clock ticks after boot).
    pub start_time: u64,
}

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z, T, t, X, I, ...
    pub state: char,
    /// Field 22.
    pub start_time: u64,
}

/// Parses a `/proc/PID/stat` line. `comm` (field 2) is in parentheses and may itself contain
/// spaces and ')', so the fields after it are found from the **last** ')'.
pub fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let close = line.rfind(')')?;
    let mut fields = line[close + 1..].split_ascii_whitespace();
    // After comm come fields 3, 4, ...: field 22 is the 20th of them.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

fn read_proc_stat(pid: i32) -> Result<Option<ProcStat>, StateError> {
    if pid <= 0 {
        return Ok(None);
    }
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    match std::fs::read_to_string(&path) {
        Ok(line) => parse_proc_stat(&line)
            .map(Some)
            .ok_or(StateError::ProcStat { path }),
        // ENOENT: no such process. ESRCH can show up when it exits while we read.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            Ok(None)
        }
        Err(e) => Err(StateError::io("read", path, e)),
    }
}

impl AgentIdentity {
    /// The calling process.
    pub fn current() -> Result<Self, StateError> {
        let pid = std::process::id() as i32;
        let path = PathBuf::from("/proc/self/stat");
        let line = std::fs::read_to_string(&path).map_err(|e| StateError::io("read", &path, e))?;
        let stat = parse_proc_stat(&line).ok_or(StateError::ProcStat { path })?;
        Ok(AgentIdentity {
            pid,
            start_time: stat.start_time,
        })
    }

    /// The identity of a running process, `None` if there is no such process.
    pub fn of_pid(pid: i32) -> Result<Option<Self>, StateError> {
        Ok(read_proc_stat(pid)?.map(|s| AgentIdentity {
            pid,
            start_time: s.start_time,
        }))
    }

    /// True if this very process still runs: the pid exists, has the same start time, and is
    /// not a zombie (a zombie answers no events and holds no fds, so for us it is dead).
    pub fn is_alive(&self) -> bool {
        match read_proc_stat(self.pid) {
            Ok(Some(stat)) => {
                stat.start_time == self.start_time && !matches!(stat.state, 'Z' | 'X')
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_hostile_comm() {
        let rest = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        assert_eq!(
            parse_proc_stat(&format!("123 (bash) {rest}")),
            Some(ProcStat {
                state: 'S',
                start_time: 424242
            })
        );
        assert_eq!(
            parse_proc_stat(&format!("123 (a) b) c (d) {rest}")),
            Some(ProcStat {
                state: 'S',
                start_time: 424242
            })
        );
        assert_eq!(parse_proc_stat("123 (x) S 1 2"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(
            parse_proc_stat(&format!("1 (x) S {}", "z ".repeat(30))),
            None
        );
    }

    #[test]
    fn current_is_alive_and_wrong_start_time_is_not() {
        let me = AgentIdentity::current().unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.is_alive());
        assert_eq!(AgentIdentity::of_pid(me.pid).unwrap(), Some(me));
        let reused = AgentIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn dead_and_zombie_processes_are_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Wait for it to exit without reaping: then it is a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let id = loop {
            let stat = read_proc_stat(pid).unwrap().unwrap();
            if stat.state == 'Z' {
                break AgentIdentity {
                    pid,
                    start_time: stat.start_time,
                };
            }
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(!id.is_alive(), "zombie counted as alive");
        child.wait().unwrap();
        assert!(!id.is_alive());
        assert_eq!(
            AgentIdentity::of_pid(pid).unwrap().filter(|i| *i == id),
            None
        );
        assert!(!AgentIdentity {
            pid: 0,
            start_time: 0
        }
        .is_alive());
        assert!(!AgentIdentity {
            pid: -5,
            start_time: 0
        }
        .is_alive());
        assert!(!AgentIdentity {
            pid: i32::MAX,
            start_time: 0
        }
        .is_alive());
    }
}
