//! The OCI hook under podman as installed (Debian's podman 4.3 with runc), with podman's **default storage
//! configuration** (overlay driver and options, which bind-mount the storage's overlay directory onto
//! itself as a private mount: no host mount below it reaches a container). The hooks.d file is the shipped
//! `contrib/hooks/erofs-fanotify.json` with the binary's path substituted, as install.sh writes it.
//!
//! Podman runs with a private `--root`/`--runroot`/`--tmpdir` under temp dirs (same driver and options as
//! the default, nothing of the host's storage touched) and `--hooks-dir` pointing at our file only. The
//! container image is a busybox-static tree imported with `podman import`. Everything podman creates is
//! removed afterwards: containers, images, storage, and the few host files podman makes on first use
//! (`/dev/shm/libpod_lock`, `/var/lib/containers/cache`, `/etc/cni/net.d/cni.lock`) when they were not there
//! before.
//!
//! Covered: a container checksums every file of the lazily mounted image (the small fixture, lz4) and the
//! sums equal the source tree, cold (empty cache) and warm (cache kept), with the option separators that
//! survive podman's comma splitting (`;`, a double-quoted `--annotation`, numbered `option.N` keys); after
//! each exit no mount, agent, record or hook record is left; two containers on one image share one agent
//! and `status` finds each mount through `/proc/PID/root/<target>`; each bad annotation fails the container
//! with one line of ours, never podman's exit 127, and leaves nothing.
//!
//! Runtime: `--runtime runc`. Debian's crun 1.8.1 cannot start any container on this host ("cgroups in
//! hybrid mode not supported"), and podman prefers crun whenever it is installed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cmd::{self, Outcome};
use common::oci::{push_single, reference, OciEnv};
use common::registry::{sha256_file, Registry, RegistryConfig};
use common::{fixtures, ready, EROFS_FANOTIFY, GONE_TIMEOUT, STATE_DIR_ENV};

const BUSYBOX: &str = "/bin/busybox";
const IMAGE: &str = "localhost/eft-busybox:test";
const PODMAN_TIMEOUT: Duration = Duration::from_secs(300);
/// This machine's root lacks CAP_SYS_RESOURCE: podman's default rlimits fail with "error setting rlimit".
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"];
/// Files podman creates on the host on first use, whatever --root says.
const PODMAN_HOST_FILES: [&str; 3] = ["/dev/shm/libpod_lock", "/var/lib/containers", "/etc/cni/net.d/cni.lock"];

fn podman_present() -> bool {
    let ok = Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success())
        && Command::new("runc").arg("--version").output().is_ok_and(|o| o.status.success())
        && Path::new(BUSYBOX).exists();
    if !ok {
        assert!(!common::prereq::in_ci(), "podman, runc or busybox-static missing (CI=true)");
        eprintln!("SKIPPED: podman, runc or busybox-static not installed");
    }
    ok
}

/// A private podman: its storage, run and tmp dirs, our hooks dir; removed with everything in it on drop.
struct Podman {
    base: PathBuf,
    run_base: PathBuf,
    hooks_dir: PathBuf,
    created_host_files: Vec<PathBuf>,
}

