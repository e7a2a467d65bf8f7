//! Per-mount records: `mounts/<mnt_id>.json`.
//!
//! The mount id from `statx(mountpoint)` is the key, so `erofs-umount MOUNTPOINT` finds the
//! record by name (one `open`), never by scanning and guessing. Prefer `STATX_MNT_ID_UNIQUE`
//! (64-bit, never reused since boot); `mnt_id_unique` says which kind the record holds.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AgentIdentity, StateDir, StateError};

/// Records are a few hundred bytes; anything much larger is not ours.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What we know about one mount made by an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub mnt_id: u64,
    /// True if `mnt_id` is a `STATX_MNT_ID_UNIQUE` id, false for the reusable `STATX_MNT_ID`.
    pub mnt_id_unique: bool,
    pub mountpoint: PathBuf,
    /// The image reference or URL, without credentials (redacted by the caller).
    pub source: String,
    pub digest: Option<String>,
    pub blob_size: u64,
    pub cache_key: String,
    pub cache_dir: PathBuf,
    /// The superblock's sysfs name, e.g. `erofs-3` (from `FS_IOC_GETFSSYSFSPATH`).
    pub sysfs_name: String,
    pub agent: AgentIdentity,
    pub control_socket: PathBuf,
    /// Inode number of the mount namespace the mount was made in.
    pub mount_ns: u64,
    pub created_unix: u64,
}

fn record_name(mnt_id: u64) -> String {
    format!("{mnt_id}.json")
}

/// Writes (or replaces) the record of `record.mnt_id`, atomically, mode 0600.
pub fn write_mount_record(state: &StateDir, record: &MountRecord) -> Result<(), StateError> {
    let path = state.mount_record_path(record.mnt_id);
    let dir = state
        .mounts(true)?
        .ok_or_else(|| StateError::io("create directory", state.mounts_dir(), io::ErrorKind::NotFound.into()))?;
    let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Serialize {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    dir.write_atomic(&record_name(record.mnt_id), &json, 0o600)
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<MountRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::corrupt(path, e.to_string()))
}

/// The record of mount `mnt_id`, `Ok(None)` if there is none. A record that does not parse,
/// or that names another mount id, is [`StateError::CorruptRecord`].
pub fn read_mount_record(state: &StateDir, mnt_id: u64) -> Result<Option<MountRecord>, StateError> {
    let Some(dir) = state.mounts(false)? else {
        return Ok(None);
    };
    read_in(&dir, mnt_id)
}

fn read_in(dir: &crate::fsat::Dir, mnt_id: u64) -> Result<Option<MountRecord>, StateError> {
    let name = record_name(mnt_id);
    let path = dir.join(&name);
    let Some(bytes) = dir.read_capped(&name, MAX_RECORD_BYTES)? else {
        return Ok(None);
    };
    let record = parse_record(&path, &bytes)?;
    if record.mnt_id != mnt_id {
        return Err(StateError::corrupt(
            &path,
            format!("holds mnt_id {}", record.mnt_id),
        ));
    }
    Ok(Some(record))
}

/// Removes the record of `mnt_id`; true if there was one.
pub fn remove_mount_record(state: &StateDir, mnt_id: u64) -> Result<bool, StateError> {
    let Some(dir) = state.mounts(false)? else {
        return Ok(false);
    };
    let removed = dir.remove(&record_name(mnt_id))?;
    if removed {
        dir.fsync()?;
    }
    Ok(removed)
}

/// All records, sorted by mount id, for `status` and `erofs-umount --all` only (everything
/// else looks a record up by id). Each file is read on its own: a corrupt one is returned as
/// an `Err` item and does not hide the others. A missing `mounts/` directory means no mounts.
pub fn list_mount_records(
    state: &StateDir,
) -> Result<Vec<Result<MountRecord, StateError>>, StateError> {
    let Some(dir) = state.mounts(false)? else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<u64> = dir
        .names()?
        .iter()
        // Temporary files start with '.'; anything not `<u64>.json` is not a record.
        .filter_map(|n| n.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()))
        .collect();
    ids.sort_unstable();
    Ok(ids
        .into_iter()
        .filter_map(|id| read_in(&dir, id).transpose())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mnt_id: u64) -> MountRecord {
        MountRecord {
            mnt_id,
            mnt_id_unique: true,
            mountpoint: PathBuf::from("/mnt/x y"),
            source: "localhost:5000/img:latest".into(),
            digest: Some(format!("sha256:{}", "a".repeat(64))),
            blob_size: 12345,
            cache_key: format!("sha256-{}", "a".repeat(64)),
            cache_dir: PathBuf::from("/var/cache/erofs-fanotify"),
            sysfs_name: "erofs-3".into(),
            agent: AgentIdentity {
                pid: 77,
                start_time: 99,
            },
            control_socket: PathBuf::from("/run/erofs-fanotify/agents/k.sock"),
            mount_ns: 4026531841,
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(read_mount_record(&state, 1 << 40).unwrap(), None);
        let r = record(1 << 40);
        write_mount_record(&state, &r).unwrap();
        assert_eq!(read_mount_record(&state, 1 << 40).unwrap(), Some(r.clone()));
        let mut r2 = r.clone();
        r2.blob_size = 1;
        write_mount_record(&state, &r2).unwrap();
        assert_eq!(read_mount_record(&state, 1 << 40).unwrap(), Some(r2));
        assert_eq!(read_mount_record(&state, 7).unwrap(), None);
        assert!(remove_mount_record(&state, 1 << 40).unwrap());
        assert!(!remove_mount_record(&state, 1 << 40).unwrap());
        assert_eq!(read_mount_record(&state, 1 << 40).unwrap(), None);
    }

    #[test]
    fn corrupt_records_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.create().unwrap();
        let json = serde_json::to_vec(&record(5)).unwrap();
        for bad in [
            &b""[..],
            b"{",
            b"null",
            &json[..json.len() / 2],
            b"\xff\xfe",
        ] {
            std::fs::write(state.mount_record_path(5), bad).unwrap();
            assert!(matches!(
                read_mount_record(&state, 5),
                Err(StateError::CorruptRecord { .. })
            ));
        }
        // A record stored under the wrong name.
        std::fs::write(state.mount_record_path(6), &json).unwrap();
        assert!(matches!(
            read_mount_record(&state, 6),
            Err(StateError::CorruptRecord { .. })
        ));
    }

    #[test]
    fn list_skips_foreign_files_and_reports_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(list_mount_records(&state).unwrap().is_empty());
        for id in [30, 4, 100] {
            write_mount_record(&state, &record(id)).unwrap();
        }
        std::fs::write(state.mounts_dir().join("9.json"), b"{}").unwrap();
        std::fs::write(state.mounts_dir().join(".4.json.1.2.tmp"), b"x").unwrap();
        std::fs::write(state.mounts_dir().join("notes.txt"), b"x").unwrap();
        let list = list_mount_records(&state).unwrap();
        assert_eq!(list.len(), 4);
        let ids: Vec<u64> = list
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.mnt_id)
            .collect();
        assert_eq!(ids, vec![4, 30, 100]);
        assert!(matches!(list[1], Err(StateError::CorruptRecord { .. })));
    }

    #[test]
    fn record_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        write_mount_record(&state, &record(3)).unwrap();
        let mode = std::fs::metadata(state.mount_record_path(3))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
