//! The supervisor: a small process that holds the fanotify group so that no
//! single process death closes it, and restarts the worker.
//!
//! It never touches the network and never parses remote data: it creates
//! the group, spawns a worker with the group fd inherited (fd 3) and a status
//! pipe (fd 4), and reads one word per line from that pipe: `entry_created`,
//! `ready`, `exit_clean`, `exit_upgrade`. End of file without an `exit_*`
//! word means the worker died: a new one is started (with backoff) in resume
//! mode, and it answers the events the dead one left (see `journal`).
//!
//! A worker that stops answering (SIGSTOP, a wedged event loop or runtime)
//! while readers wait is killed by the watchdog (`watchdog`: heartbeats in
//! the journal header, read here) and replaced like a dead one.
//!
//! If the supervisor dies instead, the worker keeps the group alive and
//! starts a new supervisor in *adopt* mode, which watches the existing worker.
//! When every process dies at once the kernel closes the group and allows
//! whatever was pending: the one case no design of ours can cover.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use erofs_fanotify_state::{CacheDir, JournalHold, StateDir};
use parking_lot::Mutex;

use crate::fanotify::Group;
use crate::sys;

use super::watchdog::{self, SharedJournalView, Watch};
use super::AgentConfig;

/// Fd numbers of what a worker or supervisor inherits.
pub const GROUP_FD: i32 = 3;
pub const STATUS_FD: i32 = 4;
/// The cache file, opened before the mark (writes through it raise no events).
pub const CACHE_FD: i32 = 5;

/// What the last worker said before its status pipe closed.
#[derive(Default, Debug)]
struct WorkerReport {
    entry_created: bool,
    ready: bool,
    exit: Option<String>,
    /// The watchdog killed it: start the successor at once.
    killed: bool,
}

pub struct Supervisor {
    cfg_bytes: Vec<u8>,
    cfg: AgentConfig,
    group: OwnedFd,
    binary: PathBuf,
    /// The first worker's pre-mark fd of the cache file, for its successors.
    cache_fd: Mutex<Option<OwnedFd>>,
    /// The worker's journal, read by the watchdog (None: not watched).
    journal: Option<SharedJournalView>,
    /// Held for our life (see `JournalHold`): the journal outlives any one worker.
    _journal_hold: Option<JournalHold>,
}

