//! Per-test environment: a private root under /var/tmp (ext4, so fanotify marks work) holding the state
//! dir (`EROFS_FANOTIFY_STATE_DIR`), the cache dir and the mountpoints, plus the `Mounted` guard.
//!
//! Teardown never relies on the code under test alone. `Mounted` runs `erofs-umount`, and if the mount is
//! still there, detaches it (`umount2(MNT_DETACH)`) and kills the recorded agent pid. `TestEnv` then runs
//! `erofs-umount --all` for its state dir, detaches anything still mounted under its root, kills agents
//! that belong to it (found through records and through /proc: a process running one of our binaries with
//! the root's path in its environment or command line) and removes the root.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;


use super::cmd::{self, Outcome};
use super::{
    COMMAND_TIMEOUT, EROFS_FANOTIFY, EROFS_MOUNT, EROFS_UMOUNT, GONE_TIMEOUT, STATE_DIR_ENV,
};

/// Where per-test roots (cache dir, mountpoints) live.
pub const TEST_ROOT_BASE: &str = "/var/tmp/erofs-fanotify-tests";

/// Where per-test state dirs live. Short on purpose, like the default /run/erofs-fanotify: the agent's unix
/// socket lives in the state dir and socket paths are limited to 107 bytes.
pub const STATE_ROOT_BASE: &str = "/run/eft";

/// One object of `erofs-fanotify status --json`: the binaries' own type.
pub use erofs_fanotify::agent::protocol::MountStatus;

pub struct TestEnv {
    pub name: String,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> TestEnv {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = Path::new(TEST_ROOT_BASE).join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        set_mode(Path::new(TEST_ROOT_BASE), 0o755);
        set_mode(&root, 0o755);
        let state_dir = Path::new(STATE_ROOT_BASE).join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let env = TestEnv {
            name: name.to_string(),
            state_dir,
            cache_dir: root.join("cache"),
            root,
        };
        std::fs::create_dir_all(&env.state_dir).expect("state dir");
        std::fs::create_dir_all(&env.cache_dir).expect("cache dir");
        env
    }

    /// Creates (if needed) and returns `<root>/<name>` for use as a mountpoint.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let path = self.root.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// A command for one of the binaries with this env's state dir.
    pub fn command(&self, binary: &str) -> Command {
        let mut cmd = Command::new(binary);
        cmd.env(STATE_DIR_ENV, &self.state_dir);
        cmd
    }

    /// The `-o` value: `cache_dir=<ours>` followed by `extra`.
    pub fn mount_options(&self, extra: &[&str]) -> String {
        let mut opts = vec![format!("cache_dir={}", self.cache_dir.display())];
        opts.extend(extra.iter().map(|s| s.to_string()));
        opts.join(",")
    }

    /// `erofs-mount -t erofs.fanotify -o cache_dir=...,EXTRA SOURCE MOUNTPOINT`
    pub fn mount_command(&self, source: &str, mountpoint: &Path, extra: &[&str]) -> Command {
        let mut cmd = self.command(EROFS_MOUNT);
        cmd.args([
            "-t",
            "erofs.fanotify",
            "-o",
            &self.mount_options(extra),
            source,
        ])
        .arg(mountpoint);
        cmd
    }

    /// `erofs-mount -t erofs.fanotify -o OPTIONS SOURCE MOUNTPOINT` with exactly `options` (no cache_dir added).
    pub fn mount_command_raw(&self, source: &str, mountpoint: &Path, options: &str) -> Command {
        let mut cmd = self.command(EROFS_MOUNT);
        cmd.args(["-t", "erofs.fanotify", "-o", options, source])
            .arg(mountpoint);
        cmd
    }

    /// Runs erofs-mount and returns what happened (success or not).
    pub fn try_mount(&self, source: &str, mountpoint: &Path, extra: &[&str]) -> Outcome {
        self.try_mount_with(source, mountpoint, extra, |_| {})
    }

