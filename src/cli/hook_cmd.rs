//! `erofs-fanotify hook [--stage STAGE]`: an OCI runtime hook (container state JSON on stdin).
//!
//! Driven by the container's annotations:
//! - `org.erofs-fanotify.image`: the image source (reference or URL), as for `erofs-mount`;
//! - `org.erofs-fanotify.target`: where to mount it, a directory as the container sees it; `/` makes
//!   the image the container's root filesystem (read-only; the runtime's mounts below the rootfs,
//!   `/proc`, `/dev` and the like, are moved onto the image, whose directories for them must exist;
//!   needs a runtime that runs createRuntime/prestart before pivot_root, as runc does);
//! - `org.erofs-fanotify.options`: optional `-o` options, separated by `,` or `;` (podman's
//!   `--annotation` splits its argument at commas unless the whole argument is double-quoted, so `;`
//!   is the separator that survives the CLI);
//! - `org.erofs-fanotify.option.N` (N a number): one more option each, applied in order of N.
//!
//! A container without any `org.erofs-fanotify.` annotation is not ours: the hook does nothing. A
//! half-specified or bad set fails the hook with one line, before anything is mounted.
//!
//! Stages: `createRuntime` (or the older `prestart`: with runc both run at the same moment) mounts;
//! `poststop` cleans up. Both run in the runtime's (host) namespaces, where our binaries, state dir
//! and cache are; `createContainer`/`startContainer` run inside the container, where they are not.
//! Without `--stage` the stage is taken from the state's `status` (`creating` mounts, `stopped` cleans
//! up), which is what a hooks.d file (one `args` for every stage) relies on.
//!
//! The mount is made on the host side, detached, and attached inside the container's mount namespace
//! (see `container_mount`), so mount propagation does not matter; the agent stays in the host's
//! namespace. The record names the mountpoint `/proc/PID/root/<target>`, the path through which the
//! host reaches the mount while the container lives (`erofs-fanotify status PATH` takes it). When
//! the container's namespace goes, so does the mount: the agent sees its superblock close
//! (FAN_CLOSE_NOWRITE) and drops the record. `poststop` then only removes what is left; a small hook
//! record (`<state dir>/hooks/<container id>.json`) tells it which mount was the container's.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use erofs_fanotify_state::{self as state, StateDir};
use serde::{Deserialize, Serialize};

use crate::agent::protocol::{Reply, Request};
use crate::mount::MountOptions;
use crate::sys;
use crate::sys::mount::DetachedErofs;

use super::client::AgentConn;
use super::container_mount::Container;
use super::mount_cmd::{Placed, Placement};
use super::CliError;

pub const ANNOTATION_PREFIX: &str = "org.erofs-fanotify.";
pub const IMAGE_ANNOTATION: &str = "org.erofs-fanotify.image";
pub const TARGET_ANNOTATION: &str = "org.erofs-fanotify.target";
pub const OPTIONS_ANNOTATION: &str = "org.erofs-fanotify.options";
/// `org.erofs-fanotify.option.N`: one option per annotation.
pub const OPTION_N_PREFIX: &str = "org.erofs-fanotify.option.";

/// How long poststop waits for the container's superblock to go (normally milliseconds after the
/// namespace's last process exits) and for a last agent to exit.
const POSTSTOP_WAIT: Duration = Duration::from_secs(10);

/// The OCI container state (runtime-spec `state.json`); only what we need.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    #[serde(default)]
    pub oci_version: String,
    pub id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub pid: Option<i64>,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// What the annotations ask for.
#[derive(Debug, PartialEq)]
pub struct HookRequest {
    pub image: String,
    /// Relative to the container's root, normal components only.
    pub target: PathBuf,
    /// Comma separated, as `erofs-mount -o` takes them (empty: none).
    pub options: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    Mount,
    Unmount,
}

