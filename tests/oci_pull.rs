//! Mounting by image reference from a real docker-registry on 127.0.0.1 (anonymous, plain http with
//! `oci.insecure`): by tag and by digest, a multi-platform index, a three-layer image with `oci.layer` and
//! `oci.blob`, the legacy containerd media type, other media types, and the clear one-line errors for
//! unknown tags and repositories and wrong platforms; a multi-layer image without a choice mounts merged.
//!
//! Images are small trees built per test process (`common::oci::tiny_image`), each distinct, so a test can
//! tell which one got mounted; one test mounts the realistic large fixture. Every mounted tree is compared
//! with its source (bytes, modes, owners, symlinks, xattrs).

mod common;

use common::fixtures;
use common::http_server::{forward, HttpServer};
use common::oci::{
    push_image, push_index, push_single, reference, tiny_image, LayerSpec, OciEnv, PlatformEntry,
    ERFS_LEGACY_MEDIA_TYPE, ERFS_MEDIA_TYPE, NOT_FOUND, TAR_GZIP_LAYER,
};
use common::registry::Registry;
use common::tree::assert_tree_identical;
use common::{ready, GONE_TIMEOUT, MIB};

/// Mounts `reference`, checks the tree and the status's blob identity, unmounts.
fn mount_and_compare(
    env: &OciEnv,
    reference: &str,
    extra: &[&str],
    tree: &std::path::Path,
    blob_hex: &str,
    blob_size: u64,
) {
    let m = env.mount(reference, "mnt", extra);
    let status = m.status();
    let digest = status.digest.clone().unwrap_or_default();
    assert!(
        digest.contains(blob_hex),
        "status digest {digest:?} is not the chosen layer sha256:{blob_hex}: {status:?}"
    );
    assert_eq!(status.blob_size, blob_size, "{status:?}");
    assert_tree_identical(tree, &m.mountpoint);
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn pull_by_tag_and_by_digest() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let img = tiny_image("by-tag");
    let pushed = push_single(&registry, "test/img", "v1", &img.image.path);
    let env = OciEnv::new("oci-tag-digest");

    let by_tag = reference(&registry.host(), "test/img", "v1");
    mount_and_compare(&env, &by_tag, &[], &img.tree, img.hex(), img.image.size);

    let by_digest = format!("{}/test/img@{}", registry.host(), pushed.manifest.digest);
    mount_and_compare(&env, &by_digest, &[], &img.tree, img.hex(), img.image.size);

    // Tag and digest together: the digest decides.
    let both = format!("{}/test/img:v1@{}", registry.host(), pushed.manifest.digest);
    mount_and_compare(&env, &both, &[], &img.tree, img.hex(), img.image.size);

    // No tag means `latest`.
    let latest = tiny_image("latest-tag");
    push_single(&registry, "test/img", "latest", &latest.image.path);
    let no_tag = format!("{}/test/img", registry.host());
    mount_and_compare(
        &env,
        &no_tag,
        &[],
        &latest.tree,
        latest.hex(),
        latest.image.size,
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn realistic_image_by_tag_is_byte_identical() {
    if !ready() {
        return;
    }
    let fx = fixtures::large();
    let registry = Registry::start();
    push_single(&registry, "library/large", "lz4", &fx.lz4.path);
    let env = OciEnv::new("oci-large");
    let reference = reference(&registry.host(), "library/large", "lz4");
    let started = std::time::Instant::now();
    let m = env.mount(&reference, "mnt", &[]);
    let mounted_in = started.elapsed();
    let status = m.status();
    eprintln!(
        "cold mount of {reference} ({} bytes): {mounted_in:.1?}, {} fetch requests, {} bytes fetched",
        fx.lz4.size, status.fetch_requests, status.fetched_bytes
    );
    assert_eq!(status.blob_size, fx.lz4.size);
    assert!(
        status.fetched_bytes < fx.lz4.size / 4,
        "a lazy mount fetched {} of {} bytes before anything was read",
        status.fetched_bytes,
        fx.lz4.size
    );
    let report = assert_tree_identical(&fx.tree, &m.mountpoint);
    assert!(report.bytes >= 100 * MIB, "{report:?}");
    assert_eq!(m.status().fetch_errors, 0);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // Every HTTP request of a cold mount (manifest + metadata), counted by a proxy in front of the
    // registry (for the closing note; the proxy adds latency, so the time above is the one to
    // quote).
    let upstream = registry.base_url();
    let counter = HttpServer::start("counting-proxy", move |request| forward(&upstream, request));
    let env = OciEnv::new("oci-large-count");
    let via_proxy = common::oci::reference(&counter.host(), "library/large", "lz4");
    let started = std::time::Instant::now();
    let m = env.mount(&via_proxy, "mnt", &[]);
    let mounted_in = started.elapsed();
    let requests = counter.requests();
    let count = |what: &str| requests.iter().filter(|r| r.target.contains(what)).count();
    eprintln!(
        "cold mount through a counting proxy: {} HTTP requests ({} manifest, {} blob, {} other) in {mounted_in:.1?}",
        requests.len(),
        count("/manifests/"),
        count("/blobs/"),
        requests.len() - count("/manifests/") - count("/blobs/")
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn multi_platform_index_picks_host_platform_or_oci_platform() {
    if !ready() {
        return;
    }
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "this test assumes an amd64 host (the default platform must be linux/amd64)"
    );
    let registry = Registry::start();
    let amd64 = tiny_image("platform-amd64");
    let arm64 = tiny_image("platform-arm64");
    fn layer(img: &common::oci::TinyImage) -> Vec<LayerSpec<'_>> {
        vec![LayerSpec {
            path: &img.image.path,
            media_type: ERFS_MEDIA_TYPE,
        }]
    }
    // Children are pushed by digest only; the index gets the tag. arm64 first, so "the first entry" is
    // not the right answer for the default.
    let arm64_pushed = push_image(
        &registry,
        "test/multi",
        "arm64-only",
        &layer(&arm64),
        "linux",
        "arm64",
    );
    let amd64_pushed = push_image(
        &registry,
        "test/multi",
        "amd64-only",
        &layer(&amd64),
        "linux",
        "amd64",
    );
    let index = push_index(
        &registry,
        "test/multi",
        "v1",
        &[
            PlatformEntry {
                image: &arm64_pushed,
                os: "linux",
                arch: "arm64",
                variant: Some("v8"),
            },
            PlatformEntry {
                image: &amd64_pushed,
                os: "linux",
                arch: "amd64",
                variant: None,
            },
        ],
    );
    let env = OciEnv::new("oci-multi");
    let by_tag = reference(&registry.host(), "test/multi", "v1");

    mount_and_compare(
        &env,
        &by_tag,
        &[],
        &amd64.tree,
        amd64.hex(),
        amd64.image.size,
    );
    mount_and_compare(
        &env,
        &by_tag,
        &["oci.platform=linux/arm64"],
        &arm64.tree,
        arm64.hex(),
        arm64.image.size,
    );
    mount_and_compare(
        &env,
        &by_tag,
        &["oci.platform=linux/arm64/v8"],
        &arm64.tree,
        arm64.hex(),
        arm64.image.size,
    );
    // The index by digest works the same way.
    let by_digest = format!("{}/test/multi@{index}", registry.host());
    mount_and_compare(
        &env,
        &by_digest,
        &["oci.platform=linux/amd64"],
        &amd64.tree,
        amd64.hex(),
        amd64.image.size,
    );

    env.assert_mount_fails(
        &by_tag,
        &["oci.platform=linux/s390x"],
        &["platform", "s390x"],
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn three_layer_image_with_oci_layer_and_oci_blob() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let images = [
        tiny_image("layer-0"),
        tiny_image("layer-1"),
        tiny_image("layer-2"),
    ];
    let specs: Vec<LayerSpec> = images
        .iter()
        .map(|i| LayerSpec {
            path: &i.image.path,
            media_type: ERFS_MEDIA_TYPE,
        })
        .collect();
    let pushed = push_image(&registry, "test/layers", "v1", &specs, "linux", "amd64");
    let env = OciEnv::new("oci-layers");
    let by_tag = reference(&registry.host(), "test/layers", "v1");

    // erofs-utils numbering: oci.layer=N is the 0-based index into manifest.layers.
    for (n, img) in images.iter().enumerate() {
        let opt = format!("oci.layer={n}");
        mount_and_compare(&env, &by_tag, &[&opt], &img.tree, img.hex(), img.image.size);
    }
    let opt = format!("oci.blob={}", images[1].image.digest);
    mount_and_compare(
        &env,
        &by_tag,
        &[&opt],
        &images[1].tree,
        images[1].hex(),
        images[1].image.size,
    );

    // No choice: the layers are mounted merged (issue 15). These mkfs.erofs layers have the same paths,
    // so the merged tree is the top layer's; status shows every layer as a segment.
    let m = env.mount(&by_tag, "mnt", &[]);
    let status = m.status();
    let labels: Vec<&str> = status.segments.iter().map(|s| s.label.as_str()).collect();
    let mut want = vec!["merged"];
    want.extend(pushed.layers.iter().map(|l| l.digest.as_str()));
    assert_eq!(labels, want, "{status:?}");
    assert_tree_identical(&images[2].tree, &m.mountpoint);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    env.assert_mount_fails(&by_tag, &["oci.layer=3"], &["layer"]);
    let absent = format!("oci.blob=sha256:{}", "0".repeat(64));
    env.assert_mount_fails(
        &by_tag,
        &[&absent],
        &["blob", "layer", "not found", "unknown"],
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn legacy_containerd_media_type() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let img = tiny_image("legacy-media-type");
    push_image(
        &registry,
        "test/legacy",
        "v1",
        &[LayerSpec {
            path: &img.image.path,
            media_type: ERFS_LEGACY_MEDIA_TYPE,
        }],
        "linux",
        "amd64",
    );
    let env = OciEnv::new("oci-legacy");
    let by_tag = reference(&registry.host(), "test/legacy", "v1");
    mount_and_compare(&env, &by_tag, &[], &img.tree, img.hex(), img.image.size);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn other_media_type_needs_the_digest_and_the_magic_is_checked() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let img = tiny_image("tar-typed");
    let not_erofs = common::fixtures::random_bytes(7, 256 * 1024);
    let not_erofs_path = img.image.path.with_extension("random");
    std::fs::write(&not_erofs_path, &not_erofs).expect("write random layer");
    let pushed = push_image(
        &registry,
        "test/typed",
        "v1",
        &[LayerSpec {
            path: &img.image.path,
            media_type: TAR_GZIP_LAYER,
        }],
        "linux",
        "amd64",
    );
    let env = OciEnv::new("oci-typed");
    let by_tag = reference(&registry.host(), "test/typed", "v1");
    // An EROFS blob declared as a tar layer: refused by type...
    env.assert_mount_fails(
        &by_tag,
        &[],
        &["media type", "mediatype", "not an erofs", "erofs"],
    );
    // ... unless named by digest; the EROFS magic decides then.
    let opt = format!("oci.blob={}", pushed.layers[0].digest);
    mount_and_compare(&env, &by_tag, &[&opt], &img.tree, img.hex(), img.image.size);

    // Random bytes under the EROFS media type: not EROFS.
    let random = push_image(
        &registry,
        "test/typed",
        "random",
        &[LayerSpec {
            path: &not_erofs_path,
            media_type: ERFS_MEDIA_TYPE,
        }],
        "linux",
        "amd64",
    );
    let by_tag = reference(&registry.host(), "test/typed", "random");
    env.assert_mount_fails(&by_tag, &[], &["erofs", "magic"]);
    let opt = format!("oci.blob={}", random.layers[0].digest);
    env.assert_mount_fails(&by_tag, &[&opt], &["erofs", "magic"]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn unknown_tag_repository_and_registry_are_clear_errors() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let img = tiny_image("unknowns");
    push_single(&registry, "test/known", "v1", &img.image.path);
    let env = OciEnv::new("oci-unknown");

    let line = env.assert_mount_fails(
        &reference(&registry.host(), "test/known", "nope"),
        &[],
        NOT_FOUND,
    );
    assert!(
        line.contains("nope"),
        "the error should name the tag: {line:?}"
    );
    let line = env.assert_mount_fails(
        &reference(&registry.host(), "test/absent", "v1"),
        &[],
        NOT_FOUND,
    );
    assert!(
        line.contains("test/absent"),
        "the error should name the repository: {line:?}"
    );
    let missing_digest = format!("{}/test/known@sha256:{}", registry.host(), "ab".repeat(32));
    env.assert_mount_fails(&missing_digest, &[], NOT_FOUND);

    // Nothing listens on that port.
    let closed = common::registry::closed_port();
    env.assert_mount_fails(
        &format!("127.0.0.1:{closed}/test/known:v1"),
        &["fetch_timeout=2", "retry_timeout=4"],
        &["connect", "unreachable", "refused", "registry"],
    );
    // Malformed references.
    env.assert_mount_fails(
        &format!("{}/Test/UPPER:v1", registry.host()),
        &[],
        &["reference", "invalid", "repository", "name", "not found"],
    );
    env.assert_mount_fails(
        &format!("{}/test/known@sha256:short", registry.host()),
        &[],
        &["reference", "invalid", "digest"],
    );
}
