//! File-backed EROFS mounts through the new mount API, and `umount2`.
//!
//! Why not `mount(8)`: bookworm's util-linux attaches a loop device for a
//! regular-file source, and loop I/O bypasses the fanotify pre-content hook.
//! Why not plain `mount(2)`: the readahead of the new superblock's bdi
//! (`/sys/class/bdi/erofs-N/read_ahead_kb`) decides event sizes and must be
//! set before any file in the mount is opened, i.e. while the mount is
//! still detached. The sequence is therefore
//!
//! ```text
//! fsopen("erofs") -> fsconfig(source=<abs path>, ro) -> FSCONFIG_CMD_CREATE
//!   -> fsmount(RDONLY|NODEV|NOSUID)            (detached mount, O_PATH fd)
//!   -> openat(mnt, ".") + ioctl(FS_IOC_GETFSSYSFSPATH) = "erofs/erofs-N"
//!   -> write /sys/class/bdi/erofs-N/read_ahead_kb
//!   -> move_mount(mnt, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)
//! ```
//!
//! Measured on Linux 6.18: the bdi name equals the sysfs name (`erofs-N`),
//! the ioctl fails with EBADF on the O_PATH fd returned by fsmount (hence
//! the `openat(".")`), and a detached mount whose fd is closed before
//! `move_mount` simply disappears, so every failure path leaves nothing.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::{cvt, cvt_long, path_to_cstring};

