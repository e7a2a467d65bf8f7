//! OCI runtime hook with a real runtime (Debian's runc): a bundle with a busybox-static rootfs whose
//! config.json carries `erofs-fanotify hook` as createRuntime and poststop hooks and the
//! `org.erofs-fanotify.*` annotations. The container's command checksums every file of the lazily mounted
//! image; the sums must match the source tree; after the container exits nothing of ours is left. A bad
//! annotation fails the container's creation with our message and leaves nothing. Cold (empty cache) and
//! warm (cache kept) runs are timed.
//!
//! Propagation does not matter: the hook attaches the mount inside the container's mount namespace. To
//! show it, the bundle is bind-mounted onto itself as a *private* mount (what containers/storage does
//! with its overlay directory), so nothing mounted below it on the host could reach the container.
//! Runs go through createRuntime (cold and warm) and the older prestart stage. A second test runs the hook
//! by hand for a process that already changed its root, the case of a runtime that pivots before hooks.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::oci::{push_single, reference, tiny_image, OciEnv};
use common::registry::{self, sha256_file};
use common::{cmd, ready, EROFS_FANOTIFY, GONE_TIMEOUT, STATE_DIR_ENV};

const RUNTIME: &str = "runc";
const BUSYBOX: &str = "/bin/busybox";

fn tools_present() -> bool {
    common::require(&[common::Need::Runc])
}

/// The bundle dir bind-mounted on itself and made private; detached on drop.
struct PrivateBundle(PathBuf);

impl PrivateBundle {
    fn new(path: &Path) -> PrivateBundle {
        std::fs::create_dir_all(path).expect("bundle dir");
        for args in [vec!["--bind"], vec!["--make-private"]] {
            let st = Command::new("mount").args(&args).arg(path).args(if args[0] == "--bind" { vec![path] } else { vec![] }).status().expect("mount");
            assert!(st.success(), "mount {args:?} {}", path.display());
        }
        PrivateBundle(path.to_path_buf())
    }
}

