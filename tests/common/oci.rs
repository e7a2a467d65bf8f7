//! OCI helpers for the `oci_*` tests: small distinct EROFS images, pushing images (config, manifest,
//! layers) and multi-platform indexes to a registry, and `OciEnv` — a `TestEnv` whose mounts run with
//! `oci.insecure` (the test registries speak plain http) and an isolated credential environment.
//!
//! Credential isolation: every mount command gets its own `HOME`, `XDG_RUNTIME_DIR` and `XDG_CONFIG_HOME`
//! (empty directories under the env's root) and no `DOCKER_CONFIG` / `REGISTRY_AUTH_FILE` unless the test
//! sets them, so the machine's own `~/.docker/config.json` or containers `auth.json` can neither help nor
//! break a test.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::cmd::Outcome;
use super::env::{is_mounted, Mounted, TestEnv};
use super::fixtures::{random_bytes, Image};
use super::registry::{sha256_file, Registry};

pub const ERFS_MEDIA_TYPE: &str = "application/vnd.erofs";
pub const ERFS_LEGACY_MEDIA_TYPE: &str = "application/vnd.erofs.layer.v1";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const TAR_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A small EROFS image whose content depends on its label, with its source tree.
#[derive(Debug, Clone)]
pub struct TinyImage {
    pub label: String,
    pub tree: PathBuf,
    pub image: Image,
}

impl TinyImage {
    pub fn hex(&self) -> &str {
        self.image.digest.trim_start_matches("sha256:")
    }
}

/// Builds (once per process and label) a tree of a few files — `label.txt` holding the label, a 300 KiB
/// random file and a 200 KiB text file (data fetched lazily), small files in a subdirectory, a symlink —
/// and its plain EROFS image. Different labels give different images.
pub fn tiny_image(label: &str) -> TinyImage {
    static BUILT: OnceLock<Mutex<HashMap<String, TinyImage>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = built.get(label) {
        return image.clone();
    }
    let dir = process_dir().join(label);
    let _ = std::fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).expect("tiny tree dirs");
    let seed = u64::from_le_bytes(
        Sha256::digest(label.as_bytes())[..8]
            .try_into()
            .expect("8 bytes"),
    );
    std::fs::write(tree.join("label.txt"), format!("{label}\n")).expect("write label");
    std::fs::write(
        tree.join("random-300k"),
        random_bytes(seed, 300 * 1024 + 17),
    )
    .expect("write random");
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < 200 * 1024 {
        text.push_str(&format!(
            "{label} line {i} {}\n",
            seed.wrapping_mul(i + 1) % 1_000_003
        ));
        i += 1;
    }
    std::fs::write(tree.join("text-200k"), text).expect("write text");
    for n in 0..12 {
        let len = (n * 1531 + (seed as usize % 97)) % 9000;
        std::fs::write(
            tree.join(format!("sub/small-{n}")),
            random_bytes(seed ^ n as u64, len),
        )
        .expect("write small");
    }
    std::fs::write(
        tree.join("sub/deeper/inline"),
        format!("inline tail of {label}"),
    )
    .expect("write inline");
    std::os::unix::fs::symlink("../label.txt", tree.join("sub/link-to-label")).expect("symlink");
    let path = dir.join(format!("{label}.erofs"));
    let out = Command::new("mkfs.erofs")
        .args([
            "--quiet",
            "-T0",
            "-U",
            "6b1d8bdf-1f34-4a51-a3e9-1c5e1c2f5e02",
        ])
        .arg(&path)
        .arg(&tree)
        .output()
        .expect("run mkfs.erofs");
    assert!(
        out.status.success(),
        "mkfs.erofs for {label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = TinyImage {
        label: label.to_string(),
        tree,
        image: Image {
            digest: format!("sha256:{}", sha256_file(&path)),
            size: std::fs::metadata(&path).expect("image size").len(),
            path,
        },
    };
    built.insert(label.to_string(), image.clone());
    image
}

/// `CARGO_TARGET_TMPDIR/oci-images/pid-N`, created once; directories of dead test processes are removed.
fn process_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-images");
        std::fs::create_dir_all(&base).expect("oci-images dir");
        if let Ok(entries) = std::fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("pid-")
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let dir = base.join(format!("pid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("process oci-images dir");
        dir
    })
    .clone()
}

/// A content descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An image manifest pushed to a registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub repo: String,
    pub tag: String,
    /// The manifest itself.
    pub manifest: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A layer to push: a file and the media type to declare for it.
