//! Directory-relative file operations: everything below a state or cache root is reached through a
//! directory descriptor, one component at a time, never through a symbolic link.
//!
//! A root (`cache_dir`, the state dir) is opened by its path and may itself be a symlink: that is the
//! admin's choice. Below it, every directory and file is opened with `openat(2)` and `O_NOFOLLOW`
//! relative to its parent's descriptor, and must be ours: owned by our effective uid (root, for the
//! agent) and not writable by group or others. Anything else is refused with a [`StateError::Unsafe`]
//! that names the path and the reason, so a planted symlink or a foreign entry can neither redirect our
//! writes nor feed us data. Renames, removals and fsyncs go through the same descriptors, so a directory
//! renamed away under us takes our operations with it instead of sending them elsewhere.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::StateError;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An open directory: its descriptor, and its path for messages.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What kind of object a name must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

fn kind_of(st: &FileStat) -> Option<Kind> {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => Some(Kind::Dir),
        SFlag::S_IFREG => Some(Kind::File),
        _ => None,
    }
}

/// Ours: owned by our effective uid, not writable by group or others.
fn check_owned(path: &Path, st: &FileStat) -> Result<(), StateError> {
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != euid {
        return Err(StateError::unsafe_entry(path, format!("it is owned by uid {}, not by us (uid {euid})", st.st_uid)));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(StateError::unsafe_entry(
            path,
            format!("it is writable by group or others (mode {:04o})", st.st_mode & 0o7777),
        ));
    }
    Ok(())
}

