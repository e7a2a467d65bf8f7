//! Attaching a mount inside a container's mount namespace (the OCI hook's placement).
//!
//! Why not mount on the host path `<rootfs>/<target>` and let propagation carry it: container
//! storage bind-mounts its directory onto itself as a private mount, so nothing mounted below it on
//! the host reaches the container (podman's default overlay storage does exactly that). Instead the
//! mount is built detached on the host side (fsmount, readahead set) and attached by a short-lived
//! thread that joined the container's mount namespace (see `sys::mount`), at the target resolved in
//! that namespace; then `/proc/PID/mountinfo` must show it there.
//!
//! Where the target is: at createRuntime/prestart runc has bind-mounted the rootfs in the new
//! namespace but not yet called pivot_root, so the rootfs is `root.path` of the bundle as seen from
//! the namespace's `/`, and the mount made there moves with it to `/<target>` at pivot_root. A
//! runtime that had already pivoted shows the rootfs as the process's `/`. Both are told apart by the
//! identity (st_dev, st_ino) of the rootfs directory on the host: it is the same directory (or a bind
//! mount of it) in the container's namespace.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use crate::mount::mountinfo;
use crate::sys;
use crate::sys::mount::DetachedErofs;
use crate::sys::process::PidFd;
use crate::sys::statx::MountId;

use super::CliError;

/// A container's process and its root filesystem inside its mount namespace.
pub struct Container {
    pid: i32,
    pidfd: PidFd,
    /// O_PATH: the rootfs directory in the container's mount namespace.
    rootfs: OwnedFd,
    /// The rootfs path as the container's process sees it right now (`/` once pivoted).
    rootfs_seen: PathBuf,
    /// `NS_GET_MNTNS_ID` of the container's mount namespace (the fd is closed again at once).
    pub mount_ns: u64,
}

fn io_line(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_lowercase()
}

impl Container {
    /// Finds the container's rootfs (`rootfs_host`, the bundle's root.path on the host) in the
    /// mount namespace of process `pid`.
    pub fn locate(pid: i64, rootfs_host: &Path) -> Result<Container, CliError> {
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| CliError::new(format!("the container state names no usable process (pid {pid})")))?;
        let gone = |e: std::io::Error| CliError::new(format!("the container's process {pid} is gone ({})", io_line(&e)));
        let pidfd = sys::process::pidfd_open(pid).map_err(gone)?;
        let root = sys::mount::open_process_root(pid).map_err(gone)?;
        // Opened after the pidfd: if that process still lives, /proc/PID was not reused meanwhile.
        pidfd.send_signal(0).map_err(gone)?;
        let mount_ns = sys::process::mount_namespace_id_of(Path::new(&format!("/proc/{pid}/ns/mnt")))
            .map_err(|e| CliError::new(format!("cannot read the mount namespace of process {pid}: {}", io_line(&e))))?;

        let host_identity = std::fs::metadata(rootfs_host).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        let root_identity = sys::mount::file_identity(root.as_fd())
            .map_err(|e| CliError::new(format!("cannot stat the root of process {pid}: {}", io_line(&e))))?;
        if host_identity == Some(root_identity) {
            return Ok(Container { pid, pidfd, rootfs: root, rootfs_seen: PathBuf::from("/"), mount_ns });
        }
        let not_found = || {
            CliError::new(format!(
                "the container's root filesystem {} is not visible in the mount namespace of its process {pid}",
                rootfs_host.display()
            ))
        };
        let inner = sys::mount::open_dir_in_root(root.as_fd(), rootfs_host).map_err(|_| not_found())?;
        let inner_identity = sys::mount::file_identity(inner.as_fd()).map_err(|_| not_found())?;
        if host_identity.is_some_and(|h| h != inner_identity) {
            return Err(not_found());
        }
        let seen = std::fs::canonicalize(rootfs_host).unwrap_or_else(|_| rootfs_host.to_path_buf());
        Ok(Container { pid, pidfd, rootfs: inner, rootfs_seen: seen, mount_ns })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `/proc/PID/root/<target>`: how the host reaches the mount while the container lives
    /// (`status` and `prefetch` take this path).
    pub fn host_view(&self, target: &Path) -> PathBuf {
        below(Path::new(&format!("/proc/{}/root", self.pid)), target)
    }

