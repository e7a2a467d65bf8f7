//! EROFS on-disk structures, parsed from untrusted bytes.
//!
//! Layouts follow Linux `fs/erofs/erofs_fs.h` (6.18) and the index decoding
//! follows `fs/erofs/zmap.c` and `fs/erofs/data.c`, so that the walker sees
//! the same block mapping the kernel will use. Every parser takes a byte slice
//! and checks its length; nothing here panics or allocates based on a value
//! read from the image.

use std::ops::Range;

use super::WalkError;

/// Byte offset of the superblock in the image.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const SB_BASE_SIZE: usize = 128;
const SB_EXTSLOT_SIZE: usize = 16;
/// Inode slots are 32 bytes: `offset = meta_blkaddr * block_size + nid * 32`.
pub const INODE_SLOT_SIZE: u64 = 32;
pub const COMPACT_INODE_SIZE: u64 = 32;
pub const EXTENDED_INODE_SIZE: u64 = 64;
pub const DIRENT_SIZE: usize = 12;
pub const NAME_LEN_MAX: usize = 255;
/// Size of one device slot in the device table.
pub const DEVICE_SLOT_SIZE: u64 = 128;

/// Feature bits (`EROFS_FEATURE_*`).
pub mod feature {
    pub const COMPAT_SB_CHKSUM: u32 = 0x0000_0001;

    pub const INCOMPAT_ZERO_PADDING: u32 = 0x0000_0001;
    /// Also `BIG_PCLUSTER`.
    pub const INCOMPAT_COMPR_CFGS: u32 = 0x0000_0002;
    pub const INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
    /// Also `COMPR_HEAD2`.
    pub const INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;
    pub const INCOMPAT_ZTAILPACKING: u32 = 0x0000_0010;
    /// Also `DEDUPE`.
    pub const INCOMPAT_FRAGMENTS: u32 = 0x0000_0020;
    pub const INCOMPAT_XATTR_PREFIXES: u32 = 0x0000_0040;
    pub const INCOMPAT_48BIT: u32 = 0x0000_0080;
    pub const INCOMPAT_METABOX: u32 = 0x0000_0100;

    /// Incompatible features whose on-disk effects the walker understands.
    pub const INCOMPAT_SUPPORTED: u32 = INCOMPAT_ZERO_PADDING
        | INCOMPAT_COMPR_CFGS
        | INCOMPAT_CHUNKED_FILE
        | INCOMPAT_DEVICE_TABLE
        | INCOMPAT_ZTAILPACKING
        | INCOMPAT_FRAGMENTS
        | INCOMPAT_XATTR_PREFIXES
        | INCOMPAT_48BIT;
}

/// Compression map header advise bits (`Z_EROFS_ADVISE_*`).
pub mod zadvise {
    pub const COMPACTED_2B: u16 = 0x0001;
    /// Same bit as `COMPACTED_2B`, meaningful for `COMPRESSED_FULL` inodes only.
    pub const EXTENTS: u16 = 0x0001;
    pub const BIG_PCLUSTER_1: u16 = 0x0002;
    pub const BIG_PCLUSTER_2: u16 = 0x0004;
    pub const INLINE_PCLUSTER: u16 = 0x0008;
    pub const FRAGMENT_PCLUSTER: u16 = 0x0020;
}

const I_VERSION_MASK: u16 = 0x01;
const I_DATALAYOUT_BIT: u16 = 1;
const I_DATALAYOUT_MASK: u16 = 0x07;
const I_NLINK_1_BIT: u16 = 4;
/// All `i_format` bits a 6.18 kernel accepts.
const I_ALL: u16 = (1 << (I_NLINK_1_BIT + 1)) - 1;

const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
const CHUNK_FORMAT_48BIT: u16 = 0x0040;
const CHUNK_FORMAT_ALL: u16 = (CHUNK_FORMAT_48BIT << 1) - 1;

pub const LCLUSTER_TYPE_PLAIN: u8 = 0;
pub const LCLUSTER_TYPE_HEAD1: u8 = 1;
pub const LCLUSTER_TYPE_NONHEAD: u8 = 2;
pub const LCLUSTER_TYPE_HEAD2: u8 = 3;
/// Set on the first NONHEAD lcluster: the low bits hold the pcluster's block count.
const LI_D0_CBLKCNT: u32 = 1 << 11;

const MASK_32: u64 = (1 << 32) - 1;
const MASK_48: u64 = (1 << 48) - 1;

pub(crate) fn le16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn le64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn short(what: &str) -> WalkError {
    WalkError::Corrupt(format!("{what}: buffer too short"))
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(v.checked_add(align - 1)? & !(align - 1))
}

// ---------------------------------------------------------------------------
// crc32c, for the superblock checksum (the kernel refuses a mismatch).

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// The kernel's `crc32c(seed, data, len)`: reflected Castagnoli, no final inversion.
pub(crate) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

// ---------------------------------------------------------------------------
// Superblock

