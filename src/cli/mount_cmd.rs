//! `erofs-mount -t erofs.fanotify [-o OPTS] SOURCE MOUNTPOINT`
//!
//! Finds or starts the agent of the blob (one per cache entry), asks it to
//! hold off leaving (prepare), mounts the cache file, and hands the agent the
//! mount's id (attach), which writes the per-mount record. A failure at any
//! step leaves nothing behind: the agent leaves when its lease drops with no
//! mount attached, and removes a cache entry it created for nothing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use erofs_fanotify_state::{self as state, AgentLock, StateDir};

use crate::agent::protocol::{AttachInfo, Reply, Request};
use crate::agent::AgentConfig;
use crate::mount::MountOptions;
use crate::agent::sources::SourceSpec;
use crate::sys;

use super::client::AgentConn;
use super::CliError;

#[derive(Parser, Debug)]
#[command(name = "erofs-mount", version, about = "Mount an EROFS image lazily from a registry or URL")]
pub struct MountArgs {
    /// Filesystem type: erofs.fanotify
    #[arg(short = 't', long = "types", default_value = "erofs.fanotify")]
    pub fstype: String,
    /// Mount options (comma separated; may repeat)
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Keep the agent in the foreground, logging to stderr, until the mount is gone
    #[arg(long)]
    pub foreground: bool,
    /// Image source: an image reference, an http(s) URL of a Range-capable blob, s3://BUCKET/KEY, BUCKET/KEY with -o s3.endpoint=URL, or a local image file (/abs/path)
    pub source: String,
    /// Directory to mount on
    pub mountpoint: PathBuf,
}

/// How long to wait for a new agent to fetch metadata and become ready.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(600);

pub fn run(args: MountArgs) -> Result<(), CliError> {
    if args.fstype != "erofs.fanotify" && args.fstype != "fanotify" {
        return Err(CliError::new(format!("unsupported filesystem type {:?} (expected erofs.fanotify)", args.fstype)));
    }
    super::require_root("erofs-mount")?;
    let opts = MountOptions::parse(&args.options.join(",")).map_err(|e| CliError::new(e.to_string()))?;
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    let mut placement = HostPath { mountpoint };
    mount_image("erofs-mount", &args.source, &opts, &mut placement, args.foreground).map(|_| ())
}

/// Where a mount is attached: a path in our own namespace ([`HostPath`]), or a container's
/// namespace (the OCI hook).
pub trait Placement {
    /// Mounts the cache file (read-only, `read_ahead_kb` set before anything can read) and says
    /// what the agent records.
    fn place(&mut self, cache_path: &Path, read_ahead_kb: u32) -> Result<Placed, CliError>;
    /// Takes the mount made by `place` down again (the agent refused it).
    fn undo(&mut self);
    /// A path through which the mount's files can be opened from this process (prefetch_files).
    fn files_root(&self) -> PathBuf;
}

/// A mount as `Placement::place` made it.
#[derive(Debug, Clone)]
pub struct Placed {
    pub id: sys::statx::MountId,
    /// What records and `status` show as the mountpoint.
    pub mountpoint: String,
    pub sysfs_name: String,
    /// `NS_GET_MNTNS_ID` of the namespace holding the mount.
    pub mount_ns: u64,
}

/// A mount on a directory of our own mount namespace.
pub struct HostPath {
    pub mountpoint: PathBuf,
}

impl Placement for HostPath {
    fn place(&mut self, cache_path: &Path, read_ahead_kb: u32) -> Result<Placed, CliError> {
        let mounted = sys::mount::mount_erofs_file(cache_path, &self.mountpoint, Some(read_ahead_kb))
            .map_err(|e| CliError::new(format!("cannot mount on {}: {e}", self.mountpoint.display())))?;
        let id = sys::statx::mount_id(&self.mountpoint).map_err(|e| {
            let _ = sys::mount::umount(&self.mountpoint, true);
            CliError::new(format!("cannot read the mount id of {}: {e}", self.mountpoint.display()))
        })?;
        Ok(Placed {
            id,
            mountpoint: self.mountpoint.display().to_string(),
            sysfs_name: mounted.sysfs_name,
            mount_ns: sys::process::mount_namespace_id().unwrap_or(0),
        })
    }

    fn undo(&mut self) {
        let _ = sys::mount::umount(&self.mountpoint, true);
    }

    fn files_root(&self) -> PathBuf {
        self.mountpoint.clone()
    }
}

/// What [`mount_image`] made.
#[derive(Debug, Clone)]
pub struct MountedImage {
    pub placed: Placed,
    pub cache_key: String,
}

