//! An EROFS writer made for lazy mounts.
//!
//! # Input model
//!
//! A [`Tree`] of inodes (arena + directories mapping names to [`InodeId`]s):
//! each [`Inode`] has [`Metadata`] (permissions, uid, gid, mtime with
//! nanoseconds), xattrs by full name, and a [`Kind`] (directory, regular file,
//! symlink, char/block device with major/minor, fifo, socket). A hard link is
//! a second name for the same id; the writer computes `nlink`. Trees are
//! built by the directory walker and the tar reader (`crate::build`), or
//! programmatically ([`Tree::insert_path`], [`Tree::hard_link`],
//! [`Tree::remove_path`] apply archive/overlay entries; merged layers and
//! S3 listings build trees the same way).
//!
//! A regular file's bytes ([`FileData`]) come from:
//! * memory ([`FileData::Bytes`]);
//! * a local file, by path + offset (+ the size of the inode), optionally
//!   with the data ranges of a sparse source ([`FileData::Local`]); read in
//!   pieces through a [`FileReader`] during the write pass, never whole;
//! * an **external reference**, data the writer does not write:
//!   [`FileData::Chunked`] — a chunk-based inode whose chunk index entries
//!   carry a device id and a block address (tar index: device 1 = the tar;
//!   merged layers: device k = layer k) — or [`FileData::FlatAddress`] — a
//!   flat-plain inode at any block address of the flat address space, also
//!   beyond the image's own end (flatdev, DESIGN §7) — or
//!   [`FileData::FlatTail`] (external blocks + an inline tail) or
//!   [`FileData::Compressed`] (an lz4 compression map copied from another
//!   image, its block addresses moved into this one's flat space): what a
//!   merge of layers makes of their files.
//!
//! [`WriterOptions`] add a device table ([`Device`]: tag, blocks, uniaddr —
//! only the 32-bit halves count on Linux 6.18, so they are `u32`), the block
//! size (4096 normally, 512 for tar indexes), lz4 compression, the order in
//! which file data is laid out, a fixed UUID and epoch for reproducible
//! images, and `metadata_only` (refuse any local data: every file external).
//!
//! # Layout
//!
//! [`plan`] computes everything — every inode's slot, every directory block,
//! every data block, the compressed size of every lz4 extent — and
//! [`Plan::write`] writes it. Everything the kernel reads without a
//! fanotify event is one contiguous run at the start of the image:
//!
//! ```text
//! [0..1024 zero][superblock][lz4 cfgs][device table][root inode]
//! [shared xattrs][inode records: inode + inline xattrs + inline tail |
//!  chunk index | lz4 map header + lcluster indexes]...
//! [directory blocks][symlink blocks]  <- metadata_end (block aligned)
//! [file data: the `data_order` files first, in that order, then the rest]
//! ```
//!
//! `meta_blkaddr` and `xattr_blkaddr` are 0, so inodes and shared xattrs
//! pack right after the superblock. Inode records are 32-byte aligned;
//! one holding inline data never crosses a block boundary. Compact (32-byte)
//! inodes are used when every field fits and the mtime equals the epoch
//! (the most common mtime of the tree unless given), extended ones otherwise.
//! Same tree + same options → the same bytes.

mod compress;
mod dir;
mod image;
pub mod ondisk;
mod tree;
pub mod xattr;

#[cfg(test)]
mod tests;

use std::io;
use std::path::Path;

pub use image::{plan, plan_with_progress, write_image, ImageSummary, Plan, Progress};
pub use tree::{
    check_name, path_components, Chunk, ChunkedData, CompressedData, FileData, Inode, InodeId, Kind, Metadata,
    Tree, NAME_MAX,
};

/// Errors of planning or writing an image.
#[derive(thiserror::Error, Debug)]
pub enum WriteError {
    /// The input cannot be written as EROFS (a bad name, a value too large,
    /// an address out of range, ...).
    #[error("{0}")]
    Invalid(String),
    /// Reading a source file or writing the image failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A source changed between the layout pass and the write pass.
    #[error("{0} changed while the image was being built")]
    SourceChanged(String),
}

impl WriteError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        WriteError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Reads the bytes of [`FileData::Local`] sources.
pub trait FileReader: Sync {
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadAt + '_>>;
}

/// Positioned reads of one open source.
pub trait ReadAt {
    /// Fills `buf` from `offset`; a short source is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// A [`FileReader`] for trees without local files.
pub struct NoFiles;

impl FileReader for NoFiles {
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadAt + '_>> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no source files available (asked for {})", path.display()),
        ))
    }
}

/// File data compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    /// lz4, in extents of `pcluster_bytes` (a multiple of the block size,
    /// at most 1 MiB) of uncompressed input.
    Lz4 { pcluster_bytes: u32 },
}

/// An extra device of the device table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Identifies the blob (e.g. a digest); may be all zeros.
    pub tag: [u8; 64],
    pub blocks: u32,
    /// Its first block in the flat address space.
    pub uniaddr: u32,
}

#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// log2 of the block size: 9 (512 B, tar indexes) to 12 (4 KiB).
    pub block_bits: u8,
    pub compression: Compression,
    pub uuid: [u8; 16],
    /// Ignore `uuid` and derive one from the metadata (sha256 of the
    /// metadata area written with a zero UUID): reproducible, and distinct
    /// for distinct trees.
    pub derive_uuid: bool,
    pub volume_name: [u8; 16],
    /// The time compact inodes carry (seconds, nanoseconds); `None`: the
    /// most common mtime of the tree.
    pub epoch: Option<(i64, u32)>,
    /// Files whose data comes first, in this order (others follow in tree order).
    pub data_order: Vec<InodeId>,
    pub devices: Vec<Device>,
    /// Tail-pack the last partial block of files, directories and symlinks
    /// into their inode records.
    pub inline_data: bool,
    /// Share an xattr (name and value) between inodes when at least this many
    /// carry it; 0 never shares.
    pub shared_xattr_min_refs: u32,
    /// Refuse local file data: every regular file must be external or empty.
    pub metadata_only: bool,
    /// log2 of the chunk size for sparse local sources (holes become chunk holes).
    pub sparse_chunk_bits: u8,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            block_bits: 12,
            compression: Compression::None,
            uuid: [0; 16],
            derive_uuid: false,
            volume_name: [0; 16],
            epoch: None,
            data_order: Vec::new(),
            devices: Vec::new(),
            inline_data: true,
            shared_xattr_min_refs: 2,
            metadata_only: false,
            sparse_chunk_bits: 20,
        }
    }
}

/// The pcluster size of `--compress lz4`.
pub const DEFAULT_LZ4_PCLUSTER: u32 = 64 * 1024;