impl Drop for PrivateBundle {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn make_rootfs(rootfs: &Path) {
    for d in ["bin", "proc", "dev", "tmp", "data"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("sh link");
}

fn config(env: &OciEnv, annotations: serde_json::Value) -> serde_json::Value {
    config_with_stage(env, annotations, "createRuntime")
}

fn config_with_stage(env: &OciEnv, annotations: serde_json::Value, mount_stage: &str) -> serde_json::Value {
    let hook = |stage: &str| {
        serde_json::json!([{
            "path": EROFS_FANOTIFY,
            "args": ["erofs-fanotify", "hook", "--stage", stage],
            "env": [format!("{STATE_DIR_ENV}={}", env.state_dir.display()), "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "timeout": 120
        }])
    };
    let script = "cd /data/img && /bin/busybox find . -type f | /bin/busybox sort | while read f; do /bin/busybox sha256sum \"$f\"; done";
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "hooked",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "hooks": {mount_stage: hook(mount_stage), "poststop": hook("poststop")},
        "annotations": annotations,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

struct RunResult {
    ok: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn runc_run(env: &OciEnv, bundle: &Path, id: &str) -> RunResult {
    let root = env.root.join("runc-root");
    let mut c = Command::new(RUNTIME);
    c.arg("--root").arg(&root).args(["run", "--bundle"]).arg(bundle).arg(id);
    let out = cmd::run(&mut c, Duration::from_secs(180));
    // Whatever happened, no container state of ours stays with runc.
    let _ = Command::new(RUNTIME).arg("--root").arg(&root).args(["delete", "--force", id]).output();
    RunResult { ok: out.success(), stdout: out.stdout_str(), stderr: out.stderr.clone(), elapsed: out.elapsed }
}

fn expected_sums(tree: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let ft = e.file_type().expect("ft");
            if ft.is_dir() {
                walk(base, &e.path(), out);
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(base).expect("rel").display().to_string();
                out.insert(format!("./{rel}"), sha256_file(&e.path()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(tree, tree, &mut out);
    out
}

fn parse_sums(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(h, p)| (p.to_string(), h.trim_start_matches("sha256:").to_string())))
        .collect()
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + runc + busybox-static"]
fn runc_container_reads_hook_mounted_image() {
    if !ready() || !tools_present() {
        return;
    }
    let img = tiny_image("oci-hook");
    let pushed = push_single(registry::shared(), "test/oci-hook", "v1", &img.image.path);
    let image_ref = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("host-hook");
    let bundle_path = env.root.join("bundle");
    let bundle = PrivateBundle::new(&bundle_path);
    make_rootfs(&bundle_path.join("rootfs"));
    let annotations = serde_json::json!({
        "org.erofs-fanotify.image": image_ref,
        "org.erofs-fanotify.target": "/data/img",
        "org.erofs-fanotify.options": format!("oci.insecure,cache_dir={}", env.cache_dir.display()),
    });
    let expected = expected_sums(&img.tree);
    let allowed = [bundle.0.as_path()];

    let mut times = Vec::new();
    for (run, (label, stage)) in [("cold", "createRuntime"), ("warm", "createRuntime"), ("prestart", "prestart")].iter().enumerate() {
        std::fs::write(bundle_path.join("config.json"), config_with_stage(&env, annotations.clone(), stage).to_string()).expect("config");
        let result = runc_run(&env, &bundle_path, &format!("eft-hook-{}-{run}", std::process::id()));
        assert!(result.ok, "{label} run failed: {}\n{}", result.stderr, result.stdout);
        let sums = parse_sums(&result.stdout);
        assert_eq!(sums, expected, "checksums inside the container differ ({label})\nstderr: {}", result.stderr);
        env.assert_nothing_left_within(GONE_TIMEOUT, &allowed);
        assert_no_hook_records(&env);
        eprintln!("{label} container run (hook mount + read {} files + poststop): {:.0?}", sums.len(), result.elapsed);
        times.push(result.elapsed);
    }
    eprintln!("HOOK TIMES runtime={RUNTIME}: cold {:.0?}, warm {:.0?}, prestart {:.0?}", times[0], times[1], times[2]);

    // A bad annotation (target missing): creation fails with our message, nothing is left.
    let annotations = serde_json::json!({ "org.erofs-fanotify.image": image_ref });
    std::fs::write(bundle_path.join("config.json"), config(&env, annotations).to_string()).expect("config");
    let result = runc_run(&env, &bundle_path, &format!("eft-hook-bad-{}", std::process::id()));
    assert!(!result.ok, "a container with a bad annotation ran: {}", result.stdout);
    assert!(result.stderr.contains("erofs-fanotify: container") && result.stderr.contains("org.erofs-fanotify.target"), "unclear failure: {}", result.stderr);
    env.assert_nothing_left_within(GONE_TIMEOUT, &allowed);
    assert_no_hook_records(&env);

    // An image that does not exist: the hook's one line reaches the runtime's error, worded so that no
    // exit-code mapping reads it as a missing command; nothing is left.
    let annotations = serde_json::json!({
        "org.erofs-fanotify.image": reference(&registry::shared().host(), "test/no-such-image", "v1"),
        "org.erofs-fanotify.target": "/data/img",
        "org.erofs-fanotify.options": format!("oci.insecure,cache_dir={}", env.cache_dir.display()),
    });
    std::fs::write(bundle_path.join("config.json"), config(&env, annotations).to_string()).expect("config");
    let result = runc_run(&env, &bundle_path, &format!("eft-hook-missing-{}", std::process::id()));
    assert!(!result.ok, "a container with a missing image ran: {}", result.stdout);
    assert!(result.stderr.contains("does not exist"), "unclear failure: {}", result.stderr);
    assert_eq!(result.stderr.matches("erofs-fanotify:").count(), 1, "one line, one prefix: {}", result.stderr);
    assert!(!result.stderr.to_lowercase().contains("not found"), "reads as a missing command: {}", result.stderr);
    env.assert_nothing_left_within(GONE_TIMEOUT, &allowed);
    assert_no_hook_records(&env);
}

/// poststop removed the hook's own record (`<state dir>/hooks/<container>.json`).
fn assert_no_hook_records(env: &OciEnv) {
    let left: Vec<_> = std::fs::read_dir(env.state_dir.join("hooks")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "hook records left: {left:?}");
}

/// Runs `erofs-fanotify hook --stage STAGE` with `state` on stdin, as a runtime would.
fn run_hook(env: &OciEnv, stage: &str, state: &serde_json::Value) -> common::cmd::Outcome {
    use std::io::Write;
    let state_file = env.root.join(format!("state-{stage}.json"));
    std::fs::File::create(&state_file).and_then(|mut f| f.write_all(state.to_string().as_bytes())).expect("state file");
    // cmd::run gives the command /dev/null as stdin; the shell hands it the state instead.
    let mut c = Command::new("sh");
    c.env(STATE_DIR_ENV, &env.state_dir)
        .args(["-c", "exec \"$0\" hook --stage \"$1\" < \"$2\"", EROFS_FANOTIFY, stage])
        .arg(&state_file);
    let out = cmd::run(&mut c, Duration::from_secs(120));
    let _ = std::fs::remove_file(&state_file);
    out
}

/// A runtime that runs the hook after its process already changed root (here: `unshare -m --root`, a
/// chroot in a new mount namespace): the rootfs is then the process's `/`, found by its identity, and the
/// mount lands at `/<target>` inside it. After the process (and its namespace) is gone, poststop leaves
/// nothing.
#[test]
fn hook_mounts_under_an_already_changed_root() {
    if !ready() || !tools_present() {
        return;
    }
    let img = tiny_image("oci-hook-root");
    let pushed = push_single(registry::shared(), "test/oci-hook-root", "v1", &img.image.path);
    let image_ref = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("host-hook-root");
    let bundle = env.root.join("bundle");
    let rootfs = bundle.join("rootfs");
    make_rootfs(&rootfs);
    std::fs::write(bundle.join("config.json"), r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}"#).expect("config");
    let mut process = Command::new("unshare")
        .args(["--mount", "--fork", "--kill-child", "--root"])
        .arg(&rootfs)
        .args(["/bin/busybox", "sleep", "600"])
        .spawn()
        .expect("unshare");
    // The forked child (the one in the new root) is our process's only child.
    let pid = common::wait::wait_for(Duration::from_secs(10), "unshare's child in the new root", || {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", process.id())).ok()?;
        let child: i32 = children.split_whitespace().next()?.parse().ok()?;
        let root = std::fs::read_link(format!("/proc/{child}/root")).ok()?;
        (root == rootfs).then_some(child)
    });
    let state = |status: &str, pid: Option<i32>| {
        serde_json::json!({
            "ociVersion": "1.0.2", "id": format!("eft-root-{}", std::process::id()), "status": status,
            "pid": pid, "bundle": bundle,
            "annotations": {
                "org.erofs-fanotify.image": image_ref,
                "org.erofs-fanotify.target": "/data/img",
                "org.erofs-fanotify.options": format!("oci.insecure;cache_dir={}", env.cache_dir.display()),
            }
        })
    };
    // Stops the process in the new root (unshare --kill-child passes SIGKILL on) and waits for both.
    let mut stop = || {
        cmd::signal(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = process.kill();
        let _ = process.wait();
        common::wait::wait_until(Duration::from_secs(10), "the process in the new root exited", || {
            !common::env::agent_alive(pid)
        });
    };
    // The whole root (target=/) cannot be served once the process has changed root: one clear line.
    let mut whole = state("creating", Some(pid));
    whole["id"] = serde_json::Value::String(format!("eft-root-whole-{}", std::process::id()));
    whole["annotations"]["org.erofs-fanotify.target"] = serde_json::Value::String("/".into());
    let out = run_hook(&env, "createRuntime", &whole);
    if out.success() || !out.stderr.contains("pivot_root") {
        stop();
        panic!("target=/ after the root changed: {}", out.describe());
    }
    let out = run_hook(&env, "createRuntime", &state("creating", Some(pid)));
    if !out.success() {
        stop();
        panic!("hook failed: {}", out.describe());
    }
    // Not on the host path below the rootfs (the process's namespace is private)...
    assert!(!common::env::is_mounted(&rootfs.join("data/img")), "the mount leaked to the host");
    // ...but inside the process's root, with the right bytes.
    let inside = PathBuf::from(format!("/proc/{pid}/root/data/img"));
    let sums = expected_sums(&inside);
    stop();
    assert_eq!(sums, expected_sums(&img.tree), "files seen through /proc/{pid}/root/data/img");
    // The process is gone, and with it the namespace and the mount.
    let out = run_hook(&env, "poststop", &state("stopped", None));
    assert!(out.success(), "poststop failed: {}", out.describe());
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    assert_no_hook_records(&env);
    // A second poststop has nothing to do and does not fail.
    assert!(run_hook(&env, "poststop", &state("stopped", None)).success());
}

/// `org.erofs-fanotify.target=/`: the image becomes the container's root filesystem. The bundle's rootfs
/// is an empty directory; the image holds busybox, the data and the directories runc mounts on (`/proc`,
/// `/dev`, `/tmp`). Inside, `/` is the EROFS mount (read-only), runc's mounts are there (`/proc` works,
/// `/tmp` is writable), and every file reads back right; afterwards nothing of ours is left. An image
/// without a directory the runtime mounts on fails the hook with that path, and leaves nothing.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + runc + busybox-static"]
fn runc_container_runs_on_hook_mounted_root() {
    if !ready() || !tools_present() {
        return;
    }
    let env = OciEnv::new("host-hook-wholeroot");
    let tree = env.root.join("image-tree");
    make_rootfs(&tree);
    for (n, len) in [(0u64, 0usize), (1, 17), (2, 4096), (3, 300 * 1024 + 5), (4, 1 << 20)] {
        std::fs::write(tree.join(format!("data/file-{n}")), common::fixtures::random_bytes(0x5eed ^ n, len)).expect("data file");
    }
    let image = env.root.join("root.erofs");
    let out = Command::new("mkfs.erofs").args(["--quiet", "-T0"]).arg(&image).arg(&tree).output().expect("mkfs.erofs");
    assert!(out.status.success(), "mkfs.erofs: {}", String::from_utf8_lossy(&out.stderr));
    let pushed = push_single(registry::shared(), "test/oci-hook-wholeroot", "v1", &image);
    let image_ref = reference(&registry::shared().host(), &pushed.repo, &pushed.tag);
    // The same tree without /dev (runc mounts a tmpfs there): the hook must refuse it.
    std::fs::remove_dir(tree.join("dev")).expect("rmdir dev");
    let image_no_dev = env.root.join("root-no-dev.erofs");
    let out = Command::new("mkfs.erofs").args(["--quiet", "-T0"]).arg(&image_no_dev).arg(&tree).output().expect("mkfs.erofs");
    assert!(out.status.success(), "mkfs.erofs: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir(tree.join("dev")).expect("mkdir dev");
    let pushed_no_dev = push_single(registry::shared(), "test/oci-hook-wholeroot", "no-dev", &image_no_dev);
    let no_dev_ref = reference(&registry::shared().host(), &pushed_no_dev.repo, &pushed_no_dev.tag);

    let bundle_path = env.root.join("bundle");
    let bundle = PrivateBundle::new(&bundle_path);
    std::fs::create_dir_all(bundle_path.join("rootfs")).expect("empty rootfs");
    let allowed = [bundle.0.as_path()];
    let script = "cd /data && /bin/busybox find . -type f | /bin/busybox sort | while read f; do /bin/busybox sha256sum \"$f\"; done; \
                  /bin/busybox grep ' / / ' /proc/self/mountinfo | /bin/busybox sed 's/^/ROOT /'; \
                  /bin/busybox touch /written 2>/dev/null && echo ROOT-WRITABLE; \
                  /bin/busybox touch /tmp/written && echo TMP-WRITABLE";
    let config_for = |reference: &str| {
        let annotations = serde_json::json!({
            "org.erofs-fanotify.image": reference,
            "org.erofs-fanotify.target": "/",
            "org.erofs-fanotify.options": format!("oci.insecure,cache_dir={}", env.cache_dir.display()),
        });
        let mut cfg = config(&env, annotations);
        cfg["process"]["args"][3] = serde_json::Value::String(script.to_string());
        cfg.to_string()
    };

    std::fs::write(bundle_path.join("config.json"), config_for(&image_ref)).expect("config");
    let result = runc_run(&env, &bundle_path, &format!("eft-wholeroot-{}", std::process::id()));
    assert!(result.ok, "whole-root run failed: {}\n{}", result.stderr, result.stdout);
    let data: BTreeMap<String, String> = expected_sums(&tree.join("data"));
    assert_eq!(parse_sums(&result.stdout), data, "checksums inside the container differ\nstderr: {}", result.stderr);
    let root_line = result.stdout.lines().find(|l| l.starts_with("ROOT ")).unwrap_or_else(|| panic!("no mountinfo line for /: {}", result.stdout));
    assert!(root_line.contains(" - erofs "), "the container's / is not the EROFS mount: {root_line}");
    assert!(!result.stdout.contains("ROOT-WRITABLE"), "the image root took a write: {}", result.stdout);
    assert!(result.stdout.contains("TMP-WRITABLE"), "runc's /tmp did not come along: {}", result.stdout);
    // runc makes its mountpoints (empty directories) in the bundle's rootfs before the hook; nothing else
    // lands there.
    for e in std::fs::read_dir(bundle_path.join("rootfs")).expect("rootfs").flatten() {
        let empty_dir = e.file_type().is_ok_and(|t| t.is_dir()) && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none());
        assert!(empty_dir, "the bundle's rootfs got {}", e.path().display());
    }
    env.assert_nothing_left_within(GONE_TIMEOUT, &allowed);
    assert_no_hook_records(&env);
    eprintln!("WHOLE-ROOT run (hook mount as / + read {} files + poststop): {:.0?}", data.len(), result.elapsed);

    std::fs::write(bundle_path.join("config.json"), config_for(&no_dev_ref)).expect("config");
    let result = runc_run(&env, &bundle_path, &format!("eft-wholeroot-nodev-{}", std::process::id()));
    assert!(!result.ok, "a root image without /dev ran: {}", result.stdout);
    assert!(result.stderr.contains("/dev") && result.stderr.contains("erofs-fanotify: container"), "unclear failure: {}", result.stderr);
    env.assert_nothing_left_within(GONE_TIMEOUT, &allowed);
    assert_no_hook_records(&env);
}