/// Mounts `source` with `opts` where `placement` says: finds or starts the blob's agent, prepares,
/// places the mount, attaches it to the agent, starts prefetch and applies `cache_max`. `prog`
/// prefixes the warnings printed for things that do not fail the mount.
pub fn mount_image(
    prog: &str,
    source: &str,
    opts: &MountOptions,
    placement: &mut dyn Placement,
    foreground: bool,
) -> Result<MountedImage, CliError> {
    // Checked before anything is created, so a refused cache_dir leaves nothing.
    state::check_cache_filesystem(&opts.cache_dir).map_err(|e| CliError::new(e.to_string()))?;
    let mut prefetch_ranges = read_prefetch_trace(opts)?;
    let prefetch_paths = read_prefetch_files(opts)?;
    let (source, remember) = resolve_source(source, opts)?;
    let key = source.cache_key().map_err(CliError::new)?;
    let state_dir = super::state_dir();
    state_dir.create().map_err(|e| CliError::new(format!("cannot create the state directory: {e}")))?;

    // What a failed start must put back: the state dir as it was.
    let before = StateBefore::of(&state_dir, &key);
    // One front end at a time per blob: no two agents for one cache entry.
    let lock = AgentLock::lock(&state_dir, &key, AGENT_START_TIMEOUT)
        .map_err(|e| CliError::new(format!("cannot lock the agent of this blob: {e}")))?;
    let (mut conn, child) = match connect_live_agent(&state_dir, &key).or_else(|| wait_for_successor(&state_dir, &key)) {
        Some(mut conn) => {
            join_agent(prog, &mut conn, &source, opts)?;
            (conn, None)
        }
        None => {
            let (known_metadata, trace) = index_lookup(prog, &source, &key, opts)?;
            // The artifact's trace replays after a trace the user named.
            prefetch_ranges.extend(trace);
            let cfg = AgentConfig {
                source,
                cache_dir: opts.cache_dir.clone(),
                cache_key: key.clone(),
                state_dir: state_dir.root().to_path_buf(),
                fetch_unit: opts.fetch_unit,
                fetch_timeout_ms: opts.fetch_timeout.as_millis() as u64,
                retry_timeout_ms: opts.retry_timeout.as_millis() as u64,
                fetch_parallel: opts.fetch_parallel,
                read_ahead_kb: opts.read_ahead_kb,
                record_trace: opts.record_trace,
                known_metadata,
            };
            let mut child = match spawn_agent(&cfg, &state_dir, foreground) {
                Ok(child) => child,
                Err(e) => {
                    before.restore(&state_dir, &key, lock);
                    return Err(e);
                }
            };
            match connect_live_agent(&state_dir, &key) {
                Some(conn) => (conn, Some(child)),
                None => {
                    drop(lock);
                    before.restore_after(&state_dir, &key, &mut child);
                    return Err(CliError::new("the agent started but does not answer on its control socket"));
                }
            }
        }
    };
    let read_ahead = opts.given.contains("read_ahead_kb").then_some(opts.read_ahead_kb);
    let result = mount_with_agent(&mut conn, placement, read_ahead);
    if result.is_ok() {
        // The mount stands; a prefetch that cannot start is only reported.
        let mut ranges = prefetch_ranges;
        ranges.extend(extents_of(&placement.files_root(), &prefetch_paths));
        if let Err(e) = start_prefetch(&mut conn, opts.prefetch_all, &ranges, opts.prefetch_rate) {
            eprintln!("{prog}: {e}");
        }
    }
    drop(conn);
    drop(lock);
    let placed = match (result, child) {
        (Ok(placed), child) => (placed, child),
        (Err(e), Some(mut child)) => {
            // The agent we started leaves by itself (no mount holds it); then put back what it made.
            before.restore_after(&state_dir, &key, &mut child);
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let (placed, child) = placed;
    if let Some(remember) = remember {
        remember.store(&opts.cache_dir);
    }
    if let Some(max) = opts.cache_max {
        // The new mount's entry is in use (its agent is live), so it is never the one removed.
        match super::cache_cmd::prune(&opts.cache_dir, &state_dir, Some(max), None) {
            Ok(report) if !report.removed.is_empty() => {
                tracing::info!(removed = report.removed.len(), freed = report.freed_bytes, "cache_max applied")
            }
            Ok(_) => {}
            Err(e) => eprintln!("{prog}: mounted, but cache_max could not be applied: {e}"),
        }
    }
    if foreground {
        // Type=notify units: the mount stands, so the service is up.
        if let Err(e) = notify_ready() {
            eprintln!("{prog}: cannot notify the service manager: {e}");
        }
        if let Some(mut child) = child {
            let _ = child.wait();
        }
    }
    Ok(MountedImage { placed, cache_key: key })
}

/// What of an agent's files in the state dir existed before a front end tried to start it, so that
/// a failed start leaves the state dir as it was (its cause is the one line printed).
struct StateBefore {
    lock: bool,
    journal: bool,
    log_len: Option<u64>,
}

/// How long a failed start waits for the agent it started to leave.
const AGENT_LEAVE_WAIT: Duration = Duration::from_secs(15);

impl StateBefore {
    fn of(state_dir: &StateDir, key: &str) -> StateBefore {
        let exists = |p: Result<PathBuf, state::StateError>| p.is_ok_and(|p| p.symlink_metadata().is_ok());
        StateBefore {
            lock: exists(state_dir.agent_lock_path(key)),
            journal: exists(state_dir.agent_journal_path(key)),
            log_len: state_dir.agent_log_path(key).ok().and_then(|p| p.symlink_metadata().ok()).map(|m| m.len()),
        }
    }

    /// Under the agent lock, with no agent of `key` left: removes what the attempt created.
    fn restore(&self, state_dir: &StateDir, key: &str, lock: AgentLock) {
        if !self.journal {
            let _ = state::remove_unheld_journal(state_dir, key);
        }
        let _ = state::restore_agent_log(state_dir, key, self.log_len);
        if !self.lock {
            let _ = lock.remove();
        }
    }

    /// After a failure with the agent we started still running: waits for it to leave (bounded),
    /// then restores unless another front end or agent uses the key meanwhile.
    fn restore_after(&self, state_dir: &StateDir, key: &str, child: &mut std::process::Child) {
        let deadline = std::time::Instant::now() + AGENT_LEAVE_WAIT;
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(Some(lock)) = AgentLock::try_lock(state_dir, key) {
            let live = state::read_agent_record(state_dir, key).ok().flatten().is_some_and(|r| r.identity.is_alive());
            if !live {
                self.restore(state_dir, key, lock);
            }
        }
    }
}

/// A mount of a blob whose agent runs already: its options are honoured or refused, never ignored.
/// Agent-wide settings (`cache_dir`, `fetch_*`) given and different from the agent's refuse the mount
/// with one line; another source of the blob is added to the agent (a mirror); `record_trace` turns
/// the agent's recording on. Per-mount options (`read_ahead_kb`, `prefetch*`, `cache_max`) apply to
/// this mount as for any other.
fn join_agent(prog: &str, conn: &mut AgentConn, source: &SourceSpec, opts: &MountOptions) -> Result<(), CliError> {
    let settings = match conn.call(&Request::Prepare) {
        Ok(Reply::Prepared { settings, .. }) => settings,
        Ok(Reply::Error { message }) => return Err(CliError::new(message)),
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    if let Some(settings) = settings {
        if let Some(why) = join_conflict(&settings, opts) {
            return Err(CliError::new(why));
        }
    }
    match conn.call(&Request::AddSource { source: source.clone() }) {
        Ok(Reply::SourceAdded { added: true, source }) => {
            tracing::info!(%source, "the running agent serves this blob from this mount's source too")
        }
        Ok(Reply::SourceAdded { added: false, .. }) => {}
        Ok(Reply::Error { message }) => eprintln!(
            "{prog}: {} is served by its running agent; this mount's source could not be added to it: {message}",
            source.describe()
        ),
        Ok(other) => eprintln!("{prog}: the running agent did not take this mount's source: {other:?}"),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    }
    if opts.record_trace {
        let _ = conn.call(&Request::Trace { reset: false, record: Some(true) });
    }
    Ok(())
}

/// The first agent-wide option given in `opts` that differs from the running agent's, as the line
/// that refuses the mount.
fn join_conflict(agent: &crate::agent::protocol::AgentSettings, opts: &MountOptions) -> Option<String> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let refuse = |what: String| {
        Some(format!(
            "this image is already served by a running agent with {what}; a second mount cannot change it (use the same value, or leave the option out)"
        ))
    };
    if opts.given.contains("cache_dir") && canonical(&opts.cache_dir) != canonical(&agent.cache_dir) {
        return refuse(format!("cache_dir={}", agent.cache_dir.display()));
    }
    let secs = |ms: u64| format!("{}", ms as f64 / 1000.0);
    if opts.given.contains("fetch_unit") && opts.fetch_unit != agent.fetch_unit {
        return refuse(format!("fetch_unit={}K", agent.fetch_unit >> 10));
    }
    if opts.given.contains("fetch_parallel") && opts.fetch_parallel != agent.fetch_parallel {
        return refuse(format!("fetch_parallel={}", agent.fetch_parallel));
    }
    if opts.given.contains("fetch_timeout") && opts.fetch_timeout.as_millis() as u64 != agent.fetch_timeout_ms {
        return refuse(format!("fetch_timeout={}", secs(agent.fetch_timeout_ms)));
    }
    if opts.given.contains("retry_timeout") && opts.retry_timeout.as_millis() as u64 != agent.retry_timeout_ms {
        return refuse(format!("retry_timeout={}", secs(agent.retry_timeout_ms)));
    }
    None
}

fn mount_with_agent(conn: &mut AgentConn, placement: &mut dyn Placement, read_ahead: Option<u32>) -> Result<Placed, CliError> {
    let (cache_path, read_ahead_kb, identity) = match conn.call(&Request::Prepare) {
        Ok(Reply::Prepared { cache_path, read_ahead_kb, cache_dev, cache_ino, .. }) => {
            // The mount's own read_ahead_kb when given; else the agent's (the first mount's).
            (PathBuf::from(cache_path), read_ahead.unwrap_or(read_ahead_kb), (cache_dev, cache_ino))
        }
        Ok(Reply::Error { message }) => return Err(CliError::new(message)),
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    // The kernel opens the cache file by path: make sure that path (no symlink below the cache
    // dir) is the file the agent marked, before and after the mount.
    verify_cache_file(&cache_path, identity)?;
    let placed = placement.place(&cache_path, read_ahead_kb)?;
    if let Err(e) = verify_cache_file(&cache_path, identity) {
        placement.undo();
        return Err(e);
    }
    let info = AttachInfo {
        mnt_id: placed.id.id,
        mnt_id_unique: placed.id.unique,
        mountpoint: placed.mountpoint.clone(),
        sysfs_name: placed.sysfs_name.clone(),
        mount_ns: placed.mount_ns,
    };
    let attach = match conn.call(&Request::Attach(info)) {
        Ok(Reply::Attached) => Ok(()),
        Ok(Reply::Error { message }) => Err(CliError::new(message)),
        Ok(other) => Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => Err(CliError::new(format!("the agent did not confirm the mount: {e}"))),
    };
    if let Err(e) = attach {
        placement.undo();
        return Err(e);
    }
    Ok(placed)
}

/// `cache_path` is `<cache_dir>/<key>/blob`: opened below `<cache_dir>` (which may be a symlink,
/// the admin's choice) without following any symlink, it must be the agent's file `(dev, ino)`.
fn verify_cache_file(cache_path: &Path, (dev, ino): (u64, u64)) -> Result<(), CliError> {
    if ino == 0 {
        return Ok(()); // an agent that does not say
    }
    let refuse = |why: String| CliError::new(format!("refusing to mount {}: {why}", cache_path.display()));
    let entry = cache_path.parent().ok_or_else(|| refuse("not a cache file path".into()))?;
    let root = entry.parent().ok_or_else(|| refuse("not a cache file path".into()))?;
    let rel = cache_path.strip_prefix(root).map_err(|_| refuse("not a cache file path".into()))?;
    let root_fd = std::fs::File::open(root).map_err(|e| refuse(format!("cannot open {}: {e}", root.display())))?;
    let file = sys::mount::open_path_beneath(std::os::fd::AsFd::as_fd(&root_fd), rel).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => refuse("a symbolic link in its path".into()),
        _ => refuse(e.to_string()),
    })?;
    let got = sys::mount::file_identity(std::os::fd::AsFd::as_fd(&file)).map_err(|e| refuse(e.to_string()))?;
    if got != (dev, ino) {
        return Err(refuse("it is not the file the agent serves (the entry was replaced)".into()));
    }
    Ok(())
}

fn check_mountpoint(path: &Path) -> Result<PathBuf, CliError> {
    let abs = std::fs::canonicalize(path)
        .map_err(|e| CliError::new(format!("mountpoint {} does not exist: {}", path.display(), io_reason(&e))))?;
    if !abs.is_dir() {
        return Err(CliError::new(format!("mountpoint {} is not a directory", path.display())));
    }
    Ok(abs)
}

pub(crate) fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_lowercase()
}

