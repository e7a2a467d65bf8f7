//! Ordinary tar and tar+gzip layers mounted lazily through a tar index and a zinfo (issue 16), with
//! erofs-utils' options `-o oci.tarindex=PATH,oci.zinfo=PATH`: a layer made in the test with Python's
//! `tarfile` (PAX long names, xattrs, a hard link, a symlink, a file that crosses several zinfo spans),
//! gzipped as two members, pushed to a real docker-registry with the OCI tar+gzip media type, indexed
//! with `erofs-fanotify build --tar-index --zinfo`, mounted, and every file compared with `tar -x`.
//! The same index mounts the uncompressed tar of the layer. A small file's read reaches the registry
//! for at most two spans' compressed bytes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cmd;
use common::erofs_tree::{assert_same_tree, Checks};
use common::oci::{push_image, reference, LayerSpec, OciEnv, TAR_GZIP_LAYER};
use common::http_server::{forward, HttpServer};
use common::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use common::{ready, GONE_TIMEOUT};

const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// zinfo checkpoints every 1 MiB: the big file crosses several spans.
const SPAN: u64 = 1 << 20;

fn run_ok(c: &mut Command) -> String {
    let out = cmd::run(c, Duration::from_secs(600));
    out.assert_success();
    out.stdout_str()
}

/// A layer with what a container image holds; `gz` is the same tar gzipped as two members (split
/// inside the big file's data).
const MAKE_LAYER: &str = r#"
import gzip, io, random, sys, tarfile
out_tar, out_gz = sys.argv[1], sys.argv[2]
rng = random.Random(16)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
def text(n):
    b = bytearray()
    while len(b) < n:
        b += rng.choice(words) + b" "
    return bytes(b[:n])
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    def add(name, data=None, kind=tarfile.REGTYPE, mode=0o644, link="", xattrs=None, uid=0, gid=0):
        i = tarfile.TarInfo(name)
        i.type, i.mode, i.mtime, i.uid, i.gid, i.linkname = kind, mode, 1700000000, uid, gid, link
        if xattrs:
            i.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
        if data is not None:
            i.size = len(data)
            t.addfile(i, io.BytesIO(data))
        else:
            t.addfile(i)
    for d in ["etc", "usr", "usr/lib", "usr/share", "usr/share/doc", "var", "var/empty"]:
        add(d, kind=tarfile.DIRTYPE, mode=0o755)
    add("etc/hostname", b"tarindex\n")
    add("etc/empty", b"")
    add("etc/passwd", text(3000), uid=0, gid=0)
    add("usr/lib/big.so", text(9 << 20) + rng.randbytes(700_000), mode=0o755)
    add("usr/lib/random.bin", rng.randbytes(300_000), uid=1000, gid=1000)
    add("usr/share/doc/" + "a-long-name-" * 12 + "end", text(5000))
    add("usr/share/doc/tagged", b"with xattrs\n", xattrs={"user.origin": "test", "user.kind": "doc"})
    add("usr/lib/hard", kind=tarfile.LNKTYPE, link="usr/lib/random.bin")
    add("usr/lib/libz.so.1", kind=tarfile.SYMTYPE, link="big.so", mode=0o777)
    for i in range(200):
        add("usr/share/doc/n%03d" % i, text(rng.randint(0, 9000)))
raw = buf.getvalue()
open(out_tar, "wb").write(raw)
cut = 6 << 20
open(out_gz, "wb").write(gzip.compress(raw[:cut], 6, mtime=0) + gzip.compress(raw[cut:], 6, mtime=0))
"#;

/// Blob GETs of one layer and their body bytes, counted by the proxy's handler before each answer is
/// sent (so a read that returned has been counted).
#[derive(Default)]
struct BlobCounter {
    gets: AtomicU64,
    bytes: AtomicU64,
    /// While set, the proxy flips one byte in the middle of every ranged blob body (not the probe).
    corrupt: AtomicBool,
}

