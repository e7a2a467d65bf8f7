//! The layout pass ([`plan`]) and the write pass ([`Plan::write`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::compress::{self, ExtentKind};
use super::dir::{DirLayout, Entry};
use super::ondisk::{self, InodeFields, Lcluster, SuperBlock};
use super::tree::{Chunk, FileData, InodeId, Kind, Reachable, Tree};
use super::xattr::{self, EncodedXattr};
use super::{Compression, FileReader, WriteError, WriterOptions};
use crate::erofs::format::SUPERBLOCK_OFFSET;

/// What a plan or write tells a progress display: `done` of `total` bytes.
pub trait Progress: Sync {
    fn update(&self, phase: &'static str, done: u64, total: u64);
}

struct NoProgress;
impl Progress for NoProgress {
    fn update(&self, _: &'static str, _: u64, _: u64) {}
}

/// Figures of a planned (and then written) image.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageSummary {
    /// Bytes of the image file.
    pub image_size: u64,
    /// First byte after all metadata (superblock, inodes, xattrs, indexes,
    /// directory and symlink blocks): where file data begins.
    pub metadata_end: u64,
    /// Bytes of file data stored in the image.
    pub data_bytes: u64,
    pub block_size: u32,
    pub inodes: u64,
    pub directories: u64,
    pub regular_files: u64,
    pub compressed_files: u64,
    /// Uncompressed bytes of the files stored compressed.
    pub compressed_input_bytes: u64,
    pub shared_xattrs: u64,
    pub extended_inodes: u64,
    /// Bytes of padding inside the metadata area.
    pub metadata_padding: u64,
}

/// Where an inode's blocks live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    Meta,
    Data,
}

#[derive(Clone, Debug)]
enum Body {
    /// Devices, fifos, sockets, empty files.
    None,
    /// FLAT_PLAIN (`tail == 0`) or FLAT_INLINE: `blocks` whole blocks in
    /// `area`, then `tail` bytes inline.
    Flat { area: Area, blocks: u64, tail: usize },
    /// FLAT_PLAIN pointing at an external block address (in `i_u`).
    External,
    /// CHUNK_BASED; `local` chunks of a sparse local source are written by us.
    Chunked {
        chunk_bits: u8,
        unit: usize,
        chunks: Vec<ChunkPlan>,
    },
    /// COMPRESSED_FULL.
    Compressed { extent_bytes: u64, extents: Vec<ExtentKind> },
    /// FLAT_INLINE over external blocks (block address in `i_u`) with a
    /// `tail`-byte tail in the record; becomes `Chunked` when it does not fit.
    FlatTail { block: u64, tail: usize },
    /// COMPRESSED_FULL with a map given whole (external pclusters).
    Copied(std::sync::Arc<super::tree::CompressedData>),
}

#[derive(Clone, Copy, Debug)]
enum ChunkPlan {
    Hole,
    External { device: u16, block: u64 },
    /// Written by us: this many blocks at `start_block + offset_blocks`.
    Local { offset_blocks: u64, blocks: u64 },
}

#[derive(Clone, Debug)]
struct InodePlan {
    id: InodeId,
    fields: InodeFields,
    shared: Vec<usize>,
    inline_xattrs: Vec<EncodedXattr>,
    xattr_size: usize,
    body: Body,
    record_size: usize,
    /// Must not cross a block boundary (holds inline data).
    contained: bool,
    /// The last this many bytes must not cross a block boundary (a
    /// tail-packed pcluster after compression indexes).
    tail_contained: usize,
    offset: u64,
    /// First block of the inode's blocks (in its area), if it has any.
    start_block: u64,
    /// Blocks it owns in its area.
    owned_blocks: u64,
}

impl InodePlan {
    fn nid(&self) -> u64 {
        self.offset / 32
    }
}

/// A fully computed layout; [`Plan::write`] writes it.
pub struct Plan<'t> {
    tree: &'t Tree,
    /// Largest pcluster (blocks) of the copied compression maps; 0: none.
    copied_max_pcluster: u32,
    copied_inline: bool,
    opts: WriterOptions,
    inodes: Vec<InodePlan>,
    /// `InodeId::index` → index into `inodes`.
    slot_of: HashMap<InodeId, usize>,
    dirs: HashMap<InodeId, DirLayout<InodeId>>,
    shared: Vec<(EncodedXattr, u64)>,
    epoch: (i64, u32),
    root: usize,
    cfgs_offset: Option<u64>,
    devt_offset: Option<u64>,
    data_order: Vec<usize>,
    summary: ImageSummary,
}

fn invalid(msg: impl Into<String>) -> WriteError {
    WriteError::Invalid(msg.into())
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::Directory(_) => ondisk::FT_DIR,
        Kind::Regular { .. } => ondisk::FT_REG_FILE,
        Kind::Symlink(_) => ondisk::FT_SYMLINK,
        Kind::CharDevice { .. } => ondisk::FT_CHRDEV,
        Kind::BlockDevice { .. } => ondisk::FT_BLKDEV,
        Kind::Fifo => ondisk::FT_FIFO,
        Kind::Socket => ondisk::FT_SOCK,
    }
}

/// Places records in the metadata area: 32-byte aligned, contained records
/// never crossing a block boundary. The padding a contained record leaves
/// before a block boundary becomes a gap, and later records take the
/// smallest gap they fit (every gap lies within one block, so anything
/// placed in one is contained).
struct Packer {
    cursor: u64,
    block: u64,
    /// (length, start)
    gaps: std::collections::BTreeSet<(u64, u64)>,
}

impl Packer {
    /// Places a record whose last `tail` bytes must lie in one block.
    fn place_tail(&mut self, size: u64, tail: u64) -> u64 {
        let mut s = self.cursor.next_multiple_of(32);
        let start = s;
        let crosses = |s: u64| tail > 0 && (s + size - tail) / self.block != (s + size - 1) / self.block;
        while crosses(s) {
            s += 32;
        }
        if s - start >= 32 && (s - start) < self.block {
            self.gaps.insert((s - start, start));
        }
        self.cursor = s + size;
        s
    }

    fn place(&mut self, size: u64, contained: bool) -> u64 {
        let need = size.next_multiple_of(32);
        if let Some(&(len, start)) = self.gaps.range((need, 0)..).next() {
            self.gaps.remove(&(len, start));
            if len - need >= 32 {
                self.gaps.insert((len - need, start + need));
            }
            return start;
        }
        let mut s = self.cursor.next_multiple_of(32);
        if contained && s % self.block + size > self.block {
            let next = s.next_multiple_of(self.block);
            if next - s >= 32 {
                self.gaps.insert((next - s, s));
            }
            s = next;
        }
        self.cursor = s + size;
        s
    }
}

