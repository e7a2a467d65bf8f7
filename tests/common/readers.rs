//! Concurrent readers of a mounted fixture: each reads every file through the mount and compares its
//! checksum with the source tree, tallying bytes, wrong files, errors and the longest single read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::fixtures::Fixture;

#[derive(Default, Debug)]
pub struct ReadTally {
    pub bytes: AtomicU64,
    pub files: AtomicU64,
    /// Files whose bytes differ from the source (zeros included).
    pub wrong: AtomicU64,
    /// Reads that failed (EIO, ...).
    pub errors: AtomicU64,
    pub longest_ms: AtomicU64,
}

impl ReadTally {
    pub fn longest(&self) -> Duration {
        Duration::from_millis(self.longest_ms.load(Ordering::Relaxed))
    }
    pub fn wrong(&self) -> u64 {
        self.wrong.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    pub fn files(&self) -> u64 {
        self.files.load(Ordering::Relaxed)
    }
}

pub fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Every regular file of `fx` with the checksum of its source.
pub fn expected(fx: &Fixture) -> Arc<Vec<(PathBuf, [u8; 32])>> {
    Arc::new(fx.files().iter().map(|f| (f.rel.clone(), sha(&fx.read_source(&f.rel)))).collect())
}

/// Starts `readers` threads, each reading every file under `root` once (starting at different files so they
/// contend). The handle yields the failures (`path: what`).
pub fn spawn(root: &Path, fx: &Fixture, readers: usize, tally: &Arc<ReadTally>) -> JoinHandle<Vec<String>> {
    let files = expected(fx);
    let tally = Arc::clone(tally);
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        let handles: Vec<_> = (0..readers)
            .map(|i| {
                let (files, tally, root) = (Arc::clone(&files), Arc::clone(&tally), root.clone());
                std::thread::spawn(move || read_each(&root, &files, i * 7, &tally))
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec!["reader panicked".into()])).collect()
    })
}

fn read_each(root: &Path, files: &[(PathBuf, [u8; 32])], start: usize, tally: &ReadTally) -> Vec<String> {
    let mut failures = Vec::new();
    let n = files.len();
    for k in 0..n {
        let (rel, want) = &files[(k + start) % n];
        let started = Instant::now();
        match std::fs::read(root.join(rel)) {
            Ok(data) => {
                tally.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if sha(&data) != *want {
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{}: wrong bytes", rel.display()));
                }
            }
            Err(e) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                failures.push(format!("{}: {e}", rel.display()));
            }
        }
        tally.files.fetch_add(1, Ordering::Relaxed);
        tally.longest_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    failures
}

/// Joins `handle` if it finishes within `timeout`; `None` (still running) otherwise.
pub fn join_within(handle: JoinHandle<Vec<String>>, timeout: Duration) -> Result<Vec<String>, JoinHandle<Vec<String>>> {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return Err(handle);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(handle.join().unwrap_or_else(|_| vec!["readers panicked".into()]))
}