fn connect_live_agent(state_dir: &StateDir, key: &str) -> Option<AgentConn> {
    let record = state::read_agent_record(state_dir, key).ok().flatten()?;
    if !record.identity.is_alive() {
        return None;
    }
    let mut conn = AgentConn::connect(&record.socket, Duration::from_secs(10)).ok()?;
    match conn.call(&Request::Ping) {
        Ok(Reply::Pong { .. }) => Some(conn),
        _ => None,
    }
}

/// How long a front end waits for a supervisor to replace its dead worker.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(30);

/// The agent's worker is dead but its supervisor still holds the journal: a successor is coming
/// (starting another agent would put two on one cache entry, and take its mounts over). Waits for
/// the successor, bounded; `None` when there is nothing to wait for.
fn wait_for_successor(state_dir: &StateDir, key: &str) -> Option<AgentConn> {
    let deadline = std::time::Instant::now() + SUCCESSOR_WAIT;
    loop {
        let record = state::read_agent_record(state_dir, key).ok().flatten()?;
        if record.identity.is_alive() || !state::journal_held(state_dir, key).unwrap_or(false) {
            return connect_live_agent(state_dir, key);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
        if let Some(conn) = connect_live_agent(state_dir, key) {
            return Some(conn);
        }
    }
}

/// The agent binary lives beside the front end (also through the mount helper link).
fn agent_binary() -> PathBuf {
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        let candidate = dir.join("erofs-fanotify");
        if candidate.exists() {
            return candidate;
        }
    }
    PathBuf::from("erofs-fanotify")
}

