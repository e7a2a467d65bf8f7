//! The control socket: front ends prepare and attach mounts, `erofs-umount`
//! reports unmounts, `status` reads counters. One JSON object per line.

use std::path::PathBuf;
use std::sync::Arc;

use erofs_fanotify_state::{AgentIdentity, MountRecord};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cache::CacheFile;

use super::lifecycle::{Lease, Lifecycle};
use super::protocol::{MountStatus, Reply, Request, SegmentStatus};
use super::stats::Stats;

/// Longest request line accepted (a mountpoint path fits many times over).
const MAX_LINE: usize = 64 * 1024;

pub struct ControlContext {
    pub scheduler: Arc<super::event_loop::AgentScheduler>,
    pub trace: Arc<super::trace::Trace>,
    pub completion: Arc<super::complete::Completion>,
    pub lifecycle: Arc<Lifecycle>,
    pub stats: Arc<Stats>,
    pub cache: Arc<CacheFile>,
    pub cache_path: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_key: String,
    pub source: String,
    /// The remote, for which endpoint served data last (mirrors, redirects).
    pub remote: Arc<dyn crate::remote::RangeSource>,
    /// Where the address space's bytes come from.
    pub layout: crate::segments::Layout,
    /// Where sources named by later mounts are added (the same object as `remote`).
    pub added_sources: Arc<super::added_sources::AddedSources>,
    pub digest: Option<String>,
    /// See `MountStatus::offline`.
    pub offline: Option<String>,
    /// See `MountStatus::fail_open` (set by the takeover, after the context is made).
    pub fail_open: parking_lot::Mutex<Option<super::protocol::FailOpenWindow>>,
    /// True once mounts taken over from a dead agent had their page cache dropped (at once when none).
    pub takeover_done: tokio::sync::watch::Receiver<bool>,
    pub read_ahead_kb: u32,
    /// The agent-wide settings, shown to front ends that join (see `protocol::AgentSettings`).
    pub settings: super::protocol::AgentSettings,
    pub socket_path: PathBuf,
    pub identity: AgentIdentity,
    /// Notified when `erofs-fanotify upgrade` asks this worker to hand over.
    pub upgrade: tokio::sync::Notify,
}

pub async fn serve(listener: UnixListener, ctx: Arc<ControlContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, ctx).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Bound on how long a front end's prepare waits for a takeover to finish.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

async fn handle(stream: UnixStream, ctx: Arc<ControlContext>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    // Held from `prepare` until `attach` or disconnect.
    let mut lease: Option<Lease> = None;
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE as u64).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim_end()) {
            // Opening a source talks to the network: the one request answered asynchronously.
            Ok(Request::AddSource { source }) => match ctx.added_sources.add(source).await {
                Ok(super::added_sources::Added::Known) => Reply::SourceAdded { added: false, source: String::new() },
                Ok(super::added_sources::Added::Added(shown)) => Reply::SourceAdded { added: true, source: shown },
                Err(message) => Reply::Error { message },
            },
            Ok(Request::Prepare) => {
                // A mount made now must not race the takeover's drop of what the gap cached.
                let mut done = ctx.takeover_done.clone();
                let _ = tokio::time::timeout(TAKEOVER_WAIT, done.wait_for(|d| *d)).await;
                answer(Request::Prepare, &ctx, &mut lease)
            }
            Ok(req) => answer(req, &ctx, &mut lease),
            Err(e) => Reply::Error { message: format!("bad request: {e}") },
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"reply\":\"error\",\"message\":\"encode\"}".to_vec());
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}

