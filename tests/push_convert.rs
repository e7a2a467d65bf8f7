//! `erofs-fanotify push` and `convert` against Debian's docker-registry, checked through real lazy mounts:
//! - build a tree -> push by tag (chunked upload: a blob above `--chunk-size`) and by digest (monolithic) ->
//!   `erofs-mount REF` -> the tree equals the source; pushes with htpasswd and token credentials;
//! - convert a 3-layer tar+gzip image made here with Python's tarfile/gzip (whiteout, opaque directory,
//!   hard links, a long PAX name, an xattr, an owner, an implied directory), pushed with Docker media
//!   types, with OCI media types, and as an index of two platforms -> `erofs-mount DST` -> the tree equals
//!   the layers applied in order with `tar -x` and whiteouts deleted by hand; the pushed config keeps the
//!   source's fields and history, with `rootfs.diff_ids` the EROFS layer's digest;
//! - `--per-layer`: N `application/vnd.erofs` layers in order, each mounting (`oci.layer=N`) as its own
//!   layer with whiteouts as char 0:0 and opaque directories as `trusted.overlay.opaque=y`;
//! - bad input (a layer whose bytes do not match its digest, a truncated gzip, a diff_id mismatch): one
//!   line, nothing pushed, nothing left in the temp dir.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::{self, Outcome};
use common::erofs_tree::{assert_same_tree, Checks};
use common::http::{self, Body};
use common::oci::{assert_one_line_failure, OciEnv, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use common::registry::{sha256_file, Registry, RegistryConfig};
use common::COMMAND_TIMEOUT;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn run_cli(env: &OciEnv, args: &[&str]) -> Outcome {
    let mut c = env.command(common::EROFS_FANOTIFY);
    env.isolate(&mut c);
    c.args(args);
    cmd::run(&mut c, COMMAND_TIMEOUT)
}

fn run_ok(c: &mut Command) -> String {
    let out = cmd::run(c, COMMAND_TIMEOUT);
    out.assert_success();
    out.stdout_str()
}

/// The one stdout line of a push/convert: the manifest digest.
fn printed_digest(out: &Outcome) -> String {
    out.assert_success();
    let s = out.stdout_str();
    let d = s.trim().to_string();
    assert!(d.starts_with("sha256:") && d.len() == 71 && s.lines().count() == 1, "stdout is not one digest: {s:?}");
    d
}

fn count(registry: &Registry, method: &str, path_part: &str) -> usize {
    registry.access_log().iter().filter(|(m, p, _)| m == method && p.contains(path_part)).count()
}

fn get_json(registry: &Registry, repo: &str, what: &str, accept: &str) -> serde_json::Value {
    let url = format!("{}/v2/{repo}/{what}", registry.base_url());
    let r = http::request("GET", &url, &[("Accept", accept)], Body::Empty).expect("GET");
    assert_eq!(r.status, 200, "GET {url}: {}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).expect("json")
}

/// The config of `repo:tag` and its manifest.
fn manifest_and_config(registry: &Registry, repo: &str, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let m = get_json(registry, repo, &format!("manifests/{tag}"), OCI_MANIFEST);
    let config = get_json(registry, repo, &format!("blobs/{}", m["config"]["digest"].as_str().unwrap()), "*/*");
    (m, config)
}

fn make_source_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello from push\n").unwrap();
    std::fs::write(root.join("sub/big.bin"), common::fixtures::random_bytes(42, (3 << 20) + 12345)).unwrap();
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(root.join("sub/deeper/text"), text).unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("sub/link")).unwrap();
    std::fs::hard_link(root.join("hello.txt"), root.join("sub/hard")).unwrap();
    xattr::set(root.join("hello.txt"), "user.greeting", b"hi").unwrap();
    std::os::unix::fs::lchown(root.join("sub/deeper/text"), Some(1234), Some(5678)).unwrap();
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs"]
fn build_push_mount_round_trip() {
    if !common::ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("push-roundtrip");
    let src = env.root.join("src");
    make_source_tree(&src);
    let image = env.root.join("tree.erofs");
    run_ok(Command::new(common::EROFS_FANOTIFY).args(["build", "--compress", "lz4"]).arg(&src).arg(&image));
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(size > 2 << 20, "the image must be larger than two chunks: {size}");

    // By tag, chunked (1 MiB chunks).
    let by_tag = format!("{}/push/tree:v1", registry.host());
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &by_tag, "-o", "oci.insecure", "--chunk-size", "1M"]);
    let digest = printed_digest(&out);
    let patches = count(&registry, "PATCH", "/v2/push/tree/blobs/uploads/");
    assert_eq!(patches as u64, size.div_ceil(1 << 20), "one PATCH per MiB of the blob");
    let (m, config) = manifest_and_config(&registry, "push/tree", "v1");
    assert_eq!(m["mediaType"], OCI_MANIFEST);
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.erofs");
    assert_eq!(m["layers"][0]["digest"].as_str().unwrap(), format!("sha256:{}", sha256_file(&image)));
    assert_eq!(m["layers"][0]["size"].as_u64(), Some(size));
    assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
    assert_eq!(config["rootfs"]["diff_ids"][0], m["layers"][0]["digest"], "EROFS is not compressed: diff_id = blob digest");
    assert_eq!(config["os"], "linux");
    {
        let mounted = env.mount(&by_tag, "mnt-tag", &[]);
        assert_same_tree(&src, &mounted.mountpoint, Checks::all());
    }

    // Again to the same repository: the blobs are there, only HEADs and the manifest PUT.
    let posts_before = count(&registry, "POST", "/v2/push/tree/blobs/uploads/");
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &by_tag, "-o", "oci.insecure"]);
    assert_eq!(printed_digest(&out), digest, "the same image gives the same manifest");
    assert_eq!(count(&registry, "POST", "/v2/push/tree/blobs/uploads/"), posts_before, "no upload of blobs already there");

    // By digest to another repository, monolithic (default chunk size 64M).
    let by_digest = format!("{}/push/other@{digest}", registry.host());
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &by_digest, "-o", "oci.insecure"]);
    assert_eq!(printed_digest(&out), digest);
    assert_eq!(count(&registry, "PATCH", "/v2/push/other/"), 0, "monolithic upload");
    assert_eq!(count(&registry, "PUT", &format!("/v2/push/other/manifests/{digest}")), 1, "put by digest");
    {
        let mounted = env.mount(&by_digest, "mnt-digest", &[]);
        assert_same_tree(&src, &mounted.mountpoint, Checks::all());
    }
    // A digest that is not the manifest's: refused before anything is sent.
    let wrong = format!("{}/push/third@sha256:{}", registry.host(), "0".repeat(64));
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &wrong, "-o", "oci.insecure"]);
    assert_one_line_failure(&out, &["names digest"]);
    // Not an EROFS image.
    let out = run_cli(&env, &["push", src.join("hello.txt").to_str().unwrap(), &by_tag, "-o", "oci.insecure"]);
    assert_one_line_failure(&out, &["not an erofs image"]);
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs + htpasswd + openssl"]
fn push_with_htpasswd_and_token_credentials() {
    use common::token_server::{basic_auth, TokenPolicy, TokenServer};
    if !common::oci_ready() {
        return;
    }
    let env = OciEnv::new("push-auth");
    let src = env.root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"credentials\n").unwrap();
    let image = env.root.join("img.erofs");
    run_ok(Command::new(common::EROFS_FANOTIFY).arg("build").arg(&src).arg(&image));

    // htpasswd: right and wrong password.
    let out = Command::new("htpasswd").args(["-Bbn", "pusher", "s3cret-Pw"]).output().unwrap();
    let file = env.root.join("htpasswd");
    std::fs::write(&file, String::from_utf8(out.stdout).unwrap().trim().to_string() + "\n").unwrap();
    let registry = Registry::start_with(&RegistryConfig {
        extra_yaml: format!("auth:\n  htpasswd:\n    realm: push-tests\n    path: {}\n", file.display()),
        access_log: false,
    });
    let reference = format!("{}/auth/img:v1", registry.host());
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &reference, "-o", "oci.insecure,oci.username=pusher,oci.password=s3cret-Pw"]);
    printed_digest(&out);
    registry.set_push_auth(Some(basic_auth("pusher", "s3cret-Pw")));
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &reference, "-o", "oci.insecure,oci.username=pusher,oci.password=wrong-one"]);
    let line = assert_one_line_failure(&out, &["refused"]);
    assert!(!line.contains("wrong-one"), "the password shows: {line}");
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &reference, "-o", "oci.insecure"]);
    assert_one_line_failure(&out, &["requires authentication"]);

    // Token auth: a user who may push gets one token with pull,push; a user who may not is told so.
    let tokens = TokenServer::start(TokenPolicy {
        anonymous_pull: false,
        users: vec![("pusher".into(), "s3cret-Pw".into())],
        users_may_push: true,
        ..TokenPolicy::default()
    });
    let registry = Registry::start_with(&RegistryConfig { extra_yaml: tokens.registry_yaml(), access_log: false });
    let reference = format!("{}/tok/img:v1", registry.host());
    let opts = "oci.insecure,oci.username=pusher,oci.password=s3cret-Pw";
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &reference, "-o", opts]);
    let digest = printed_digest(&out);
    assert_eq!(tokens.issued(), 1, "one token for the whole push: {:?}", tokens.requests());
    assert!(tokens.requests()[0].target.contains("pull%2Cpush"), "{:?}", tokens.requests());
    {
        let mounted = env.mount(&reference, "mnt", &["oci.username=pusher", "oci.password=s3cret-Pw"]);
        assert_eq!(std::fs::read(mounted.path("f")).unwrap(), b"credentials\n");
    }
    tokens.set_policy(TokenPolicy {
        anonymous_pull: false,
        users: vec![("pusher".into(), "s3cret-Pw".into())],
        users_may_push: false,
        ..TokenPolicy::default()
    });
    let other = format!("{}/tok/other:v1", registry.host());
    let out = run_cli(&env, &["push", image.to_str().unwrap(), &other, "-o", opts]);
    assert_one_line_failure(&out, &["do not grant push access"]);
    assert!(!digest.is_empty());
    env.assert_nothing_left(&[]);
}