/// Starts a daemonised agent, hands it its config on stdin and waits for its
/// ready line on stdout. Its log goes to the state dir (or stderr in the foreground).
fn spawn_agent(cfg: &AgentConfig, state_dir: &StateDir, foreground: bool) -> Result<std::process::Child, CliError> {
    let stderr = if foreground {
        Stdio::inherit()
    } else {
        let log = agent_log_path(state_dir, &cfg.cache_key);
        let file = state_dir
            .open_agent_log(&cfg.cache_key)
            .map_err(|e| CliError::new(format!("cannot open the agent log {}: {e}", log.display())))?;
        Stdio::from(file)
    };
    let mut cmd = Command::new(agent_binary());
    cmd.arg("agent").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr);
    // Secrets reach the agent in its config on stdin only, never in /proc/<agent>/environ.
    for var in crate::remote::s3::credentials::SECRET_ENV_VARS {
        cmd.env_remove(var);
    }
    if foreground {
        cmd.arg("--foreground");
    }
    let mut child = cmd.spawn().map_err(|e| CliError::new(format!("cannot start the agent: {e}")))?;
    let config = serde_json::to_vec(cfg).map_err(|e| CliError::new(format!("cannot encode the agent config: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&config);
    }
    let stdout = child.stdout.take().ok_or_else(|| CliError::new("cannot read from the agent"))?;
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let answer: serde_json::Value = match read {
        Ok(n) if n > 0 => serde_json::from_str(line.trim()).unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    };
    if answer.get("ready").and_then(|v| v.as_bool()) == Some(true) {
        return Ok(child);
    }
    let _ = child.wait();
    match answer.get("error").and_then(|v| v.as_str()) {
        Some(msg) => Err(CliError::new(msg.to_string())),
        // The log goes with the failed start: its last line is the cause.
        None => {
            let log = agent_log_path(state_dir, &cfg.cache_key);
            let last = std::fs::read_to_string(&log)
                .ok()
                .and_then(|text| text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string));
            Err(CliError::new(match last {
                Some(line) => format!("the agent exited during startup: {}", line.trim()),
                None => "the agent exited during startup".to_string(),
            }))
        }
    }
}

