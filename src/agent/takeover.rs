//! Taking over mounts whose agents both died (issue 12, item 6).
//!
//! When the last fd of a fanotify group closes, the kernel allows every pending and later access:
//! holes of the cache file read as zeros, and EROFS keeps those zeros in its page cache. That gap
//! cannot be undone, but it can be ended: a new agent for the same cache entry (the next
//! `erofs-mount` of the image, or `erofs-fanotify upgrade`) marks the cache file again (go_live),
//! adopts the records of the dead agent's mounts whose superblocks still live, and drops the page
//! cache of every file of those mounts, so the next read raises an event and gets real data. The
//! gap (from the dead worker's last heartbeat to the re-mark) is logged and shown in `status`.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use erofs_fanotify_state::{self as state, AgentIdentity, MountRecord, StateDir};

use super::lifecycle::Lifecycle;
use super::protocol::FailOpenWindow;

/// Mounts of a dead agent taken over, and the gap in which nobody answered their events.
pub struct Takeover {
    pub window: FailOpenWindow,
    pub mounts: Vec<MountRecord>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Adopts the records of `cache_key` whose agent is dead and whose superblock still exists (after
/// the mark is in place); records of mounts that are gone are removed. `None`: nothing to take over.
pub fn adopt_dead_mounts(
    state_dir: &StateDir,
    cache_key: &str,
    identity: AgentIdentity,
    lifecycle: &Lifecycle,
    last_heartbeat_ms: u64,
) -> Option<Takeover> {
    let records = match state::list_mount_records(state_dir) {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list mount records to look for mounts of a dead agent");
            return None;
        }
    };
    let mut mounts = Vec::new();
    for mut record in records.into_iter().flatten().filter(|r| r.cache_key == cache_key && !r.agent.is_alive()) {
        if !superblock_alive(&record.sysfs_name) {
            let _ = state::remove_mount_record(state_dir, record.mnt_id);
            continue;
        }
        record.agent = identity;
        if let Err(e) = lifecycle.attach(record.clone()) {
            tracing::warn!(mnt_id = record.mnt_id, error = %e, "cannot adopt the mount of a dead agent");
        }
        mounts.push(record);
    }
    if mounts.is_empty() {
        return None;
    }
    let ended = now_ms();
    let started = if last_heartbeat_ms > 0 && last_heartbeat_ms <= ended { last_heartbeat_ms } else { 0 };
    let window = FailOpenWindow {
        started_unix_ms: started,
        ended_unix_ms: ended,
        duration_ms: if started > 0 { ended - started } else { 0 },
        mounts: mounts.len() as u64,
        files_dropped: 0,
    };
    tracing::warn!(
        mounts = mounts.len(),
        gap_ms = window.duration_ms,
        "fail-open window: this entry's agents died while mounted; reads in the gap were allowed unanswered (holes read as zeros); taking the mounts over"
    );
    Some(Takeover { window, mounts })
}

/// `cfg` as the agent record keeps it: what a restart of a dead agent needs, with every credential,
/// token and URL secret removed (a restart that needs them fails to reach the source and serves
/// what the cache holds).
pub fn restartable_config(cfg: &super::AgentConfig) -> serde_json::Value {
    let mut cfg = cfg.clone();
    strip_secrets(&mut cfg.source);
    serde_json::to_value(&cfg).unwrap_or(serde_json::Value::Null)
}

/// Removes credentials, tokens and URL secrets from a source and the sources inside it.
fn strip_secrets(source: &mut super::sources::SourceSpec) {
    use super::sources::SourceSpec;
    match source {
        SourceSpec::Url { url } => *url = state::strip_url_userinfo(url).split('?').next().unwrap_or_default().to_string(),
        SourceSpec::Oci(spec) => {
            spec.credentials = None;
            spec.auth_handoff = None;
            for m in &mut spec.mirrors {
                m.credentials = None;
            }
        }
        SourceSpec::S3(spec) => spec.credentials = None,
        SourceSpec::Layout(l) => l.segments.iter_mut().for_each(|s| strip_secrets(&mut s.source)),
        SourceSpec::Layers(l) => l.layers.iter_mut().for_each(strip_secrets),
        SourceSpec::GzipTar(g) => strip_secrets(&mut g.blob),
        SourceSpec::BucketImage(b) => {
            b.objects.credentials = None;
            strip_secrets(&mut b.image);
        }
        SourceSpec::LocalFile(_) | SourceSpec::File(_) => {}
    }
}

fn superblock_alive(sysfs_name: &str) -> bool {
    !sysfs_name.is_empty()
        && !sysfs_name.contains('/')
        && !sysfs_name.contains("..")
        && Path::new("/sys/fs/erofs").join(sysfs_name).exists()
}

/// Drops the page cache of every directory and regular file of the taken-over mounts that this
/// process can reach (mounts in our mount namespace, still on their recorded mountpoint). Reads the
/// mounts' directories: run it on a thread of its own while the event loop serves. Returns how many
/// files were dropped.
pub fn drop_page_caches(mounts: &[MountRecord]) -> u64 {
    let our_ns = crate::sys::process::mount_namespace_id().unwrap_or(0);
    let mut dropped = 0;
    for record in mounts {
        if record.mount_ns != 0 && record.mount_ns != our_ns {
            tracing::warn!(mountpoint = %record.mountpoint.display(), "the mount is in another mount namespace: its page cache cannot be dropped from here");
            continue;
        }
        match crate::sys::statx::mount_id(&record.mountpoint) {
            Ok(id) if id.id == record.mnt_id => {}
            _ => {
                tracing::warn!(mountpoint = %record.mountpoint.display(), "the mount is no longer reachable at its mountpoint: its page cache cannot be dropped");
                continue;
            }
        }
        let n = drop_tree(&record.mountpoint);
        tracing::info!(mountpoint = %record.mountpoint.display(), files = n, "page cache of the taken-over mount dropped");
        dropped += n;
    }
    dropped
}

/// Walks one mount (never following a symlink, never leaving the mount's device) and drops the
/// cached pages of each directory before reading it and of each regular file.
fn drop_tree(root: &Path) -> u64 {
    let Ok(root_meta) = std::fs::symlink_metadata(root) else { return 0 };
    let dev = root_meta.dev();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    let mut dropped = 0;
    while let Some(dir) = stack.pop() {
        // The directory's own pages first: what the gap cached of it may be zeros too.
        if drop_file(&dir, true) {
            dropped += 1;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && seen.insert(meta.ino()) && drop_file(&path, false) {
                dropped += 1;
            }
        }
    }
    dropped
}

fn drop_file(path: &Path, dir: bool) -> bool {
    let mut flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    if dir {
        flags |= libc::O_DIRECTORY;
    }
    let Ok(file) = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) else { return false };
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restartable_config_has_no_secrets() {
        let cfg = super::super::AgentConfig {
            source: super::super::sources::SourceSpec::Url { url: "https://u:hunter2@h/v2/x/blobs/sha256:ab?sig=s3cret".into() },
            cache_dir: "/c".into(),
            cache_key: "k".into(),
            state_dir: "/s".into(),
            fetch_unit: 4096,
            fetch_timeout_ms: 1,
            retry_timeout_ms: 1,
            fetch_parallel: 1,
            read_ahead_kb: 128,
            record_trace: false,
            known_metadata: None,
        };
        let text = restartable_config(&cfg).to_string();
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        let back: super::super::AgentConfig = serde_json::from_value(restartable_config(&cfg)).unwrap();
        assert_eq!(back.cache_key, "k");
    }