const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct fs_sysfs_path` from `include/uapi/linux/fs.h` (Linux >= 6.9).
#[repr(C)]
struct FsSysfsPath {
    len: u8,
    name: [u8; 128],
}

/// `FS_IOC_GETFSSYSFSPATH = _IOR(0x15, 1, struct fs_sysfs_path)`.
const FS_IOC_GETFSSYSFSPATH: libc::Ioctl = libc::_IOR::<FsSysfsPath>(0x15, 1);

// The asm-generic encoding (x86_64, aarch64, riscv64, ...) gives 0x80811501;
// checked against the kernel header and empirically.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
#[allow(clippy::unnecessary_cast)] // `Ioctl` is c_ulong on glibc, c_int on musl
const _: () = assert!(FS_IOC_GETFSSYSFSPATH as u64 == 0x8081_1501);

/// Upper bound on the fs context log lines kept for an error message.
const MAX_LOG_LINES: usize = 16;

/// A freshly attached EROFS mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsMount {
    /// The superblock's sysfs name, e.g. `erofs-3` (from `erofs/erofs-3`).
    /// It is also the name of its bdi in `/sys/class/bdi/`.
    pub sysfs_name: String,
}

impl ErofsMount {
    /// `/sys/fs/erofs/<name>`: exists as long as the superblock does.
    pub fn sysfs_dir(&self) -> PathBuf {
        Path::new("/sys/fs/erofs").join(&self.sysfs_name)
    }

    /// `/sys/class/bdi/<name>`: holds `read_ahead_kb`.
    pub fn bdi_dir(&self) -> PathBuf {
        Path::new("/sys/class/bdi").join(&self.sysfs_name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("bad mount path {}: {source}", path.display())]
    Path { path: PathBuf, source: io::Error },
    #[error(
        "cannot create an erofs filesystem context (fsopen): {source}{}",
        fsopen_hint(source)
    )]
    Fsopen { source: io::Error },
    #[error(
        "erofs refused option {key}: {source}{}",
        format_kernel_log(kernel_log)
    )]
    Option {
        key: String,
        source: io::Error,
        kernel_log: Vec<String>,
    },
    #[error("cannot mount {} as EROFS: {source}{}", image.display(), format_kernel_log(kernel_log))]
    Create {
        image: PathBuf,
        source: io::Error,
        kernel_log: Vec<String>,
    },
    #[error("fsmount: {source}")]
    Fsmount { source: io::Error },
    #[error("cannot find the sysfs name of the new EROFS superblock: {source}")]
    SysfsName { source: io::Error },
    #[error("cannot set readahead through {}: {source}", path.display())]
    ReadAhead { path: PathBuf, source: io::Error },
    #[error("cannot attach the mount on {}: {source}", target.display())]
    Attach { target: PathBuf, source: io::Error },
}

fn fsopen_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => "; mounting needs CAP_SYS_ADMIN (run as root)",
        Some(libc::ENODEV) => "; the kernel has no EROFS support (modprobe erofs)",
        Some(libc::ENOSYS) => "; the kernel lacks the new mount API (need Linux >= 5.2)",
        _ => "",
    }
}

fn format_kernel_log(lines: &[String]) -> String {
    if lines.is_empty() {
        // erofs reports superblock problems through printk, not the fs
        // context log.
        " (details in the kernel log, see dmesg)".to_string()
    } else {
        format!(" (kernel: {})", lines.join("; "))
    }
}

/// An fsopen() filesystem context.
struct FsContext {
    fd: OwnedFd,
}

impl FsContext {
    fn open(fs_type: &str) -> io::Result<FsContext> {
        let name = CString::new(fs_type).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `name` is a valid C string that outlives the call.
        let fd =
            cvt_long(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
        // SAFETY: on success the syscall returned a new descriptor we own.
        Ok(FsContext {
            fd: unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) },
        })
    }

    fn fsconfig(
        &self,
        cmd: libc::c_uint,
        key: Option<&CString>,
        value: Option<&CString>,
    ) -> io::Result<()> {
        let key_ptr = key.map_or(std::ptr::null(), |k| k.as_ptr());
        let value_ptr = value.map_or(std::ptr::null(), |v| v.as_ptr());
        // SAFETY: key/value are NULL or valid C strings that outlive the
        // call, as fsconfig(2) requires for SET_FLAG/SET_STRING/CMD_*.
        cvt_long(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                cmd,
                key_ptr,
                value_ptr,
                0 as libc::c_int,
            )
        })?;
        Ok(())
    }

    fn set_string(&self, key: &str, value: &CString) -> io::Result<()> {
        let key = CString::new(key).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.fsconfig(FSCONFIG_SET_STRING, Some(&key), Some(value))
    }

    fn set_flag(&self, key: &str) -> io::Result<()> {
        let key = CString::new(key).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.fsconfig(FSCONFIG_SET_FLAG, Some(&key), None)
    }

    fn create(&self) -> io::Result<()> {
        self.fsconfig(FSCONFIG_CMD_CREATE, None, None)
    }

    /// Drains the context's message log ("e erofs: ..." lines); the kernel
    /// explains most refusals only there.
    fn kernel_log(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut buf = [0u8; 1024];
        while lines.len() < MAX_LOG_LINES {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break; // ENODATA: log empty
            }
            let text = String::from_utf8_lossy(&buf[..n as usize]);
            lines.push(text.trim_end().to_string());
        }
        lines
    }

    fn mount(&self, attr_flags: libc::c_uint) -> io::Result<OwnedFd> {
        // SAFETY: integer arguments only.
        let fd = cvt_long(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attr_flags,
            )
        })?;
        // SAFETY: on success fsmount returned a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }
}

/// Mounts the EROFS image in the regular file `source` on `target`
/// (read-only, nodev, nosuid; no loop device), setting the new bdi's
/// `read_ahead_kb` before the mount becomes visible.
pub fn mount_erofs_file(
    source: &Path,
    target: &Path,
    read_ahead_kb: Option<u32>,
) -> Result<ErofsMount, MountError> {
    mount_erofs_file_with_options(source, target, read_ahead_kb, &[])
}

/// [`mount_erofs_file`] with extra erofs options, each `(key, None)` for a
/// flag or `(key, Some(value))` (e.g. `("cache_strategy", Some("disabled"))`):
/// [`fsmount_erofs_file`], then `move_mount` onto `target`.
pub fn mount_erofs_file_with_options(
    source: &Path,
    target: &Path,
    read_ahead_kb: Option<u32>,
    fs_options: &[(&str, Option<&str>)],
) -> Result<ErofsMount, MountError> {
    let c_target = path_to_cstring(target).map_err(|e| MountError::Path {
        path: target.into(),
        source: e,
    })?;
    // Dropping the detached mount before move_mount tears it (and the
    // superblock) down again: nothing is left on failure.
    let detached = fsmount_erofs_file(source, read_ahead_kb, fs_options)?;
    let empty = c"";
    // SAFETY: `empty` and `c_target` are valid C strings that outlive the
    // call; `detached.fd` is a live detached mount.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            detached.fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map_err(|source| MountError::Attach {
        target: target.into(),
        source,
    })?;
    Ok(detached.mount)
}

/// `"erofs/erofs-3"` -> `"erofs-3"`; anything else (other fs, path
/// separators, `..`) is refused since the name is joined into sysfs paths.
fn erofs_sysfs_name(sysfs_path: &str) -> Option<String> {
    let name = sysfs_path.strip_prefix("erofs/")?;
    let valid = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    valid.then(|| name.to_string())
}

/// Opens the directory an O_PATH fd (such as fsmount's) refers to, so that
/// ioctls work on it.
fn openat_dir(dir: BorrowedFd) -> io::Result<OwnedFd> {
    // SAFETY: "." is a valid C string; `dir` is a live descriptor.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: openat returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(FS_IOC_GETFSSYSFSPATH)` on an open file or directory:
