//! `erofs-fanotify hook [--stage STAGE]`: an OCI runtime hook (container state JSON on stdin).
//!
//! Driven by the container's annotations:
//! - `org.erofs-fanotify.image`: the image source (reference or URL), as for `erofs-mount`;
//! - `org.erofs-fanotify.target`: where to mount it, a path inside the container's rootfs;
//! - `org.erofs-fanotify.options`: optional `-o` options (`oci.insecure`, `cache_dir=`, ...).
//!
//! A container without any of them is not ours: the hook does nothing. A half-specified or bad set
//! fails the hook with one clear line, before anything is mounted.
//!
//! Stages: `createRuntime` (or the older `prestart`, same moment) mounts; `poststop` unmounts. Both run
//! in the runtime's (host) namespaces. At createRuntime the container's mount namespace exists and its
//! rootfs is bind-mounted, but pivot_root has not happened: the hook mounts on the *host* path
//! `<rootfs>/<target>`, and the mount reaches the container through mount propagation (runc makes the
//! container's mounts slaves of the host's — `rootfsPropagation` defaults to rslave — so a mount made on a
//! shared host mount below the rootfs appears inside). The agent stays in the host namespace, watching a
//! host mount; `poststop` runs `erofs-umount` on the same host path. `createContainer`/`startContainer`
//! run inside the container's namespaces, where our binaries and state dir are not, so they do not fit.
//! Without `--stage` the stage is taken from the state's `status` (`creating` mounts, `stopped` unmounts).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::CliError;

pub const IMAGE_ANNOTATION: &str = "org.erofs-fanotify.image";
pub const TARGET_ANNOTATION: &str = "org.erofs-fanotify.target";
pub const OPTIONS_ANNOTATION: &str = "org.erofs-fanotify.options";

/// The OCI container state (runtime-spec `state.json`); only what we need.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    #[serde(default)]
    pub oci_version: String,
    pub id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub pid: Option<i64>,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// What the annotations ask for.
#[derive(Debug, PartialEq)]
pub struct HookRequest {
    pub image: String,
    /// Relative to the rootfs, normal components only.
    pub target: PathBuf,
    pub options: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    Mount,
    Unmount,
}

/// The stage from `--stage` or, failing that, from the container's status.
pub fn stage_of(stage: Option<&str>, status: &str) -> Result<Stage, CliError> {
    match stage.unwrap_or(status) {
        "createRuntime" | "prestart" | "creating" | "created" => Ok(Stage::Mount),
        "poststop" | "stopped" => Ok(Stage::Unmount),
        other => Err(CliError::new(format!(
            "hook stage {other:?} is not supported (use createRuntime/prestart to mount, poststop to unmount)"
        ))),
    }
}

/// Reads our annotations. `Ok(None)`: none present, the container is not ours.
pub fn parse_annotations(annotations: &HashMap<String, String>) -> Result<Option<HookRequest>, CliError> {
    let image = annotations.get(IMAGE_ANNOTATION).map(|s| s.trim());
    let target = annotations.get(TARGET_ANNOTATION).map(|s| s.trim());
    let options = annotations.get(OPTIONS_ANNOTATION).map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let (image, target) = match (image, target) {
        (None, None) if options.is_none() => return Ok(None),
        (Some(i), Some(t)) if !i.is_empty() && !t.is_empty() => (i, t),
        (None | Some(""), _) => return Err(CliError::new(format!("annotation {IMAGE_ANNOTATION} is missing or empty"))),
        (_, _) => return Err(CliError::new(format!("annotation {TARGET_ANNOTATION} is missing or empty"))),
    };
    let mut rel = PathBuf::new();
    for component in Path::new(target).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(c) => rel.push(c),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CliError::new(format!("annotation {TARGET_ANNOTATION}={target:?} must not contain '..'")))
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(CliError::new(format!("annotation {TARGET_ANNOTATION}={target:?} names the rootfs itself")));
    }
    if let Some(opts) = &options {
        crate::mount::MountOptions::parse(opts)
            .map_err(|e| CliError::new(format!("annotation {OPTIONS_ANNOTATION}: {e}")))?;
    }
    Ok(Some(HookRequest { image: image.to_string(), target: rel, options }))
}

#[derive(Deserialize)]
struct BundleConfig {
    root: Option<BundleRoot>,
}

#[derive(Deserialize)]
struct BundleRoot {
    path: PathBuf,
}

/// The rootfs path on the host: `root.path` of the bundle's config.json, relative to the bundle.
fn rootfs_of(bundle: &Path) -> Result<PathBuf, CliError> {
    let config_path = bundle.join("config.json");
    let mut text = String::new();
    std::fs::File::open(&config_path)
        .and_then(|f| f.take(16 << 20).read_to_string(&mut text))
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", config_path.display())))?;
    let config: BundleConfig = serde_json::from_str(&text)
        .map_err(|e| CliError::new(format!("{} is not an OCI config: {e}", config_path.display())))?;
    let root = config.root.ok_or_else(|| CliError::new(format!("{} has no root.path", config_path.display())))?;
    Ok(if root.path.is_absolute() { root.path } else { bundle.join(root.path) })
}