    #[test]
    fn a_tree_is_walked_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/f"), b"data").unwrap();
        std::fs::write(tmp.path().join("g"), b"data").unwrap();
        std::fs::hard_link(tmp.path().join("g"), tmp.path().join("g2")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        // Two directories (root, d) and two files (f, g; g2 is g).
        assert_eq!(drop_tree(tmp.path()), 4);
    }

    #[test]
    fn records_of_a_live_agent_or_without_superblock_are_not_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(tmp.path());
        state_dir.create().unwrap();
        let me = AgentIdentity::current().unwrap();
        let dead = AgentIdentity { pid: i32::MAX - 1, start_time: 1 };
        let record = |mnt_id: u64, agent: AgentIdentity, sysfs: &str| MountRecord {
            mnt_id,
            mnt_id_unique: true,
            mountpoint: "/nonexistent".into(),
            source: "s".into(),
            digest: None,
            blob_size: 1,
            cache_key: "k".into(),
            cache_dir: "/nonexistent".into(),
            sysfs_name: sysfs.into(),
            agent,
            control_socket: "/nonexistent".into(),
            mount_ns: 0,
            created_unix: 0,
        };
        state::write_mount_record(&state_dir, &record(1, me, "erofs-does-not-exist")).unwrap();
        state::write_mount_record(&state_dir, &record(2, dead, "erofs-does-not-exist")).unwrap();
        let lifecycle = Lifecycle::new(state_dir.clone());
        assert!(adopt_dead_mounts(&state_dir, "k", me, &lifecycle, 1).is_none());
        // The dead agent's record of a gone superblock is removed; the live agent's stays.
        assert!(state::read_mount_record(&state_dir, 2).unwrap().is_none());
        assert!(state::read_mount_record(&state_dir, 1).unwrap().is_some());
    }
}
