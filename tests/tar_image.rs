//! Whole ordinary images (tar and tar+gzip layers), unconverted, mounted lazily as one filesystem
//! (issue 16): three layers made in the test with Python's `tarfile` (a multi-member gzip, whiteouts, an
//! opaque directory, hard links, long PAX names, xattrs, a file that crosses several zinfo spans, a plain
//! tar layer), pushed to a real docker-registry with OCI media types and a config whose diff_ids are the
//! tars' digests. `-o oci.tarindex` indexes each layer once at mount and merges them; the tree must equal
//! the layers applied in order by `tar -x` (whiteouts and opaque directories applied as overlayfs does).
//! Then: a plain `erofs-mount REF` through the stored indexes, `index build --output DIR` and
//! `-o oci.tarindex=DIR` in a fresh cache, a config whose diff_ids lie, and the one line a plain mount
//! gives when no index exists.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cmd;
use common::erofs_tree::{assert_same_tree, Checks};
use common::http_server::{forward, HttpServer};
use common::oci::{diff_id, push_image, push_image_with_diff_ids, reference, LayerSpec, OciEnv, TAR_GZIP_LAYER};
use common::registry::Registry;
use common::wait::wait_until;
use common::{ready, GONE_TIMEOUT};

const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn run_ok(c: &mut Command) -> String {
    let out = cmd::run(c, Duration::from_secs(600));
    out.assert_success();
    out.stdout_str()
}

/// Three layers: `l0.tar.gz` (two gzip members, split inside the big file), `l1.tar.gz` (whiteouts, an
/// opaque directory, replacements), `l2.tar` (plain tar: a whiteout of a lower file, new files).
const MAKE_LAYERS: &str = r##"
import gzip, io, random, sys, tarfile
out = sys.argv[1]
rng = random.Random(1616)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
def text(n):
    b = bytearray()
    while len(b) < n:
        b += rng.choice(words) + b" "
    return bytes(b[:n])
def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            name, data, kind = e[0], e[1], e[2] if len(e) > 2 else tarfile.REGTYPE
            opts = e[3] if len(e) > 3 else {}
            i = tarfile.TarInfo(name)
            i.type, i.mtime = kind, 1700000000
            i.mode = opts.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
            i.uid, i.gid = opts.get("uid", 0), opts.get("gid", 0)
            i.linkname = opts.get("link", "")
            if "xattrs" in opts:
                i.pax_headers = {"SCHILY.xattr." + k: v for k, v in opts["xattrs"].items()}
            if data is not None:
                i.size = len(data)
                t.addfile(i, io.BytesIO(data))
            else:
                t.addfile(i)
    return buf.getvalue()