fn is_single_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl Dir {
    /// Opens the root `path` (symlinks in it are followed), creating it (and missing parents) with mode
    /// 0700 when `create`. `Ok(None)`: it does not exist and `create` is false.
    pub(crate) fn open_root(path: &Path, create: bool) -> Result<Option<Dir>, StateError> {
        if create {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| StateError::io("create directory", path, e))?;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        match nix::fcntl::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(Dir { fd, path: path.to_path_buf() })),
            Err(Errno::ENOENT) if !create => Ok(None),
            Err(e) => Err(StateError::io("open directory", path, e.into())),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check_name(&self, name: &str) -> Result<(), StateError> {
        if is_single_component(name) {
            Ok(())
        } else {
            Err(StateError::unsafe_entry(self.join(name), "not a single path component".to_string()))
        }
    }

    /// `lstat` of `name`: `None` if absent.
    pub(crate) fn stat(&self, name: &str) -> Result<Option<FileStat>, StateError> {
        self.check_name(name)?;
        match fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(StateError::io("stat", self.join(name), e.into())),
        }
    }

    /// Refuses what `name` must not be before it is opened (a clear reason instead of ELOOP).
    fn precheck(&self, name: &str, want: Kind) -> Result<bool, StateError> {
        let Some(st) = self.stat(name)? else { return Ok(false) };
        let path = self.join(name);
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(StateError::unsafe_entry(&path, "it is a symbolic link".to_string()));
        }
        match kind_of(&st) {
            Some(k) if k == want => Ok(true),
            _ => Err(StateError::unsafe_entry(
                &path,
                format!("it is not a {}", if want == Kind::Dir { "directory" } else { "regular file" }),
            )),
        }
    }

    fn open_checked(&self, name: &str, flags: OFlag, mode: Mode, want: Kind) -> Result<Option<OwnedFd>, StateError> {
        let path = self.join(name);
        let fd = match openat(self.fd.as_fd(), name, flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, mode) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(StateError::unsafe_entry(&path, "it is a symbolic link".to_string())),
            Err(Errno::ENOTDIR) if want == Kind::Dir => {
                return Err(StateError::unsafe_entry(&path, "it is not a directory".to_string()))
            }
            Err(e) => return Err(StateError::io("open", &path, e.into())),
        };
        let st = fstat(&fd).map_err(|e| StateError::io("stat", &path, e.into()))?;
        if kind_of(&st) != Some(want) {
            return Err(StateError::unsafe_entry(
                &path,
                format!("it is not a {}", if want == Kind::Dir { "directory" } else { "regular file" }),
            ));
        }
        check_owned(&path, &st)?;
        Ok(Some(fd))
    }

    /// The subdirectory `name`, which must be ours; created (0700) when missing and `create`. With
    /// `private`, its mode is forced to 0700 (directories that are ours by name).
    pub(crate) fn subdir(&self, name: &str, create: bool, private: bool) -> Result<Option<Dir>, StateError> {
        self.check_name(name)?;
        let exists = self.precheck(name, Kind::Dir)?;
        if !exists {
            if !create {
                return Ok(None);
            }
            match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(StateError::io("create directory", self.join(name), e.into())),
            }
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let Some(fd) = self.open_checked(name, flags, Mode::empty(), Kind::Dir)? else {
            return Ok(None);
        };
        let path = self.join(name);
        if private {
            let st = fstat(&fd).map_err(|e| StateError::io("stat", &path, e.into()))?;
            if st.st_mode & 0o7777 != 0o700 {
                fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(|e| StateError::io("chmod 0700", &path, e.into()))?;
            }
        }
        Ok(Some(Dir { fd, path }))
    }

    /// Checks, without opening it, that `name` is a regular file of ours; false if absent.
    pub(crate) fn check_file(&self, name: &str) -> Result<bool, StateError> {
        self.check_name(name)?;
        if !self.precheck(name, Kind::File)? {
            return Ok(false);
        }
        match self.stat(name)? {
            Some(st) => check_owned(&self.join(name), &st).map(|()| true),
            None => Ok(false),
        }
    }

    /// Opens the regular file `name` (ours) for reading, or read-write; `None` if absent.
    pub(crate) fn open_file(&self, name: &str, write: bool) -> Result<Option<File>, StateError> {
        self.check_name(name)?;
        self.precheck(name, Kind::File)?;
        let flags = if write { OFlag::O_RDWR } else { OFlag::O_RDONLY };
        Ok(self.open_checked(name, flags, Mode::empty(), Kind::File)?.map(File::from))
    }

    /// Opens the regular file `name` read-write, creating it with `mode` when missing.
    pub(crate) fn open_or_create(&self, name: &str, mode: u32) -> Result<File, StateError> {
        self.check_name(name)?;
        self.precheck(name, Kind::File)?;
        let flags = OFlag::O_RDWR | OFlag::O_CREAT;
        self.open_checked(name, flags, Mode::from_bits_truncate(mode), Kind::File)?
            .map(File::from)
            .ok_or_else(|| StateError::io("create", self.join(name), io::ErrorKind::NotFound.into()))
    }

    /// Opens the regular file `name` for appending, creating it with `mode` when missing.
    pub(crate) fn open_append(&self, name: &str, mode: u32) -> Result<File, StateError> {
        self.check_name(name)?;
        self.precheck(name, Kind::File)?;
        let flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT;
        self.open_checked(name, flags, Mode::from_bits_truncate(mode), Kind::File)?
            .map(File::from)
            .ok_or_else(|| StateError::io("create", self.join(name), io::ErrorKind::NotFound.into()))
    }

    /// Creates `name`, which must not exist.
    pub(crate) fn create_new(&self, name: &str, mode: u32) -> Result<File, StateError> {
        self.check_name(name)?;
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL;
        self.open_checked(name, flags, Mode::from_bits_truncate(mode), Kind::File)?
            .map(File::from)
            .ok_or_else(|| StateError::io("create", self.join(name), io::ErrorKind::NotFound.into()))
    }

    /// Reads the whole file `name` of at most `cap` bytes; `None` if absent; a larger file is corrupt.
    pub(crate) fn read_capped(&self, name: &str, cap: u64) -> Result<Option<Vec<u8>>, StateError> {
        let Some(file) = self.open_file(name, false)? else { return Ok(None) };
        let path = self.join(name);
        let mut buf = Vec::new();
        file.take(cap + 1).read_to_end(&mut buf).map_err(|e| StateError::io("read", &path, e))?;
        if buf.len() as u64 > cap {
            return Err(StateError::corrupt(&path, format!("larger than {cap} bytes")));
        }
        Ok(Some(buf))
    }

    /// Atomically replaces `name` with `bytes` (mode `mode`), durably: a temporary file in this directory,
    /// fsync, rename over `name`, fsync of the directory.
    pub(crate) fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), StateError> {
        self.check_name(name)?;
        // A symlink or directory planted under our name is refused, not replaced silently.
        self.precheck(name, Kind::File)?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Starts with '.' and ends with ".tmp" so that directory scans skip it.
        let tmp = format!(".{name}.{}.{n}.tmp", std::process::id());
        let result = (|| {
            let mut f = self.create_new(&tmp, mode)?;
            let tmp_path = self.join(&tmp);
            f.write_all(bytes).map_err(|e| StateError::io("write", &tmp_path, e))?;
            f.sync_all().map_err(|e| StateError::io("fsync", &tmp_path, e))?;
            drop(f);
            renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
                .map_err(|e| StateError::io("rename into", self.join(name), e.into()))
        })();
        if result.is_err() {
            let _ = unlinkat(self.fd.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result?;
        self.fsync()
    }

    /// Removes the file (or symlink) `name`; true if it existed.
    pub(crate) fn remove(&self, name: &str) -> Result<bool, StateError> {
        self.check_name(name)?;
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(StateError::io("remove", self.join(name), e.into())),
        }
    }

    /// Removes the subdirectory `name` and the files in it (our entries are flat). A symlink in its
    /// place is removed itself, never followed. Absent: fine.
    pub(crate) fn remove_tree(&self, name: &str) -> Result<(), StateError> {
        self.check_name(name)?;
        let Some(st) = self.stat(name)? else { return Ok(()) };
        if kind_of(&st) != Some(Kind::Dir) {
            self.remove(name)?;
            return Ok(());
        }
        let path = self.join(name);
        let fd = match openat(self.fd.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(StateError::io("open", &path, e.into())),
        };
        let sub = Dir { fd, path: path.clone() };
        for child in sub.names()? {
            match sub.stat(&child)? {
                Some(st) if kind_of(&st) == Some(Kind::Dir) => sub.remove_tree(&child)?,
                Some(_) => {
                    sub.remove(&child)?;
                }
                None => {}
            }
        }
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(StateError::io("remove", &path, e.into())),
        }
    }

    /// The names in this directory (not `.`/`..`), unsorted.
    pub(crate) fn names(&self) -> Result<Vec<String>, StateError> {
        let dup = self.fd.try_clone().map_err(|e| StateError::io("read directory", &self.path, e))?;
        let mut dir = nix::dir::Dir::from_fd(dup).map_err(|e| StateError::io("read directory", &self.path, e.into()))?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| StateError::io("read directory", &self.path, e.into()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Makes this directory's entries (creations, renames, removals) durable.
    pub(crate) fn fsync(&self) -> Result<(), StateError> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(|e| StateError::io("fsync directory", &self.path, e.into()))
    }

    /// Whether `name` is still the very file `file` (same device and inode).
    pub(crate) fn names_file(&self, name: &str, file: &File) -> Result<bool, StateError> {
        let Some(st) = self.stat(name)? else { return Ok(false) };
        let meta = file.metadata().map_err(|e| StateError::io("stat", self.join(name), e))?;
        Ok(st.st_dev == meta.dev() && st.st_ino == meta.ino())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_and_subdirs_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_root(&tmp.path().join("r"), true).unwrap().unwrap();
        let sub = root.subdir("a", true, true).unwrap().unwrap();
        assert_eq!(std::fs::metadata(sub.path()).unwrap().permissions().mode() & 0o7777, 0o700);
        sub.write_atomic("x.json", b"one", 0o600).unwrap();
        sub.write_atomic("x.json", b"two", 0o600).unwrap();
        assert_eq!(sub.read_capped("x.json", 10).unwrap().unwrap(), b"two");
        assert!(sub.read_capped("x.json", 2).is_err());
        assert_eq!(sub.names().unwrap(), vec!["x.json".to_string()], "no temporary file left");
        assert!(sub.read_capped("missing", 10).unwrap().is_none());
        assert!(root.subdir("nope", false, false).unwrap().is_none());
        root.remove_tree("a").unwrap();
        assert!(root.stat("a").unwrap().is_none());
        assert!(root.subdir("../x", true, false).is_err());
    }

    #[test]
    fn symlinks_and_foreign_modes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_root(tmp.path(), false).unwrap().unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, tmp.path().join("link")).unwrap();
        let err = root.subdir("link", true, true).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::write(target.join("f"), b"secret").unwrap();
        std::os::unix::fs::symlink(target.join("f"), tmp.path().join("flink")).unwrap();
        assert!(root.read_capped("flink", 100).unwrap_err().to_string().contains("symbolic link"));
        assert!(root.write_atomic("flink", b"x", 0o600).is_err());
        assert_eq!(std::fs::read(target.join("f")).unwrap(), b"secret", "the target is untouched");
        // Removing a symlinked entry removes the link, not what it points at.
        root.remove_tree("link").unwrap();
        assert!(target.join("f").exists());
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = root.subdir("open", false, false).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        std::fs::write(tmp.path().join("plain"), b"").unwrap();
        assert!(root.subdir("plain", false, false).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn a_renamed_directory_takes_our_writes_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_root(tmp.path(), false).unwrap().unwrap();
        let sub = root.subdir("e", true, true).unwrap().unwrap();
        std::fs::rename(tmp.path().join("e"), tmp.path().join("moved")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", tmp.path().join("e")).unwrap();
        sub.write_atomic("f", b"data", 0o600).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("moved/f")).unwrap(), b"data");
    }
}
