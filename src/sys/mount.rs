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
/// flag or `(key, Some(value))` (e.g. `("cache_strategy", Some("disabled"))`).
pub fn mount_erofs_file_with_options(
    source: &Path,
    target: &Path,
    read_ahead_kb: Option<u32>,
    fs_options: &[(&str, Option<&str>)],
) -> Result<ErofsMount, MountError> {
    // The kernel resolves `source` itself, relative to our cwd at CMD_CREATE
    // time; an absolute path also shows up readable in mountinfo.
    let abs_source = std::path::absolute(source).map_err(|e| MountError::Path {
        path: source.into(),
        source: e,
    })?;
    let c_source = path_to_cstring(&abs_source).map_err(|e| MountError::Path {
        path: source.into(),
        source: e,
    })?;
    let c_target = path_to_cstring(target).map_err(|e| MountError::Path {
        path: target.into(),
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

    // From here on the superblock exists; dropping `mount_fd` before
    // move_mount tears the detached mount (and the superblock) down again.
    let mount_fd = ctx
        .mount(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID)
        .map_err(|source| MountError::Fsmount { source })?;

    let sysfs_path = {
        let root =
            openat_dir(mount_fd.as_fd()).map_err(|source| MountError::SysfsName { source })?;
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

    let empty = c"";
    // SAFETY: `empty` and `c_target` are valid C strings that outlive the
    // call; `mount_fd` is a live detached mount.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount_fd.as_raw_fd(),
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
    Ok(mount)
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
