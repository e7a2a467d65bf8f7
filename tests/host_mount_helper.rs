//! mount(8) integration: `mount -t erofs.fanotify ...` and an fstab line go through the
//! `/sbin/mount.erofs.fanotify` helper (a link to the built `erofs-mount`, installed by the test and removed
//! afterwards even on failure), and a plain `umount` (no umount helper: the kernel type is erofs) leaves no
//! agent and no record. mount(8) keeps the caller's environment when run by root, so the test's private
//! `EROFS_FANOTIFY_STATE_DIR` reaches the helper; the status check below proves it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd;
use common::env::is_mounted;
use common::fixtures;
use common::oci::{push_single, reference, OciEnv};
use common::registry;
use common::tree::assert_tree_identical;
use common::{ready, COMMAND_TIMEOUT, EROFS_MOUNT, GONE_TIMEOUT, STATE_DIR_ENV};

const HELPER_PATH: &str = "/sbin/mount.erofs.fanotify";

/// Installs the helper link; on drop removes it and puts back whatever was there before.
struct HelperLink {
    backup: Option<PathBuf>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let path = Path::new(HELPER_PATH);
        let backup = if std::fs::symlink_metadata(path).is_ok() {
            let aside = PathBuf::from(format!("{HELPER_PATH}.test-backup-{}", std::process::id()));
            std::fs::rename(path, &aside).expect("move the existing helper aside");
            Some(aside)
        } else {
            None
        };
        std::os::unix::fs::symlink(EROFS_MOUNT, path).expect("install the helper link");
        HelperLink { backup }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER_PATH);
        if let Some(aside) = self.backup.take() {
            let _ = std::fs::rename(aside, HELPER_PATH);
        }
    }
}

fn mount_cmd(env: &OciEnv) -> Command {
    let mut cmd = Command::new("mount");
    env.isolate(&mut cmd);
    cmd.env(STATE_DIR_ENV, &env.state_dir);
    cmd
}

/// Checks the mount is ours (status lists it), compares the tree, unmounts with plain umount(8).
fn check_and_plain_umount(env: &OciEnv, mountpoint: &Path, tree: &Path) {
    assert!(is_mounted(mountpoint), "nothing mounted on {}", mountpoint.display());
    let status = env.status();
    assert!(
        status.iter().any(|s| Path::new(&s.mountpoint) == mountpoint),
        "status (with the test's state dir) does not list {}: {status:?}",
        mountpoint.display()
    );
    assert_tree_identical(tree, mountpoint);
    cmd::run(Command::new("umount").arg(mountpoint), COMMAND_TIMEOUT).assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn mount_helper_fstab_and_plain_umount() {
    if !ready() {
        return;
    }
    let fixture = fixtures::small();
    let pushed = push_single(registry::shared(), "test/helper", "v1", &fixture.plain.path);
    let image = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("host-helper");
    let mountpoint = env.mountpoint("mnt");
    let _helper = HelperLink::install();

    // 1. mount -t erofs.fanotify -o ... SOURCE DIR
    let opts = format!("oci.insecure,_netdev,{}", env.mount_options(&[]));
    let outcome = cmd::run(
        mount_cmd(&env).args(["-t", "erofs.fanotify", "-o", &opts, &image]).arg(&mountpoint),
        COMMAND_TIMEOUT,
    );
    outcome.assert_success();
    eprintln!("mount -t erofs.fanotify took {:.1?}", outcome.elapsed);
    check_and_plain_umount(&env, &mountpoint, &fixture.tree);

    // 2. an fstab line with options mount(8) and systemd handle themselves, in a private fstab file.
    let fstab = env.root.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{image} {} erofs.fanotify noauto,_netdev,nofail,x-systemd.automount,x-systemd.requires=network-online.target,oci.insecure,{} 0 0\n",
            mountpoint.display(),
            env.mount_options(&[])
        ),
    )
    .expect("write fstab");
    // --fake goes through the helper with -f: nothing may be mounted or started.
    cmd::run(mount_cmd(&env).arg("--fake").arg("-T").arg(&fstab).arg(&mountpoint), COMMAND_TIMEOUT)
        .assert_success();
    assert!(!is_mounted(&mountpoint), "mount --fake mounted something");
    env.assert_nothing_left(&[]);

    let outcome = cmd::run(mount_cmd(&env).arg("-T").arg(&fstab).arg(&mountpoint), COMMAND_TIMEOUT);
    outcome.assert_success();
    check_and_plain_umount(&env, &mountpoint, &fixture.tree);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn helper_reports_bad_options_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let env = OciEnv::new("host-helper-bad");
    let mountpoint = env.mountpoint("mnt");
    let helper_dir = env.root.join("bin");
    std::fs::create_dir_all(&helper_dir).expect("bin dir");
    let helper = helper_dir.join("mount.erofs.fanotify");
    std::os::unix::fs::symlink(EROFS_MOUNT, &helper).expect("helper link");
    // Called directly with the helper convention (no need for the system path here).
    let mut cmd = Command::new(&helper);
    cmd.env(STATE_DIR_ENV, &env.state_dir)
        .arg("127.0.0.1:1/none:v1")
        .arg(&mountpoint)
        .args(["-n", "-o", "rw,no_such_option=1"]);
    let outcome = cmd::run(&mut cmd, COMMAND_TIMEOUT);
    assert!(!outcome.success(), "bad option accepted: {}", outcome.describe());
    assert!(outcome.stderr.contains("no_such_option"), "{}", outcome.describe());
    assert!(outcome.stderr.starts_with("mount.erofs.fanotify:"), "{}", outcome.describe());
    env.assert_nothing_left(&[]);
}
