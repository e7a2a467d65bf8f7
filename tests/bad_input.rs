//! Bad input: each case must exit non-zero with exactly one line on stderr that names the cause, and leave
//! nothing behind — no record, no agent process, no cache entry, no mount.
//!
//! The cause is matched by keywords (any of a few, case-insensitive) after a leading program-name/"error:"
//! prefix is stripped, so a prefix like "erofs-mount:" cannot satisfy the "erofs" keyword by itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::{self, Outcome};
use common::env::{is_mounted, mount_erofs_file, mount_tmpfs, PlainMount};
use common::fixtures::{self, random_bytes};
use common::registry::{self, closed_port, shared_blob, shared_blob_bytes};
use common::tree::list_files;
use common::{
    ready, TestEnv, COMMAND_TIMEOUT, EROFS_FANOTIFY, EROFS_MOUNT, EROFS_UMOUNT, STATE_DIR_ENV,
};

/// The stderr line without a leading `erofs-mount:` / `error:` style prefix, lower-cased.
fn cause(line: &str) -> String {
    let mut rest = line.trim();
    loop {
        let lower = rest.to_ascii_lowercase();
        let prefix = [
            "erofs-mount:",
            "erofs-umount:",
            "erofs-fanotify:",
            "mount.erofs.fanotify:",
            "error:",
            "fatal:",
        ]
        .into_iter()
        .find(|p| lower.starts_with(p));
        match prefix {
            Some(p) => rest = rest[p.len()..].trim_start(),
            None => return lower,
        }
    }
}

/// Non-zero exit, exactly one stderr line containing one of `keywords`.
fn assert_one_line_failure(outcome: &Outcome, keywords: &[&str]) {
    assert!(
        !outcome.success(),
        "expected a failure: {}",
        outcome.describe()
    );
    let lines = outcome.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr: {}",
        outcome.describe()
    );
    let cause = cause(lines[0]);
    assert!(
        keywords
            .iter()
            .any(|k| cause.contains(&k.to_ascii_lowercase())),
        "the error line does not name the cause (wanted one of {keywords:?}): {:?}",
        lines[0]
    );
}

/// A failed mount left nothing: no record, agent, mount or cache files (nor anything named after the blob).
fn assert_failed_mount_left_nothing(
    env: &TestEnv,
    mountpoint: &Path,
    digest_hex: Option<&str>,
    allowed: &[&Path],
) {
    assert!(
        !is_mounted(mountpoint),
        "{} is mounted after a failed mount",
        mountpoint.display()
    );
    env.assert_nothing_left(allowed);
    let files = env.cache_files();
    assert!(
        files.is_empty(),
        "a failed mount left cache files: {files:?}"
    );
    if let Some(hex) = digest_hex {
        let entries = env.cache_entries_for(hex);
        assert!(
            entries.is_empty(),
            "a failed mount left cache entries: {entries:?}"
        );
    }
}

