//! The writer's input: a tree of inodes, built by a directory walker, a tar
//! reader, or programmatically (S3 listings, merged layers).
//!
//! Inodes live in an arena ([`Tree::add`] returns an [`InodeId`]); a
//! directory maps names to ids, so a hard link is simply a second name for
//! the same id and `nlink` is computed by the writer from the names that
//! reach an inode. Inodes that no name reaches any more (an entry replaced
//! or removed) are not written.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use super::WriteError;

/// Longest file name EROFS stores.
pub const NAME_MAX: usize = 255;

/// An inode of a [`Tree`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeId(pub(crate) u32);

impl InodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Owner, permissions and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the file
    /// type comes from [`Kind`].
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch (negative before 1970).
    pub mtime: i64,
    pub mtime_nsec: u32,
}

impl Metadata {
    pub fn new(permissions: u16, uid: u32, gid: u32, mtime: i64, mtime_nsec: u32) -> Self {
        Metadata {
            permissions: permissions & 0o7777,
            uid,
            gid,
            mtime,
            mtime_nsec,
        }
    }

    /// root-owned, mtime 0.
    pub fn with_permissions(permissions: u16) -> Self {
        Metadata::new(permissions, 0, 0, 0, 0)
    }
}

/// Where one chunk of a chunk-based file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Reads as zeros.
    Hole,
    /// Block `block` of device `device` (0 = the primary device, whose
    /// addresses are flat addresses on a flatdev mount; k = device table slot k).
    At { device: u16, block: u64 },
}

/// The data of a chunk-based file that lives outside the image (in a tar,
/// another layer, another blob): one index entry per chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedData {
    /// log2 of the chunk size; at least the block size bits, at most 31 above them.
    pub chunk_bits: u8,
    /// `ceil(size / chunk size)` entries.
    pub chunks: Vec<Chunk>,
}

impl ChunkedData {
    /// Data stored contiguously from `block` on `device`, indexed the way
    /// `mkfs.erofs --tar=i` does: the smallest power-of-two chunk that holds
    /// the whole file (so one chunk up to 2^31 blocks).
    pub fn contiguous(device: u16, block: u64, size: u64, block_bits: u8) -> Result<Self, WriteError> {
        let mut chunk_bits = if size <= 1 {
            0
        } else {
            (64 - (size - 1).leading_zeros()) as u8
        };
        chunk_bits = chunk_bits.clamp(block_bits, block_bits + 31);
        let chunk_size = 1u64 << chunk_bits;
        let count = size.div_ceil(chunk_size);
        let step = 1u64 << (chunk_bits - block_bits);
        let mut chunks = Vec::new();
        for i in 0..count {
            let b = i
                .checked_mul(step)
                .and_then(|o| block.checked_add(o))
                .ok_or_else(|| WriteError::Invalid("chunk block address overflows".into()))?;
            chunks.push(Chunk::At { device, block: b });
        }
        Ok(ChunkedData { chunk_bits, chunks })
    }
}

/// Where a regular file's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileData {
    /// No bytes (size 0).
    Empty,
    /// Bytes held in memory (small files, generated content).
    Bytes(Arc<[u8]>),
    /// `size` bytes of a local file starting at `offset` (a file of a source
    /// tree, a member of an uncompressed tar, a spool file). Read in the
    /// write pass, never held in memory.
    Local {
        path: PathBuf,
        offset: u64,
        /// For sparse sources: the byte ranges (relative to `offset`) that
        /// hold data; everything else reads as zeros and becomes holes of a
        /// chunk-based inode. `None`: all of it is data.
        data_ranges: Option<Vec<Range<u64>>>,
    },
    /// External, chunk-based: chunk index entries with device ids. Nothing
    /// of it is written by the writer.
    Chunked(ChunkedData),
    /// External, flat: `ceil(size / block size)` blocks from block `block`
    /// of the flat address space (may lie beyond the image's own end).
    FlatAddress { block: u64 },
    /// External whole blocks and a tail held here: the first
    /// `size - tail.len()` bytes (a multiple of the block size) are the
    /// blocks from flat block `block`, the rest is `tail` — what a
    /// FLAT_INLINE file of another image becomes when its blocks stay where
    /// they are. Written FLAT_INLINE (the tail in the inode record) when it
    /// fits, else chunk-based with the tail in a local block (refused with
    /// `metadata_only`).
    FlatTail { block: u64, tail: Arc<[u8]> },
    /// External, compressed: a compression map written as given (the data
    /// stays where its block addresses point); see [`CompressedData`].
    Compressed(Arc<CompressedData>),
}

