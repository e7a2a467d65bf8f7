//! Remote faults, injected by the in-process FaultServer after the mount succeeded while it was healthy:
//! a 500 then success, a connection reset mid-body and a short body are retried and readers get the right
//! bytes; a stalled server makes readers get EIO within the configured timeouts, and once it recovers a
//! new read of the same file succeeds.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::fault_server::FaultServer;
use common::fixtures;
use common::tree::assert_same_bytes;
use common::{ready, Mounted, TestEnv};

/// Field order is drop order: unmount first, then stop the server, then tear down the env.
struct Setup {
    m: Mounted,
    server: FaultServer,
    env: TestEnv,
}

fn setup(label: &str, extra: &[&str]) -> Setup {
    let fx = fixtures::small();
    let server = FaultServer::serve(&fx.plain.path);
    let env = TestEnv::new(label);
    let m = env.mount(&server.url(), "mnt", extra);
    Setup { m, server, env }
}

/// Reads `rel` through the mount and compares it with the source.
fn read_and_compare(s: &Setup, rel: &str) {
    let fx = fixtures::small();
    let got = std::fs::read(s.m.path(rel))
        .unwrap_or_else(|e| panic!("read {rel} through the mount: {e}"));
    assert_same_bytes(&fx.read_source(rel), &got, rel);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn http_500_then_success() {
    if !ready() {
        return;
    }
    let s = setup("fault-500", &["fetch_timeout=5", "retry_timeout=20"]);
    let before = s.server.stats();
    s.server.fail_next(1);
    read_and_compare(&s, "big/random-3m");
    let after = s.server.stats();
    assert_eq!(
        after.failed_500 - before.failed_500,
        1,
        "the read never reached the server: {after:?}"
    );
    assert!(
        after.gets - before.gets >= 2,
        "no retry after the 500: {after:?}"
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn repeated_500s_within_the_retry_budget() {
    if !ready() {
        return;
    }
    let s = setup("fault-500x3", &["fetch_timeout=5", "retry_timeout=20"]);
    s.server.fail_next(3);
    read_and_compare(&s, "big/text-2m");
    assert_eq!(s.server.stats().failed_500, 3);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn connection_reset_mid_body_is_retried() {
    if !ready() {
        return;
    }
    let s = setup("fault-reset", &["fetch_timeout=5", "retry_timeout=20"]);
    s.server.reset_next(1);
    read_and_compare(&s, "big/random-3m");
    assert_eq!(
        s.server.stats().resets,
        1,
        "the reset was never injected: {:?}",
        s.server.stats()
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn short_body_is_retried() {
    if !ready() {
        return;
    }
    let s = setup("fault-short", &["fetch_timeout=5", "retry_timeout=20"]);
    s.server.short_body_next(1);
    read_and_compare(&s, "big/mixed-odd");
    assert_eq!(
        s.server.stats().short_bodies,
        1,
        "the short body was never injected: {:?}",
        s.server.stats()
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn stalled_server_gives_eio_within_bound_then_recovers() {
    if !ready() {
        return;
    }
    const FETCH_TIMEOUT: u64 = 1;
    const RETRY_TIMEOUT: u64 = 3;
    let s = setup(
        "fault-stall",
        &[
            &format!("fetch_timeout={FETCH_TIMEOUT}"),
            &format!("retry_timeout={RETRY_TIMEOUT}"),
        ],
    );
    let rel = "big/random-3m";
    let path = s.m.path(rel);
    let source = fixtures::small().read_source(rel);

    s.server.stall();
    // The read runs in its own thread so that a reader blocked forever fails the test instead of hanging it.
    let (tx, rx) = mpsc::channel();
    let reader_path = path.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = std::fs::File::open(&reader_path).and_then(|f| {
            let mut buf = vec![0u8; 64 * 1024];
            f.read_exact_at(&mut buf, 0).map(|_| buf)
        });
        let _ = tx.send((result, started.elapsed()));
    });
    let bound = Duration::from_secs(RETRY_TIMEOUT + FETCH_TIMEOUT + 5);
    let (result, elapsed) = rx
        .recv_timeout(bound + Duration::from_secs(20))
        .unwrap_or_else(|_| {
            s.server.resume();
            panic!(
                "a reader stayed blocked for more than {:?} with retry_timeout={RETRY_TIMEOUT}s",
                bound + Duration::from_secs(20)
            )
        });
    eprintln!(
        "reader got {:?} after {elapsed:?}; server {:?}; status {:?}",
        result.as_ref().map(|_| ()),
        s.server.stats(),
        s.m.status()
    );
    match result {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "expected EIO, got {e}"),
        Ok(buf) => panic!(
            "the read succeeded while the server was stalled (zeros: {})",
            buf.iter().all(|&b| b == 0)
        ),
    }
    assert!(
        elapsed <= bound,
        "EIO came after {elapsed:?}, bound {bound:?}"
    );
    assert!(
        s.server.stats().stalled >= 1,
        "the fetch never reached the server: {:?}",
        s.server.stats()
    );
    let status = s.m.status();
    assert!(
        status.fetch_errors >= 1,
        "a timed-out fetch is a fetch error: {status:?}"
    );

    s.server.resume();
    let got =
        std::fs::read(&path).unwrap_or_else(|e| panic!("read after the server recovered: {e}"));
    assert_same_bytes(&source, &got, rel);
    let _ = &s.env;
}
