//! Multi-layer images (issue 15): `erofs-mount REF` of an image of several EROFS layers with no
//! `oci.layer`/`oci.blob` mounts them merged by overlay rules — one mount, one agent, one fanotify mark,
//! one cache entry — with each file's data read from its own layer's blob. The layers are built by our
//! writer (one of them lz4) and pushed to a real docker-registry; the merged mount is compared with the
//! layers applied in order by hand (copy, then delete whiteouts, empty opaque directories), and the
//! registry's access log shows which blob each read went to.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use erofs_fanotify::erofs::writer::{ChunkedData, Device, FileData, Inode, Metadata, Tree, WriterOptions};
use erofs_fanotify::merge::{planned_size, write_merged};

use common::oci::{push_image, reference, LayerSpec, OciEnv, ERFS_MEDIA_TYPE};
use common::registry::{Registry, RegistryConfig};
use common::tree::assert_tree_identical;
use common::{fixtures::random_bytes, ready, GONE_TIMEOUT};

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
}

fn whiteout(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    nix::sys::stat::mknod(&p, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o600), 0).unwrap();
}

fn opaque(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(&p).unwrap();
    run_ok(Command::new("setfattr").args(["-n", "trusted.overlay.opaque", "-v", "y"]).arg(&p));
}

fn text(label: &str, len: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!("{label} line {i}\n"));
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}

/// Three layers: a plain base, an lz4 layer that replaces, deletes and hides, a plain app layer.
fn make_layers(root: &Path) -> [PathBuf; 3] {
    let l0 = root.join("l0");
    write(&l0, "etc/a.conf", b"base a\n");
    write(&l0, "etc/gone", b"deleted by layer 1\n");
    write(&l0, "bin/tool", &random_bytes(1, 300 * 1024 + 123));
    write(&l0, "opt/old/x", b"hidden by the opaque dir of layer 1\n");
    write(&l0, "opt/old/sub/y", b"hidden too\n");
    write(&l0, "share/hl1", &text("hard link", 9000));
    std::fs::hard_link(l0.join("share/hl1"), l0.join("share/hl2")).unwrap();
    write(&l0, "small", b"an inline file of the base\n");
    write(&l0, "data/big", &random_bytes(2, 512 * 1024 + 77));
    std::os::unix::fs::symlink("etc/a.conf", l0.join("conf-link")).unwrap();

    let l1 = root.join("l1");
    write(&l1, "etc/a.conf", b"layer 1 replaces a\n");
    whiteout(&l1, "etc/gone");
    opaque(&l1, "opt/old");
    write(&l1, "opt/old/new", b"the only entry of the opaque dir\n");
    write(&l1, "lib/libz.txt", &text("compressible", 700 * 1024 + 5));
    write(&l1, "lib/tail", &text("lz4 tail", 5000));

    let l2 = root.join("l2");
    write(&l2, "app/main", &random_bytes(3, 1024 * 1024 + 4000));
    write(&l2, "app/inline", b"small app file\n");
    whiteout(&l2, "data/big");
    write(&l2, "etc/app.conf", b"app\n");
    std::fs::hard_link(l2.join("app/inline"), l2.join("app/inline-link")).unwrap();
    [l0, l1, l2]
}

/// Applies `layer` to `out` as overlayfs shows it: whiteouts delete, opaque directories hide what is below.
fn apply(layer: &Path, out: &Path) {
    let mut whiteouts = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(layer.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = e.path().symlink_metadata().unwrap();
            if m.file_type().is_char_device() && m.rdev() == 0 {
                whiteouts.push(r);
            } else if m.is_dir() {
                let v = Command::new("getfattr").args(["--only-values", "-n", "trusted.overlay.opaque"]).arg(e.path()).output().unwrap();
                if v.status.success() && v.stdout == b"y" {
                    let _ = std::fs::remove_dir_all(out.join(&r));
                }
                stack.push(r);
            }
        }
    }
    for w in &whiteouts {
        let p = out.join(w);
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
    run_ok(Command::new("cp").arg("-a").arg(format!("{}/.", layer.display())).arg(out));
    for w in &whiteouts {
        std::fs::remove_file(out.join(w)).unwrap();
    }
}

fn build(src: &Path, out: &Path, extra: &[&str]) {
    run_ok(Command::new(common::EROFS_FANOTIFY).arg("build").arg("--reproducible").args(extra).arg(src).arg(out));
}

