//! Prerequisite checks. Every test that needs root, the kernel features or a tool is marked
//! `#[ignore = "needs ..."]`, so a plain `cargo test` reports it as ignored instead of passing it; `.ci/run`
//! runs them with `--include-ignored`. Such a test starts with `if !common::ready() { return; }` (or
//! `require(&[...])` for the few that need less): run by hand on a machine without a piece, it prints
//! `SKIPPED: <reason>` — unless the environment says `CI=true` (or `1`), where a missing prerequisite is a
//! failure: CI must run every test, never silently skip one. This is the one place that reads `CI`.

use std::ffi::CString;
use std::path::Path;
use std::sync::OnceLock;

/// One thing a test may need from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// euid 0 (mounting, fanotify, chown in fixtures).
    Root,
    /// `mkfs.erofs` (erofs-utils) to build the images.
    MkfsErofs,
    /// Debian's `docker-registry` binary.
    Registry,
    /// util-linux / attr tools the tests run: unshare, setpriv, umount, setfattr.
    Tools,
    /// The kernel knows EROFS and offers fanotify pre-content events (FAN_PRE_ACCESS) on /var/tmp.
    Kernel,
    /// The OCI auth tests' tools: `htpasswd` (bcrypt files) and `openssl` (token server keys and JWTs).
    /// Not part of `ALL`: only the OCI tests ask for it (`oci_ready()`).
    OciTools,
    /// An OCI runtime and a static busybox for a container's rootfs (the hook tests).
    Runc,
    /// `systemd-analyze` (verifying the units in contrib/systemd).
    SystemdAnalyze,
}

pub const ALL: &[Need] = &[
    Need::Root,
    Need::MkfsErofs,
    Need::Registry,
    Need::Tools,
    Need::Kernel,
];

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Everything the mount tests need.
pub fn ready() -> bool {
    require(ALL)
}

/// Everything the OCI tests need: `ready()` plus htpasswd and openssl.
pub fn oci_ready() -> bool {
    let mut needs = ALL.to_vec();
    needs.push(Need::OciTools);
    require(&needs)
}

/// True when every need is met. Otherwise prints why and returns false, or panics under `CI=true`.
pub fn require(needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|need| check(*need).err()).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if in_ci() {
        panic!("a prerequisite is missing and CI=true forbids skipping: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn check(need: Need) -> Result<(), String> {
    static CACHE: OnceLock<Vec<(Need, Result<(), String>)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| ALL.iter().map(|n| (*n, probe(*n))).collect());
    all.iter()
        .find(|(n, _)| *n == need)
        .map(|(_, r)| r.clone())
        .unwrap_or_else(|| probe(need))
}

fn probe(need: Need) -> Result<(), String> {
    match need {
        Need::Root => {
            if nix::unistd::geteuid().is_root() {
                Ok(())
            } else {
                Err("not running as root (the tests mount filesystems and use fanotify)".into())
            }
        }
        Need::MkfsErofs => find_tool("mkfs.erofs", "erofs-utils"),
        Need::Registry => {
            if Path::new(REGISTRY_BIN).exists() {
                Ok(())
            } else {
                Err(format!(
                    "{REGISTRY_BIN} missing (apt-get install docker-registry)"
                ))
            }
        }
        Need::Tools => {
            for (tool, package) in [
                ("unshare", "util-linux"),
                ("setpriv", "util-linux"),
                ("umount", "mount"),
                ("setfattr", "attr"),
            ] {
                find_tool(tool, package)?;
            }
            Ok(())
        }
        Need::Kernel => probe_kernel(),
        Need::OciTools => {
            find_tool("htpasswd", "apache2-utils")?;
            find_tool("openssl", "openssl")
        }
        Need::Runc => {
            find_tool("runc", "runc")?;
            if Path::new("/bin/busybox").exists() {
                Ok(())
            } else {
                Err("/bin/busybox missing (apt-get install busybox-static)".into())
            }
        }
        Need::SystemdAnalyze => find_tool("systemd-analyze", "systemd"),
    }
}

fn find_tool(tool: &str, package: &str) -> Result<(), String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"]);
    for dir in dirs {
        if Path::new(dir).join(tool).exists() {
            return Ok(());
        }
    }
    Err(format!("{tool} not found (apt-get install {package})"))
}

/// EROFS must be known to the kernel, /var/tmp (where test caches live) must take fanotify marks, and the
/// kernel must accept a FAN_PRE_ACCESS inode mark in a FAN_CLASS_PRE_CONTENT group.
fn probe_kernel() -> Result<(), String> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"))
    {
        // It may be a module not loaded yet; loading it is harmless.
        let _ = std::process::Command::new("modprobe").arg("erofs").status();
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some("erofs"))
        {
            return Err("the kernel has no EROFS support (/proc/filesystems)".into());
        }
    }
    let statfs =
        nix::sys::statfs::statfs("/var/tmp").map_err(|e| format!("statfs /var/tmp: {e}"))?;
    let fs_type = statfs.filesystem_type().0 as i64;
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    if ![EXT4, XFS, BTRFS].contains(&fs_type) {
        return Err(format!(
            "/var/tmp is not on ext4/xfs/btrfs (f_type {fs_type:#x}); test caches live there"
        ));
    }

    const FAN_PRE_ACCESS: u64 = 0x0010_0000;
    // SAFETY: plain syscall with constant arguments; the returned fd is closed below.
    let group = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_PRE_CONTENT | libc::FAN_CLOEXEC,
            (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
        )
    };
    if group < 0 {
        return Err(format!(
            "fanotify_init(FAN_CLASS_PRE_CONTENT) failed: {} (kernel lacks pre-content fanotify?)",
            std::io::Error::last_os_error()
        ));
    }
    let probe_file = tempfile::NamedTempFile::new_in("/var/tmp")
        .map_err(|e| format!("temp file in /var/tmp: {e}"));
    let result = probe_file.and_then(|file| {
        let path = CString::new(file.path().as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: `group` is a valid fanotify fd, `path` a NUL-terminated string alive for the call.
        let rc = unsafe { libc::fanotify_mark(group, libc::FAN_MARK_ADD, FAN_PRE_ACCESS, libc::AT_FDCWD, path.as_ptr()) };
        if rc < 0 {
            Err(format!(
                "fanotify_mark(FAN_PRE_ACCESS) on /var/tmp refused: {} (kernel lacks pre-content events)",
                std::io::Error::last_os_error()
            ))
        } else {
            Ok(())
        }
    });
    // SAFETY: closing the fd we opened above; nothing else uses it. No event can be pending: nobody read the
    // probe file after the mark.
    unsafe { libc::close(group) };
    result
}
