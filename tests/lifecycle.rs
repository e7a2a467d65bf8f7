//! Mount lifecycle: erofs-umount, a plain umount, a mount namespace that exits, two mounts served by one
//! agent, and `erofs-umount --all`. After each, within a few seconds: no agent process, no record, no mount.

mod common;

use std::path::Path;
use std::process::Command;

use common::cmd;
use common::env::{agent_alive, is_mounted};
use common::fixtures;
use common::registry::shared_blob;
use common::tree::assert_same_bytes;
use common::wait::wait_until;
use common::{
    ready, TestEnv, COMMAND_TIMEOUT, EROFS_FANOTIFY, EROFS_MOUNT, GONE_TIMEOUT, STATE_DIR_ENV,
};

fn read_and_compare(mountpoint: &Path, rel: &str) {
    let got = std::fs::read(mountpoint.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
    assert_same_bytes(&fixtures::small().read_source(rel), &got, rel);
}

fn wait_agent_gone(env: &TestEnv, pid: i32, after: &str) {
    wait_until(
        GONE_TIMEOUT,
        &format!("agent {pid} exits after {after}"),
        || !agent_alive(pid),
    );
    wait_until(
        GONE_TIMEOUT,
        &format!("records are removed after {after}"),
        || env.records().is_empty(),
    );
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn erofs_umount_leaves_no_process_mount_or_record() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("umount");
    let m = env.mount(&blob.url, "mnt", &[]);
    let pid = m.agent_pid();
    assert_eq!(
        env.records().len(),
        1,
        "one record per mount: {:?}",
        env.records()
    );
    read_and_compare(&m.mountpoint, "big/text-2m");
    let mountpoint = m.mountpoint.clone();
    m.unmount().assert_success();
    assert!(!is_mounted(&mountpoint), "still mounted after erofs-umount");
    // erofs-umount waits for the agent to persist its bitmap and exit.
    assert!(!agent_alive(pid), "agent {pid} still running when erofs-umount returned");
    assert!(env.records().is_empty(), "record left after erofs-umount: {:?}", env.records());
    wait_agent_gone(&env, pid, "erofs-umount");
    assert!(env.status().is_empty(), "status still lists mounts");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn plain_umount_is_noticed() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("plain-umount");
    let m = env.mount(&blob.url, "mnt", &[]);
    let pid = m.agent_pid();
    read_and_compare(&m.mountpoint, "big/random-3m");
    cmd::run(Command::new("umount").arg(&m.mountpoint), COMMAND_TIMEOUT).assert_success();
    assert!(!is_mounted(&m.mountpoint));
    m.forget();
    wait_agent_gone(&env, pid, "a plain umount");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn mount_namespace_exit_is_noticed() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("mntns");
    let mountpoint = env.mountpoint("mnt");
    let status_file = env.root.join("status-inside.json");
    let rel = "edges/text-65537";
    // Mount and read inside a private mount namespace; the namespace ends when sh exits.
    let script = r#"set -e; "$1" -t erofs.fanotify -o "$2" "$3" "$4"; cat "$4/$5"; "$6" status --json > "$7""#;
    let outcome = cmd::run(
        Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                EROFS_MOUNT,
            ])
            .arg(env.mount_options(&[]))
            .arg(&blob.url)
            .arg(&mountpoint)
            .arg(rel)
            .arg(EROFS_FANOTIFY)
            .arg(&status_file)
            .env(STATE_DIR_ENV, &env.state_dir),
        COMMAND_TIMEOUT,
    );
    outcome.assert_success();
    assert_same_bytes(
        &fx.read_source(rel),
        &outcome.stdout,
        "cat inside the namespace",
    );
    assert!(
        !is_mounted(&mountpoint),
        "the namespace's mount leaked into the host namespace"
    );
    let inside: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status_file).expect("status file"))
            .expect("status json");
    let pid = inside
        .as_array()
        .and_then(|a| a.first())
        .and_then(|s| s.get("agent_pid"))
        .and_then(|p| p.as_i64())
        .unwrap_or_else(|| panic!("no agent_pid in status taken inside the namespace: {inside}"))
        as i32;
    wait_agent_gone(&env, pid, "its mount namespace exited");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn two_mounts_of_one_blob_share_an_agent() {
    if !ready() {
        return;
    }
    let blob = shared_blob(&fixtures::small().plain.path);
    let env = TestEnv::new("two-mounts");
    let first = env.mount(&blob.url, "first", &[]);
    let second = env.mount(&blob.url, "second", &[]);
    let pid = first.agent_pid();
    assert_eq!(second.agent_pid(), pid, "one blob, one agent");
    let status = env.status();
    assert_eq!(status.len(), 2, "{status:?}");
    assert_ne!(status[0].mnt_id, status[1].mnt_id, "{status:?}");

    // `status MOUNTPOINT` narrows to that mount.
    let one = cmd::run(
        env.command(EROFS_FANOTIFY)
            .arg("status")
            .arg(&second.mountpoint)
            .arg("--json"),
        COMMAND_TIMEOUT,
    );
    one.assert_success();
    let one: Vec<serde_json::Value> =
        serde_json::from_slice(&one.stdout).expect("status MOUNTPOINT --json");
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(
        one[0]["mountpoint"],
        second.mountpoint.to_string_lossy().as_ref()
    );

    read_and_compare(&first.mountpoint, "big/random-3m");
    read_and_compare(&second.mountpoint, "big/random-3m");
    let second_mountpoint = second.mountpoint.clone();
    first.unmount().assert_success();
    // The other mount keeps working, also for data nobody has read yet.
    read_and_compare(&second_mountpoint, "big/mixed-odd");
    read_and_compare(&second_mountpoint, "deep/level-00/file.txt");
    assert!(agent_alive(pid), "the agent left while a mount remained");
    assert_eq!(env.status().len(), 1);
    assert_eq!(env.records().len(), 1);
    second.unmount().assert_success();
    wait_agent_gone(&env, pid, "the last mount went away");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn umount_all_takes_down_every_mount_of_its_state_dir_only() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let env = TestEnv::new("umount-all");
    let bystander_env = TestEnv::new("umount-all-bystander");
    let plain = env.mount(&shared_blob(&fx.plain.path).url, "plain", &[]);
    let lz4 = env.mount(&shared_blob(&fx.lz4.path).url, "lz4", &[]);
    let bystander = bystander_env.mount(&shared_blob(&fx.plain.path).url, "mnt", &[]);
    let pids = [plain.agent_pid(), lz4.agent_pid()];
    let mountpoints = [plain.mountpoint.clone(), lz4.mountpoint.clone()];
    plain.forget();
    lz4.forget();

    env.umount(&["--all"]).assert_success();
    for mountpoint in &mountpoints {
        assert!(
            !is_mounted(mountpoint),
            "{} still mounted after --all",
            mountpoint.display()
        );
    }
    for pid in pids {
        wait_agent_gone(&env, pid, "erofs-umount --all");
    }
    // A mount recorded under another state dir is not ours to take down.
    assert!(
        is_mounted(&bystander.mountpoint),
        "--all unmounted a mount of another state dir"
    );
    read_and_compare(&bystander.mountpoint, "big/text-2m");
}