/// A compressed file's map, ready to be written into an inode: lz4
/// pclusters anywhere in the flat address space, described by full
/// (8-byte) lcluster indexes whose block addresses are already this
/// image's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedData {
    /// `struct z_erofs_map_header` (advise bits, algorithm, lcluster bits,
    /// inline size); the `COMPACTED_2B`/`EXTENTS` bit must be clear.
    pub header: [u8; 8],
    /// One `struct z_erofs_lcluster_index` per lcluster.
    pub indexes: Vec<[u8; 8]>,
    /// The tail-packed pcluster (`header`'s inline size bytes), kept after
    /// the indexes in the inode record.
    pub inline: Option<Arc<[u8]>>,
    /// `i_u`: blocks of compressed data.
    pub compressed_blocks: u32,
    /// Largest pcluster, in blocks (the superblock's lz4 configuration).
    pub max_pcluster_blocks: u32,
}

impl FileData {
    /// Whether the writer stores this data in the image itself.
    pub fn is_local(&self) -> bool {
        matches!(self, FileData::Bytes(_) | FileData::Local { .. })
    }
}

/// What an inode is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory(BTreeMap<Vec<u8>, InodeId>),
    Regular { size: u64, data: FileData },
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl Kind {
    pub fn empty_dir() -> Self {
        Kind::Directory(BTreeMap::new())
    }

    /// `S_IFMT` bits.
    pub fn format_bits(&self) -> u16 {
        (match self {
            Kind::Directory(_) => libc::S_IFDIR,
            Kind::Regular { .. } => libc::S_IFREG,
            Kind::Symlink(_) => libc::S_IFLNK,
            Kind::CharDevice { .. } => libc::S_IFCHR,
            Kind::BlockDevice { .. } => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        }) as u16
    }

    pub fn is_dir(&self) -> bool {
        matches!(self, Kind::Directory(_))
    }

    /// The overlayfs whiteout: a character device 0:0.
    pub fn is_whiteout(&self) -> bool {
        matches!(self, Kind::CharDevice { major: 0, minor: 0 })
    }
}

/// One inode: metadata, extended attributes (full names such as
/// `user.foo`, `security.capability`, `system.posix_acl_access`) and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub meta: Metadata,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub kind: Kind,
}

impl Inode {
    pub fn new(meta: Metadata, kind: Kind) -> Self {
        Inode {
            meta,
            xattrs: BTreeMap::new(),
            kind,
        }
    }

    pub fn dir(meta: Metadata) -> Self {
        Inode::new(meta, Kind::empty_dir())
    }

    pub fn file(meta: Metadata, size: u64, data: FileData) -> Self {
        Inode::new(meta, Kind::Regular { size, data })
    }

    pub fn bytes(meta: Metadata, bytes: &[u8]) -> Self {
        let data = if bytes.is_empty() {
            FileData::Empty
        } else {
            FileData::Bytes(Arc::from(bytes))
        };
        Inode::file(meta, bytes.len() as u64, data)
    }

    pub fn symlink(meta: Metadata, target: &[u8]) -> Self {
        Inode::new(meta, Kind::Symlink(target.to_vec()))
    }

    pub fn with_xattr(mut self, name: &[u8], value: &[u8]) -> Self {
        self.xattrs.insert(name.to_vec(), value.to_vec());
        self
    }
}

/// A directory tree. The root is always a directory.
#[derive(Clone, Debug)]
pub struct Tree {
    inodes: Vec<Inode>,
}

/// Checks one path component: non-empty, no `/` or NUL, not `.`/`..`, at
/// most 255 bytes.
pub fn check_name(name: &[u8]) -> Result<(), WriteError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.is_empty() || name == b"." || name == b".." {
        return Err(WriteError::Invalid(format!("invalid file name {:?}", shown())));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(WriteError::Invalid(format!(
            "file name {:?} contains '/' or NUL",
            shown()
        )));
    }
    if name.len() > NAME_MAX {
        return Err(WriteError::Invalid(format!(
            "file name of {} bytes is longer than {NAME_MAX}: {:?}",
            name.len(),
            shown()
        )));
    }
    Ok(())
}