fn answer(req: Request, ctx: &Arc<ControlContext>, lease: &mut Option<Lease>) -> Reply {
    match req {
        Request::AddSource { .. } => Reply::Error { message: "AddSource is answered by handle()".into() },
        Request::Ping => Reply::Pong { pid: ctx.identity.pid },
        Request::Prefetch { all, ranges, rate } => {
            let size = ctx.cache.blob_size();
            let wanted: Vec<std::ops::Range<u64>> = if all {
                std::iter::once(0..size).collect()
            } else {
                ranges.iter().map(|[a, b]| (*a).min(size)..(*b).min(size)).filter(|r| r.start < r.end).collect()
            };
            let missing: u64 = wanted.iter().flat_map(|r| ctx.cache.missing(r.clone())).map(|r| r.end - r.start).sum();
            let scheduler = Arc::clone(&ctx.scheduler);
            tokio::spawn(scheduler.prefetch(wanted, rate));
            Reply::Prefetching { bytes: missing }
        }
        Request::Trace { reset, record } => {
            let ranges = ctx.trace.ranges(reset).into_iter().map(|r| [r.start, r.end]).collect();
            if let Some(on) = record {
                ctx.trace.set_recording(on);
            }
            Reply::Trace { digest: ctx.digest.clone(), blob_size: ctx.cache.blob_size(), ranges, recording: ctx.trace.is_recording() }
        }
        Request::Upgrade => {
            ctx.upgrade.notify_one();
            Reply::Upgrading { pid: ctx.identity.pid }
        }
        Request::Prepare => {
            if lease.is_none() {
                *lease = Some(ctx.lifecycle.lease());
            }
            let (cache_dev, cache_ino) = {
                use std::os::unix::fs::MetadataExt;
                ctx.cache.as_file().metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
            };
            Reply::Prepared {
                cache_path: ctx.cache_path.display().to_string(),
                blob_size: ctx.cache.blob_size(),
                read_ahead_kb: ctx.read_ahead_kb,
                cache_dev,
                cache_ino,
                settings: Some(ctx.settings.clone()),
            }
        }
        Request::Attach(info) => {
            let record = MountRecord {
                mnt_id: info.mnt_id,
                mnt_id_unique: info.mnt_id_unique,
                mountpoint: info.mountpoint.into(),
                source: ctx.source.clone(),
                digest: ctx.digest.clone(),
                blob_size: ctx.cache.blob_size(),
                cache_key: ctx.cache_key.clone(),
                cache_dir: ctx.cache_dir.clone(),
                sysfs_name: info.sysfs_name,
                agent: ctx.identity,
                control_socket: ctx.socket_path.clone(),
                mount_ns: info.mount_ns,
                created_unix: now_unix(),
            };
            let result = ctx.lifecycle.attach(record);
            // The mount is now tracked by its record and superblock.
            *lease = None;
            match result {
                Ok(()) => Reply::Attached,
                Err(message) => Reply::Error { message },
            }
        }
        Request::Unmounted { mnt_id } => Reply::Unmounted { remaining_mounts: ctx.lifecycle.unmounted(mnt_id) },
        Request::Stats => Reply::Stats(Box::new(MountStatus {
            source: ctx.source.clone(),
            digest: ctx.digest.clone(),
            blob_size: ctx.cache.blob_size(),
            populated_bytes: ctx.cache.populated_bytes(),
            fetched_bytes: Stats::get(&ctx.stats.fetched_bytes),
            events: Stats::get(&ctx.stats.events),
            fast_path_events: Stats::get(&ctx.stats.fast_path_events),
            fetch_requests: Stats::get(&ctx.stats.fetch_requests),
            fetch_errors: Stats::get(&ctx.stats.fetch_errors),
            mount_requests: Stats::get(&ctx.stats.mount_requests),
            walk_round_trips: Stats::get(&ctx.stats.walk_round_trips),
            denied_events: Stats::get(&ctx.stats.denied_events),
            overflows: Stats::get(&ctx.stats.overflows),
            superblocks: ctx.lifecycle.superblocks(),
            agent_pid: ctx.identity.pid,
            served_by: ctx.remote.served_by(),
            state: ctx.completion.state().as_str().to_string(),
            verify_failures: ctx.completion.mismatches(),
            prefetch_active: ctx.scheduler.prefetch_tasks.load(std::sync::atomic::Ordering::SeqCst) > 0,
            prefetched_bytes: Stats::get(&ctx.scheduler.prefetched_bytes),
            fetch_latency: ctx.stats.fetch_latency.snapshot(),
            event_wait: ctx.stats.event_wait.snapshot(),
            segments: ctx
                .layout
                .segments()
                .iter()
                .map(|s| SegmentStatus {
                    label: s.label.clone(),
                    start: s.start,
                    size: s.len,
                    present_bytes: ctx.cache.populated_in(s.start..s.end()),
                    refused: ctx.completion.parts.refused.refusal([&(s.start..s.end())]),
                })
                .collect(),
            index: ctx.stats.index.lock().clone(),
            offline: ctx.offline.clone(),
            fail_open: ctx.fail_open.lock().clone(),
            ..MountStatus::default()
        })),
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
