//! Reads a whole EROFS image into a tree: every inode with its owner, mode,
//! times and xattrs, every directory's entries, symlink targets, and where
//! each regular file's data lives (flat blocks, an inline tail, chunk
//! indexes with device ids, or an lz4 compression map).
//!
//! The metadata walker ([`super::walk`]) answers "which bytes must be local";
//! this answers "what is in the image", for merging layers (`crate::merge`).
//! It reads through [`ImageBytes`], random access to bytes already at hand
//! (the walk's `required` ranges hold every byte read here), so it makes no
//! round trips of its own. The image is untrusted: the same checked
//! arithmetic, bounds and [`WalkLimits`] as the walker.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;

use bytes::Bytes;

use super::format::{
    self, align_up, feature, for_each_dirent, xattr_entry_size, ChunkLayout, ChunkTarget, DataLayout,
    DeviceSlot, FileKind, IndexBytes, InodeHeader, Superblock, ZIndexLayout, ZMapHeader,
    COMPACT_INODE_SIZE, EXTENDED_INODE_SIZE, LCLUSTER_TYPE_NONHEAD,
};
use super::{WalkError, WalkLimits};

/// Random access to image bytes that are already local.
pub trait ImageBytes {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; bytes that are not at hand are an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError>;
}

impl ImageBytes for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let start = usize::try_from(offset).map_err(|_| past(offset, buf.len()))?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| past(offset, buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn past(offset: u64, len: usize) -> WalkError {
    WalkError::Corrupt(format!("read {offset}+{len} past the end of the image"))
}

/// Some ranges of an image held in memory (what a metadata walk fetched).
#[derive(Default, Clone, Debug)]
pub struct SparseImage {
    size: u64,
    /// start -> bytes; disjoint.
    pieces: BTreeMap<u64, Bytes>,
}

impl SparseImage {
    pub fn new(size: u64) -> SparseImage {
        SparseImage { size, pieces: BTreeMap::new() }
    }

    /// Adds bytes at `offset` (ranges overlapping earlier ones are trimmed).
    pub fn insert(&mut self, offset: u64, bytes: Bytes) {
        let mut start = offset;
        let mut bytes = bytes;
        // Trim what an earlier piece already covers.
        if let Some((&s, b)) = self.pieces.range(..=start).next_back() {
            let end = s + b.len() as u64;
            if end > start {
                let skip = (end - start).min(bytes.len() as u64) as usize;
                bytes = bytes.slice(skip..);
                start += skip as u64;
            }
        }
        while !bytes.is_empty() {
            let end = start + bytes.len() as u64;
            match self.pieces.range(start..end).next() {
                Some((&s, b)) => {
                    let b_end = s + b.len() as u64;
                    if s > start {
                        self.pieces.insert(start, bytes.slice(..(s - start) as usize));
                    }
                    let skip = (b_end.min(end) - start) as usize;
                    bytes = bytes.slice(skip..);
                    start += skip as u64;
                }
                None => {
                    self.pieces.insert(start, bytes);
                    return;
                }
            }
        }
    }

    /// The parts of `wanted` not held yet (sorted, disjoint input).
    pub fn missing(&self, wanted: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for w in wanted {
            let mut pos = w.start;
            if let Some((&s, b)) = self.pieces.range(..=pos).next_back() {
                pos = pos.max(s + b.len() as u64);
            }
            if pos >= w.end {
                continue;
            }
            for (&s, b) in self.pieces.range(pos..w.end) {
                if s > pos {
                    out.push(pos..s);
                }
                pos = pos.max(s + b.len() as u64);
            }
            if pos < w.end {
                out.push(pos..w.end);
            }
        }
        out
    }

    /// The pieces held, in order.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        self.pieces.iter().map(|(&s, b)| (s, b))
    }

    pub fn held_bytes(&self) -> u64 {
        self.pieces.values().map(|b| b.len() as u64).sum()
    }
}

