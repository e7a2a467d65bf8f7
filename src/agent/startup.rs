//! The worker: startup (remote → cache entry → metadata → mark → control
//! socket → ready), then serve until the lifecycle says the agent may leave.
//!
//! A worker started in *resume* mode replaces one that died or was upgraded:
//! it skips the metadata walk (the map is stored with the cache entry),
//! re-adopts the mount records, and answers the orphaned events of the
//! journal once their ranges are present.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use erofs_fanotify_state::{self as state, AgentIdentity, AgentLock, AgentRecord, CacheDir, CacheEntry, StateDir};
use tokio::net::UnixListener;

use crate::cache::CacheFile;
use crate::erofs::{self, WalkLimits};
use crate::fanotify::{Group, FAN_PRE_ACCESS};
use crate::remote::http::HttpConfig;
use crate::remote::{RangeSource, RetryPolicy};

use super::control::{self, ControlContext};
use super::event_loop::{lock_journal, EventLoop, SharedJournal};
use super::journal::Orphan;
use super::supervisor::StatusPipe;
use super::lifecycle::Lifecycle;
use super::metadata::{CacheMetaReader, Fetcher};
use super::scheduler::{Scheduler, SchedulerConfig};
use super::stats::Stats;
use super::{AgentConfig, AgentError};

/// How often the bitmap is persisted while data keeps arriving (a worker
/// that dies loses at most this much presence knowledge: data is refetched).
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// Worker exit codes (the supervisor reads the status words; these are for logs).
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_STARTUP_FAILED: i32 = 2;
pub const EXIT_UPGRADE: i32 = 3;

/// What a worker gets from its supervisor and from recovery.
pub struct WorkerContext {
    pub group: Arc<Group>,
    pub status: Arc<StatusPipe>,
    /// The front end's ready pipe (first worker only).
    pub ready: Option<Box<dyn Write + Send>>,
    pub resume: bool,
    pub journal: SharedJournal,
    pub orphans: Vec<Orphan>,
    /// Orphan fd numbers occupied by placeholders until answered.
    pub reserved: Vec<i32>,
    /// The cache file opened before the mark: inherited by a resumed worker,
    /// set by the first one; passed on to successors and new supervisors.
    pub cache_fd: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

/// Runs a worker to completion and returns its exit code.
pub fn run_worker(cfg: AgentConfig, mut ctx: WorkerContext) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(ready) = ctx.ready.take() {
                report(ready, Err(format!("cannot start the async runtime: {e}")));
            }
            return EXIT_STARTUP_FAILED;
        }
    };
    rt.block_on(async move {
        match start(&cfg, &ctx).await {
            Ok(agent) => {
                ctx.status.say("ready");
                if let Some(ready) = ctx.ready.take() {
                    if !report(ready, Ok(())) {
                        // The front end that started us is gone: nobody will
                        // prepare a mount, so do not wait out the grace period.
                        tracing::warn!("the front end left before the agent was ready");
                        agent.lifecycle.end_startup_grace();
                    }
                }
                agent.serve(ctx).await
            }
            Err(e) => {
                tracing::error!(error = %e, "worker startup failed");
                if let Some(ready) = ctx.ready.take() {
                    report(ready, Err(e.to_string()));
                }
                // Not "exit_clean": a supervisor whose first worker never
                // became ready leaves; a resumed one tries again.
                EXIT_STARTUP_FAILED
            }
        }
    })
}