/// Computes the whole layout of `tree`. Compressed files are read (and
/// compressed, sizes kept) here; everything else only in [`Plan::write`].
pub fn plan<'t>(tree: &'t Tree, opts: &WriterOptions, files: &dyn FileReader) -> Result<Plan<'t>, WriteError> {
    plan_with_progress(tree, opts, files, &NoProgress)
}

pub fn plan_with_progress<'t>(
    tree: &'t Tree,
    opts: &WriterOptions,
    files: &dyn FileReader,
    progress: &dyn Progress,
) -> Result<Plan<'t>, WriteError> {
    if !(9..=12).contains(&opts.block_bits) {
        return Err(invalid(format!("block size 2^{} (supported: 512 B to 4 KiB)", opts.block_bits)));
    }
    let bs = 1u64 << opts.block_bits;
    let bsu = bs as usize;
    if let Compression::Lz4 { pcluster_bytes } = opts.compression {
        let p = u64::from(pcluster_bytes);
        if p < 2 * bs || p % bs != 0 || p > 1 << 20 {
            return Err(invalid(format!(
                "lz4 pcluster size {p}: must be a multiple of the block size, at least two blocks, at most 1 MiB"
            )));
        }
    }
    if opts.devices.len() > usize::from(u16::MAX) {
        return Err(invalid("too many devices"));
    }
    let reach: Reachable = tree.reachable()?;
    let order = &reach.order;
    if order.len() > u32::MAX as usize - 1 {
        return Err(invalid("too many inodes"));
    }

    // The epoch compact inodes carry: the most common mtime.
    let epoch = match opts.epoch {
        Some(e) => e,
        None => {
            let mut counts: BTreeMap<(i64, u32), u64> = BTreeMap::new();
            for id in order {
                let m = &tree.get(*id).meta;
                *counts.entry((m.mtime, m.mtime_nsec)).or_default() += 1;
            }
            let mut best = ((0i64, 0u32), 0u64);
            for (k, n) in counts {
                if n > best.1 {
                    best = (k, n);
                }
            }
            best.0
        }
    };

    // Xattrs: encode, count, pick shared ones.
    let mut encoded: Vec<Vec<EncodedXattr>> = Vec::with_capacity(order.len());
    let mut refs: HashMap<EncodedXattr, u32> = HashMap::new();
    let mut first_seen: Vec<EncodedXattr> = Vec::new();
    for id in order {
        let mut list = Vec::new();
        for (name, value) in &tree.get(*id).xattrs {
            let x = xattr::encode(name, value)?;
            let n = refs.entry(x.clone()).or_insert(0);
            if *n == 0 {
                first_seen.push(x.clone());
            }
            *n += 1;
            list.push(x);
        }
        list.sort();
        encoded.push(list);
    }
    let min_refs = opts.shared_xattr_min_refs;
    let mut shared: Vec<(EncodedXattr, u64)> = Vec::new();
    let mut shared_index: HashMap<EncodedXattr, usize> = HashMap::new();
    if min_refs >= 2 {
        for x in first_seen {
            if refs.get(&x).copied().unwrap_or(0) >= min_refs {
                shared_index.insert(x.clone(), shared.len());
                shared.push((x, 0));
            }
        }
    }

    // Compression of candidate files (read here, sizes kept).
    let compressed_extents = match opts.compression {
        Compression::Lz4 { pcluster_bytes } => {
            compress_candidates(
                tree,
                order,
                u64::from(pcluster_bytes),
                bs,
                opts.block_bits,
                opts.sparse_chunk_bits,
                files,
                progress,
            )?
        }
        Compression::None => HashMap::new(),
    };

    let mut summary = ImageSummary {
        block_size: bs as u32,
        ..ImageSummary::default()
    };
    let mut dirs: HashMap<InodeId, DirLayout<InodeId>> = HashMap::new();
    let mut inodes: Vec<InodePlan> = Vec::with_capacity(order.len());
    let use_indexes = !opts.devices.is_empty();
    // Copied compression maps need the lz4 configuration in the superblock.
    let mut copied_max_pcluster = 0u32;
    let mut copied_inline = false;

    for (slot, id) in order.iter().enumerate() {
        let inode = tree.get(*id);
        let nlink = reach.nlink[id.index()];
        let (mut shared_ids, mut inline_xattrs) = (Vec::new(), Vec::new());
        for x in &encoded[slot] {
            match shared_index.get(x) {
                Some(&i) if shared_ids.len() < u8::MAX as usize => shared_ids.push(i),
                _ => inline_xattrs.push(x.clone()),
            }
        }
        let xattr_size = if shared_ids.is_empty() && inline_xattrs.is_empty() {
            0
        } else {
            ondisk::XATTR_IBODY_HEADER_SIZE
                + 4 * shared_ids.len()
                + inline_xattrs.iter().map(|x| x.entry_size()).sum::<usize>()
        };
        if xattr_size > ondisk::XATTR_IBODY_HEADER_SIZE + 4 * (u16::MAX as usize - 1) {
            return Err(invalid("an inode has more xattr bytes than EROFS stores"));
        }
        let m = inode.meta;
        let mut size = 0u64;
        let mut i_u = 0u32;
        let mut body = Body::None;
        match &inode.kind {
            Kind::Directory(entries) => {
                summary.directories += 1;
                let parent = reach.parent[id.index()];
                let list = entries
                    .iter()
                    .map(|(name, child)| Entry {
                        name: name.clone(),
                        target: *child,
                        file_type: file_type(&tree.get(*child).kind),
                    })
                    .collect();
                let layout = DirLayout::new(
                    Entry { name: b".".to_vec(), target: *id, file_type: ondisk::FT_DIR },
                    Entry { name: b"..".to_vec(), target: parent, file_type: ondisk::FT_DIR },
                    list,
                    bsu,
                );
                size = layout.size(bsu);
                body = Body::Flat {
                    area: Area::Meta,
                    blocks: layout.blocks.len() as u64,
                    tail: 0,
                };
                dirs.insert(*id, layout);
            }
            Kind::Symlink(target) => {
                if target.is_empty() || target.len() > 4095 || target.contains(&0) {
                    return Err(invalid(format!(
                        "symlink target of {} bytes (must be 1..4095 bytes without NUL)",
                        target.len()
                    )));
                }
                size = target.len() as u64;
                body = Body::Flat { area: Area::Meta, blocks: size.div_ceil(bs), tail: 0 };
            }
            Kind::Regular { size: fsize, data } => {
                summary.regular_files += 1;
                size = *fsize;
                if size > i64::MAX as u64 {
                    return Err(invalid("a file larger than 2^63 bytes"));
                }
                if opts.metadata_only && data.is_local() && size > 0 {
                    return Err(invalid("metadata-only image with a file whose data is local"));
                }
                body = match data {
                    _ if size == 0 => Body::None,
                    FileData::Empty => return Err(invalid("a non-empty file without data")),
                    FileData::Bytes(b) => {
                        if b.len() as u64 != size {
                            return Err(invalid("in-memory file data does not match the file size"));
                        }
                        match compressed_extents.get(id) {
                            Some(ext) => Body::Compressed {
                                extent_bytes: compressed_extent_bytes(opts),
                                extents: ext.clone(),
                            },
                            None => Body::Flat { area: Area::Data, blocks: size.div_ceil(bs), tail: 0 },
                        }
                    }
                    FileData::Local { data_ranges: Some(ranges), .. }
                        if has_hole_chunks(size, ranges, opts.block_bits, opts.sparse_chunk_bits) =>
                    {
                        sparse_chunks(size, ranges, opts.block_bits, opts.sparse_chunk_bits, use_indexes)
                    }
                    FileData::Local { .. } => match compressed_extents.get(id) {
                        Some(ext) => Body::Compressed {
                            extent_bytes: compressed_extent_bytes(opts),
                            extents: ext.clone(),
                        },
                        None => Body::Flat { area: Area::Data, blocks: size.div_ceil(bs), tail: 0 },
                    },
                    FileData::Chunked(c) => {
                        external_chunks(c, size, opts, use_indexes)?
                    }
                    FileData::FlatAddress { block } => {
                        let end = block.checked_add(size.div_ceil(bs));
                        if end.is_none_or(|e| e > u64::from(u32::MAX)) {
                            return Err(invalid("a flat address beyond 2^32 blocks"));
                        }
                        i_u = *block as u32;
                        Body::External
                    }
                    FileData::FlatTail { block, tail } => {
                        let whole = size
                            .checked_sub(tail.len() as u64)
                            .filter(|w| w % bs == 0 && *w > 0 && !tail.is_empty())
                            .ok_or_else(|| invalid("a flat file with a tail: the blocks must be whole and the tail non-empty"))?;
                        if block.checked_add(whole / bs).is_none_or(|e| e > u64::from(u32::MAX)) {
                            return Err(invalid("a flat address beyond 2^32 blocks"));
                        }
                        i_u = *block as u32;
                        Body::FlatTail { block: *block, tail: tail.len() }
                    }
                    FileData::Compressed(c) => {
                        check_copied(c, size, opts.block_bits)?;
                        copied_max_pcluster = copied_max_pcluster.max(c.max_pcluster_blocks);
                        copied_inline |= c.inline.is_some();
                        i_u = c.compressed_blocks;
                        Body::Copied(std::sync::Arc::clone(c))
                    }
                };
                if size == 0 {
                    i_u = ondisk::NULL_ADDR_32;
                }
            }
            Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                if *major > 0xfff || *minor > 0xfffff {
                    return Err(invalid(format!("device number {major}:{minor} out of range")));
                }
                i_u = ondisk::encode_rdev(*major, *minor);
            }
            Kind::Fifo | Kind::Socket => {}
        }

        let extended = size > u64::from(u32::MAX)
            || m.uid > u32::from(u16::MAX)
            || m.gid > u32::from(u16::MAX)
            || nlink > u64::from(u16::MAX)
            || (m.mtime, m.mtime_nsec) != epoch;
        if nlink > u64::from(u32::MAX) {
            return Err(invalid("too many hard links"));
        }
        let fields = InodeFields {
            extended,
            layout: 0,
            xattr_icount: if xattr_size == 0 {
                0
            } else {
                ((xattr_size - ondisk::XATTR_IBODY_HEADER_SIZE) / 4 + 1) as u16
            },
            mode: inode.kind.format_bits() | (m.permissions & 0o7777),
            nlink: nlink as u32,
            size,
            i_u,
            ino: (slot + 1) as u32,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime as u64,
            mtime_nsec: m.mtime_nsec,
        };
        summary.extended_inodes += u64::from(extended);
        let mut plan = InodePlan {
            id: *id,
            fields,
            shared: shared_ids,
            inline_xattrs,
            xattr_size,
            body,
            record_size: 0,
            contained: false,
            tail_contained: 0,
            offset: 0,
            start_block: 0,
            owned_blocks: 0,
        };
        // The root directory keeps its entries in blocks (never inline): placed last in the
        // metadata run, they let a reader of the first block alone learn where the run ends.
        finish_record(&mut plan, bs, opts, use_indexes, slot != 0)?;
        inodes.push(plan);
    }

    // Metadata area placement.
    let mut packer = Packer {
        cursor: SUPERBLOCK_OFFSET + ondisk::SB_SIZE as u64,
        block: bs,
        gaps: Default::default(),
    };
    let mut cfgs_offset = None;
    if opts.compression != Compression::None || copied_max_pcluster > 0 {
        cfgs_offset = Some(packer.cursor);
        packer.cursor += 16;
    }
    let mut devt_offset = None;
    if !opts.devices.is_empty() {
        let at = packer.cursor.next_multiple_of(ondisk::DEVICE_SLOT_SIZE as u64);
        if at / ondisk::DEVICE_SLOT_SIZE as u64 > u64::from(u16::MAX) {
            return Err(invalid("device table offset out of range"));
        }
        devt_offset = Some(at);
        packer.cursor = at + (opts.devices.len() * ondisk::DEVICE_SLOT_SIZE) as u64;
    }
    let root = 0usize;
    inodes[root].offset = packer.place(inodes[root].record_size as u64, inodes[root].contained);
    if inodes[root].nid() > u64::from(u16::MAX) {
        return Err(invalid("the root inode lies beyond nid 65535"));
    }
    packer.cursor = packer.cursor.next_multiple_of(4);
    for (x, off) in shared.iter_mut() {
        *off = packer.cursor;
        if packer.cursor / 4 > u64::from(u32::MAX) {
            return Err(invalid("shared xattrs beyond 16 GiB"));
        }
        packer.cursor += x.entry_size() as u64;
    }
    summary.shared_xattrs = shared.len() as u64;
    // Contained records first, so that the others fill the gaps they leave.
    for contained in [true, false] {
        for p in inodes.iter_mut().skip(1).filter(|p| p.contained == contained) {
            p.offset = if p.tail_contained > 0 && !p.contained {
                packer.place_tail(p.record_size as u64, p.tail_contained as u64)
            } else {
                packer.place(p.record_size as u64, p.contained)
            };
        }
    }
    let records_end = packer.cursor;
    let mut next_block = records_end.div_ceil(bs);
    let used: u64 = inodes.iter().map(|p| p.record_size as u64).sum::<u64>()
        + shared.iter().map(|(x, _)| x.entry_size() as u64).sum::<u64>();
    summary.metadata_padding = (next_block * bs).saturating_sub(used + SUPERBLOCK_OFFSET + ondisk::SB_SIZE as u64);
    // Directory and symlink blocks, the root's last: its inode (in the first block) then names
    // the end of the metadata run (the walker's contiguous guess reads it there).
    for i in (1..inodes.len()).chain(std::iter::once(root)) {
        let p = &mut inodes[i];
        if let Body::Flat { area: Area::Meta, blocks, .. } = p.body {
            if blocks > 0 {
                p.start_block = next_block;
                p.owned_blocks = blocks;
                next_block += blocks;
            }
        }
    }
    let metadata_end = next_block * bs;

    // Data placement.
    let slot_of: HashMap<InodeId, usize> = inodes.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
    let mut data_order: Vec<usize> = Vec::new();
    let mut taken = vec![false; inodes.len()];
    for id in &opts.data_order {
        if let Some(&s) = slot_of.get(id) {
            if !taken[s] {
                taken[s] = true;
                data_order.push(s);
            }
        }
    }
    data_order.extend((0..inodes.len()).filter(|s| !taken[*s]));
    data_order.retain(|s| data_blocks(&inodes[*s].body, inodes[*s].fields.size, bs) > 0);
    for &s in &data_order {
        let blocks = data_blocks(&inodes[s].body, inodes[s].fields.size, bs);
        inodes[s].start_block = next_block;
        inodes[s].owned_blocks = blocks;
        next_block += blocks;
        if let Body::Compressed { .. } = &inodes[s].body {
            summary.compressed_files += 1;
            summary.compressed_input_bytes += inodes[s].fields.size;
        }
    }
    if next_block > u64::from(u32::MAX) {
        return Err(invalid("the image would have more than 2^32 blocks"));
    }
    // i_u now that blocks are known.
    for p in inodes.iter_mut() {
        p.fields.i_u = match &p.body {
            Body::Flat { blocks, .. } => {
                if *blocks > 0 {
                    p.start_block as u32
                } else {
                    ondisk::NULL_ADDR_32
                }
            }
            Body::Chunked { chunk_bits, unit, .. } => {
                let mut f = u16::from(chunk_bits - opts.block_bits);
                if *unit == 8 {
                    f |= ondisk::CHUNK_FORMAT_INDEXES;
                }
                u32::from(f)
            }
            Body::Compressed { .. } => p.owned_blocks as u32,
            _ => p.fields.i_u,
        };
    }

    summary.inodes = inodes.len() as u64;
    summary.metadata_end = metadata_end;
    summary.image_size = next_block * bs;
    summary.data_bytes = summary.image_size - metadata_end;
    Ok(Plan {
        tree,
        copied_max_pcluster,
        copied_inline,
        opts: opts.clone(),
        inodes,
        slot_of,
        dirs,
        shared,
        epoch,
        root,
        cfgs_offset,
        devt_offset,
        data_order,
        summary,
    })
}