D, L, S = tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE
l0 = layer([
    ("etc", None, D), ("usr", None, D), ("usr/lib", None, D), ("usr/share", None, D), ("usr/share/doc", None, D),
    ("var", None, D), ("var/cache", None, D), ("var/cache/app", None, D),
    ("etc/hostname", b"lower\n"), ("etc/passwd", text(2000)), ("etc/shadow", b"secret\n", tarfile.REGTYPE, {"mode": 0o600}),
    ("usr/lib/big.so", text(6 << 20) + rng.randbytes(500_000), tarfile.REGTYPE, {"mode": 0o755}),
    ("usr/lib/random.bin", rng.randbytes(200_000), tarfile.REGTYPE, {"uid": 1000, "gid": 1000}),
    ("usr/lib/hard", None, L, {"link": "usr/lib/random.bin"}),
    ("usr/lib/libz.so.1", None, S, {"link": "big.so", "mode": 0o777}),
    ("usr/share/doc/" + "a-long-name-" * 12 + "end", text(4000)),
    ("usr/share/doc/tagged", b"with xattrs\n", tarfile.REGTYPE, {"xattrs": {"user.origin": "l0", "user.kind": "doc"}}),
    ("var/cache/app/old-1", text(3000)), ("var/cache/app/old-2", text(3000)),
] + [("usr/share/doc/n%03d" % i, text(rng.randint(0, 6000))) for i in range(120)])
l1 = layer([
    ("etc", None, D), ("etc/.wh.passwd", b""), ("etc/hostname", b"upper\n"),
    ("var", None, D), ("var/cache", None, D), ("var/cache/app", None, D, {"mode": 0o750}),
    ("var/cache/app/.wh..wh..opq", b""), ("var/cache/app/new", b"after the opaque dir\n"),
    ("opt", None, D), ("opt/app", None, D), ("opt/app/data", text(300_000)),
    ("opt/app/data-link", None, L, {"link": "opt/app/data"}),
    ("usr", None, D), ("usr/share", None, D), ("usr/share/doc", None, D), ("usr/share/doc/n001", b"replaced\n"),
])
l2 = layer([
    ("usr", None, D), ("usr/lib", None, D), ("usr/lib/.wh.random.bin", b""),
    ("usr/bin", None, D), ("usr/bin/tool", b"#!/bin/sh\necho tool\n", tarfile.REGTYPE, {"mode": 0o755}),
    ("etc", None, D), ("etc/motd", text(1000)),
])
open(out + "/l0.tar", "wb").write(l0)
open(out + "/l1.tar", "wb").write(l1)
open(out + "/l2.tar", "wb").write(l2)
cut = 3 << 20
open(out + "/l0.tar.gz", "wb").write(gzip.compress(l0[:cut], 6, mtime=0) + gzip.compress(l0[cut:], 6, mtime=0))
open(out + "/l1.tar.gz", "wb").write(gzip.compress(l1, 6, mtime=0))
"##;

/// Applies one layer's whiteouts and opaque markers to `root` (what overlayfs hides of the lower
/// layers); `tar -x --exclude=.wh.*` then adds the layer's own entries.
const APPLY_WHITEOUTS: &str = r#"
import os, shutil, sys, tarfile
layer, root = sys.argv[1], sys.argv[2]
def remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)
with tarfile.open(layer) as t:
    for m in t.getmembers():
        d, base = os.path.split(m.name)
        if base == ".wh..wh..opq":
            full = os.path.join(root, d)
            if os.path.isdir(full):
                for c in os.listdir(full):
                    remove(os.path.join(full, c))
        elif base.startswith(".wh."):
            remove(os.path.join(root, d, base[4:]))
"#;

/// Blob GETs through the proxy: (digest, body bytes), recorded before each answer is sent.
type Gets = Arc<Mutex<Vec<(String, u64)>>>;

fn counting_proxy(registry: &Registry) -> (HttpServer, Gets) {
    let upstream = registry.base_url();
    let gets: Gets = Arc::default();
    let g = gets.clone();
    let proxy = HttpServer::start("tar-image-proxy", move |request| {
        let reply = forward(&upstream, request);
        if request.method == "GET" {
            if let Some((_, digest)) = request.path().split_once("/blobs/") {
                g.lock().unwrap().push((digest.to_string(), reply.body.len() as u64));
            }
        }
        reply
    });
    (proxy, gets)
}