/// The fields of `struct erofs_super_block` the walker needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub checksum: u32,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    pub root_nid: u64,
    pub inos: u64,
    pub blocks: u64,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub available_compr_algs: u16,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: u32,
    pub packed_nid: u64,
    /// `epoch` (build time): compact inodes' mtime is relative to it.
    pub epoch: u64,
    /// Nanoseconds of every compact inode's mtime.
    pub fixed_nsec: u32,
}

impl Superblock {
    /// Parses and validates the superblock from the start of the image
    /// (at least the first 1024 + 128 bytes).
    pub fn parse(first_block: &[u8]) -> Result<Self, WalkError> {
        let start = SUPERBLOCK_OFFSET as usize;
        let sb = first_block
            .get(start..start + SB_BASE_SIZE)
            .ok_or(WalkError::NotErofs)?;
        let magic = le32(sb, 0).ok_or_else(|| short("superblock"))?;
        if magic != EROFS_MAGIC {
            return Err(WalkError::NotErofs);
        }
        let f = |o: usize| le32(sb, o).ok_or_else(|| short("superblock"));
        let f16 = |o: usize| le16(sb, o).ok_or_else(|| short("superblock"));
        let f64_ = |o: usize| le64(sb, o).ok_or_else(|| short("superblock"));
        let byte = |o: usize| sb.get(o).copied().ok_or_else(|| short("superblock"));

        let feature_incompat = f(80)?;
        let blkszbits = byte(12)?;
        let rb = f16(14)?;
        let blocks_lo = f(36)?;
        let is_48bit = feature_incompat & feature::INCOMPAT_48BIT != 0;
        let (root_nid, blocks) = if is_48bit {
            (f64_(112)?, u64::from(blocks_lo) | (u64::from(rb) << 32))
        } else {
            (u64::from(rb), u64::from(blocks_lo))
        };
        let sbi = Superblock {
            checksum: f(4)?,
            feature_compat: f(8)?,
            feature_incompat,
            blkszbits,
            sb_extslots: byte(13)?,
            root_nid,
            inos: f64_(16)?,
            blocks,
            meta_blkaddr: f(40)?,
            xattr_blkaddr: f(44)?,
            available_compr_algs: f16(84)?,
            extra_devices: f16(86)?,
            devt_slotoff: f16(88)?,
            dirblkbits: byte(90)?,
            xattr_prefix_count: byte(91)?,
            xattr_prefix_start: f(92)?,
            packed_nid: f64_(96)?,
            epoch: f64_(24)?,
            fixed_nsec: f(32)?,
        };
        sbi.validate()?;
        Ok(sbi)
    }

    fn validate(&self) -> Result<(), WalkError> {
        if !(9..=16).contains(&self.blkszbits) {
            return Err(WalkError::Unsupported(format!(
                "block size 2^{} (supported: 512 B to 64 KiB)",
                self.blkszbits
            )));
        }
        if self.feature_incompat & feature::INCOMPAT_METABOX != 0 {
            return Err(WalkError::Unsupported(
                "metabox images (inodes stored inside a metadata inode)".into(),
            ));
        }
        let unknown = self.feature_incompat & !feature::INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(WalkError::Unsupported(format!(
                "incompatible feature bits {unknown:#x}"
            )));
        }
        if self.dirblkbits != 0 {
            return Err(WalkError::Unsupported(format!(
                "directory block size bits {}",
                self.dirblkbits
            )));
        }
        if self.sb_size() > 4096 - SUPERBLOCK_OFFSET as usize {
            return Err(WalkError::Corrupt(format!(
                "superblock: {} extension slots make it larger than a page",
                self.sb_extslots
            )));
        }
        Ok(())
    }

    pub fn block_size(&self) -> u64 {
        1u64 << self.blkszbits
    }

    /// On-disk superblock size: 128 bytes plus the extension slots.
    pub fn sb_size(&self) -> usize {
        SB_BASE_SIZE + usize::from(self.sb_extslots) * SB_EXTSLOT_SIZE
    }

    pub fn has_incompat(&self, bit: u32) -> bool {
        self.feature_incompat & bit != 0
    }

    /// Byte offset of an inode slot; `None` on overflow.
    pub fn inode_offset(&self, nid: u64) -> Option<u64> {
        u64::from(self.meta_blkaddr)
            .checked_mul(self.block_size())?
            .checked_add(nid.checked_mul(INODE_SLOT_SIZE)?)
    }

    /// Byte offset of shared xattr entry `id`.
    pub fn shared_xattr_offset(&self, id: u32) -> Option<u64> {
        u64::from(self.xattr_blkaddr)
            .checked_mul(self.block_size())?
            .checked_add(u64::from(id) * 4)
    }

    /// Mask applied to a chunk index's device id (`sbi->device_id_mask`).
    pub fn device_id_mask(&self) -> u16 {
        let n = u32::from(self.extra_devices) + 1;
        (n.next_power_of_two() - 1) as u16
    }

    /// Byte range of the device table, if any.
    pub fn device_table(&self) -> Option<Range<u64>> {
        if self.extra_devices == 0 {
            return None;
        }
        let start = u64::from(self.devt_slotoff) * DEVICE_SLOT_SIZE;
        Some(start..start + u64::from(self.extra_devices) * DEVICE_SLOT_SIZE)
    }

    /// Parses the device table from `table` (the bytes of [`Self::device_table`]).
    pub fn device_slots(&self, table: &[u8]) -> Result<Vec<DeviceSlot>, WalkError> {
        let n = usize::from(self.extra_devices);
        if table.len() < n * DEVICE_SLOT_SIZE as usize {
            return Err(short("device table"));
        }
        (0..n)
            .map(|i| DeviceSlot::parse(&table[i * DEVICE_SLOT_SIZE as usize..(i + 1) * DEVICE_SLOT_SIZE as usize]))
            .collect()
    }

    /// Checks the superblock checksum the kernel verifies at mount time
    /// (`erofs_superblock_csum_verify`). `first_block` must hold the whole
    /// first filesystem block; returns `Ok(false)` when it is too short to tell.
    pub fn verify_checksum(&self, first_block: &[u8]) -> Result<bool, WalkError> {
        if self.feature_compat & feature::COMPAT_SB_CHKSUM == 0 {
            return Ok(true);
        }
        let mut len = self.block_size() as usize;
        if len > SUPERBLOCK_OFFSET as usize {
            len -= SUPERBLOCK_OFFSET as usize;
        }
        let start = SUPERBLOCK_OFFSET as usize;
        let Some(area) = first_block.get(start..start + len) else {
            return Ok(false);
        };
        // The checksum field itself counts as zero.
        let crc = crc32c(!0, area.get(..4).unwrap_or_default());
        let crc = crc32c(crc, &[0u8; 4]);
        let crc = crc32c(crc, area.get(8..).unwrap_or_default());
        if crc != self.checksum {
            return Err(WalkError::Corrupt(format!(
                "superblock checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                self.checksum
            )));
        }
        Ok(true)
    }
}

