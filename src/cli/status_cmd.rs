//! `erofs-fanotify status [MOUNTPOINT] [--json]`

use std::path::{Path, PathBuf};
use std::time::Duration;

use erofs_fanotify_state::{self as state, MountRecord};
use serde::Serialize;

use crate::agent::protocol::{Reply, Request, StatsReply};

use super::client::AgentConn;
use super::CliError;

#[derive(Debug, Serialize)]
pub struct MountStatus {
    pub mountpoint: String,
    pub mnt_id: u64,
    pub source: String,
    pub digest: Option<String>,
    pub blob_size: u64,
    pub populated_bytes: u64,
    pub fetched_bytes: u64,
    pub events: u64,
    pub fast_path_events: u64,
    pub fetch_requests: u64,
    pub fetch_errors: u64,
    pub denied_events: u64,
    pub agent_pid: i32,
    pub agent_state: &'static str,
    /// The endpoint that served data last (registry, mirror, redirect target).
    pub served_by: Option<String>,
    /// Cache state: lazy, verifying, complete (detached), complete-unverified, digest-mismatch.
    pub state: String,
    pub verify_failures: u32,
    pub prefetch_active: bool,
    pub prefetched_bytes: u64,
    pub cache_key: String,
    pub sysfs_name: String,
}

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
    let s = stats.unwrap_or_default();
    MountStatus {
        mountpoint: record.mountpoint.display().to_string(),
        mnt_id: record.mnt_id,
        source: record.source.clone(),
        digest: record.digest.clone(),
        blob_size: record.blob_size,
        populated_bytes: s.populated_bytes,
        fetched_bytes: s.fetched_bytes,
        events: s.events,
        fast_path_events: s.fast_path_events,
        fetch_requests: s.fetch_requests,
        fetch_errors: s.fetch_errors,
        denied_events: s.denied_events,
        agent_pid: record.agent.pid,
        agent_state,
        served_by: s.served_by.clone(),
        state: s.state.clone(),
        verify_failures: s.verify_failures,
        prefetch_active: s.prefetch_active,
        prefetched_bytes: s.prefetched_bytes,
        cache_key: record.cache_key.clone(),
        sysfs_name: record.sysfs_name.clone(),
    }
}

fn query(socket: &Path) -> Option<StatsReply> {
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
    if s.prefetch_active || s.prefetched_bytes > 0 {
        let state = if s.prefetch_active { "running" } else { "done" };
        println!("  prefetch:  {} bytes ({state})", s.prefetched_bytes);
    }
    println!("  events:    {} ({} fast path, {} denied)", s.events, s.fast_path_events, s.denied_events);
    if let Some(by) = &s.served_by {
        println!("  served by: {by}");
    }
    println!("  agent:     pid {} ({})", s.agent_pid, s.agent_state);
    println!("  mount id:  {} ({})", s.mnt_id, s.sysfs_name);
}
