//! Processes and mount namespaces: pidfds, start times, `setns`.
//!
//! A pid alone is not an identity (pids are reused); `(pid, start time)` is,
//! and a pidfd is a handle that can neither be fooled by reuse nor signal
//! the wrong process. The agent moves itself into the initial mount
//! namespace because a process sitting in a user's private namespace keeps
//! that namespace, and every superblock mounted in it, alive.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{cvt, cvt_long};

/// Start time of a process in clock ticks since boot (field 22 of
/// `/proc/PID/stat`). With the pid it identifies a process across pid reuse.
pub fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line. The second field,
/// `(comm)`, may contain spaces and `)`, so fields are counted from the
/// *last* `)`: after it come field 3 (`state`) onwards.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm
        .split_ascii_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

/// A process file descriptor (`pidfd_open(2)`).
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
}

/// Opens a pidfd for `pid`. Check the process identity (e.g. with
/// [`process_start_time`]) *after* opening to close the reuse race.
pub fn pidfd_open(pid: i32) -> io::Result<PidFd> {
    // SAFETY: integer arguments only.
    let fd = cvt_long(unsafe {
        libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint)
    })?;
    // SAFETY: on success pidfd_open returned a new descriptor we own.
    Ok(PidFd {
        fd: unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) },
    })
}

impl PidFd {
    /// Waits up to `timeout` for the process to exit; `true` if it has.
    /// (Does not reap: a child still needs `waitpid`.)
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            // Round up so a sub-millisecond remainder does not busy-loop.
            let ms = remaining.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) => continue,
                Ok(_) => return Ok(pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// `pidfd_send_signal(2)`: cannot hit a new process that reused the pid.
    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: a NULL siginfo is allowed (behaves like kill(2)).
        cvt_long(unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        })?;
        Ok(())
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves this (still single-threaded) process into the outermost mount
/// namespace among its ancestors that it may open: pid 1's when readable,
/// else the oldest visible ancestor's. An agent started from inside
/// `unshare -m` must not live in, and so pin, that private namespace.
/// Returns whether the namespace changed. Never holds the namespace fd.
pub fn enter_outer_mount_namespace() -> io::Result<bool> {
    let ours = std::fs::metadata("/proc/self/ns/mnt")?;
    let mut target: Option<(i32, (u64, u64))> = None;
    let mut pid = parent_pid(std::process::id() as i32).unwrap_or(0);
    let mut hops = 0;
    while pid > 0 && hops < 256 {
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/mnt")) {
            target = Some((pid, (meta.dev(), meta.ino())));
        }
        if pid == 1 {
            break;
        }
        pid = parent_pid(pid).unwrap_or(0);
        hops += 1;
    }
    let Some((pid, id)) = target else { return Ok(false) };
    if id == (ours.dev(), ours.ino()) {
        return Ok(false);
    }
    let ns = File::open(format!("/proc/{pid}/ns/mnt"))?;
    // SAFETY: `ns` is a live namespace descriptor owned by this frame.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) })?;
    Ok(true)
}

/// Field 4 of /proc/PID/stat, counted after the last ')' of comm.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The 64-bit id of our mount namespace (`ioctl(NS_GET_MNTNS_ID)`, Linux
/// >= 6.8): the id statmount/listmount take as `mnt_ns_id`.
pub fn mount_namespace_id() -> io::Result<u64> {
    mount_namespace_id_of(Path::new("/proc/self/ns/mnt"))
}

/// [`mount_namespace_id`] for a `/proc/PID/ns/mnt` path. The namespace fd
/// is closed before returning.
pub fn mount_namespace_id_of(ns_path: &Path) -> io::Result<u64> {
    let ns = File::open(ns_path)?;
    let mut id: u64 = 0;
    // SAFETY: NS_GET_MNTNS_ID writes one u64 to the pointer.
    cvt(unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_MNTNS_ID, &mut id as *mut u64) })?;
    Ok(id)
}

