//! Prefetch, trace replay, and complete-and-detach (including the path where
//! the complete file does not match the blob digest).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fault_server::FaultServer;
use common::fixtures;
use common::registry::shared_blob;
use common::wait::wait_until;
use common::{cmd, ready, TestEnv, COMMAND_TIMEOUT, EROFS_FANOTIFY, STATE_DIR_ENV};

/// `erofs-fanotify status --json` for the one mount at `mountpoint`.
fn status(env: &TestEnv, mountpoint: &Path) -> serde_json::Value {
    let out = cmd::run(
        Command::new(EROFS_FANOTIFY).env(STATE_DIR_ENV, &env.state_dir).args(["status", "--json"]),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["mountpoint"] == mountpoint.to_string_lossy().as_ref()).cloned())
        .unwrap_or_else(|| panic!("no status for {}: {all}", mountpoint.display()))
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn prefetch_all_completes_verifies_and_detaches() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("prefetch-all");
    let m = env.mount(&blob.url, "mnt", &["prefetch=all"]);
    wait_until(Duration::from_secs(60), "the prefetch completes and the mark is detached", || {
        status(&env, &m.mountpoint)["state"] == "complete"
    });
    let s = status(&env, &m.mountpoint);
    assert_eq!(num(&s, "populated_bytes"), num(&s, "blob_size"), "{s}");
    let events_before = num(&s, "events");
    // Nothing was read through the mount yet: a cold page cache, and still no events.
    for f in fx.files() {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel), "{}", f.rel.display());
    }
    let s = status(&env, &m.mountpoint);
    assert_eq!(num(&s, "events"), events_before, "reads after detach raised events: {s}");
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn digest_mismatch_is_detected_and_the_mark_stays() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    // A copy of the image whose bytes we change after the server has named
    // it by its digest: the remote now serves bytes that do not match it.
    let env = TestEnv::new("mismatch");
    let image = env.root.join("image.erofs");
    std::fs::copy(&fx.plain.path, &image).expect("copy image");
    let server = FaultServer::serve(&image);
    let big = &fx.big_files()[0];
    let source = fx.read_source(&big.rel);
    let needle = &source[source.len() / 2..source.len() / 2 + 64];
    let mut bytes = std::fs::read(&image).expect("read image");
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("file data in the image");
    bytes[at] ^= 0xff;
    std::fs::write(&image, &bytes).expect("corrupt the served copy in place");
    let m = env.mount(&server.url(), "mnt", &["prefetch=all"]);
    wait_until(Duration::from_secs(60), "the digest check fails twice", || {
        num(&status(&env, &m.mountpoint), "verify_failures") >= 2
    });
    let s = status(&env, &m.mountpoint);
    assert_eq!(s["state"], "digest-mismatch", "{s}");
    // The mark is still there: a first read through the mount raises events.
    let events_before = num(&s, "events");
    let other = &fx.small_files(1)[0];
    assert_eq!(std::fs::read(m.path(&other.rel)).expect("read"), fx.read_source(&other.rel));
    assert!(num(&status(&env, &m.mountpoint), "events") > events_before, "no events: the mark was removed");
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_trace_replayed_as_prefetch_serves_the_workload_without_fetching() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let files = fx.small_files(4);
    let big = fx.big_files()[0].clone();
    let env = TestEnv::new("trace");
    let trace_file = env.root.join("workload.trace");
    {
        let m = env.mount(&blob.url, "mnt", &["record_trace"]);
        for f in files.iter().chain(std::iter::once(&big)) {
            assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
        }
        cmd::run(
            Command::new(EROFS_FANOTIFY)
                .env(STATE_DIR_ENV, &env.state_dir)
                .arg("trace")
                .arg(&m.mountpoint)
                .arg("--output")
                .arg(&trace_file),
            COMMAND_TIMEOUT,
        )
        .assert_success();
        m.unmount().assert_success();
    }
    let text = std::fs::read_to_string(&trace_file).expect("trace file");
    assert!(text.starts_with("# erofs-fanotify trace v1"), "{text}");
    assert!(text.lines().filter(|l| !l.starts_with('#')).count() > 0, "empty trace");
    // A fresh cache: only the trace's prefetch may fill it.
    let env2 = TestEnv::new("trace-replay");
    let opt = format!("prefetch_trace={}", trace_file.display());
    let m = env2.mount(&blob.url, "mnt", &[opt.as_str()]);
    let traced: u64 = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut p = l.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some(p.next()??.abs_diff(p.next()??))
        })
        .sum();
    wait_until(Duration::from_secs(30), "the traced ranges are prefetched", || {
        let s = status(&env2, &m.mountpoint);
        s["prefetch_active"] == false && num(&s, "prefetched_bytes") > 0
    });
    assert!(num(&status(&env2, &m.mountpoint), "populated_bytes") >= traced);
    let fetched = num(&status(&env2, &m.mountpoint), "fetched_bytes");
    for f in files.iter().chain(std::iter::once(&big)) {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel));
    }
    let after = status(&env2, &m.mountpoint);
    assert_eq!(num(&after, "fetched_bytes"), fetched, "the replayed workload still fetched: {after}");
    m.unmount().assert_success();
    env2.assert_nothing_left(&[]);
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn a_bad_trace_file_fails_the_mount_cleanly() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("bad-trace");
    let trace_file = env.root.join("bad.trace");
    std::fs::write(&trace_file, "10 5\n").expect("write");
    let opt = format!("prefetch_trace={}", trace_file.display());
    let out = env.try_mount(&blob.url, &env.mountpoint("mnt"), &[opt.as_str()]);
    assert!(!out.status.success(), "a bad trace was accepted");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("prefetch_trace"), "{}", out.stderr);
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn prefetch_files_fetches_those_files_after_mounting() {
    if !ready() {
        return;
    }
    let fx = fixtures::small();
    let blob = shared_blob(&fx.lz4.path);
    let env = TestEnv::new("prefetch-files");
    let mut files: Vec<_> = fx.small_files(4);
    files.push(fx.big_files()[0].clone());
    let list = env.root.join("files.txt");
    let text: String = files.iter().map(|f| format!("/{}\n", f.rel.display())).collect();
    std::fs::write(&list, text).expect("write list");
    let opt = format!("prefetch_files={}", list.display());
    let m = env.mount(&blob.url, "mnt", &[opt.as_str()]);
    wait_until(Duration::from_secs(30), "the listed files are prefetched", || {
        let s = status(&env, &m.mountpoint);
        s["prefetch_active"] == false && num(&s, "prefetched_bytes") > 0
    });
    let fetched = num(&status(&env, &m.mountpoint), "fetched_bytes");
    for f in &files {
        assert_eq!(std::fs::read(m.path(&f.rel)).expect("read"), fx.read_source(&f.rel), "{}", f.rel.display());
    }
    let after = status(&env, &m.mountpoint);
    assert_eq!(num(&after, "fetched_bytes"), fetched, "reading prefetched files still fetched: {after}");
    m.unmount().assert_success();
    env.assert_nothing_left(&[]);
}