impl ImageBytes for SparseImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| past(offset, buf.len()))?;
        if end > self.size {
            return Err(past(offset, buf.len()));
        }
        let mut pos = offset;
        while pos < end {
            let (s, b) = self
                .pieces
                .range(..=pos)
                .next_back()
                .filter(|(s, b)| **s + b.len() as u64 > pos)
                .ok_or_else(|| WalkError::Io(format!("metadata byte {pos} was not fetched")))?;
            let from = (pos - s) as usize;
            let n = (b.len() - from).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&b[from..from + n]);
            pos += n as u64;
        }
        Ok(())
    }
}

/// An image read whole. Inodes are keyed by nid; a hard link is one nid
/// named by several directory entries.
#[derive(Clone, Debug)]
pub struct ImageTree {
    pub sb: Superblock,
    pub devices: Vec<DeviceSlot>,
    pub root: u64,
    pub inodes: HashMap<u64, TreeInode>,
}

impl ImageTree {
    pub fn block_bits(&self) -> u8 {
        self.sb.blkszbits
    }

    pub fn get(&self, nid: u64) -> Option<&TreeInode> {
        self.inodes.get(&nid)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeInode {
    pub nid: u64,
    /// `i_mode`: type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    /// Full names (`user.x`, `trusted.overlay.opaque`, `system.posix_acl_access`).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub body: TreeBody,
}

impl TreeInode {
    pub fn permissions(&self) -> u16 {
        self.mode & 0o7777
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeBody {
    /// Entries other than `.` and `..`, in on-disk (name) order.
    Directory(Vec<DirEntry>),
    Regular { size: u64, data: FileMap },
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

/// Where a regular file's bytes are, in the image's own address space
/// (block numbers of its block size; device 0 addresses are flat).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileMap {
    /// Size 0.
    Empty,
    /// FLAT_PLAIN: `ceil(size / block size)` blocks from `block`.
    Flat { block: u64 },
    /// FLAT_INLINE: `(size - tail.len()) / block size` blocks from `block`
    /// (`None` when there are none), then `tail` (held in the inode).
    Inline { block: Option<u64>, tail: Vec<u8> },
    /// CHUNK_BASED: one target per chunk of `2^chunk_bits` bytes.
    Chunked { chunk_bits: u32, chunks: Vec<ChunkTarget> },
    /// COMPRESSED_FULL or _COMPACT, as full (8-byte) lcluster indexes.
    Compressed(Box<CompressedMap>),
}

/// A compressed file's map, held so it can be written again elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedMap {
    /// The `z_erofs_map_header` as stored.
    pub header: [u8; 8],
    /// The image stored compact indexes (converted to full ones here; the
    /// header's `COMPACTED_2B` bit is meaningless for full indexes).
    pub was_compact: bool,
    pub lclusterbits: u8,
    /// `i_u`: blocks of compressed data.
    pub compressed_blocks: u32,
    /// One full lcluster index per lcluster (`struct z_erofs_lcluster_index`).
    pub indexes: Vec<[u8; 8]>,
    /// The tail-packed (inline) pcluster, if any, and the lcluster heading it.
    pub inline: Option<(u64, Vec<u8>)>,
    /// Largest pcluster in blocks (for the lz4 configuration).
    pub max_pcluster_blocks: u32,
}

const Z_EROFS_LI_D0_CBLKCNT: u16 = 1 << 11;

impl CompressedMap {
    /// The lcluster heading the inline pcluster, whose block address means nothing.
    pub fn inline_head(&self) -> Option<u64> {
        self.inline.as_ref().map(|(lcn, _)| *lcn)
    }
}

/// A full lcluster index of a HEAD lcluster (PLAIN, HEAD1, HEAD2).
pub fn full_head_index(kind: u8, clusterofs: u16, blkaddr: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..2].copy_from_slice(&u16::from(kind & 3).to_le_bytes());
    b[2..4].copy_from_slice(&clusterofs.to_le_bytes());
    b[4..8].copy_from_slice(&blkaddr.to_le_bytes());
    b
}

/// A full lcluster index of a NONHEAD lcluster: `delta0` back to its head
/// (or, with `cblkcnt`, the pcluster's block count), `delta1` forward.
pub fn full_nonhead_index(delta0: u16, cblkcnt: Option<u16>, delta1: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..2].copy_from_slice(&u16::from(LCLUSTER_TYPE_NONHEAD).to_le_bytes());
    let d0 = match cblkcnt {
        Some(n) => Z_EROFS_LI_D0_CBLKCNT | n,
        None => delta0,
    };
    b[4..6].copy_from_slice(&d0.to_le_bytes());
    b[6..8].copy_from_slice(&delta1.to_le_bytes());
    b
}

/// Whether a full lcluster index heads a pcluster.
pub fn full_index_is_head(entry: &[u8; 8]) -> bool {
    u16::from_le_bytes([entry[0], entry[1]]) & 3 != u16::from(LCLUSTER_TYPE_NONHEAD)
}

/// Adds `base` to the block address of every HEAD lcluster of a full index
/// array that addresses a pcluster in blocks: not `skip` (the inline tail's
/// head), not heads that start at or past EOF (`size`, with
/// `lclusterbits`), which the kernel never maps. Pure; the merge's way of
/// moving a compressed file's data into a flat address space.
pub fn rebase_full_indexes(
    indexes: &[[u8; 8]],
    base: u64,
    skip: Option<u64>,
    size: u64,
    lclusterbits: u8,
) -> Result<Vec<[u8; 8]>, String> {
    let mut out = indexes.to_vec();
    for (lcn, e) in out.iter_mut().enumerate() {
        let lcn = lcn as u64;
        if !full_index_is_head(e) || Some(lcn) == skip {
            continue;
        }
        let clusterofs = u64::from(u16::from_le_bytes([e[2], e[3]]));
        let start = lcn.checked_shl(u32::from(lclusterbits)).and_then(|s| s.checked_add(clusterofs));
        if start.is_none_or(|s| s >= size) {
            continue;
        }
        let blk = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
        let moved = blk
            .checked_add(base)
            .and_then(|b| u32::try_from(b).ok())
            .ok_or_else(|| format!("lcluster {lcn}: block {blk} + {base} does not fit 32 bits"))?;
        e[4..8].copy_from_slice(&moved.to_le_bytes());
    }
    Ok(out)
}

/// Decodes any lcluster indexes (full or compact) into full ones, with
/// `delta1` recomputed (compact indexes do not keep it).
pub fn indexes_as_full(layout: &ZIndexLayout, src: &mut dyn IndexBytes) -> Result<Vec<[u8; 8]>, WalkError> {
    let n = layout.nlclusters;
    let mut decoded = Vec::with_capacity(n.min(1 << 20) as usize);
    for lcn in 0..n {
        decoded.push(layout.load(src, lcn)?);
    }
    let mut out = vec![[0u8; 8]; decoded.len()];
    let mut next_head = n;
    for lcn in (0..n).rev() {
        let lc = &decoded[lcn as usize];
        out[lcn as usize] = if lc.is_head() {
            next_head = lcn;
            let clusterofs = u16::try_from(lc.clusterofs)
                .map_err(|_| WalkError::Corrupt(format!("lcluster {lcn}: clusterofs {}", lc.clusterofs)))?;
            let blk = u32::try_from(lc.pblk)
                .map_err(|_| WalkError::Unsupported(format!("lcluster {lcn}: block {} beyond 2^32", lc.pblk)))?;
            full_head_index(lc.kind, clusterofs, blk)
        } else {
            let delta1 = (next_head - lcn).min(u64::from(u16::MAX)) as u16;
            let d0 = u16::try_from(lc.delta0)
                .map_err(|_| WalkError::Corrupt(format!("lcluster {lcn}: delta {}", lc.delta0)))?;
            let cblk = (lc.cblkcnt > 0)
                .then(|| u16::try_from(lc.cblkcnt))
                .transpose()
                .map_err(|_| WalkError::Corrupt(format!("lcluster {lcn}: pcluster of {} blocks", lc.cblkcnt)))?;
            full_nonhead_index(d0, cblk, delta1)
        };
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The reader

/// Reads the whole tree of the image behind `bytes`.
pub fn read_tree<B: ImageBytes + ?Sized>(bytes: &B, limits: &WalkLimits) -> Result<ImageTree, WalkError> {
    read_tree_dyn(&Wrap(bytes), limits)
}

struct Wrap<'a, B: ?Sized>(&'a B);

impl<B: ImageBytes + ?Sized> ImageBytes for Wrap<'_, B> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        self.0.read_at(offset, buf)
    }
}

