//! No silent zeros: any single agent process may die (kill -9) while readers
//! wait, and every byte read is still right; restarts lose nothing fetched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env::agent_alive;
use common::fault_server::FaultServer;
use common::fixtures::{self, Rng};
use common::registry::shared_blob;
use common::wait::wait_until;
use common::{cmd, ready, TestEnv, COMMAND_TIMEOUT, EROFS_FANOTIFY, STATE_DIR_ENV};
use sha2::{Digest, Sha256};

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
}

fn kill9(pid: i32) {
    assert!(pid > 1, "refusing to kill pid {pid}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

/// The worker serving `mountpoint` now (from status), and its supervisor.
fn agent_pids(env: &TestEnv, mountpoint: &Path) -> (i32, i32) {
    let all = env.status();
    let s = all
        .iter()
        .find(|s| Path::new(&s.mountpoint) == mountpoint)
        .unwrap_or_else(|| panic!("no status for {}: {all:?}", mountpoint.display()));
    (s.agent_pid, parent_of(s.agent_pid))
}

/// Everything the agents of this env logged.
fn agent_logs(env: &TestEnv) -> String {
    let mut all = String::new();
    if let Ok(entries) = std::fs::read_dir(env.state_dir.join("agents")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    all
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

struct ReadTally {
    bytes: AtomicU64,
    wrong: AtomicU64,
    longest_ms: AtomicU64,
}

/// `readers` threads each read every file of the fixture through the mount,
/// comparing checksums with the source tree; returns the failures.
fn read_all_concurrently(root: &Path, readers: usize, tally: &Arc<ReadTally>) -> Vec<String> {
    let fx = fixtures::small();
    let files: Vec<(PathBuf, [u8; 32])> =
        fx.files().iter().map(|f| (f.rel.clone(), sha(&fx.read_source(&f.rel)))).collect();
    let files = Arc::new(files);
    let handles: Vec<_> = (0..readers)
        .map(|i| {
            let files = Arc::clone(&files);
            let tally = Arc::clone(tally);
            let root = root.to_path_buf();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                // Start each reader at a different file so they contend.
                let n = files.len();
                for k in 0..n {
                    let (rel, want) = &files[(k + i * 7) % n];
                    let started = Instant::now();
                    match std::fs::read(root.join(rel)) {
                        Ok(data) => {
                            tally.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            if sha(&data) != *want {
                                tally.wrong.fetch_add(1, Ordering::Relaxed);
                                failures.push(format!("{}: wrong bytes", rel.display()));
                            }
                        }
                        Err(e) => failures.push(format!("{}: {e}", rel.display())),
                    }
                    let ms = started.elapsed().as_millis() as u64;
                    tally.longest_ms.fetch_max(ms, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec!["reader panicked".into()])).collect()
}

/// Three rounds of 16 readers over a cold cache; in each, the server is held
/// so readers are blocked on fetches, one agent process is killed at a random
/// moment, and the server released.
fn kill_during_reads(victim: &str) {
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let mut rng = Rng::new(0x6b11_1000 + victim.len() as u64);
    let tally = Arc::new(ReadTally { bytes: AtomicU64::new(0), wrong: AtomicU64::new(0), longest_ms: AtomicU64::new(0) });
    let mut kills = 0;
    let mut orphans_answered = 0;
    for round in 0..3 {
        let env = TestEnv::new(&format!("kill-{victim}-{round}"));
        let m = env.mount(&server.url(), "mnt", &["fetch_unit=64K"]);
        let (worker, supervisor) = agent_pids(&env, &m.mountpoint);
        assert!(supervisor > 1 && agent_alive(supervisor), "no supervisor for worker {worker}");
        server.stall();
        let root = m.mountpoint.clone();
        let tally2 = Arc::clone(&tally);
        let readers = std::thread::spawn(move || read_all_concurrently(&root, 16, &tally2));
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        let killed = if victim == "worker" { worker } else { supervisor };
        kill9(killed);
        kills += 1;
        let killed_at = Instant::now();
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        server.resume();
        let failures = readers.join().expect("readers");
        let after_kill = killed_at.elapsed();
        assert!(failures.is_empty(), "round {round}, {victim} killed: {failures:?}");
        assert!(after_kill < Duration::from_secs(10), "readers needed {after_kill:?} after the kill");
        // A successor serves the mount.
        let (new_worker, new_supervisor) = agent_pids(&env, &m.mountpoint);
        if victim == "worker" {
            assert_ne!(new_worker, worker, "the worker was not replaced");
        } else {
            assert_eq!(new_worker, worker, "the worker should have survived its supervisor");
            assert_ne!(new_supervisor, supervisor);
        }
        assert!(agent_alive(new_supervisor), "no supervisor after the kill");
        orphans_answered += agent_logs(&env).matches("orphaned event answered").count();
        m.unmount().assert_success();
        env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    }
    if victim == "worker" {
        // Readers were blocked on held fetches when each worker died.
        assert!(orphans_answered > 0, "no orphaned event was answered by a successor");
    }
    eprintln!(
        "kill -9 {victim}: kills={kills} orphans_answered={orphans_answered} bytes_verified={} wrong_files={} longest_read_ms={}",
        tally.bytes.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.longest_ms.load(Ordering::Relaxed)
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn kill_worker_during_concurrent_reads() {
    if !ready() {
        return;
    }
    kill_during_reads("worker");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn kill_supervisor_during_concurrent_reads() {
    if !ready() {
        return;
    }
    kill_during_reads("supervisor");
}

/// The mount's front end waits for its agent; killing the worker while the
/// metadata is being fetched makes the mount fail cleanly (or succeed).
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn kill_during_metadata_prefetch() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new("kill-prefetch");
    let mountpoint = env.mountpoint("mnt");
    server.stall();
    let mut child = env.mount_command(&server.url(), &mountpoint, &[]).spawn().expect("spawn erofs-mount");
    // Wait until the worker exists (child of the supervisor, child of erofs-mount).
    let front = child.id() as i32;
    let mut worker = 0;
    wait_until(Duration::from_secs(20), "a worker is fetching metadata", || {
        worker = env.agents().into_iter().find(|&p| parent_of(parent_of(p)) == front).unwrap_or(0);
        worker != 0 && server.held_requests() > 0
    });
    kill9(worker);
    server.resume();
    let status = child.wait().expect("erofs-mount exits");
    if status.success() {
        // It may have been a supervisor we caught; the mount must then be right.
        let rel = &fx.small_files(1)[0].rel;
        assert_eq!(std::fs::read(mountpoint.join(rel)).expect("read"), fx.read_source(rel));
        cmd::run(env.command(common::EROFS_UMOUNT).arg(&mountpoint), COMMAND_TIMEOUT).assert_success();
    }
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
    assert!(
        status.success() || env.cache_files().is_empty(),
        "a failed mount left cache files: {:?}",
        env.cache_files()
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn remount_fetches_nothing_already_present() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("remount");
    let m = env.mount(&blob.url, "mnt", &[]);
    let files = fx.small_files(4);
    for f in &files {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
    }
    assert!(m.status().fetched_bytes > 0);
    m.unmount().assert_success();
    let m = env.mount(&blob.url, "mnt", &[]);
    for f in &files {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
    }
    assert_eq!(m.status().fetched_bytes, 0, "a remount refetched data: {:?}", m.status());
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
    // Host reboot: every process gone and /run wiped; the cache dir survives.
    std::fs::remove_dir_all(&env.state_dir).expect("wipe the state dir");
    let m = env.mount(&blob.url, "mnt", &[]);
    for f in &files {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
    }
    assert_eq!(m.status().fetched_bytes, 0, "after a simulated reboot: {:?}", m.status());
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
}

/// SIGTERM and SIGINT, twice, to either agent process while a mount is
/// alive: nothing closes the group, reads keep working.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn termination_signals_do_not_close_the_group() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("signals");
    let m = env.mount(&blob.url, "mnt", &[]);
    let (worker, supervisor) = agent_pids(&env, &m.mountpoint);
    for sig in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        for pid in [worker, supervisor, worker, supervisor] {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent_alive(worker) && agent_alive(supervisor), "a signal ended an agent process");
    for f in fx.big_files() {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
    }
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

/// A damaged bitmap or a replaced cache file is detected: data is fetched
/// again, never trusted.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn damaged_bitmap_or_replaced_cache_file_is_not_trusted() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let files = fx.small_files(4);
    for damage in ["truncate", "bitflip", "replace-blob"] {
        let env = TestEnv::new(&format!("damage-{damage}"));
        let m = env.mount(&blob.url, "mnt", &[]);
        for f in &files {
            assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
        }
        m.unmount().assert_success();
        env.assert_nothing_left(&[]);
        let entry = env
            .cache_entries_for(blob.hex())
            .into_iter()
            .find(|p| p.is_dir())
            .unwrap_or_else(|| panic!("no cache entry for {}", blob.hex()));
        let bitmap = entry.join("bitmap");
        let blob_path = entry.join("blob");
        match damage {
            "truncate" => {
                let len = std::fs::metadata(&bitmap).expect("bitmap").len();
                let f = std::fs::OpenOptions::new().write(true).open(&bitmap).expect("open");
                f.set_len(len / 2).expect("truncate");
            }
            "bitflip" => {
                let mut b = std::fs::read(&bitmap).expect("bitmap");
                let i = b.len() / 2;
                b[i] ^= 0x10;
                std::fs::write(&bitmap, b).expect("write");
            }
            _ => {
                // Same size, garbage content, new inode.
                let size = std::fs::metadata(&blob_path).expect("blob").len();
                let tmp = entry.join("blob.new");
                std::fs::write(&tmp, vec![0xa5u8; size as usize]).expect("write");
                std::fs::rename(&tmp, &blob_path).expect("rename");
            }
        }
        let m = env.mount(&blob.url, "mnt", &[]);
        for f in &files {
            assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel), "{damage}");
        }
        assert!(m.status().fetched_bytes > 0, "{damage}: nothing refetched, so the damage was trusted");
        m.unmount().assert_success();
        env.assert_nothing_left(&[]);
    }
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn upgrade_during_a_read_loop_fails_no_read() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("upgrade");
    let m = env.mount(&blob.url, "mnt", &["fetch_unit=64K"]);
    let before = m.agent_pid();
    let tally = Arc::new(ReadTally { bytes: AtomicU64::new(0), wrong: AtomicU64::new(0), longest_ms: AtomicU64::new(0) });
    let root = m.mountpoint.clone();
    let tally2 = Arc::clone(&tally);
    let readers = std::thread::spawn(move || {
        let mut failures = Vec::new();
        for _ in 0..3 {
            failures.extend(read_all_concurrently(&root, 4, &tally2));
        }
        failures
    });
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(100));
        let out = cmd::run(
            Command::new(EROFS_FANOTIFY).env(STATE_DIR_ENV, &env.state_dir).arg("upgrade").arg(&m.mountpoint),
            COMMAND_TIMEOUT,
        );
        out.assert_success();
    }
    let failures = readers.join().expect("readers");
    assert!(failures.is_empty(), "reads failed across an upgrade: {failures:?}");
    assert_ne!(agent_pids(&env, &m.mountpoint).0, before, "the worker was not replaced");
    m.unmount().assert_success();
    env.assert_nothing_left_within(Duration::from_secs(10), &[]);
}

/// The one case the kernel gives us no way to protect: every agent process
/// dies at once. The group closes, the kernel allows what was pending, and
/// a read of data never fetched returns zeros from the sparse cache file.
/// What we guarantee then: status says the agent is gone, and erofs-umount
/// cleans up the stale record.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn all_agent_processes_dying_at_once_is_documented() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("all-die");
    let m = env.mount(&blob.url, "mnt", &[]);
    let (worker, supervisor) = agent_pids(&env, &m.mountpoint);
    kill9(supervisor);
    kill9(worker);
    wait_until(Duration::from_secs(5), "both agent processes are gone", || {
        !agent_alive(worker) && !agent_alive(supervisor)
    });
    // A new supervisor may have been started by the worker in the instant
    // before it died; give that one the same fate.
    // Killed again on every look: one started in that instant may itself start another before it dies.
    wait_until(Duration::from_secs(10), "no agent process is left", || {
        let left = env.agents();
        for &pid in left.iter().filter(|&&p| p > 1) {
            // It may have exited between the look and the signal.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        left.is_empty()
    });
    let big = &fx.big_files()[0];
    let data = std::fs::read(m.path(&big.rel)).expect("the read is allowed by the closed group");
    assert_eq!(data.len() as u64, big.size);
    assert_ne!(data, fx.read_source(&big.rel), "data never fetched cannot be right");
    assert!(data.iter().all(|&b| b == 0), "unfetched data reads as the cache file's holes");
    let out = cmd::run(
        Command::new(EROFS_FANOTIFY).env(STATE_DIR_ENV, &env.state_dir).args(["status", "--json"]),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(status[0]["agent_state"], "gone", "{status}");
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
}
