//! `erofs-fanotify cache ls` / `cache prune` and the `cache_max=` mount option: unused entries go, least
//! recently used first; an entry with a live mount is never removed; a pruned blob is refetched on its next
//! mount and the tree is intact.

mod common;

use std::time::Duration;

use common::oci::{push_single, reference, tiny_image, OciEnv, TinyImage};
use common::registry;
use common::tree::assert_tree_identical;
use common::wait::wait_until;
use common::{cmd, ready, COMMAND_TIMEOUT, EROFS_FANOTIFY, GONE_TIMEOUT};

fn cache_ls(env: &OciEnv) -> Vec<serde_json::Value> {
    let out = cmd::run(
        env.command(EROFS_FANOTIFY)
            .args(["cache", "ls", "--json", "--cache-dir"])
            .arg(&env.cache_dir),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cache ls --json: {e}: {}", out.describe()))
}

fn entry_for<'a>(entries: &'a [serde_json::Value], img: &TinyImage) -> Option<&'a serde_json::Value> {
    entries.iter().find(|e| e["digest"].as_str().is_some_and(|d| d.contains(img.hex())))
}

fn prune(env: &OciEnv, args: &[&str]) -> String {
    let out = cmd::run(
        env.command(EROFS_FANOTIFY)
            .args(["cache", "prune", "--cache-dir"])
            .arg(&env.cache_dir)
            .args(args),
        COMMAND_TIMEOUT,
    );
    out.assert_success();
    out.stdout_str()
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry"]
fn cache_ls_prune_and_refetch() {
    if !ready() {
        return;
    }
    let registry = registry::shared();
    let images: Vec<TinyImage> = ["cache-a", "cache-b", "cache-c"].iter().map(|l| tiny_image(l)).collect();
    let refs: Vec<String> = images
        .iter()
        .map(|img| {
            let pushed = push_single(registry, &format!("test/{}", img.label), "v1", &img.image.path);
            reference(&registry.host(), &pushed.repo, &pushed.tag)
        })
        .collect();
    let env = OciEnv::new("host-cache");

    // a and b are used once and unmounted (a first), c stays mounted. One second apart: last use is in seconds.
    for (img, image_ref) in images.iter().zip(&refs).take(2) {
        let m = env.mount(image_ref, "mnt", &[]);
        assert_tree_identical(&img.tree, &m.mountpoint);
        m.unmount().assert_success();
        env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
        std::thread::sleep(Duration::from_millis(1100));
    }
    let c = env.mount(&refs[2], "mnt-c", &[]);
    assert_tree_identical(&images[2].tree, &c.mountpoint);

    let entries = cache_ls(&env);
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let [a, b, c_entry] = [0, 1, 2].map(|i| entry_for(&entries, &images[i]).unwrap_or_else(|| panic!("no entry for image {i}: {entries:#?}")).clone());
    assert_eq!(c_entry["in_use"], true, "{c_entry}");
    assert_eq!(a["in_use"], false, "{a}");
    assert!(a["present_bytes"].as_u64().unwrap() > 0 && a["blob_size"].as_u64().unwrap() > 0, "{a}");
    assert!(a["last_used_unix"].as_u64() < b["last_used_unix"].as_u64(), "{a} {b}");
    // The human listing names every key.
    let human = cmd::run(env.command(EROFS_FANOTIFY).args(["cache", "ls", "--cache-dir"]).arg(&env.cache_dir), COMMAND_TIMEOUT);
    human.assert_success();
    for e in &entries {
        assert!(human.stdout_str().contains(e["key"].as_str().unwrap()), "{}", human.describe());
    }

    // A cap that needs one removal takes the oldest unused entry (a), not b, never c.
    let disk = |e: &serde_json::Value| e["disk_bytes"].as_u64().unwrap();
    let cap = disk(&b) + disk(&c_entry);
    let out = prune(&env, &["--max-size", &cap.to_string()]);
    eprintln!("prune --max-size {cap}: {out}");
    let entries = cache_ls(&env);
    assert!(entry_for(&entries, &images[0]).is_none(), "a survived: {entries:#?}");
    assert!(entry_for(&entries, &images[1]).is_some(), "b removed: {entries:#?}");
    assert!(entry_for(&entries, &images[2]).is_some(), "c removed: {entries:#?}");

    // A cap of zero removes every unused entry but keeps the one in use, which still reads fine.
    prune(&env, &["--max-size", "0"]);
    let entries = cache_ls(&env);
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert!(entry_for(&entries, &images[2]).is_some(), "the mounted entry was removed: {entries:#?}");
    assert_tree_identical(&images[2].tree, &c.mountpoint);

    // A pruned blob is refetched on its next mount.
    let m = env.mount(&refs[0], "mnt", &[]);
    assert_tree_identical(&images[0].tree, &m.mountpoint);
    assert!(m.status().fetched_bytes > 0, "nothing refetched: {:?}", m.status());
    m.unmount().assert_success();
    // Its agent leaves (only c's stays).
    wait_until(GONE_TIMEOUT, "the remount's agent to leave", || env.records().len() == 1 && env.agents().len() == 2);

    // --unused-for 0s removes the now unused a; c is still in use.
    prune(&env, &["--unused-for", "0s"]);
    let entries = cache_ls(&env);
    assert_eq!(entries.len(), 1, "{entries:#?}");
    c.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // cache_max= applies the cap after a mount: c (now unused) goes, the new mount's entry stays.
    let m = env.mount(&refs[1], "mnt", &["cache_max=0"]);
    let entries = cache_ls(&env);
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert!(entry_for(&entries, &images[1]).is_some(), "{entries:#?}");
    assert_tree_identical(&images[1].tree, &m.mountpoint);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // Bad arguments fail with one line.
    let out = cmd::run(env.command(EROFS_FANOTIFY).args(["cache", "prune", "--max-size", "lots"]), COMMAND_TIMEOUT);
    assert!(!out.success() && out.stderr.contains("bad size"), "{}", out.describe());
}