fn read_tree_dyn(bytes: &dyn ImageBytes, limits: &WalkLimits) -> Result<ImageTree, WalkError> {
    let size = bytes.size();
    let first_len = 4096.min(size) as usize;
    let mut first = vec![0u8; first_len];
    bytes.read_at(0, &mut first)?;
    let sb = Superblock::parse(&first)?;
    if sb.block_size() > first.len() as u64 && size >= sb.block_size() {
        first = vec![0u8; sb.block_size() as usize];
        bytes.read_at(0, &mut first)?;
    }
    sb.verify_checksum(&first)?;
    if sb.has_incompat(feature::INCOMPAT_48BIT) {
        return Err(WalkError::Unsupported("48-bit block addresses".into()));
    }
    let devices = match sb.device_table() {
        Some(t) => {
            let mut table = vec![0u8; (t.end - t.start) as usize];
            bytes.read_at(t.start, &mut table)?;
            sb.device_slots(&table)?
        }
        None => Vec::new(),
    };
    let mut r = Reader { bytes, sb: sb.clone(), limits, inodes: HashMap::new(), shared: HashMap::new() };
    let root = sb.root_nid;
    let mut queue = VecDeque::from([(root, 0u32)]);
    let mut seen_dirs: HashSet<u64> = HashSet::new();
    let mut queued: HashSet<u64> = HashSet::from([root]);
    while let Some((nid, depth)) = queue.pop_front() {
        if r.inodes.len() as u64 >= limits.max_inodes {
            return Err(WalkError::LimitExceeded(format!("more than {} inodes", limits.max_inodes)));
        }
        let inode = r.read_inode(nid)?;
        if let TreeBody::Directory(entries) = &inode.body {
            if !seen_dirs.insert(nid) {
                return Err(WalkError::Corrupt(format!("directory nid {nid} is reachable twice")));
            }
            if depth >= limits.max_depth {
                return Err(WalkError::LimitExceeded(format!("directory nesting deeper than {}", limits.max_depth)));
            }
            for e in entries {
                if e.nid == root {
                    return Err(WalkError::Corrupt(format!("directory nid {nid} names the root")));
                }
                if queued.insert(e.nid) {
                    queue.push_back((e.nid, depth + 1));
                }
            }
        } else if nid == root {
            return Err(WalkError::Corrupt(format!("root nid {root} is not a directory")));
        }
        r.inodes.insert(nid, inode);
    }
    // A directory named twice would have been queued once: check its entries.
    let mut names: HashMap<u64, u32> = HashMap::new();
    for inode in r.inodes.values() {
        if let TreeBody::Directory(entries) = &inode.body {
            for e in entries {
                *names.entry(e.nid).or_default() += 1;
            }
        }
    }
    for (nid, n) in names {
        if n > 1 && matches!(r.inodes.get(&nid).map(|i| &i.body), Some(TreeBody::Directory(_))) {
            return Err(WalkError::Corrupt(format!("directory nid {nid} has {n} names")));
        }
    }
    Ok(ImageTree { sb, devices, root, inodes: r.inodes })
}