/// One slot of the device table (`struct erofs_deviceslot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    /// What the device is (erofs-utils: a digest or a path; ours: the blob's hex digest).
    pub tag: [u8; 64],
    pub blocks_lo: u32,
    /// First block in the flat address space (flatdev).
    pub uniaddr_lo: u32,
    pub blocks_hi: u16,
    pub uniaddr_hi: u16,
}

impl DeviceSlot {
    pub fn parse(b: &[u8]) -> Result<Self, WalkError> {
        let mut tag = [0u8; 64];
        tag.copy_from_slice(b.get(..64).ok_or_else(|| short("device slot"))?);
        let f = |o| le32(b, o).ok_or_else(|| short("device slot"));
        let h = |o| le16(b, o).ok_or_else(|| short("device slot"));
        Ok(DeviceSlot { tag, blocks_lo: f(64)?, uniaddr_lo: f(68)?, blocks_hi: h(72)?, uniaddr_hi: h(74)? })
    }

    /// The tag as text when it is printable (up to its first NUL).
    pub fn tag_text(&self) -> Option<&str> {
        let end = self.tag.iter().position(|&c| c == 0).unwrap_or(self.tag.len());
        std::str::from_utf8(&self.tag[..end]).ok().filter(|t| !t.is_empty())
    }
}

/// The block of the flat address space a chunk target lands on (flatdev:
/// device k's block b is flat block `uniaddr_k + b`; the primary device's
/// addresses are flat already). `uniaddr[k - 1]` is device k's `uniaddr`.
/// `None` for a hole, an unknown device or an overflow.
pub fn flat_block(target: ChunkTarget, uniaddr: &[u64]) -> Option<u64> {
    match target {
        ChunkTarget::Hole => None,
        ChunkTarget::Primary(b) => Some(b),
        ChunkTarget::OtherDevice { device, blkaddr } => {
            uniaddr.get(usize::from(device).checked_sub(1)?)?.checked_add(blkaddr)
        }
    }
}

// ---------------------------------------------------------------------------
// Inodes

/// `i_format` data layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLayout {
    FlatPlain,
    CompressedFull,
    FlatInline,
    CompressedCompact,
    ChunkBased,
}

