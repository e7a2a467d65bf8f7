//! `erofs-fanotify status [MOUNTPOINT] [--json]`

use std::path::{Path, PathBuf};
use std::time::Duration;

use erofs_fanotify_state::{self as state, MountRecord};

use crate::agent::protocol::{MountStatus, Reply, Request};

use super::client::AgentConn;
use super::CliError;

pub fn run(mountpoint: Option<PathBuf>, json: bool) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let records = match &mountpoint {
        Some(mp) => {
            vec![super::find_record(&state_dir, mp)?]
        }
        None => state::list_mount_records(&state_dir)
            .map_err(|e| CliError::new(format!("cannot list mounts: {e}")))?
            .into_iter()
            .filter_map(|r| match r {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable mount record");
                    None
                }
            })
            .collect(),
    };
    let statuses: Vec<MountStatus> = records.iter().map(collect).collect();
    if json {
        let out = serde_json::to_string_pretty(&statuses).map_err(|e| CliError::new(e.to_string()))?;
        println!("{out}");
    } else if statuses.is_empty() {
        println!("no erofs-fanotify mounts");
    } else {
        for s in &statuses {
            print_human(s);
        }
    }
    Ok(())
}

fn collect(record: &MountRecord) -> MountStatus {
    let alive = record.agent.is_alive();
    let stats = if alive { query(&record.control_socket) } else { None };
    let agent_state = match (alive, stats.is_some()) {
        (true, true) => "running",
        (true, false) => "unresponsive",
        (false, _) => "gone",
    };
    let mut s = stats.unwrap_or_else(|| MountStatus {
        source: record.source.clone(),
        digest: record.digest.clone(),
        blob_size: record.blob_size,
        ..MountStatus::default()
    });
    s.mountpoint = record.mountpoint.display().to_string();
    s.mnt_id = record.mnt_id;
    s.cache_key = record.cache_key.clone();
    s.sysfs_name = record.sysfs_name.clone();
    s.agent_state = agent_state.to_string();
    s.agent_pid = record.agent.pid;
    s
}

fn query(socket: &Path) -> Option<MountStatus> {
    let mut conn = AgentConn::connect(socket, Duration::from_secs(3)).ok()?;
    match conn.call(&Request::Stats) {
        Ok(Reply::Stats(s)) => Some(*s),
        _ => None,
    }
}

fn print_human(s: &MountStatus) {
    let pct = if s.blob_size > 0 { s.populated_bytes as f64 * 100.0 / s.blob_size as f64 } else { 100.0 };
    println!("{}", s.mountpoint);
    println!("  source:    {}", s.source);
    if let Some(d) = &s.digest {
        println!("  digest:    {d}");
    }
    println!("  present:   {} / {} bytes ({pct:.1}%), {}", s.populated_bytes, s.blob_size, s.state);
    println!("  fetched:   {} bytes in {} requests, {} errors", s.fetched_bytes, s.fetch_requests, s.fetch_errors);
    println!("  at mount:  {} requests, {} walk round trips", s.mount_requests, s.walk_round_trips);
    if s.prefetch_active || s.prefetched_bytes > 0 {
        let state = if s.prefetch_active { "running" } else { "done" };
        println!("  prefetch:  {} bytes ({state})", s.prefetched_bytes);
    }
    println!("  events:    {} ({} fast path, {} denied)", s.events, s.fast_path_events, s.denied_events);
    if let Some(index) = &s.index {
        println!("  index:     {index}");
    }
    if let Some(by) = &s.served_by {
        println!("  served by: {by}");
    }
    println!("  agent:     pid {} ({})", s.agent_pid, s.agent_state);
    println!("  mount id:  {} ({})", s.mnt_id, s.sysfs_name);
}
