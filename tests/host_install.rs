//! contrib/install.sh installs everything (binaries under a prefix, the mount(8) helper link, systemd
//! units, hooks.d JSON, completions, man pages) and contrib/uninstall.sh removes exactly that. Skipped when
//! a real installation is present (its manifest exists): the test must not remove it.

mod common;

use std::path::Path;
use std::process::Command;

use common::EROFS_FANOTIFY;

const MANIFEST: &str = "/var/lib/erofs-fanotify/installed-files";

#[test]
#[ignore = "needs root"]
fn install_and_uninstall_from_the_checkout() {
    if !common::require(&[common::Need::Root]) {
        return;
    }
    if Path::new(MANIFEST).exists() || Path::new("/sbin/mount.erofs.fanotify").exists() {
        eprintln!("SKIP: erofs-fanotify is installed on this host; not touching it");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The binaries cargo built for this test: <target>/release/erofs-fanotify.
    let target_dir = Path::new(EROFS_FANOTIFY).parent().and_then(Path::parent).expect("target dir");
    let prefix = tempfile::tempdir().expect("prefix");
    let out = Command::new(repo.join("contrib/install.sh"))
        .args(["--no-build", "--prefix"])
        .arg(prefix.path())
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .expect("run install.sh");
    let uninstall = || Command::new(repo.join("contrib/uninstall.sh")).output().expect("run uninstall.sh");
    if !out.status.success() {
        let _ = uninstall();
        panic!("install.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest = std::fs::read_to_string(MANIFEST).expect("manifest");
    let files: Vec<&str> = manifest.lines().collect();
    let expect = [
        format!("{}/bin/erofs-mount", prefix.path().display()),
        "/sbin/mount.erofs.fanotify".to_string(),
        "/etc/systemd/system/erofs-fanotify-mount@.service".to_string(),
        "/usr/share/containers/oci/hooks.d/erofs-fanotify.json".to_string(),
        "/usr/share/bash-completion/completions/erofs-mount".to_string(),
        format!("{}/share/man/man8/erofs-fanotify.8", prefix.path().display()),
    ];
    let missing: Vec<&String> = expect.iter().filter(|f| !files.contains(&f.as_str()) || std::fs::symlink_metadata(f).is_err()).collect();
    let unit = std::fs::read_to_string("/etc/systemd/system/erofs-fanotify-mount@.service").unwrap_or_default();
    let hook = std::fs::read_to_string("/usr/share/containers/oci/hooks.d/erofs-fanotify.json").unwrap_or_default();
    let out = uninstall();
    assert!(out.status.success(), "uninstall.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(missing.is_empty(), "not installed: {missing:?}");
    assert!(unit.contains(&format!("{}/bin/erofs-mount", prefix.path().display())), "unit paths not substituted");
    // podman's default hooks dir gets the hook with the installed binary, for the stages README names.
    let hook: serde_json::Value = serde_json::from_str(&hook).unwrap_or_else(|e| panic!("hooks.d file is not JSON ({e}): {hook}"));
    assert_eq!(hook["hook"]["path"], format!("{}/bin/erofs-fanotify", prefix.path().display()), "{hook}");
    assert_eq!(hook["stages"], serde_json::json!(["createRuntime", "poststop"]), "{hook}");
    let left: Vec<&&str> = files.iter().filter(|f| std::fs::symlink_metadata(f).is_ok()).collect();
    assert!(left.is_empty(), "uninstall left {left:?}");
    assert!(!Path::new(MANIFEST).exists());
}