/// The agent's log: in the state dir, beside its record and socket.
pub fn agent_log_path(state_dir: &StateDir, key: &str) -> PathBuf {
    state_dir.agents_dir().join(format!("{key}.log"))
}

/// The index artifact's metadata ranges for a new agent (`-o index=`,
/// `index_file=`): bad artifacts are one warning each, none is one info
/// line, and only `index=require` fails the mount.
/// Also the ranges of the artifact's trace to replay as prefetch (`-o trace=`).
fn index_lookup(
    prog: &str,
    source: &SourceSpec,
    key: &str,
    opts: &MountOptions,
) -> Result<(Option<crate::index::KnownRanges>, Vec<[u64; 2]>), CliError> {
    // A cache entry that kept its metadata map needs no walk and so no index:
    // a warm mount makes no registry requests for it.
    if let SourceSpec::Oci(spec) = source {
        if opts.index != crate::index::IndexMode::Off
            && state::CacheEntry::knows_required(&state::CacheDir::new(opts.cache_dir.clone()), key, spec.size, Some(&spec.digest))
        {
            tracing::info!("the cache entry knows its metadata ranges; no index lookup");
            return Ok((None, Vec::new()));
        }
    }
    let found = crate::index::lookup::for_mount(source, opts.index, opts.index_file.as_deref(), &opts.oci).map_err(CliError::new)?;
    for w in &found.warnings {
        eprintln!("{prog}: warning: {w}");
    }
    let Some(mut known) = found.known else {
        tracing::info!(why = found.none_because.as_deref().unwrap_or(""), "no index artifact; walking the metadata");
        return Ok((None, Vec::new()));
    };
    let mut trace = Vec::new();
    match crate::index::lookup::pick_trace(&found.traces, opts.index_trace.as_deref()) {
        Ok(Some((name, ranges))) => {
            known.artifact.push_str(&format!("; trace {name}"));
            trace = ranges.iter().map(|r| [r.start, r.end]).collect();
        }
        Ok(None) => {}
        Err(w) => eprintln!("{prog}: warning: {w}"),
    }
    tracing::info!(artifact = %known.artifact, ranges = known.ranges.len(), trace_ranges = trace.len(), "using the index artifact's metadata ranges");
    Ok((Some(known), trace))
}