    /// `try_mount` with the command adjusted by `configure` first (environment variables, ...).
    pub fn try_mount_with(
        &self,
        source: &str,
        mountpoint: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Outcome {
        let mut cmd = self.mount_command(source, mountpoint, extra);
        configure(&mut cmd);
        cmd::run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// Mounts `source` on `<root>/<mountpoint_name>` and returns the guard; panics if the mount fails.
    pub fn mount(&self, source: &str, mountpoint_name: &str, extra: &[&str]) -> Mounted {
        self.mount_with(source, mountpoint_name, extra, |_| {})
    }

    /// `mount` with the command adjusted by `configure` first (environment variables, ...).
    pub fn mount_with(
        &self,
        source: &str,
        mountpoint_name: &str,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Mounted {
        let mountpoint = self.mountpoint(mountpoint_name);
        let outcome = self.try_mount_with(source, &mountpoint, extra, configure);
        let mut mounted = Mounted {
            mountpoint: mountpoint.clone(),
            state_dir: self.state_dir.clone(),
            agent_pid: None,
            mnt_id: None,
            released: false,
        };
        outcome.assert_success();
        assert!(
            is_mounted(&mountpoint),
            "erofs-mount exited 0 but nothing is mounted on {}: {}",
            mountpoint.display(),
            outcome.describe()
        );
        let status = mounted.status();
        mounted.agent_pid = Some(status.agent_pid);
        mounted.mnt_id = Some(status.mnt_id);
        eprintln!(
            "mounted {source} on {} in {:.1?}: {status:?}",
            mountpoint.display(),
            outcome.elapsed
        );
        mounted
    }

    /// `erofs-umount [args]`
    pub fn umount(&self, args: &[&str]) -> Outcome {
        cmd::run(self.command(EROFS_UMOUNT).args(args), COMMAND_TIMEOUT)
    }

    /// `erofs-fanotify status --json` for this env's state dir.
    pub fn status(&self) -> Vec<MountStatus> {
        status_json(&self.state_dir)
    }

    /// Record files (`<state>/mounts/*.json`).
    pub fn records(&self) -> Vec<PathBuf> {
        record_files(&self.state_dir)
    }

    /// Live processes of our binaries that belong to this env (see module docs).
    pub fn agents(&self) -> Vec<i32> {
        // The trailing slash keeps `name-1` from matching `name-10`; the state dir is matched whole (it is
        // the value of EROFS_FANOTIFY_STATE_DIR in the environment).
        let mut pids = processes_mentioning(&format!("{}/", self.root.display()));
        pids.extend(processes_mentioning(&format!(
            "={}\0",
            self.state_dir.display()
        )));
        pids.extend(processes_mentioning(&format!(
            "{}/",
            self.state_dir.display()
        )));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Mounts (as seen from this namespace) at or below this env's root.
    pub fn mounts(&self) -> Vec<String> {
        let root = self.root.to_string_lossy().into_owned();
        mountinfo()
            .into_iter()
            .filter(|m| m.mountpoint == root || m.mountpoint.starts_with(&format!("{root}/")))
            .map(|m| format!("{} ({})", m.mountpoint, m.fstype))
            .collect()
    }

    /// Waits until this env has no agent process, no record and no mount of ours; panics otherwise.
    /// `allowed_mounts` are mountpoints the test made itself (a tmpfs, a foreign erofs) and keeps.
    pub fn assert_nothing_left(&self, allowed_mounts: &[&Path]) {
        self.assert_nothing_left_within(Duration::from_secs(3), allowed_mounts)
    }

    /// `assert_nothing_left` with an explicit grace period.
    pub fn assert_nothing_left_within(&self, grace: Duration, allowed_mounts: &[&Path]) {
        let allowed: BTreeSet<String> = allowed_mounts
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let leftovers = || {
            let mut left = Vec::new();
            let records = self.records();
            if !records.is_empty() {
                left.push(format!("records {records:?}"));
            }
            let agents = self.agents();
            if !agents.is_empty() {
                left.push(format!(
                    "processes {:?}",
                    agents
                        .iter()
                        .map(|p| describe_process(*p))
                        .collect::<Vec<_>>()
                ));
            }
            let mounts: Vec<String> = self
                .mounts()
                .into_iter()
                .filter(|m| !allowed.iter().any(|a| m.starts_with(&format!("{a} ("))))
                .collect();
            if !mounts.is_empty() {
                left.push(format!("mounts {mounts:?}"));
            }
            left
        };
        if !super::wait::poll_until(grace, || leftovers().is_empty()) {
            panic!(
                "left behind in {}: {}",
                self.root.display(),
                leftovers().join("; ")
            );
        }
    }

    /// Regular files (at any depth) in the cache dir.
    pub fn cache_files(&self) -> Vec<PathBuf> {
        super::tree::list_files(&self.cache_dir)
    }

    /// Paths in the cache dir whose name mentions `hex` (a blob digest).
    pub fn cache_entries_for(&self, hex: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        fn walk(dir: &Path, hex: &str, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().contains(hex) {
                    out.push(entry.path());
                }
                if entry
                    .path()
                    .symlink_metadata()
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                {
                    walk(&entry.path(), hex, out);
                }
            }
        }
        walk(&self.cache_dir, hex, &mut out);
        out
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let recorded = recorded_agents(&self.state_dir);
        // The code under test first; `run` panics on a timeout, which must not abort teardown.
        let state_dir = self.state_dir.clone();
        let _ = std::panic::catch_unwind(move || {
            let mut cmd = Command::new(EROFS_UMOUNT);
            cmd.env(STATE_DIR_ENV, &state_dir).arg("--all");
            cmd::run(&mut cmd, Duration::from_secs(30)).success()
        });
        for m in self.mounts() {
            let path = m.rsplit_once(" (").map(|(p, _)| p.to_string()).unwrap_or(m);
            eprintln!("teardown: detaching leftover mount {path}");
            detach(Path::new(&path));
        }
        let mut pids: BTreeSet<i32> = recorded.into_iter().collect();
        pids.extend(self.agents());
        for pid in pids {
            if super::wait::poll_until(GONE_TIMEOUT, || !agent_alive(pid)) {
                continue;
            }
            eprintln!(
                "teardown: killing leftover process {}",
                describe_process(pid)
            );
            cmd::signal(pid, nix::sys::signal::Signal::SIGKILL);
            super::wait::poll_until(Duration::from_secs(5), || !agent_alive(pid));
        }
        for dir in [&self.root, &self.state_dir] {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("teardown: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// A mount made through erofs-mount; unmounts on drop (see module docs for the fallbacks).
pub struct Mounted {
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    /// From status right after mounting.
    pub agent_pid: Option<i32>,
    pub mnt_id: Option<u64>,
    released: bool,
}

impl Mounted {
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn agent_pid(&self) -> i32 {
        self.agent_pid.expect("agent pid known after mount")
    }

    /// This mount's entry of `erofs-fanotify status --json` (matched by mount id, else by mountpoint).
    pub fn status(&self) -> MountStatus {
        let all = status_json(&self.state_dir);
        let mountpoint = self.mountpoint.to_string_lossy();
        all.iter()
            .find(|s| Some(s.mnt_id) == self.mnt_id)
            .or_else(|| all.iter().find(|s| s.mountpoint == mountpoint))
            .cloned()
            .unwrap_or_else(|| panic!("status has no entry for {mountpoint}: {all:?}"))
    }

    /// Runs `erofs-umount MOUNTPOINT`; the guard is then done (whatever the outcome, which is returned).
    pub fn unmount(mut self) -> Outcome {
        self.released = true;
        let mut cmd = Command::new(EROFS_UMOUNT);
        cmd.env(STATE_DIR_ENV, &self.state_dir)
            .arg(&self.mountpoint);
        cmd::run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// The test took the mount down another way (plain umount, --all): nothing to do on drop.
    pub fn forget(mut self) {
        self.released = true;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.released || !is_mounted(&self.mountpoint) {
            return;
        }
        let mut cmd = Command::new(EROFS_UMOUNT);
        cmd.env(STATE_DIR_ENV, &self.state_dir)
            .arg(&self.mountpoint);
        let cmd_result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            cmd::run(&mut cmd, Duration::from_secs(30))
        }));
        if !matches!(&cmd_result, Ok(o) if o.success()) || is_mounted(&self.mountpoint) {
            eprintln!(
                "teardown: erofs-umount {} did not work; detaching",
                self.mountpoint.display()
            );
            detach(&self.mountpoint);
            if let Some(pid) = self.agent_pid {
                if !super::wait::poll_until(GONE_TIMEOUT, || !agent_alive(pid)) {
                    eprintln!("teardown: killing agent {}", describe_process(pid));
                    cmd::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// `umount2(path, MNT_DETACH)`, repeated while something is still mounted there (stacked mounts).
pub fn detach(path: &Path) {
    for _ in 0..8 {
        if !is_mounted(path) {
            return;
        }
        if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("umount2({}, MNT_DETACH): {e}", path.display());
            return;
        }
    }
}

/// Parses `erofs-fanotify status --json` run with `EROFS_FANOTIFY_STATE_DIR=state_dir`.
pub fn status_json(state_dir: &Path) -> Vec<MountStatus> {
    let mut cmd = Command::new(EROFS_FANOTIFY);
    cmd.env(STATE_DIR_ENV, state_dir).args(["status", "--json"]);
    let outcome = cmd::run(&mut cmd, Duration::from_secs(30));
    outcome.assert_success();
    serde_json::from_slice(&outcome.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not an array of mount objects ({e}): {}",
            outcome.describe()
        )
    })
}

pub fn record_files(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("mounts")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// `agent_pid`s named in the record files (whatever else their schema holds).
fn recorded_agents(state_dir: &Path) -> Vec<i32> {
    record_files(state_dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| v.get("agent_pid").and_then(|p| p.as_i64()))
        .map(|p| p as i32)
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn agent_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

pub fn describe_process(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    format!("{pid} {:?}", cmdline.join(" "))
}

/// Live processes running one of our binaries whose environment or command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let ours: Vec<PathBuf> = [EROFS_MOUNT, EROFS_UMOUNT, EROFS_FANOTIFY]
        .iter()
        .map(|b| std::fs::canonicalize(b).unwrap_or_else(|_| PathBuf::from(b)))
        .collect();
    let needle = needle.as_bytes();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        if !ours.iter().any(|o| Path::new(&exe) == o) {
            continue;
        }
        let mentions = |file: &str| {
            std::fs::read(entry.path().join(file))
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        };
        if (mentions("environ") || mentions("cmdline")) && agent_alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mnt_id: u64,
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
}

/// This namespace's mounts from /proc/self/mountinfo (octal escapes decoded).
pub fn mountinfo() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                mnt_id: fields.first()?.parse().ok()?,
                mountpoint: unescape(fields.get(4)?),
                fstype: right.first()?.to_string(),
                source: unescape(right.get(1)?),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(path: &Path) -> bool {
    let path = path.to_string_lossy();
    mountinfo().iter().any(|m| m.mountpoint == path)
}

/// The filesystem type mounted at `path` (topmost), if any.
pub fn fstype_at(path: &Path) -> Option<String> {
    let path = path.to_string_lossy();
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .map(|m| m.fstype)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Mounts a tmpfs on `path` (for the "cache dir on tmpfs" and "not our mount" cases).
pub fn mount_tmpfs(path: &Path) {
    std::fs::create_dir_all(path).expect("tmpfs mountpoint");
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m"),
    )
    .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", path.display()));
}

/// Mounts an EROFS image file directly (file-backed, no loop device, no fanotify): a plain kernel mount.
pub fn mount_erofs_file(image: &Path, path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).expect("erofs mountpoint");
    let source = CString::new(image.as_os_str().as_bytes()).expect("path");
    let target = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid NUL-terminated strings; NULL data is allowed for erofs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"erofs".as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount -t erofs {} {}: {}",
            image.display(),
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Unmounts (detaches) on drop a mount the test made itself.
pub struct PlainMount(pub PathBuf);

impl Drop for PlainMount {
    fn drop(&mut self) {
        detach(&self.0);
    }
}
