//! Self-tests of the test harness (tests/common): the fault server, the registry wrapper, the fixtures
//! (checked against a plain kernel mount of their images, no fanotify, no loop device) and the tree
//! comparison. When the mount tests fail, these say whether the harness or the code under test is wrong.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault_server::{parse_range, FaultServer};
use common::fixtures::{self, random_bytes};
use common::http;
use common::registry::Registry;
use common::tree::{assert_tree_identical, compare_trees, mmap_read};
use common::{require, Need};

fn temp_file_with(data: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(data).expect("write temp file");
    file.flush().expect("flush");
    file
}

#[test]
fn range_header_parsing() {
    assert_eq!(parse_range("bytes=0-99", 1000), Some(Ok((0, 99))));
    assert_eq!(parse_range("bytes=900-", 1000), Some(Ok((900, 999))));
    assert_eq!(parse_range("bytes=900-5000", 1000), Some(Ok((900, 999))));
    assert_eq!(parse_range("bytes=-10", 1000), Some(Ok((990, 999))));
    assert_eq!(parse_range("bytes=-5000", 1000), Some(Ok((0, 999))));
    assert_eq!(parse_range("bytes=1000-1001", 1000), Some(Err(())));
    assert_eq!(parse_range("bytes=5-1", 1000), None);
    assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
    assert_eq!(parse_range("items=0-1", 1000), None);
}

#[test]
fn fault_server_serves_ranges_head_and_416() {
    let data = random_bytes(1, 300 * 1024 + 5);
    let file = temp_file_with(&data);
    let server = FaultServer::serve(file.path());
    let url = server.url();
    assert!(url.contains("/v2/faults/blobs/sha256:"), "{url}");

    let head = http::head(&url).expect("HEAD");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(head.header("accept-ranges"), Some("bytes"));

    let full = http::get(&url).expect("GET");
    assert_eq!(full.status, 200);
    assert!(full.body == data, "full body differs");

    let part = http::get_range(&url, 4096, 8191).expect("range GET");
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 4096-8191/{}", data.len()).as_str())
    );
    assert!(part.body == data[4096..8192]);

    // A range running past EOF is clipped.
    let tail =
        http::get_range(&url, data.len() as u64 - 10, data.len() as u64 + 100).expect("tail GET");
    assert_eq!(tail.status, 206);
    assert!(tail.body == data[data.len() - 10..]);

    let suffix = http::request("GET", &url, &[("Range", "bytes=-7")], http::Body::Empty)
        .expect("suffix GET");
    assert_eq!(suffix.status, 206);
    assert!(suffix.body == data[data.len() - 7..]);

    let past =
        http::get_range(&url, data.len() as u64, data.len() as u64 + 10).expect("past-EOF GET");
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{}", data.len()).as_str())
    );

    let missing =
        http::get(&format!("{}/v2/faults/blobs/sha256:00", server.base_url())).expect("404 GET");
    assert_eq!(missing.status, 404);
    assert_eq!(
        http::get(&format!("{}/v2/", server.base_url()))
            .expect("/v2/")
            .status,
        200
    );

    let stats = server.stats();
    assert_eq!(stats.requests, 8);
    assert_eq!(stats.heads, 1);
    assert_eq!(stats.bytes_served, (data.len() + 4096 + 10 + 7) as u64);
    assert!(stats.ranges.contains(&(4096, 8191)), "{:?}", stats.ranges);
}