/// The stage from `--stage` or, failing that, from the container's status.
pub fn stage_of(stage: Option<&str>, status: &str) -> Result<Stage, CliError> {
    match stage.unwrap_or(status) {
        "createRuntime" | "prestart" | "creating" | "created" => Ok(Stage::Mount),
        "poststop" | "stopped" => Ok(Stage::Unmount),
        other => Err(CliError::new(format!(
            "hook stage {other:?} is not supported (use createRuntime/prestart to mount, poststop to clean up)"
        ))),
    }
}

/// An annotation outside our namespace that is really one of our options, split off
/// `org.erofs-fanotify.options=a,key=value` by a CLI that cuts `--annotation` at commas.
fn split_off_option(key: &str, value: &str) -> bool {
    let option_like = key.starts_with("oci.") || key == "prefetch" || (key.contains('_') && !key.contains('.'));
    option_like && MountOptions::parse(&format!("{key}={value}")).is_ok()
}

/// Reads our annotations. `Ok(None)`: none present, the container is not ours.
pub fn parse_annotations(annotations: &HashMap<String, String>) -> Result<Option<HookRequest>, CliError> {
    let ours: BTreeMap<&str, &str> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .map(|(k, v)| (k.as_str(), v.trim()))
        .collect();
    if ours.is_empty() {
        return Ok(None);
    }
    let mut numbered: BTreeMap<u32, (&str, &str)> = BTreeMap::new();
    for (key, value) in &ours {
        if [IMAGE_ANNOTATION, TARGET_ANNOTATION, OPTIONS_ANNOTATION].contains(key) {
            continue;
        }
        let n = key.strip_prefix(OPTION_N_PREFIX).and_then(|n| n.parse::<u32>().ok()).ok_or_else(|| {
            CliError::new(format!(
                "unknown annotation {key} (known: {IMAGE_ANNOTATION}, {TARGET_ANNOTATION}, {OPTIONS_ANNOTATION}, {OPTION_N_PREFIX}N)"
            ))
        })?;
        numbered.insert(n, (key, value));
    }
    let image = ours.get(IMAGE_ANNOTATION).copied().unwrap_or("");
    let target = ours.get(TARGET_ANNOTATION).copied().unwrap_or("");
    match (image.is_empty(), target.is_empty()) {
        (false, false) => {}
        (true, false) => {
            return Err(CliError::new(format!("annotation {IMAGE_ANNOTATION} is missing or empty ({TARGET_ANNOTATION} is set)")))
        }
        (false, true) => {
            return Err(CliError::new(format!("annotation {TARGET_ANNOTATION} is missing or empty ({IMAGE_ANNOTATION} is set)")))
        }
        (true, true) => {
            return Err(CliError::new(format!(
                "annotations {IMAGE_ANNOTATION} and {TARGET_ANNOTATION} are missing or empty (other {ANNOTATION_PREFIX}* annotations are set)"
            )))
        }
    }
    let mut rel = PathBuf::new();
    for component in Path::new(target).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(c) => rel.push(c),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CliError::new(format!("annotation {TARGET_ANNOTATION}={target:?} must not contain '..'")))
            }
        }
    }
    let mut items: Vec<String> = Vec::new();
    let mut check = |key: &str, value: &str| -> Result<(), CliError> {
        let parts: Vec<&str> = value.split([',', ';']).map(str::trim).filter(|s| !s.is_empty()).collect();
        MountOptions::parse(&parts.join(",")).map_err(|e| CliError::new(format!("annotation {key}: {e}")))?;
        items.extend(parts.into_iter().map(str::to_string));
        Ok(())
    };
    if let Some(value) = ours.get(OPTIONS_ANNOTATION) {
        check(OPTIONS_ANNOTATION, value)?;
    }
    for (key, value) in numbered.values() {
        check(key, value)?;
    }
    if let Some((key, value)) = annotations.iter().find(|(k, v)| !k.starts_with(ANNOTATION_PREFIX) && split_off_option(k, v)) {
        return Err(CliError::new(format!(
            "annotation {key}={value} looks like a mount option cut off {OPTIONS_ANNOTATION} at a comma by the container CLI; \
             separate options with ';' or use {OPTION_N_PREFIX}N annotations"
        )));
    }
    let options = items.join(",");
    MountOptions::parse(&options).map_err(|e| CliError::new(format!("annotations {ANNOTATION_PREFIX}option*: {e}")))?;
    Ok(Some(HookRequest { image: image.to_string(), target: rel, options }))
}