/// GET requests for each blob digest in the registry's access log.
fn blob_gets(registry: &Registry) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for (method, path, _) in registry.access_log() {
        if method == "GET" {
            if let Some(d) = path.split("/blobs/").nth(1) {
                *n.entry(d.to_string()).or_default() += 1;
            }
        }
    }
    n
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The GET counts once `enough` holds and two looks 200 ms apart agree (at most 5 s).
fn settled_gets(registry: &Registry, enough: impl Fn(&BTreeMap<String, usize>) -> bool) -> BTreeMap<String, usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = blob_gets(registry);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = blob_gets(registry);
        if (enough(&now) && now == last) || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Which blobs got more GETs from `before` to `after`.
fn grew(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> Vec<String> {
    after.iter().filter(|(d, n)| before.get(*d).copied().unwrap_or(0) < **n).map(|(d, _)| d.clone()).collect()
}

/// Distinct fanotify marks held by the fds of `pid` (`fanotify ino:` lines of fdinfo).
fn fanotify_marks(pid: i32) -> Vec<String> {
    let mut marks = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else { continue };
        for line in info.lines().filter(|l| l.starts_with("fanotify ino:")) {
            let ino = line.split_whitespace().nth(1).unwrap_or("").to_string();
            if !marks.contains(&ino) {
                marks.push(ino);
            }
        }
    }
    marks
}

