//! The daemon side, started by `erofs-mount`: `erofs-fanotify agent` is the
//! supervisor (it holds the fanotify group), `erofs-fanotify worker` does the
//! work. See `agent::supervisor` for the model.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use parking_lot::Mutex;

use erofs_fanotify_state::{JournalHold, StateDir};

use crate::agent::journal::{self, JOURNAL_LEN};
use crate::agent::worker::{self, WorkerContext};
use crate::agent::supervisor::{self, StatusPipe, Supervisor, CACHE_FD, GROUP_FD, STATUS_FD};
use crate::agent::AgentConfig;
use crate::fanotify::Group;
use crate::sys;
use crate::sys::shm::SharedMap;

use super::CliError;

fn read_config() -> Result<(Vec<u8>, AgentConfig), CliError> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut input)
        .map_err(|e| CliError::new(format!("cannot read the agent config: {e}")))?;
    let cfg: AgentConfig =
        serde_json::from_slice(&input).map_err(|e| CliError::new(format!("bad agent config: {e}")))?;
    Ok((input, cfg))
}

/// `erofs-fanotify agent [--foreground]`: the supervisor of a new agent.
pub fn run_supervisor(foreground: bool, adopt: Option<i32>) -> Result<i32, CliError> {
    // Workers inherit it; the supervisor's own group reads stay small.
    let _ = sys::process::raise_open_file_limit(sys::process::WANTED_OPEN_FILES);
    if let Some(worker_pid) = adopt {
        let (bytes, cfg) = read_config()?;
        init_agent_logging();
        let group = sys::process::take_inherited_fd(GROUP_FD)
            .ok_or_else(|| CliError::new("no fanotify group inherited"))?;
        let status = sys::process::take_inherited_fd(STATUS_FD)
            .ok_or_else(|| CliError::new("no status channel inherited"))?;
        let cache_fd = sys::process::take_inherited_fd(CACHE_FD);
        return Ok(Supervisor::adopt(bytes, cfg, group, cache_fd, worker_pid, UnixStream::from(status)));
    }
    // Before any thread exists: setns(CLONE_NEWNS) needs a single thread,
    // and the agent must not pin the private namespace of whoever mounted.
    if let Err(e) = sys::process::enter_outer_mount_namespace() {
        return Err(CliError::new(format!("cannot leave the caller's mount namespace: {e}")));
    }
    if !foreground {
        // Leave the front end's session so its terminal and signals do not reach us.
        let _ = nix::unistd::setsid();
    }
    let (bytes, cfg) = read_config()?;
    init_agent_logging();
    let ready = take_stdout()?;
    Ok(Supervisor::start(bytes, cfg, ready))
}

/// `erofs-fanotify worker [--resume]`: started by a supervisor only.
pub fn run_worker(resume: bool) -> Result<i32, CliError> {
    let (bytes, cfg) = read_config()?;
    // Before the orphans' numbers are reserved: a predecessor may have used numbers up to its
    // own (raised) limit. Never raised again, so a number above it can never become an event's.
    let open_files = sys::process::raise_open_file_limit(sys::process::WANTED_OPEN_FILES);
    let group = sys::process::take_inherited_fd(GROUP_FD).ok_or_else(|| CliError::new("no fanotify group inherited"))?;
    let status = sys::process::take_inherited_fd(STATUS_FD).map(UnixStream::from);
    let cache_fd = Arc::new(Mutex::new(sys::process::take_inherited_fd(CACHE_FD).map(File::from)));
    // Journal and fd-number reservations come before anything else opens a
    // descriptor (see agent::journal).
    let placeholder = File::open("/dev/null").map_err(|e| CliError::new(format!("cannot open /dev/null: {e}")))?;
    let state = StateDir::new(cfg.state_dir.clone());
    let journal_path = worker::journal_path(&state, &cfg.cache_key).map_err(CliError::new)?;
    let journal_error = |e: String| CliError::new(format!("cannot open the journal {}: {e}", journal_path.display()));
    // Held for the life of the process: a journal nobody holds belongs to no living agent.
    let journal_hold = JournalHold::open(&state, &cfg.cache_key).map_err(|e| journal_error(e.to_string()))?;
    let (header, batch_bytes, slot_words) = journal_hold
        .file()
        .try_clone()
        .and_then(|f| SharedMap::from_file(f, JOURNAL_LEN))
        .and_then(journal::map)
        .map_err(|e| journal_error(e.to_string()))?;
    let journal::Opened { heartbeat, batch, slots, orphans, last_alive_ms } =
        journal::open(header, batch_bytes, slot_words).map_err(CliError::new)?;
    let mut reserved = Vec::new();
    for orphan in &orphans {
        if let Ok(Some(fd)) = sys::process::reserve_fd_number(orphan.fd, std::os::fd::AsFd::as_fd(&placeholder)) {
            reserved.push((orphan.fd, fd));
        }
    }
    init_agent_logging();
    match open_files {
        Ok(n) if n < sys::process::WANTED_OPEN_FILES => tracing::warn!(limit = n, "open file limit stays below what bursts of events need"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    if !orphans.is_empty() {
        tracing::warn!(orphans = orphans.len(), reserved = reserved.len(), "journal holds unanswered events");
    }
    let ready: Option<Box<dyn std::io::Write + Send>> = if resume { None } else { Some(Box::new(take_stdout()?)) };
    let group = Arc::new(Group::from_owned(group));
    let status = Arc::new(StatusPipe::new(status));
    let supervisor_pid = nix::unistd::getppid().as_raw();
    {
        let (group, cache_fd, status, bytes) =
            (Arc::clone(&group), Arc::clone(&cache_fd), Arc::clone(&status), bytes.clone());
        let _ = std::thread::Builder::new()
            .name("supervisor-watch".into())
            .spawn(move || supervisor::watch_supervisor(group, cache_fd, status, bytes, supervisor_pid));
    }
    let ctx = WorkerContext {
        group,
        status,
        ready,
        resume,
        batch: Some(batch),
        slots: Arc::new(slots),
        heartbeat: Arc::new(heartbeat),
        predecessor_alive_ms: last_alive_ms,
        orphans,
        reserved,
        cache_fd,
    };
    let code = worker::run_worker(cfg, ctx);
    // The placeholder stays open until here: orphan numbers must stay taken.
    drop(placeholder);
    drop(journal_hold);
    Ok(code)
}

/// Moves stdout (the front end's ready pipe) to a private file and points
/// fd 1 at /dev/null, so the pipe closes as soon as readiness is reported.
fn take_stdout() -> Result<File, CliError> {
    let err = |e: std::io::Error| CliError::new(format!("cannot set up the ready pipe: {e}"));
    let pipe = std::io::stdout().lock();
    let owned = std::os::fd::AsFd::as_fd(&pipe).try_clone_to_owned().map_err(err)?;
    drop(pipe);
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(err)?;
    nix::unistd::dup2_stdout(&devnull).map_err(|e| err(e.into()))?;
    Ok(File::from(owned))
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
