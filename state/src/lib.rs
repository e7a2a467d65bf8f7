//! The on-disk state of erofs-fanotify, and the one place that knows its layout.
//!
//! Two trees:
//!
//! * the **state dir** (`/run/erofs-fanotify`, or `$EROFS_FANOTIFY_STATE_DIR`): runtime state
//!   that dies with the boot. `mounts/<mnt_id>.json` holds one [`MountRecord`] per mount, keyed
//!   by the mount id from `statx` so that `erofs-umount` finds it by name, never by scanning.
//!   `agents/<key>.{json,sock,lock}` hold the running agent of one cache entry: its
//!   [`AgentRecord`], its control socket and the [`AgentLock`] that makes it unique.
//! * the **cache dir** (`/var/cache/erofs-fanotify`, or `cache_dir=`): data that survives reboots.
//!   One [`CacheEntry`] per blob, `<key>/` with the sparse `blob`, its persisted presence
//!   `bitmap`, `entry.json` ([`EntryMeta`]) and `agent.log`.
//!
//! Every write is atomic (temporary file in the same directory, fsync, rename, fsync of the
//! directory), so a crash leaves either the old or the new file. Everything below the two roots is
//! reached through directory descriptors with `O_NOFOLLOW` and must be ours (owned by us, not
//! writable by group or others): a planted symlink or a foreign entry is refused ([`StateError::Unsafe`]),
//! never followed. The roots themselves may be symlinks (the admin's choice). Everything read back is
//! checked: a corrupt record is a typed error, a torn or mismatched bitmap is discarded
//! ([`LoadedBitmap::Discarded`]) and never trusted, because a wrong "present" bit would hand
//! zeros to a reader.
//!
//! This crate has no `unsafe`; `flock` and `statfs` come from `nix`.

#![forbid(unsafe_code)]

mod agent;
mod bitmap_file;
mod cache_entry;
mod error;
mod fsat;
mod identity;
mod keys;
mod mount_record;
mod paths;
mod resolved;
mod sweep;

pub use agent::{
    read_agent_record, remove_agent_record, write_agent_record, AgentLock, AgentRecord, JournalHold,
};
pub use bitmap_file::{load_bitmap, save_bitmap, BitmapIdentity, LoadedBitmap, BITMAP_BLOCK_SIZE};
pub use cache_entry::{check_cache_filesystem, CacheEntry, CacheFsKind, EntryMeta};
pub use error::StateError;
pub use identity::{parse_proc_stat, AgentIdentity, ProcStat};
pub use keys::{
    cache_key_for_digest, cache_key_for_url, strip_url_userinfo, validate_cache_key,
    validate_digest,
};
pub use mount_record::{
    list_mount_records, read_mount_record, remove_mount_record, write_mount_record, MountRecord,
};
pub use paths::{CacheDir, StateDir};
pub use resolved::{read_resolved_ref, write_resolved_ref, ResolvedRef};
pub use sweep::{journal_held, remove_unheld_journal, restore_agent_log, sweep_agents_dir, SweepPolicy, SweepReport};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