/// The three layers built, pushed as `test/merged:v1`, and the tree they make: (reference, layer
/// descriptors, expected tree, work dir).
fn push_three_layers(registry: &Registry, env: &OciEnv) -> (String, common::oci::PushedImage, PathBuf, PathBuf) {
    let work = env.root.join("layers");
    let dirs = make_layers(&work);
    let images: Vec<PathBuf> = (0..3).map(|i| work.join(format!("l{i}.erofs"))).collect();
    build(&dirs[0], &images[0], &[]);
    build(&dirs[1], &images[1], &["--compress", "lz4"]);
    build(&dirs[2], &images[2], &[]);
    let specs: Vec<LayerSpec> = images.iter().map(|p| LayerSpec { path: p, media_type: ERFS_MEDIA_TYPE }).collect();
    let pushed = push_image(registry, "test/merged", "v1", &specs, "linux", "amd64");
    let expected = work.join("expected");
    std::fs::create_dir_all(&expected).unwrap();
    for d in &dirs {
        apply(d, &expected);
    }
    assert!(!expected.join("etc/gone").exists() && !expected.join("opt/old/x").exists() && !expected.join("data/big").exists());
    (reference(&registry.host(), "test/merged", "v1"), pushed, expected, work)
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry"]
fn three_layers_mount_merged_by_overlay_rules() {
    if !ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("multi-layer");
    let (by_tag, pushed, expected, work) = push_three_layers(&registry, &env);
    let digests: Vec<String> = pushed.layers.iter().map(|l| l.digest.clone()).collect();
    let before_mount = blob_gets(&registry);
    let m = env.mount(&by_tag, "mnt", &[]);
    let mounted = blob_gets(&registry);

    // One agent with one mark (the cache file), one cache entry, one mount.
    let agent = m.agent_pid();
    assert_eq!(fanotify_marks(agent).len(), 1, "marks of the agent: {:?}", fanotify_marks(agent));
    let entries: std::collections::BTreeSet<PathBuf> =
        env.cache_files().iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
    assert_eq!(entries.len(), 1, "cache entries: {entries:?}");
    assert_eq!(env.mounts().len(), 1, "{:?}", env.mounts());

    // Status: the merged metadata (local) and one segment per layer, in manifest order.
    let status = m.status();
    let labels: Vec<String> = status.segments.iter().map(|s| s.label.clone()).collect();
    assert_eq!(labels[0], "merged", "{status:?}");
    assert_eq!(&labels[1..], &digests[..], "{status:?}");
    assert_eq!(status.segments[0].present_bytes, status.segments[0].size, "the merged metadata is local: {status:?}");
    for (s, l) in status.segments[1..].iter().zip(&pushed.layers) {
        assert_eq!(s.size, l.size, "{status:?}");
        assert_eq!(s.start % 4096, 0);
    }
    assert_eq!(status.blob_size, status.segments.last().map(|s| s.start + s.size).unwrap());
    let mount_gets = mounted.values().sum::<usize>() - before_mount.values().sum::<usize>();
    eprintln!("mount: {mount_gets} blob GETs for 3 layers (probes and metadata walks); merged metadata {} bytes", status.segments[0].size);
    assert!(mount_gets <= 3 * 3, "{mount_gets} blob GETs to mount 3 layers");

    // Each read goes to its own layer's blob, and only there.
    // A later file of a layer may already be local (fetch units and read-ahead stay inside its blob). The
    // read-ahead of the previous read may still be landing (nobody waits for it): it can only be in the
    // previous read's blob.
    let mut previous: Option<usize> = None;
    for (rel, layer, first) in
        [("app/main", 2, true), ("lib/libz.txt", 1, true), ("bin/tool", 0, true), ("lib/tail", 1, false), ("share/hl2", 0, false)]
    {
        let before = blob_gets(&registry);
        assert_eq!(read_file(&m.path(rel)), read_file(&expected.join(rel)), "{rel}");
        // The registry logs a request after answering it: wait (bounded) for this read's GET to be logged,
        // and for the log to be quiet, before judging where the read went.
        let after = settled_gets(&registry, |now| !first || grew(&before, now).contains(&digests[layer]));
        let went = grew(&before, &after);
        let allowed = |d: &String| *d == digests[layer] || previous.is_some_and(|p| *d == digests[p]);
        assert!(went.iter().all(allowed), "reading {rel} (layer {layer}, after layer {previous:?}) went to {went:?}");
        assert!(!first || went.contains(&digests[layer]), "reading {rel} fetched nothing from its layer: {went:?}");
        previous = Some(layer);
    }

    // The whole tree is the layers applied in order.
    assert_tree_identical(&expected, &m.mountpoint);
    for (a, b) in [("share/hl1", "share/hl2"), ("app/inline", "app/inline-link")] {
        let (ma, mb) = (m.path(a).metadata().unwrap(), m.path(b).metadata().unwrap());
        assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2), "{a} and {b} are one inode");
    }
    assert!(!m.path("etc/gone").exists() && !m.path("opt/old/x").exists() && !m.path("data/big").exists());
    assert!(m.path("opt/old/new").exists());
    let xattr = Command::new("getfattr").args(["-n", "trusted.overlay.opaque"]).arg(m.path("opt/old")).output().unwrap();
    assert!(!xattr.status.success(), "overlay xattrs are not shown");
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    let merged_len = status.segments[0].size as usize;
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // `erofs-fanotify merge` writes the same merged metadata the mount uses (the cache file's first segment).
    let out = work.join("merged.erofs");
    let mut c = env.command(common::EROFS_FANOTIFY);
    env.isolate(&mut c);
    let said = run_ok(c.args(["merge", &by_tag, "--output"]).arg(&out).args(["-o", "oci.insecure"]));
    assert!(said.contains("3 layers merged") && said.contains("2 whiteouts") && said.contains("1 opaque directories"), "{said}");
    let blob = env.cache_files().into_iter().find(|f| f.file_name().is_some_and(|n| n == "blob")).expect("the cache blob");
    let cached = read_file(&blob);
    assert_eq!(read_file(&out), &cached[..merged_len], "merge --output and the mount's merged metadata");

    // A second mount reuses the merged metadata recorded with the cache entry: no walk, only the probes.
    let before = blob_gets(&registry);
    let m = env.mount(&by_tag, "mnt", &[]);
    let after = blob_gets(&registry);
    let gets: usize = after.values().sum::<usize>() - before.values().sum::<usize>();
    assert!(gets <= 3, "{gets} blob GETs for a second mount of a complete entry");
    assert_tree_identical(&expected, &m.mountpoint);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

