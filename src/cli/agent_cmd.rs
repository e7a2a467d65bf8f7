//! `erofs-fanotify agent`: the daemon side, started by `erofs-mount`.
//! Reads its config as JSON on stdin and reports readiness on stdout.

use std::io::Read;

use crate::agent::{startup, AgentConfig};
use crate::sys;

use super::CliError;

pub fn run(foreground: bool) -> Result<i32, CliError> {
    // Before any thread exists: setns(CLONE_NEWNS) needs a single thread,
    // and the agent must not pin the private namespace of whoever mounted.
    if let Err(e) = sys::process::enter_outer_mount_namespace() {
        return Err(CliError::new(format!("cannot leave the caller's mount namespace: {e}")));
    }
    if !foreground {
        // Leave the front end's session so its terminal and signals do not reach us.
        let _ = nix::unistd::setsid();
    }
    let mut input = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut input)
        .map_err(|e| CliError::new(format!("cannot read the agent config: {e}")))?;
    let cfg: AgentConfig =
        serde_json::from_slice(&input).map_err(|e| CliError::new(format!("bad agent config: {e}")))?;
    init_agent_logging();
    let ready = take_stdout()?;
    Ok(startup::run(cfg, ready))
}

/// Moves stdout (the front end's ready pipe) to a private writer and points
/// fd 1 at /dev/null, so the pipe closes as soon as readiness is reported.
fn take_stdout() -> Result<Box<dyn std::io::Write + Send>, CliError> {
    let err = |e: std::io::Error| CliError::new(format!("cannot set up the ready pipe: {e}"));
    let pipe = std::io::stdout().lock();
    let owned = std::os::fd::AsFd::as_fd(&pipe).try_clone_to_owned().map_err(err)?;
    drop(pipe);
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(err)?;
    nix::unistd::dup2_stdout(&devnull).map_err(|e| err(e.into()))?;
    Ok(Box::new(std::fs::File::from(owned)))
}

fn init_agent_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