#[test]
fn fault_server_keeps_connections_alive() {
    let data = random_bytes(2, 10_000);
    let file = temp_file_with(&data);
    let server = FaultServer::serve(file.path());
    let (host, path) = http::split_url(&server.url()).expect("url");
    let mut stream = TcpStream::connect(&host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-9\r\n\r\n");
    stream
        .write_all(format!("{request}{request}").as_bytes())
        .expect("two pipelined requests");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(12).filter(|w| w == b"206 Partial ").count() < 2
        || !got.ends_with(&data[..10])
    {
        let n = stream.read(&mut buf).expect("read responses");
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.stats().connections, 1);
    assert_eq!(server.stats().requests, 2);
}

#[test]
fn fault_server_injects_faults() {
    let data = random_bytes(3, 2 * 1024 * 1024);
    let file = temp_file_with(&data);
    let server = FaultServer::serve(file.path());
    let url = server.url();

    // 500s, then success.
    server.fail_next(2);
    assert_eq!(http::get_range(&url, 0, 99).expect("GET").status, 500);
    assert_eq!(http::head(&url).expect("HEAD").status, 500);
    let ok = http::get_range(&url, 0, 99).expect("GET");
    assert_eq!(ok.status, 206);
    assert!(ok.body == data[..100]);
    assert_eq!(server.stats().failed_500, 2);

    // A reset mid-body: HEAD does not consume it, the GET sees part of the body and then ECONNRESET.
    server.reset_next(1);
    assert_eq!(http::head(&url).expect("HEAD").status, 200);
    let err = http::get_range(&url, 0, 1024 * 1024 - 1).expect_err("reset must fail the read");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(server.stats().resets, 1);
    assert!(
        server.stats().bytes_served > 100,
        "some body was sent before the reset"
    );

    // A short body: Content-Length promises more than arrives, then EOF.
    server.short_body_next(1);
    let err = http::get_range(&url, 0, 1024 * 1024 - 1).expect_err("short body must fail the read");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(server.stats().short_bodies, 1);
    assert_eq!(server.pending_faults(), (0, 0, 0));

    // A stall: the request is held (the client times out) until resumed.
    server.stall();
    let started = Instant::now();
    let err = http::request_with_timeout(
        "GET",
        &url,
        &[("Range", "bytes=0-9")],
        http::Body::Empty,
        Duration::from_millis(700),
    )
    .expect_err("stalled request must time out");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(server.held_requests(), 1);
    assert_eq!(server.stats().stalled, 1);
    // A stalled request still held by a waiting client is answered after resume.
    let (host, path) = http::split_url(&url).expect("url");
    let mut waiting = TcpStream::connect(&host).expect("connect");
    waiting
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("send");
    common::wait::wait_until(Duration::from_secs(5), "the second request is held", || {
        server.held_requests() == 2
    });
    server.resume();
    let mut answer = Vec::new();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    waiting
        .read_to_end(&mut answer)
        .expect("held request answered after resume");
    assert!(
        answer.starts_with(b"HTTP/1.1 206"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(answer.ends_with(&data[..10]));
    let ok = http::get_range(&url, 10, 19).expect("GET after resume");
    assert!(ok.body == data[10..20]);
    common::wait::wait_until(Duration::from_secs(5), "no request is held", || {
        server.held_requests() == 0
    });
}

#[test]
fn fault_server_drop_releases_stalled_clients() {
    let data = random_bytes(4, 8192);
    let file = temp_file_with(&data);
    let server = FaultServer::serve(file.path());
    server.stall();
    let url = server.url();
    let client = std::thread::spawn(move || {
        http::request_with_timeout("GET", &url, &[], http::Body::Empty, Duration::from_secs(30))
    });
    common::wait::wait_until(Duration::from_secs(5), "the request is held", || {
        server.held_requests() == 1
    });
    let started = Instant::now();
    drop(server);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        started.elapsed()
    );
    assert!(
        client.join().expect("client thread").is_err(),
        "a dropped server answers nothing"
    );
}

#[test]
#[ignore = "needs docker-registry"]
fn registry_push_blob_and_range_get() {
    if !require(&[Need::Registry]) {
        return;
    }
    let registry = Registry::start();
    let pid = registry.pid();
    let data = random_bytes(5, 1024 * 1024 + 3);
    let digest = registry.push_blob("harness/blobs", &data);
    let url = registry.blob_url("harness/blobs", &digest);

    let head = http::head(&url).expect("HEAD blob");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    let part = http::get_range(&url, 4096, 3 * 4096 - 1).expect("range GET");
    assert_eq!(part.status, 206, "{:?}", part.headers);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 4096-12287/{}", data.len()).as_str())
    );
    assert!(part.body == data[4096..3 * 4096]);
    let past = http::get_range(&url, data.len() as u64 + 10, data.len() as u64 + 20)
        .expect("past-EOF GET");
    assert_eq!(past.status, 416);
    assert_eq!(
        http::get(&registry.blob_url("harness/blobs", &format!("sha256:{}", "0".repeat(64))))
            .expect("GET")
            .status,
        404
    );

    // Streaming a file, and pushing twice is a no-op.
    let file = temp_file_with(&random_bytes(6, 3 * 1024 * 1024));
    let file_digest = registry.push_blob_file("harness/blobs", file.path());
    assert_eq!(
        file_digest,
        registry.push_blob_file("harness/blobs", file.path())
    );
    assert_eq!(
        http::get(&registry.blob_url("harness/blobs", &file_digest))
            .expect("GET")
            .body
            .len(),
        3 * 1024 * 1024
    );

    // A manifest referencing pushed blobs.
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = registry.push_blob("harness/image", config);
    let layer_digest = registry.push_blob("harness/image", &data);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.erofs", "digest": layer_digest, "size": data.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).expect("json");
    let manifest_digest = registry.push_manifest(
        "harness/image",
        "v1",
        &manifest,
        "application/vnd.oci.image.manifest.v1+json",
    );
    let got = http::request(
        "GET",
        &format!("{}/v2/harness/image/manifests/v1", registry.base_url()),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        http::Body::Empty,
    )
    .expect("GET manifest");
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );

    drop(registry);
    assert!(
        !common::env::agent_alive(pid),
        "registry {pid} still running after drop"
    );
}

#[test]
#[ignore = "needs docker-registry"]
fn shared_registry_is_reused() {
    if !require(&[Need::Registry]) {
        return;
    }
    let a = common::registry::shared();
    let b = common::registry::shared();
    assert_eq!(a.port(), b.port());
    let blob = common::registry::shared_blob_bytes("harness/shared", b"hello");
    assert_eq!(http::get(&blob.url).expect("GET").body, b"hello");
}

