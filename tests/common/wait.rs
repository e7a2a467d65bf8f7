//! Polling with deadlines: tests wait for asynchronous effects (an agent exiting, a record vanishing) but
//! never forever.

use std::time::{Duration, Instant};

/// Polls `done` every 20 ms until it returns true or `timeout` passes; returns whether it became true.
pub fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like `poll_until`, but panics with `what` when the deadline passes.
pub fn wait_until(timeout: Duration, what: &str, done: impl FnMut() -> bool) {
    let start = Instant::now();
    if !poll_until(timeout, done) {
        panic!(
            "timed out after {:.1?} waiting until {what}",
            start.elapsed()
        );
    }
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    wait_until(timeout, what, || {
        found = probe();
        found.is_some()
    });
    found.expect("wait_until returned true")
}
