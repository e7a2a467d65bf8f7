//! When may the agent leave? Only when no superblock can read the cache file.
//!
//! A mount going away is not the superblock going away (bind mounts, copies
//! in namespaces cloned later, lazy umounts with open files). The truth comes
//! from the mark: one FAN_OPEN when a superblock opens the cache file at
//! mount(2), one FAN_CLOSE_NOWRITE when its last reference drops; and a live
//! superblock has `/sys/fs/erofs/erofs-N`. Records of mounts whose superblock
//! is gone are removed. The agent leaves when no superblock holds the file
//! open, no mount is recorded, and no front end holds a prepare lease.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use erofs_fanotify_state::{MountRecord, StateDir};
use tokio::sync::Notify;

/// How long a fresh agent waits for its first front end before leaving.
const STARTUP_GRACE: Duration = Duration::from_secs(30);

pub struct Lifecycle {
    inner: Mutex<Inner>,
    state: StateDir,
    sysfs_root: PathBuf,
    /// Woken whenever the exit condition may have changed.
    pub changed: Notify,
}

struct Inner {
    open_files: i64,
    leases: u32,
    mounts: HashMap<u64, MountRecord>,
    started: Instant,
    ever_prepared: bool,
    overflowed: bool,
}

impl Lifecycle {
    pub fn new(state: StateDir) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            inner: Mutex::new(Inner {
                open_files: 0,
                leases: 0,
                mounts: HashMap::new(),
                started: Instant::now(),
                ever_prepared: false,
                overflowed: false,
            }),
            state,
            sysfs_root: PathBuf::from("/sys/fs/erofs"),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub fn on_open(&self) {
        self.lock().open_files += 1;
    }

    pub fn on_close(&self) {
        {
            let mut inner = self.lock();
            inner.open_files = (inner.open_files - 1).max(0);
        }
        self.reconcile();
    }

    /// The event queue overflowed: open/close counting is no longer exact,
    /// so from now on only /sys and records decide.
    pub fn on_overflow(&self) {
        let mut inner = self.lock();
        inner.overflowed = true;
        inner.open_files = 0;
    }

    /// Nobody is coming to prepare a mount: leave as soon as nothing else holds us.
    pub fn end_startup_grace(&self) {
        self.lock().ever_prepared = true;
        self.changed.notify_one();
    }

    pub fn lease(self: &Arc<Self>) -> Lease {
        {
            let mut inner = self.lock();
            inner.leases += 1;
            inner.ever_prepared = true;
        }
        Lease { lifecycle: Arc::clone(self) }
    }

    pub fn attach(&self, record: MountRecord) -> Result<(), String> {
        erofs_fanotify_state::write_mount_record(&self.state, &record)
            .map_err(|e| format!("cannot write the mount record: {e}"))?;
        self.lock().mounts.insert(record.mnt_id, record);
        Ok(())
    }

    /// A restarted worker takes over the records of its cache entry,
    /// rewriting them with its own identity.
    pub fn adopt_records(&self, cache_key: &str, identity: erofs_fanotify_state::AgentIdentity) {
        let records = match erofs_fanotify_state::list_mount_records(&self.state) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list mount records");
                return;
            }
        };
        for mut record in records.into_iter().flatten().filter(|r| r.cache_key == cache_key) {
            record.agent = identity;
            if let Err(e) = self.attach(record) {
                tracing::warn!(error = %e, "cannot adopt a mount record");
            }
        }
        self.lock().ever_prepared = true;
    }

    /// A front end unmounted `mnt_id`; returns how many mounts remain recorded.
    pub fn unmounted(&self, mnt_id: u64) -> usize {
        self.forget(mnt_id);
        self.reconcile();
        self.lock().mounts.len()
    }

    fn forget(&self, mnt_id: u64) {
        let removed = self.lock().mounts.remove(&mnt_id);
        if removed.is_some() {
            if let Err(e) = erofs_fanotify_state::remove_mount_record(&self.state, mnt_id) {
                tracing::warn!(mnt_id, error = %e, "cannot remove mount record");
            }
        }
    }

    /// Drops records of mounts whose superblock no longer exists.
    pub fn reconcile(&self) {
        let gone: Vec<u64> = {
            let inner = self.lock();
            inner
                .mounts
                .values()
                .filter(|r| !superblock_alive(&self.sysfs_root, &r.sysfs_name))
                .map(|r| r.mnt_id)
                .collect()
        };
        for mnt_id in gone {
            tracing::info!(mnt_id, "mount's superblock is gone; removing its record");
            self.forget(mnt_id);
        }
        self.changed.notify_one();
    }

    pub fn may_exit(&self) -> bool {
        let inner = self.lock();
        let started = inner.ever_prepared || inner.started.elapsed() > STARTUP_GRACE;
        started && inner.leases == 0 && inner.mounts.is_empty() && inner.open_files <= 0
    }

    pub fn mounts(&self) -> Vec<MountRecord> {
        self.lock().mounts.values().cloned().collect()
    }

    pub fn superblocks(&self) -> u64 {
        let inner = self.lock();
        let mut names: Vec<&str> = inner.mounts.values().map(|r| r.sysfs_name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len() as u64
    }

    pub fn open_files(&self) -> i64 {
        self.lock().open_files
    }
}

fn superblock_alive(root: &Path, sysfs_name: &str) -> bool {
    // A malformed name must not make us think a mount is gone.
    if sysfs_name.is_empty() || sysfs_name.contains('/') || sysfs_name.contains("..") {
        return true;
    }
    root.join(sysfs_name).exists()
}

/// Held by a front end between `prepare` and `attach` (or its disconnect).
pub struct Lease {
    lifecycle: Arc<Lifecycle>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut inner = self.lifecycle.lock();
            inner.leases = inner.leases.saturating_sub(1);
        }
        self.lifecycle.changed.notify_one();
    }
}