impl DataLayout {
    pub fn is_compressed(self) -> bool {
        matches!(
            self,
            DataLayout::CompressedFull | DataLayout::CompressedCompact
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// The parsed fixed part of an on-disk inode (compact or extended).
#[derive(Clone, Debug)]
pub struct InodeHeader {
    pub nid: u64,
    /// Byte offset of the inode in the image.
    pub offset: u64,
    pub extended: bool,
    pub layout: DataLayout,
    pub kind: FileKind,
    pub xattr_icount: u16,
    pub mode: u16,
    pub size: u64,
    /// `i_u`: start block (flat), chunk format (chunk-based), compressed
    /// block count (compressed) or rdev (devices).
    pub i_u: u32,
    /// High 16 bits of the start block where the inode carries them.
    pub startblk_hi: u16,
    /// Whether the start block is 48-bit wide (else 32-bit).
    pub addr48: bool,
}

impl InodeHeader {
    /// Parses an inode from `b`, which starts at the inode and holds at
    /// least 32 bytes (64 for an extended inode).
    pub fn parse(nid: u64, offset: u64, b: &[u8]) -> Result<Self, WalkError> {
        let at = || format!("inode nid {nid} at byte {offset}");
        let corrupt = |what: &str| WalkError::Corrupt(format!("{}: {what}", at()));
        if b.len() < COMPACT_INODE_SIZE as usize {
            return Err(corrupt("truncated inode"));
        }
        let ifmt = le16(b, 0).ok_or_else(|| corrupt("truncated"))?;
        if ifmt & !I_ALL != 0 {
            return Err(WalkError::Unsupported(format!(
                "{}: i_format {ifmt:#x}",
                at()
            )));
        }
        let layout = match (ifmt >> I_DATALAYOUT_BIT) & I_DATALAYOUT_MASK {
            0 => DataLayout::FlatPlain,
            1 => DataLayout::CompressedFull,
            2 => DataLayout::FlatInline,
            3 => DataLayout::CompressedCompact,
            4 => DataLayout::ChunkBased,
            other => {
                return Err(WalkError::Unsupported(format!(
                    "{}: data layout {other}",
                    at()
                )))
            }
        };
        let extended = ifmt & I_VERSION_MASK != 0;
        let xattr_icount = le16(b, 2).ok_or_else(|| corrupt("truncated"))?;
        let mode = le16(b, 4).ok_or_else(|| corrupt("truncated"))?;
        let nb = le16(b, 6).ok_or_else(|| corrupt("truncated"))?;
        let kind = match u32::from(mode) & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return Err(corrupt(&format!("bogus i_mode {mode:#o}"))),
        };
        let (size, i_u, startblk_hi, addr48) = if extended {
            if b.len() < EXTENDED_INODE_SIZE as usize {
                return Err(corrupt("truncated extended inode"));
            }
            let size = le64(b, 8).ok_or_else(|| corrupt("truncated"))?;
            if size > i64::MAX as u64 {
                return Err(corrupt("negative i_size"));
            }
            (
                size,
                le32(b, 16).ok_or_else(|| corrupt("truncated"))?,
                nb,
                true,
            )
        } else {
            let size = u64::from(le32(b, 8).ok_or_else(|| corrupt("truncated"))?);
            let i_u = le32(b, 16).ok_or_else(|| corrupt("truncated"))?;
            // Compact non-directories with NLINK_1 reuse i_nb as startblk_hi.
            if kind != FileKind::Directory && (ifmt >> I_NLINK_1_BIT) & 1 != 0 {
                (size, i_u, nb, true)
            } else {
                (size, i_u, 0, false)
            }
        };
        Ok(InodeHeader {
            nid,
            offset,
            extended,
            layout,
            kind,
            xattr_icount,
            mode,
            size,
            i_u,
            startblk_hi,
            addr48,
        })
    }

    pub fn inode_size(&self) -> u64 {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    /// Size of the inline xattr body (`erofs_xattr_ibody_size`).
    pub fn xattr_size(&self) -> u64 {
        if self.xattr_icount == 0 {
            0
        } else {
            12 + 4 * (u64::from(self.xattr_icount) - 1)
        }
    }

    /// End of inode + inline xattrs: where inline data / indexes begin.
    pub fn body_end(&self) -> Option<u64> {
        self.offset
            .checked_add(self.inode_size())?
            .checked_add(self.xattr_size())
    }

    /// Start block of a flat inode; `None` for a FLAT_PLAIN "no data" marker.
    pub fn flat_startblk(&self) -> Option<u64> {
        let startblk = u64::from(self.i_u) | (u64::from(self.startblk_hi) << 32);
        let mask = if self.addr48 { MASK_48 } else { MASK_32 };
        if self.layout == DataLayout::FlatPlain && (startblk ^ u64::MAX) & mask == 0 {
            return None;
        }
        Some(startblk)
    }

    /// Number of blocks covering `size` (`erofs_iblks`).
    pub fn blocks(&self, blkszbits: u8) -> u64 {
        // size <= i64::MAX, so this cannot overflow.
        self.size.div_ceil(1u64 << blkszbits)
    }
}

// ---------------------------------------------------------------------------
// Chunk-based inodes

/// Where one chunk of a chunk-based inode lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkTarget {
    Hole,
    /// Block address on the primary device (this blob).
    Primary(u64),
    /// On an extra device: another blob, not ours.
    OtherDevice {
        device: u16,
        blkaddr: u64,
    },
}

/// Geometry of a chunk-based inode's index array.
#[derive(Clone, Debug)]
pub struct ChunkLayout {
    /// Bytes per entry: 4 (block map) or 8 (chunk indexes).
    pub unit: u64,
    pub chunkbits: u32,
    pub nchunks: u64,
    /// Byte offset of the first entry.
    pub start: u64,
    addr48: bool,
}

impl ChunkLayout {
    pub fn new(h: &InodeHeader, blkszbits: u8) -> Result<Self, WalkError> {
        let format = (h.i_u & 0xFFFF) as u16;
        if format & !CHUNK_FORMAT_ALL != 0 {
            return Err(WalkError::Unsupported(format!(
                "inode nid {}: chunk format {format:#x}",
                h.nid
            )));
        }
        let chunkbits = u32::from(blkszbits) + u32::from(format & CHUNK_FORMAT_BLKBITS_MASK);
        if chunkbits > 62 {
            return Err(WalkError::Corrupt(format!(
                "inode nid {}: chunk size 2^{chunkbits}",
                h.nid
            )));
        }
        let unit = if format & CHUNK_FORMAT_INDEXES != 0 {
            8
        } else {
            4
        };
        let nchunks = h.size.div_ceil(1u64 << chunkbits);
        let body_end = h.body_end().ok_or_else(|| overflow(h.nid))?;
        let start = align_up(body_end, unit).ok_or_else(|| overflow(h.nid))?;
        Ok(ChunkLayout {
            unit,
            chunkbits,
            nchunks,
            start,
            addr48: format & CHUNK_FORMAT_48BIT != 0,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunkbits
    }

    /// Total bytes of the index array (`None` on overflow).
    pub fn index_bytes(&self) -> Option<u64> {
        self.nchunks.checked_mul(self.unit)
    }

    /// Decodes one entry (`unit` bytes), as `erofs_map_blocks` does.
    pub fn decode(&self, entry: &[u8], device_id_mask: u16) -> Option<ChunkTarget> {
        if self.unit == 4 {
            let addr = le32(entry, 0)?;
            return Some(if addr == u32::MAX {
                ChunkTarget::Hole
            } else {
                ChunkTarget::Primary(u64::from(addr))
            });
        }
        let hi = le16(entry, 0)?;
        let device = le16(entry, 2)? & device_id_mask;
        let lo = le32(entry, 4)?;
        let mask = if self.addr48 { MASK_48 } else { MASK_32 };
        let blkaddr = ((u64::from(hi) << 32) | u64::from(lo)) & mask;
        Some(if (blkaddr ^ u64::MAX) & mask == 0 {
            ChunkTarget::Hole
        } else if device != 0 {
            ChunkTarget::OtherDevice { device, blkaddr }
        } else {
            ChunkTarget::Primary(blkaddr)
        })
    }
}

fn overflow(nid: u64) -> WalkError {
    WalkError::Corrupt(format!("inode nid {nid}: offset arithmetic overflows"))
}

// ---------------------------------------------------------------------------
// Compressed inodes

/// `struct z_erofs_map_header` (8 bytes right after the inline xattrs, 8-aligned).
#[derive(Clone, Copy, Debug)]
pub struct ZMapHeader {
    /// The whole file lives in the packed inode (bit 63 of the header).
    pub whole_fragment: bool,
    pub advise: u16,
    pub algorithm_type: u8,
    pub cluster_bits: u8,
    /// Encoded size of a tail-packed (inline) pcluster.
    pub idata_size: u16,
}

impl ZMapHeader {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let cluster_bits = *b.get(7)?;
        Some(ZMapHeader {
            whole_fragment: cluster_bits & 0x80 != 0,
            idata_size: le16(b, 2)?,
            advise: le16(b, 4)?,
            algorithm_type: *b.get(6)?,
            cluster_bits,
        })
    }
}

/// Random access to an inode's compression index bytes.
pub trait IndexBytes {
    /// Returns exactly `len` bytes at image offset `pos`.
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], WalkError>;
}

/// One decoded logical cluster index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lcluster {
    pub kind: u8,
    pub clusterofs: u32,
    /// NONHEAD: distance back to the HEAD lcluster.
    pub delta0: u32,
    /// HEAD: physical block of the pcluster.
    pub pblk: u64,
    /// NONHEAD with `D0_CBLKCNT`: block count of the pcluster (else 0).
    pub cblkcnt: u32,
}

impl Lcluster {
    pub fn is_head(&self) -> bool {
        self.kind != LCLUSTER_TYPE_NONHEAD
    }
}

/// Geometry of a compressed inode's lcluster indexes (full or compact),
/// and the decoding rules of `fs/erofs/zmap.c`.
#[derive(Clone, Debug)]
pub struct ZIndexLayout {
    nid: u64,
    compact: bool,
    blkszbits: u8,
    lclusterbits: u8,
    /// First index byte (compact: `ebase`; full: first lcluster index).
    index_start: u64,
    /// Compact: number of indexes (`erofs_iblks`).
    totalidx: u64,
    compacted_4b_initial: u64,
    compacted_2b: u64,
    /// Logical clusters the file covers.
    pub nlclusters: u64,
    size: u64,
    big1: bool,
    big2: bool,
    index_end: u64,
}

impl ZIndexLayout {
    /// `header_pos` is where the 8-byte map header sits (8-aligned body end).
    pub fn new(
        h: &InodeHeader,
        header_pos: u64,
        zh: &ZMapHeader,
        blkszbits: u8,
    ) -> Result<Self, WalkError> {
        let nid = h.nid;
        let corrupt = |what: String| WalkError::Corrupt(format!("inode nid {nid}: {what}"));
        let lclusterbits = blkszbits + (zh.cluster_bits & 0x0F);
        let compact = h.layout == DataLayout::CompressedCompact;
        let big1 = zh.advise & zadvise::BIG_PCLUSTER_1 != 0;
        let big2 = zh.advise & zadvise::BIG_PCLUSTER_2 != 0;
        if compact && big1 != big2 {
            return Err(corrupt(
                "inconsistent big pcluster hints of compact indexes".into(),
            ));
        }
        let nlclusters = h.size.div_ceil(1u64 << lclusterbits);
        let ebase = header_pos.checked_add(8).ok_or_else(|| overflow(nid))?;
        let mut layout = ZIndexLayout {
            nid,
            compact,
            blkszbits,
            lclusterbits,
            index_start: ebase,
            totalidx: 0,
            compacted_4b_initial: 0,
            compacted_2b: 0,
            nlclusters,
            size: h.size,
            big1,
            big2,
            index_end: ebase,
        };
        if compact {
            if lclusterbits > 14 {
                return Err(WalkError::Unsupported(format!(
                    "inode nid {nid}: compact indexes with lcluster size 2^{lclusterbits}"
                )));
            }
            let totalidx = h.blocks(blkszbits);
            let initial = ((32 - ebase % 32) / 4) & 7;
            let mut compacted_2b = 0;
            if zh.advise & zadvise::COMPACTED_2B != 0 && initial < totalidx {
                if lclusterbits > 12 {
                    return Err(WalkError::Unsupported(format!(
                        "inode nid {nid}: 2-byte compact indexes with lcluster size 2^{lclusterbits}"
                    )));
                }
                compacted_2b = (totalidx - initial) / 16 * 16;
            }
            layout.totalidx = totalidx;
            layout.compacted_4b_initial = initial;
            layout.compacted_2b = compacted_2b;
            // Every pack is written whole, so round the trailing 4B entries up.
            let bytes = if initial >= totalidx {
                totalidx.div_ceil(2) * 8
            } else {
                let tail = totalidx - initial - compacted_2b;
                initial * 4 + compacted_2b * 2 + tail.div_ceil(2) * 8
            };
            layout.index_end = ebase.checked_add(bytes).ok_or_else(|| overflow(nid))?;
        } else {
            // Full indexes start after the map header and 8 reserved bytes.
            layout.index_start = ebase.checked_add(8).ok_or_else(|| overflow(nid))?;
            let bytes = nlclusters.checked_mul(8).ok_or_else(|| overflow(nid))?;
            layout.index_end = layout
                .index_start
                .checked_add(bytes)
                .ok_or_else(|| overflow(nid))?;
        }
        Ok(layout)
    }