    /// Opens (O_PATH) `target` (relative, normal components) below the rootfs, creating missing
    /// directories; symlinks are refused rather than followed.
    pub fn open_target(&self, target: &Path) -> Result<OwnedFd, CliError> {
        let mut walked = PathBuf::from("/");
        let mut dir: Option<OwnedFd> = None;
        for component in target.components() {
            let Component::Normal(name) = component else {
                return Err(CliError::new(format!("target {} must be a plain path inside the container", target.display())));
            };
            walked.push(name);
            let parent = dir.as_ref().map_or(self.rootfs.as_fd(), |d| d.as_fd());
            dir = Some(sys::mount::open_subdir(parent, name, true).map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(libc::ELOOP) => "is a symlink; refusing to mount through it".to_string(),
                    Some(libc::ENOTDIR) => "is not a directory".to_string(),
                    _ => format!("cannot be opened or created: {}", io_line(&e)),
                };
                CliError::new(format!("{} in the container {why}", walked.display()))
            })?);
        }
        dir.ok_or_else(|| CliError::new("the target names the container's root itself"))
    }

    /// Attaches `mount` on `target_dir` (from [`Self::open_target`]) inside the container's mount
    /// namespace and reads its mount id there.
    pub fn attach(&self, mount: &DetachedErofs, target_dir: &OwnedFd) -> Result<(MountId, u64), CliError> {
        self.in_namespace("attach the mount", || {
            sys::mount::attach_detached_at(mount, target_dir.as_fd())?;
            let id = sys::statx::mount_id_fd(mount.root())?;
            let reusable = sys::mount::mountinfo_id_fd(mount.root())?;
            Ok((id, reusable))
        })
    }

    /// Whether the rootfs is still below the namespace's `/` (the runtime has not pivoted yet).
    pub fn before_pivot(&self) -> bool {
        self.rootfs_seen != Path::new("/")
    }

    /// A new O_PATH descriptor of the rootfs directory (the target of a whole-root mount).
    pub fn rootfs_dir(&self) -> Result<OwnedFd, CliError> {
        self.rootfs
            .try_clone()
            .map_err(|e| CliError::new(format!("cannot duplicate the rootfs descriptor: {}", io_line(&e))))
    }

    /// Attaches `mount` over the rootfs itself (`target=/`), inside the container's mount
    /// namespace, before the runtime's pivot_root: the mounts the runtime already made below the
    /// rootfs (`/proc`, `/dev`, `/sys`, bind-mounted files...) are moved, each with the mounts
    /// below it, to the same paths in the image, so the container keeps them. Every path must
    /// exist in the image (it is read-only: nothing can be created); that is checked on the
    /// detached mount before anything changes.
    pub fn attach_as_root(&self, mount: &DetachedErofs) -> Result<(MountId, u64), CliError> {
        if !self.before_pivot() {
            return Err(CliError::new(
                "target=/ needs the hook before the runtime's pivot_root (createRuntime or prestart with runc);                  this container's process has already changed its root",
            ));
        }
        let rootfs_seen = self.rootfs_seen.clone();
        let mut missing: Option<PathBuf> = None;
        let result = self.in_namespace("mount the image as the container's root", || {
            let table = mountinfo::parse(&std::fs::read_to_string("/proc/thread-self/mountinfo")?);
            let rootfs_id = sys::mount::mountinfo_id_fd(self.rootfs.as_fd())?;
            let carried = mounts_to_carry(&table, rootfs_id, &rootfs_seen)
                .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidData, why))?;
            let mut moves = Vec::with_capacity(carried.len());
            for (mnt_id, rel) in carried {
                let from = sys::mount::open_path(&rootfs_seen.join(&rel))?;
                if sys::mount::mountinfo_id_fd(from.as_fd())? != mnt_id {
                    let why = format!("mounts are stacked on {} below the rootfs", Path::new("/").join(&rel).display());
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
                }
                let to = match sys::mount::open_path_beneath(mount.root(), &rel) {
                    Ok(fd) => fd,
                    Err(e) => {
                        missing = Some(rel);
                        return Err(e);
                    }
                };
                moves.push((from, to));
            }
            sys::mount::attach_detached_at(mount, self.rootfs.as_fd())?;
            for (from, to) in &moves {
                if let Err(e) = sys::mount::move_mount_fd(from.as_fd(), to.as_fd()) {
                    // The moved ones go with it; the runtime fails the container on our error.
                    let _ = sys::mount::detach_mount_at_fd(mount.root());
                    return Err(e);
                }
            }
            let id = sys::statx::mount_id_fd(mount.root())?;
            let reusable = sys::mount::mountinfo_id_fd(mount.root())?;
            Ok((id, reusable))
        });
        match (result, missing) {
            (Err(_), Some(rel)) => Err(CliError::new(format!(
                "the image has no /{} for the runtime's mount there (a read-only root cannot get one)",
                rel.display()
            ))),
            (result, _) => result,
        }
    }

    /// Takes an attached mount down again (the agent refused it, or verification failed).
    pub fn detach(&self, mount: &DetachedErofs) -> Result<(), CliError> {
        self.in_namespace("detach the mount", || sys::mount::detach_mount_at_fd(mount.root()))
    }

    /// Checks in `/proc/PID/mountinfo` that mount `reusable_id` is an EROFS mount at `target`
    /// below the rootfs, not covered by another mount. Returns the path mountinfo shows.
    pub fn verify(&self, reusable_id: u64, target: &Path, source: &Path) -> Result<PathBuf, CliError> {
        let path = format!("/proc/{}/mountinfo", self.pid);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CliError::new(format!("cannot read {path} to verify the mount: {}", io_line(&e))))?;
        let expected = below(&self.rootfs_seen, target);
        check_mountinfo(&mountinfo::parse(&text), reusable_id, &expected, source)
            .map_err(|why| CliError::new(format!("the mount is not usable in the container ({path}: {why})")))?;
        Ok(expected)
    }

    /// Runs `work` in a new thread that joined the container's mount namespace; the thread (and
    /// with it that namespace reference) ends with `work`.
    fn in_namespace<T: Send>(
        &self,
        what: &str,
        work: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> Result<T, CliError> {
        let pidfd = self.pidfd.as_fd();
        let result = std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("container-ns".into())
                .spawn_scoped(scope, move || {
                    sys::mount::enter_mount_namespace_of(pidfd).map_err(|e| (true, e))?;
                    work().map_err(|e| (false, e))
                })
                .map_err(|e| (false, e))?;
            handle
                .join()
                .unwrap_or_else(|_| Err((false, std::io::Error::other("the namespace thread panicked"))))
        });
        result.map_err(|(entering, e)| {
            if entering {
                CliError::new(format!("cannot enter the mount namespace of the container's process {}: {}", self.pid, io_line(&e)))
            } else {
                CliError::new(format!("cannot {what} in the container's mount namespace: {}", io_line(&e)))
            }
        })
    }
}