/// Rewords a message so that a runtime's exit-code mapping cannot mistake it for a missing
/// executable: podman answers 127 ("command not found") when the error text contains "not found" or
/// "no such file", whatever failed.
pub fn runtime_safe(message: &str) -> String {
    let mut out = message.to_string();
    for (phrase, replacement) in [("no such file or directory", "does not exist"), ("not found", "does not exist"), ("no such file", "does not exist")] {
        loop {
            let lower = out.to_ascii_lowercase();
            let Some(at) = lower.find(phrase) else { break };
            out.replace_range(at..at + phrase.len(), replacement);
        }
    }
    out
}

#[derive(Deserialize)]
struct BundleConfig {
    root: Option<BundleRoot>,
}

#[derive(Deserialize)]
struct BundleRoot {
    path: PathBuf,
}

/// The rootfs path on the host: `root.path` of the bundle's config.json, relative to the bundle.
fn rootfs_of(bundle: &Path) -> Result<PathBuf, CliError> {
    let config_path = bundle.join("config.json");
    let mut text = String::new();
    std::fs::File::open(&config_path)
        .and_then(|f| f.take(16 << 20).read_to_string(&mut text))
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", config_path.display())))?;
    let config: BundleConfig = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("{} is not an OCI config: {e}", config_path.display())))?;
    let root = config.root.ok_or_else(|| CliError::new(format!("{} has no root.path", config_path.display())))?;
    Ok(if root.path.is_absolute() { root.path } else { bundle.join(root.path) })
}

/// What createRuntime leaves for poststop: which mount was this container's.
#[derive(Debug, Serialize, Deserialize)]
struct HookRecord {
    container: String,
    mnt_id: u64,
    sysfs_name: String,
    mount_ns: u64,
    cache_key: String,
    target: PathBuf,
    rootfs: PathBuf,
}

/// Container ids become file names: a conservative charset, bounded length.
fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn hooks_dir(state_dir: &StateDir) -> PathBuf {
    state_dir.root().join("hooks")
}

fn hook_record_path(state_dir: &StateDir, id: &str) -> Result<PathBuf, CliError> {
    if !valid_container_id(id) {
        return Err(CliError::new(format!("container id {id:?} is not usable as a file name")));
    }
    Ok(hooks_dir(state_dir).join(format!("{id}.json")))
}

fn write_hook_record(path: &Path, record: &HookRecord) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read_hook_record(path: &Path) -> Result<Option<HookRecord>, String> {
    let mut text = String::new();
    match std::fs::File::open(path) {
        Ok(f) => f.take(1 << 20).read_to_string(&mut text).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| e.to_string())
}

fn superblock_alive(sysfs_name: &str) -> bool {
    !sysfs_name.is_empty() && !sysfs_name.contains('/') && Path::new("/sys/fs/erofs").join(sysfs_name).exists()
}

/// Polls `done` every few milliseconds until it holds or `timeout` passes. The superblock going away
/// has no waitable handle for us (the agent learns it from fanotify), so this is bounded polling.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The hook's placement: built detached here, attached in the container's mount namespace.
struct ContainerPlacement {
    container: Container,
    target: PathBuf,
    target_dir: OwnedFd,
    mounted: Option<DetachedErofs>,
}

