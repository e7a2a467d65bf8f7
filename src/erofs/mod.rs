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
//! [`walk`] parses the image breadth-first and returns an [`ImageMap`]:
//! `data_extents`, the regular-file data the kernel will ask for through
//! events, and `required`, everything else (rounded out to 4 KiB pages), which
//! must be made local before mounting. Directory and symlink blocks are
//! counted as required: the walker reads directories anyway, and keeping them
//! local makes path lookups fast. Whatever the walker cannot classify with
//! certainty stays required: fetching too much is safe, missing metadata is not.
//!
//! Reading is round-trip bound: each BFS level asks the [`MetaReader`] to
//! prefetch all of its ranges at once (inode slots first, then what the
//! headers showed is needed: the rest of long inodes, index arrays,
//! directory blocks), so a level costs two or three round trips whatever the
//! number of files in it.
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
pub use walker::walk;

/// Where the walker gets image bytes from (the registry, a local file, ...).
pub trait MetaReader {
    /// Called before reads with all byte ranges the walker is about to read in
    /// this round (one BFS level), so the implementation can fetch them from
    /// the network coalesced and in parallel. The ranges are sorted, disjoint,
    /// within the image, never repeat bytes passed before, and (today) are
    /// rounded out to 4 KiB pages; every byte passed ends up in
    /// `ImageMap::required`, so it can be stored and marked present at once.
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError>;
    /// Reads exactly `buf.len()` bytes at `offset` (only inside ranges
    /// previously passed to `prefetch`).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError>;
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
    /// Number of `prefetch` calls the walk made (round trips).
    #[serde(default)]
    pub prefetch_calls: u32,
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