fn gets_of(gets: &Gets, digest: &str, from: usize) -> (usize, u64) {
    let g = gets.lock().unwrap();
    let of: Vec<u64> = g[from.min(g.len())..].iter().filter(|(d, _)| d == digest).map(|(_, b)| *b).collect();
    (of.len(), of.iter().sum())
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + python3 + tar"]
fn a_three_layer_tar_image_mounts_whole_and_lazily() {
    if !ready() {
        return;
    }
    let env = OciEnv::new("tar-image");
    let work = env.root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    run_ok(Command::new("python3").arg("-c").arg(MAKE_LAYERS).arg(&work));
    let expected = work.join("expected");
    std::fs::create_dir(&expected).unwrap();
    for l in ["l0.tar", "l1.tar", "l2.tar"] {
        run_ok(Command::new("python3").arg("-c").arg(APPLY_WHITEOUTS).arg(work.join(l)).arg(&expected));
        run_ok(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "--exclude=.wh.*", "-xf"])
                .arg(work.join(l))
                .arg("-C")
                .arg(&expected),
        );
    }
    assert!(!expected.join("etc/passwd").exists() && expected.join("var/cache/app/new").exists());
    assert!(!expected.join("var/cache/app/old-1").exists() && !expected.join("usr/lib/random.bin").exists());

    let (l0, l1, l2) = (work.join("l0.tar.gz"), work.join("l1.tar.gz"), work.join("l2.tar"));
    let layers = [
        LayerSpec { path: &l0, media_type: TAR_GZIP_LAYER },
        LayerSpec { path: &l1, media_type: TAR_GZIP_LAYER },
        LayerSpec { path: &l2, media_type: TAR_LAYER },
    ];
    let registry = Registry::start();
    let image = push_image(&registry, "test/ordinary", "v1", &layers, "linux", "amd64");
    let (proxy, gets) = counting_proxy(&registry);
    let image_ref = reference(&proxy.host(), "test/ordinary", "v1");
    let checks = Checks { dir_mtime: false, ..Checks::all() };

    // No index anywhere: one line that says how to make one, and nothing left behind.
    let line = env.assert_mount_fails(&image_ref, &[], &["ordinary image", "oci.tarindex", "index build"]);
    eprintln!("without an index: {line}");
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // A bare oci.tarindex: each layer streamed once, indexed, merged; the whole root filesystem.
    let started = std::time::Instant::now();
    let m = env.mount(&image_ref, "mnt", &["oci.tarindex", &format!("fetch_unit={}", 256 << 10)]);
    eprintln!("indexed and mounted in {:.2?}", started.elapsed());
    let store = env.cache_dir.join(".tar-indexes");
    let merged: Vec<_> = std::fs::read_dir(&store).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("merged-")).collect();
    assert_eq!(merged.len(), 1, "one merged index in {}", store.display());
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(merged[0].path().join("merged.json")).unwrap()).unwrap();
    let digests: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(meta["layers"], serde_json::json!(digests), "{meta}");

    // One small file of the first (gzip, multi-member) layer: at most two spans' compressed bytes of it.
    let before = gets.lock().unwrap().len();
    assert_eq!(std::fs::read(m.path("etc/shadow")).unwrap(), b"secret\n");
    let (n, bytes) = gets_of(&gets, &digests[0], before);
    let l0_size = image.layers[0].size;
    let spans = u64::from(u32::from_le_bytes(std::fs::read(store.join(digests[0].trim_start_matches("sha256:")).join("layer.zinfo")).unwrap()[..4].try_into().unwrap()));
    let two_spans = 2 * l0_size / spans + (64 << 10);
    eprintln!("etc/shadow: {n} requests, {bytes} compressed bytes of layer 0 ({l0_size} bytes, {spans} spans)");
    assert!((1..=2).contains(&n) && bytes <= two_spans, "{n} requests, {bytes} bytes for one small file (two spans ~ {two_spans})");

    assert_same_tree(&expected, &m.mountpoint, checks);
    let status = m.status();
    eprintln!("after the whole tree: {status:?}");
    assert_eq!((status.fetch_errors, status.denied_events), (0, 0), "{status:?}");
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // A plain mount now finds the stored indexes: no pass over any layer.
    let before = gets.lock().unwrap().len();
    let m = env.mount(&image_ref, "mnt-plain", &[]);
    let streamed: u64 = gets.lock().unwrap()[before..].iter().map(|(_, b)| *b).sum();
    eprintln!("plain mount through the stored indexes: {streamed} blob bytes");
    assert!(streamed < l0_size / 4, "{streamed} bytes at a mount with stored indexes");
    assert_eq!(std::fs::read(m.path("etc/hostname")).unwrap(), b"upper\n");
    assert_same_tree(&expected, &m.mountpoint, checks);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // index build into a directory; a fresh cache mounts the image from it.
    let dir = work.join("index");
    let printed = run_ok(
        Command::new(common::EROFS_FANOTIFY)
            .args(["index", "build", "-o", "oci.insecure", "--zinfo-span", "1M"])
            .arg(&image_ref)
            .arg("--output")
            .arg(&dir),
    );
    let merged_file = Path::new(printed.trim());
    assert!(merged_file.starts_with(&dir) && merged_file.is_file(), "{printed}");
    // 1 MiB spans: more checkpoints than the mount's own 4 MiB index of the same layer.
    let zinfo_header = |root: &Path| {
        let z = std::fs::read(root.join(digests[0].trim_start_matches("sha256:")).join("layer.zinfo")).unwrap();
        (u32::from_le_bytes(z[..4].try_into().unwrap()), u64::from_le_bytes(z[4..12].try_into().unwrap()))
    };
    let (small, small_span) = zinfo_header(&dir);
    let (default, default_span) = zinfo_header(&store);
    eprintln!("index build --zinfo-span 1M: {small} checkpoints of {small_span} bytes; at mount: {default} of {default_span}");
    assert!(small_span == 1 << 20 && default_span == 4 << 20 && small > default, "{small}/{small_span} vs {default}/{default_span}");
    {
        let env2 = OciEnv::new("tar-image-dir");
        let opt = format!("oci.tarindex={}", dir.display());
        let m = env2.mount(&image_ref, "mnt", &[&opt]);
        assert_same_tree(&expected, &m.mountpoint, checks);
        assert_eq!(m.status().fetch_errors, 0);
        m.unmount().assert_success();
        env2.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        // A directory of indexes goes with the whole image, not with one layer's options.
        env2.assert_mount_fails(&image_ref, &[&opt, "oci.layer=0"], &["directory"]);
    }

    // A config whose diff_ids are not the layers' tars: refused, with the layer named.
    let mut lying: Vec<String> = layers.iter().map(diff_id).collect();
    lying[1] = diff_id(&LayerSpec { path: &l2, media_type: TAR_LAYER });
    push_image_with_diff_ids(&registry, "test/ordinary", "lying", &layers, "linux", "amd64", &lying);
    let lying_ref = reference(&proxy.host(), "test/ordinary", "lying");
    env.assert_mount_fails(&lying_ref, &["oci.tarindex"], &["layer 1", "diff_id"]);
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // index push: the layers' tar indexes and zinfos as an OCI artifact referring to the image; a host
    // with no index of its own (a fresh cache) finds it and mounts without streaming any layer.
    let direct = reference(&registry.host(), "test/ordinary", "v1");
    let artifact = run_ok(Command::new(common::EROFS_FANOTIFY).args(["index", "push", "-o", "oci.insecure"]).arg(&direct));
    assert!(artifact.trim().starts_with("sha256:"), "{artifact}");
    {
        let env3 = OciEnv::new("tar-image-artifact");
        let before = gets.lock().unwrap().len();
        let m = env3.mount(&image_ref, "mnt", &[]);
        let streamed: u64 = gets.lock().unwrap()[before..].iter().filter(|(d, _)| digests.contains(d)).map(|(_, b)| *b).sum();
        eprintln!("plain mount through the pushed artifact: {streamed} layer bytes at mount");
        assert!(streamed < l0_size / 4, "{streamed} layer bytes at a mount through the artifact");
        assert_same_tree(&expected, &m.mountpoint, checks);
        let status = m.status();
        assert_eq!(status.fetch_errors, 0);
        assert!(status.source.contains(artifact.trim()), "status names the artifact: {}", status.source);
        m.unmount().assert_success();
        env3.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        // A whole mount fetched to the end: every tar is hashed from the cache file against its diff_id
        // (and the merged metadata against its digest) before the mark comes off.
        let env6 = OciEnv::new("tar-image-complete");
        let m = env6.mount(&image_ref, "mnt", &["prefetch=all"]);
        wait_until(Duration::from_secs(120), "the tar image is complete", || m.status().state == "complete");
        let status = m.status();
        assert!(status.segments.iter().all(|s| s.refused.is_none() && s.present_bytes >= s.size), "{status:?}");
        assert_same_tree(&expected, &m.mountpoint, checks);
        m.unmount().assert_success();
        env6.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        // A forged artifact, newest in the referrers tag: the real one with layer 0's first span digest
        // wrong. The mount stands (span digests are checked when a span is fetched); a read in that span
        // is EIO, never the bytes the forged digest does not vouch for.
        let forged = forge_span_digest(&registry, "test/ordinary", &image.manifest.digest, artifact.trim());
        let env5 = OciEnv::new("tar-image-forged");
        let m = env5.mount(&image_ref, "mnt", &[]);
        let e = std::fs::read(m.path("etc/shadow")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e} (forged artifact {forged})");
        // Layer 2 (plain tar, no spans) is not touched by the forgery.
        assert_eq!(std::fs::read(m.path("usr/bin/tool")).unwrap(), std::fs::read(expected.join("usr/bin/tool")).unwrap());
        assert!(m.status().fetch_errors >= 1, "{:?}", m.status());
        m.unmount().assert_success();
        env5.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        // A forged artifact that span digests cannot catch: layer 0's zinfo with every checkpoint window
        // after the first zeroed and the span digests made to match. Its spans inflate to wrong bytes; the
        // tar's diff_id check at completion finds it, fetching it again gives the same, so the layer is
        // refused: every read of it is EIO, never its wrong bytes; the other layers read right.
        let forged = forge_zinfo_windows(&registry, "test/ordinary", &image.manifest.digest, artifact.trim(), &l0);
        let env7 = OciEnv::new("tar-image-forged-zinfo");
        let m = env7.mount(&image_ref, "mnt", &["prefetch=all"]);
        wait_until(Duration::from_secs(120), "layer 0's tar is refused", || m.status().segments.iter().any(|s| s.refused.is_some()));
        let status = m.status();
        eprintln!("forged zinfo (artifact {forged}): {status:?}");
        assert_eq!(status.state, "digest-mismatch", "{status:?}");
        assert!(status.verify_failures >= 2, "{status:?}");
        let refused: Vec<_> = status.segments.iter().filter(|s| s.refused.is_some()).collect();
        assert_eq!(refused.len(), 1, "only layer 0's tar: {status:?}");
        assert!(refused[0].refused.as_deref().unwrap().contains("does not match its digest"), "{refused:?}");
        for f in ["etc/shadow", "usr/lib/big.so", "usr/share/doc/tagged"] {
            let e = std::fs::read(m.path(f)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}");
        }
        for f in ["usr/bin/tool", "opt/app/data", "etc/hostname", "usr/share/doc/n001"] {
            assert_eq!(std::fs::read(m.path(f)).unwrap(), std::fs::read(expected.join(f)).unwrap(), "{f}");
        }
        m.unmount().assert_success();
        env7.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        // index=off: the artifact is not looked for, and the mount says how to make an index.
        let env4 = OciEnv::new("tar-image-off");
        env4.assert_mount_fails(&image_ref, &["index=off"], &["ordinary image"]);
        env4.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(&work);
}