/// A multi-blob image made with our writer: a primary whose files are on device 1 (a chunked file, and
/// one by flat address past the primary), and the device's data blob. `slots` makes the device table
/// from the data blob's (digest hex, blocks, uniaddr the primary ends at).
fn multi_blob(data: &[u8], slots: impl Fn(&str, u32, u32) -> Vec<Device>) -> Vec<u8> {
    let meta = |perm| Metadata::new(perm, 0, 0, 1_700_000_000, 0);
    let hex = common::registry::sha256_hex(data);
    let blocks = data.len().div_ceil(4096) as u32;
    let tree = |uniaddr: u32| {
        let mut t = Tree::new(meta(0o755));
        let c = ChunkedData::contiguous(1, 0, 40_000, 12).unwrap();
        t.insert_path(b"on-device", Inode::file(meta(0o644), 40_000, FileData::Chunked(c)), meta(0o755)).unwrap();
        let flat = FileData::FlatAddress { block: u64::from(uniaddr) + 12 };
        t.insert_path(b"dir/by-flat-address", Inode::file(meta(0o600), 9_000, flat), meta(0o755)).unwrap();
        t.insert_path(b"local", Inode::bytes(meta(0o644), b"in the primary blob\n"), meta(0o755)).unwrap();
        t
    };
    let opts = |devices| WriterOptions { devices, derive_uuid: true, ..WriterOptions::default() };
    let head = planned_size(&tree(1), &opts(slots(&hex, blocks, 1))).unwrap();
    let uniaddr = head.div_ceil(4096) as u32;
    write_merged(&tree(uniaddr), &opts(slots(&hex, blocks, uniaddr))).unwrap().0
}

fn slot(hex: &str, blocks: u32, uniaddr: u32) -> Device {
    let mut tag = [0u8; 64];
    tag[..hex.len().min(64)].copy_from_slice(&hex.as_bytes()[..hex.len().min(64)]);
    Device { tag, blocks, uniaddr }
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry"]
fn a_multi_blob_image_mounts_flatdev_and_bad_device_tables_are_refused() {
    if !ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("multi-blob");
    let work = env.root.join("blobs");
    std::fs::create_dir_all(&work).unwrap();
    let data = random_bytes(9, 100_000);
    let data_path = work.join("data");
    std::fs::write(&data_path, &data).unwrap();
    let push = |tag: &str, primary: &[u8], layers: usize| {
        let p = work.join(format!("{tag}.erofs"));
        std::fs::write(&p, primary).unwrap();
        let mut specs = vec![LayerSpec { path: &p, media_type: ERFS_MEDIA_TYPE }];
        for _ in 0..layers {
            specs.push(LayerSpec { path: &data_path, media_type: "application/octet-stream" });
        }
        push_image(&registry, "test/multiblob", tag, &specs, "linux", "amd64");
        reference(&registry.host(), "test/multiblob", tag)
    };

    // A good table: one mount, the primary and the data blob as two segments (the blob at uniaddr).
    let good = multi_blob(&data, |hex, blocks, uniaddr| vec![slot(hex, blocks, uniaddr)]);
    let r = push("good", &good, 1);
    let m = env.mount(&r, "mnt", &[]);
    let status = m.status();
    assert_eq!(status.segments.len(), 2, "{status:?}");
    let data_digest = format!("sha256:{}", common::registry::sha256_hex(&data));
    assert_eq!(status.segments[1].label, data_digest);
    assert_eq!(status.segments[1].start, good.len().div_ceil(4096) as u64 * 4096);
    let before = blob_gets(&registry);
    assert_eq!(read_file(&m.path("on-device")), &data[..40_000]);
    assert_eq!(read_file(&m.path("dir/by-flat-address")), &data[12 * 4096..12 * 4096 + 9_000]);
    assert_eq!(grew(&before, &blob_gets(&registry)), vec![data_digest.clone()], "file data comes from the data blob");
    assert_eq!(read_file(&m.path("local")), b"in the primary blob\n");
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // Bad tables: refused with one line, nothing left behind.
    type Slots = Box<dyn Fn(&str, u32, u32) -> Vec<Device>>;
    let cases: Vec<(&str, Slots, usize, &[&str])> = vec![
        ("zero-blocks", Box::new(|h, _, u| vec![slot(h, 0, u)]), 1, &["zero blocks"]),
        ("overlap", Box::new(|h, b, _| vec![slot(h, b, 0)]), 1, &["overlaps"]),
        ("past-blob", Box::new(|h, b, u| vec![slot(h, b + 3, u)]), 1, &["claims"]),
        ("too-many-slots", Box::new(|h, b, u| vec![slot(h, b, u), slot("", b, u + b + 1)]), 1, &["slots but only"]),
        ("past-2-32", Box::new(|h, b, _| vec![slot(h, b, u32::MAX - 1)]), 1, &["2^32"]),
    ];
    for (tag, slots, layers, keywords) in cases {
        let image = multi_blob(&data, slots);
        let r = push(tag, &image, layers);
        let line = env.assert_mount_fails(&r, &[], keywords);
        assert!(line.contains("device"), "{tag}: {line}");
    }
}

/// Every regular file under `root` (relative paths).
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap().flatten() {
            let r = rel.join(e.file_name());
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry"]
fn killing_the_worker_of_a_merged_mount_loses_nothing() {
    if !ready() {
        return;
    }
    let registry = Registry::start();
    let env = OciEnv::new("multi-layer-kill");
    let (by_tag, _, expected, _) = push_three_layers(&registry, &env);
    let m = env.mount(&by_tag, "mnt", &["fetch_unit=64K"]);
    let worker = m.status().agent_pid;
    let files = files_under(&expected);
    // Readers over the cold merged mount; the worker dies while they read.
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let (files, root, expected) = (files.clone(), m.mountpoint.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut wrong = Vec::new();
                for k in 0..files.len() {
                    let rel = &files[(k + i * 3) % files.len()];
                    match std::fs::read(root.join(rel)) {
                        Ok(d) if d == std::fs::read(expected.join(rel)).unwrap() => {}
                        Ok(_) => wrong.push(format!("{}: wrong bytes", rel.display())),
                        Err(e) => wrong.push(format!("{}: {e}", rel.display())),
                    }
                }
                wrong
            })
        })
        .collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), nix::sys::signal::Signal::SIGKILL).unwrap();
    let failures: Vec<String> = readers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(failures.is_empty(), "reads during the worker's death: {failures:?}");
    // A successor serves the mount (it reuses the recorded merge) and the tree is whole.
    let successor = common::wait::wait_for(GONE_TIMEOUT, "a successor worker", || {
        let s = env.status().into_iter().find(|s| Path::new(&s.mountpoint) == m.mountpoint)?;
        (s.agent_pid != worker && s.agent_pid > 0).then_some(s)
    });
    assert_eq!(successor.segments.len(), 4, "{successor:?}");
    assert_eq!(successor.segments[0].label, "merged");
    assert_tree_identical(&expected, &m.mountpoint);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry"]