impl Podman {
    fn new(env: &OciEnv) -> Podman {
        let tag = format!("eft-podman-{}", std::process::id());
        // Storage on ext4 (overlay needs a real fs below it), run state on tmpfs as podman's own default.
        let base = Path::new("/var/tmp").join(&tag);
        let run_base = Path::new("/run").join(&tag);
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&run_base);
        let hooks_dir = base.join("hooks.d");
        std::fs::create_dir_all(&hooks_dir).expect("hooks dir");
        std::fs::create_dir_all(&run_base).expect("run dir");
        // The shipped hooks.d file, with the binary's path substituted as install.sh does, and our state dir.
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/hooks/erofs-fanotify.json"))
            .expect("contrib/hooks/erofs-fanotify.json");
        let mut hook: serde_json::Value = serde_json::from_str(&shipped).expect("hooks.d JSON");
        let installed_dir = Path::new(EROFS_FANOTIFY).parent().expect("bin dir").display().to_string();
        let path = hook["hook"]["path"].as_str().expect("hook.path").replace("/usr/local/bin", &installed_dir);
        hook["hook"]["path"] = serde_json::Value::String(path);
        hook["hook"]["env"] = serde_json::json!([
            format!("{STATE_DIR_ENV}={}", env.state_dir.display()),
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]);
        std::fs::write(hooks_dir.join("erofs-fanotify.json"), hook.to_string()).expect("write hooks.d file");
        let created_host_files = PODMAN_HOST_FILES.iter().map(PathBuf::from).filter(|p| !p.exists()).collect();
        Podman { base, run_base, hooks_dir, created_host_files }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.base.join("storage"))
            .arg("--runroot")
            .arg(self.run_base.join("runroot"))
            .arg("--tmpdir")
            .arg(self.run_base.join("tmp"))
            .arg("--hooks-dir")
            .arg(&self.hooks_dir)
            .args(["--runtime", "runc"]);
        c
    }

    fn run_cmd(&self, args: &[&str]) -> Outcome {
        let mut c = self.cmd();
        c.args(args);
        cmd::run(&mut c, PODMAN_TIMEOUT)
    }

    /// A busybox-static tree as image `IMAGE`.
    fn import_busybox(&self) {
        let rootfs = self.base.join("rootfs");
        for d in ["bin", "data", "etc", "proc", "dev", "sys", "tmp", "run"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("sh link");
        let tar = self.base.join("rootfs.tar");
        let out = cmd::run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."), Duration::from_secs(60));
        out.assert_success();
        self.run_cmd(&["import", tar.to_str().expect("utf-8 path"), IMAGE]).assert_success();
    }

    /// `podman run --rm` of `IMAGE` with `annotations` (each one `--annotation` argument, verbatim).
    fn run(&self, annotations: &[String], script: &str) -> Outcome {
        let mut c = self.cmd();
        c.args(["run", "--rm", "--network", "none"]).args(ULIMITS);
        for a in annotations {
            c.arg("--annotation").arg(a);
        }
        c.args([IMAGE, "/bin/busybox", "sh", "-c", script]);
        cmd::run(&mut c, PODMAN_TIMEOUT)
    }

    fn containers(&self) -> Vec<String> {
        let out = self.run_cmd(&["ps", "-a", "--format", "{{.ID}}"]);
        out.assert_success();
        out.stdout_str().lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_cmd(&["rm", "--all", "--force", "--time", "0"]);
            self.run_cmd(&["rmi", "--all", "--force"]);
        }));
        // containers/storage leaves its private bind mount of <root>/overlay (and anything it still had).
        for root in [&self.base, &self.run_base] {
            let prefix = format!("{}/", root.display());
            let mut left: Vec<String> = common::env::mountinfo()
                .into_iter()
                .map(|m| m.mountpoint)
                .filter(|m| m.starts_with(&prefix))
                .collect();
            left.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in left {
                common::env::detach(Path::new(&m));
            }
        }
        for dir in [&self.base, &self.run_base] {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("teardown: cannot remove {}: {e}", dir.display());
            }
        }
        for path in &self.created_host_files {
            let _ = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
        }
    }
}