/// `GET /v2/<repo>/<path>` of the registry, which must answer 200.
fn get_from(registry: &Registry, repo: &str, path: &str, accept: &str) -> Vec<u8> {
    use common::http::{request, Body};
    let r = request("GET", &format!("{}/v2/{repo}/{path}", registry.base_url()), &[("Accept", accept)], Body::Empty).unwrap();
    assert_eq!(r.status, 200, "GET {path}");
    r.body
}

/// Pushes a copy of artifact `real` whose document `forge` changed, and appends it to the image's
/// referrers tag (`sha256-<hex>`: docker-registry 2.8 has no referrers API), so it is the newest.
fn forge_artifact(registry: &Registry, repo: &str, image_digest: &str, real: &str, forge: impl FnOnce(&mut serde_json::Value)) -> String {
    use common::oci::{OCI_INDEX, OCI_MANIFEST};
    let json = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
    let mut manifest = json(get_from(registry, repo, &format!("manifests/{real}"), OCI_MANIFEST));
    let doc_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let mut doc = json(get_from(registry, repo, &format!("blobs/{doc_digest}"), "*/*"));
    forge(&mut doc);
    let doc = serde_json::to_vec(&doc).unwrap();
    manifest["layers"][0]["digest"] = serde_json::json!(registry.push_blob(repo, &doc));
    manifest["layers"][0]["size"] = serde_json::json!(doc.len());
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = format!("sha256:{}", common::registry::sha256_hex(&bytes));
    registry.push_manifest(repo, &digest, &bytes, OCI_MANIFEST);
    let tag = format!("sha256-{}", image_digest.trim_start_matches("sha256:"));
    let mut index = json(get_from(registry, repo, &format!("manifests/{tag}"), OCI_INDEX));
    let entry = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(),
        "artifactType": manifest["artifactType"].clone()});
    index["manifests"].as_array_mut().unwrap().push(entry);
    registry.push_manifest(repo, &tag, &serde_json::to_vec(&index).unwrap(), OCI_INDEX);
    digest
}