/// Starts a new agent for the cache entry `key` whose agent died (worker and supervisor) while its
/// mounts were live, from the configuration its record keeps; the new agent takes those mounts over
/// (see `agent::takeover`). Returns the dead and the new agent's pids.
pub fn restart_dead_agent(state_dir: &StateDir, key: &str) -> Result<(i32, i32), CliError> {
    let lock = AgentLock::lock(state_dir, key, AGENT_START_TIMEOUT)
        .map_err(|e| CliError::new(format!("cannot lock the agent of this blob: {e}")))?;
    let record = state::read_agent_record(state_dir, key)
        .map_err(|e| CliError::new(format!("cannot read the agent record: {e}")))?
        .ok_or_else(|| CliError::new("no agent record is left to restart the agent from"))?;
    // A supervisor between a dead worker and its successor still holds the journal: not dead.
    if record.identity.is_alive() || state::journal_held(state_dir, key).unwrap_or(true) {
        return Err(CliError::new("the agent of this mount is alive but does not answer (a worker is being replaced); try again"));
    }
    let cfg: AgentConfig = record
        .config
        .and_then(|c| serde_json::from_value(c).ok())
        .ok_or_else(|| CliError::new("the dead agent's record does not say how to restart it"))?;
    if cfg.cache_key != key {
        return Err(CliError::new("the dead agent's record names another cache entry"));
    }
    let _child = spawn_agent(&cfg, state_dir, false)?;
    let mut conn = connect_live_agent(state_dir, key)
        .ok_or_else(|| CliError::new("the agent started but does not answer on its control socket"))?;
    // Answered once the takeover dropped what the gap cached.
    let new = match conn.call(&Request::Prepare).and_then(|_| conn.call(&Request::Ping)) {
        Ok(Reply::Pong { pid }) => pid,
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    drop(conn);
    drop(lock);
    Ok((record.identity.pid, new))
}

/// An http(s) URL is used as is; a local path (`/…`, `./…`, `../…`) is an image file; `s3://BUCKET/KEY`,
/// or `BUCKET/KEY` with `s3.endpoint=`, is an S3 object; anything else is an image reference. An
/// image file or S3 object that is a bucket image (`build --s3`) mounts with its objects.
fn resolve_source(source: &str, opts: &MountOptions) -> Result<(SourceSpec, Option<Remember>), CliError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        return Ok((SourceSpec::Url { url: source.to_string() }, None));
    }
    let env = crate::remote::s3::AwsEnvironment::from_env();
    if crate::bucket::resolve::is_local_path(source) {
        return crate::bucket::resolve::resolve_local(source, &opts.s3, &env).map(|s| (s, None)).map_err(CliError::new);
    }
    if crate::remote::s3::is_s3_source(source, &opts.s3) {
        let spec = crate::remote::s3::resolve_object_in(source, &opts.s3, &env).map_err(|e| CliError::new(e.to_string()))?;
        return crate::bucket::resolve::detect_in_s3(spec, &opts.s3, &env).map(|s| (s, None)).map_err(CliError::new);
    }
    if opts.s3.is_set() {
        return Err(CliError::new(format!(
            "s3.* options need an s3://BUCKET/KEY source or s3.endpoint=URL with BUCKET/KEY, not {source:?}"
        )));
    }
    if opts.tar_index.is_some() || opts.tar_index_build || opts.zinfo.is_some() {
        return super::tar_index_mount::resolve(source, opts).map(|s| (s, None));
    }
    match crate::oci::resolve_image_and_config(source, &opts.oci) {
        Ok((crate::oci::ResolvedImage::Blob(spec), _)) => {
            let remember = remember_resolution(reference_lookup_key(source, &opts.oci), &spec);
            Ok((SourceSpec::Oci(spec), remember))
        }
        // An ordinary image (tar layers): through the tar indexes this host holds, or one line on how to make them.
        Ok((crate::oci::ResolvedImage::Layers(layers), config)) if layers.iter().all(|l| super::tar_index_mount::is_tar_layer(&l.media_type)) => {
            super::tar_index_mount::resolve_indexed(source, opts, layers, config).map(|s| (s, None))
        }
        Err(crate::oci::OciError::NotErofs { media_type, .. }) if super::tar_index_mount::is_tar_layer(&media_type) => {
            super::tar_index_mount::resolve_indexed_one(source, opts).map(|s| (s, None))
        }
        Ok((crate::oci::ResolvedImage::Layers(layers), _)) => Ok((
            SourceSpec::Layers(Box::new(crate::agent::sources::LayersSpec {
                name: layers.first().map(|l| l.reference.clone()).unwrap_or_else(|| source.to_string()),
                layers: layers.into_iter().map(|l| SourceSpec::Oci(Box::new(l))).collect(),
            })),
            None,
        )),
        // The registry is unreachable: perhaps the cache holds what the reference resolved to last.
        Err(crate::oci::OciError::Unreachable { .. }) => {
            resolve_reference_or_cached(source, opts).map(|(spec, remember)| (SourceSpec::Oci(Box::new(spec)), remember))
        }
        Err(e) => Err(CliError::new(e.to_string())),
    }
}