fn compressed_extent_bytes(opts: &WriterOptions) -> u64 {
    match opts.compression {
        Compression::Lz4 { pcluster_bytes } => u64::from(pcluster_bytes),
        Compression::None => 0,
    }
}

/// Blocks of an inode's body in the data area.
fn data_blocks(body: &Body, size: u64, bs: u64) -> u64 {
    match body {
        Body::Flat { area: Area::Data, blocks, .. } => *blocks,
        Body::Chunked { chunks, .. } => chunks
            .iter()
            .map(|c| match c {
                ChunkPlan::Local { blocks, .. } => *blocks,
                _ => 0,
            })
            .sum(),
        Body::Compressed { extents, extent_bytes } => extent_lengths(*extent_bytes, size)
            .zip(extents)
            .map(|(len, k)| compress::extent_blocks(*k, len, bs))
            .sum(),
        _ => 0,
    }
}

/// Lengths of the extents of a file of `size` bytes.
fn extent_lengths(extent_bytes: u64, size: u64) -> impl Iterator<Item = u64> {
    (0..size.div_ceil(extent_bytes)).map(move |i| extent_bytes.min(size - i * extent_bytes))
}

/// Checks a copied compression map against the file and the block size.
fn check_copied(c: &super::tree::CompressedData, size: u64, block_bits: u8) -> Result<(), WriteError> {
    let advise = u16::from_le_bytes([c.header[4], c.header[5]]);
    if advise & 1 != 0 {
        return Err(invalid("a copied compression map with compact-index or extent bits"));
    }
    let lclusterbits = u32::from(block_bits) + u32::from(c.header[7] & 0x0f);
    if c.header[7] & 0x80 != 0 || lclusterbits > 30 {
        return Err(invalid("a copied compression map of a fragment or with bogus lcluster bits"));
    }
    let n = size.div_ceil(1u64 << lclusterbits);
    if c.indexes.len() as u64 != n {
        return Err(invalid(format!("{} lcluster indexes for a file of {n} lclusters", c.indexes.len())));
    }
    let idata = usize::from(u16::from_le_bytes([c.header[2], c.header[3]]));
    let inline_len = c.inline.as_ref().map_or(0, |i| i.len());
    if idata != inline_len || (inline_len > 0 && advise & ondisk::Z_ADVISE_INLINE_PCLUSTER == 0) || inline_len as u64 >= 1u64 << block_bits {
        return Err(invalid("a copied compression map whose inline pcluster does not match its header"));
    }
    if c.max_pcluster_blocks == 0 || c.max_pcluster_blocks > u32::from(u16::MAX) {
        return Err(invalid("a copied compression map without a pcluster size"));
    }
    Ok(())
}