    /// End of the index area (exclusive byte offset).
    pub fn index_end(&self) -> u64 {
        self.index_end
    }

    /// First byte of the lcluster indexes (compact: right after the map header;
    /// full: after the header and 8 reserved bytes).
    pub fn index_start(&self) -> u64 {
        self.index_start
    }

    pub fn is_compact(&self) -> bool {
        self.compact
    }

    pub fn lclusterbits(&self) -> u8 {
        self.lclusterbits
    }

    /// Byte offset of lcluster `lcn`'s index, the start and size of its pack,
    /// and the amortization shift (compact) — mirrors `z_erofs_load_*_lcluster`.
    fn locate(&self, lcn: u64) -> Result<(u64, u64, u64, u32), WalkError> {
        if !self.compact {
            let pos = lcn
                .checked_mul(8)
                .and_then(|o| self.index_start.checked_add(o))
                .ok_or_else(|| overflow(self.nid))?;
            return Ok((pos, pos, 8, 3));
        }
        if lcn >= self.totalidx {
            return Err(WalkError::Corrupt(format!(
                "inode nid {}: lcluster {lcn} beyond {} indexes",
                self.nid, self.totalidx
            )));
        }
        let mut pos = self.index_start;
        let mut lcn = lcn;
        let mut shift = 2u32;
        if lcn >= self.compacted_4b_initial {
            pos += self.compacted_4b_initial * 4;
            lcn -= self.compacted_4b_initial;
            if lcn < self.compacted_2b {
                shift = 1;
            } else {
                pos += self.compacted_2b * 2;
                lcn -= self.compacted_2b;
            }
        }
        pos += lcn << shift;
        let vcnt: u64 = if shift == 2 { 2 } else { 16 };
        let pack = vcnt << shift;
        let pack_start = pos & !(pack - 1);
        Ok((pos, pack_start, pack, shift))
    }