impl Supervisor {
    pub fn new(cfg_bytes: Vec<u8>, cfg: AgentConfig, group: OwnedFd, cache_fd: Option<OwnedFd>) -> Supervisor {
        let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("erofs-fanotify"));
        let hold = JournalHold::open(&StateDir::new(cfg.state_dir.clone()), &cfg.cache_key);
        let journal = hold
            .as_ref()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|h| h.file().try_clone())
            .and_then(watchdog::open_view);
        let journal = match journal {
            Ok(view) => Some(view),
            Err(e) => {
                tracing::warn!(error = %e, "cannot map the journal; workers are not watched");
                None
            }
        };
        Supervisor { cfg_bytes, cfg, group, binary, cache_fd: Mutex::new(cache_fd), journal, _journal_hold: hold.ok() }
    }

    /// Creates the group (reporting failure on `ready`) and runs the first
    /// worker, which reports readiness to the front end on `ready` itself.
    pub fn start(cfg_bytes: Vec<u8>, cfg: AgentConfig, mut ready: File) -> i32 {
        let group = match Group::new_pre_content() {
            Ok(g) => g,
            Err(e) => {
                let _ = writeln!(ready, "{}", serde_json::json!({ "error": e.to_string() }));
                return 1;
            }
        };
        let sup = Supervisor::new(cfg_bytes, cfg, group.into_owned(), None);
        let first = match sup.spawn_worker(false, Some(ready)) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the worker");
                return 1;
            }
        };
        sup.watch(first, false)
    }

    /// Takes over a running worker whose supervisor died.
    pub fn adopt(
        cfg_bytes: Vec<u8>,
        cfg: AgentConfig,
        group: OwnedFd,
        cache_fd: Option<OwnedFd>,
        worker_pid: i32,
        status: UnixStream,
    ) -> i32 {
        let sup = Supervisor::new(cfg_bytes, cfg, group, cache_fd);
        tracing::info!(worker_pid, "supervisor adopting a running worker");
        // The worker that started us is alive (it waits for us): the pidfd is its.
        let pidfd = sys::process::pidfd_open(worker_pid).ok();
        sup.watch(RunningWorker { pid: worker_pid, child: None, status, pidfd, resumed: false }, true)
    }

    fn watch(&self, mut worker: RunningWorker, adopted: bool) -> i32 {
        ignore_termination_signals();
        let mut backoff = Duration::ZERO;
        let mut ever_ready = adopted;
        let mut failed_restarts = 0u32;
        loop {
            let started = Instant::now();
            let report = self.read_reports(&mut worker);
            worker.reap();
            ever_ready |= report.ready;
            match report.exit.as_deref() {
                Some("exit_clean") => {
                    tracing::info!("worker finished; supervisor leaving");
                    return 0;
                }
                Some("exit_upgrade") => {
                    tracing::info!("worker handed over for an upgrade; starting the binary on disk");
                    backoff = Duration::ZERO;
                }
                _ if !ever_ready => {
                    tracing::error!(pid = worker.pid, "worker died during startup");
                    if report.entry_created {
                        self.remove_half_made_entry();
                    }
                    return 1;
                }
                _ if !report.ready && failed_restarts >= 3 && !self.mounts_remain() => {
                    // Successors keep failing and no mount needs this agent.
                    tracing::error!("workers keep failing to start and no mount is left; supervisor leaving");
                    return 1;
                }
                _ if report.killed => {
                    // Readers are waiting: no backoff.
                    tracing::error!(pid = worker.pid, "stopped worker killed; starting a successor");
                }
                _ => {
                    if report.ready {
                        failed_restarts = 0;
                    } else {
                        failed_restarts += 1;
                    }
                    tracing::error!(pid = worker.pid, "worker died; starting a successor");
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::ZERO;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                }
            }
            worker = loop {
                match self.spawn_worker(true, None) {
                    Ok(w) => break w,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
        }
    }

    fn spawn_worker(&self, resume: bool, ready: Option<File>) -> std::io::Result<RunningWorker> {
        let (ours, theirs) = status_channel()?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("worker");
        if resume {
            cmd.arg("--resume");
        }
        cmd.stdin(Stdio::piped()).stdout(match ready {
            Some(f) => Stdio::from(f),
            None => Stdio::null(),
        });
        let cache_fd = self.cache_fd.lock().as_ref().map(|f| f.try_clone()).transpose()?;
        let mut fds = vec![(self.group.as_fd(), GROUP_FD), (theirs.as_fd(), STATUS_FD)];
        if let Some(f) = cache_fd.as_ref() {
            fds.push((f.as_fd(), CACHE_FD));
        }
        let mut child = sys::process::spawn_with_fds(&mut cmd, &fds)?;
        drop(theirs);
        // Our unreaped child: the pid cannot be reused before we wait for it.
        let pidfd = sys::process::pidfd_open(child.id() as i32).ok();
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&self.cfg_bytes)?;
        }
        tracing::info!(pid = child.id(), resume, "worker started");
        Ok(RunningWorker { pid: child.id() as i32, child: Some(child), status: ours, pidfd, resumed: resume })
    }

    /// Whether any mount record still names this agent's cache entry. While
    /// one does, the group must stay open however often workers fail.
    fn mounts_remain(&self) -> bool {
        let state = StateDir::new(self.cfg.state_dir.clone());
        match erofs_fanotify_state::list_mount_records(&state) {
            Ok(records) => records.into_iter().flatten().any(|r| r.cache_key == self.cfg.cache_key),
            // Unknown: stay, the safe side.
            Err(_) => true,
        }
    }

    /// Reads status words (and the cache fd) until the worker's end closes,
    /// checking between words whether the worker has stopped (see `watchdog`).
    fn read_reports(&self, worker: &mut RunningWorker) -> WorkerReport {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut report = WorkerReport::default();
        let mut text = Vec::new();
        let mut buf = [0u8; 512];
        let startup = watchdog::startup_bound(self.cfg.fetch_timeout(), self.cfg.retry_timeout());
        let mut watch = self.journal.as_ref().map(|j| Watch::new(j.beats(), Instant::now(), worker.resumed));
        loop {
            let readable = {
                let mut fds = [PollFd::new(worker.status.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(500u16)) {
                    Ok(n) => n > 0,
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(_) => true,
                }
            };
            if !readable {
                if let (Some(journal), Some(watch)) = (self.journal.as_ref(), watch.as_mut()) {
                    if !report.killed {
                        report.killed = self.check_worker(journal, watch, worker, startup);
                    }
                }
                continue;
            }
            let (n, fds) = match sys::process::recv_with_fds(worker.status.as_fd(), &mut buf) {
                Ok(received) => received,
                Err(_) => break,
            };
            if let Some(fd) = fds.into_iter().last() {
                *self.cache_fd.lock() = Some(fd);
            }
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            while let Some(pos) = text.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = text.drain(..=pos).collect();
                match String::from_utf8_lossy(&line).trim() {
                    "entry_created" => report.entry_created = true,
                    "ready" => report.ready = true,
                    "cache_fd" => {}
                    word @ ("exit_clean" | "exit_upgrade") => report.exit = Some(word.to_string()),
                    other => tracing::debug!(word = other, "unknown worker status"),
                }
            }
        }
        report
    }

    /// One look at the worker's heartbeats; kills it when it has stopped
    /// while readers wait. True if it was killed.
    fn check_worker(&self, journal: &SharedJournalView, watch: &mut Watch, worker: &RunningWorker, startup: Duration) -> bool {
        let now = Instant::now();
        watch.observe(journal.beats(), now);
        let owes = || (journal.pending(), self.events_queued());
        let Some(stopped) = watch.verdict(now, startup, owes) else { return false };
        tracing::error!(
            pid = worker.pid,
            quiet_ms = stopped.quiet.as_millis() as u64,
            pending = stopped.pending,
            queued = stopped.queued,
            "worker stopped answering while readers wait; killing it"
        );
        let killed = match worker.pidfd.as_ref() {
            Some(pidfd) => pidfd.send_signal(libc::SIGKILL),
            None => Err(std::io::Error::other("no pidfd for the worker")),
        };
        match killed {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(pid = worker.pid, error = %e, "cannot kill the stopped worker");
                false
            }
        }
    }

    /// Whether the kernel holds events for the group that nobody has read.
    fn events_queued(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.group.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// A worker killed during its first startup may leave a cache entry it
    /// created; a failed mount leaves nothing behind.
    fn remove_half_made_entry(&self) {
        let state = StateDir::new(self.cfg.state_dir.clone());
        if let Ok(sock) = state.agent_socket_path(&self.cfg.cache_key) {
            let _ = std::fs::remove_file(sock);
        }
        let _ = erofs_fanotify_state::remove_agent_record(&state, &self.cfg.cache_key);
        if let Err(e) = CacheDir::new(self.cfg.cache_dir.clone()).remove_entry(&self.cfg.cache_key) {
            tracing::warn!(error = %e, "cannot remove the half-made cache entry");
        }
    }
}

