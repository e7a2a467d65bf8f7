//! Where a tar index puts its tar (erofs-utils `mkfs.erofs --tar=i`, our
//! `build --tar-index`): the flat address space is `[index | tar]`, the tar
//! at the device slot's `uniaddr * 512`, and the kernel reads at most the
//! slot's `blocks * 512` bytes of it (the tar's trailing zero records lie
//! past that). Pure: the index bytes in, the placement out (untrusted input:
//! every field is checked).

use crate::erofs::Superblock;

const SLOT_SIZE: usize = 128;
/// `struct erofs_deviceslot`: `u8 tag[64]; __le32 blocks_lo; __le32 uniaddr_lo; ...`
const SLOT_BLOCKS: usize = 64;
const SLOT_UNIADDR: usize = 68;
const PAGE: u64 = 4096;

/// Where the index and its tar lie in the flat address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TarIndexPlacement {
    /// Bytes of the index file (the first segment, from byte 0).
    pub index_len: u64,
    /// The tar's first byte in the flat space (`uniaddr * 512`).
    pub tar_start: u64,
    /// Bytes of the tar the index refers to (`blocks * 512`).
    pub tar_len: u64,
}

impl TarIndexPlacement {
    /// The flat address space's size (the cache file's).
    pub fn size(&self) -> u64 {
        self.tar_start + self.tar_len
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct TarIndexError(pub String);

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads the placement from a whole index file.
pub fn placement(index: &[u8]) -> Result<TarIndexPlacement, TarIndexError> {
    let bad = |s: String| TarIndexError(s);
    let sb = Superblock::parse(index).map_err(|e| bad(format!("not an EROFS tar index: {e}")))?;
    if sb.blkszbits != 9 {
        return Err(bad(format!(
            "not a tar index: blocks of {} bytes, where a tar index has 512",
            1u64 << sb.blkszbits.min(63)
        )));
    }
    if sb.extra_devices != 1 {
        return Err(bad(format!("a tar index of one layer has one extra device (the tar), this one {}", sb.extra_devices)));
    }
    let slot = sb.device_table().ok_or_else(|| bad("the tar index has no device table".into()))?;
    let at = usize::try_from(slot.start).map_err(|_| bad("device table offset overflows".into()))?;
    let bytes = index
        .get(at..at + SLOT_SIZE)
        .ok_or_else(|| bad(format!("the device table at {at} lies past the {}-byte index", index.len())))?;
    let blocks = le32(bytes, SLOT_BLOCKS).unwrap_or(0);
    let uniaddr = le32(bytes, SLOT_UNIADDR).unwrap_or(0);
    if blocks == 0 || uniaddr == 0 {
        // Debian's mkfs.erofs --blobdev writes such slots (DESIGN §7).
        return Err(bad(format!("the tar index's device slot is not placed (blocks {blocks}, uniaddr {uniaddr})")));
    }
    let tar_start = u64::from(uniaddr) * 512;
    let index_len = index.len() as u64;
    if index_len != tar_start {
        return Err(bad(format!(
            "the tar index is {index_len} bytes but puts its tar at byte {tar_start}: not the [index | tar] layout"
        )));
    }
    if tar_start % PAGE != 0 {
        return Err(bad(format!(
            "the tar starts at byte {tar_start}, not on a 4 KiB page; rebuild the index with `erofs-fanotify build --tar-index`, which pads it"
        )));
    }
    Ok(TarIndexPlacement { index_len, tar_start, tar_len: u64::from(blocks) * 512 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal superblock with 512-byte blocks and one device slot.
    fn index(len: usize, blkszbits: u8, devices: u16, blocks: u32, uniaddr: u32) -> Vec<u8> {
        let mut b = vec![0u8; len];
        let sb = 1024;
        b[sb..sb + 4].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        b[sb + 12] = blkszbits;
        b[sb + 14..sb + 16].copy_from_slice(&1u16.to_le_bytes()); // root nid
        b[sb + 86..sb + 88].copy_from_slice(&devices.to_le_bytes());
        let slotoff: u16 = 20; // byte 2560
        b[sb + 88..sb + 90].copy_from_slice(&slotoff.to_le_bytes());
        let at = slotoff as usize * 128;
        b[at + 64..at + 68].copy_from_slice(&blocks.to_le_bytes());
        b[at + 68..at + 72].copy_from_slice(&uniaddr.to_le_bytes());
        b
    }

    #[test]
    fn reads_the_tar_placement_and_refuses_what_does_not_fit() {
        let ok = index(8192, 9, 1, 100, 16);
        let superblock = Superblock::parse(&ok);
        assert!(superblock.is_ok(), "{superblock:?}");
        assert_eq!(placement(&ok), Ok(TarIndexPlacement { index_len: 8192, tar_start: 8192, tar_len: 51_200 }));
        assert_eq!(placement(&ok).unwrap().size(), 8192 + 51_200);
        let e = |b: Vec<u8>| placement(&b).unwrap_err().0;
        assert!(e(index(8192, 12, 1, 100, 16)).contains("512"));
        assert!(e(index(8192, 9, 0, 100, 16)).contains("one extra device"));
        assert!(e(index(8192, 9, 2, 100, 16)).contains("one extra device"));
        assert!(e(index(8192, 9, 1, 0, 16)).contains("not placed"));
        assert!(e(index(8192, 9, 1, 100, 0)).contains("not placed"));
        assert!(e(index(8192, 9, 1, 100, 20)).contains("[index | tar]"));
        assert!(e(index(8704, 9, 1, 100, 17)).contains("4 KiB"));
        assert!(e(vec![0u8; 4096]).contains("not an EROFS"));
        // The device table past the file's end.
        let mut short = index(8192, 9, 1, 100, 16);
        short[1024 + 88..1024 + 90].copy_from_slice(&200u16.to_le_bytes());
        assert!(e(short).contains("past the"));
    }
}