    /// Offset just past the pack holding lcluster `lcn` (`m->nextpackoff`).
    pub fn next_pack_off(&self, lcn: u64) -> Result<u64, WalkError> {
        let (_, pack_start, pack, _) = self.locate(lcn)?;
        Ok(pack_start + pack)
    }

    /// Decodes lcluster `lcn`.
    pub fn load(&self, src: &mut dyn IndexBytes, lcn: u64) -> Result<Lcluster, WalkError> {
        if self.compact {
            self.load_compact(src, lcn)
        } else {
            self.load_full(src, lcn)
        }
    }

    fn corrupt(&self, what: String) -> WalkError {
        WalkError::Corrupt(format!("inode nid {}: {what}", self.nid))
    }

    fn load_full(&self, src: &mut dyn IndexBytes, lcn: u64) -> Result<Lcluster, WalkError> {
        let (pos, _, _, _) = self.locate(lcn)?;
        let di = src.get(pos, 8)?;
        let short = || self.corrupt("short index".into());
        let advise = le16(di, 0).ok_or_else(short)?;
        let kind = (advise & 3) as u8;
        let mut lc = Lcluster {
            kind,
            ..Lcluster::default()
        };
        if kind == LCLUSTER_TYPE_NONHEAD {
            lc.clusterofs = 1 << self.lclusterbits;
            let d0 = u32::from(le16(di, 4).ok_or_else(short)?);
            if d0 & LI_D0_CBLKCNT != 0 {
                if !(self.big1 || self.big2) {
                    return Err(
                        self.corrupt(format!("CBLKCNT at lcluster {lcn} without big pclusters"))
                    );
                }
                lc.cblkcnt = d0 & !LI_D0_CBLKCNT;
                lc.delta0 = 1;
            } else {
                lc.delta0 = d0;
            }
        } else {
            lc.clusterofs = u32::from(le16(di, 2).ok_or_else(short)?);
            if lc.clusterofs >= 1 << self.lclusterbits {
                return Err(self.corrupt(format!("clusterofs {} at lcluster {lcn}", lc.clusterofs)));
            }
            lc.pblk = u64::from(le32(di, 4).ok_or_else(short)?);
        }
        Ok(lc)
    }