/// the superblock's path under `/sys/fs/`, e.g. `erofs/erofs-3`.
pub fn fs_sysfs_path_fd(file: BorrowedFd) -> io::Result<String> {
    let mut out = FsSysfsPath {
        len: 0,
        name: [0; 128],
    };
    // SAFETY: `out` is a writable `struct fs_sysfs_path` of exactly the size
    // encoded in the ioctl number.
    cvt(unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            FS_IOC_GETFSSYSFSPATH,
            &mut out as *mut FsSysfsPath,
        )
    })?;
    let len = usize::from(out.len).min(out.name.len());
    let name = &out.name[..len];
    // The kernel copies a NUL-terminated string; do not trust `len` alone.
    let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
    String::from_utf8(name.to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 sysfs path"))
}

/// [`fs_sysfs_path_fd`] on a path (e.g. a mountpoint).
pub fn fs_sysfs_path(path: &Path) -> io::Result<String> {
    let file = File::open(path)?;
    fs_sysfs_path_fd(file.as_fd())
}

fn write_sysfs(path: &Path, value: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// `umount2(target, UMOUNT_NOFOLLOW [| MNT_DETACH])`. A symlink as target is
/// refused rather than followed (we run as root on user-supplied paths).
pub fn umount(target: &Path, lazy: bool) -> io::Result<()> {
    let c_target = path_to_cstring(target)?;
    let mut flags = libc::UMOUNT_NOFOLLOW;
    if lazy {
        flags |= libc::MNT_DETACH;
    }
    // SAFETY: `c_target` is a valid C string that outlives the call.
    cvt(unsafe { libc::umount2(c_target.as_ptr(), flags) })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Detached mounts attached in another mount namespace (OCI runtime hooks).
//
// A runtime hook runs in the host's namespaces, but the container's mounts
// live in its own mount namespace, cut off from the host by propagation
// (container storage bind-mounts its directory onto itself as a private
// mount). So the mount is built here, detached (fsmount), and attached by a
// thread that joined the container's mount namespace:
//
// ```text
// fsmount_erofs_file()                  detached mount fd, read_ahead_kb set
// open_container_root(pid) + open_dir_beneath(..)   target dir (O_PATH), on the host
// in a thread: unshare(CLONE_FS), setns(pidfd, CLONE_NEWNS),
//              move_mount(mnt, "", target, "", F_EMPTY_PATH | T_EMPTY_PATH)
// ```
//
// move_mount refuses a target outside the caller's mount namespace (EINVAL),
// hence the setns; setns(CLONE_NEWNS) refuses a caller that shares its
// fs_struct with other threads (EINVAL), hence unshare(CLONE_FS) first. The
// thread ends right after, and no namespace fd is ever held (a held one would
// keep the namespace, and its superblocks, alive).

const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// An EROFS mount made with fsmount and not yet attached anywhere. Dropping
/// it before [`attach_detached_at`] tears the mount (and superblock) down.
#[derive(Debug)]
pub struct DetachedErofs {
    fd: OwnedFd,
    pub mount: ErofsMount,
}

impl DetachedErofs {
    /// The mount's root (an O_PATH fd). Files of the mount can be opened
    /// through it (or `/proc/self/fd/N`), before and after attaching.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Builds the EROFS mount of the regular file `source` (read-only, nodev,
/// nosuid; no loop device) and sets its bdi's `read_ahead_kb`, without
/// attaching it: readahead is set before any file can be opened. The kernel
/// resolves `source` itself; an absolute path also shows up readable in
/// mountinfo.
pub fn fsmount_erofs_file(
    source: &Path,
    read_ahead_kb: Option<u32>,
    fs_options: &[(&str, Option<&str>)],
) -> Result<DetachedErofs, MountError> {
    let abs_source = std::path::absolute(source).map_err(|e| MountError::Path {
        path: source.into(),
        source: e,
    })?;
    let c_source = path_to_cstring(&abs_source).map_err(|e| MountError::Path {
        path: source.into(),
        source: e,
    })?;
    let ctx = FsContext::open("erofs").map_err(|source| MountError::Fsopen { source })?;
    let option_error = |key: &str, source: io::Error| MountError::Option {
        key: key.to_string(),
        source,
        kernel_log: ctx.kernel_log(),
    };
    ctx.set_string("source", &c_source)
        .map_err(|e| option_error("source", e))?;
    ctx.set_flag("ro").map_err(|e| option_error("ro", e))?;
    for (key, value) in fs_options {
        let result = match value {
            None => ctx.set_flag(key),
            Some(v) => CString::new(*v)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
                .and_then(|v| ctx.set_string(key, &v)),
        };
        result.map_err(|e| option_error(key, e))?;
    }
    ctx.create().map_err(|source| MountError::Create {
        image: abs_source.clone(),
        source,
        kernel_log: ctx.kernel_log(),
    })?;
    let fd = ctx
        .mount(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID)
        .map_err(|source| MountError::Fsmount { source })?;
    let sysfs_path = {
        let root = openat_dir(fd.as_fd()).map_err(|source| MountError::SysfsName { source })?;
        fs_sysfs_path_fd(root.as_fd()).map_err(|source| MountError::SysfsName { source })?
    };
    let sysfs_name = erofs_sysfs_name(&sysfs_path).ok_or_else(|| MountError::SysfsName {
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sysfs path {sysfs_path:?}"),
        ),
    })?;
    let mount = ErofsMount { sysfs_name };
    if let Some(kb) = read_ahead_kb {
        let path = mount.bdi_dir().join("read_ahead_kb");
        write_sysfs(&path, &kb.to_string())
            .map_err(|source| MountError::ReadAhead { path, source })?;
    }
    Ok(DetachedErofs { fd, mount })
}

/// `move_mount(mnt, "", target_dir, "", F_EMPTY_PATH | T_EMPTY_PATH)`:
/// attaches a detached mount on the directory `target_dir` (an O_PATH fd is
/// fine). The target must be in the caller's mount namespace.
pub fn attach_detached_at(mount: &DetachedErofs, target_dir: BorrowedFd) -> io::Result<()> {
    move_mount_fd(mount.fd.as_fd(), target_dir)
}

/// `move_mount(from, "", to, "", F_EMPTY_PATH | T_EMPTY_PATH)`: moves the
/// mount whose root `from` is (detached, or attached in the caller's mount
/// namespace, with the mounts below it) onto the file or directory `to`.
pub fn move_mount_fd(from: BorrowedFd, to: BorrowedFd) -> io::Result<()> {
    // SAFETY: both descriptors are live; "" is a valid C string and the
    // EMPTY_PATH flags make the kernel use the descriptors themselves.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Opens (O_PATH, not following a final symlink) the absolute `path` as the
/// calling thread sees it: at a mountpoint, the root of the mount there.
pub fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let c_path = path_to_cstring(path)?;
    // SAFETY: `c_path` is a valid C string.
    let fd = cvt(unsafe { libc::open(c_path.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) })?;
    // SAFETY: open returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the *calling thread* into the mount namespace of the process behind
/// `pidfd`: first `unshare(CLONE_FS)` (setns(CLONE_NEWNS) refuses a thread
/// sharing cwd/root with others), then `setns(pidfd, CLONE_NEWNS)`. The
/// thread's root and cwd become the namespace's root. Call it only in a
/// thread that ends after its work there; the process's other threads stay
/// where they are.
pub fn enter_mount_namespace_of(pidfd: BorrowedFd) -> io::Result<()> {
    // SAFETY: integer argument; affects only the calling thread's fs_struct.
    cvt(unsafe { libc::unshare(libc::CLONE_FS) })?;
    // SAFETY: `pidfd` is a live pidfd; CLONE_NEWNS selects the namespace.
    cvt(unsafe { libc::setns(pidfd.as_raw_fd(), libc::CLONE_NEWNS) })?;
    Ok(())
}

/// Lazily detaches the mount whose root `mount_root` is, in the caller's
/// mount namespace: `fchdir(mount_root)` then `umount2(".", MNT_DETACH)`
/// (there is no umount by fd). Changes the calling thread's cwd: call it in
/// the same kind of short-lived thread as [`enter_mount_namespace_of`].
pub fn detach_mount_at_fd(mount_root: BorrowedFd) -> io::Result<()> {
    // SAFETY: `mount_root` is a live descriptor (O_PATH is enough for fchdir).
    cvt(unsafe { libc::fchdir(mount_root.as_raw_fd()) })?;
    // SAFETY: "." is a valid C string.
    cvt(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) })?;
    Ok(())
}

/// `struct open_how` of openat2(2); libc's is `#[non_exhaustive]`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2(dir: BorrowedFd, path: &std::ffi::CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `path` is a valid C string and `how` a valid open_how of the
    // size passed; both outlive the call.
    let fd = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: openat2 returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Opens (O_PATH) the file `rel` below the directory `root` without following
/// any symbolic link and without leaving `root` (`RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`).
pub fn open_path_beneath(root: BorrowedFd, rel: &Path) -> io::Result<OwnedFd> {
    let c_rel = path_to_cstring(rel)?;
    openat2(
        root,
        &c_rel,
        libc::O_PATH,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens (O_PATH) the root directory of process `pid` through
/// `/proc/PID/root`: the directory the process sees as `/`, in its own
/// mount namespace.
pub fn open_process_root(pid: i32) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/{pid}/root")).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `path` is a valid C string.
    let fd = cvt(unsafe {
        libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
    })?;
    // SAFETY: open returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (O_PATH) the directory `path` resolved as if `root` were `/`
/// (`RESOLVE_IN_ROOT`: absolute symlinks and `..` stay inside `root`).
pub fn open_dir_in_root(root: BorrowedFd, path: &Path) -> io::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let c_rel = path_to_cstring(rel)?;
    openat2(
        root,
        &c_rel,
        libc::O_PATH | libc::O_DIRECTORY,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens (O_PATH) the subdirectory `name` (one component) of `dir`, refusing
/// symlinks (ELOOP) and `..`; with `create`, makes it (mode 0755) when it
/// does not exist. Mountpoints below `dir` are crossed as usual.
pub fn open_subdir(dir: BorrowedFd, name: &std::ffi::OsStr, create: bool) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a single path component"));
    }
    let c_name = CString::new(bytes).map_err(|_| io::ErrorKind::InvalidInput)?;
    let resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH;
    match openat2(dir, &c_name, libc::O_PATH | libc::O_DIRECTORY, resolve) {
        Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
            // SAFETY: `dir` is a live descriptor and `c_name` a valid C string.
            match cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c_name.as_ptr(), 0o755) }) {
                Ok(_) => {}
                // Someone else made it meanwhile: fine, it is opened below.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            openat2(dir, &c_name, libc::O_PATH | libc::O_DIRECTORY, resolve)
        }
        other => other,
    }
}

