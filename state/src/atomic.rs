//! Crash-safe file replacement and small helpers shared by the record modules.
//!
//! A reader must see either the old or the new content of a state file, never a mix: we write
//! a temporary file in the same directory (so `rename` stays within one filesystem), fsync it,
//! rename it over the target and fsync the directory so the rename itself is durable.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::StateError;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Name of a temporary file next to `target`. Starts with '.' and ends with ".tmp" so that
/// directory scans skip it; pid + counter make concurrent writers never share one.
fn tmp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Atomically replaces `target` with `bytes` (file mode `mode`), durably.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    let tmp = tmp_path(target);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| StateError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| StateError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| StateError::io("fsync", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, target).map_err(|e| StateError::io("rename into", target, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if let Some(dir) = target.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Makes the directory entries of `dir` (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StateError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StateError::io("fsync directory", dir, e))
}

/// Reads a whole file of at most `cap` bytes. `Ok(None)` if it does not exist; a larger file is
/// reported as corrupt rather than read (state files are small; a huge one is not ours).
pub(crate) fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, StateError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::io("open", path, e)),
    };
    let mut buf = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| StateError::io("read", path, e))?;
    if buf.len() as u64 > cap {
        return Err(StateError::corrupt(
            path,
            format!("larger than {cap} bytes"),
        ));
    }
    Ok(Some(buf))
}

/// Creates `dir` (and missing parents) with mode 0700. An existing directory keeps its mode:
/// it may be a user-chosen parent such as a `cache_dir=` we do not own.
pub(crate) fn create_private_dir_all(dir: &Path) -> Result<(), StateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StateError::io("create directory", dir, e))
}

/// Creates `dir` with mode 0700, or forces an existing one to 0700. Only for directories that
/// are ours by name (`mounts/`, `agents/`, cache entries): their content must stay private.
pub(crate) fn ensure_private_subdir(dir: &Path) -> Result<(), StateError> {
    create_private_dir_all(dir)?;
    let meta = fs::metadata(dir).map_err(|e| StateError::io("stat", dir, e))?;
    if meta.permissions().mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::io("chmod 0700", dir, e))?;
    }
    Ok(())
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool, StateError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StateError::io("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.json");
        write_atomic(&target, b"one", 0o600).unwrap();
        write_atomic(&target, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nope/x.json");
        assert!(matches!(
            write_atomic(&target, b"x", 0o600),
            Err(StateError::Io { .. })
        ));
    }

    #[test]
    fn read_capped_limits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(read_capped(&p, 10).unwrap().is_none());
        fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_capped(&p, 10).unwrap().unwrap().len(), 10);
        assert!(matches!(
            read_capped(&p, 9),
            Err(StateError::CorruptRecord { .. })
        ));
    }

    #[test]
    fn private_subdir_is_forced_to_0700() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_subdir(&sub).unwrap();
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }
}