/// A resolution to store once the mount stands (a failed mount leaves nothing in the cache dir).
pub struct Remember {
    lookup: String,
    resolved: state::ResolvedRef,
}

impl Remember {
    fn store(self, cache_dir: &Path) {
        if let Err(e) = state::write_resolved_ref(&state::CacheDir::new(cache_dir), &self.lookup, &self.resolved) {
            tracing::warn!(reference = %self.resolved.reference, error = %e, "cannot remember what the reference resolved to");
        }
    }
}

/// What selects a blob for a reference: the reference and the options that choose the layer.
fn reference_lookup_key(source: &str, o: &crate::oci::options::OciOptions) -> String {
    serde_json::json!({
        "reference": source,
        "blob": o.blob,
        "layer": o.layer,
        "platform": o.platform.clone().unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        "insecure": o.insecure,
    })
    .to_string()
}

/// Resolves an image reference at its registry and remembers the answer in the cache dir. When the
/// registry cannot be reached, the blob the reference resolved to last is mounted from the cache,
/// if the cache holds it: a digest reference names its manifest, so that is the registry's answer
/// too; a tag may have moved meanwhile, so that fallback prints one warning line, and
/// `oci.offline=never` refuses it.
fn resolve_reference_or_cached(
    source: &str,
    opts: &MountOptions,
) -> Result<(crate::oci::OciBlobSpec, Option<Remember>), CliError> {
    use crate::oci::OciError;
    let cache = state::CacheDir::new(opts.cache_dir.clone());
    let lookup = reference_lookup_key(source, &opts.oci);
    let unreachable = match crate::oci::resolve_reference(source, &opts.oci) {
        Ok(spec) => {
            let remember = remember_resolution(lookup, &spec);
            return Ok((spec, remember));
        }
        Err(e @ OciError::Unreachable { .. }) => e,
        Err(e) => return Err(CliError::new(e.to_string())),
    };
    let by_digest = source.contains("@sha256:");
    if !by_digest && !opts.oci_offline_fallback {
        return Err(CliError::new(format!("{unreachable} (oci.offline=never: not mounting the blob this tag resolved to last)")));
    }
    let Some(resolved) = state::read_resolved_ref(&cache, &lookup).ok().flatten() else {
        return Err(CliError::new(unreachable.to_string()));
    };
    // Only a blob the cache holds: otherwise the registry's error is the answer.
    let held = state::cache_key_for_digest(&resolved.digest)
        .ok()
        .and_then(|key| cache.read_entry_meta(&key).ok().flatten())
        .is_some_and(|meta| meta.required.is_some());
    if !held {
        return Err(CliError::new(unreachable.to_string()));
    }
    let mut spec: crate::oci::OciBlobSpec = serde_json::from_value(resolved.source)
        .map_err(|_| CliError::new(unreachable.to_string()))?;
    if spec.digest != resolved.digest {
        return Err(CliError::new(unreachable.to_string()));
    }
    spec.credentials = match (&opts.oci.username, &opts.oci.password) {
        (Some(u), Some(p)) => Some(crate::oci::credentials::Credentials::Basic { username: u.clone(), password: p.clone() }),
        _ => crate::oci::credentials::CredentialFiles::from_env().lookup(&spec.registry, &spec.repository).ok().flatten(),
    };
    if !by_digest {
        let ago = state::unix_now().saturating_sub(resolved.resolved_unix);
        eprintln!(
            "erofs-mount: warning: {unreachable}; mounting {} from the cache, which {source} resolved to {ago} s ago (oci.offline=never refuses this)",
            resolved.digest
        );
    }
    Ok((spec, None))
}

/// Stores what `source` resolved to, without credentials or tokens.
fn remember_resolution(lookup: String, spec: &crate::oci::OciBlobSpec) -> Option<Remember> {
    let mut stored = spec.clone();
    stored.credentials = None;
    stored.auth_handoff = None;
    for m in &mut stored.mirrors {
        m.credentials = None;
    }
    let value = serde_json::to_value(&stored).ok()?;
    let resolved = state::ResolvedRef {
        reference: spec.reference.clone(),
        digest: spec.digest.clone(),
        resolved_unix: state::unix_now(),
        source: value,
    };
    Some(Remember { lookup, resolved })
}

