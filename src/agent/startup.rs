//! Agent startup and shutdown: remote → cache entry → metadata → mark →
//! control socket → ready; then serve until the lifecycle says we may leave.

use std::io::Write;
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
use super::event_loop::EventLoop;
use super::lifecycle::Lifecycle;
use super::metadata::{CacheMetaReader, Fetcher};
use super::scheduler::{Scheduler, SchedulerConfig};
use super::stats::Stats;
use super::{AgentConfig, AgentError};

/// How often the bitmap is persisted while data keeps arriving.
const PERSIST_EVERY: Duration = Duration::from_secs(30);

/// Runs the agent to completion. `ready` receives one JSON line: `{"ready":true}`
/// or `{"error":"..."}`; the front end waits for it.
pub fn run(cfg: AgentConfig, ready: Box<dyn Write + Send>) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            report(ready, Err(format!("cannot start the async runtime: {e}")));
            return 1;
        }
    };
    rt.block_on(async move {
        match start(&cfg).await {
            Ok(agent) => {
                report(ready, Ok(()));
                agent.serve().await;
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "agent startup failed");
                report(ready, Err(e.to_string()));
                1
            }
        }
    })
}

fn report(mut ready: Box<dyn Write + Send>, result: Result<(), String>) {
    let line = match result {
        Ok(()) => serde_json::json!({ "ready": true }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let _ = writeln!(ready, "{line}");
    let _ = ready.flush();
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
    control: Arc<ControlContext>,
    listener: Option<UnixListener>,
}

/// Everything up to "ready". On error nothing is left behind: a cache entry
/// created here is removed, and the socket and agent record are not written yet.
async fn start(cfg: &AgentConfig) -> Result<Agent, AgentError> {
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
    match prepare(cfg, &state, entry, created_entry, source, probe, shown, digest).await {
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
    let cache = Arc::new(tryc!(crate::cache::open_entry(&entry)
        .map_err(|e| AgentError::Cache(format!("cannot open the cache file {}: {e}", blob_path.display())))));
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
        parallel: cfg.fetch_parallel,
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

    let group = Arc::new(tryc!(Group::new_pre_content().map_err(|e| AgentError::Fanotify(e.to_string()))));
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
    let scheduler = Scheduler::new(
        Arc::clone(&cache),
        Arc::clone(&source),
        Arc::clone(&stats),
        SchedulerConfig { fetch_unit: cfg.fetch_unit, max_request: 8 << 20, parallel: cfg.fetch_parallel, retry },
        tokio::runtime::Handle::current(),
    );
    let control = Arc::new(ControlContext {
        lifecycle: Arc::clone(&lifecycle),
        stats: Arc::clone(&stats),
        cache: Arc::clone(&cache),
        cache_path: blob_path,
        cache_dir: cfg.cache_dir.clone(),
        cache_key: cfg.cache_key.clone(),
        source: shown,
        digest,
        read_ahead_kb: cfg.read_ahead_kb,
        socket_path,
        identity,
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
        control,
        listener: Some(listener),
    })
}


impl Agent {
    async fn serve(mut self) {
        let event_loop = EventLoop {
            group: Arc::clone(&self.group),
            cache: Arc::clone(&self.cache),
            scheduler: Arc::clone(&self.scheduler),
            lifecycle: Arc::clone(&self.lifecycle),
            stats: Arc::clone(&self.stats),
        };
        let spawned = std::thread::Builder::new().name("fanotify-events".into()).spawn(move || {
            // The loop only ends on a read error of the group fd; the group
            // stays open (closing it would hand zeros to readers).
            if let Err(e) = event_loop.run() {
                tracing::error!(error = %e, "fanotify event loop failed");
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the event loop thread");
        }
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
        let mut ever_attached = false;
        let exit_lock = loop {
            tokio::select! {
                _ = self.lifecycle.changed.notified() => {}
                _ = tick.tick() => self.lifecycle.reconcile(),
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
        drop(exit_lock);
        // The group closes last, when `self` drops.
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