struct Reader<'a> {
    bytes: &'a dyn ImageBytes,
    sb: Superblock,
    limits: &'a WalkLimits,
    inodes: HashMap<u64, TreeInode>,
    /// Shared xattr entries by id.
    shared: HashMap<u32, (Vec<u8>, Vec<u8>)>,
}

fn corrupt(nid: u64, what: impl std::fmt::Display) -> WalkError {
    WalkError::Corrupt(format!("inode nid {nid}: {what}"))
}

fn overflow(nid: u64) -> WalkError {
    corrupt(nid, "offset arithmetic overflows")
}

/// `new_decode_dev`.
fn decode_rdev(dev: u32) -> (u32, u32) {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

impl Reader<'_> {
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, WalkError> {
        let len = usize::try_from(len).map_err(|_| WalkError::Corrupt("read length overflows".into()))?;
        let mut buf = vec![0u8; len];
        self.bytes.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    fn read_inode(&mut self, nid: u64) -> Result<TreeInode, WalkError> {
        let offset = self
            .sb
            .inode_offset(nid)
            .filter(|o| o.checked_add(COMPACT_INODE_SIZE).is_some_and(|e| e <= self.bytes.size()))
            .ok_or_else(|| corrupt(nid, "lies outside the image"))?;
        let mut raw = self.read(offset, COMPACT_INODE_SIZE)?;
        if raw[0] & 1 != 0 {
            raw = self.read(offset, EXTENDED_INODE_SIZE)?;
        }
        let h = InodeHeader::parse(nid, offset, &raw)?;
        let le16 = |o: usize| format::le16(&raw, o).unwrap_or(0);
        let le32 = |o: usize| format::le32(&raw, o).unwrap_or(0);
        let (uid, gid, mtime, mtime_nsec, nlink) = if h.extended {
            let mtime = format::le64(&raw, 32).unwrap_or(0) as i64;
            (le32(24), le32(28), mtime, le32(40), le32(44))
        } else {
            let nlink = if h.startblk_hi != 0 || (le16(0) >> 4) & 1 != 0 { 1 } else { u32::from(le16(6)) };
            let mtime = (self.sb.epoch as i64).saturating_add(i64::from(le32(12)));
            (u32::from(le16(24)), u32::from(le16(26)), mtime, self.sb.fixed_nsec, nlink)
        };
        let xattrs = self.read_xattrs(&h)?;
        let body = match h.kind {
            FileKind::CharDevice | FileKind::BlockDevice => {
                let (major, minor) = decode_rdev(h.i_u);
                if h.kind == FileKind::CharDevice {
                    TreeBody::CharDevice { major, minor }
                } else {
                    TreeBody::BlockDevice { major, minor }
                }
            }
            FileKind::Fifo => TreeBody::Fifo,
            FileKind::Socket => TreeBody::Socket,
            FileKind::Directory => {
                if h.size > self.limits.max_dir_size {
                    return Err(WalkError::LimitExceeded(format!(
                        "directory nid {nid} is {} bytes (limit {})",
                        h.size, self.limits.max_dir_size
                    )));
                }
                let content = self.small_content(&h)?;
                TreeBody::Directory(self.dirents(nid, &content)?)
            }
            FileKind::Symlink => {
                if h.size == 0 || h.size > 4095 {
                    return Err(corrupt(nid, format!("symlink target of {} bytes", h.size)));
                }
                TreeBody::Symlink(self.small_content(&h)?)
            }
            FileKind::Regular => TreeBody::Regular { size: h.size, data: self.file_map(&h)? },
        };
        Ok(TreeInode { nid, mode: h.mode, uid, gid, mtime, mtime_nsec, nlink, xattrs, body })
    }

    /// The whole content of a directory or symlink (uncompressed, on the primary device).
    fn small_content(&self, h: &InodeHeader) -> Result<Vec<u8>, WalkError> {
        let nid = h.nid;
        let bs = self.sb.block_size();
        let body_end = h.body_end().ok_or_else(|| overflow(nid))?;
        let mut out = Vec::with_capacity(h.size.min(1 << 20) as usize);
        match h.layout {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                let nblocks = h.blocks(self.sb.blkszbits);
                let inline = h.layout == DataLayout::FlatInline && nblocks > 0;
                let whole = if inline { nblocks - 1 } else { nblocks };
                if whole > 0 {
                    let start = h
                        .flat_startblk()
                        .ok_or_else(|| corrupt(nid, "has no data blocks"))?
                        .checked_mul(bs)
                        .ok_or_else(|| overflow(nid))?;
                    let len = (whole * bs).min(h.size);
                    out.extend(self.read(start, len)?);
                }
                if inline {
                    let tail = h.size - whole * bs;
                    out.extend(self.read(body_end, tail)?);
                }
            }
            DataLayout::ChunkBased => {
                let chunks = self.chunks(h)?;
                let csize = 1u64 << chunks.0;
                for (i, t) in chunks.1.into_iter().enumerate() {
                    let logical = i as u64 * csize;
                    let len = csize.min(h.size - logical);
                    match t {
                        ChunkTarget::Primary(b) => {
                            let start = b.checked_mul(bs).ok_or_else(|| overflow(nid))?;
                            out.extend(self.read(start, len)?);
                        }
                        _ => return Err(corrupt(nid, format!("chunk {i} of a directory or symlink is a hole or on another device"))),
                    }
                }
            }
            DataLayout::CompressedFull | DataLayout::CompressedCompact => {
                return Err(WalkError::Unsupported(format!("inode nid {nid}: compressed directory or symlink")));
            }
        }
        if out.len() as u64 != h.size {
            return Err(corrupt(nid, "content size mismatch"));
        }
        Ok(out)
    }

    fn dirents(&self, nid: u64, content: &[u8]) -> Result<Vec<DirEntry>, WalkError> {
        let bs = self.sb.block_size() as usize;
        let mut out = Vec::new();
        for (i, block) in content.chunks(bs).enumerate() {
            for_each_dirent(block, |d| {
                if !d.is_dot_or_dotdot() {
                    if d.name.is_empty() || d.name.contains(&b'/') || d.name.contains(&0) {
                        return Err(WalkError::Corrupt(format!("directory nid {nid}: bad entry name")));
                    }
                    out.push(DirEntry { name: d.name.to_vec(), nid: d.nid, file_type: d.file_type });
                }
                Ok(())
            })
            .map_err(|e| match e {
                WalkError::Corrupt(m) => WalkError::Corrupt(format!("directory nid {nid} block {i}: {m}")),
                other => other,
            })?;
        }
        Ok(out)
    }

    fn chunks(&self, h: &InodeHeader) -> Result<(u32, Vec<ChunkTarget>), WalkError> {
        let layout = ChunkLayout::new(h, self.sb.blkszbits)?;
        let bytes = layout.index_bytes().ok_or_else(|| overflow(h.nid))?;
        if bytes > self.limits.max_index_bytes {
            return Err(WalkError::LimitExceeded(format!("inode nid {}: {bytes} bytes of chunk indexes", h.nid)));
        }
        let raw = self.read(layout.start, bytes)?;
        let mask = self.sb.device_id_mask();
        let mut out = Vec::with_capacity(layout.nchunks as usize);
        for (i, e) in raw.chunks_exact(layout.unit as usize).enumerate() {
            let t = layout.decode(e, mask).ok_or_else(|| corrupt(h.nid, format!("chunk index {i}")))?;
            if let ChunkTarget::OtherDevice { device, .. } = t {
                if device > self.sb.extra_devices {
                    return Err(corrupt(h.nid, format!("chunk {i} on device {device} of {}", self.sb.extra_devices)));
                }
            }
            out.push(t);
        }
        Ok((layout.chunkbits, out))
    }

    fn file_map(&self, h: &InodeHeader) -> Result<FileMap, WalkError> {
        let nid = h.nid;
        if h.size == 0 {
            return Ok(FileMap::Empty);
        }
        let bs = self.sb.block_size();
        let body_end = h.body_end().ok_or_else(|| overflow(nid))?;
        match h.layout {
            DataLayout::FlatPlain => match h.flat_startblk() {
                Some(block) => Ok(FileMap::Flat { block }),
                None => Err(corrupt(nid, "a non-empty file without data blocks")),
            },
            DataLayout::FlatInline => {
                let nblocks = h.blocks(self.sb.blkszbits);
                let whole = nblocks - 1;
                let tail = self.read(body_end, h.size - whole * bs)?;
                let block = if whole > 0 {
                    Some(h.flat_startblk().ok_or_else(|| corrupt(nid, "inline file without its blocks"))?)
                } else {
                    None
                };
                Ok(FileMap::Inline { block, tail })
            }
            DataLayout::ChunkBased => {
                let (chunk_bits, chunks) = self.chunks(h)?;
                Ok(FileMap::Chunked { chunk_bits, chunks })
            }
            DataLayout::CompressedFull | DataLayout::CompressedCompact => self.compressed(h, body_end).map(|m| FileMap::Compressed(Box::new(m))),
        }
    }

    fn compressed(&self, h: &InodeHeader, body_end: u64) -> Result<CompressedMap, WalkError> {
        let nid = h.nid;
        let header_pos = align_up(body_end, 8).ok_or_else(|| overflow(nid))?;
        let raw = self.read(header_pos, 8)?;
        let mut header = [0u8; 8];
        header.copy_from_slice(&raw);
        let zh = ZMapHeader::parse(&header).ok_or_else(|| corrupt(nid, "map header"))?;
        let unsupported = |what: &str| WalkError::Unsupported(format!("inode nid {nid}: {what}"));
        if zh.whole_fragment || zh.advise & format::zadvise::FRAGMENT_PCLUSTER != 0 {
            return Err(unsupported("data in the packed inode (fragments)"));
        }
        if h.layout == DataLayout::CompressedFull && zh.advise & format::zadvise::EXTENTS != 0 {
            return Err(unsupported("extent-based compression indexes"));
        }
        let layout = ZIndexLayout::new(h, header_pos, &zh, self.sb.blkszbits)?;
        let index_bytes = layout.index_end() - header_pos;
        if index_bytes > self.limits.max_index_bytes {
            return Err(WalkError::LimitExceeded(format!("inode nid {nid}: {index_bytes} bytes of compression indexes")));
        }
        let region = layout.index_start()..layout.index_end();
        let area = self.read(region.start, region.end - region.start)?;
        let mut src = SliceIndex { start: region.start, bytes: &area };
        let indexes = indexes_as_full(&layout, &mut src)?;
        let ztail = zh.advise & format::zadvise::INLINE_PCLUSTER != 0 && zh.idata_size > 0;
        let inline = if ztail {
            let head = layout.tail_head(&mut src)?;
            let last = layout.nlclusters.saturating_sub(1);
            let at = layout.next_pack_off(last)?;
            Some((head, self.read(at, u64::from(zh.idata_size))?))
        } else {
            None
        };
        // Largest pcluster: CBLKCNT of the first NONHEAD after a head, else one block.
        let mut max_pcluster_blocks = 1u32;
        for w in indexes.windows(2) {
            if full_index_is_head(&w[0]) && !full_index_is_head(&w[1]) {
                let d0 = u16::from_le_bytes([w[1][4], w[1][5]]);
                if d0 & Z_EROFS_LI_D0_CBLKCNT != 0 {
                    max_pcluster_blocks = max_pcluster_blocks.max(u32::from(d0 & !Z_EROFS_LI_D0_CBLKCNT));
                }
            }
        }
        let algorithm_of = |kind: u8| if kind == format::LCLUSTER_TYPE_HEAD2 { zh.algorithm_type >> 4 } else { zh.algorithm_type & 0xF };
        for e in &indexes {
            let kind = (u16::from_le_bytes([e[0], e[1]]) & 3) as u8;
            if matches!(kind, format::LCLUSTER_TYPE_HEAD1 | format::LCLUSTER_TYPE_HEAD2) && algorithm_of(kind) != 0 {
                return Err(unsupported(&format!("compression algorithm {} (only lz4 is supported)", algorithm_of(kind))));
            }
        }
        Ok(CompressedMap {
            header,
            was_compact: layout.is_compact(),
            lclusterbits: layout.lclusterbits(),
            compressed_blocks: h.i_u,
            indexes,
            inline,
            max_pcluster_blocks,
        })
    }

    fn read_xattrs(&mut self, h: &InodeHeader) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, WalkError> {
        let mut out = BTreeMap::new();
        let size = h.xattr_size();
        if size == 0 {
            return Ok(out);
        }
        let nid = h.nid;
        let start = h.offset.checked_add(h.inode_size()).ok_or_else(|| overflow(nid))?;
        let body = self.read(start, size)?;
        let shared = usize::from(*body.get(4).ok_or_else(|| corrupt(nid, "xattr header"))?);
        let mut pos = 12 + 4 * shared;
        if pos > body.len() {
            return Err(corrupt(nid, "shared xattr ids overflow the xattr body"));
        }
        for i in 0..shared {
            let id = format::le32(&body, 12 + 4 * i).ok_or_else(|| corrupt(nid, "xattr ids"))?;
            let (name, value) = self.shared_xattr(nid, id)?;
            out.insert(name, value);
        }
        while pos + 4 <= body.len() {
            let entry_len = xattr_entry_size(&body[pos..]).ok_or_else(|| corrupt(nid, "xattr entry"))? as usize;
            let entry = body.get(pos..pos + entry_len).ok_or_else(|| corrupt(nid, "xattr entry overflows its body"))?;
            let (name, value) = parse_xattr_entry(entry).map_err(|m| corrupt(nid, m))?;
            out.insert(name, value);
            pos += entry_len;
        }
        Ok(out)
    }

    fn shared_xattr(&mut self, nid: u64, id: u32) -> Result<(Vec<u8>, Vec<u8>), WalkError> {
        if let Some(x) = self.shared.get(&id) {
            return Ok(x.clone());
        }
        if self.shared.len() as u64 >= self.limits.max_shared_xattrs {
            return Err(WalkError::LimitExceeded(format!("more than {} shared xattrs", self.limits.max_shared_xattrs)));
        }
        let pos = self.sb.shared_xattr_offset(id).ok_or_else(|| overflow(nid))?;
        let head = self.read(pos, 4)?;
        let len = xattr_entry_size(&head).ok_or_else(|| corrupt(nid, "shared xattr"))?;
        let entry = self.read(pos, len)?;
        let x = parse_xattr_entry(&entry).map_err(|m| corrupt(nid, format!("shared xattr {id}: {m}")))?;
        self.shared.insert(id, x.clone());
        Ok(x)
    }
}