fn mount_fails_cleanly(env: &TestEnv, source: &str, keywords: &[&str], digest_hex: Option<&str>) {
    let mountpoint = env.mountpoint("mnt");
    let outcome = env.try_mount(source, &mountpoint, &[]);
    assert_one_line_failure(&outcome, keywords);
    assert_failed_mount_left_nothing(env, &mountpoint, digest_hex, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn blob_that_is_not_erofs() {
    if !ready() {
        return;
    }
    let blob = shared_blob_bytes("test/garbage", &random_bytes(99, 2 * 1024 * 1024));
    let env = TestEnv::new("not-erofs");
    mount_fails_cleanly(
        &env,
        &blob.url,
        &["erofs", "magic", "superblock"],
        Some(blob.hex()),
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn blob_url_that_is_404() {
    if !ready() {
        return;
    }
    let hex = registry::sha256_hex(b"never pushed");
    let url = registry::shared().blob_url("test/images", &format!("sha256:{hex}"));
    let env = TestEnv::new("404");
    mount_fails_cleanly(&env, &url, &["404", "not found", "unknown"], Some(&hex));
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn unreachable_host() {
    if !ready() {
        return;
    }
    let hex = fixtures::small()
        .plain
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    let url = format!(
        "http://127.0.0.1:{}/v2/test/images/blobs/sha256:{hex}",
        closed_port()
    );
    let env = TestEnv::new("unreachable");
    mount_fails_cleanly(
        &env,
        &url,
        &["connect", "refused", "unreachable"],
        Some(&hex),
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn cache_dir_on_tmpfs() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("tmpfs-cache");
    let tmpfs = env.root.join("tmpfs-cache");
    mount_tmpfs(&tmpfs);
    let _tmpfs = PlainMount(tmpfs.clone());
    let mountpoint = env.mountpoint("mnt");
    let options = format!("cache_dir={}", tmpfs.display());
    let outcome = cmd::run(
        &mut env.mount_command_raw(&blob.url, &mountpoint, &options),
        COMMAND_TIMEOUT,
    );
    assert_one_line_failure(&outcome, &["tmpfs"]);
    assert_failed_mount_left_nothing(&env, &mountpoint, Some(blob.hex()), &[&tmpfs]);
    let left = list_files(&tmpfs);
    assert!(
        left.is_empty(),
        "files left in the tmpfs cache dir: {left:?}"
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn missing_mountpoint() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("no-mountpoint");
    let mountpoint = env.root.join("does-not-exist");
    let outcome = env.try_mount(&blob.url, &mountpoint, &[]);
    assert_one_line_failure(
        &outcome,
        &[
            "mountpoint",
            "mount point",
            "no such file",
            "does not exist",
            "not exist",
            "not found",
        ],
    );
    assert!(
        !mountpoint.exists(),
        "erofs-mount created the missing mountpoint"
    );
    assert_failed_mount_left_nothing(&env, &mountpoint, Some(blob.hex()), &[]);
}

/// The binaries, runnable by uid 65534: used in place when every directory on the way lets others in,
/// otherwise copied (all three, since one may start another from its own directory).
fn binaries_for_nobody(env: &TestEnv) -> PathBuf {
    let mount = Path::new(EROFS_MOUNT);
    let probe = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "test",
            "-x",
        ])
        .arg(mount)
        .status()
        .expect("setpriv");
    if probe.success() {
        return mount.to_path_buf();
    }
    let dir = env.root.join("bin");
    std::fs::create_dir_all(&dir).expect("bin dir");
    for bin in [EROFS_MOUNT, EROFS_UMOUNT, EROFS_FANOTIFY] {
        let target = dir.join(Path::new(bin).file_name().expect("name"));
        std::fs::copy(bin, &target).expect("copy binary");
    }
    dir.join("erofs-mount")
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn non_root_caller() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("non-root");
    let mountpoint = env.mountpoint("mnt");
    let binary = binaries_for_nobody(&env);
    let outcome = cmd::run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(binary)
            .args([
                "-t",
                "erofs.fanotify",
                "-o",
                &env.mount_options(&[]),
                &blob.url,
            ])
            .arg(&mountpoint)
            .env(STATE_DIR_ENV, &env.state_dir),
        COMMAND_TIMEOUT,
    );
    assert_one_line_failure(
        &outcome,
        &[
            "root",
            "permission",
            "privilege",
            "cap_sys_admin",
            "not permitted",
            "eperm",
        ],
    );
    assert_failed_mount_left_nothing(&env, &mountpoint, Some(blob.hex()), &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn erofs_umount_refuses_mounts_that_are_not_ours() {
    if !ready() {
        return;
    }
    let env = TestEnv::new("not-ours");
    let keywords = ["not", "no erofs-fanotify", "unknown"];

    // A tmpfs.
    let tmpfs = env.root.join("foreign-tmpfs");
    mount_tmpfs(&tmpfs);
    let _tmpfs = PlainMount(tmpfs.clone());
    assert_one_line_failure(&env.umount(&[tmpfs.to_str().expect("utf-8")]), &keywords);
    assert!(
        is_mounted(&tmpfs),
        "erofs-umount took down a tmpfs that is not its own"
    );

    // A plain EROFS mount of an image file (same filesystem type, not managed by us).
    let erofs = env.root.join("foreign-erofs");
    mount_erofs_file(&fixtures::small().plain.path, &erofs).expect("plain erofs mount");
    let _erofs = PlainMount(erofs.clone());
    assert_one_line_failure(&env.umount(&[erofs.to_str().expect("utf-8")]), &keywords);
    assert!(
        is_mounted(&erofs),
        "erofs-umount took down an EROFS mount that is not its own"
    );

    // A directory with nothing mounted on it, and a path that does not exist.
    let plain_dir = env.mountpoint("plain-dir");
    assert_one_line_failure(
        &env.umount(&[plain_dir.to_str().expect("utf-8")]),
        &keywords,
    );
    let missing = env.root.join("missing");
    assert_one_line_failure(
        &env.umount(&[missing.to_str().expect("utf-8")]),
        &["not", "no such file", "does not exist", "unknown"],
    );

    env.assert_nothing_left(&[&tmpfs, &erofs]);
}