fn a_second_image_takes_its_shared_layers_from_the_cache() {
    if !ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("multi-layer-share");
    let (ref_a, pushed_a, expected_a, work) = push_three_layers(&registry, &env);
    // Image B: A's first two layers and one of its own (A's top layer plus a file).
    let l3 = work.join("l3");
    run_ok(Command::new("cp").arg("-a").arg(work.join("l2")).arg(&l3));
    write(&l3, "b-only", &random_bytes(11, 200_000));
    build(&l3, &work.join("l3.erofs"), &[]);
    let paths: Vec<PathBuf> = ["l0.erofs", "l1.erofs", "l3.erofs"].iter().map(|n| work.join(n)).collect();
    let specs: Vec<LayerSpec> = paths.iter().map(|p| LayerSpec { path: p, media_type: ERFS_MEDIA_TYPE }).collect();
    let pushed_b = push_image(&registry, "test/merged", "b", &specs, "linux", "amd64");
    let ref_b = reference(&registry.host(), "test/merged", "b");
    let expected_b = work.join("expected-b");
    run_ok(Command::new("cp").arg("-a").arg(&expected_a).arg(&expected_b));
    std::fs::copy(l3.join("b-only"), expected_b.join("b-only")).unwrap();

    // A, read whole: its entry holds every visible byte of the two shared layers.
    let m = env.mount(&ref_a, "mnt", &[]);
    assert_tree_identical(&expected_a, &m.mountpoint);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    let before = blob_gets(&registry);
    let m = env.mount(&ref_b, "mnt", &[]);
    assert_tree_identical(&expected_b, &m.mountpoint);
    let after = blob_gets(&registry);
    let gets = |d: &str| after.get(d).copied().unwrap_or(0) - before.get(d).copied().unwrap_or(0);
    for shared in &pushed_a.layers[..2] {
        assert_eq!(pushed_b.layers.iter().filter(|l| l.digest == shared.digest).count(), 1);
        // Only the 4 KiB probe that opens the layer goes to the registry; its metadata and data are local.
        assert_eq!(gets(&shared.digest), 1, "GETs of the shared layer {} for image B", shared.digest);
    }
    assert!(gets(&pushed_b.layers[2].digest) >= 2, "B's own layer is fetched: {after:?}");
    eprintln!(
        "image B: shared layers {} + {} GETs (probes), own layer {} GETs",
        gets(&pushed_a.layers[0].digest),
        gets(&pushed_a.layers[1].digest),
        gets(&pushed_b.layers[2].digest)
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}
