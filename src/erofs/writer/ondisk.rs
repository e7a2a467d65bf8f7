//! Every on-disk structure the writer emits, serialised in one place
//! (little-endian, layouts of Linux `fs/erofs/erofs_fs.h`).

use crate::erofs::format::{EROFS_MAGIC, SUPERBLOCK_OFFSET};

pub const SB_SIZE: usize = 128;
pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const DEVICE_SLOT_SIZE: usize = 128;
pub const NULL_ADDR_32: u32 = u32::MAX;

pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
pub const FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x1;
pub const FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x2;
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;
pub const FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x10;

pub const LAYOUT_FLAT_PLAIN: u16 = 0;
pub const LAYOUT_COMPRESSED_FULL: u16 = 1;
pub const LAYOUT_FLAT_INLINE: u16 = 2;
pub const LAYOUT_CHUNK_BASED: u16 = 4;

pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;

pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

pub const Z_ADVISE_BIG_PCLUSTER_1: u16 = 0x2;
pub const Z_ADVISE_INLINE_PCLUSTER: u16 = 0x8;
pub const LCLUSTER_TYPE_PLAIN: u16 = 0;
pub const LCLUSTER_TYPE_HEAD1: u16 = 1;
pub const LCLUSTER_TYPE_NONHEAD: u16 = 2;
pub const LI_D0_CBLKCNT: u16 = 1 << 11;
pub const COMPRESSION_LZ4: u8 = 0;

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct erofs_super_block` (the fields we set; the rest stays zero).
#[derive(Clone, Debug, Default)]
pub struct SuperBlock {
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    pub inos: u64,
    pub epoch: u64,
    pub fixed_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    /// `available_compr_algs` with COMPR_CFGS, else `lz4_max_distance`.
    pub u1: u16,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
}

impl SuperBlock {
    pub fn encode(&self) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        put32(&mut b, 0, EROFS_MAGIC);
        // 4: checksum, filled in last (see `seal_checksum`).
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        b[13] = 0; // sb_extslots
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.epoch);
        put32(&mut b, 32, self.fixed_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        put16(&mut b, 84, self.u1);
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        b
    }
}

/// Writes the superblock checksum into `image` (which starts at byte 0 and
/// holds at least the first block): crc32c (seed !0, no final inversion)
/// of the block from byte 1024 (the whole block for blocks ≤ 1 KiB), with the
/// checksum field counted as zero — what `erofs_superblock_csum_verify` checks.
pub fn seal_checksum(image: &mut [u8], block_size: usize) -> u32 {
    let start = SUPERBLOCK_OFFSET as usize;
    let len = if block_size > start {
        block_size - start
    } else {
        block_size
    };
    put32(image, start + 4, 0);
    let crc = crate::erofs::format::crc32c(!0, &image[start..start + len]);
    put32(image, start + 4, crc);
    crc
}

/// `struct erofs_deviceslot`.
pub fn encode_device_slot(tag: &[u8; 64], blocks: u32, uniaddr: u32) -> [u8; DEVICE_SLOT_SIZE] {
    let mut b = [0u8; DEVICE_SLOT_SIZE];
    b[..64].copy_from_slice(tag);
    put32(&mut b, 64, blocks);
    put32(&mut b, 68, uniaddr);
    b
}

/// The lz4 record of the compression configuration list that follows the
/// superblock with COMPR_CFGS: `le16 size` then `struct z_erofs_lz4_cfgs`.
pub fn encode_lz4_cfgs(max_distance: u16, max_pclusterblks: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    put16(&mut b, 0, 14);
    put16(&mut b, 2, max_distance);
    put16(&mut b, 4, max_pclusterblks);
    b
}

/// The fixed part of an on-disk inode, compact or extended.
#[derive(Clone, Debug, Default)]
pub struct InodeFields {
    pub extended: bool,
    pub layout: u16,
    pub xattr_icount: u16,
    /// Full `i_mode` (type and permissions).
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// Start block, rdev, chunk format or compressed block count.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
}

impl InodeFields {
    pub fn encoded_size(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    /// Appends the inode to `out`. Compact inodes carry no time of their
    /// own: their mtime is the superblock's epoch (the caller only makes an
    /// inode compact when the values fit).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + self.encoded_size(), 0);
        let b = &mut out[start..];
        let format = u16::from(self.extended) | (self.layout << 1);
        put16(b, 0, format);
        put16(b, 2, self.xattr_icount);
        put16(b, 4, self.mode);
        if self.extended {
            put64(b, 8, self.size);
            put32(b, 16, self.i_u);
            put32(b, 20, self.ino);
            put32(b, 24, self.uid);
            put32(b, 28, self.gid);
            put64(b, 32, self.mtime);
            put32(b, 40, self.mtime_nsec);
            put32(b, 44, self.nlink);
        } else {
            put16(b, 6, self.nlink as u16);
            put32(b, 8, self.size as u32);
            // 12: i_mtime relative to the epoch: always 0 (see above).
            put32(b, 16, self.i_u);
            put32(b, 20, self.ino);
            put16(b, 24, self.uid as u16);
            put16(b, 26, self.gid as u16);
        }
    }
}

/// `new_encode_dev` of the kernel (what `i_u.rdev` holds).
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The inline xattr body header: `h_name_filter` (0: no filter; the
/// superblock does not claim XATTR_FILTER), the shared count and ids.
pub fn encode_xattr_ibody_header(shared: &[u32], out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(shared.len() as u8);
    out.extend_from_slice(&[0u8; 7]);
    for id in shared {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// One xattr entry (`struct erofs_xattr_entry` + name + value), padded to 4.
pub fn encode_xattr_entry(index: u8, suffix: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.push(suffix.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    let len = out.len() - start;
    out.resize(start + len.next_multiple_of(4), 0);
}

pub fn xattr_entry_size(suffix_len: usize, value_len: usize) -> usize {
    (4 + suffix_len + value_len).next_multiple_of(4)
}

/// `struct erofs_dirent`.
pub fn encode_dirent(nid: u64, nameoff: u16, file_type: u8, out: &mut [u8]) {
    put64(out, 0, nid);
    put16(out, 8, nameoff);
    out[10] = file_type;
    out[11] = 0;
}

/// `struct erofs_inode_chunk_index`.
pub fn encode_chunk_index(device: u16, block: Option<u32>) -> [u8; 8] {
    let mut b = [0u8; 8];
    // startblk_hi stays 0: no 48-bit addressing.
    put16(&mut b, 2, device);
    put32(&mut b, 4, block.unwrap_or(NULL_ADDR_32));
    b
}

/// `struct z_erofs_map_header` for lz4 full indexes with 1-block lclusters.
pub fn encode_z_map_header(advise: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    put16(&mut b, 4, advise);
    b[6] = COMPRESSION_LZ4; // HEAD1 algorithm; HEAD2 unused
    b[7] = 0; // lclusterbits - blkszbits
    b
}

/// A full (non-compact) `struct z_erofs_lcluster_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lcluster {
    /// PLAIN (uncompressed block) or HEAD1 (lz4 pcluster) starting at
    /// `clusterofs` 0 of this lcluster, with its pcluster's first block.
    Head { plain: bool, blkaddr: u32 },
    /// NONHEAD: distance back to the head (or, for the first one after a
    /// big pcluster's head, its compressed block count) and forward to the
    /// next head.
    NonHead { delta0: u16, cblkcnt: Option<u16>, delta1: u16 },
}

impl Lcluster {
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match *self {
            Lcluster::Head { plain, blkaddr } => {
                let ty = if plain {
                    LCLUSTER_TYPE_PLAIN
                } else {
                    LCLUSTER_TYPE_HEAD1
                };
                put16(&mut b, 0, ty);
                put16(&mut b, 2, 0);
                put32(&mut b, 4, blkaddr);
            }
            Lcluster::NonHead {
                delta0,
                cblkcnt,
                delta1,
            } => {
                put16(&mut b, 0, LCLUSTER_TYPE_NONHEAD);
                let d0 = match cblkcnt {
                    Some(n) => LI_D0_CBLKCNT | n,
                    None => delta0,
                };
                put16(&mut b, 4, d0);
                put16(&mut b, 6, delta1);
            }
        }
        b
    }
}
