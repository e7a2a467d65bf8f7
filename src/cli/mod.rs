//! Front-end commands. Each returns an exit code; errors are printed as one
//! sentence on stderr (`error_line`) and details go to the agent's log.

pub mod agent_cmd;
pub mod bucket_build_cmd;
pub mod build_cmd;
pub mod merge_cmd;
pub mod cache_cmd;
pub mod client;
pub mod convert_cmd;
pub mod container_mount;
pub mod helper;
pub mod hook_cmd;
pub mod index_cmd;
pub mod metrics_cmd;
pub mod mount_cmd;
pub mod prefetch_cmd;
pub mod push_cmd;
pub mod status_cmd;
pub mod tar_index_mount;
pub mod trace_cmd;
pub mod umount_cmd;
pub mod upgrade_cmd;

use erofs_fanotify_state::StateDir;

/// A failure of a front-end command: one clear line for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl CliError {
    pub fn new(msg: impl Into<String>) -> CliError {
        CliError(msg.into())
    }
}

pub fn print_error(prog: &str, e: &CliError) {
    // One line, always: multi-line causes are folded.
    let line = e.0.replace('\n', "; ");
    eprintln!("{prog}: {line}");
}

pub fn require_root(prog: &str) -> Result<(), CliError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(CliError::new(format!(
            "{prog} must be run as root (fanotify pre-content events and mounting need CAP_SYS_ADMIN)"
        )))
    }
}

/// The record of the erofs-fanotify mount at `mountpoint`, found by its mount
/// id (never by scanning).
pub fn find_record(
    state_dir: &StateDir,
    mountpoint: &std::path::Path,
) -> Result<erofs_fanotify_state::MountRecord, CliError> {
    let id = crate::sys::statx::mount_id(mountpoint)
        .map_err(|e| CliError::new(format!("cannot access {}: {e}", mountpoint.display())))?;
    match erofs_fanotify_state::read_mount_record(state_dir, id.id) {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(CliError::new(format!("{} is not an erofs-fanotify mount", mountpoint.display()))),
        Err(e) => Err(CliError::new(format!("cannot read the record of {}: {e}", mountpoint.display()))),
    }
}

pub fn state_dir() -> StateDir {
    StateDir::from_env()
}

/// Logging for front ends: warnings only unless RUST_LOG says otherwise.
pub fn init_cli_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