impl BlobCounter {
    fn get(&self) -> (u64, u64) {
        (self.gets.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }
}

/// A proxy in front of the registry counting GETs of `digest`.
fn counting_proxy(registry: &Registry, digest: &str) -> (HttpServer, Arc<BlobCounter>) {
    let upstream = registry.base_url();
    let counter = Arc::new(BlobCounter::default());
    let c = counter.clone();
    let blob_path = format!("/blobs/{digest}");
    let proxy = HttpServer::start("tar-index-proxy", move |request| {
        let mut reply = forward(&upstream, request);
        if request.method == "GET" && request.path().contains(&blob_path) {
            if c.corrupt.load(Ordering::SeqCst) && reply.status == 206 && reply.body.len() > 4096 {
                let mid = reply.body.len() / 2;
                reply.body[mid] ^= 0x20;
            }
            c.gets.fetch_add(1, Ordering::SeqCst);
            c.bytes.fetch_add(reply.body.len() as u64, Ordering::SeqCst);
        }
        reply
    });
    (proxy, counter)
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + python3 + tar"]
fn tar_gzip_layer_mounts_lazily_through_its_tar_index_and_zinfo() {
    if !ready() {
        return;
    }
    let env = OciEnv::new("tar-index");
    let work = env.root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let tar = work.join("layer.tar");
    let gz = work.join("layer.tar.gz");
    run_ok(Command::new("python3").arg("-c").arg(MAKE_LAYER).arg(&tar).arg(&gz));
    let expected = work.join("expected");
    std::fs::create_dir(&expected).unwrap();
    run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-xf"]).arg(&tar).arg("-C").arg(&expected));

    // The index and zinfo, from the compressed layer in one pass.
    let index = work.join("layer.erofs");
    let zinfo = work.join("layer.zinfo");
    let built = run_ok(
        Command::new(common::EROFS_FANOTIFY)
            .args(["build", "--tar-index", "--zinfo"])
            .arg(&zinfo)
            .args(["--zinfo-span", &SPAN.to_string()])
            .arg(&gz)
            .arg(&index),
    );
    eprintln!("{built}");
    let spans = u32::from_le_bytes(std::fs::read(&zinfo).unwrap()[..4].try_into().unwrap());
    assert!(spans >= 9, "{spans} spans for a ~11 MiB tar at 1 MiB");

    let registry = Registry::start();
    let gz_image = push_image(&registry, "test/targz", "v1", &[LayerSpec { path: &gz, media_type: TAR_GZIP_LAYER }], "linux", "amd64");
    let tar_image = push_image(&registry, "test/tar", "v1", &[LayerSpec { path: &tar, media_type: TAR_LAYER }], "linux", "amd64");
    let gz_digest = gz_image.layers[0].digest.clone();
    let gz_size = gz_image.layers[0].size;

    // A gzip layer without its zinfo: one clear line, nothing left behind.
    let (proxy, counter) = counting_proxy(&registry, &gz_digest);
    let gz_ref = reference(&proxy.host(), "test/targz", "v1");
    let tarindex_opt = format!("oci.tarindex={}", index.display());
    let zinfo_opt = format!("oci.zinfo={}", zinfo.display());
    env.assert_mount_fails(&gz_ref, &[&tarindex_opt], &["zinfo"]);

    let m = env.mount(&gz_ref, "mnt-gz", &[&tarindex_opt, &zinfo_opt]);
    // Mounting reads the index locally; from the registry only the blob's probe and the last span
    // (to learn the tar's size).
    let (mount_gets, mount_bytes) = counter.get();
    eprintln!("mount: {mount_gets} blob requests, {mount_bytes} bytes of the {gz_size}-byte layer");
    assert!(mount_gets <= 2, "{mount_gets} blob requests at mount (the probe and the last span)");
    assert!(mount_bytes < gz_size / 4, "{mount_bytes} bytes at mount");

    // One small file: at most two spans' compressed bytes.
    assert_eq!(std::fs::read(m.path("etc/hostname")).unwrap(), b"tarindex\n");
    let (gets, bytes) = (counter.get().0 - mount_gets, counter.get().1 - mount_bytes);
    let two_spans = 2 * gz_size / u64::from(spans) + (64 << 10);
    eprintln!("etc/hostname: {gets} blob requests, {bytes} compressed bytes (two spans ~ {two_spans})");
    assert!((1..=2).contains(&gets), "{gets} requests for one small file");
    assert!(bytes <= two_spans, "{bytes} bytes for one small file");

    // Every file, byte for byte, with modes, owners, mtimes, xattrs and links as tar -x made them.
    let checks = Checks { dir_mtime: false, ..Checks::all() };
    assert_same_tree(&expected, &m.mountpoint, checks);
    let status = m.status();
    eprintln!("after the whole tree: {status:?}");
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    assert_eq!(status.denied_events, 0, "{status:?}");
    let (total_gets, total_bytes) = counter.get();
    eprintln!("whole tree: {total_gets} blob requests, {total_bytes} compressed bytes of {gz_size}");
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // The uncompressed layer: the same index, no zinfo, the tar segment is the blob itself.
    let tar_ref = reference(&registry.host(), "test/tar", "v1");
    let m = env.mount(&tar_ref, "mnt-tar", &[&tarindex_opt]);
    assert_same_tree(&expected, &m.mountpoint, checks);
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    assert!(status.blob_size >= std::fs::metadata(&index).unwrap().len(), "{status:?}");
    let _ = tar_image;
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // A bare oci.tarindex: the index is made at mount by streaming the layer once, and stored in the
    // cache dir (with span digests and the tar's size) for the next mount.
    let (gets0, bytes0) = counter.get();
    let started = std::time::Instant::now();
    let m = env.mount(&gz_ref, "mnt-auto", &["oci.tarindex"]);
    let first_mount = started.elapsed();
    let (gets, bytes) = (counter.get().0 - gets0, counter.get().1 - bytes0);
    eprintln!("indexed at mount in {first_mount:.2?}: {gets} blob requests, {bytes} bytes of {gz_size}");
    assert!(bytes >= gz_size && bytes < gz_size + (64 << 10), "one pass over the layer: {bytes} bytes");
    let stored = env.cache_dir.join(".tar-indexes").join(gz_digest.trim_start_matches("sha256:"));
    for f in ["index.erofs", "layer.zinfo", "layer.json"] {
        assert!(stored.join(f).is_file(), "{} missing", stored.join(f).display());
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(stored.join("layer.json")).unwrap()).unwrap();
    assert_eq!(meta["tar_size"].as_u64(), Some(std::fs::metadata(&tar).unwrap().len()), "{meta}");
    assert!(meta["span_sha256"].as_array().is_some_and(|a| !a.is_empty()), "{meta}");
    assert_same_tree(&expected, &m.mountpoint, checks);
    assert_eq!(m.status().fetch_errors, 0);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    // A corrupt span (the proxy flips a byte): the read fails with EIO, never wrong bytes, and the span is
    // not kept; once the proxy stops corrupting, the same read succeeds. A fresh cache entry (new cache
    // dir, so the index is made again, before the corruption starts).
    {
        let env2 = OciEnv::new("tar-index-corrupt");
        let m = env2.mount(&gz_ref, "mnt", &["oci.tarindex"]);
        counter.corrupt.store(true, Ordering::SeqCst);
        let err = std::fs::read(m.path("usr/lib/big.so")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let status = m.status();
        assert!(status.fetch_errors >= 1 && status.denied_events >= 1, "{status:?}");
        counter.corrupt.store(false, Ordering::SeqCst);
        let healed = std::fs::read(m.path("usr/lib/big.so")).unwrap();
        assert!(healed == std::fs::read(expected.join("usr/lib/big.so")).unwrap(), "healed read differs");
        assert_same_tree(&expected, &m.mountpoint, checks);
        m.unmount().assert_success();
        env2.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    }

    // The next mount uses the stored index: no pass over the layer, not even the last span.
    let (gets0, bytes0) = counter.get();
    let m = env.mount(&gz_ref, "mnt-auto2", &["oci.tarindex"]);
    let (gets, bytes) = (counter.get().0 - gets0, counter.get().1 - bytes0);
    eprintln!("second mount with the stored index: {gets} blob requests, {bytes} bytes");
    assert!(gets <= 1 && bytes <= 4096, "{gets} requests, {bytes} bytes");
    assert_eq!(std::fs::read(m.path("usr/lib/big.so")).unwrap(), std::fs::read(expected.join("usr/lib/big.so")).unwrap());
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // One layer of a multi-layer image, picked with oci.layer (erofs-utils' option): the gzip layer with
    // the stored index, the plain tar layer with the given index.
    push_image(
        &registry,
        "test/two",
        "v1",
        &[LayerSpec { path: &gz, media_type: TAR_GZIP_LAYER }, LayerSpec { path: &tar, media_type: TAR_LAYER }],
        "linux",
        "amd64",
    );
    let two = reference(&proxy.host(), "test/two", "v1");
    for (name, opts) in [("mnt-two-0", vec!["oci.layer=0", "oci.tarindex"]), ("mnt-two-1", vec!["oci.layer=1", tarindex_opt.as_str()])] {
        let m = env.mount(&two, name, &opts);
        assert_same_tree(&expected, &m.mountpoint, checks);
        m.unmount().assert_success();
        env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    }
    let _ = std::fs::remove_dir_all(Path::new(&work));
}