pub struct LayerSpec<'a> {
    pub path: &'a Path,
    pub media_type: &'a str,
}

/// Pushes the layers, a config blob for `os`/`arch` and an OCI image manifest; tags it `tag` (which may
/// also be a digest: then the manifest is stored by digest only).
pub fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[LayerSpec],
    os: &str,
    arch: &str,
) -> PushedImage {
    let diff_ids: Vec<String> = layers.iter().map(|l| diff_id(l)).collect();
    push_image_with_diff_ids(registry, repo, tag, layers, os, arch, &diff_ids)
}

/// A layer's diff_id: the sha256 of its uncompressed content (gzip layers are gunzipped; other
/// blobs, EROFS layers among them, and blobs that only claim a gzip media type, are their own content).
pub fn diff_id(l: &LayerSpec) -> String {
    use std::io::Read;
    let bytes = std::fs::read(l.path).expect("read layer");
    let mut tar = Vec::new();
    let content = match l.media_type.contains("gzip") && flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut tar).is_ok() {
        true => &tar,
        false => &bytes,
    };
    format!("sha256:{}", hex::encode(Sha256::digest(content)))
}

/// [`push_image`] with the config's `rootfs.diff_ids` as given (to test a config that lies).
pub fn push_image_with_diff_ids(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layers: &[LayerSpec],
    os: &str,
    arch: &str,
    diff_ids: &[String],
) -> PushedImage {
    let layers: Vec<Descriptor> = layers
        .iter()
        .map(|l| Descriptor {
            media_type: l.media_type.to_string(),
            digest: registry.push_blob_file(repo, l.path),
            size: std::fs::metadata(l.path).expect("layer size").len(),
        })
        .collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": os,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).expect("config json");
    let config = Descriptor {
        media_type: OCI_CONFIG.to_string(),
        digest: registry.push_blob(repo, &config),
        size: config.len() as u64,
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.json(),
        "layers": layers.iter().map(Descriptor::json).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    let pushed_digest = registry.push_manifest(repo, tag, &manifest, OCI_MANIFEST);
    assert_eq!(pushed_digest, digest, "registry digest of the manifest");
    PushedImage {
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest: Descriptor {
            media_type: OCI_MANIFEST.to_string(),
            digest,
            size: manifest.len() as u64,
        },
        layers,
    }
}

/// One EROFS layer (`application/vnd.erofs`), linux/amd64.
pub fn push_single(registry: &Registry, repo: &str, tag: &str, image: &Path) -> PushedImage {
    push_image(
        registry,
        repo,
        tag,
        &[LayerSpec {
            path: image,
            media_type: ERFS_MEDIA_TYPE,
        }],
        "linux",
        "amd64",
    )
}

/// A platform entry of an index.
pub struct PlatformEntry<'a> {
    pub image: &'a PushedImage,
    pub os: &'a str,
    pub arch: &'a str,
    pub variant: Option<&'a str>,
}

/// Pushes an OCI index over already pushed manifests; returns its digest.
pub fn push_index(registry: &Registry, repo: &str, tag: &str, entries: &[PlatformEntry]) -> String {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let mut platform = serde_json::json!({"os": e.os, "architecture": e.arch});
            if let Some(v) = e.variant {
                platform["variant"] = serde_json::Value::from(v);
            }
            let mut d = e.image.manifest.json();
            d["platform"] = platform;
            d
        })
        .collect();
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let index = serde_json::to_vec(&index).expect("index json");
    registry.push_manifest(repo, tag, &index, OCI_INDEX)
}

/// `HOST/REPO:TAG`
pub fn reference(host: &str, repo: &str, tag: &str) -> String {
    format!("{host}/{repo}:{tag}")
}

/// A `TestEnv` for OCI mounts (see module docs).
pub struct OciEnv {
    pub env: TestEnv,
    /// HOME of every mount command (empty unless a test puts files there).
    pub home: PathBuf,
}

impl Deref for OciEnv {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl OciEnv {
    pub fn new(name: &str) -> OciEnv {
        let env = TestEnv::new(name);
        let home = env.root.join("home");
        for dir in [home.clone(), home.join(".config"), home.join("run")] {
            std::fs::create_dir_all(&dir).expect("isolated home");
        }
        OciEnv { env, home }
    }

    /// Clears the credential environment of `cmd` (see module docs).
    pub fn isolate(&self, cmd: &mut Command) {
        cmd.env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("XDG_RUNTIME_DIR", self.home.join("run"))
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_AUTH_CONFIG");
    }