    fn load_compact(&self, src: &mut dyn IndexBytes, lcn: u64) -> Result<Lcluster, WalkError> {
        let (pos, pack_start, pack, shift) = self.locate(lcn)?;
        let vcnt = (pack >> shift) as i64;
        let input = src.get(pack_start, pack as usize)?;
        let lobits = u32::from(self.lclusterbits).max(12);
        let encodebits = ((pack - 4) * 8 / vcnt as u64) as u32;
        let short = || self.corrupt("short compact index pack".into());
        let decode = |i: i64| -> Result<(u32, u8), WalkError> {
            let bitpos = (i as u32) * encodebits;
            let v = le32(input, (bitpos / 8) as usize).ok_or_else(short)? >> (bitpos & 7);
            Ok((v & ((1 << lobits) - 1), ((v >> lobits) & 3) as u8))
        };
        let mut i = ((pos - pack_start) >> shift) as i64;
        let (lo, kind) = decode(i)?;
        let mut lc = Lcluster {
            kind,
            ..Lcluster::default()
        };
        if kind == LCLUSTER_TYPE_NONHEAD {
            lc.clusterofs = 1 << self.lclusterbits;
            if lo & LI_D0_CBLKCNT != 0 {
                if !self.big1 {
                    return Err(
                        self.corrupt(format!("CBLKCNT at lcluster {lcn} without big pclusters"))
                    );
                }
                lc.cblkcnt = lo & !LI_D0_CBLKCNT;
                lc.delta0 = 1;
            } else if i + 1 != vcnt {
                lc.delta0 = lo;
            } else {
                // The last lcluster of a pack stores delta[1]; derive delta[0]
                // from the previous one.
                let (plo, pkind) = decode(i - 1)?;
                let plo = if pkind != LCLUSTER_TYPE_NONHEAD {
                    0
                } else if plo & LI_D0_CBLKCNT != 0 {
                    1
                } else {
                    plo
                };
                lc.delta0 = plo + 1;
            }
            return Ok(lc);
        }
        lc.clusterofs = lo;
        // The pack stores one base block address; a HEAD's pcluster follows
        // the pclusters of the HEADs before it in the pack.
        let mut nblk: u64;
        if !self.big1 {
            nblk = 1;
            while i > 0 {
                i -= 1;
                let (lo, kind) = decode(i)?;
                if kind == LCLUSTER_TYPE_NONHEAD {
                    i -= i64::from(lo);
                }
                if i >= 0 {
                    nblk += 1;
                }
            }
        } else {
            nblk = 0;
            while i > 0 {
                i -= 1;
                let (lo, kind) = decode(i)?;
                if kind == LCLUSTER_TYPE_NONHEAD {
                    if lo & LI_D0_CBLKCNT != 0 {
                        i -= 1;
                        nblk += u64::from(lo & !LI_D0_CBLKCNT);
                        continue;
                    }
                    if lo <= 1 {
                        return Err(self.corrupt(format!("bogus delta {lo} in big pcluster pack")));
                    }
                    i -= i64::from(lo) - 2;
                    continue;
                }
                nblk += 1;
            }
        }
        let base = le32(input, (pack - 4) as usize).ok_or_else(short)?;
        lc.pblk = u64::from(base) + nblk;
        Ok(lc)
    }

    /// Compressed block count of the pcluster headed at `lcn`
    /// (`z_erofs_get_extent_compressedlen`).
    fn compressed_blocks(
        &self,
        src: &mut dyn IndexBytes,
        lcn: u64,
        head: &Lcluster,
    ) -> Result<u64, WalkError> {
        let single = (head.kind == LCLUSTER_TYPE_HEAD1 && !self.big1)
            || ((head.kind == LCLUSTER_TYPE_PLAIN || head.kind == LCLUSTER_TYPE_HEAD2)
                && !self.big2)
            || ((lcn + 1) << self.lclusterbits) >= self.size;
        if single {
            return Ok(1);
        }
        let next = self.load(src, lcn + 1)?;
        if next.kind == LCLUSTER_TYPE_NONHEAD && next.delta0 != 1 {
            return Err(self.corrupt(format!("bogus CBLKCNT after lcluster {lcn}")));
        }
        if next.kind != LCLUSTER_TYPE_NONHEAD || next.cblkcnt == 0 {
            return Ok(1);
        }
        Ok(u64::from(next.cblkcnt))
    }