struct RunningWorker {
    pid: i32,
    /// Our child (first supervisor); an adopted worker is not.
    child: Option<std::process::Child>,
    status: UnixStream,
    /// Opened while the pid surely named this worker: signals never hit another process.
    pidfd: Option<sys::process::PidFd>,
    /// Started in resume mode (a successor): judged during its start too.
    resumed: bool,
}

impl RunningWorker {
    /// Waits until the worker process is gone.
    fn reap(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
            return;
        }
        if let Ok(pidfd) = sys::process::pidfd_open(self.pid) {
            while !pidfd.wait_exit(Duration::from_secs(60)).unwrap_or(true) {}
        }
    }
}


/// SIGTERM/SIGINT/SIGHUP must not close the group while mounts live: the
/// worker decides when the agent leaves. Flags record them for the log.
pub fn ignore_termination_signals() {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&flag)) {
            tracing::warn!(signal = sig, error = %e, "cannot install a signal handler");
        }
    }
}

/// A connected pair: our end and the child's end of a status channel.
fn status_channel() -> std::io::Result<(UnixStream, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(std::io::Error::from)?;
    Ok((UnixStream::from(a), b))
}

/// The worker's line to its supervisor. Replaced when a new supervisor adopts it.
pub struct StatusPipe {
    stream: Mutex<Option<UnixStream>>,
}

