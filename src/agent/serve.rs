//! Stage 3: serve. The event loop runs on its own thread; the control
//! socket, reconciliation, completion checks and persistence run here,
//! until the lifecycle says no mount can need the agent any more (then
//! [`leave`](super::handover)) or an upgrade asks for a hand-over.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use erofs_fanotify_state::AgentLock;

use super::control;
use super::event_loop::EventLoop;
use super::context::{Agent, WorkerContext};

/// How often the bitmap is persisted while data keeps arriving (a worker
/// that dies loses at most this much presence knowledge: data is refetched).
const PERSIST_EVERY: Duration = Duration::from_secs(5);

impl Agent {
    pub(super) async fn serve(mut self, mut ctx: WorkerContext) -> i32 {
        self.answer_orphans(&mut ctx);
        let stop = Arc::new(AtomicBool::new(false));
        let Some(batch) = ctx.batch.take() else {
            tracing::error!("the journal's batch area is gone; cannot read events");
            return super::context::EXIT_STARTUP_FAILED;
        };
        let event_loop = EventLoop {
            group: Arc::clone(&self.group),
            cache: Arc::clone(&self.cache),
            scheduler: Arc::clone(&self.scheduler),
            lifecycle: Arc::clone(&self.lifecycle),
            stats: Arc::clone(&self.stats),
            batch,
            slots: Arc::clone(&ctx.slots),
            heartbeat: Arc::clone(&ctx.heartbeat),
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
        {
            // The runtime's heartbeat: a runtime too busy or stuck to run a timer
            // cannot complete fetches either.
            let heartbeat = Arc::clone(&ctx.heartbeat);
            tokio::spawn(async move {
                let mut beat = tokio::time::interval(Duration::from_secs(1));
                loop {
                    beat.tick().await;
                    heartbeat.beat_runtime();
                }
            });
        }
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
        self.leave(&ctx, stop, ever_attached, exit_lock)
    }

    /// Data first (fdatasync), then the bitmap that says it is present.
    pub(super) fn persist(&mut self) {
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
