//! `erofs-umount [--lazy] MOUNTPOINT | --all`
//!
//! The record is found by the mount id of MOUNTPOINT (never by scanning).
//! After umount(2) the agent is told; when that was its last mount we wait
//! for it to persist its bitmap and exit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use erofs_fanotify_state::{self as state, MountRecord, StateDir};

use crate::agent::protocol::{Reply, Request};
use crate::sys;

use super::client::AgentConn;
use super::CliError;

#[derive(Parser, Debug)]
#[command(name = "erofs-umount", version, about = "Unmount an erofs-fanotify mount and stop its agent")]
pub struct UmountArgs {
    /// Detach now, clean up when no longer busy (MNT_DETACH)
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// Unmount every erofs-fanotify mount of this mount namespace
    #[arg(short = 'a', long, conflicts_with = "mountpoint")]
    pub all: bool,
    /// The mountpoint
    #[arg(required_unless_present = "all")]
    pub mountpoint: Option<PathBuf>,
}

const AGENT_EXIT_WAIT: Duration = Duration::from_secs(10);

pub fn run(args: UmountArgs) -> Result<(), CliError> {
    super::require_root("erofs-umount")?;
    let state_dir = super::state_dir();
    if args.all {
        return umount_all(&state_dir, args.lazy);
    }
    let mountpoint = args.mountpoint.ok_or_else(|| CliError::new("no mountpoint given"))?;
    let record = super::find_record(&state_dir, &mountpoint)?;
    let own_ns = sys::process::mount_namespace_id().unwrap_or(0);
    if record.mount_ns != 0 && own_ns != 0 && record.mount_ns != own_ns {
        // E.g. a container's mount reached through /proc/PID/root: umount(2) cannot reach into another
        // namespace, and the mount goes away with that namespace (the agent follows its superblock).
        return Err(CliError::new(format!(
            "{} is mounted in another mount namespace (a container's?); it goes away with that namespace",
            mountpoint.display()
        )));
    }
    umount_one(&state_dir, &record, &mountpoint, args.lazy)
}


fn umount_one(state_dir: &StateDir, record: &MountRecord, mountpoint: &Path, lazy: bool) -> Result<(), CliError> {
    if let Err(e) = sys::mount::umount(mountpoint, lazy) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(CliError::new(format!("{} is busy (use --lazy to detach it now)", mountpoint.display())));
        }
        return Err(CliError::new(format!("cannot unmount {}: {e}", mountpoint.display())));
    }
    if !record.agent.is_alive() {
        let _ = state::remove_mount_record(state_dir, record.mnt_id);
        eprintln!("erofs-umount: the agent of {} was gone; removed its stale record", mountpoint.display());
        return Ok(());
    }
    let leaving = match AgentConn::connect(&record.control_socket, Duration::from_secs(10))
        .and_then(|mut c| c.call(&Request::Unmounted { mnt_id: record.mnt_id }))
    {
        Ok(Reply::Unmounted { remaining_mounts }) => remaining_mounts == 0,
        _ => {
            // The agent notices superblocks going away by itself (it may have seen this one go and be
            // on its way out, its socket already closed); drop the record, and wait for the agent as
            // above when no other mount of ours still names it.
            let _ = state::remove_mount_record(state_dir, record.mnt_id);
            state::list_mount_records(state_dir)
                .map(|records| !records.iter().flatten().any(|r| r.agent == record.agent))
                .unwrap_or(false)
        }
    };
    if leaving && !lazy {
        if let Ok(pidfd) = sys::process::pidfd_open(record.agent.pid) {
            // Still running afterwards means another reference to the
            // superblock (a bind mount, a namespace copy) keeps it serving.
            if record.agent.is_alive() && !pidfd.wait_exit(AGENT_EXIT_WAIT).unwrap_or(false) {
                eprintln!(
                    "erofs-umount: unmounted; the agent (pid {}) keeps serving other references to the image",
                    record.agent.pid
                );
            }
        }
    }
    Ok(())
}

fn umount_all(state_dir: &StateDir, lazy: bool) -> Result<(), CliError> {
    let own_ns = sys::process::mount_namespace_id().unwrap_or(0);
    let records = state::list_mount_records(state_dir).map_err(|e| CliError::new(format!("cannot list mounts: {e}")))?;
    let mut failures: Vec<String> = Vec::new();
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("unreadable record: {e}"));
                continue;
            }
        };
        if record.mount_ns != own_ns {
            continue;
        }
        let mountpoint = record.mountpoint.clone();
        // Only unmount what is still the recorded mount at that path.
        match sys::statx::mount_id(&mountpoint) {
            Ok(id) if id.id == record.mnt_id => {}
            _ => {
                if !record.agent.is_alive() {
                    let _ = state::remove_mount_record(state_dir, record.mnt_id);
                }
                continue;
            }
        }
        if let Err(e) = umount_one(state_dir, &record, &mountpoint, lazy) {
            failures.push(e.0);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(failures.join("; ")))
    }
}