impl StatusPipe {
    pub fn new(stream: Option<UnixStream>) -> StatusPipe {
        StatusPipe { stream: Mutex::new(stream) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut UnixStream) -> std::io::Result<T>) -> Option<T> {
        let mut guard = self.stream.lock();
        let stream = guard.as_mut()?;
        match f(stream) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "status channel write failed");
                None
            }
        }
    }

    pub fn say(&self, word: &str) {
        self.with(|s| writeln!(s, "{word}"));
    }

    /// Hands the supervisor the cache fd opened before the mark.
    pub fn send_fd(&self, fd: std::os::fd::BorrowedFd<'_>) {
        self.with(|s| {
            let line = b"cache_fd\n";
            let fds = [fd.as_raw_fd()];
            nix::sys::socket::sendmsg::<()>(
                s.as_raw_fd(),
                &[IoSlice::new(line)],
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)
        });
    }

    pub fn replace(&self, stream: UnixStream) {
        *self.stream.lock() = Some(stream);
    }
}

/// Runs in the worker: when its supervisor dies, start a new one in adopt
/// mode (group fd inherited) and watch that one instead.
pub fn watch_supervisor(
    group: Arc<Group>,
    cache: Arc<Mutex<Option<File>>>,
    status: Arc<StatusPipe>,
    cfg_bytes: Vec<u8>,
    first_supervisor: i32,
) {
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("erofs-fanotify"));
    let mut supervisor_pid = first_supervisor;
    let mut child: Option<std::process::Child> = None;
    loop {
        let gone = match sys::process::pidfd_open(supervisor_pid) {
            Ok(pidfd) => loop {
                match pidfd.wait_exit(Duration::from_secs(3600)) {
                    Ok(true) => break true,
                    Ok(false) => continue,
                    Err(_) => break true,
                }
            },
            Err(_) => true,
        };
        if !gone {
            continue;
        }
        if let Some(mut c) = child.take() {
            let _ = c.wait();
        }
        tracing::error!(pid = supervisor_pid, "supervisor died; starting a new one");
        let cache_fd = cache.lock().as_ref().and_then(|f| f.try_clone().ok());
        match spawn_adopting_supervisor(&binary, &group, cache_fd.as_ref(), &cfg_bytes) {
            Ok((c, status_write)) => {
                supervisor_pid = c.id() as i32;
                status.replace(status_write);
                status.say("ready");
                child = Some(c);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a supervisor; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn spawn_adopting_supervisor(
    binary: &Path,
    group: &Group,
    cache: Option<&File>,
    cfg_bytes: &[u8],
) -> std::io::Result<(std::process::Child, UnixStream)> {
    let (ours, theirs) = status_channel()?;
    let mut cmd = Command::new(binary);
    cmd.arg("agent").arg("--adopt").arg(std::process::id().to_string());
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut fds = vec![(group.as_fd(), GROUP_FD), (theirs.as_fd(), STATUS_FD)];
    if let Some(f) = cache {
        fds.push((f.as_fd(), CACHE_FD));
    }
    let mut child = sys::process::spawn_with_fds(&mut cmd, &fds)?;
    drop(theirs);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(cfg_bytes)?;
    }
    Ok((child, ours))
}