/// Reads `prefetch_trace=FILE` before anything is set up, so a bad file
/// fails the mount with nothing left behind.
pub fn read_prefetch_trace(opts: &MountOptions) -> Result<Vec<[u64; 2]>, CliError> {
    let Some(path) = &opts.prefetch_trace else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new(format!("cannot read prefetch_trace {}: {e}", path.display())))?;
    let (_, ranges) = crate::agent::trace::parse_trace(&text)
        .map_err(|e| CliError::new(format!("prefetch_trace {} is not a trace: {e}", path.display())))?;
    Ok(ranges.into_iter().map(|r| [r.start, r.end]).collect())
}

/// Reads `prefetch_files=FILE` (one path inside the image per line) before
/// anything is set up.
pub fn read_prefetch_files(opts: &MountOptions) -> Result<Vec<PathBuf>, CliError> {
    const MAX_PATHS: usize = 1 << 20;
    let Some(path) = &opts.prefetch_files else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new(format!("cannot read prefetch_files {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let rel = Path::new(line.trim_start_matches('/'));
        if rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(CliError::new(format!("prefetch_files {}: {line:?} leaves the image", path.display())));
        }
        if out.len() >= MAX_PATHS {
            return Err(CliError::new(format!("prefetch_files {}: more than {MAX_PATHS} paths", path.display())));
        }
        out.push(rel.to_path_buf());
    }
    Ok(out)
}

/// Image byte ranges of the data of `paths` (FIEMAP on the mounted files;
/// opening raises no read). Missing paths are reported and skipped.
pub fn extents_of(mountpoint: &Path, paths: &[PathBuf]) -> Vec<[u64; 2]> {
    let mut out = Vec::new();
    for rel in paths {
        let full = mountpoint.join(rel);
        let extents = std::fs::File::open(&full).and_then(|f| {
            if f.metadata()?.is_file() {
                sys::fs::fiemap(&f)
            } else {
                Ok(Vec::new())
            }
        });
        match extents {
            Ok(e) => out.extend(e.into_iter().map(|r| [r.start, r.end])),
            Err(e) => eprintln!("erofs-mount: prefetch_files: skipping {}: {e}", rel.display()),
        }
    }
    out
}

/// Asks the agent for background prefetch (`prefetch=all`, `prefetch_trace=`).
fn start_prefetch(conn: &mut AgentConn, all: bool, ranges: &[[u64; 2]], rate: Option<u64>) -> Result<(), CliError> {
    if !all && ranges.is_empty() {
        return Ok(());
    }
    let req = Request::Prefetch { all, ranges: ranges.to_vec(), rate };
    match conn.call(&req) {
        Ok(Reply::Prefetching { .. }) => Ok(()),
        Ok(other) => Err(CliError::new(format!("mounted, but the agent refused prefetch: {other:?}"))),
        Err(e) => Err(CliError::new(format!("mounted, but prefetch could not start: {e}"))),
    }
}

/// sd_notify(3) `READY=1` without libsystemd: one datagram to `$NOTIFY_SOCKET` (a path, or an abstract
/// name when it starts with '@'). Does nothing when the variable is unset (not under systemd).
fn notify_ready() -> std::io::Result<()> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let target = target.to_string_lossy().into_owned();
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(message.as_bytes(), &addr)?;
    } else {
        socket.send_to(message.as_bytes(), &target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::AgentSettings;

    fn agent() -> AgentSettings {
        AgentSettings {
            cache_dir: PathBuf::from("/nonexistent/a"),
            fetch_unit: 256 << 10,
            fetch_timeout_ms: 10_000,
            retry_timeout_ms: 30_000,
            fetch_parallel: 8,
            read_ahead_kb: 512,
        }
    }

    #[test]
    fn only_given_agent_wide_options_that_differ_refuse_a_joining_mount() {
        let parse = |o: &str| MountOptions::parse(o).unwrap();
        // Defaults that differ from the agent's are not "given": the mount joins.
        assert_eq!(join_conflict(&AgentSettings { fetch_unit: 64 << 10, ..agent() }, &parse("")), None);
        assert_eq!(join_conflict(&agent(), &parse("cache_dir=/nonexistent/a,fetch_unit=256K,retry_timeout=30")), None);
        // Per-mount options never refuse.
        assert_eq!(join_conflict(&agent(), &parse("read_ahead_kb=2048,prefetch=all")), None);
        let line = join_conflict(&agent(), &parse("cache_dir=/nonexistent/b")).unwrap();
        assert!(line.contains("cache_dir=/nonexistent/a"), "{line}");
        assert!(join_conflict(&agent(), &parse("fetch_unit=64K")).unwrap().contains("fetch_unit=256K"));
        assert!(join_conflict(&agent(), &parse("retry_timeout=5")).unwrap().contains("retry_timeout=30"));
        assert!(join_conflict(&agent(), &parse("fetch_parallel=2")).is_some());
    }
}