/// Writes the ready line; false when nobody reads it any more.
fn report(mut ready: Box<dyn Write + Send>, result: Result<(), String>) -> bool {
    let line = match result {
        Ok(()) => serde_json::json!({ "ready": true }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    writeln!(ready, "{line}").and_then(|_| ready.flush()).is_ok()
}

struct Agent {
    cfg: AgentConfig,
    state: StateDir,
    entry: CacheEntry,
    created_entry: bool,
    cache: Arc<CacheFile>,
    group: Arc<Group>,
    lifecycle: Arc<Lifecycle>,
    stats: Arc<Stats>,
    scheduler: Arc<Scheduler>,
    fetcher: Arc<Fetcher>,
    completion: Arc<super::complete::Completion>,
    control: Arc<ControlContext>,
    listener: Option<UnixListener>,
}

/// Everything up to "ready". On error nothing is left behind: a cache entry
/// created here is removed, and the socket and agent record are not written yet.
async fn start(cfg: &AgentConfig, ctx: &WorkerContext) -> Result<Agent, AgentError> {
    let state = StateDir::new(cfg.state_dir.clone());
    let http_cfg = HttpConfig { request_timeout: cfg.fetch_timeout(), ..HttpConfig::default() };
    let opened = crate::remote::open_source(&cfg.source, &http_cfg)
        .await
        .map_err(|e| AgentError::Source(e.to_string()))?;
    let (source, probe) = (opened.source, opened.probe);
    let shown = cfg.source.describe();
    erofs::probe_superblock(&probe).map_err(|e| AgentError::NotErofs(format!("{shown} is not an EROFS image ({e})")))?;
    let size = source.size();
    let digest = cfg.source.digest();

    state::check_cache_filesystem(&cfg.cache_dir).map_err(|e| AgentError::Cache(e.to_string()))?;
    let cache_dir = CacheDir::new(cfg.cache_dir.clone());
    let (entry, created_entry) = CacheEntry::open_or_create(&cache_dir, &cfg.cache_key, size, &shown, digest.as_deref())
        .map_err(|e| AgentError::Cache(format!("cannot create the cache entry in {}: {e}", cfg.cache_dir.display())))?;
    if created_entry {
        ctx.status.say("entry_created");
    }
    match prepare(cfg, ctx, &state, entry, created_entry, source, probe, shown, digest).await {
        Ok(agent) => Ok(agent),
        Err((e, entry)) => {
            if created_entry {
                if let Err(rm) = entry.remove() {
                    tracing::warn!(error = %rm, "cannot remove the half-made cache entry");
                }
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn prepare(
    cfg: &AgentConfig,
    ctx: &WorkerContext,
    state: &StateDir,
    mut entry: CacheEntry,
    created_entry: bool,
    source: Arc<dyn RangeSource>,
    probe: bytes::Bytes,
    shown: String,
    digest: Option<String>,
) -> Result<Agent, (AgentError, CacheEntry)> {
    macro_rules! tryc {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Err((e, entry)),
            }
        };
    }
    let size = source.size();
    let blob_path = entry.blob_path();
    // Opened before the mark: writes through this fd raise no events. A
    // trusted persisted bitmap is restored; a damaged one is discarded.
    let inherited = match ctx.cache_fd.lock() {
        Ok(g) => g.as_ref().and_then(|f| f.try_clone().ok()),
        Err(_) => None,
    };
    if ctx.resume && inherited.is_none() {
        // An fd opened now would raise events to ourselves (the mark exists).
        return Err((AgentError::Cache("a resumed worker needs the cache fd opened before the mark".into()), entry));
    }
    let cache = Arc::new(tryc!(crate::cache::open_entry_with(&entry, inherited)
        .map_err(|e| AgentError::Cache(format!("cannot open the cache file {}: {e}", blob_path.display())))));
    if !ctx.resume {
        match cache.as_file().try_clone() {
            Ok(f) => {
                ctx.status.send_fd(std::os::fd::AsFd::as_fd(&f));
                if let Ok(mut g) = ctx.cache_fd.lock() {
                    *g = Some(f);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot keep a cache fd for successors"),
        }
    }
    let _ = created_entry;
    tryc!(cache
        .write_range(0, &probe)
        .map_err(|e| AgentError::Cache(format!("cannot write the cache file: {e}"))));

    let stats = Arc::new(Stats::default());
    let retry = RetryPolicy { deadline: cfg.retry_timeout(), ..RetryPolicy::default() };
    let fetcher = Arc::new(Fetcher {
        cache: Arc::clone(&cache),
        source: Arc::clone(&source),
        stats: Arc::clone(&stats),
        retry: retry.clone(),
        // The metadata walk is latency bound: more requests in flight.
        parallel: (2 * cfg.fetch_parallel).min(32),
    });
    let required = match entry.required_ranges() {
        Some(required) => required,
        None => {
            let reader = CacheMetaReader { fetcher: Arc::clone(&fetcher), handle: tokio::runtime::Handle::current() };
            let walked = tokio::task::spawn_blocking(move || {
                let mut reader = reader;
                erofs::walk(&mut reader, size, &WalkLimits::default())
            })
            .await;
            let map = match walked {
                Ok(Ok(map)) => map,
                Ok(Err(e)) => return Err((AgentError::Image(format!("{shown}: cannot read the EROFS metadata: {e}")), entry)),
                Err(e) => return Err((AgentError::Image(format!("metadata walk failed: {e}")), entry)),
            };
            tracing::info!(
                inodes = map.inodes,
                required_bytes = crate::ranges::total_len(&map.required),
                required_ranges = map.required.len(),
                "metadata walk done"
            );
            if let Err(e) = entry.set_required(&map.required) {
                tracing::warn!(error = %e, "cannot store the metadata map with the cache entry");
            }
            map.required
        }
    };
    tryc!(fetcher
        .ensure_present(&required)
        .await
        .map_err(|e| AgentError::Source(format!("cannot fetch the image metadata: {e}"))));

    // The supervisor created the group; marking again after a restart is a no-op.
    let group = Arc::clone(&ctx.group);
    let mask = FAN_PRE_ACCESS | (libc::FAN_OPEN | libc::FAN_CLOSE_NOWRITE | libc::FAN_CLOSE_WRITE);
    tryc!(group.mark_inode(&blob_path, mask).map_err(|e| AgentError::Fanotify(e.to_string())));

    let socket_path = tryc!(state
        .agent_socket_path(&cfg.cache_key)
        .map_err(|e| AgentError::Io(format!("bad cache key: {e}"))));
    let _ = std::fs::remove_file(&socket_path);
    let listener = tryc!(UnixListener::bind(&socket_path)
        .map_err(|e| AgentError::Io(format!("cannot listen on {}: {e}", socket_path.display()))));
    let identity = tryc!(AgentIdentity::current().map_err(|e| AgentError::Io(format!("cannot read own identity: {e}"))));
    let record = AgentRecord {
        identity,
        socket: socket_path.clone(),
        cache_key: cfg.cache_key.clone(),
    };
    if let Err(e) = state::write_agent_record(state, &record) {
        let _ = std::fs::remove_file(&socket_path);
        return Err((AgentError::Io(format!("cannot write the agent record: {e}")), entry));
    }

    let lifecycle = Lifecycle::new(state.clone());
    if ctx.resume {
        lifecycle.adopt_records(&cfg.cache_key, identity);
    }
    let scheduler = Scheduler::new(
        Arc::clone(&cache),
        Arc::clone(&source),
        Arc::clone(&stats),
        SchedulerConfig {
            fetch_unit: cfg.fetch_unit,
            max_window: (8 * cfg.fetch_unit).max(8 << 20),
            // Bodies are buffered whole: this bounds memory per request.
            max_request: (4 * cfg.fetch_unit).max(4 << 20),
            parallel: cfg.fetch_parallel,
            retry,
        },
        tokio::runtime::Handle::current(),
    );
    let completion = super::complete::Completion::new(
        Arc::clone(&cache),
        Arc::clone(&group),
        blob_path.clone(),
        digest.clone(),
        Arc::clone(&fetcher),
        Arc::clone(&scheduler),
        required.clone(),
    );
    let trace = Arc::new(super::trace::Trace::default());
    let control = Arc::new(ControlContext {
        scheduler: Arc::clone(&scheduler),
        trace: Arc::clone(&trace),
        completion: Arc::clone(&completion),
        lifecycle: Arc::clone(&lifecycle),
        stats: Arc::clone(&stats),
        cache: Arc::clone(&cache),
        cache_path: blob_path,
        cache_dir: cfg.cache_dir.clone(),
        cache_key: cfg.cache_key.clone(),
        source: shown,
        remote: Arc::clone(&source),
        digest,
        read_ahead_kb: cfg.read_ahead_kb,
        socket_path,
        identity,
        upgrade: tokio::sync::Notify::new(),
    });
    Ok(Agent {
        cfg: cfg.clone(),
        state: state.clone(),
        entry,
        created_entry,
        cache,
        group,
        lifecycle,
        stats,
        scheduler,
        fetcher,
        completion,
        control,
        listener: Some(listener),
    })
}


impl Agent {
    async fn serve(mut self, ctx: WorkerContext) -> i32 {
        self.answer_orphans(&ctx);
        let stop = Arc::new(AtomicBool::new(false));
        let event_loop = EventLoop {
            group: Arc::clone(&self.group),
            cache: Arc::clone(&self.cache),
            scheduler: Arc::clone(&self.scheduler),
            lifecycle: Arc::clone(&self.lifecycle),
            stats: Arc::clone(&self.stats),
            journal: Arc::clone(&ctx.journal),
            stop: Arc::clone(&stop),
            trace: Arc::clone(&self.control.trace),
        };
        let event_thread = std::thread::Builder::new().name("fanotify-events".into()).spawn(move || {
            // The loop ends on `stop` or a read error of the group fd; the
            // group stays open either way (the supervisor holds it too).
            if let Err(e) = event_loop.run() {
                tracing::error!(error = %e, "fanotify event loop failed");
            }
        });
        let event_thread = match event_thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the event loop thread");
                None
            }
        };
        if let Some(listener) = self.listener.take() {
            tokio::spawn(control::serve(listener, Arc::clone(&self.control)));
        }
        let mut signals = match Signals::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot install signal handlers");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_persist = tokio::time::Instant::now();
        let mut persisted_bytes = self.cache.populated_bytes();
        let mut ever_attached = ctx.resume;
        let exit_lock = loop {
            tokio::select! {
                _ = self.lifecycle.changed.notified() => {}
                _ = tick.tick() => {
                    self.lifecycle.reconcile();
                    self.completion.poll();
                }
                _ = self.control.upgrade.notified() => {
                    return self.hand_over(&ctx, stop, event_thread).await;
                }
                sig = recv_signal(&mut signals) => {
                    tracing::info!(signal = sig, mounts = self.lifecycle.mounts().len(),
                        "signal received; the agent leaves once no mount uses the cache file");
                }
            }
            ever_attached |= !self.lifecycle.mounts().is_empty();
            if self.lifecycle.may_exit() && self.scheduler.waiting() == 0 {
                // Front ends hold the agent lock from finding us until attach:
                // with it held, no new lease can appear behind our back.
                match AgentLock::try_lock(&self.state, &self.cfg.cache_key) {
                    Ok(Some(lock)) if self.lifecycle.may_exit() => break lock,
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot take the agent lock"),
                }
            }
            let populated = self.cache.populated_bytes();
            if populated != persisted_bytes && last_persist.elapsed() >= PERSIST_EVERY {
                self.persist();
                persisted_bytes = populated;
                last_persist = tokio::time::Instant::now();
            }
        };
        tracing::info!("no mount uses the cache file any more; leaving");
        stop.store(true, Ordering::SeqCst);
        // Unreachable first, so the next front end starts a fresh agent.
        let _ = std::fs::remove_file(&self.control.socket_path);
        let _ = state::remove_agent_record(&self.state, &self.cfg.cache_key);
        if !ever_attached && self.created_entry {
            // A mount that never happened must not leave a cache entry behind.
            if let Err(e) = self.entry.clone().remove() {
                tracing::warn!(error = %e, "cannot remove the unused cache entry");
            }
        } else {
            self.persist();
        }
        if let Ok(path) = journal_path(&self.state, &self.cfg.cache_key) {
            let _ = std::fs::remove_file(path);
        }
        ctx.status.say("exit_clean");
        drop(exit_lock);
        EXIT_CLEAN
    }

    /// Live upgrade: stop reading events, answer everything in flight,
    /// persist, and let the supervisor start the binary now on disk. Events
    /// raised meanwhile wait in the kernel for the successor.
    async fn hand_over(mut self, ctx: &WorkerContext, stop: Arc<AtomicBool>, event_thread: Option<std::thread::JoinHandle<()>>) -> i32 {
        tracing::info!("handing over to a new worker");
        stop.store(true, Ordering::SeqCst);
        if let Some(t) = event_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while (self.scheduler.waiting() > 0 || lock_journal(&ctx.journal).pending() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.persist();
        ctx.status.say("exit_upgrade");
        EXIT_UPGRADE
    }

    /// Events a dead predecessor read and never answered: answer each once
    /// its range is present (EIO if it cannot be fetched), then free its
    /// fd number.
    fn answer_orphans(&self, ctx: &WorkerContext) {
        if ctx.orphans.is_empty() {
            return;
        }
        tracing::warn!(count = ctx.orphans.len(), "answering events left by a previous worker");
        for orphan in ctx.orphans.clone() {
            let fetcher = Arc::clone(&self.fetcher);
            let group = Arc::clone(&self.group);
            let journal = Arc::clone(&ctx.journal);
            let reserved = ctx.reserved.contains(&orphan.fd);
            let size = self.cache.blob_size();
            tokio::spawn(async move {
                let range = match orphan.range {
                    Some(r) => r.offset.min(size)..r.offset.saturating_add(r.count).min(size),
                    None => 0..size,
                };
                let response = match fetcher.ensure_present(std::slice::from_ref(&range)).await {
                    Ok(()) => crate::fanotify::Response::Allow,
                    Err(e) => {
                        tracing::error!(fd = orphan.fd, error = %e, "cannot fetch an orphaned event's range; EIO");
                        crate::fanotify::Response::Deny(libc::EIO)
                    }
                };
                match group.respond(orphan.fd, response) {
                    Ok(()) => tracing::info!(fd = orphan.fd, ?range, "orphaned event answered"),
                    // Answered by the predecessor just before it died.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => tracing::error!(fd = orphan.fd, error = %e, "answering an orphaned event failed"),
                }
                lock_journal(&journal).answered(orphan.slot);
                if reserved {
                    crate::sys::process::release_fd_number(orphan.fd);
                }
            });
        }
    }

    /// Data first (fdatasync), then the bitmap that says it is present.
    fn persist(&mut self) {
        match crate::cache::persist(&self.entry, &self.cache) {
            Ok(()) => tracing::debug!(bytes = self.cache.populated_bytes(), "bitmap persisted"),
            Err(e) => tracing::warn!(error = %e, "cannot persist the bitmap"),
        }
        let _ = self.entry.touch();
    }
}

pub fn journal_path(state: &StateDir, key: &str) -> Result<std::path::PathBuf, String> {
    state.agent_journal_path(key).map_err(|e| e.to_string())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

async fn recv_signal(signals: &mut Option<Signals>) -> &'static str {
    match signals {
        Some(s) => tokio::select! {
            _ = s.term.recv() => "SIGTERM",
            _ = s.int.recv() => "SIGINT",
            _ = s.hup.recv() => "SIGHUP",
        },
        None => std::future::pending().await,
    }
}