impl Placement for ContainerPlacement {
    fn place(&mut self, cache_path: &Path, read_ahead_kb: u32) -> Result<Placed, CliError> {
        let shown = Path::new("/").join(&self.target);
        let detached = sys::mount::fsmount_erofs_file(cache_path, Some(read_ahead_kb), &[])
            .map_err(|e| CliError::new(format!("cannot mount on {} in the container: {e}", shown.display())))?;
        // On any failure below, dropping `detached` (unattached) or detaching it leaves nothing.
        let (id, reusable) = if self.target.as_os_str().is_empty() {
            self.container.attach_as_root(&detached)?
        } else {
            self.container.attach(&detached, &self.target_dir)?
        };
        let source = std::path::absolute(cache_path).unwrap_or_else(|_| cache_path.to_path_buf());
        if let Err(e) = self.container.verify(reusable, &self.target, &source) {
            let _ = self.container.detach(&detached);
            return Err(e);
        }
        let placed = Placed {
            id,
            mountpoint: self.container.host_view(&self.target).display().to_string(),
            sysfs_name: detached.mount.sysfs_name.clone(),
            mount_ns: self.container.mount_ns,
        };
        self.mounted = Some(detached);
        Ok(placed)
    }

    fn undo(&mut self) {
        if let Some(mounted) = self.mounted.take() {
            if let Err(e) = self.container.detach(&mounted) {
                tracing::warn!(error = %e.0, "cannot take the container's mount down again");
            }
        }
    }

    fn files_root(&self) -> PathBuf {
        match &self.mounted {
            // The detached mount's fd reaches its files from here, whatever the namespaces.
            Some(m) => PathBuf::from(format!("/proc/self/fd/{}", m.root().as_raw_fd())),
            None => self.container.host_view(&self.target),
        }
    }
}

pub fn run(stage: Option<String>) -> Result<(), CliError> {
    let mut input = String::new();
    std::io::stdin()
        .take(16 << 20)
        .read_to_string(&mut input)
        .map_err(|e| CliError::new(format!("cannot read the container state on stdin: {e}")))?;
    let state: ContainerState = serde_json::from_str(&input)
        .map_err(|e| CliError::new(format!("stdin is not an OCI container state: {e}")))?;
    let stage = stage_of(stage.as_deref(), &state.status)?;
    let result = match stage {
        Stage::Mount => mount(&state),
        Stage::Unmount => poststop(&state),
    };
    result.map_err(|e| CliError::new(runtime_safe(&format!("container {}: {}", short_id(&state.id), e.0))))
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn mount(state: &ContainerState) -> Result<(), CliError> {
    let Some(request) = parse_annotations(&state.annotations)? else {
        return Ok(());
    };
    super::require_root("the erofs-fanotify hook")?;
    let opts = MountOptions::parse(&request.options).map_err(|e| CliError::new(e.to_string()))?;
    let state_dir = super::state_dir();
    let record_path = hook_record_path(&state_dir, &state.id)?;
    if let Ok(Some(earlier)) = read_hook_record(&record_path) {
        if superblock_alive(&earlier.sysfs_name) {
            // Both prestart and createRuntime configured: the first one mounted already.
            tracing::info!(container = %state.id, "already mounted by an earlier hook stage");
            return Ok(());
        }
    }
    let pid = state
        .pid
        .ok_or_else(|| CliError::new("the container state has no pid (run the hook at createRuntime or prestart)"))?;
    let rootfs = rootfs_of(&state.bundle)?;
    let container = Container::locate(pid, &rootfs)?;
    // An empty target is the container's root (`target=/`): the image replaces the rootfs.
    let target_dir = if request.target.as_os_str().is_empty() {
        container.rootfs_dir()?
    } else {
        container.open_target(&request.target)?
    };
    tracing::info!(container = %state.id, image = %request.image, target = %request.target.display(), pid, "mounting");
    let mut placement = ContainerPlacement { container, target: request.target.clone(), target_dir, mounted: None };
    let mounted = super::mount_cmd::mount_image("erofs-fanotify", &request.image, &opts, &mut placement, false)?;
    let record = HookRecord {
        container: state.id.clone(),
        mnt_id: mounted.placed.id.id,
        sysfs_name: mounted.placed.sysfs_name.clone(),
        mount_ns: mounted.placed.mount_ns,
        cache_key: mounted.cache_key,
        target: request.target,
        rootfs,
    };
    // The mount stands and its agent follows its superblock; poststop just has less to go on.
    if let Err(e) = write_hook_record(&record_path, &record) {
        eprintln!("erofs-fanotify: mounted, but cannot write {}: {e}", record_path.display());
    }
    Ok(())
}

/// After the container: its namespace, and so normally its mount, is gone. Removes what is left and
/// never fails because nothing is.
fn poststop(state: &ContainerState) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let Ok(record_path) = hook_record_path(&state_dir, &state.id) else { return Ok(()) };
    let record = match read_hook_record(&record_path) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&record_path);
            eprintln!("erofs-fanotify: removed the unreadable hook record {}: {e}", record_path.display());
            return Ok(());
        }
    };
    if !wait_for(POSTSTOP_WAIT, || !superblock_alive(&record.sysfs_name)) {
        // A copy propagated to the host below the rootfs (a runtime with shared rootfs propagation)?
        let host_path = record.rootfs.join(&record.target);
        let ours = sys::mount::fs_sysfs_path(&host_path).is_ok_and(|p| p == format!("erofs/{}", record.sysfs_name));
        if ours && sys::mount::umount(&host_path, true).is_ok() {
            wait_for(POSTSTOP_WAIT, || !superblock_alive(&record.sysfs_name));
        }
    }
    if superblock_alive(&record.sysfs_name) {
        // Something else holds the namespace or a copy of the mount: the agent keeps serving it and
        // drops the record when its superblock closes. Reads stay correct meanwhile.
        eprintln!(
            "erofs-fanotify: container {}: the image stays in use outside the container (superblock {}); its agent keeps serving it",
            short_id(&state.id),
            record.sysfs_name
        );
        let _ = std::fs::remove_file(&record_path);
        return Ok(());
    }
    forget_mount(&state_dir, record.mnt_id);
    let _ = std::fs::remove_file(&record_path);
    Ok(())
}