/// One `erofs_xattr_entry` (header, name suffix, value) → full name and value.
fn parse_xattr_entry(e: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let name_len = usize::from(*e.first().ok_or("short xattr entry")?);
    let index = *e.get(1).ok_or("short xattr entry")?;
    let value_len = usize::from(format::le16(e, 2).ok_or("short xattr entry")?);
    let suffix = e.get(4..4 + name_len).ok_or("short xattr name")?;
    let value = e.get(4 + name_len..4 + name_len + value_len).ok_or("short xattr value")?;
    let prefix: &[u8] = match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        5 => b"lustre.",
        6 => b"security.",
        i if i & 0x80 != 0 => return Err("long xattr name prefixes are not supported".into()),
        i => return Err(format!("unknown xattr name index {i}")),
    };
    let mut name = prefix.to_vec();
    name.extend_from_slice(suffix);
    Ok((name, value.to_vec()))
}

/// Index bytes from a slice read whole.
struct SliceIndex<'a> {
    start: u64,
    bytes: &'a [u8],
}

impl IndexBytes for SliceIndex<'_> {
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], WalkError> {
        let off = pos.checked_sub(self.start).and_then(|o| usize::try_from(o).ok());
        off.and_then(|o| self.bytes.get(o..o.checked_add(len)?))
            .ok_or_else(|| WalkError::Corrupt(format!("index read {pos}+{len} outside the index area")))
    }
}

#[cfg(test)]
pub(crate) mod tests;