/// Splits a relative path into components, ignoring empty ones and `.`;
/// refuses `..`.
pub fn path_components(path: &[u8]) -> Result<Vec<&[u8]>, WriteError> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            return Err(WriteError::Invalid(format!(
                "path {:?} has a '..' component",
                String::from_utf8_lossy(path)
            )));
        }
        check_name(c)?;
        out.push(c);
    }
    Ok(out)
}

impl Tree {
    /// A tree holding only a root directory with `root_meta`.
    pub fn new(root_meta: Metadata) -> Self {
        Tree {
            inodes: vec![Inode::dir(root_meta)],
        }
    }

    pub fn root(&self) -> InodeId {
        InodeId(0)
    }

    /// Adds an inode that no name reaches yet; [`Tree::link`] names it.
    pub fn add(&mut self, inode: Inode) -> InodeId {
        let id = InodeId(self.inodes.len() as u32);
        self.inodes.push(inode);
        id
    }

    pub fn get(&self, id: InodeId) -> &Inode {
        &self.inodes[id.index()]
    }

    pub fn get_mut(&mut self, id: InodeId) -> &mut Inode {
        &mut self.inodes[id.index()]
    }

    /// Number of inodes in the arena (reachable or not).
    pub fn arena_len(&self) -> usize {
        self.inodes.len()
    }

    fn dir_entries(&self, dir: InodeId) -> Result<&BTreeMap<Vec<u8>, InodeId>, WriteError> {
        match &self.get(dir).kind {
            Kind::Directory(entries) => Ok(entries),
            _ => Err(WriteError::Invalid("not a directory".into())),
        }
    }

    fn dir_entries_mut(
        &mut self,
        dir: InodeId,
    ) -> Result<&mut BTreeMap<Vec<u8>, InodeId>, WriteError> {
        match &mut self.get_mut(dir).kind {
            Kind::Directory(entries) => Ok(entries),
            _ => Err(WriteError::Invalid("not a directory".into())),
        }
    }