    /// The HEAD lcluster of the extent holding the last byte of the file
    /// (`z_tailextent_headlcn`).
    pub fn tail_head(&self, src: &mut dyn IndexBytes) -> Result<u64, WalkError> {
        let last = self.size.saturating_sub(1);
        let mut lcn = last >> self.lclusterbits;
        let endoff = (last & ((1u64 << self.lclusterbits) - 1)) as u32;
        let lc = self.load(src, lcn)?;
        if lc.is_head() && endoff >= lc.clusterofs {
            return Ok(lcn);
        }
        let mut distance = if lc.is_head() {
            1
        } else {
            u64::from(lc.delta0)
        };
        // Each step moves back by at least one lcluster, so this terminates.
        loop {
            if distance == 0 || distance > lcn {
                return Err(self.corrupt(format!(
                    "bogus lookback distance {distance} at lcluster {lcn}"
                )));
            }
            lcn -= distance;
            let lc = self.load(src, lcn)?;
            if lc.is_head() {
                return Ok(lcn);
            }
            distance = u64::from(lc.delta0);
        }
    }

    /// Appends the physical byte ranges of every pcluster stored in blocks
    /// (not inline, not in the packed inode). `tail_excluded` is the HEAD
    /// lcluster whose pcluster is inline or a fragment, if any.
    pub fn pclusters(
        &self,
        src: &mut dyn IndexBytes,
        tail_excluded: Option<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> Result<(), WalkError> {
        let bs = 1u64 << self.blkszbits;
        for lcn in 0..self.nlclusters {
            let lc = self.load(src, lcn)?;
            if !lc.is_head() || Some(lcn) == tail_excluded {
                continue;
            }
            // A HEAD starting at or past EOF opens no extent (mkfs may leave
            // one after a tail-packed extent); the kernel never maps it.
            if (lcn << self.lclusterbits) + u64::from(lc.clusterofs) >= self.size {
                continue;
            }
            let blocks = self.compressed_blocks(src, lcn, &lc)?;
            let start = lc.pblk.checked_mul(bs).ok_or_else(|| overflow(self.nid))?;
            let end = blocks
                .checked_mul(bs)
                .and_then(|len| start.checked_add(len))
                .ok_or_else(|| overflow(self.nid))?;
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Directories

/// One directory entry.
#[derive(Clone, Copy, Debug)]
pub struct Dirent<'a> {
    pub nid: u64,
    pub file_type: u8,
    pub name: &'a [u8],
}

impl Dirent<'_> {
    pub fn is_dot_or_dotdot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

/// Parses one directory block (`block` holds `min(block size, dir size - pos)`
/// bytes) and calls `f` for every entry, with the checks of `erofs_readdir`.
pub fn for_each_dirent<'a>(
    block: &'a [u8],
    mut f: impl FnMut(Dirent<'a>) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let maxsize = block.len();
    let bad = |what: String| WalkError::Corrupt(format!("directory block: {what}"));
    let first = usize::from(le16(block, 8).ok_or_else(|| bad(format!("only {maxsize} bytes")))?);
    if first < DIRENT_SIZE || first >= maxsize || first % DIRENT_SIZE != 0 {
        return Err(bad(format!(
            "first name offset {first} in a {maxsize}-byte block"
        )));
    }
    let count = first / DIRENT_SIZE;
    for i in 0..count {
        let base = i * DIRENT_SIZE;
        let short = || bad("truncated dirent".into());
        let nid = le64(block, base).ok_or_else(short)?;
        let nameoff = usize::from(le16(block, base + 8).ok_or_else(short)?);
        let file_type = *block.get(base + 10).ok_or_else(short)?;
        if nameoff < first || nameoff > maxsize {
            return Err(bad(format!("name offset {nameoff} of dirent {i}")));
        }
        let name_end = if i + 1 < count {
            usize::from(le16(block, base + DIRENT_SIZE + 8).ok_or_else(short)?)
        } else {
            let tail = block.get(nameoff..).unwrap_or_default();
            nameoff + tail.iter().position(|&c| c == 0).unwrap_or(tail.len())
        };
        if name_end < nameoff || name_end > maxsize || name_end - nameoff > NAME_LEN_MAX {
            return Err(bad(format!(
                "name of dirent {i} spans {nameoff}..{name_end}"
            )));
        }
        let name = block.get(nameoff..name_end).ok_or_else(short)?;
        f(Dirent {
            nid,
            file_type,
            name,
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Xattrs

/// Size of an xattr entry (header + name + value, 4-aligned) from its 4-byte header.
pub fn xattr_entry_size(header: &[u8]) -> Option<u64> {
    let name_len = u64::from(*header.first()?);
    let value_size = u64::from(le16(header, 2)?);
    Some((4 + name_len + value_size).div_ceil(4) * 4)
}