#[test]
#[ignore = "needs root"]
fn tree_comparison_reports_differences() {
    if !require(&[Need::Root]) {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("tree-cmp-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let make = |root: &Path| {
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::write(root.join("d/file"), random_bytes(7, 10_000)).unwrap();
        std::fs::write(root.join("d/e/other"), b"text").unwrap();
        std::os::unix::fs::symlink("d/file", root.join("link")).unwrap();
        let out = std::process::Command::new("setfattr")
            .args(["-n", "user.k", "-v", "v"])
            .arg(root.join("d/file"))
            .output()
            .expect("setfattr");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (a, b) = (base.path().join("a"), base.path().join("b"));
    make(&a);
    make(&b);
    let report = assert_tree_identical(&a, &b);
    assert_eq!(
        (report.files, report.symlinks, report.bytes),
        (2, 1, 10_004)
    );

    let mut bytes = std::fs::read(b.join("d/file")).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(b.join("d/file"), &bytes).unwrap();
    std::fs::set_permissions(
        b.join("d/e/other"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(b.join("link")).unwrap();
    std::os::unix::fs::symlink("d/elsewhere", b.join("link")).unwrap();
    std::fs::write(b.join("d/extra"), b"").unwrap();
    let out = std::process::Command::new("setfattr")
        .args(["-x", "user.k"])
        .arg(b.join("d/file"))
        .output()
        .unwrap();
    assert!(out.status.success());

    let report = compare_trees(&a, &b);
    let all = report.differences.join("\n");
    for expected in [
        "offset 5000",
        "mode 644 in source, 600",
        "symlink",
        "d/extra: extra entry",
        "user xattrs differ",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    std::fs::remove_dir_all(b.join("d/e")).unwrap();
    assert!(compare_trees(&a, &b)
        .differences
        .iter()
        .any(|d| d.contains("d/e: missing")));
}

#[test]
fn mmap_read_matches_read() {
    for len in [1usize, 4096, 7 * 4096, 100_003] {
        let data = random_bytes(len as u64, len);
        let file = temp_file_with(&data);
        assert!(mmap_read(file.path()).expect("mmap") == data, "len {len}");
    }
    let empty = temp_file_with(b"");
    assert!(mmap_read(empty.path()).expect("mmap empty").is_empty());
}

#[test]
#[should_panic(expected = "stdout stayed open")]
fn command_runner_flags_daemons_holding_stdio() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "(sleep 6) & exit 0"]);
    common::cmd::run(&mut cmd, Duration::from_secs(10));
}

/// Mounts `image` with a plain kernel mount (file-backed EROFS) and compares it with `tree`.
fn check_image(image: &Path, tree: &Path) -> common::tree::TreeReport {
    let dir = tempfile::Builder::new()
        .prefix("fixture-check-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let mountpoint = dir.path().join("mnt");
    common::env::mount_erofs_file(image, &mountpoint)
        .expect("plain erofs mount of the fixture image");
    let _guard = common::env::PlainMount(mountpoint.clone());
    assert_tree_identical(tree, &mountpoint)
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs"]
fn small_fixture_images_match_tree() {
    if !require(&[Need::Root, Need::MkfsErofs, Need::Kernel]) {
        return;
    }
    let fx = fixtures::small();
    for image in [&fx.plain, &fx.lz4] {
        let report = check_image(&image.path, &fx.tree);
        assert_eq!(
            report.bytes,
            fx.files().iter().map(|f| f.size).sum::<u64>(),
            "{}",
            image.path.display()
        );
    }
    assert!(fx.lz4.size < fx.plain.size, "lz4 image should be smaller");
    assert_eq!(fx.small_files(3).len(), 3);
    assert_eq!(fx.big_files().len(), 3);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs"]
fn large_fixture_images_match_tree() {
    if !require(&[Need::Root, Need::MkfsErofs, Need::Kernel]) {
        return;
    }
    let fx = fixtures::large();
    assert!(fx.tree_bytes >= 100 * common::MIB, "{}", fx.tree_bytes);
    assert!(fx.plain.size >= 100 * common::MIB, "{}", fx.plain.size);
    assert!(fx.files().len() >= 5000, "{}", fx.files().len());
    assert!(
        fx.files().iter().any(|f| f.rel.components().count() >= 42),
        "the deep tree must reach depth >= 40"
    );
    for image in [&fx.plain, &fx.lz4] {
        let report = check_image(&image.path, &fx.tree);
        assert_eq!(
            report.bytes,
            fx.files().iter().map(|f| f.size).sum::<u64>(),
            "{}",
            image.path.display()
        );
        eprintln!("{}: {} bytes, {report:?}", image.path.display(), image.size);
    }
    assert!(
        fx.lz4.size * 10 < fx.plain.size * 8,
        "lz4 must matter: {} vs {}",
        fx.lz4.size,
        fx.plain.size
    );
}