/// The inode number of our mount namespace (what `readlink
/// /proc/self/ns/mnt` shows as `mnt:[N]`); works on every kernel, but is a
/// different number from [`mount_namespace_id`].
pub fn mount_namespace_inode() -> io::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/mnt")?.ino())
}


/// Makes sure fd number `n` is occupied in this process, by a duplicate of
/// `placeholder` if it is free, so the kernel cannot hand `n` to anything
/// else (such as a new fanotify event). Returns the placeholder, owned:
/// dropping it frees the number again. `Ok(None)`: `n` is already open in
/// this process (one of our own descriptors holds it).
pub fn reserve_fd_number(n: i32, placeholder: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    if n < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    let in_use = unsafe { libc::fcntl(n, libc::F_GETFD) } != -1;
    if in_use {
        return Ok(None);
    }
    // SAFETY: `n` is free (checked above, and this runs before other threads
    // open files), so dup3 closes nothing of ours; O_CLOEXEC keeps it private.
    let fd = cvt(unsafe { libc::dup3(placeholder.as_raw_fd(), n, libc::O_CLOEXEC) })?;
    // SAFETY: dup3 just installed `fd` (= n); nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Open files an agent process wants: every queued permission event of a
/// read(2) of the group installs an fd (a 64 KiB batch is ~1,300), and the
/// kernel denies an event it cannot give an fd to.
pub const WANTED_OPEN_FILES: u64 = 65536;

/// Raises `RLIMIT_NOFILE` to at least `wanted` (the hard limit too when we
/// may: root, up to `fs.nr_open`), else as far as the hard limit allows.
/// Returns the soft limit now in force.
pub fn raise_open_file_limit(wanted: u64) -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= wanted {
        return Ok(soft);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(wanted);
    let target = wanted.min(nr_open.max(hard));
    if target > hard && setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    let soft_now = target.min(hard).max(soft);
    setrlimit(Resource::RLIMIT_NOFILE, soft_now, hard).map_err(io::Error::from)?;
    Ok(soft_now)
}

const MAX_INHERITED_FDS: usize = 8;

/// Spawns `cmd` with `fds` duplicated onto the given fd numbers in the child
/// (inherited across exec: the group fd a worker or supervisor needs).
pub fn spawn_with_fds(
    cmd: &mut std::process::Command,
    fds: &[(BorrowedFd<'_>, i32)],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let pairs: Vec<(i32, i32)> = fds.iter().map(|(fd, target)| (fd.as_raw_fd(), *target)).collect();
    if pairs.len() > MAX_INHERITED_FDS || pairs.iter().any(|&(_, t)| t <= 2) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot replace stdio"));
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls async-signal-safe functions (fcntl, dup2) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            // Move sources out of the way first so a target cannot clobber a
            // source that is still needed.
            // No allocation here: fork of a threaded process.
            let mut moved = [(-1i32, -1i32); MAX_INHERITED_FDS];
            for (slot, &(src, target)) in moved.iter_mut().zip(pairs.iter()) {
                let tmp = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 100);
                if tmp == -1 {
                    return Err(io::Error::last_os_error());
                }
                *slot = (tmp, target);
            }
            for &(tmp, target) in moved.iter().take(pairs.len()) {
                // dup2 clears FD_CLOEXEC on the target: it survives exec.
                if libc::dup2(tmp, target) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Takes ownership of fd `n` inherited from our parent (see
/// [`spawn_with_fds`]): `None` if `n` is not open, is stdio, or was taken
/// before. Each number can be taken once per process, so two owners can
/// never close the same descriptor; call it at startup, before this process
/// opens files of its own (the numbers our parent set up are open from exec
/// on, so nothing of ours can hold them).
pub fn take_inherited_fd(n: i32) -> Option<OwnedFd> {
    static TAKEN: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if n <= 2 || taken.contains(&n) {
        return None;
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } == -1 {
        return None;
    }
    taken.push(n);
    // Close-on-exec from now on: it is ours, not our children's.
    // SAFETY: setting a flag on an fd we just checked is open.
    unsafe {
        libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: our parent set `n` up for us before exec and it is taken at
    // most once (TAKEN), so this is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(n) })
}

/// `recvmsg(2)` on a unix stream socket with room for `SCM_RIGHTS`: the
/// bytes read into `buf` and the descriptors that came with them, owned and
/// close-on-exec. `Ok((0, _))` at end of stream.
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received.into_iter().filter(|&fd| fd >= 0) {
                // SAFETY: the kernel installed `fd` in our table for this
                // message; nothing else in the process knows its number.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(comm: &str) -> String {
        // pid (comm) state ppid ... with starttime (field 22) = 987654
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[0] = "S".into();
        fields[22 - 3] = "987654".into();
        format!("1234 ({comm}) {}\n", fields.join(" "))
    }

    #[test]
    fn start_time_with_hostile_comm() {
        for comm in ["sleep", "a b", "x) 1 2 3 (y", ")", "((", ") R 5 ) 7"] {
            assert_eq!(
                parse_start_time(&stat_line(comm)),
                Some(987654),
                "comm {comm:?}"
            );
        }
    }

    #[test]
    fn start_time_of_garbage() {
        assert_eq!(parse_start_time(""), None);
        assert_eq!(parse_start_time("1234 (x) S 1 2"), None);
        assert_eq!(
            parse_start_time(
                "no paren at all 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22"
            ),
            None
        );
        let mut bad = stat_line("x");
        bad = bad.replace("987654", "-1");
        assert_eq!(parse_start_time(&bad), None);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let pid = std::process::id() as i32;
        let a = process_start_time(pid).unwrap();
        assert_eq!(a, process_start_time(pid).unwrap());
        assert!(process_start_time(-5).is_err());
    }

    #[test]
    fn pidfd_wait_and_signal() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id() as i32).unwrap();
        assert!(!pidfd.wait_exit(Duration::from_millis(50)).unwrap());
        pidfd.send_signal(libc::SIGKILL).unwrap();
        assert!(pidfd.wait_exit(Duration::from_secs(10)).unwrap());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // The process is reaped: signalling through the pidfd now fails
        // (ESRCH) instead of hitting whoever reuses the pid.
        assert_eq!(
            pidfd.send_signal(0).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }

    #[test]
    fn mount_namespace_ids() {
        let ino = mount_namespace_inode().unwrap();
        assert!(ino > 0);
        let id = mount_namespace_id().unwrap();
        assert!(id > 0);
        assert_eq!(id, mount_namespace_id().unwrap());
    }

    #[test]
    fn already_in_outer_mount_namespace_is_a_no_op() {
        // The test runner and its ancestors share our namespace, so nothing
        // changes (and no setns runs in this threaded binary).
        assert!(!enter_outer_mount_namespace().unwrap());
    }

    #[test]
    fn fd_numbers_are_reserved_and_inherited_fds_taken_once() {
        let placeholder = std::fs::File::open("/dev/null").unwrap();
        // A number far above anything in use is free: reserved, then freed on drop.
        let reserved = reserve_fd_number(900, placeholder.as_fd()).unwrap().unwrap();
        assert_eq!(reserved.as_raw_fd(), 900);
        assert!(reserve_fd_number(900, placeholder.as_fd()).unwrap().is_none(), "already open");
        drop(reserved);
        assert!(reserve_fd_number(900, placeholder.as_fd()).unwrap().is_some());
        // An open number is taken once; stdio and closed numbers never.
        let probe = reserve_fd_number(901, placeholder.as_fd()).unwrap().unwrap();
        std::mem::forget(probe);
        let first = take_inherited_fd(901);
        assert!(first.is_some());
        assert!(take_inherited_fd(901).is_none(), "a second owner is refused");
        assert!(take_inherited_fd(1).is_none());
        assert!(take_inherited_fd(902).is_none());
    }

    #[test]
    fn parent_of_self_is_the_real_parent() {
        assert_eq!(parent_pid(std::process::id() as i32), Some(nix::unistd::getppid().as_raw()));
    }
}