/// The chunk-based form of a flat file with a tail that cannot be inline:
/// whole chunks over the external blocks, the tail's chunk(s) local.
fn flat_tail_chunks(size: u64, block: u64, tail: u64, block_bits: u8, use_indexes: bool) -> Result<Body, WriteError> {
    let bs = 1u64 << block_bits;
    let whole = size - tail;
    // The largest chunk that divides the external part (so the tail starts a chunk).
    let mut bits = (whole.trailing_zeros() as u8).clamp(block_bits, block_bits + 31);
    while size.div_ceil(1u64 << bits) > 1 << 20 && bits > block_bits {
        bits -= 1;
    }
    if !whole.is_multiple_of(1u64 << bits) {
        return Err(invalid("internal error: tail chunk alignment"));
    }
    let chunk = 1u64 << bits;
    let mut chunks = Vec::new();
    let mut offset_blocks = 0;
    for i in 0..size.div_ceil(chunk) {
        let start = i * chunk;
        if start < whole {
            let b = block
                .checked_add(start / bs)
                .filter(|b| *b < u64::from(u32::MAX))
                .ok_or_else(|| invalid("a chunk block address beyond 2^32"))?;
            chunks.push(ChunkPlan::External { device: 0, block: b });
        } else {
            let blocks = chunk.min(size - start).div_ceil(bs);
            chunks.push(ChunkPlan::Local { offset_blocks, blocks });
            offset_blocks += blocks;
        }
    }
    Ok(Body::Chunked { chunk_bits: bits, unit: if use_indexes { 8 } else { 4 }, chunks })
}

