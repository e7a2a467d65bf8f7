//! Shell completions and man pages come from the clap definitions: every shell gets a script for each
//! command (bash scripts pass `bash -n`), and `man --dir` writes a page per command and subcommand that
//! names the options the command has.

mod common;

use std::process::Command;

use common::EROFS_FANOTIFY;

#[test]
fn completions_for_every_shell_and_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        for command in ["erofs-fanotify", "erofs-mount", "erofs-umount"] {
            let out = Command::new(EROFS_FANOTIFY).args(["completions", shell, "--for", command]).output().expect("run");
            assert!(out.status.success(), "{shell} {command}: {}", String::from_utf8_lossy(&out.stderr));
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(script.contains(command), "{shell} script for {command} does not name it");
            if shell == "bash" {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("script.bash");
                std::fs::write(&path, script.as_bytes()).expect("write");
                let check = Command::new("bash").arg("-n").arg(&path).status().expect("bash -n");
                assert!(check.success(), "bash -n rejects the {command} completion");
            }
        }
    }
    let script = String::from_utf8_lossy(
        &Command::new(EROFS_FANOTIFY).args(["completions", "bash"]).output().expect("run").stdout,
    )
    .into_owned();
    for sub in ["cache", "metrics", "hook", "status", "prune"] {
        assert!(script.contains(sub), "bash completion lacks {sub}");
    }
}

#[test]
fn man_pages_for_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(EROFS_FANOTIFY).arg("man").arg("--dir").arg(dir.path()).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (page, must) in [
        ("erofs-fanotify.8", "status"),
        ("erofs-mount.8", "--options"),
        ("erofs-umount.8", "erofs-umount"),
        ("erofs-fanotify-cache.8", "prune"),
        ("erofs-fanotify-metrics.8", "--output"),
        ("erofs-fanotify-hook.8", "--stage"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not roff");
        assert!(text.contains(&must.replace('-', "\\-")) || text.contains(must), "{page} lacks {must}");
    }
    // Without --dir: the main page on stdout.
    let out = Command::new(EROFS_FANOTIFY).arg("man").output().expect("run");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(".TH"));
}