/// A copy of artifact `real` whose first layer's zinfo has every checkpoint window after the first
/// zeroed, with span digests recomputed to match (what a forger controls: the zinfo blob and the
/// document). `layer0` is the first layer's blob.
fn forge_zinfo_windows(registry: &Registry, repo: &str, image_digest: &str, real: &str, layer0: &Path) -> String {
    use erofs_fanotify::gzip::{span_digest, Zinfo, CHECKPOINT_SIZE, HEADER_SIZE, WINDOW_SIZE};
    forge_artifact(registry, repo, image_digest, real, |doc| {
        let zinfo_digest = doc["layers"][0]["zinfo"]["digest"].as_str().unwrap().to_string();
        let mut zinfo = get_from(registry, repo, &format!("blobs/{zinfo_digest}"), "*/*");
        let count = u32::from_le_bytes(zinfo[..4].try_into().unwrap()) as usize;
        assert!(count >= 2, "layer 0 has {count} zinfo spans: nothing to forge");
        for k in 1..count {
            // le64 in, le64 out, u8 bits, then the window.
            let w = HEADER_SIZE + k * CHECKPOINT_SIZE + 17;
            zinfo[w..w + WINDOW_SIZE].fill(0);
        }
        let blob = std::fs::read(layer0).unwrap();
        let parsed = Zinfo::parse(zinfo.clone()).unwrap();
        let spans: Vec<String> = (0..count)
            .map(|k| {
                let r = parsed.span_input_range(k, blob.len() as u64).unwrap();
                span_digest(&parsed, k, &blob[r.start as usize..r.end as usize]).unwrap()
            })
            .collect();
        doc["layers"][0]["spanSha256"] = serde_json::json!(spans);
        doc["layers"][0]["zinfo"]["digest"] = serde_json::json!(registry.push_blob(repo, &zinfo));
    })
}

/// A copy of artifact `real` whose document has a wrong first span digest for the first layer.
fn forge_span_digest(registry: &Registry, repo: &str, image_digest: &str, real: &str) -> String {
    forge_artifact(registry, repo, image_digest, real, |doc| doc["layers"][0]["spanSha256"][0] = serde_json::json!("0".repeat(64)))
}
