//! Merging EROFS layers into one metadata image (DESIGN §7 "merged layers").
//!
//! The layers of a container image are applied in order with overlayfs'
//! rules: a later layer's entry replaces an earlier one at the same path; a
//! whiteout (a character device 0:0) deletes the path; a directory with
//! `trusted.overlay.opaque=y` hides everything below it in earlier layers;
//! a directory over a directory merges, taking the upper one's owner, mode,
//! times and xattrs. Hard links within a layer stay hard links. What
//! overlayfs never shows is dropped: whiteouts, and `trusted.overlay.*`
//! xattrs.
//!
//! Nothing of a file's data is copied: the merged image is metadata whose
//! files point into their layer's blob, which sits whole at some base of
//! the one flat address space (`[merged metadata | blob 0 | blob 1 | …]`):
//! flat and chunk-based files by flat block address, inline files by their
//! blocks plus the tail the merged inode carries, lz4 files by their
//! compression map with the block addresses moved by the base. The merged
//! image's device table lists the blobs (tag = hex digest, `uniaddr` = base),
//! so it is itself a valid multi-blob image of those blobs.
//!
//! Pure: trees in ([`crate::erofs::reader`]), a writer tree and image bytes
//! out.

pub mod layout;
pub mod tar;

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;

use crate::erofs::format::{feature, ChunkTarget};
use crate::erofs::reader::{rebase_full_indexes, FileMap, ImageTree, TreeBody, TreeInode};
use crate::erofs::writer::{
    self, Chunk, ChunkedData, CompressedData, Device, FileData, ImageSummary, Inode, InodeId, Kind, Metadata, NoFiles,
    Tree, WriterOptions,
};

/// One layer as the merge sees it: its tree and where its blobs are in the
/// merged address space.
#[derive(Clone, Debug)]
pub struct LayerView<'a> {
    /// For messages (e.g. `sha256:0123abcd`).
    pub name: String,
    pub tree: &'a ImageTree,
    /// Bytes of the layer's primary blob.
    pub primary_size: u64,
    /// Merged-space byte offset of the primary blob.
    pub primary_base: u64,
    /// The layer's devices: where each sits in the layer's own flat space
    /// and where its blob is in the merged one.
    pub devices: Vec<DeviceBase>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBase {
    /// Bytes `[start, start + len)` of the layer's own flat space.
    pub start: u64,
    pub len: u64,
    /// Merged-space byte offset of the device's blob.
    pub base: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("layer {layer}: {what}")]
    Unsupported { layer: String, what: String },
    #[error("layer {layer}: {what}")]
    Corrupt { layer: String, what: String },
    #[error("the merged image cannot be written: {0}")]
    Write(String),
}

/// Counts of what the merge did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeStats {
    pub layers: usize,
    /// Entries (names) in the merged tree, the root excluded.
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Entries of a lower layer replaced by an upper one.
    pub replaced: u64,
    pub compressed_files: u64,
    pub inline_tails: u64,
}

const OPAQUE: &[u8] = b"trusted.overlay.opaque";

fn is_whiteout(i: &TreeInode) -> bool {
    matches!(i.body, TreeBody::CharDevice { major: 0, minor: 0 })
}

fn is_opaque(i: &TreeInode) -> bool {
    i.xattrs.get(OPAQUE).is_some_and(|v| v.as_slice() == b"y")
}

fn metadata(i: &TreeInode) -> Metadata {
    Metadata::new(i.permissions(), i.uid, i.gid, i.mtime, i.mtime_nsec)
}