/// `<rootfs>/<target>`, created if missing, refusing symlinks on the way (they would be resolved on the
/// host, possibly outside the rootfs).
fn host_target(rootfs: &Path, target: &Path, create: bool) -> Result<PathBuf, CliError> {
    let mut path = rootfs.to_path_buf();
    for component in target.components() {
        path.push(component);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(CliError::new(format!("{} inside the rootfs is a symlink; refusing to mount through it", path.display())))
            }
            Ok(m) if !m.is_dir() => return Err(CliError::new(format!("{} is not a directory", path.display()))),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&path).map_err(|e| CliError::new(format!("cannot create {}: {e}", path.display())))?
            }
            Err(e) => return Err(CliError::new(format!("cannot access {}: {e}", path.display()))),
        }
    }
    Ok(path)
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs one of our front ends; its stderr line becomes the hook's error.
fn run_front_end(mut cmd: Command, what: &str) -> Result<(), CliError> {
    // stdout is not the runtime's: a daemon must never hold the pipe the runtime reads the hook from.
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| CliError::new(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("failed without a message");
    Err(CliError::new(format!("{what}: {line}")))
}

pub fn run(stage: Option<String>) -> Result<(), CliError> {
    let mut input = String::new();
    std::io::stdin()
        .take(16 << 20)
        .read_to_string(&mut input)
        .map_err(|e| CliError::new(format!("cannot read the container state on stdin: {e}")))?;
    let state: ContainerState = serde_json::from_str(&input)
        .map_err(|e| CliError::new(format!("stdin is not an OCI container state: {e}")))?;
    let stage = stage_of(stage.as_deref(), &state.status)?;
    let Some(request) = parse_annotations(&state.annotations)
        .map_err(|e| CliError::new(format!("container {}: {}", state.id, e.0)))?
    else {
        return Ok(());
    };
    let rootfs = rootfs_of(&state.bundle)?;
    match stage {
        Stage::Mount => {
            let target = host_target(&rootfs, &request.target, true)?;
            let mut cmd = Command::new(sibling_binary("erofs-mount"));
            cmd.args(["-t", "erofs.fanotify"]);
            if let Some(opts) = &request.options {
                cmd.args(["-o", opts]);
            }
            cmd.arg(&request.image).arg(&target);
            tracing::info!(container = %state.id, image = %request.image, target = %target.display(), "mounting");
            run_front_end(cmd, "erofs-mount")
        }
        Stage::Unmount => {
            let target = host_target(&rootfs, &request.target, false)?;
            if crate::sys::statx::mount_id(&target).is_err() {
                return Ok(());
            }
            let mut cmd = Command::new(sibling_binary("erofs-umount"));
            cmd.arg(&target);
            match run_front_end(cmd, "erofs-umount") {
                // Already gone (the runtime tore the mount namespace down, or a retry): nothing to do.
                Err(e) if e.0.contains("not an erofs-fanotify mount") || e.0.contains("not mounted") => Ok(()),
                other => other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn annotations() {
        assert_eq!(parse_annotations(&ann(&[("other", "x")])).unwrap(), None);
        let r = parse_annotations(&ann(&[(IMAGE_ANNOTATION, "reg/app:v1"), (TARGET_ANNOTATION, "/data/img")])).unwrap().unwrap();
        assert_eq!(r.target, PathBuf::from("data/img"));
        assert_eq!(r.options, None);
        assert!(parse_annotations(&ann(&[(IMAGE_ANNOTATION, "reg/app:v1")])).unwrap_err().0.contains(TARGET_ANNOTATION));
        assert!(parse_annotations(&ann(&[(TARGET_ANNOTATION, "/x")])).unwrap_err().0.contains(IMAGE_ANNOTATION));
        assert!(parse_annotations(&ann(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/../etc")])).is_err());
        assert!(parse_annotations(&ann(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/")])).is_err());
        let bad = parse_annotations(&ann(&[(IMAGE_ANNOTATION, "a"), (TARGET_ANNOTATION, "/x"), (OPTIONS_ANNOTATION, "bogus=1")]));
        assert!(bad.unwrap_err().0.contains("bogus"));
    }

    #[test]
    fn stages() {
        assert_eq!(stage_of(Some("createRuntime"), "").unwrap(), Stage::Mount);
        assert_eq!(stage_of(None, "stopped").unwrap(), Stage::Unmount);
        assert!(stage_of(Some("startContainer"), "").is_err());
    }
}
