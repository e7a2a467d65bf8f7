//! EROFS image metadata: which bytes of a blob must be local before mounting.
//!
//! The model. A file-backed EROFS mount reads two kinds of bytes from its
//! backing file:
//!
//! * **metadata** — the superblock, inode slots (with inline xattrs and
//!   inline/tail-packed data), shared xattrs, chunk index arrays, compression
//!   indexes, the device table — through `erofs_read_metabuf`, straight from
//!   the backing file's page cache. These reads raise **no** fanotify event,
//!   so a missing byte reads as zero and breaks the mount (EINVAL/EUCLEAN).
//! * **file data** — whole blocks of regular files, directories and symlinks,
//!   and compressed pclusters — through the inode's address space
//!   (file-backed I/O), which raises `FAN_PRE_ACCESS` and so can be fetched
//!   lazily.
//!
//! [`walk`] parses the image and returns an [`ImageMap`]:
//! `data_extents`, the regular-file data the kernel will ask for through
//! events, and `required`, everything else (rounded out to 4 KiB pages), which
//! must be made local before mounting. Directory and symlink blocks are
//! counted as required: the walker reads directories anyway, and keeping them
//! local makes path lookups fast. Whatever the walker cannot classify with
//! certainty stays required: fetching too much is safe, missing metadata is not.
//!
//! Reading is round-trip bound, so the walk is pipelined (see `walker`):
//! every inode advances as far as the bytes read so far allow, what all of
//! them still need goes to the [`MetaReader`] as one batch (one multi-range
//! request at the agent), and the walk continues with whichever batch lands
//! first, with no per-level barrier. A tree costs about one round trip per
//! directory level; images whose metadata lies in one run below the first
//! data block cost the head read and one more.
//!
//! The image is untrusted: every offset is computed with checked arithmetic
//! and bounds-checked against the blob size, loops are bounded by
//! [`WalkLimits`], directories reachable twice are rejected, and nothing is
//! allocated from an unchecked size.

pub mod format;
pub mod reader;
mod walker;
pub mod writer;

#[cfg(test)]
mod tests;

use std::ops::Range;

pub use format::Superblock;
pub use walker::{walk, walk_with};