/// Xattrs as the merged view shows them: overlayfs' own are gone.
fn visible_xattrs(i: &TreeInode) -> BTreeMap<Vec<u8>, Vec<u8>> {
    i.xattrs.iter().filter(|(k, _)| !k.starts_with(b"trusted.overlay.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Applies the layers, lowest first, into one writer tree whose files point
/// at flat blocks of `block_bits`-sized blocks.
pub fn merge_layers(layers: &[LayerView], block_bits: u8) -> Result<(Tree, MergeStats), MergeError> {
    let mut stats = MergeStats { layers: layers.len(), ..MergeStats::default() };
    let first = layers.first().ok_or_else(|| MergeError::Write("no layers to merge".into()))?;
    let root_meta = first.tree.get(first.tree.root).map(metadata).unwrap_or(Metadata::with_permissions(0o755));
    let mut tree = Tree::new(root_meta);
    for layer in layers {
        let mut m = Merger { layer, block_bits, tree: &mut tree, files: HashMap::new(), stats: &mut stats };
        m.check_features()?;
        let root = m.inode(layer.tree.root)?.clone();
        let troot = m.tree.root();
        if is_opaque(&root) {
            if let Kind::Directory(e) = &mut m.tree.get_mut(troot).kind {
                e.clear();
            }
            m.stats.opaque_dirs += 1;
        }
        let r = m.tree.get_mut(troot);
        r.meta = metadata(&root);
        r.xattrs = visible_xattrs(&root);
        m.apply_dir(layer.tree.root, troot, 0)?;
    }
    stats.entries = count_entries(&tree);
    Ok((tree, stats))
}

fn count_entries(tree: &Tree) -> u64 {
    let mut n = 0;
    let mut stack = vec![tree.root()];
    while let Some(d) = stack.pop() {
        if let Kind::Directory(e) = &tree.get(d).kind {
            for c in e.values() {
                n += 1;
                if tree.get(*c).kind.is_dir() {
                    stack.push(*c);
                }
            }
        }
    }
    n
}

struct Merger<'a, 'l> {
    layer: &'a LayerView<'l>,
    block_bits: u8,
    tree: &'a mut Tree,
    /// This layer's non-directory inodes already added (hard links).
    files: HashMap<u64, InodeId>,
    stats: &'a mut MergeStats,
}

impl Merger<'_, '_> {
    fn unsupported(&self, what: impl Into<String>) -> MergeError {
        MergeError::Unsupported { layer: self.layer.name.clone(), what: what.into() }
    }

    fn corrupt(&self, what: impl Into<String>) -> MergeError {
        MergeError::Corrupt { layer: self.layer.name.clone(), what: what.into() }
    }

    fn inode(&self, nid: u64) -> Result<&TreeInode, MergeError> {
        self.layer.tree.get(nid).ok_or_else(|| self.corrupt(format!("nid {nid} was not read")))
    }

    fn check_features(&self) -> Result<(), MergeError> {
        let lb = self.layer.tree.block_bits();
        if lb < self.block_bits {
            return Err(self.unsupported(format!(
                "{}-byte blocks, smaller than the merged image's {}",
                1u32 << lb,
                1u32 << self.block_bits
            )));
        }
        Ok(())
    }

    fn apply_dir(&mut self, dir: u64, tdir: InodeId, depth: u32) -> Result<(), MergeError> {
        if depth > 4096 {
            return Err(self.corrupt("directories nested too deep"));
        }
        let entries = match &self.inode(dir)?.body {
            TreeBody::Directory(e) => e.clone(),
            _ => return Err(self.corrupt(format!("nid {dir} is not a directory"))),
        };
        for e in entries {
            let inode = self.inode(e.nid)?.clone();
            let existing = self.tree.lookup(tdir, &e.name);
            if is_whiteout(&inode) {
                if self.tree.unlink(tdir, &e.name).is_some() {
                    self.stats.whiteouts += 1;
                }
                continue;
            }
            if existing.is_some() {
                self.stats.replaced += 1;
            }
            if let TreeBody::Directory(_) = inode.body {
                let opaque = is_opaque(&inode);
                self.stats.opaque_dirs += u64::from(opaque);
                let target = match existing {
                    Some(id) if self.tree.get(id).kind.is_dir() && !opaque => {
                        let d = self.tree.get_mut(id);
                        d.meta = metadata(&inode);
                        d.xattrs = visible_xattrs(&inode);
                        id
                    }
                    _ => {
                        let mut d = Inode::dir(metadata(&inode));
                        d.xattrs = visible_xattrs(&inode);
                        let id = self.tree.add(d);
                        self.tree.link(tdir, &e.name, id).map_err(|err| self.corrupt(err.to_string()))?;
                        id
                    }
                };
                self.apply_dir(e.nid, target, depth + 1)?;
                continue;
            }
            let id = match self.files.get(&e.nid) {
                Some(id) => *id,
                None => {
                    let made = self.file_inode(&inode)?;
                    let id = self.tree.add(made);
                    self.files.insert(e.nid, id);
                    id
                }
            };
            self.tree.link(tdir, &e.name, id).map_err(|err| self.corrupt(err.to_string()))?;
        }
        Ok(())
    }

    fn file_inode(&mut self, i: &TreeInode) -> Result<Inode, MergeError> {
        let kind = match &i.body {
            TreeBody::Directory(_) => return Err(self.corrupt("internal: a directory as a file")),
            TreeBody::Symlink(t) => Kind::Symlink(t.clone()),
            TreeBody::CharDevice { major, minor } => Kind::CharDevice { major: *major, minor: *minor },
            TreeBody::BlockDevice { major, minor } => Kind::BlockDevice { major: *major, minor: *minor },
            TreeBody::Fifo => Kind::Fifo,
            TreeBody::Socket => Kind::Socket,
            TreeBody::Regular { size, data } => Kind::Regular { size: *size, data: self.file_data(i.nid, *size, data)? },
        };
        let mut inode = Inode::new(metadata(i), kind);
        inode.xattrs = visible_xattrs(i);
        Ok(inode)
    }

    /// Merged-space byte offset of `len` bytes at block `block` of `device`
    /// (0: the layer's flat address space).
    fn flat_byte(&self, nid: u64, device: u16, block: u64, len: u64) -> Result<u64, MergeError> {
        let lb = self.layer.tree.block_bits();
        let bad = || self.corrupt(format!("nid {nid}: data at device {device} block {block} lies outside the layer's blobs"));
        let a = block.checked_shl(u32::from(lb)).filter(|a| a >> lb == block).ok_or_else(bad)?;
        let end = a.checked_add(len).ok_or_else(bad)?;
        let byte = if device == 0 {
            if end <= self.layer.primary_size.next_multiple_of(1 << lb) {
                self.layer.primary_base + a
            } else {
                // A flat address past the primary blob: inside one device.
                let d = self.layer.devices.iter().find(|d| a >= d.start && end <= d.start + d.len.next_multiple_of(1 << lb)).ok_or_else(bad)?;
                d.base + (a - d.start)
            }
        } else {
            let d = self.layer.devices.get(usize::from(device) - 1).ok_or_else(bad)?;
            if end > d.len.next_multiple_of(1 << lb) {
                return Err(bad());
            }
            d.base + a
        };
        if byte % (1u64 << self.block_bits) != 0 {
            return Err(self.corrupt(format!("nid {nid}: data not aligned to the merged block size")));
        }
        Ok(byte >> self.block_bits)
    }

    fn file_data(&mut self, nid: u64, size: u64, data: &FileMap) -> Result<FileData, MergeError> {
        let lb = self.layer.tree.block_bits();
        let lbs = 1u64 << lb;
        Ok(match data {
            FileMap::Empty => FileData::Empty,
            FileMap::Flat { block } => FileData::FlatAddress { block: self.flat_byte(nid, 0, *block, size)? },
            FileMap::Inline { block: None, tail } => FileData::Bytes(Arc::from(tail.as_slice())),
            FileMap::Inline { block: Some(b), tail } => {
                let whole = size - tail.len() as u64;
                self.stats.inline_tails += 1;
                FileData::FlatTail { block: self.flat_byte(nid, 0, *b, whole)?, tail: Arc::from(tail.as_slice()) }
            }
            FileMap::Chunked { chunk_bits, chunks } => {
                let csize = 1u64 << chunk_bits;
                let mut out = Vec::with_capacity(chunks.len());
                for (i, c) in chunks.iter().enumerate() {
                    let len = csize.min(size - i as u64 * csize).next_multiple_of(lbs);
                    out.push(match *c {
                        ChunkTarget::Hole => Chunk::Hole,
                        ChunkTarget::Primary(b) => Chunk::At { device: 0, block: self.flat_byte(nid, 0, b, len)? },
                        ChunkTarget::OtherDevice { device, blkaddr } => {
                            Chunk::At { device: 0, block: self.flat_byte(nid, device, blkaddr, len)? }
                        }
                    });
                }
                let chunk_bits = u8::try_from(*chunk_bits).map_err(|_| self.corrupt(format!("nid {nid}: chunk bits")))?;
                if chunk_bits > self.block_bits + 31 {
                    return Err(self.unsupported(format!("nid {nid}: chunks of 2^{chunk_bits} bytes")));
                }
                FileData::Chunked(ChunkedData { chunk_bits, chunks: out })
            }
            FileMap::Compressed(m) => {
                let sb = &self.layer.tree.sb;
                if lb != self.block_bits {
                    return Err(self.unsupported(format!(
                        "nid {nid}: a compressed file with {}-byte blocks in a merge of {}-byte blocks",
                        lbs,
                        1u32 << self.block_bits
                    )));
                }
                if !sb.has_incompat(feature::INCOMPAT_ZERO_PADDING) {
                    return Err(self.unsupported("lz4 without zero padding (made by an old mkfs.erofs)"));
                }
                // Every pcluster must be in the primary blob: one base moves them all.
                let primary_blocks = self.layer.primary_size.div_ceil(lbs);
                for (lcn, e) in m.indexes.iter().enumerate() {
                    if crate::erofs::reader::full_index_is_head(e) && Some(lcn as u64) != m.inline_head() {
                        let blk = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
                        let start = ((lcn as u64) << m.lclusterbits) + u64::from(u16::from_le_bytes([e[2], e[3]]));
                        if start < size && blk >= primary_blocks {
                            return Err(self.unsupported(format!("nid {nid}: compressed data outside the layer's primary blob")));
                        }
                    }
                }
                let base = self.layer.primary_base >> self.block_bits;
                let indexes = rebase_full_indexes(&m.indexes, base, m.inline_head(), size, m.lclusterbits)
                    .map_err(|e| self.unsupported(format!("nid {nid}: {e}")))?;
                let mut header = m.header;
                // Bit 0 is COMPACTED_2B for compact indexes, EXTENTS for full ones.
                header[4] &= !1;
                self.stats.compressed_files += 1;
                FileData::Compressed(Arc::new(CompressedData {
                    header,
                    indexes,
                    inline: m.inline.as_ref().map(|(_, b)| Arc::from(b.as_slice())),
                    compressed_blocks: m.compressed_blocks,
                    max_pcluster_blocks: m.max_pcluster_blocks,
                }))
            }
        })
    }
}

/// A blob of the merged address space, for its device table slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedBlob {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub base: u64,
}

/// The writer options of a merged image: reproducible, no compression of
/// its own, one device slot per blob (tag = hex digest, `uniaddr` = base).
pub fn merged_options(block_bits: u8, blobs: &[PlacedBlob]) -> Result<WriterOptions, MergeError> {
    let bs = 1u64 << block_bits;
    let mut devices = Vec::with_capacity(blobs.len());
    for b in blobs {
        let mut tag = [0u8; 64];
        let hex = b.digest.strip_prefix("sha256:").unwrap_or(&b.digest).as_bytes();
        let n = hex.len().min(64);
        tag[..n].copy_from_slice(&hex[..n]);
        let blocks = u32::try_from(b.size.div_ceil(bs)).map_err(|_| MergeError::Write(format!("blob {} has more than 2^32 blocks", b.digest)))?;
        let uniaddr = u32::try_from(b.base / bs)
            .ok()
            .filter(|u| u.checked_add(blocks).is_some())
            .ok_or_else(|| MergeError::Write("the merged address space exceeds 2^32 blocks".into()))?;
        devices.push(Device { tag, blocks, uniaddr });
    }
    Ok(WriterOptions {
        block_bits,
        derive_uuid: true,
        devices,
        ..WriterOptions::default()
    })
}

/// Writes a merged tree (nothing of it is read from files: its data is external or in memory).
pub fn write_merged(tree: &Tree, opts: &WriterOptions) -> Result<(Vec<u8>, ImageSummary), MergeError> {
    let mut out = Cursor::new(Vec::new());
    let summary = writer::write_image(tree, opts, &NoFiles, &mut out).map_err(|e| MergeError::Write(e.to_string()))?;
    Ok((out.into_inner(), summary))
}

/// The size the merged image of `layers` will have once written with
/// `opts` (the layout pass alone).
pub fn planned_size(tree: &Tree, opts: &WriterOptions) -> Result<u64, MergeError> {
    writer::plan(tree, opts, &NoFiles).map(|p| p.summary().image_size).map_err(|e| MergeError::Write(e.to_string()))
}

/// A merged metadata image and the address space it describes.
#[derive(Clone, Debug)]
pub struct MergedImage {
    /// The image: the address space's first bytes.
    pub image: Vec<u8>,
    pub summary: ImageSummary,
    /// Every blob, in manifest order, at its base.
    pub blobs: Vec<PlacedBlob>,
    /// Bytes of the whole address space (`[image | blob 0 | blob 1 | …]`).
    pub size: u64,
    pub block_bits: u8,
    pub stats: MergeStats,
}

/// Merges the filesystems of an image (`groups` over `blobs`, one read
/// tree per group, in order) into a merged image and its address space.
pub fn build_merged(
    blobs: &[layout::BlobInfo],
    groups: &[layout::FsGroup],
    trees: &[ImageTree],
) -> Result<MergedImage, MergeError> {
    build_merged_aligned(blobs, groups, trees, layout::BLOB_ALIGN)
}

/// [`build_merged`] with every blob at a base aligned to `align` (see
/// [`layout::place_blobs`]).
pub fn build_merged_aligned(
    blobs: &[layout::BlobInfo],
    groups: &[layout::FsGroup],
    trees: &[ImageTree],
    align: u64,
) -> Result<MergedImage, MergeError> {
    if groups.len() != trees.len() || groups.is_empty() {
        return Err(MergeError::Write("internal: one tree per filesystem".into()));
    }
    let block_bits = groups.iter().map(|g| g.block_bits).min().unwrap_or(12);
    if !(9..=12).contains(&block_bits) {
        return Err(MergeError::Unsupported {
            layer: short(&blobs[groups[0].primary].digest),
            what: format!("{}-byte blocks (the merge writes 512 B to 4 KiB blocks)", 1u64 << block_bits),
        });
    }
    let sizes: Vec<u64> = blobs.iter().map(|b| b.size).collect();
    let too_big = || MergeError::Write("the merged address space overflows".into());
    let assemble = |head: u64| -> Result<(Tree, MergeStats, WriterOptions, Vec<PlacedBlob>, u64), MergeError> {
        let (bases, size) = layout::place_blobs(head, &sizes, align).ok_or_else(too_big)?;
        let placed: Vec<PlacedBlob> = blobs
            .iter()
            .zip(&bases)
            .map(|(b, base)| PlacedBlob { digest: b.digest.clone(), size: b.size, base: *base })
            .collect();
        let views: Vec<LayerView> = groups
            .iter()
            .zip(trees)
            .map(|(g, t)| LayerView {
                name: short(&blobs[g.primary].digest),
                tree: t,
                primary_size: blobs[g.primary].size,
                primary_base: bases[g.primary],
                devices: g.devices.iter().map(|d| DeviceBase { start: d.start, len: d.len, base: bases[d.blob] }).collect(),
            })
            .collect();
        let (tree, stats) = merge_layers(&views, block_bits)?;
        let opts = merged_options(block_bits, &placed)?;
        Ok((tree, stats, opts, placed, size))
    };
    build_in_two_passes(assemble, block_bits)
}

/// A merged tree, its stats, writer options, blobs placed and the address space's size, for the
/// merged image written at byte 0 with `head` bytes.
pub(crate) type Assembled = (Tree, MergeStats, WriterOptions, Vec<PlacedBlob>, u64);

/// The image's size does not depend on the addresses in it: lay it out once
/// to learn where the blobs go, then build it with them there.
pub(crate) fn build_in_two_passes(
    assemble: impl Fn(u64) -> Result<Assembled, MergeError>,
    block_bits: u8,
) -> Result<MergedImage, MergeError> {
    let (tree, _, opts, _, _) = assemble(0)?;
    let head = planned_size(&tree, &opts)?;
    let (tree, stats, opts, blobs, size) = assemble(head)?;
    let (image, summary) = write_merged(&tree, &opts)?;
    if image.len() as u64 != head {
        return Err(MergeError::Write(format!("internal: the merged image is {} bytes, planned {head}", image.len())));
    }
    Ok(MergedImage { image, summary, blobs, size, block_bits, stats })
}

/// `sha256:0123456789ab` for messages.
pub fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

#[cfg(test)]
mod tests;
