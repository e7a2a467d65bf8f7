//! A worker's life, in order: [`prepare`](super::prepare) the cache entry
//! and the metadata, [`go_live`](super::live) (mark, control socket, agent
//! record), [`serve`](super::serve) until no mount needs us, then
//! [leave or hand over](super::handover). This file runs them: the async
//! runtime and the ready report to the front end; what the stages share is
//! in [`context`](super::context).
//!
//! A worker started in *resume* mode replaces one that died or was upgraded:
//! it skips the metadata walk (the map is stored with the cache entry),
//! re-adopts the mount records, and answers the orphaned events of the
//! journal once their ranges are present.

use std::io::Write;

pub use super::context::{journal_path, WorkerContext, EXIT_CLEAN, EXIT_STARTUP_FAILED, EXIT_UPGRADE};
use super::AgentConfig;


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
        let started = match super::prepare::prepare(&cfg, &ctx).await {
            Ok(prepared) => super::live::go_live(&cfg, &ctx, prepared).await,
            Err(e) => Err(e),
        };
        match started {
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

