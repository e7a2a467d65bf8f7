//! Issue 12: never hang, never leak, never follow. One test (or two) per failure mode found by attacking
//! the agent: a stopped worker, failed mounts leaving files, planted symlinks, a second mount with other
//! options, a restart refetching metadata, both processes killed, the open-file limit, offline mounts.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env::agent_alive;
use common::fault_server::FaultServer;
use common::fixtures;
use common::readers::{self, ReadTally};
use common::wait::{wait_for, wait_until};
use common::{cmd, ready, TestEnv, COMMAND_TIMEOUT, EROFS_FANOTIFY, STATE_DIR_ENV};

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    assert!(pid > 1, "refusing to signal pid {pid}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// `status --json` as raw JSON (fields newer than the test's MountStatus included).
fn status_values(env: &TestEnv) -> Vec<serde_json::Value> {
    let out = cmd::run(
        Command::new(EROFS_FANOTIFY).env(STATE_DIR_ENV, &env.state_dir).args(["status", "--json"]),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn worker_of(env: &TestEnv, mountpoint: &Path) -> i32 {
    env.status()
        .into_iter()
        .find(|s| Path::new(&s.mountpoint) == mountpoint && s.agent_state == "running")
        .map(|s| s.agent_pid)
        .unwrap_or(0)
}

/// Every file (relative path -> size) under `dir`, directories as `dir/`, symlinks as `-> target`.
fn snapshot(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(base).unwrap_or(&path).display().to_string();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.file_type().is_symlink() {
                out.push(format!("{rel} -> {:?}", std::fs::read_link(&path).ok()));
            } else if meta.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &path, out);
            } else {
                out.push(format!("{rel} ({} bytes)", meta.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn one_line_failure(outcome: &cmd::Outcome) -> String {
    assert!(!outcome.success(), "expected a failure: {}", outcome.describe());
    let lines = outcome.stderr_lines();
    assert_eq!(lines.len(), 1, "one line expected on stderr: {}", outcome.describe());
    lines[0].to_string()
}

// ---------------------------------------------------------------------------------------------------------
// 1. A stopped worker

/// SIGSTOP of the worker while 64 readers are blocked on cold data: the supervisor's watchdog replaces it
/// and the successor answers every blocked read with the right bytes within the bound.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_stopped_worker_is_replaced_and_no_reader_waits_without_bound() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("sigstop");
    let m = env.mount(&server.url(), "mnt", &["fetch_unit=64K", "retry_timeout=3"]);
    let worker = m.agent_pid();
    let tally = Arc::new(ReadTally::default());
    // Each reply comes late, so readers are blocked on fetches when the worker stops.
    server.set_delay(Duration::from_millis(200));
    let readers = readers::spawn(&m.mountpoint, fx, 64, &tally);
    wait_until(Duration::from_secs(20), "the worker is fetching for readers", || server.stats().gets > 4);
    signal(worker, nix::sys::signal::Signal::SIGSTOP);
    let stopped_at = Instant::now();
    server.set_delay(Duration::ZERO);
    let failures = match readers::join_within(readers, Duration::from_secs(60)) {
        Ok(f) => f,
        Err(handle) => {
            // Let the test end: wake the worker, then fail.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), nix::sys::signal::Signal::SIGCONT);
            let _ = handle.join();
            panic!("readers were still blocked 60 s after the worker stopped (status {:?})", env.status());
        }
    };
    let after_stop = stopped_at.elapsed();
    assert!(failures.is_empty(), "reads failed after the worker stopped: {failures:?}");
    let new_worker = wait_for(Duration::from_secs(20), "a running successor", || {
        Some(worker_of(&env, &m.mountpoint)).filter(|&p| p != 0 && p != worker)
    });
    assert!(!agent_alive(worker), "the stopped worker {worker} is still there beside {new_worker}");
    // The bound: the watchdog's stall bound (5 s) + a successor start + one fetch (retry_timeout 3 s).
    assert!(tally.longest() < Duration::from_secs(20), "longest read {:?}", tally.longest());
    // The mount works afterwards.
    let big = &fx.big_files()[0];
    assert_eq!(std::fs::read(m.path(&big.rel)).expect("read after replacement"), fx.read_source(&big.rel));
    eprintln!(
        "sigstop: worker {worker} replaced by {new_worker}; all {} reads right; longest read {:?}; readers done {after_stop:?} after the stop",
        tally.files(),
        tally.longest()
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

/// A worker that is merely slow (every reply from the server takes 1.5 s, for longer than the watchdog's
/// stall bound) is alive: its event thread keeps answering and its fetches are within their deadline. It
/// is not replaced.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_worker_on_a_slow_server_is_not_replaced() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("slow");
    let m = env.mount(&server.url(), "mnt", &["fetch_unit=64K", "fetch_timeout=5", "retry_timeout=10"]);
    let worker = m.agent_pid();
    server.set_delay(Duration::from_millis(1500));
    let started = Instant::now();
    let tally = Arc::new(ReadTally::default());
    let failures = readers::spawn(&m.mountpoint, fx, 16, &tally).join().expect("readers");
    let took = started.elapsed();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(took > Duration::from_secs(8), "the server was not slow enough to test anything ({took:?})");
    assert_eq!(worker_of(&env, &m.mountpoint), worker, "a slow but working worker was replaced");
    eprintln!("slow server: {} reads in {took:?}, worker {worker} kept", tally.files());
    server.set_delay(Duration::ZERO);
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 2. Failed mounts, dead agents' files

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_failed_mount_leaves_the_state_dir_as_it_was() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let good = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("failed-mount");
    // One good mount first: what a used state dir looks like.
    env.mount(&good.url(), "mnt", &[]).unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    let before = snapshot(&env.state_dir);
    let cache_before = snapshot(&env.cache_dir);
    let mountpoint = env.mountpoint("mnt2");
    // A blob that is not there, and one that is not EROFS.
    let missing = format!("{}/v2/faults/blobs/sha256:{}", good.base_url(), "e".repeat(64));
    let junk_path = env.root.join("junk.img");
    std::fs::write(&junk_path, fixtures::random_bytes(7, 256 << 10)).expect("junk");
    let junk = FaultServer::serve(&junk_path);
    for source in [missing, junk.url()] {
        let outcome = env.try_mount(&source, &mountpoint, &[]);
        let line = one_line_failure(&outcome);
        eprintln!("{source}: {line}");
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
        assert_eq!(snapshot(&env.state_dir), before, "the failed mount of {source} changed the state dir");
        assert_eq!(snapshot(&env.cache_dir), cache_before, "the failed mount of {source} changed the cache dir");
    }
}

/// Files of agents that no longer exist (a journal, an old log) go with `cache prune`; those of a live
/// agent stay.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn cache_prune_removes_files_of_agents_that_are_gone() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("prune-journals");
    let m = env.mount(&server.url(), "mnt", &[]);
    let agents = env.state_dir.join("agents");
    let live_before = snapshot(&agents);
    // What a dead agent of another blob left: a journal nobody holds, a log a month old.
    let dead_journal = agents.join("0123456789abcdef.journal");
    std::fs::write(&dead_journal, vec![0u8; 4096]).expect("journal");
    let dead_key = format!("sha256-{}", "d".repeat(64));
    let dead_log = agents.join(format!("{dead_key}.log"));
    std::fs::write(&dead_log, b"an old agent's log\n").expect("log");
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(30 * 86_400);
    std::fs::File::options().write(true).open(&dead_log).expect("log").set_modified(month_ago).expect("mtime");
    let out = cmd::run(
        Command::new(EROFS_FANOTIFY)
            .env(STATE_DIR_ENV, &env.state_dir)
            .args(["cache", "prune", "--cache-dir"])
            .arg(&env.cache_dir)
            .args(["--unused-for", "3650d"]),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    assert!(!dead_journal.exists(), "the journal of a dead agent survived cache prune");
    assert!(!dead_log.exists(), "a month-old log of a dead agent survived cache prune");
    assert_eq!(snapshot(&agents), live_before, "cache prune touched the live agent's files");
    let big = &fx.big_files()[0];
    assert_eq!(std::fs::read(m.path(&big.rel)).expect("read"), fx.read_source(&big.rel));
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 3. Planted symlinks and foreign entries

fn key_of(server: &FaultServer) -> String {
    server.digest().replacen(':', "-", 1)
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_planted_symlink_entry_is_refused_and_its_target_untouched() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("symlink-entry");
    let target = env.root.join("elsewhere");
    std::fs::create_dir_all(&target).expect("target");
    std::fs::create_dir_all(&env.cache_dir).expect("cache dir");
    std::os::unix::fs::symlink(&target, env.cache_dir.join(key_of(&server))).expect("plant");
    let outcome = env.try_mount(&server.url(), &env.mountpoint("mnt"), &[]);
    let line = one_line_failure(&outcome);
    assert!(line.contains("symbolic link") || line.contains("symlink"), "{line}");
    assert_eq!(snapshot(&target), Vec::<String>::new(), "the agent wrote into the symlink's target");
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    eprintln!("planted symlink: {line}");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn entries_owned_by_others_or_writable_by_others_are_refused() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    for case in ["foreign-owner", "world-writable", "symlinked-file"] {
        let env = TestEnv::new(&format!("entry-{case}"));
        // A good entry first, then damage it.
        env.mount(&server.url(), "mnt", &[]).unmount().assert_success();
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
        let entry = env.cache_dir.join(key_of(&server));
        let decoy = env.root.join("decoy");
        std::fs::write(&decoy, b"not yours").expect("decoy");
        match case {
            "foreign-owner" => std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).expect("chown"),
            "world-writable" => std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o777)).expect("chmod"),
            _ => {
                std::fs::remove_file(entry.join("bitmap")).expect("rm bitmap");
                std::os::unix::fs::symlink(&decoy, entry.join("bitmap")).expect("plant");
            }
        }
        let outcome = env.try_mount(&server.url(), &env.mountpoint("mnt"), &[]);
        let line = one_line_failure(&outcome);
        eprintln!("{case}: {line}");
        assert_eq!(std::fs::read(&decoy).expect("decoy"), b"not yours");
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    }
}

/// The cache_dir itself may be a symlink (the admin's choice).
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_cache_dir_that_is_a_symlink_is_followed() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("symlink-cache-dir");
    let real = env.root.join("real-cache");
    std::fs::create_dir_all(&real).expect("real");
    let link = env.root.join("cache-link");
    std::os::unix::fs::symlink(&real, &link).expect("link");
    let mountpoint = env.mountpoint("mnt");
    let opts = format!("cache_dir={}", link.display());
    cmd::run(&mut env.mount_command_raw(&server.url(), &mountpoint, &opts), COMMAND_TIMEOUT).assert_success();
    let big = &fx.big_files()[0];
    assert_eq!(std::fs::read(mountpoint.join(&big.rel)).expect("read"), fx.read_source(&big.rel));
    assert!(real.join(key_of(&server)).join("blob").exists(), "the entry is not in the link's target");
    env.umount(&[mountpoint.to_str().expect("utf-8")]).assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 4. A second mount of the same blob with other options

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_second_mount_with_another_cache_dir_or_fetch_options_is_refused() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("second-cache-dir");
    let m = env.mount(&server.url(), "mnt", &[]);
    let other_cache = env.root.join("other-cache");
    std::fs::create_dir_all(&other_cache).expect("other cache");
    let second = env.mountpoint("mnt2");
    let opts = format!("cache_dir={}", other_cache.display());
    let outcome = cmd::run(&mut env.mount_command_raw(&server.url(), &second, &opts), COMMAND_TIMEOUT);
    let line = one_line_failure(&outcome);
    assert!(line.contains("cache_dir"), "{line}");
    assert_eq!(snapshot(&other_cache), Vec::<String>::new(), "the refused mount left files in its cache_dir");
    let outcome = env.try_mount(&server.url(), &second, &["fetch_unit=64K"]);
    let line2 = one_line_failure(&outcome);
    assert!(line2.contains("fetch_unit"), "{line2}");
    // The same options (or none) are fine.
    let m2 = env.mount(&server.url(), "mnt2", &["fetch_unit=256K"]);
    eprintln!("second mount refused: {line} / {line2}");
    m2.unmount().assert_success();
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

/// A second mount of the same blob from another URL: that URL serves the blob too (a mirror); per-mount
/// options (read_ahead_kb) apply to the second mount.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_second_mount_from_another_url_adds_a_mirror_and_keeps_its_readahead() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let first = FaultServer::serve(&fx.plain.path);
    let second = FaultServer::serve(&fx.plain.path);
    assert_eq!(first.digest(), second.digest());
    let env = TestEnv::new("second-url");
    let m = env.mount(&first.url(), "mnt", &["read_ahead_kb=512", "retry_timeout=2"]);
    let m2 = env.mount(&second.url(), "mnt2", &["read_ahead_kb=1024"]);
    assert_eq!(m.agent_pid(), m2.agent_pid(), "one agent per blob");
    let bdi = |m: &common::Mounted| {
        let name = m.status().sysfs_name;
        std::fs::read_to_string(format!("/sys/class/bdi/{name}/read_ahead_kb")).expect("bdi").trim().to_string()
    };
    assert_eq!(bdi(&m), "512");
    assert_eq!(bdi(&m2), "1024", "the second mount's read_ahead_kb was ignored");
    // The first URL breaks: data comes from the second.
    first.fail_next(1_000_000);
    let gets_before = second.stats().gets;
    for f in fx.big_files() {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read through the mirror"), fx.read_source(&f.rel));
    }
    assert!(second.stats().gets > gets_before, "the second URL served nothing");
    m2.unmount().assert_success();
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 5. A successor resumes without refetching metadata

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_successor_after_a_kill_right_after_mount_needs_no_metadata_requests() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("resume-metadata");
    let m = env.mount(&server.url(), "mnt", &["fetch_unit=64K"]);
    let worker = m.agent_pid();
    let before = server.stats().gets;
    server.stall();
    // A reader blocks on a held fetch; the worker dies under it, right after the mount.
    let big = fx.big_files()[0].clone();
    let path = m.path(&big.rel);
    let reader = std::thread::spawn(move || std::fs::read(path));
    wait_until(Duration::from_secs(10), "a fetch is held", || server.held_requests() > 0);
    let held = server.stats().gets;
    signal(worker, nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    server.resume();
    let data = reader.join().expect("reader").expect("the blocked read");
    let answered = killed.elapsed();
    assert_eq!(data, fx.read_source(&big.rel));
    let successor = wait_for(Duration::from_secs(20), "a running successor", || {
        Some(worker_of(&env, &m.mountpoint)).filter(|&p| p != 0 && p != worker)
    });
    let stats = server.stats();
    // After the kill: the successor's probe of the source, then only the data the reader wanted.
    let after: Vec<(u64, u64)> = stats.ranges[held as usize..].to_vec();
    let data_requests = after.iter().filter(|(s, _)| *s != 0).count() as u64;
    let entry: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.cache_dir.join(key_of(&server)).join("entry.json")).expect("entry.json"),
    )
    .expect("entry json");
    let meta: Vec<(u64, u64)> = entry["required"]
        .as_array()
        .expect("required ranges")
        .iter()
        .map(|r| (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0)))
        .collect();
    let refetched: Vec<&(u64, u64)> =
        after.iter().filter(|(s, e)| *s != 0 && meta.iter().any(|(a, b)| *s < *b && *e >= *a)).collect();
    eprintln!(
        "resume: {} requests before the kill, {} after ({data_requests} not the probe), metadata refetched {}, reader answered {answered:?} after the kill; successor {successor}",
        held - before,
        after.len(),
        refetched.len()
    );
    assert!(refetched.is_empty(), "the successor refetched metadata: {refetched:?} of {after:?}");
    assert!(answered < Duration::from_secs(5), "the successor needed {answered:?}");
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 6. Both processes dead

fn kill_both(env: &TestEnv, mountpoint: &Path) {
    let worker = worker_of(env, mountpoint);
    let supervisor = parent_of(worker);
    signal(supervisor, nix::sys::signal::Signal::SIGKILL);
    signal(worker, nix::sys::signal::Signal::SIGKILL);
    // The worker may have started a new supervisor in the instant before it died.
    wait_until(Duration::from_secs(5), "the agent processes are gone", || !agent_alive(worker));
    // Killed again on every look: one started in that instant may itself start another before it dies.
    wait_until(Duration::from_secs(10), "no agent process is left", || {
        let left = env.agents();
        for &pid in &left {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        left.is_empty()
    });
}

/// kill -9 of both agent processes: the kernel allows what was pending and the mount reads zeros. The next
/// agent for the image (a new erofs-mount of it, or `erofs-fanotify upgrade`) takes the live mount over and
/// drops what was read during the gap: afterwards every file reads right, also through the old mount.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn after_both_processes_die_a_restart_ends_the_zeros() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    for restart in ["erofs-mount", "upgrade"] {
        let env = TestEnv::new(&format!("fail-open-{restart}"));
        let m = env.mount(&server.url(), "mnt", &["fetch_unit=64K"]);
        // A handle on this very mount, whatever is mounted over the path later.
        let root = std::fs::File::open(&m.mountpoint).expect("open the mount root");
        let via_old = PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
        kill_both(&env, &m.mountpoint);
        let gap_started = Instant::now();
        let big = fx.big_files();
        for f in &big {
            let data = std::fs::read(via_old.join(&f.rel)).expect("read during the gap");
            assert_ne!(data, fx.read_source(&f.rel), "{}: the gap served real data?", f.rel.display());
        }
        // The next mount of the image (elsewhere), or an upgrade of the dead mount's agent.
        let second = match restart {
            "erofs-mount" => Some(env.mount(&server.url(), "mnt2", &["fetch_unit=64K"])),
            _ => {
                cmd::run(
                    Command::new(EROFS_FANOTIFY).env(STATE_DIR_ENV, &env.state_dir).arg("upgrade").arg(&m.mountpoint),
                    COMMAND_TIMEOUT,
                )
                .assert_success();
                None
            }
        };
        let gap = gap_started.elapsed();
        for f in &big {
            let data = std::fs::read(via_old.join(&f.rel)).expect("read after the restart");
            assert!(data == fx.read_source(&f.rel), "{}: still wrong after the restart ({restart})", f.rel.display());
        }
        let tally = Arc::new(ReadTally::default());
        let failures = readers::spawn(&via_old, fx, 4, &tally).join().expect("readers");
        assert!(failures.is_empty(), "{restart}: {failures:?}");
        let status = status_values(&env);
        eprintln!("{restart}: gap of {gap:?}; status {}", serde_json::to_string(&status).unwrap_or_default());
        assert_eq!(status.len(), 1 + second.is_some() as usize, "mounts: {status:?}");
        let old = status
            .iter()
            .find(|s| s["mountpoint"].as_str().map(Path::new) == Some(m.mountpoint.as_path()))
            .expect("the old mount in status");
        let window = &old["fail_open"];
        assert!(window.is_object(), "status does not show the fail-open window: {old}");
        assert!(window["duration_ms"].as_u64().unwrap_or(0) > 0, "{window}");
        assert_eq!(window["mounts"].as_u64(), Some(1), "{window}");
        assert!(window["files_dropped"].as_u64().unwrap_or(0) > 0, "{window}");
        drop(root);
        if let Some(second) = second {
            second.unmount().assert_success();
        }
        m.unmount().assert_success();
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 8. Limits

/// Started from a shell with a soft limit of 1024 open files, both agent processes raise it (to 65536, or
/// as far as the hard limit allows: without CAP_SYS_RESOURCE the hard limit cannot grow).
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn agent_processes_raise_their_open_file_limit() {
    if !ready() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("nofile");
    let m = env.mount_with(&server.url(), "mnt", &[], |cmd| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 1024, hard)?;
                Ok(())
            });
        }
    });
    let worker = m.agent_pid();
    for pid in [worker, parent_of(worker)] {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
        let field = |i: usize| -> u64 { line.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let (soft, hard) = (field(3), field(4));
        eprintln!("pid {pid}: {line}");
        assert!(soft >= hard.min(65536), "pid {pid} keeps a soft limit of {soft} open files (hard {hard})");
    }
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

// ---------------------------------------------------------------------------------------------------------
// 9. Offline

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_complete_entry_mounts_with_the_registry_stopped() {
    if !ready() {
        return;
    }
    use common::oci::{push_single, reference, OciEnv};
    use common::registry::Registry;
    let fx = fixtures::small();
    let registry = Registry::start();
    let pushed = push_single(&registry, "offline/app", "1.0", &fx.plain.path);
    let layer = pushed.layers[0].clone();
    let blob_url = registry.blob_url("offline/app", &layer.digest);
    let by_tag = reference(&registry.host(), "offline/app", "1.0");
    let by_digest = format!("{}/offline/app@{}", registry.host(), pushed.manifest.digest);
    let env = OciEnv::new("offline");
    {
        let m = env.mount(&by_tag, "mnt", &["prefetch=all"]);
        wait_until(Duration::from_secs(60), "the entry is complete", || m.status().state == "complete");
        m.unmount().assert_success();
        // The digest reference once, so its manifest is known.
        env.mount(&by_digest, "mnt", &[]).unmount().assert_success();
    }
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    drop(registry);
    let big = &fx.big_files()[0];
    for (what, source, oci) in [("blob URL", blob_url.as_str(), false), ("digest", &by_digest, true), ("tag", &by_tag, true)] {
        let mountpoint = env.mountpoint("mnt");
        let started = Instant::now();
        let outcome = if oci {
            env.try_mount_with(source, &mountpoint, &[], |_| {})
        } else {
            env.try_mount(source, &mountpoint, &[])
        };
        assert!(outcome.success(), "{what} with the registry stopped: {}", outcome.describe());
        let took = started.elapsed();
        let warnings = outcome.stderr_lines();
        if what == "tag" {
            assert_eq!(warnings.len(), 1, "one warning line for a tag resolved from the cache: {warnings:?}");
        }
        assert_eq!(std::fs::read(mountpoint.join(&big.rel)).expect("read offline"), fx.read_source(&big.rel));
        let status = status_values(&env);
        eprintln!("offline by {what} in {took:?}: {warnings:?}; status {}", status[0]);
        if what == "tag" {
            let text = status[0].to_string();
            assert!(text.contains("unreachable") || text.contains("offline"), "status does not say so: {text}");
        }
        env.umount(&[mountpoint.to_str().expect("utf-8")]).assert_success();
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    }
    let outcome = env.try_mount_with(&by_tag, &env.mountpoint("mnt"), &["oci.offline=never"], |_| {});
    let line = one_line_failure(&outcome);
    eprintln!("oci.offline=never: {line}");
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

/// An incomplete entry whose metadata is local mounts offline too: what was fetched reads right, what was
/// not gets EIO after the retry bound.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn an_incomplete_entry_mounts_offline_and_missing_data_gets_eio() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let url = server.url();
    let env = TestEnv::new("offline-partial");
    let big = fx.big_files();
    let (read, unread) = (&big[0], &big[1]);
    {
        let m = env.mount(&url, "mnt", &[]);
        assert_eq!(std::fs::read(m.path(&read.rel)).expect("read"), fx.read_source(&read.rel));
        m.unmount().assert_success();
    }
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    drop(server);
    let m = env.mount(&url, "mnt", &["retry_timeout=1"]);
    assert_eq!(std::fs::read(m.path(&read.rel)).expect("read offline"), fx.read_source(&read.rel));
    let started = Instant::now();
    let err = std::fs::read(m.path(&unread.rel)).expect_err("data never fetched cannot be read offline");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "EIO after {:?}", started.elapsed());
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}