/// Record size and inline decision.
fn finish_record(p: &mut InodePlan, bs: u64, opts: &WriterOptions, use_indexes: bool, may_inline: bool) -> Result<(), WriteError> {
    let base = p.fields.encoded_size() + p.xattr_size;
    let size = p.fields.size;
    if let Body::FlatTail { block, tail } = p.body {
        if tail as u64 >= bs || base + tail > bs as usize {
            if opts.metadata_only {
                return Err(invalid("metadata-only image with a file tail that does not fit its inode"));
            }
            p.body = flat_tail_chunks(size, block, tail as u64, opts.block_bits, use_indexes)?;
        }
    }
    let inline_data = opts.inline_data && may_inline;
    let (layout, extra, contained) = match &mut p.body {
        Body::None | Body::External => (ondisk::LAYOUT_FLAT_PLAIN, 0, false),
        Body::Flat { blocks, tail, .. } => {
            let t = (size % bs) as usize;
            if inline_data && t > 0 && base + t <= bs as usize {
                *blocks = size / bs;
                *tail = t;
                (ondisk::LAYOUT_FLAT_INLINE, t, true)
            } else {
                (ondisk::LAYOUT_FLAT_PLAIN, 0, false)
            }
        }
        Body::Chunked { unit, chunks, .. } => {
            let start = base.next_multiple_of(*unit);
            (ondisk::LAYOUT_CHUNK_BASED, start - base + *unit * chunks.len(), false)
        }
        Body::Compressed { .. } => {
            let header = base.next_multiple_of(8);
            let lclusters = size.div_ceil(bs) as usize;
            (ondisk::LAYOUT_COMPRESSED_FULL, header - base + 16 + 8 * lclusters, false)
        }
        Body::FlatTail { tail, .. } => (ondisk::LAYOUT_FLAT_INLINE, *tail, true),
        Body::Copied(c) => {
            let header = base.next_multiple_of(8);
            let inline = c.inline.as_ref().map_or(0, |i| i.len());
            p.tail_contained = inline;
            (ondisk::LAYOUT_COMPRESSED_FULL, header - base + 16 + 8 * c.indexes.len() + inline, false)
        }
    };
    p.fields.layout = layout;
    p.record_size = base + extra;
    p.contained = contained;
    Ok(())
}

/// The chunk size bits for a sparse file: at most 64 Ki chunks.
fn sparse_chunk_bits(size: u64, block_bits: u8, chunk_bits: u8) -> u8 {
    let mut bits = chunk_bits.clamp(block_bits, block_bits + 31);
    while size.div_ceil(1u64 << bits) > 65536 && bits < block_bits + 31 {
        bits += 1;
    }
    bits
}

/// Whether a sparse source has a whole chunk without data (else it is
/// stored like any other file: a few small holes are not worth chunks, and
/// sources such as ext4 inline-data files only look sparse).
fn has_hole_chunks(size: u64, ranges: &[std::ops::Range<u64>], block_bits: u8, chunk_bits: u8) -> bool {
    let chunk = 1u64 << sparse_chunk_bits(size, block_bits, chunk_bits);
    (0..size.div_ceil(chunk)).any(|i| {
        let (start, end) = (i * chunk, ((i + 1) * chunk).min(size));
        !ranges.iter().any(|r| r.start < end && r.end > start)
    })
}

fn sparse_chunks(size: u64, ranges: &[std::ops::Range<u64>], block_bits: u8, chunk_bits: u8, use_indexes: bool) -> Body {
    let bs = 1u64 << block_bits;
    let bits = sparse_chunk_bits(size, block_bits, chunk_bits);
    let chunk = 1u64 << bits;
    let n = size.div_ceil(chunk);
    let mut chunks = Vec::with_capacity(n as usize);
    let mut offset_blocks = 0;
    for i in 0..n {
        let start = i * chunk;
        let end = (start + chunk).min(size);
        let has_data = ranges.iter().any(|r| r.start < end && r.end > start);
        if has_data {
            let blocks = (end - start).div_ceil(bs);
            chunks.push(ChunkPlan::Local { offset_blocks, blocks });
            offset_blocks += blocks;
        } else {
            chunks.push(ChunkPlan::Hole);
        }
    }
    Body::Chunked {
        chunk_bits: bits,
        unit: if use_indexes { 8 } else { 4 },
        chunks,
    }
}

fn external_chunks(
    c: &super::ChunkedData,
    size: u64,
    opts: &WriterOptions,
    use_indexes: bool,
) -> Result<Body, WriteError> {
    if c.chunk_bits < opts.block_bits || c.chunk_bits > opts.block_bits + 31 {
        return Err(invalid(format!("chunk size 2^{} for {}-byte blocks", c.chunk_bits, 1u64 << opts.block_bits)));
    }
    let n = size.div_ceil(1u64 << c.chunk_bits);
    if c.chunks.len() as u64 != n {
        return Err(invalid(format!("{} chunk entries for a file of {n} chunks", c.chunks.len())));
    }
    let mut chunks = Vec::with_capacity(c.chunks.len());
    let mut need_indexes = use_indexes;
    for ch in &c.chunks {
        chunks.push(match *ch {
            Chunk::Hole => ChunkPlan::Hole,
            Chunk::At { device, block } => {
                if usize::from(device) > opts.devices.len() {
                    return Err(invalid(format!(
                        "a chunk on device {device}, but the device table has {} devices",
                        opts.devices.len()
                    )));
                }
                if block >= u64::from(u32::MAX) {
                    return Err(invalid("a chunk block address beyond 2^32"));
                }
                need_indexes |= device != 0;
                ChunkPlan::External { device, block }
            }
        });
    }
    Ok(Body::Chunked {
        chunk_bits: c.chunk_bits,
        unit: if need_indexes { 8 } else { 4 },
        chunks,
    })
}