// ---- source images made with Python ----

/// Writes layer{0,1,2}.tar and .tar.gz (PAX format) into argv[1], and layer{3}: an arm64-only base.
const LAYERS_PY: &str = r#"
import gzip, io, random, sys, tarfile
out = sys.argv[1]
rnd = random.Random(1234)
T = 1700000000
def info(name, type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=T, size=0, linkname='', pax=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.size, ti.linkname = type, mode, uid, gid, mtime, size, linkname
    ti.uname = ti.gname = ''
    if pax:
        ti.pax_headers = pax
    return ti
def f(name, data, **kw): return (info(name, size=len(data), **kw), data)
def d(name, mode=0o755, **kw): return (info(name, type=tarfile.DIRTYPE, mode=mode, **kw), None)
def hard(name, target): return (info(name, type=tarfile.LNKTYPE, linkname=target), None)
def sym(name, target): return (info(name, type=tarfile.SYMTYPE, linkname=target, mode=0o777), None)
def layer(k, entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    open(f'{out}/layer{k}.tar', 'wb').write(raw)
    open(f'{out}/layer{k}.tar.gz', 'wb').write(gzip.compress(raw, mtime=0))
big = rnd.randbytes(700 * 1024)
layer(0, [d('./'), d('etc/'), f('etc/passwd', b'root:x:0:0\n'), f('etc/gone', b'bye\n'),
          f('etc/keep', b'keep\n', pax={'SCHILY.xattr.user.note': 'kept'}),
          f('etc/owned', b'owned', uid=1000, gid=1001, mode=0o600),
          d('opq/', 0o750), f('opq/old', b'old'), d('opq/sub/'), f('opq/sub/deep', b'deep'),
          d('data/', 0o711), f('data/big', big), hard('data/big-link', 'data/big'),
          d('bin/'), f('bin/busybox', b'#!not really\n', mode=0o755), sym('bin/sh', 'busybox'),
          d('long/'), f('long/' + 'n' * 180, b'a long PAX name\n')])
layer(1, [d('./'), d('etc/'), f('etc/.wh.gone', b''), f('etc/passwd', b'root:x:0:0\nuser:x:1000:1000\n'),
          d('opq/', 0o750), f('opq/.wh..wh..opq', b''), f('opq/new', b'new'),
          f('data/extra', b'extra'),
          d('links/'), f('links/a', b'A'), hard('links/b', 'links/a')])
layer(2, [d('./'), d('data/', 0o711), f('data/.wh.big-link', b''), f('etc/passwd', b'root:x:0:0\n# third\n', mode=0o640)])
layer(3, [d('./'), d('arm/'), f('arm/only', b'arm64 only\n')])
"#;

struct Layer {
    tar: PathBuf,
    gz: PathBuf,
    /// sha256 of the uncompressed tar.
    diff_id: String,
}

fn make_layers(dir: &Path) -> Vec<Layer> {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(Command::new("python3").arg("-c").arg(LAYERS_PY).arg(dir));
    (0..4)
        .map(|k| {
            let tar = dir.join(format!("layer{k}.tar"));
            Layer { diff_id: format!("sha256:{}", sha256_file(&tar)), gz: dir.join(format!("layer{k}.tar.gz")), tar }
        })
        .collect()
}

fn desc(media_type: &str, digest: &str, size: u64) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
}

/// Pushes blobs of `gz_files` and a config + manifest (Docker or OCI media types); returns the manifest
/// descriptor. `diff_ids` go in the config as given.
fn push_source(registry: &Registry, repo: &str, tag: &str, gz_files: &[&Path], diff_ids: &[String], docker: bool, arch: &str) -> serde_json::Value {
    let (manifest_type, config_type, layer_type) =
        if docker { (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER) } else { (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER) };
    let layers: Vec<serde_json::Value> = gz_files
        .iter()
        .map(|p| desc(layer_type, &registry.push_blob_file(repo, p), std::fs::metadata(p).unwrap().len()))
        .collect();
    let history: Vec<serde_json::Value> = (0..gz_files.len())
        .flat_map(|i| [serde_json::json!({"created_by": format!("layer {i}")}), serde_json::json!({"created_by": "ENV X=1", "empty_layer": true})])
        .collect();
    let config = serde_json::json!({
        "architecture": arch, "os": "linux", "created": "2024-05-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin", "X=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/etc"},
        "history": history,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = registry.push_blob(repo, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": manifest_type,
        "config": desc(config_type, &config_digest, config.len() as u64),
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = registry.push_manifest(repo, tag, &bytes, manifest_type);
    desc(manifest_type, &digest, bytes.len() as u64)
}

/// Applies layer tars in order with `tar -x`, deleting what whiteouts name (and everything below an
/// opaque marker) by hand before each layer, and the markers after.
fn apply_with_tar(layers: &[&Layer], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    set_mode(dest, 0o755);
    for layer in layers {
        let listing = run_ok(Command::new("tar").arg("-tf").arg(&layer.tar));
        let mut markers = Vec::new();
        for name in listing.lines() {
            let name = name.trim_start_matches("./").trim_end_matches('/');
            let (dir, base) = match name.rsplit_once('/') {
                Some((d, b)) => (dest.join(d), b),
                None => (dest.to_path_buf(), name),
            };
            if base == ".wh..wh..opq" {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries {
                        remove_any(&e.unwrap().path());
                    }
                }
                markers.push(dir.join(base));
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                remove_any(&dir.join(hidden));
                markers.push(dir.join(base));
            }
        }
        run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-xf"]).arg(&layer.tar).arg("-C").arg(dest));
        for m in markers {
            std::fs::remove_file(&m).unwrap_or_else(|e| panic!("marker {}: {e}", m.display()));
        }
    }
}

/// One layer extracted alone, with its markers as overlayfs wants them (what `--per-layer` writes):
/// `.wh.X` -> char 0:0 `X` (with the marker's metadata) and an empty `trusted.overlay.origin` on its
/// directory; `.wh..wh..opq` -> `trusted.overlay.opaque=y` on its directory.
fn extract_with_markers(layer: &Layer, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    set_mode(dest, 0o755);
    run_ok(Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-xf"]).arg(&layer.tar).arg("-C").arg(dest));
    let listing = run_ok(Command::new("tar").arg("-tf").arg(&layer.tar));
    for name in listing.lines() {
        let name = name.trim_start_matches("./").trim_end_matches('/');
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, b)) => (dest.join(d), b),
            None => (dest.to_path_buf(), name),
        };
        if base == ".wh..wh..opq" {
            std::fs::remove_file(dir.join(base)).unwrap();
            xattr::set(&dir, "trusted.overlay.opaque", b"y").unwrap();
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            let marker = dir.join(base);
            let st = std::fs::symlink_metadata(&marker).unwrap();
            std::fs::remove_file(&marker).unwrap();
            let target = dir.join(hidden);
            nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(st.mode() & 0o7777), 0).unwrap();
            std::os::unix::fs::lchown(&target, Some(st.uid()), Some(st.gid())).unwrap();
            let t = nix::sys::time::TimeSpec::new(st.mtime(), 0);
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, &target, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
            xattr::set(&dir, "trusted.overlay.origin", b"").unwrap();
        }
    }
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Directory mtimes are not compared: `tar -x` and the hand-made deletions touch them.
fn layer_checks() -> Checks {
    Checks { dir_mtime: false, ..Checks::all() }
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs + python3"]
fn convert_flattens_docker_oci_and_index_images() {
    if !common::ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("convert-flat");
    let layers = make_layers(&env.root.join("layers"));
    let three: Vec<&Path> = layers[..3].iter().map(|l| l.gz.as_path()).collect();
    let ids: Vec<String> = layers[..3].iter().map(|l| l.diff_id.clone()).collect();
    push_source(&registry, "src/app", "docker", &three, &ids, true, "amd64");
    let oci = push_source(&registry, "src/app", "oci", &three, &ids, false, "amd64");
    let arm = push_source(&registry, "src/app", "arm-only", &[&layers[3].gz], &[layers[3].diff_id.clone()], false, "arm64");
    let mut amd_entry = oci.clone();
    amd_entry["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut arm_entry = arm.clone();
    arm_entry["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd_entry, arm_entry]});
    registry.push_manifest("src/app", "multi", &serde_json::to_vec(&index).unwrap(), OCI_INDEX);

    let expected = env.root.join("expected");
    apply_with_tar(&[&layers[0], &layers[1], &layers[2]], &expected);
    // The flattening that the expected tree went through, spelled out.
    assert!(!expected.join("etc/gone").exists() && !expected.join("opq/old").exists() && expected.join("opq/new").exists());
    assert_eq!(std::fs::metadata(expected.join("data/big")).unwrap().nlink(), 1);
    assert_eq!(std::fs::metadata(expected.join("links/a")).unwrap().ino(), std::fs::metadata(expected.join("links/b")).unwrap().ino());

    let host = registry.host();
    let tmp = env.root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let convert = |src: &str, dst: &str, extra: &[&str]| -> String {
        let mut args = vec!["convert", src, dst, "-o", "oci.insecure", "--tmpdir", tmp.to_str().unwrap()];
        args.extend_from_slice(extra);
        let d = printed_digest(&run_cli(&env, &args));
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the temp dir is removed");
        d
    };

    let from_docker = convert(&format!("{host}/src/app:docker"), &format!("{host}/dst/app:docker"), &["--chunk-size", "256K"]);
    assert!(count(&registry, "PATCH", "/v2/dst/app/blobs/uploads/") > 0, "chunked upload of the EROFS layer");
    assert_eq!(count(&registry, "POST", "/v2/dst/app/blobs/uploads/"), 2, "one upload for the layer, one for the config");
    {
        let mounted = env.mount(&format!("{host}/dst/app:docker"), "mnt-docker", &[]);
        assert_same_tree(&expected, &mounted.mountpoint, layer_checks());
    }
    let (m, config) = manifest_and_config(&registry, "dst/app", "docker");
    assert_eq!(m["layers"].as_array().unwrap().len(), 1);
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.erofs");
    assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
    assert_eq!(config["rootfs"], serde_json::json!({"type": "layers", "diff_ids": [m["layers"][0]["digest"]]}));
    assert_eq!(config["config"]["Env"], serde_json::json!(["PATH=/bin", "X=1"]));
    assert_eq!(config["config"]["WorkingDir"], "/etc");
    assert_eq!(config["history"].as_array().unwrap().len(), 6, "history kept");
    assert_eq!(config["created"], "2024-05-01T00:00:00Z");

    let from_oci = convert(&format!("{host}/src/app:oci"), &format!("{host}/dst/app:oci"), &["--compress", "lz4"]);
    {
        let mounted = env.mount(&format!("{host}/dst/app:oci"), "mnt-oci", &[]);
        assert_same_tree(&expected, &mounted.mountpoint, layer_checks());
    }
    // The index: the amd64 entry converts to exactly what its manifest converts to.
    let from_index = convert(&format!("{host}/src/app:multi"), &format!("{host}/dst/app:multi"), &["--compress", "lz4", "--platform", "linux/amd64"]);
    assert_eq!(from_index, from_oci, "the same source gives the same converted image");
    assert_ne!(from_docker, from_oci, "lz4 and plain images differ");
    // ... and the arm64 entry is the other image.
    convert(&format!("{host}/src/app:multi"), &format!("{host}/dst/app:arm"), &["--platform", "linux/arm64"]);
    let arm_expected = env.root.join("expected-arm");
    apply_with_tar(&[&layers[3]], &arm_expected);
    {
        let mounted = env.mount(&format!("{host}/dst/app:arm"), "mnt-arm", &[]);
        assert_same_tree(&arm_expected, &mounted.mountpoint, layer_checks());
    }
    let (_, config) = manifest_and_config(&registry, "dst/app", "arm");
    assert_eq!(config["architecture"], "arm64");
    // A platform the index lacks.
    let out = run_cli(&env, &["convert", &format!("{host}/src/app:multi"), &format!("{host}/dst/app:s390x"), "-o", "oci.insecure", "--platform", "linux/s390x", "--tmpdir", tmp.to_str().unwrap()]);
    assert_one_line_failure(&out, &["no manifest for platform linux/s390x"]);
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs + python3"]
fn convert_per_layer_keeps_overlay_markers() {
    if !common::ready() {
        return;
    }
    let registry = Registry::start();
    let env = OciEnv::new("convert-per-layer");
    let layers = make_layers(&env.root.join("layers"));
    let three: Vec<&Path> = layers[..3].iter().map(|l| l.gz.as_path()).collect();
    let ids: Vec<String> = layers[..3].iter().map(|l| l.diff_id.clone()).collect();
    push_source(&registry, "src/app", "v1", &three, &ids, true, "amd64");
    let host = registry.host();
    let tmp = env.root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let out = run_cli(&env, &["convert", &format!("{host}/src/app:v1"), &format!("{host}/dst/layers:v1"), "--per-layer", "-o", "oci.insecure", "--tmpdir", tmp.to_str().unwrap()]);
    printed_digest(&out);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the temp dir is removed");
    let (m, config) = manifest_and_config(&registry, "dst/layers", "v1");
    let pushed = m["layers"].as_array().unwrap();
    assert_eq!(pushed.len(), 3);
    for (i, l) in pushed.iter().enumerate() {
        assert_eq!(l["mediaType"], "application/vnd.erofs", "layer {i}");
        assert_eq!(config["rootfs"]["diff_ids"][i], l["digest"], "diff_ids in layer order");
    }
    assert_eq!(config["history"].as_array().unwrap().len(), 6);
    for (i, layer) in layers[..3].iter().enumerate() {
        let expected = env.root.join(format!("expected-{i}"));
        extract_with_markers(layer, &expected);
        let mounted = env.mount(&format!("{host}/dst/layers:v1"), &format!("mnt-{i}"), &[&format!("oci.layer={i}")]);
        assert_same_tree(&expected, &mounted.mountpoint, layer_checks());
        if i == 1 {
            let gone = std::fs::symlink_metadata(mounted.path("etc/gone")).unwrap();
            assert!(std::os::unix::fs::FileTypeExt::is_char_device(&gone.file_type()) && gone.rdev() == 0, "whiteout as char 0:0");
            assert_eq!(xattr::get(mounted.path("opq"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
            assert!(!mounted.path("opq/old").exists(), "the layer holds only its own entries");
        }
    }
    env.assert_nothing_left(&[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs + python3"]
fn convert_refuses_bad_layers_and_pushes_nothing() {
    if !common::ready() {
        return;
    }
    let registry = Registry::start();
    let env = OciEnv::new("convert-bad");
    let layers = make_layers(&env.root.join("layers"));
    let host = registry.host();
    let tmp = env.root.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();

    // A layer whose stored bytes no longer match its digest (flipped in the registry's storage).
    let corrupt = env.root.join("corrupt.tar.gz");
    std::fs::copy(&layers[0].gz, &corrupt).unwrap();
    // Make the blob unique to this case: gzip members concatenate, so append an empty-tar member.
    run_ok(Command::new("sh").arg("-c").arg(format!("head -c 1024 /dev/zero | gzip -n >> {}", corrupt.display())));
    push_source(&registry, "src/corrupt", "v1", &[&corrupt], &[layers[0].diff_id.clone()], false, "amd64");
    let hex = sha256_file(&corrupt);
    let stored = registry.storage().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();

    // A truncated gzip (stored with its own, right digest).
    let truncated = env.root.join("truncated.tar.gz");
    let gz = std::fs::read(&layers[1].gz).unwrap();
    std::fs::write(&truncated, &gz[..gz.len() - 200]).unwrap();
    push_source(&registry, "src/truncated", "v1", &[&layers[0].gz, &truncated], &[layers[0].diff_id.clone(), layers[1].diff_id.clone()], true, "amd64");

    // A config whose diff_id does not match the layer.
    push_source(&registry, "src/diffid", "v1", &[&layers[2].gz], &[layers[0].diff_id.clone()], false, "amd64");

    for (src, keywords) in [
        ("src/corrupt", &["does not match its digest"][..]),
        ("src/truncated", &["truncated", "corrupt"][..]),
        ("src/diffid", &["diff_id"][..]),
    ] {
        let dst = format!("{src}-erofs").replace("src/", "dst/");
        let out = run_cli(&env, &["convert", &format!("{host}/{src}:v1"), &format!("{host}/{dst}:v1"), "-o", "oci.insecure", "--tmpdir", tmp.to_str().unwrap()]);
        let line = assert_one_line_failure(&out, keywords);
        assert!(line.starts_with("erofs-fanotify: "), "{line}");
        assert!(out.stdout.is_empty(), "nothing printed on stdout: {}", out.stdout_str());
        let repo_dir = registry.storage().join("docker/registry/v2/repositories").join(&dst);
        assert!(!repo_dir.exists(), "{src}: something was pushed to {dst}");
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "{src}: temp files left: {left:?}");
        eprintln!("{src}: {line}");
    }
    env.assert_nothing_left(&[]);
}

/// The lazy layout (issue 14): all metadata in one run after the superblock, so a cold lazy mount of an
/// image from our writer stands after two requests (the first bytes, then the rest of the metadata in one
/// range) and fetches no file data; the same tree from mkfs.erofs takes a request chain (printed beside).
/// The tree: 40 directories of 60 files each (a few KiB each, some larger) and a few levels of nesting,
/// so its metadata is far more than the first block.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + docker-registry + mkfs.erofs"]
fn a_built_image_mounts_lazily_in_two_requests() {
    if !common::ready() {
        return;
    }
    let registry = Registry::start_with(&RegistryConfig { access_log: true, ..Default::default() });
    let env = OciEnv::new("push-lazy-layout");
    let src = env.root.join("src");
    for d in 0..40u64 {
        let dir = src.join(format!("d{d:02}/sub/deeper"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..60u64 {
            let len = if f % 20 == 0 { 200_000 } else { (f * 997 + d * 31) % 6000 };
            std::fs::write(dir.join(format!("file-{f:03}")), common::fixtures::random_bytes(d * 1000 + f, len as usize)).unwrap();
        }
        std::os::unix::fs::symlink("sub/deeper/file-001", src.join(format!("d{d:02}/link"))).unwrap();
    }
    let mut figures = Vec::new();
    for (label, builder) in [("ours", "build"), ("mkfs.erofs", "mkfs")] {
        let image = env.root.join(format!("{label}.erofs"));
        let out = if builder == "build" {
            run_ok(Command::new(common::EROFS_FANOTIFY).args(["build", "--compress", "lz4"]).arg(&src).arg(&image))
        } else {
            run_ok(Command::new("mkfs.erofs").args(["--quiet", "-zlz4"]).arg(&image).arg(&src))
        };
        let reference = format!("{}/lazy/{label}:v1", registry.host());
        run_cli(&env, &["push", image.to_str().unwrap(), &reference, "-o", "oci.insecure"]);
        let mounted = env.mount(&reference, &format!("mnt-{label}"), &[]);
        let status = mounted.status();
        figures.push(format!("{label}: {} requests, {} round trips, {} bytes at mount", status.mount_requests, status.walk_round_trips, status.fetched_bytes));
        if builder == "build" {
            let meta_end = common::built_metadata_end(&out);
            assert!(meta_end > 64 << 10, "the metadata ({meta_end} bytes) must be more than the first read");
            assert!(status.mount_requests <= 2, "{} requests to mount our image: {status:?}", status.mount_requests);
            // Only metadata came (the cache's pages hold at most its run, page-rounded, and the first read).
            assert!(status.fetched_bytes <= meta_end.next_multiple_of(4096).max(64 << 10), "{} bytes fetched for {meta_end} bytes of metadata", status.fetched_bytes);
        }
        assert_same_tree(&src, &mounted.mountpoint, Checks::all());
    }
    eprintln!("LAZY LAYOUT cold mount: {}", figures.join("; "));
    env.assert_nothing_left(&[]);
}
