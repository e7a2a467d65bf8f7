//! lz4 for EROFS, the way both Linux and erofs-utils 1.5 read it.
//!
//! Fixed-*input* extents: a file is cut into extents of `pcluster_bytes`
//! (the last one shorter), each compressed on its own with `lz4_flex`'s
//! block format. An extent whose compressed size saves at least one block is
//! stored as one "big pcluster" (HEAD1 lcluster + CBLKCNT in the next
//! NONHEAD, `Z_EROFS_ADVISE_BIG_PCLUSTER_1`) with the compressed bytes at the
//! *end* of its blocks and zeros before them (`LZ4_0PADDING`: the decoder
//! skips the leading zeros); any other extent is stored as uncompressed
//! 1-block PLAIN lclusters (without BIG_PCLUSTER_2, which erofs-utils 1.5
//! cannot read, a PLAIN pcluster is one block). Indexes are the full
//! (8-byte, non-compact) form with 1-block lclusters.

use super::ondisk::Lcluster;

/// How one extent is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// lz4 in this many blocks.
    Compressed(u16),
    /// As is, one block per lcluster.
    Plain,
}

/// Compresses `input` (one extent) into `out` (cleared first) and decides
/// how it is stored.
pub fn compress_extent(input: &[u8], block_size: usize, out: &mut Vec<u8>) -> ExtentKind {
    out.clear();
    out.resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
    let len = match lz4_flex::block::compress_into(input, out) {
        Ok(n) => n,
        Err(_) => {
            out.clear();
            return ExtentKind::Plain;
        }
    };
    out.truncate(len);
    let lblocks = input.len().div_ceil(block_size);
    let cblocks = len.div_ceil(block_size);
    if cblocks < lblocks && cblocks <= u16::MAX as usize && len > 0 {
        ExtentKind::Compressed(cblocks as u16)
    } else {
        ExtentKind::Plain
    }
}

/// Blocks an extent of `len` bytes takes on disk.
pub fn extent_blocks(kind: ExtentKind, len: u64, block_size: u64) -> u64 {
    match kind {
        ExtentKind::Compressed(n) => u64::from(n),
        ExtentKind::Plain => len.div_ceil(block_size),
    }
}

/// The lcluster indexes of an extent of `len` bytes whose blocks start at
/// `blkaddr`, appended to `out`.
pub fn extent_indexes(kind: ExtentKind, len: u64, block_size: u64, blkaddr: u32, out: &mut Vec<Lcluster>) {
    let lblocks = len.div_ceil(block_size);
    match kind {
        ExtentKind::Compressed(cblocks) => {
            out.push(Lcluster::Head {
                plain: false,
                blkaddr,
            });
            for k in 1..lblocks {
                out.push(Lcluster::NonHead {
                    delta0: k as u16,
                    cblkcnt: (k == 1).then_some(cblocks),
                    delta1: (lblocks - k) as u16,
                });
            }
        }
        ExtentKind::Plain => {
            for k in 0..lblocks {
                out.push(Lcluster::Head {
                    plain: true,
                    blkaddr: blkaddr + k as u32,
                });
            }
        }
    }
}
