//! Stage 2: go live. Mark the cache file (before any mount: a later mark is
//! not seen by an existing superblock), open the control socket, write the
//! agent record, and assemble what serving needs (scheduler, completion,
//! control context). After this, front ends can find and use the agent.

use std::sync::Arc;

use erofs_fanotify_state::{self as state, AgentIdentity, AgentRecord, StateDir};
use tokio::net::UnixListener;

use crate::fanotify::FAN_PRE_ACCESS;

use super::added_sources::AddedSources;
use super::complete::{Completion, CompletionParts};
use super::control::ControlContext;
use super::event_loop::AgentScheduler;
use super::lifecycle::Lifecycle;
use super::prepare::Prepared;
use super::scheduler::SchedulerConfig;
use super::trace::Trace;
use crate::remote::refused::{RefusedRanges, RefusingSource};
use super::context::{Agent, WorkerContext};
use super::{AgentConfig, AgentError};

/// On error a cache entry created by stage 1 is removed, and so are the
/// socket and record when they were made: nothing is left behind.
pub(super) async fn go_live(cfg: &AgentConfig, ctx: &WorkerContext, p: Prepared) -> Result<Agent, AgentError> {
    let state = StateDir::new(cfg.state_dir.clone());
    let remove_entry = |e: AgentError, p: &Prepared| {
        if p.created_entry {
            if let Err(rm) = p.entry.clone().remove() {
                tracing::warn!(error = %rm, "cannot remove the half-made cache entry");
            }
        }
        e
    };
    let blob_path = p.entry.blob_path();
    // The supervisor created the group; marking again after a restart is a no-op.
    let mask = FAN_PRE_ACCESS | (libc::FAN_OPEN | libc::FAN_CLOSE_NOWRITE | libc::FAN_CLOSE_WRITE);
    // On the open cache file, not a path: the inode we write is the inode marked.
    if let Err(e) = ctx.group.mark_file(std::os::fd::AsFd::as_fd(p.cache.as_file()), mask, &blob_path) {
        return Err(remove_entry(AgentError::Fanotify(e.to_string()), &p));
    }
    let (listener, socket_path, identity) = match publish(cfg, &state) {
        Ok(published) => published,
        Err(e) => return Err(remove_entry(e, &p)),
    };

    let lifecycle = Lifecycle::new(state.clone());
    // A successor adopts its predecessor's mounts; a new agent takes over the mounts of an agent
    // that died with its supervisor (the mark is back now; their page cache is dropped below).
    let takeover = if ctx.resume {
        lifecycle.adopt_records(&cfg.cache_key, identity);
        None
    } else {
        super::takeover::adopt_dead_mounts(&state, &cfg.cache_key, identity, &lifecycle, ctx.predecessor_alive_ms)
    };
    let (takeover_done, takeover_rx) = tokio::sync::watch::channel(takeover.is_none());
    // Sources later mounts of the blob name serve it too.
    let http = crate::http::ClientConfig { request_timeout: cfg.fetch_timeout(), ..Default::default() };
    let sources = Arc::new(AddedSources::new(Arc::clone(&p.source), cfg.source.clone(), http));
    let mut remote: Arc<dyn crate::remote::RangeSource> = Arc::clone(&sources) as Arc<dyn crate::remote::RangeSource>;
    // Checked once, around the primary and the sources later mounts add.
    if let Some(verified) = super::prepare::verified_source(&remote, cfg)? {
        remote = verified;
    }
    // Outermost: a region refused at completion is refused whichever source would serve it.
    let refused = Arc::new(RefusedRanges::default());
    remote = Arc::new(RefusingSource::new(remote, Arc::clone(&refused)));
    let scheduler = AgentScheduler::new(
        Arc::clone(&p.cache),
        Arc::clone(&remote),
        Arc::clone(&p.stats),
        SchedulerConfig {
            fetch_unit: cfg.fetch_unit,
            max_window: (8 * cfg.fetch_unit).max(8 << 20),
            // Bodies are buffered whole: this bounds memory per request.
            max_request: (4 * cfg.fetch_unit).max(4 << 20),
            parallel: cfg.fetch_parallel,
            retry: p.retry.clone(),
            // Off by default for now: page-rounded extents of small neighbouring files merge, so a
            // miss fetches the neighbours too (an S3 test reading a second file after its key was
            // refused found it present). `scheduler::WHOLE_FILE_MAX` is the bound when it is turned on.
            whole_file_max: 0,
        },
        tokio::runtime::Handle::current(),
    );
    scheduler.set_file_extents(p.file_extents.clone());
    let completion = Completion::new(CompletionParts {
        cache: Arc::clone(&p.cache),
        group: Arc::clone(&ctx.group),
        blob_path: blob_path.clone(),
        digest: p.digest.clone(),
        fetcher: Arc::clone(&p.fetcher),
        scheduler: Arc::clone(&scheduler),
        required: p.required.clone(),
        layout: p.layout.clone(),
        refused,
        lifecycle: Arc::clone(&lifecycle),
    });
    let trace = Arc::new(Trace::default());
    trace.set_recording(cfg.record_trace);
    let control = Arc::new(ControlContext {
        scheduler: Arc::clone(&scheduler),
        trace,
        completion: Arc::clone(&completion),
        lifecycle: Arc::clone(&lifecycle),
        stats: Arc::clone(&p.stats),
        cache: Arc::clone(&p.cache),
        cache_path: blob_path,
        cache_dir: cfg.cache_dir.clone(),
        cache_key: cfg.cache_key.clone(),
        source: p.shown.clone(),
        remote,
        added_sources: sources,
        layout: p.layout.clone(),
        digest: p.digest.clone(),
        offline: p.offline.clone(),
        fail_open: parking_lot::Mutex::new(takeover.as_ref().map(|t| t.window.clone())),
        takeover_done: takeover_rx,
        read_ahead_kb: cfg.read_ahead_kb,
        settings: super::protocol::AgentSettings {
            cache_dir: cfg.cache_dir.clone(),
            fetch_unit: cfg.fetch_unit,
            fetch_timeout_ms: cfg.fetch_timeout_ms,
            retry_timeout_ms: cfg.retry_timeout_ms,
            fetch_parallel: cfg.fetch_parallel,
            read_ahead_kb: cfg.read_ahead_kb,
        },
        socket_path,
        identity,
        upgrade: tokio::sync::Notify::new(),
    });
    if let Some(takeover) = takeover {
        // Reads the mounts' directories: events this worker's loop answers once it serves.
        let control = Arc::clone(&control);
        let spawned = std::thread::Builder::new().name("takeover".into()).spawn(move || {
            let files = super::takeover::drop_page_caches(&takeover.mounts);
            if let Some(window) = control.fail_open.lock().as_mut() {
                window.files_dropped = files;
            }
            let _ = takeover_done.send(true);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start dropping the page cache of the taken-over mounts");
        }
    }
    Ok(Agent {
        cfg: cfg.clone(),
        state,
        entry: p.entry,
        created_entry: p.created_entry,
        cache: p.cache,
        group: Arc::clone(&ctx.group),
        lifecycle,
        stats: p.stats,
        scheduler,
        fetcher: p.fetcher,
        completion,
        control,
        listener: Some(listener),
    })
}

/// The control socket and the agent record: how front ends find us.
fn publish(cfg: &AgentConfig, state: &StateDir) -> Result<(UnixListener, std::path::PathBuf, AgentIdentity), AgentError> {
    let socket_path = state.agent_socket_path(&cfg.cache_key).map_err(|e| AgentError::Io(format!("bad cache key: {e}")))?;
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .map_err(|e| AgentError::Io(format!("cannot listen on {}: {e}", socket_path.display())))?;
    let identity = AgentIdentity::current().map_err(|e| AgentError::Io(format!("cannot read own identity: {e}")));
    let record = identity.and_then(|identity| {
        let record = AgentRecord {
            identity,
            socket: socket_path.clone(),
            cache_key: cfg.cache_key.clone(),
            config: Some(super::takeover::restartable_config(cfg)),
        };
        state::write_agent_record(state, &record)
            .map(|()| identity)
            .map_err(|e| AgentError::Io(format!("cannot write the agent record: {e}")))
    });
    match record {
        Ok(identity) => Ok((listener, socket_path, identity)),
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            Err(e)
        }
    }
}