/// Compresses every regular file with local, non-sparse data of at least two
/// blocks; returns the extents of those that compress.
#[allow(clippy::too_many_arguments)]
fn compress_candidates(
    tree: &Tree,
    order: &[InodeId],
    extent_bytes: u64,
    bs: u64,
    opts_block_bits: u8,
    opts_sparse_bits: u8,
    files: &dyn FileReader,
    progress: &dyn Progress,
) -> Result<HashMap<InodeId, Vec<ExtentKind>>, WriteError> {
    let candidates: Vec<InodeId> = order
        .iter()
        .copied()
        .filter(|id| match &tree.get(*id).kind {
            Kind::Regular { size, data } => {
                *size > bs
                    && match data {
                        FileData::Bytes(_) | FileData::Local { data_ranges: None, .. } => true,
                        FileData::Local { data_ranges: Some(r), .. } => {
                            !has_hole_chunks(*size, r, opts_block_bits, opts_sparse_bits)
                        }
                        _ => false,
                    }
            }
            _ => false,
        })
        .collect();
    let total: u64 = candidates
        .iter()
        .map(|id| match &tree.get(*id).kind {
            Kind::Regular { size, .. } => *size,
            _ => 0,
        })
        .sum();
    let next = AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Mutex<Vec<(InodeId, Vec<ExtentKind>)>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<WriteError>> = Mutex::new(None);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = Vec::new();
                let mut out = Vec::new();
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = candidates.get(i) else { return };
                    let mut source = match ContentSource::open(tree, *id, files) {
                        Ok(s) => s,
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    };
                    let size = source.size;
                    let mut extents = Vec::new();
                    let mut pos = 0u64;
                    let mut any = false;
                    while pos < size {
                        let len = extent_bytes.min(size - pos);
                        buf.resize(len as usize, 0);
                        if let Err(e) = source.read(pos, &mut buf) {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                        let kind = compress::compress_extent(&buf, bs as usize, &mut out);
                        any |= matches!(kind, ExtentKind::Compressed(_));
                        extents.push(kind);
                        pos += len;
                    }
                    let d = done.fetch_add(size, Ordering::Relaxed) + size;
                    progress.update("compressing", d, total);
                    if any {
                        if let Ok(mut r) = results.lock() {
                            r.push((*id, extents));
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_default().into_iter().collect())
}

/// Random access to an inode's content bytes (file data, symlink target).
struct ContentSource<'a> {
    size: u64,
    inner: SourceInner<'a>,
    what: String,
}

enum SourceInner<'a> {
    Mem(&'a [u8]),
    /// Only the bytes from `start` on (the tail of a file whose blocks are external).
    Tail { start: u64, bytes: &'a [u8] },
    File { reader: Box<dyn super::ReadAt + 'a>, base: u64 },
    Owned(Vec<u8>),
}

impl<'a> ContentSource<'a> {
    fn open(tree: &'a Tree, id: InodeId, files: &'a dyn FileReader) -> Result<Self, WriteError> {
        let inode = tree.get(id);
        match &inode.kind {
            Kind::Regular { size, data } => {
                let inner = match data {
                    FileData::Bytes(b) => SourceInner::Mem(b),
                    FileData::Local { path, offset, .. } => {
                        let reader = files
                            .open(path)
                            .map_err(|e| WriteError::io(format!("cannot open {}", path.display()), e))?;
                        SourceInner::File { reader, base: *offset }
                    }
                    FileData::FlatTail { tail, .. } => SourceInner::Tail { start: *size - tail.len() as u64, bytes: tail },
                    _ => SourceInner::Mem(&[]),
                };
                let what = match data {
                    FileData::Local { path, .. } => path.display().to_string(),
                    _ => format!("inode {}", id.index()),
                };
                Ok(ContentSource { size: *size, inner, what })
            }
            Kind::Symlink(t) => Ok(ContentSource {
                size: t.len() as u64,
                inner: SourceInner::Mem(t),
                what: "a symlink".into(),
            }),
            _ => Ok(ContentSource {
                size: 0,
                inner: SourceInner::Owned(Vec::new()),
                what: String::new(),
            }),
        }
    }

    fn read(&mut self, pos: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        let end = pos.checked_add(buf.len() as u64).filter(|e| *e <= self.size);
        let Some(end) = end else {
            return Err(invalid("read past the end of a source"));
        };
        match &self.inner {
            SourceInner::Mem(b) => {
                let s = b.get(pos as usize..end as usize).ok_or_else(|| WriteError::SourceChanged(self.what.clone()))?;
                buf.copy_from_slice(s);
            }
            SourceInner::Owned(b) => {
                let s = b.get(pos as usize..end as usize).ok_or_else(|| WriteError::SourceChanged(self.what.clone()))?;
                buf.copy_from_slice(s);
            }
            SourceInner::Tail { start, bytes } => {
                let s = pos
                    .checked_sub(*start)
                    .and_then(|o| bytes.get(o as usize..(o + buf.len() as u64) as usize))
                    .ok_or_else(|| invalid("internal error: a read outside a file's tail"))?;
                buf.copy_from_slice(s);
            }
            SourceInner::File { reader, base } => {
                reader.read_exact_at(buf, base + pos).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        WriteError::SourceChanged(self.what.clone())
                    } else {
                        WriteError::io(format!("cannot read {}", self.what), e)
                    }
                })?;
            }
        }
        Ok(())
    }
}

impl<'t> Plan<'t> {
    pub fn summary(&self) -> &ImageSummary {
        &self.summary
    }

    /// First byte of file data (everything before it is metadata).
    pub fn metadata_end(&self) -> u64 {
        self.summary.metadata_end
    }

    /// The nid the inode got (`None` if it is not reachable).
    pub fn nid(&self, id: InodeId) -> Option<u64> {
        self.slot_of.get(&id).map(|s| self.inodes[*s].nid())
    }

    /// Byte range of the inode's data in the image (its own blocks).
    pub fn data_range(&self, id: InodeId) -> Option<std::ops::Range<u64>> {
        let p = &self.inodes[*self.slot_of.get(&id)?];
        let bs = self.summary.block_size as u64;
        (p.owned_blocks > 0).then(|| p.start_block * bs..(p.start_block + p.owned_blocks) * bs)
    }