/// The superblock is gone: makes sure the agent forgot the mount (it normally has, from the close
/// event) and, if that was its last, waits a moment for it to exit.
fn forget_mount(state_dir: &StateDir, mnt_id: u64) {
    let Ok(Some(record)) = state::read_mount_record(state_dir, mnt_id) else { return };
    if !record.agent.is_alive() {
        let _ = state::remove_mount_record(state_dir, mnt_id);
        return;
    }
    let answer = AgentConn::connect(&record.control_socket, Duration::from_secs(5))
        .and_then(|mut c| c.call(&Request::Unmounted { mnt_id }));
    match answer {
        Ok(Reply::Unmounted { remaining_mounts: 0 }) => {
            if let Ok(pidfd) = sys::process::pidfd_open(record.agent.pid) {
                if record.agent.is_alive() {
                    let _ = pidfd.wait_exit(POSTSTOP_WAIT);
                }
            }
        }
        Ok(_) => {}
        Err(_) => {
            let _ = state::remove_mount_record(state_dir, mnt_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        parse_annotations(&ann(pairs)).unwrap_err().0
    }

    #[test]
    fn annotations() {
        assert_eq!(parse_annotations(&ann(&[("other", "x")])).unwrap(), None);
        let r = parse_annotations(&ann(&[(IMAGE_ANNOTATION, "reg/app:v1"), (TARGET_ANNOTATION, "/data/img")])).unwrap().unwrap();
        assert_eq!(r.target, PathBuf::from("data/img"));
        assert_eq!(r.options, "");
        // Half-specified sets, either way round, and options alone.
        assert!(err(&[(IMAGE_ANNOTATION, "reg/app:v1")]).contains(TARGET_ANNOTATION));
        assert!(err(&[(TARGET_ANNOTATION, "/x")]).contains(IMAGE_ANNOTATION));
        assert!(err(&[(IMAGE_ANNOTATION, " "), (TARGET_ANNOTATION, "/x")]).contains(IMAGE_ANNOTATION));
        assert!(err(&[(OPTIONS_ANNOTATION, "oci.insecure")]).contains("missing"));
        assert!(err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/../etc")]).contains(".."));
        // `/` (or `.`) is the container's root: an empty relative target.
        for root in ["/", "/.", "."] {
            let r = parse_annotations(&ann(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, root)])).unwrap().unwrap();
            assert_eq!(r.target, PathBuf::new(), "{root}");
        }
        assert!(err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), (OPTIONS_ANNOTATION, "bogus=1")]).contains("bogus"));
        assert!(err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), ("org.erofs-fanotify.imgae", "b")]).contains("unknown annotation"));
        assert!(err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), ("org.erofs-fanotify.option.x", "b")]).contains("unknown annotation"));
    }

    #[test]
    fn option_separators_and_numbered_options() {
        let r = parse_annotations(&ann(&[
            (IMAGE_ANNOTATION, "a"),
            (TARGET_ANNOTATION, "/x"),
            (OPTIONS_ANNOTATION, "oci.insecure; cache_dir=/var/c ,fetch_parallel=4"),
            ("org.erofs-fanotify.option.10", "read_ahead_kb=1024"),
            ("org.erofs-fanotify.option.2", "oci.platform=linux/amd64"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.options, "oci.insecure,cache_dir=/var/c,fetch_parallel=4,oci.platform=linux/amd64,read_ahead_kb=1024");
        let o = MountOptions::parse(&r.options).unwrap();
        assert!(o.oci.insecure);
        assert_eq!(o.cache_dir, PathBuf::from("/var/c"));
        assert_eq!(o.read_ahead_kb, 1024);
        let e = err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), ("org.erofs-fanotify.option.3", "nope")]);
        assert!(e.contains("org.erofs-fanotify.option.3") && e.contains("nope"), "{e}");
    }

    #[test]
    fn comma_split_options_are_caught() {
        // `--annotation org.erofs-fanotify.options=oci.insecure,cache_dir=/x` as podman splits it.
        let e = err(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), (OPTIONS_ANNOTATION, "oci.insecure"), ("cache_dir", "/x")]);
        assert!(e.contains("cache_dir=/x") && e.contains("';'"), "{e}");
        // Unrelated annotations are fine.
        let ok = parse_annotations(&ann(&[
            (IMAGE_ANNOTATION, "a"),
            (TARGET_ANNOTATION, "/x"),
            ("io.podman.annotations.autoremove", "TRUE"),
            ("run.oci.keep_original_groups", "1"),
        ]));
        assert!(ok.unwrap().is_some());
    }

    #[test]
    fn messages_do_not_read_as_command_not_found() {
        assert_eq!(runtime_safe("tag \"v9\" of image reg/x Not Found"), "tag \"v9\" of image reg/x does not exist");
        assert_eq!(runtime_safe("cannot read /a: No such file or directory; b: not found"), "cannot read /a: does not exist; b: does not exist");
        assert_eq!(runtime_safe("all good"), "all good");
        for msg in ["x not found", "NO SUCH FILE", "No such file or directory (os error 2)"] {
            let safe = runtime_safe(msg).to_lowercase();
            assert!(!safe.contains("not found") && !safe.contains("no such file"), "{safe}");
        }
    }

    #[test]
    fn stages() {
        assert_eq!(stage_of(Some("createRuntime"), "").unwrap(), Stage::Mount);
        assert_eq!(stage_of(None, "creating").unwrap(), Stage::Mount);
        assert_eq!(stage_of(None, "stopped").unwrap(), Stage::Unmount);
        assert!(stage_of(Some("startContainer"), "").is_err());
    }

    #[test]
    fn container_ids() {
        assert!(valid_container_id("1a00a3bfdfaf2490a64abd7e5d7c0206ffc28fddd179fc9a1c67af413d892b9a"));
        assert!(valid_container_id("eft-hook-12-0"));
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(300)] {
            assert!(!valid_container_id(bad), "{bad:?}");
        }
    }
}