/// `base/rel`, and `base` itself (no trailing `/`) for the empty `rel` of a whole-root target.
fn below(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

/// The mounts directly below the rootfs mount `rootfs_id` at `rootfs_seen`, in mount order, as
/// (mount id, path relative to the rootfs): what a whole-root mount must carry over (pure).
pub fn mounts_to_carry(
    mounts: &[mountinfo::MountInfo],
    rootfs_id: u64,
    rootfs_seen: &Path,
) -> Result<Vec<(u64, PathBuf)>, String> {
    if !mounts.iter().any(|m| m.mnt_id == rootfs_id) {
        return Err(format!("the rootfs mount {rootfs_id} is not in mountinfo"));
    }
    let mut out = Vec::new();
    for m in mounts.iter().filter(|m| m.parent_id == rootfs_id && m.mnt_id != rootfs_id) {
        let Ok(rel) = Path::new(&m.mountpoint).strip_prefix(rootfs_seen) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            return Err(format!("mount {} ({}) already covers the rootfs", m.mnt_id, m.fstype));
        }
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("mountpoint {} is not a plain path", m.mountpoint));
        }
        out.push((m.mnt_id, rel.to_path_buf()));
    }
    Ok(out)
}

/// The verification, on parsed mountinfo (pure).
pub fn check_mountinfo(
    mounts: &[mountinfo::MountInfo],
    reusable_id: u64,
    expected: &Path,
    source: &Path,
) -> Result<(), String> {
    let expected_text = expected.to_string_lossy();
    let ours = mounts
        .iter()
        .find(|m| m.mnt_id == reusable_id)
        .ok_or_else(|| format!("no mount with id {reusable_id}"))?;
    if ours.fstype != "erofs" {
        return Err(format!("mount {reusable_id} is {}, not erofs", ours.fstype));
    }
    if ours.mountpoint != expected_text {
        return Err(format!("mount {reusable_id} is at {}, not at {expected_text}", ours.mountpoint));
    }
    if ours.source != source.to_string_lossy() {
        return Err(format!("mount {reusable_id} comes from {}, not from {}", ours.source, source.display()));
    }
    if let Some(cover) = mounts.iter().find(|m| m.parent_id == reusable_id && m.mountpoint == expected_text) {
        return Err(format!("mount {reusable_id} is covered by mount {} ({})", cover.mnt_id, cover.fstype));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(text: &str) -> Vec<mountinfo::MountInfo> {
        mountinfo::parse(text)
    }

    #[test]
    fn whole_root_carries_the_mounts_directly_below_the_rootfs() {
        let table = info(
            "20 1 0:20 / / rw - ext4 /dev/vda rw\n\
             30 20 0:30 / /b/rootfs rw - ext4 /dev/vda rw\n\
             31 30 0:31 / /b/rootfs/proc rw - proc proc rw\n\
             32 30 0:32 / /b/rootfs/dev rw - tmpfs tmpfs rw\n\
             33 32 0:33 / /b/rootfs/dev/pts rw - devpts devpts rw\n\
             34 30 0:34 /hosts /b/rootfs/etc/hosts rw - ext4 /dev/vda rw\n\
             40 20 0:40 / /elsewhere rw - tmpfs tmpfs rw\n",
        );
        let carried = mounts_to_carry(&table, 30, Path::new("/b/rootfs")).unwrap();
        let rels: Vec<(u64, &str)> = carried.iter().map(|(id, p)| (*id, p.to_str().unwrap())).collect();
        // dev/pts moves with dev; /elsewhere is not below the rootfs.
        assert_eq!(rels, vec![(31, "proc"), (32, "dev"), (34, "etc/hosts")]);
        assert!(mounts_to_carry(&table, 99, Path::new("/b/rootfs")).unwrap_err().contains("not in mountinfo"));
        let covered = info(
            "30 20 0:30 / /b/rootfs rw - ext4 /dev/vda rw\n\
             31 30 0:31 / /b/rootfs rw - tmpfs tmpfs rw\n",
        );
        assert!(mounts_to_carry(&covered, 30, Path::new("/b/rootfs")).unwrap_err().contains("already covers"));
    }

    #[test]
    fn verification() {
        let table = info(
            "73 48 0:40 / /merged rw - overlay overlay rw\n\
             90 73 0:50 / /merged/data ro,nosuid,nodev - erofs /var/cache/e/blob ro\n\
             91 73 0:51 / /merged/other ro - ext4 /dev/x ro\n",
        );
        let src = Path::new("/var/cache/e/blob");
        assert_eq!(check_mountinfo(&table, 90, Path::new("/merged/data"), src), Ok(()));
        assert!(check_mountinfo(&table, 92, Path::new("/merged/data"), src).unwrap_err().contains("no mount"));
        assert!(check_mountinfo(&table, 91, Path::new("/merged/other"), src).unwrap_err().contains("not erofs"));
        assert!(check_mountinfo(&table, 90, Path::new("/data"), src).unwrap_err().contains("not at /data"));
        assert!(check_mountinfo(&table, 90, Path::new("/merged/data"), Path::new("/x")).unwrap_err().contains("comes from"));
        let covered = info(
            "90 73 0:50 / /merged/data ro - erofs /var/cache/e/blob ro\n\
             95 90 0:60 / /merged/data rw - tmpfs tmpfs rw\n",
        );
        assert!(check_mountinfo(&covered, 90, Path::new("/merged/data"), src).unwrap_err().contains("covered"));
    }
}