/// sha256 of every regular file below `tree`, keyed `./rel/path` as `find .` prints it.
fn expected_sums(tree: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                walk(base, &e.path(), out);
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(base).expect("relative").display().to_string();
                out.insert(format!("./{rel}"), sha256_file(&e.path()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(tree, tree, &mut out);
    out
}

/// `busybox sha256sum` lines: `<hex>  <path>`.
fn parse_sums(stdout: &str) -> BTreeMap<String, String> {
    stdout.lines().filter_map(|l| l.split_once("  ").map(|(h, p)| (p.to_string(), h.to_string()))).collect()
}

/// Prints the uptime when the container's process starts and after checksumming every file of the mount.
const CHECKSUM_SCRIPT: &str =
    "cat /proc/uptime; cd /data/img && /bin/busybox find . -type f -exec /bin/busybox sha256sum {} + && cat /proc/uptime";

/// `/proc/uptime` (10 ms resolution, not namespaced): lets the container say when it started.
fn uptime() -> f64 {
    uptime_of(&std::fs::read_to_string("/proc/uptime").expect("/proc/uptime")).expect("uptime")
}

fn uptime_of(line: &str) -> Option<f64> {
    let mut fields = line.split_whitespace();
    let up = fields.next()?.parse().ok()?;
    fields.next()?.parse::<f64>().ok()?;
    fields.next().is_none().then_some(up)
}

/// From the host's uptime before `podman run` and the container's script output: (time until the
/// container's process ran, time it took to read everything), in milliseconds.
fn phases(before: f64, stdout: &str) -> (u64, u64) {
    let marks: Vec<f64> = stdout.lines().filter_map(uptime_of).collect();
    assert!(!marks.is_empty(), "no uptime in the container's output: {stdout}");
    let ms = |d: f64| (d.max(0.0) * 1000.0).round() as u64;
    (ms(marks[0] - before), ms(marks[marks.len() - 1] - marks[0]))
}

fn ann(key: &str, value: &str) -> String {
    format!("org.erofs-fanotify.{key}={value}")
}

/// Blob GETs (data reads) `registry` answered since `before` log entries.
fn blob_gets_since(registry: &Registry, before: usize) -> usize {
    registry.access_log().iter().skip(before).filter(|(m, p, _)| m == "GET" && p.contains("/blobs/")).count()
}

fn assert_hook_records_gone(env: &OciEnv) {
    let left: Vec<PathBuf> = std::fs::read_dir(env.state_dir.join("hooks"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "hook records left: {left:?}");
}

fn assert_clean(env: &OciEnv, podman: &Podman) {
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    assert_hook_records_gone(env);
    let containers = podman.containers();
    assert!(containers.is_empty(), "podman containers left: {containers:?}");
}

/// Our lines in podman's error output. Podman quotes the runtime's message, which quotes our stderr
/// logfmt-style: a newline shows as `\n` and a quote as `\"`.
fn hook_lines(stderr: &str) -> Vec<String> {
    stderr
        .match_indices("erofs-fanotify: ")
        .map(|(at, _)| {
            let rest = &stderr[at..];
            let end = [rest.find("\\n"), rest.find('\n')].into_iter().flatten().min().unwrap_or(rest.len());
            rest[..end].replace("\\\"", "\"")
        })
        .collect()
}

#[test]
#[ignore = "needs root + kernel + registry + podman"]
fn podman_containers_read_hook_mounted_images() {
    if !ready() || !podman_present() {
        return;
    }
    let fx = fixtures::small();
    // Our own registry, logging requests: cold runs must fetch, warm ones must not.
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let registry = &registry;
    let pushed = push_single(registry, "test/podman-hook", "v1", &fx.lz4.path);
    let image_ref = reference(&registry.host(), &pushed.repo, &pushed.tag);
    let env = OciEnv::new("podman-hook");
    let podman = Podman::new(&env);
    podman.import_busybox();
    let expected = expected_sums(&fx.tree);
    let cache = env.cache_dir.display().to_string();

    // Podman's own cost, for comparison: the same container without our annotations.
    let before = uptime();
    let baseline = podman.run(&[], "cat /proc/uptime");
    baseline.assert_success();
    let (baseline_start, _) = phases(before, &baseline.stdout_str());

    // Cold (empty cache) with ';' between options; warm (cache kept) with the double-quoted form that keeps
    // commas; warm again with numbered option keys.
    let variants: [(&str, Vec<String>); 3] = [
        ("cold, options with ';'", vec![ann("options", &format!("oci.insecure;cache_dir={cache}"))]),
        ("warm, quoted options with ','", vec![format!("\"{}\"", ann("options", &format!("oci.insecure,cache_dir={cache}")))]),
        ("warm, option.N keys", vec![ann("option.1", "oci.insecure"), ann("option.2", &format!("cache_dir={cache}"))]),
    ];
    let mut report = Vec::new();
    for (label, options) in variants {
        let mut annotations = vec![ann("image", &image_ref), ann("target", "/data/img")];
        annotations.extend(options);
        let log_before = registry.access_log().len();
        let before = uptime();
        let out = podman.run(&annotations, CHECKSUM_SCRIPT);
        assert!(out.success(), "{label}: {}", out.describe());
        let gets = blob_gets_since(registry, log_before);
        let sums = parse_sums(&out.stdout_str());
        assert_eq!(sums.len(), expected.len(), "{label}: files seen in the container");
        assert_eq!(sums, expected, "{label}: checksums inside the container differ from the source tree");
        assert_clean(&env, &podman);
        if label.starts_with("cold") {
            assert!(gets > 0, "{label}: nothing fetched from the registry");
        } else {
            // Only the agent's start-up probe of the blob's first bytes (the superblock check); the kept cache
            // serves every read.
            assert!(gets <= 1, "{label}: {gets} blob GETs with the cache kept");
        }
        let (start, read) = phases(before, &out.stdout_str());
        report.push(format!(
            "{label}: {} files checked; container started after {start} ms, read all in {read} ms, podman run {} ms in all; {gets} blob GETs",
            sums.len(),
            out.elapsed.as_millis()
        ));
    }
    eprintln!(
        "PODMAN HOOK: baseline without annotations: started after {baseline_start} ms, podman run {} ms\n  {}",
        baseline.elapsed.as_millis(),
        report.join("\n  ")
    );

    two_containers_share_one_agent(&env, &podman, &image_ref, &cache, &expected);
    bad_annotations_fail_cleanly(&env, &podman, registry, &image_ref, &cache);
}

/// Two running containers with the same image: one agent, two records, each reachable at /proc/PID/root.
fn two_containers_share_one_agent(env: &OciEnv, podman: &Podman, image_ref: &str, cache: &str, expected: &BTreeMap<String, String>) {
    let mut ids = Vec::new();
    for n in 0..2 {
        let mut c = podman.cmd();
        c.args(["run", "-d", "--rm", "--network", "none"]).args(ULIMITS);
        for a in [ann("image", image_ref), ann("target", "/data/img"), ann("options", &format!("oci.insecure;cache_dir={cache}"))] {
            c.arg("--annotation").arg(a);
        }
        // Kept running until the test removes it.
        c.args([IMAGE, "/bin/busybox", "sleep", "600"]);
        let out = cmd::run(&mut c, PODMAN_TIMEOUT);
        assert!(out.success(), "container {n}: {}", out.describe());
        ids.push(out.stdout_str().trim().to_string());
    }
    let statuses = common::env::status_json(&env.state_dir);
    assert_eq!(statuses.len(), 2, "two mounts recorded: {statuses:?}");
    assert_eq!(statuses[0].agent_pid, statuses[1].agent_pid, "one agent for one image: {statuses:?}");
    for s in &statuses {
        assert!(s.mountpoint.starts_with("/proc/") && s.mountpoint.ends_with("/root/data/img"), "{s:?}");
        // The host reaches the container's mount through /proc/PID/root; status finds its record by mount id.
        let mut c = Command::new(EROFS_FANOTIFY);
        c.env(STATE_DIR_ENV, &env.state_dir).args(["status", "--json"]).arg(&s.mountpoint);
        let one = cmd::run(&mut c, Duration::from_secs(30));
        one.assert_success();
        assert!(one.stdout_str().contains(&format!("\"mnt_id\": {}", s.mnt_id)), "{}", one.describe());
        // erofs-umount cannot reach into the container's namespace, and says so (the mount stays).
        let mut c = Command::new(common::EROFS_UMOUNT);
        c.env(STATE_DIR_ENV, &env.state_dir).arg(&s.mountpoint);
        let refused = cmd::run(&mut c, Duration::from_secs(30));
        assert!(!refused.success() && refused.stderr.contains("another mount namespace"), "{}", refused.describe());
        // And its files read right from there (the biggest one: data fetched or taken from the cache).
        let (rel, sum) = expected.iter().max_by_key(|(rel, _)| std::fs::metadata(Path::new(&s.mountpoint).join(rel)).map(|m| m.len()).unwrap_or(0)).expect("files");
        assert_eq!(&sha256_file(&Path::new(&s.mountpoint).join(rel)), sum, "{rel} through {}", s.mountpoint);
    }
    let mut args = vec!["rm", "--force", "--time", "0"];
    args.extend(ids.iter().map(String::as_str));
    podman.run_cmd(&args).assert_success();
    assert_clean(env, podman);
}

/// Each bad set fails `podman run` with one line of ours and leaves nothing.
fn bad_annotations_fail_cleanly(env: &OciEnv, podman: &Podman, registry: &Registry, image_ref: &str, cache: &str) {
    let opts = ann("options", &format!("oci.insecure;cache_dir={cache}"));
    let missing_image = reference(&registry.host(), "test/no-such-image", "v1");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("image without target", vec![ann("image", image_ref), opts.clone()], "org.erofs-fanotify.target is missing"),
        ("target without image", vec![ann("target", "/data/img"), opts.clone()], "org.erofs-fanotify.image is missing"),
        ("'..' in the target", vec![ann("image", image_ref), ann("target", "/data/../../etc"), opts.clone()], "must not contain '..'"),
        ("bad option", vec![ann("image", image_ref), ann("target", "/data/img"), ann("options", "oci.insecure;bogus=1")], "bogus"),
        (
            "options split at a comma by podman",
            vec![ann("image", image_ref), ann("target", "/data/img"), ann("options", &format!("oci.insecure,cache_dir={cache}"))],
            "separate options with ';'",
        ),
        ("unknown tag", vec![ann("image", &missing_image), ann("target", "/data/img"), opts.clone()], "does not exist"),
        (
            "plain-http registry without oci.insecure",
            vec![ann("image", image_ref), ann("target", "/data/img"), ann("options", &format!("cache_dir={cache}"))],
            "oci.insecure",
        ),
    ];
    for (label, annotations, expect) in cases {
        let out = podman.run(&annotations, "/bin/busybox echo should-not-run");
        assert!(!out.success(), "{label}: the container ran: {}", out.describe());
        assert!(!out.stdout_str().contains("should-not-run"), "{label}: {}", out.describe());
        let code = out.status.code();
        assert_ne!(code, Some(127), "{label}: podman reads our failure as 'command not found': {}", out.describe());
        let ours = hook_lines(&out.stderr);
        assert_eq!(ours.len(), 1, "{label}: one line of ours expected: {}", out.describe());
        assert!(ours[0].contains(expect), "{label}: {:?} does not say {expect:?}", ours[0]);
        eprintln!("{label}: exit {code:?}: {}", ours[0]);
        assert_clean(env, podman);
    }
}

/// README's hook section shows the hooks.d file we ship (no root needed).
#[test]
fn readme_shows_the_shipped_hooks_file() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    let after = readme.split_once("The shipped hooks.d file").expect("README names the shipped hooks.d file").1;
    let block = after.split_once("```json\n").and_then(|(_, b)| b.split_once("```")).expect("a json block after it").0;
    let shown: serde_json::Value = serde_json::from_str(block).unwrap_or_else(|e| panic!("README's hooks.d JSON ({e}): {block}"));
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo.join("contrib/hooks/erofs-fanotify.json")).expect("hooks.d file")).expect("JSON");
    assert_eq!(shown, shipped, "README and contrib/hooks/erofs-fanotify.json differ");
}