    fn nid_of(&self, id: &InodeId) -> u64 {
        self.slot_of.get(id).map(|s| self.inodes[*s].nid()).unwrap_or(0)
    }

    /// Writes the image to `out` (positioned anywhere; it is written from
    /// byte 0, and the caller's file should be empty or truncated).
    pub fn write<W: Write + Seek>(&self, out: &mut W, files: &dyn FileReader) -> Result<ImageSummary, WriteError> {
        self.write_with_progress(out, files, &NoProgress)
    }

    pub fn write_with_progress<W: Write + Seek>(
        &self,
        out: &mut W,
        files: &dyn FileReader,
        progress: &dyn Progress,
    ) -> Result<ImageSummary, WriteError> {
        let bs = self.summary.block_size as u64;
        let io = |e| WriteError::io("cannot write the image", e);
        // Data first, so the metadata (whose checksum covers the first block)
        // is written once and last.
        out.seek(SeekFrom::Start(self.summary.metadata_end)).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *out);
        let mut block = self.summary.metadata_end / bs;
        let total = self.summary.data_bytes;
        let mut buf = Vec::new();
        let mut cbuf = Vec::new();
        for &s in &self.data_order {
            let p = &self.inodes[s];
            if p.start_block != block {
                return Err(invalid("internal error: data placement mismatch"));
            }
            let mut src = ContentSource::open(self.tree, p.id, files)?;
            let written = self.write_data(p, &mut src, &mut w, &mut buf, &mut cbuf)?;
            if written != p.owned_blocks * bs {
                return Err(WriteError::SourceChanged(src.what.clone()));
            }
            block += p.owned_blocks;
            progress.update("writing", (block * bs).saturating_sub(self.summary.metadata_end), total);
        }
        w.flush().map_err(io)?;
        drop(w);
        let meta = self.encode_metadata(files)?;
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        out.write_all(&meta).map_err(io)?;
        out.flush().map_err(io)?;
        Ok(self.summary.clone())
    }

    /// Writes one inode's data-area blocks; returns the bytes written.
    fn write_data(
        &self,
        p: &InodePlan,
        src: &mut ContentSource,
        w: &mut impl Write,
        buf: &mut Vec<u8>,
        cbuf: &mut Vec<u8>,
    ) -> Result<u64, WriteError> {
        let bs = self.summary.block_size as u64;
        let io = |e| WriteError::io("cannot write the image", e);
        let mut written = 0u64;
        let copy = |src: &mut ContentSource, w: &mut dyn Write, from: u64, len: u64, buf: &mut Vec<u8>| -> Result<u64, WriteError> {
            // `len` source bytes, zero-padded to whole blocks.
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(1 << 20);
                buf.resize(n as usize, 0);
                src.read(from + pos, buf)?;
                w.write_all(buf).map_err(io)?;
                pos += n;
            }
            let pad = len.next_multiple_of(bs) - len;
            if pad > 0 {
                w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            }
            Ok(len + pad)
        };
        match &p.body {
            Body::Flat { blocks, .. } => {
                let len = (blocks * bs).min(src.size);
                written += copy(src, w, 0, len, buf)?;
            }
            Body::Chunked { chunk_bits, chunks, .. } => {
                let chunk = 1u64 << chunk_bits;
                for (i, c) in chunks.iter().enumerate() {
                    if let ChunkPlan::Local { .. } = c {
                        let start = i as u64 * chunk;
                        let len = chunk.min(src.size - start);
                        written += copy(src, w, start, len, buf)?;
                    }
                }
            }
            Body::Compressed { extent_bytes, extents } => {
                let mut pos = 0u64;
                for kind in extents {
                    let len = (*extent_bytes).min(src.size - pos);
                    buf.resize(len as usize, 0);
                    src.read(pos, buf)?;
                    match compress::compress_extent(buf, bs as usize, cbuf) {
                        k if k == *kind => {}
                        _ => return Err(WriteError::SourceChanged(src.what.clone())),
                    }
                    match kind {
                        ExtentKind::Compressed(n) => {
                            let room = u64::from(*n) * bs;
                            let pad = room - cbuf.len() as u64;
                            w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
                            w.write_all(cbuf).map_err(io)?;
                            written += room;
                        }
                        ExtentKind::Plain => {
                            w.write_all(buf).map_err(io)?;
                            let pad = len.next_multiple_of(bs) - len;
                            w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
                            written += len + pad;
                        }
                    }
                    pos += len;
                }
            }
            _ => {}
        }
        Ok(written)
    }

    /// Serialises everything before `metadata_end`.
    fn encode_metadata(&self, files: &dyn FileReader) -> Result<Vec<u8>, WriteError> {
        let bs = self.summary.block_size as u64;
        let mut meta = vec![0u8; self.summary.metadata_end as usize];
        let opts = &self.opts;

        let mut incompat = 0;
        let mut u1 = 0;
        if let Some(off) = self.cfgs_offset {
            incompat |= ondisk::FEATURE_INCOMPAT_ZERO_PADDING | ondisk::FEATURE_INCOMPAT_COMPR_CFGS;
            if self.copied_inline {
                incompat |= ondisk::FEATURE_INCOMPAT_ZTAILPACKING;
            }
            u1 = 1 << ondisk::COMPRESSION_LZ4;
            let blocks = (compressed_extent_bytes(opts) / bs).max(u64::from(self.copied_max_pcluster));
            let rec = ondisk::encode_lz4_cfgs(u16::MAX, blocks as u16);
            meta[off as usize..off as usize + 16].copy_from_slice(&rec);
        }
        if self.inodes.iter().any(|p| matches!(p.body, Body::Chunked { .. })) {
            incompat |= ondisk::FEATURE_INCOMPAT_CHUNKED_FILE;
        }
        let mut devt_slotoff = 0;
        if let Some(off) = self.devt_offset {
            incompat |= ondisk::FEATURE_INCOMPAT_DEVICE_TABLE;
            devt_slotoff = (off / ondisk::DEVICE_SLOT_SIZE as u64) as u16;
            for (i, d) in opts.devices.iter().enumerate() {
                let at = off as usize + i * ondisk::DEVICE_SLOT_SIZE;
                meta[at..at + ondisk::DEVICE_SLOT_SIZE]
                    .copy_from_slice(&ondisk::encode_device_slot(&d.tag, d.blocks, d.uniaddr));
            }
        }
        let sb = SuperBlock {
            feature_compat: ondisk::FEATURE_COMPAT_SB_CHKSUM,
            blkszbits: opts.block_bits,
            root_nid: self.inodes[self.root].nid() as u16,
            inos: self.inodes.len() as u64,
            epoch: self.epoch.0 as u64,
            fixed_nsec: self.epoch.1,
            blocks: (self.summary.image_size / bs) as u32,
            meta_blkaddr: 0,
            xattr_blkaddr: 0,
            uuid: if opts.derive_uuid { [0; 16] } else { opts.uuid },
            volume_name: opts.volume_name,
            feature_incompat: incompat,
            u1,
            extra_devices: opts.devices.len() as u16,
            devt_slotoff,
        };
        let sbo = SUPERBLOCK_OFFSET as usize;
        meta[sbo..sbo + ondisk::SB_SIZE].copy_from_slice(&sb.encode());

        for (x, off) in &self.shared {
            let mut e = Vec::new();
            ondisk::encode_xattr_entry(x.index, &x.suffix, &x.value, &mut e);
            meta[*off as usize..*off as usize + e.len()].copy_from_slice(&e);
        }

        let mut rec = Vec::new();
        for p in &self.inodes {
            rec.clear();
            p.fields.encode_into(&mut rec);
            if p.xattr_size > 0 {
                let ids: Vec<u32> = p.shared.iter().map(|i| (self.shared[*i].1 / 4) as u32).collect();
                ondisk::encode_xattr_ibody_header(&ids, &mut rec);
                for x in &p.inline_xattrs {
                    ondisk::encode_xattr_entry(x.index, &x.suffix, &x.value, &mut rec);
                }
            }
            match &p.body {
                Body::Flat { blocks, tail, .. } if *tail > 0 => {
                    let mut t = vec![0u8; *tail];
                    self.read_content(p, blocks * bs, &mut t, files)?;
                    rec.extend_from_slice(&t);
                }
                Body::FlatTail { tail, .. } => {
                    let mut t = vec![0u8; *tail];
                    self.read_content(p, p.fields.size - *tail as u64, &mut t, files)?;
                    rec.extend_from_slice(&t);
                }
                Body::Copied(c) => {
                    rec.resize(rec.len().next_multiple_of(8), 0);
                    rec.extend_from_slice(&c.header);
                    rec.extend_from_slice(&[0u8; 8]);
                    for e in &c.indexes {
                        rec.extend_from_slice(e);
                    }
                    if let Some(i) = &c.inline {
                        rec.extend_from_slice(i);
                    }
                }
                Body::Chunked { unit, chunks, .. } => {
                    rec.resize(rec.len().next_multiple_of(*unit), 0);
                    for c in chunks {
                        let (device, block) = match *c {
                            ChunkPlan::Hole => (0, None),
                            ChunkPlan::External { device, block } => (device, Some(block as u32)),
                            ChunkPlan::Local { offset_blocks, .. } => {
                                (0, Some((p.start_block + offset_blocks) as u32))
                            }
                        };
                        if *unit == 8 {
                            rec.extend_from_slice(&ondisk::encode_chunk_index(device, block));
                        } else {
                            rec.extend_from_slice(&block.unwrap_or(ondisk::NULL_ADDR_32).to_le_bytes());
                        }
                    }
                }
                Body::Compressed { extent_bytes, extents } => {
                    rec.resize(rec.len().next_multiple_of(8), 0);
                    rec.extend_from_slice(&ondisk::encode_z_map_header(ondisk::Z_ADVISE_BIG_PCLUSTER_1));
                    rec.extend_from_slice(&[0u8; 8]);
                    let mut lcs: Vec<Lcluster> = Vec::new();
                    let mut blk = p.start_block;
                    let mut pos = 0u64;
                    for kind in extents {
                        let len = (*extent_bytes).min(p.fields.size - pos);
                        compress::extent_indexes(*kind, len, bs, blk as u32, &mut lcs);
                        blk += match kind {
                            ExtentKind::Compressed(n) => u64::from(*n),
                            ExtentKind::Plain => len.div_ceil(bs),
                        };
                        pos += len;
                    }
                    for l in &lcs {
                        rec.extend_from_slice(&l.encode());
                    }
                }
                _ => {}
            }
            if rec.len() != p.record_size {
                return Err(invalid("internal error: inode record size mismatch"));
            }
            let off = p.offset as usize;
            meta[off..off + rec.len()].copy_from_slice(&rec);

            // Blocks in the metadata area: directories and symlinks.
            if let Body::Flat { area: Area::Meta, blocks, .. } = &p.body {
                if *blocks > 0 {
                    let start = (p.start_block * bs) as usize;
                    let len = (blocks * bs).min(p.fields.size) as usize;
                    let mut b = vec![0u8; len];
                    self.read_content(p, 0, &mut b, files)?;
                    meta[start..start + len].copy_from_slice(&b);
                }
            }
        }
        if opts.derive_uuid {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(&meta);
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&digest[..16]);
            // RFC 9562 version 8 (custom), variant 10.
            uuid[6] = (uuid[6] & 0x0f) | 0x80;
            uuid[8] = (uuid[8] & 0x3f) | 0x80;
            meta[sbo + 48..sbo + 64].copy_from_slice(&uuid);
        }
        ondisk::seal_checksum(&mut meta, bs as usize);
        Ok(meta)
    }

    /// Bytes `[pos, pos + buf.len())` of an inode's content (directories are
    /// generated here with nids resolved).
    fn read_content(&self, p: &InodePlan, pos: u64, buf: &mut [u8], files: &dyn FileReader) -> Result<(), WriteError> {
        if let Some(layout) = self.dirs.get(&p.id) {
            let bs = self.summary.block_size as usize;
            let mut all = Vec::with_capacity(p.fields.size as usize);
            for i in 0..layout.blocks.len() {
                let mut b = layout.encode_block(i, |t| self.nid_of(t));
                if i + 1 < layout.blocks.len() {
                    b.resize(bs, 0);
                }
                all.extend_from_slice(&b);
            }
            let s = all
                .get(pos as usize..pos as usize + buf.len())
                .ok_or_else(|| invalid("internal error: directory read out of range"))?;
            buf.copy_from_slice(s);
            return Ok(());
        }
        let mut src = ContentSource::open(self.tree, p.id, files)?;
        src.read(pos, buf)
    }
}

/// [`plan`] and [`Plan::write`] in one call.
pub fn write_image<W: Write + Seek>(
    tree: &Tree,
    opts: &WriterOptions,
    files: &dyn FileReader,
    out: &mut W,
) -> Result<ImageSummary, WriteError> {
    plan(tree, opts, files)?.write(out, files)
}