    /// The entry `name` of directory `dir`.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        self.dir_entries(dir).ok()?.get(name).copied()
    }

    /// The inode at a relative path (`a/b/c`; empty = the root).
    pub fn lookup_path(&self, path: &[u8]) -> Option<InodeId> {
        let mut cur = self.root();
        for c in path_components(path).ok()? {
            cur = self.lookup(cur, c)?;
        }
        Some(cur)
    }

    /// Names `child` as `name` in `dir`, replacing (and returning) what had
    /// that name. A directory may have only one name.
    pub fn link(&mut self, dir: InodeId, name: &[u8], child: InodeId) -> Result<Option<InodeId>, WriteError> {
        check_name(name)?;
        if child.index() >= self.inodes.len() || child == self.root() {
            return Err(WriteError::Invalid("link to an unknown inode or the root".into()));
        }
        Ok(self.dir_entries_mut(dir)?.insert(name.to_vec(), child))
    }

    /// Removes the entry `name` of `dir`.
    pub fn unlink(&mut self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        self.dir_entries_mut(dir).ok()?.remove(name)
    }

    /// The directory at `path`, creating missing directories with `meta`.
    /// A non-directory in the way is replaced by a directory.
    pub fn mkdir_p(&mut self, path: &[u8], meta: Metadata) -> Result<InodeId, WriteError> {
        let mut cur = self.root();
        for c in path_components(path)? {
            cur = match self.lookup(cur, c) {
                Some(id) if self.get(id).kind.is_dir() => id,
                _ => {
                    let id = self.add(Inode::dir(meta));
                    self.link(cur, c, id)?;
                    id
                }
            };
        }
        Ok(cur)
    }

    /// Inserts `inode` at `path` (parents created with `parent_meta`), the
    /// way an archive entry is applied: an existing entry is replaced, except
    /// that a directory over a directory keeps the old one's entries (only
    /// metadata and xattrs change). An empty path (or `.`) sets the root's
    /// metadata. Returns the id now at `path`.
    pub fn insert_path(
        &mut self,
        path: &[u8],
        inode: Inode,
        parent_meta: Metadata,
    ) -> Result<InodeId, WriteError> {
        let comps = path_components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            if !inode.kind.is_dir() {
                return Err(WriteError::Invalid("the root must be a directory".into()));
            }
            let root = self.root();
            let r = self.get_mut(root);
            r.meta = inode.meta;
            r.xattrs = inode.xattrs;
            return Ok(root);
        };
        let mut parent = self.root();
        for c in parents {
            parent = match self.lookup(parent, c) {
                Some(id) if self.get(id).kind.is_dir() => id,
                _ => {
                    let id = self.add(Inode::dir(parent_meta));
                    self.link(parent, c, id)?;
                    id
                }
            };
        }
        if let Some(existing) = self.lookup(parent, last) {
            if self.get(existing).kind.is_dir() && inode.kind.is_dir() {
                let e = self.get_mut(existing);
                e.meta = inode.meta;
                e.xattrs = inode.xattrs;
                return Ok(existing);
            }
        }
        let id = self.add(inode);
        self.link(parent, last, id)?;
        Ok(id)
    }

    /// Makes `path` another name of the inode at `target` (a hard link).
    /// Directories cannot be hard-linked.
    pub fn hard_link(&mut self, path: &[u8], target: &[u8], parent_meta: Metadata) -> Result<InodeId, WriteError> {
        let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        let id = self.lookup_path(target).ok_or_else(|| {
            WriteError::Invalid(format!(
                "hard link {:?} to {:?}, which does not exist",
                shown(path),
                shown(target)
            ))
        })?;
        if self.get(id).kind.is_dir() {
            return Err(WriteError::Invalid(format!(
                "hard link {:?} to the directory {:?}",
                shown(path),
                shown(target)
            )));
        }
        let comps = path_components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(WriteError::Invalid("a hard link cannot replace the root".into()));
        };
        let mut parent = self.root();
        for c in parents {
            parent = match self.lookup(parent, c) {
                Some(d) if self.get(d).kind.is_dir() => d,
                _ => {
                    let d = self.add(Inode::dir(parent_meta));
                    self.link(parent, c, d)?;
                    d
                }
            };
        }
        self.link(parent, last, id)?;
        Ok(id)
    }

    /// Removes the entry at `path`; returns whether there was one.
    pub fn remove_path(&mut self, path: &[u8]) -> Result<bool, WriteError> {
        let comps = path_components(path)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(WriteError::Invalid("cannot remove the root".into()));
        };
        let mut parent = self.root();
        for c in parents {
            match self.lookup(parent, c) {
                Some(d) if self.get(d).kind.is_dir() => parent = d,
                _ => return Ok(false),
            }
        }
        Ok(self.unlink(parent, last).is_some())
    }

    /// Reachable inodes in breadth-first order (root first, each directory's
    /// entries in name order), each once, with the number of names reaching
    /// it (directories: 2 + subdirectories), and each directory's parent.
    /// Fails if a directory is reachable twice.
    pub fn reachable(&self) -> Result<Reachable, WriteError> {
        let n = self.inodes.len();
        let mut order = Vec::new();
        let mut seen = vec![false; n];
        let mut names = vec![0u64; n];
        let mut parent = vec![InodeId(0); n];
        let root = self.root();
        seen[0] = true;
        order.push(root);
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
            i += 1;
            if let Kind::Directory(entries) = &self.get(id).kind {
                for child in entries.values() {
                    let c = child.index();
                    if c >= n || *child == root {
                        return Err(WriteError::Invalid("a directory entry names the root or an unknown inode".into()));
                    }
                    if self.get(*child).kind.is_dir() {
                        if seen[c] {
                            return Err(WriteError::Invalid(
                                "a directory is reachable by two names".into(),
                            ));
                        }
                        parent[c] = id;
                        // The subdirectory's `..`.
                        names[id.index()] += 1;
                    } else {
                        names[c] += 1;
                    }
                    if !seen[c] {
                        seen[c] = true;
                        order.push(*child);
                    }
                }
            }
        }
        // A directory's own entry in its parent and its `.`.
        for id in &order {
            if self.get(*id).kind.is_dir() {
                names[id.index()] += 2;
            }
        }
        Ok(Reachable {
            order,
            nlink: names,
            parent,
        })
    }
}

/// See [`Tree::reachable`].
pub struct Reachable {
    pub order: Vec<InodeId>,
    /// Indexed by `InodeId::index`.
    pub nlink: Vec<u64>,
    /// Indexed by `InodeId::index` (directories only; the root's is itself).
    pub parent: Vec<InodeId>,
}