/// Where the walker gets image bytes from (the registry, a local file, ...).
///
/// A reader is synchronous ([`prefetch`](Self::prefetch) fetches before it
/// returns) or pipelined ([`submit`](Self::submit) starts fetches and
/// returns, [`wait`](Self::wait) hands over what arrived); the walk keeps
/// going with whatever it can read while batches are in flight.
pub trait MetaReader {
    /// Fetches ranges the walker is about to read. The ranges are sorted,
    /// disjoint, within the image, never repeat bytes passed before, and
    /// are rounded out to 4 KiB pages; every byte passed ends up in
    /// `ImageMap::required` (or is one guessed run of metadata, see
    /// `ImageMap::contiguous_guess`), so it can be stored and marked present
    /// at once.
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError>;
    /// Reads exactly `buf.len()` bytes at `offset` (only inside ranges
    /// that were said to be readable).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError>;
    /// Starts fetching one batch of ranges (the contract of `prefetch`) and
    /// returns the ranges readable now. The default fetches them at once.
    fn submit(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, WalkError> {
        self.prefetch(ranges)?;
        Ok(ranges.to_vec())
    }
    /// Blocks until at least one submitted batch has arrived whole and
    /// returns the ranges readable since the last call (whole batches, and
    /// maybe bytes fetched around them). Called only while batches are out.
    fn wait(&mut self) -> Result<Vec<Range<u64>>, WalkError> {
        Err(WalkError::Io("internal: nothing is being fetched".into()))
    }
}

/// How the walk may guess (never what it trusts).
#[derive(Clone, Debug)]
pub struct WalkOptions {
    /// Bytes read first, from 0: the superblock's block and what follows
    /// (the agent's sources bring [`crate::remote::PROBE_LEN`] with their
    /// first request, so asking for as much costs nothing).
    pub first_read: u64,
    /// Longest run after the first read asked for at once when that read
    /// suggests the metadata is contiguous (0: never guess).
    pub contiguous_guess_max: u64,
}

impl Default for WalkOptions {
    fn default() -> Self {
        // The contiguous guess asks only for what the first block names as
        // metadata (see `walker::guess_contiguous`: our writer's root directory
        // block ends the run), so it never reaches file data of our images;
        // 64 MiB bounds what a wrong guess on another image can cost.
        WalkOptions { first_read: 64 << 10, contiguous_guess_max: 64 << 20 }
    }
}

/// Caps that bound the work a hostile image can cause.
#[derive(Clone, Debug)]
pub struct WalkLimits {
    /// Distinct inodes visited.
    pub max_inodes: u64,
    /// Directory nesting below the root.
    pub max_depth: u32,
    /// Size of one directory in bytes.
    pub max_dir_size: u64,
    /// Chunk or compression index bytes of one inode.
    pub max_index_bytes: u64,
    /// Distinct shared xattr entries.
    pub max_shared_xattrs: u64,
    /// Total bytes passed to `prefetch`.
    pub max_meta_bytes: u64,
}

impl Default for WalkLimits {
    fn default() -> Self {
        WalkLimits {
            max_inodes: 10_000_000,
            max_depth: 4096,
            max_dir_size: 1 << 30,
            max_index_bytes: 1 << 30,
            max_shared_xattrs: 1_000_000,
            max_meta_bytes: 16 << 30,
        }
    }
}

/// Granularity of `ImageMap::required`: the page cache works in 4 KiB pages,
/// so a page holding any metadata byte must be local as a whole.
pub const PAGE_SIZE: u64 = 4096;

/// The result of a walk: which bytes are lazily fetchable data and which must
/// be local before mounting. Persist it with the cache entry so a later mount
/// of the same blob needs no walk.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageMap {
    pub block_size: u32,
    pub image_size: u64,
    /// Sorted, merged byte ranges of regular-file data that the kernel reads
    /// through file-backed I/O (these raise events). Only whole 4 KiB pages
    /// (the last one may end at `image_size`); disjoint from `required`.
    pub data_extents: Vec<Range<u64>>,
    /// Sorted, merged byte ranges that must be present before mount: the
    /// complement of `data_extents` within `image_size`, rounded out to 4 KiB
    /// pages and clamped to `image_size`.
    pub required: Vec<Range<u64>>,
    pub inodes: u64,
    pub directories: u64,
    pub regular_files: u64,
    #[serde(default)]
    pub symlinks: u64,
    /// Distinct shared xattr entries referenced by inodes.
    #[serde(default)]
    pub shared_xattrs: u64,
    /// Deepest directory level seen (root = 0).
    #[serde(default)]
    pub depth: u32,
    /// Batches the walk handed to its reader (each one request or a few).
    #[serde(default)]
    pub prefetch_calls: u32,
    /// Dependent round trips: the longest chain of batches each of which
    /// needed the one before (the superblock read counts).
    #[serde(default)]
    pub round_trips: u32,
    /// Each regular file's data (page-aligned, sorted by start; overlapping
    /// ones merged, touching ones apart): the extent a miss inside a file
    /// fetches whole. At most 2^21 of them.
    #[serde(default)]
    pub file_extents: Vec<Range<u64>>,
    /// The run `[start, end)` asked for at once as likely contiguous metadata.
    #[serde(default)]
    pub contiguous_guess: Option<[u64; 2]>,
}

impl ImageMap {
    /// The file extent containing `offset`, if any.
    pub fn file_extent(&self, offset: u64) -> Option<Range<u64>> {
        extent_at(&self.file_extents, offset)
    }
}

/// The range of `extents` (sorted by start, disjoint) containing `offset`.
pub fn extent_at(extents: &[Range<u64>], offset: u64) -> Option<Range<u64>> {
    let i = extents.partition_point(|r| r.start <= offset);
    let r = extents.get(i.checked_sub(1)?)?;
    (offset < r.end).then(|| r.clone())
}

impl ImageMap {
    pub fn required_bytes(&self) -> u64 {
        crate::ranges::total_len(&self.required)
    }

    pub fn data_bytes(&self) -> u64 {
        crate::ranges::total_len(&self.data_extents)
    }
}

#[derive(thiserror::Error, Debug)]
pub enum WalkError {
    #[error("not an EROFS image (no EROFS magic at byte 1024)")]
    NotErofs,
    #[error("corrupt EROFS image: {0}")]
    Corrupt(String),
    #[error("unsupported EROFS image: {0}")]
    Unsupported(String),
    #[error("EROFS image exceeds a walk limit: {0}")]
    LimitExceeded(String),
    #[error("reading EROFS metadata: {0}")]
    Io(String),
}

/// Recognizes an EROFS image from its first 4 KiB (at least 1152 bytes) and
/// returns its superblock. Verifies the superblock checksum when the buffer
/// holds the whole first block.
pub fn probe_superblock(first_block: &[u8]) -> Result<Superblock, WalkError> {
    let sb = Superblock::parse(first_block)?;
    sb.verify_checksum(first_block)?;
    Ok(sb)
}
