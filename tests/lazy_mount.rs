//! Core lazy mount: cold mounts of blobs on a real docker-registry (127.0.0.1) read back byte-identical,
//! a few small reads fetch a small part of the blob, mmap reads and concurrent readers are correct.
//!
//! Fixture: the large tree (>= 100 MiB, thousands of small files, deep tree, xattrs, symlinks, empty files)
//! as a plain and an lz4 image, pushed once to this binary's shared registry. Every test uses its own cache
//! dir, so every mount is cold.

mod common;

use std::path::Path;

use common::fixtures::{self, FileEntry, Image};
use common::registry::shared_blob;
use common::tree::{assert_same_bytes, assert_tree_identical, compare_contents, mmap_read};
use common::{ready, TestEnv, GONE_TIMEOUT, MIB};

/// Mounts `image` cold, compares the whole tree, checks the counters, unmounts.
fn cold_mount_reads_identical_tree(image: &Image, label: &str) {
    let fx = fixtures::large();
    let blob = shared_blob(&image.path);
    let env = TestEnv::new(label);
    let m = env.mount(&blob.url, "mnt", &[]);

    let status = m.status();
    assert_eq!(status.mountpoint, m.mountpoint.to_string_lossy());
    assert_eq!(status.source, blob.url);
    assert_eq!(status.blob_size, image.size);
    let digest = status.digest.clone().unwrap_or_default();
    assert!(
        digest.contains(blob.hex()),
        "status digest {digest:?}, blob {}",
        blob.digest
    );
    assert!(
        common::env::agent_alive(status.agent_pid),
        "agent {} not running",
        status.agent_pid
    );
    eprintln!(
        "after mount: fetched {} of {} bytes",
        status.fetched_bytes, image.size
    );

    let report = assert_tree_identical(&fx.tree, &m.mountpoint);
    assert!(
        report.files > 5000 && report.bytes >= 100 * MIB,
        "{report:?}"
    );

    let status = m.status();
    eprintln!("after reading everything: {status:?}");
    assert_eq!(
        status.fetch_errors, 0,
        "a healthy registry gave fetch errors"
    );
    assert!(status.events > 0, "no pre-content events were counted");
    assert!(
        status.populated_bytes <= image.size,
        "populated {} > blob {}",
        status.populated_bytes,
        image.size
    );
    // Every file's data was read, so nearly the whole blob must be present now.
    assert!(
        status.populated_bytes >= image.size / 10 * 9,
        "populated only {} of {} bytes after reading every file",
        status.populated_bytes,
        image.size
    );
    assert!(
        status.fetched_bytes >= status.populated_bytes / 2,
        "{status:?}"
    );

    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn cold_mount_plain_image_is_byte_identical() {
    if !ready() {
        return;
    }
    cold_mount_reads_identical_tree(&fixtures::large().plain, "cold-plain");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn cold_mount_lz4_image_is_byte_identical() {
    if !ready() {
        return;
    }
    cold_mount_reads_identical_tree(&fixtures::large().lz4, "cold-lz4");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn reading_three_small_files_fetches_little() {
    if !ready() {
        return;
    }
    let fx = fixtures::large();
    let blob = shared_blob(&fx.plain.path);
    let env = TestEnv::new("three-small");
    let m = env.mount(&blob.url, "mnt", &[]);
    let after_mount = m.status().fetched_bytes;
    for file in fx.small_files(3) {
        let got = std::fs::read(m.path(&file.rel))
            .unwrap_or_else(|e| panic!("read {}: {e}", file.rel.display()));
        assert_same_bytes(
            &fx.read_source(&file.rel),
            &got,
            &file.rel.display().to_string(),
        );
    }
    let status = m.status();
    eprintln!(
        "fetched {after_mount} bytes at mount, {} after three small files, blob {}",
        status.fetched_bytes, blob.size
    );
    assert!(
        status.fetched_bytes > after_mount,
        "reading cold files fetched nothing: {status:?}"
    );
    assert!(
        status.fetched_bytes < blob.size * 3 / 10,
        "reading three small files fetched {} of {} bytes (>= 30%): not lazy",
        status.fetched_bytes,
        blob.size
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn mmap_reads_are_correct() {
    if !ready() {
        return;
    }
    let fx = fixtures::large();
    let env = TestEnv::new("mmap");
    let plain = env.mount(&shared_blob(&fx.plain.path).url, "plain", &[]);
    let lz4 = env.mount(&shared_blob(&fx.lz4.path).url, "lz4", &[]);
    let mut files: Vec<FileEntry> = fx.big_files();
    for rel in [
        "edges/rand-4097",
        "edges/text-65537",
        "special/many-xattrs",
        "special/hard-b",
    ] {
        files.push(fx.file(rel));
    }
    files.push(
        fx.files()
            .iter()
            .find(|f| f.rel.ends_with("leaf.bin"))
            .expect("deep leaf")
            .clone(),
    );
    files.extend(fx.small_files(2));
    for m in [&plain, &lz4] {
        for f in &files {
            let got = mmap_read(&m.path(&f.rel))
                .unwrap_or_else(|e| panic!("mmap {}: {e}", f.rel.display()));
            assert_same_bytes(
                &fx.read_source(&f.rel),
                &got,
                &format!("mmap of {} in {}", f.rel.display(), m.mountpoint.display()),
            );
        }
    }
}

/// 8 readers at once on a cold mount: all read every big file (each starting with a different one, so
/// the same cold ranges are wanted by several readers at once) and an eighth of the small files each.
fn concurrent_readers_are_correct(image: &Image, label: &str) {
    let fx = fixtures::large();
    let env = TestEnv::new(label);
    let m = env.mount(&shared_blob(&image.path).url, "mnt", &[]);
    let big = fx.big_files();
    let all = fx.files();
    let errors: Vec<String> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..8)
            .map(|reader| {
                let (big, m) = (&big, &m);
                scope.spawn(move || {
                    let mut errors = Vec::new();
                    let mut check = |rel: &Path| {
                        if let Err(e) = compare_contents(&fx.source(rel), &m.path(rel)) {
                            errors.push(format!("reader {reader}: {}: {e}", rel.display()));
                        }
                    };
                    for k in 0..big.len() {
                        check(&big[(reader + k) % big.len()].rel);
                    }
                    for f in all.iter().skip(reader).step_by(8) {
                        check(&f.rel);
                    }
                    errors
                })
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().expect("reader thread panicked"))
            .collect()
    });
    assert!(
        errors.is_empty(),
        "{} read errors:\n  {}",
        errors.len(),
        errors
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_eq!(m.status().fetch_errors, 0);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn eight_concurrent_readers_plain() {
    if !ready() {
        return;
    }
    concurrent_readers_are_correct(&fixtures::large().plain, "concurrent-plain");
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn eight_concurrent_readers_lz4() {
    if !ready() {
        return;
    }
    concurrent_readers_are_correct(&fixtures::large().lz4, "concurrent-lz4");
}