/// `(st_dev, st_ino)` of an open file (O_PATH is enough).
pub fn file_identity(file: BorrowedFd) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a writable stat buffer; `file` a live descriptor.
    cvt(unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: filled by the kernel; plain integers.
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}

/// The reusable mount id (`STATX_MNT_ID`, the first field of
/// `/proc/PID/mountinfo`) of the mount an open file is on.
pub fn mountinfo_id_fd(file: BorrowedFd) -> io::Result<u64> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: "" is a valid C string, `stx` a writable statx buffer, `file`
    // a live descriptor (AT_EMPTY_PATH: the file itself).
    cvt(unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: zero-initialised and filled by the kernel; plain integers.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "statx returns no mount id"));
    }
    Ok(stx.stx_mnt_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_name_parsing() {
        assert_eq!(
            erofs_sysfs_name("erofs/erofs-3").as_deref(),
            Some("erofs-3")
        );
        assert_eq!(erofs_sysfs_name("ext4/vda"), None);
        assert_eq!(erofs_sysfs_name("erofs/"), None);
        assert_eq!(erofs_sysfs_name("erofs/.."), None);
        assert_eq!(erofs_sysfs_name("erofs/a/b"), None);
    }

    #[test]
    fn ioctl_number_matches_kernel_header() {
        // The size is encoded in the ioctl number (0x0081 of 0x80811501).
        assert_eq!(std::mem::size_of::<FsSysfsPath>(), 129);
    }

    /// Unmounts on drop so a failing assertion leaves nothing mounted.
    struct MountGuard(PathBuf);
    impl Drop for MountGuard {
        fn drop(&mut self) {
            let _ = umount(&self.0, true);
        }
    }

    fn mountinfo_line(target: &Path) -> Option<String> {
        let target = target.to_str().unwrap().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(target.as_str()))
            .map(str::to_string)
    }

    fn build_image(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello.txt"), b"hello erofs\n").unwrap();
        let image = dir.join("image.erofs");
        let out = std::process::Command::new("mkfs.erofs")
            .arg(&image)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        image
    }

    #[test]
    #[ignore = "needs root + EROFS file-backed mounts + mkfs.erofs"]
    fn file_backed_erofs_mount() {
        let dir = tempfile::Builder::new()
            .prefix("erofs-mount-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let image = build_image(dir.path());
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();

        let mount = mount_erofs_file(&image, &target, Some(768)).unwrap();
        let guard = MountGuard(target.clone());
        assert!(mount.sysfs_name.starts_with("erofs-"), "{mount:?}");

        // mountinfo: erofs, source is the image file itself (no /dev/loopN).
        let line = mountinfo_line(&target).expect("mount visible in mountinfo");
        let (_, after) = line.split_once(" - ").unwrap();
        let mut fields = after.split(' ');
        assert_eq!(fields.next(), Some("erofs"));
        assert_eq!(fields.next(), Some(image.to_str().unwrap()), "{line}");
        assert!(!line.contains("/dev/loop"), "{line}");
        assert!(
            line.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "{line}"
        );

        assert_eq!(
            std::fs::read(target.join("hello.txt")).unwrap(),
            b"hello erofs\n"
        );
        let ra = std::fs::read_to_string(mount.bdi_dir().join("read_ahead_kb")).unwrap();
        assert_eq!(ra.trim(), "768");
        assert!(mount.sysfs_dir().is_dir());
        assert_eq!(
            fs_sysfs_path(&target).unwrap(),
            format!("erofs/{}", mount.sysfs_name)
        );

        let inner = crate::sys::statx::mount_id(&target).unwrap();
        let outer = crate::sys::statx::mount_id(dir.path()).unwrap();
        assert_ne!(inner.id, outer.id);
        assert!(inner.unique);

        crate::sys::umount_retrying_busy(&target).unwrap();
        std::mem::forget(guard);
        assert!(mountinfo_line(&target).is_none());
        // The superblock is released a moment after the umount.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while mount.sysfs_dir().exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!mount.sysfs_dir().exists());
    }

    #[test]
    #[ignore = "needs root + EROFS file-backed mounts + mkfs.erofs"]
    fn mount_failures_leave_nothing() {
        let dir = tempfile::Builder::new()
            .prefix("erofs-mount-test")
            .tempdir_in("/var/tmp")
            .unwrap();
        let target = dir.path().join("mnt");
        std::fs::create_dir(&target).unwrap();

        // Not an EROFS image: CMD_CREATE fails, with the kernel's reason.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0u8; 64 * 1024]).unwrap();
        match mount_erofs_file(&junk, &target, None) {
            Err(e @ MountError::Create { .. }) => eprintln!("{e}"),
            other => panic!("expected Create error, got {other:?}"),
        }
        // Missing source.
        assert!(mount_erofs_file(&dir.path().join("nope"), &target, None).is_err());
        // Missing target: the detached mount is dropped again.
        let image = build_image(dir.path());
        match mount_erofs_file(&image, &dir.path().join("no-such-dir"), None) {
            Err(MountError::Attach { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("expected Attach error, got {other:?}"),
        }
        assert!(mountinfo_line(&target).is_none());
        // A bad erofs option is reported by name.
        match mount_erofs_file_with_options(&image, &target, None, &[("no_such_option", None)]) {
            Err(e @ MountError::Option { .. }) => {
                eprintln!("{e}");
                let MountError::Option { key, .. } = e else {
                    unreachable!()
                };
                assert_eq!(key, "no_such_option");
            }
            other => panic!("expected Option error, got {other:?}"),
        }
        assert!(mountinfo_line(&target).is_none());
        // Lazy umount of something not mounted is an error, not a panic.
        assert!(umount(&target, true).is_err());
    }
}
