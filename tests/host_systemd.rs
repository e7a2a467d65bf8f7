//! systemd integration: the units in contrib/systemd pass `systemd-analyze verify` (with the binaries'
//! install path pointed at the built ones), and `erofs-mount --foreground` (the unit's `Type=notify`
//! ExecStart) sends `READY=1` on `$NOTIFY_SOCKET` (a path, or an abstract name starting with '@') once the
//! mount stands, then stays until the mount is gone and exits 0.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::env::is_mounted;
use common::oci::{push_single, reference, tiny_image, OciEnv};
use common::registry;
use common::tree::assert_tree_identical;
use common::{cmd, ready, COMMAND_TIMEOUT, EROFS_FANOTIFY, GONE_TIMEOUT};

const UNITS: &[&str] = &[
    "erofs-fanotify-mount@.service",
    "erofs-fanotify-metrics.service",
    "erofs-fanotify-metrics.timer",
    "mnt-images-app.mount.example",
];

#[test]
#[ignore = "needs systemd-analyze"]
fn units_pass_systemd_analyze_verify() {
    if !common::require(&[common::Need::SystemdAnalyze]) {
        return;
    }
    let bin_dir = Path::new(EROFS_FANOTIFY).parent().expect("bin dir").display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut files = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(src.join(unit)).unwrap_or_else(|e| panic!("{unit}: {e}"));
        let text = text.replace("/usr/local/bin", &bin_dir);
        // A template is verified through an instance; the example .mount under its real name.
        let name = unit.replace("@.service", "@mnt-images-app.service").replace(".mount.example", ".mount");
        std::fs::write(dir.path().join(&name), text).expect("write unit");
        files.push(dir.path().join(name));
    }
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&files).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    // Parse problems are only warnings (exit 0): none allowed.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify complained: {stderr}");
}

fn foreground_mount_notifies(env: &OciEnv, image_ref: &str, tree: &Path, abstract_socket: bool) {
    let mountpoint = env.mountpoint("mnt");
    let (socket, notify_env) = if abstract_socket {
        let name = format!("erofs-fanotify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract addr");
        (UnixDatagram::bind_addr(&addr).expect("bind abstract"), format!("@{name}"))
    } else {
        let path = env.root.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        (UnixDatagram::bind(&path).expect("bind notify socket"), path.display().to_string())
    };
    socket.set_read_timeout(Some(COMMAND_TIMEOUT)).expect("timeout");
    let log = std::fs::File::create(env.root.join("foreground.log")).expect("log");
    let mut cmd = env.mount_command(image_ref, &mountpoint, &["oci.insecure"]);
    env.isolate(&mut cmd);
    let mut child = cmd
        .arg("--foreground")
        .env("NOTIFY_SOCKET", &notify_env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn erofs-mount --foreground");
    let mut buf = [0u8; 4096];
    let received = socket.recv(&mut buf);
    let message = match received {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => {
            let _ = child.kill();
            panic!("no notification on {notify_env}: {e}");
        }
    };
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(is_mounted(&mountpoint), "READY=1 before the mount stands");
    assert_tree_identical(tree, &mountpoint);
    assert!(child.try_wait().expect("try_wait").is_none(), "the foreground process left while mounted");

    cmd::run(env.command(common::EROFS_UMOUNT).arg(&mountpoint), COMMAND_TIMEOUT).assert_success();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > GONE_TIMEOUT {
            let _ = child.kill();
            panic!("erofs-mount --foreground did not exit after the umount");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "erofs-mount --foreground exited with {status}");
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn foreground_mount_sends_sd_notify_ready() {
    if !ready() {
        return;
    }
    let img = tiny_image("sd-notify");
    let pushed = push_single(registry::shared(), "test/sd-notify", "v1", &img.image.path);
    let image_ref = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("host-sd-notify");
    foreground_mount_notifies(&env, &image_ref, &img.tree, false);
    foreground_mount_notifies(&env, &image_ref, &img.tree, true);
}
