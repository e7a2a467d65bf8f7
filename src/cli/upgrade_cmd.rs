//! `erofs-fanotify upgrade [MOUNTPOINT | --all]`: replace the worker of an
//! agent with the binary now on disk, without failing a read. The worker
//! stops reading events, answers what it holds, persists, and exits; the
//! supervisor (which keeps the fanotify group open throughout) starts the
//! new binary, which picks up the events that arrived meanwhile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use erofs_fanotify_state::{self as state, MountRecord};

use crate::agent::protocol::{Reply, Request};

use super::client::AgentConn;
use super::CliError;

const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(mountpoint: Option<PathBuf>, all: bool) -> Result<(), CliError> {
    super::require_root("erofs-fanotify upgrade")?;
    let state_dir = super::state_dir();
    let records: Vec<MountRecord> = match (mountpoint, all) {
        (Some(mp), false) => {
            vec![super::find_record(&state_dir, &mp)?]
        }
        (None, true) => state::list_mount_records(&state_dir)
            .map_err(|e| CliError::new(format!("cannot list mounts: {e}")))?
            .into_iter()
            .flatten()
            .collect(),
        _ => return Err(CliError::new("give a mountpoint or --all")),
    };
    // One agent may serve several mounts: upgrade each agent once.
    let mut agents: BTreeMap<String, MountRecord> = BTreeMap::new();
    for r in records {
        agents.entry(r.cache_key.clone()).or_insert(r);
    }
    let mut failures = Vec::new();
    for record in agents.values() {
        // Both agent processes died with the mount live: a new agent takes it over.
        let outcome = if record.agent.is_alive() {
            upgrade_one(&record.control_socket)
        } else {
            super::mount_cmd::restart_dead_agent(&state_dir, &record.cache_key).map_err(|e| e.0)
        };
        match outcome {
            Ok((old, new)) => println!("{}: worker {old} replaced by {new}", record.mountpoint.display()),
            Err(e) => failures.push(format!("{}: {e}", record.mountpoint.display())),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(failures.join("; ")))
    }
}

fn upgrade_one(socket: &Path) -> Result<(i32, i32), String> {
    let mut conn = AgentConn::connect(socket, Duration::from_secs(10)).map_err(|e| format!("agent unreachable: {e}"))?;
    let old = match conn.call(&Request::Upgrade) {
        Ok(Reply::Upgrading { pid }) => pid,
        Ok(other) => return Err(format!("unexpected reply {other:?}")),
        Err(e) => return Err(format!("agent does not answer: {e}")),
    };
    drop(conn);
    let started = Instant::now();
    while started.elapsed() < UPGRADE_TIMEOUT {
        std::thread::sleep(Duration::from_millis(50));
        let pong = AgentConn::connect(socket, Duration::from_secs(2)).and_then(|mut c| c.call(&Request::Ping));
        if let Ok(Reply::Pong { pid }) = pong {
            if pid != old {
                return Ok((old, pid));
            }
        }
    }
    Err(format!("no new worker answered within {} s", UPGRADE_TIMEOUT.as_secs()))
}