    fn options<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut opts = vec!["oci.insecure"];
        opts.extend_from_slice(extra);
        opts
    }

    /// Mounts `reference` with `oci.insecure` and `extra`; panics if it fails.
    pub fn mount(&self, reference: &str, mountpoint_name: &str, extra: &[&str]) -> Mounted {
        self.mount_with(reference, mountpoint_name, extra, |_| {})
    }

    /// `mount` with more environment set by `configure` (after the isolation).
    pub fn mount_with(
        &self,
        reference: &str,
        mountpoint_name: &str,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Mounted {
        self.env
            .mount_with(reference, mountpoint_name, &Self::options(extra), |cmd| {
                self.isolate(cmd);
                configure(cmd);
            })
    }

    /// Runs the mount and returns what happened.
    pub fn try_mount_with(
        &self,
        reference: &str,
        mountpoint: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Outcome {
        self.env
            .try_mount_with(reference, mountpoint, &Self::options(extra), |cmd| {
                self.isolate(cmd);
                configure(cmd);
            })
    }

    /// The mount must fail: non-zero exit, one stderr line naming the cause (one of `keywords`, matched
    /// case-insensitively after the program-name prefix), nothing mounted, no agent, no record, no new cache
    /// file. Returns the line.
    pub fn assert_mount_fails(&self, reference: &str, extra: &[&str], keywords: &[&str]) -> String {
        self.assert_mount_fails_with(reference, extra, keywords, |_| {})
    }

    pub fn assert_mount_fails_with(
        &self,
        reference: &str,
        extra: &[&str],
        keywords: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> String {
        let mountpoint = self.mountpoint("failing");
        let cache_before = self.cache_files();
        let outcome = self.try_mount_with(reference, &mountpoint, extra, configure);
        let line = assert_one_line_failure(&outcome, keywords);
        eprintln!(
            "{reference} {extra:?} failed as expected in {:.1?}: {line}",
            outcome.elapsed
        );
        assert!(
            !is_mounted(&mountpoint),
            "{} is mounted after a failed mount",
            mountpoint.display()
        );
        self.assert_nothing_left(&[]);
        let new_files: Vec<PathBuf> = self
            .cache_files()
            .into_iter()
            .filter(|f| !cache_before.contains(f))
            .collect();
        assert!(
            new_files.is_empty(),
            "a failed mount left cache files: {new_files:?}"
        );
        line
    }
}

/// The stderr line without a leading `erofs-mount:` / `error:` style prefix, lower-cased.
pub fn cause(line: &str) -> String {
    let mut rest = line.trim();
    loop {
        let lower = rest.to_ascii_lowercase();
        let prefix = ["erofs-mount:", "mount.erofs.fanotify:", "error:", "fatal:"]
            .into_iter()
            .find(|p| lower.starts_with(p));
        match prefix {
            Some(p) => rest = rest[p.len()..].trim_start(),
            None => return lower,
        }
    }
}

/// Non-zero exit and exactly one stderr line containing one of `keywords`; returns that line.
pub fn assert_one_line_failure(outcome: &Outcome, keywords: &[&str]) -> String {
    assert!(
        !outcome.success(),
        "expected a failure: {}",
        outcome.describe()
    );
    let lines = outcome.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr: {}",
        outcome.describe()
    );
    let cause = cause(lines[0]);
    assert!(
        keywords
            .iter()
            .any(|k| cause.contains(&k.to_ascii_lowercase())),
        "the error line does not name the cause (wanted one of {keywords:?}): {:?}",
        lines[0]
    );
    lines[0].to_string()
}

/// The endpoint named by a status's `served_by`, without trailing '/'.
pub fn served_by(status: &super::MountStatus) -> Vec<String> {
    let list = match &status.served_by {
        Some(s) => vec![s.clone()],
        None => panic!("status has no served_by: {status:?}"),
    };
    list.into_iter()
        .map(|s| s.trim_end_matches('/').to_string())
        .collect()
}

/// Error keywords for "the image/tag/repository does not exist".
pub const NOT_FOUND: &[&str] = &["not found", "unknown", "no such", "does not exist"];
/// Error keywords for refused credentials.
pub const AUTH_REFUSED: &[&str] = &[
    "auth",
    "unauthorized",
    "denied",
    "credential",
    "password",
    "401",
];
/// Error keywords for a token without pull access.
pub const INSUFFICIENT_SCOPE: &[&str] = &[
    "scope",
    "denied",
    "not allowed",
    "forbidden",
    "unauthorized",
    "access",
    "permission",
];
