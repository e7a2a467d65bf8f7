//! Which blobs of an image make which filesystem, and where each blob sits
//! in the flat address space. Pure: the caller probes each blob's first
//! 4 KiB and hands in what it found.
//!
//! An image's layers are taken in manifest order. An EROFS layer starts a
//! filesystem; its device table (flatdev, DESIGN §7) claims further layers
//! as its devices: a slot whose tag is a layer's hex digest claims that
//! layer (our writer tags slots so), the other slots take the next unclaimed
//! layers in order. Every slot is checked against its blob before anything
//! trusts it — Debian's `mkfs.erofs --blobdev` writes `blocks = uniaddr = 0`,
//! which mounts and reads wrong data.

use std::ops::Range;

use crate::erofs::format::{DeviceSlot, Superblock};

/// What a probe of one layer found.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    /// The superblock and device table, when the blob is an EROFS image.
    pub erofs: Option<(Superblock, Vec<DeviceSlot>)>,
}

impl BlobInfo {
    fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }

    fn short(&self) -> String {
        let hex = self.hex();
        format!("sha256:{}", &hex[..hex.len().min(12)])
    }
}

/// One filesystem of an image: a primary EROFS blob and its devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsGroup {
    /// Index of the primary blob.
    pub primary: usize,
    /// Device k (1-based) is `devices[k - 1]`: its blob and where the
    /// filesystem's own flat address space puts it.
    pub devices: Vec<DevicePlace>,
    pub block_bits: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlace {
    pub blob: usize,
    /// Bytes `[start, start + len)` of the filesystem's flat address space
    /// (`uniaddr << blkszbits`, `blocks << blkszbits` clamped to the blob).
    pub start: u64,
    pub len: u64,
}

impl FsGroup {
    /// The filesystem's own flat address space: primary at 0, devices at `uniaddr`.
    pub fn flat_size(&self, blobs: &[BlobInfo]) -> u64 {
        let primary = blobs[self.primary].size;
        self.devices.iter().map(|d| d.start + d.len).fold(primary, u64::max)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("layer {index} ({digest}) is not an EROFS image and no device table claims it")]
    NotErofs { index: usize, digest: String },
    #[error("the device table of layer {index} ({digest}) has {slots} slots but only {left} layers follow it")]
    TooManySlots { index: usize, digest: String, slots: usize, left: usize },
    #[error("device {slot} of layer {digest} has zero blocks")]
    ZeroBlocks { slot: usize, digest: String },
    #[error("device {slot} of layer {digest} lies beyond 2^32 blocks (Linux reads only the low 32 bits)")]
    HighBits { slot: usize, digest: String },
    #[error("device {slot} of layer {digest} claims {blocks} blocks of {bs} bytes but its blob {blob} has {size} bytes")]
    PastBlob { slot: usize, digest: String, blocks: u64, bs: u64, blob: String, size: u64 },
    #[error("device {slot} of layer {digest} at block {uniaddr} overlaps {what}")]
    Overlap { slot: usize, digest: String, uniaddr: u64, what: String },
}

/// Groups the layers into filesystems and validates every device table.
pub fn group_layers(blobs: &[BlobInfo]) -> Result<Vec<FsGroup>, GroupError> {
    let mut claimed = vec![false; blobs.len()];
    let mut groups = Vec::new();
    for i in 0..blobs.len() {
        if claimed[i] {
            continue;
        }
        let b = &blobs[i];
        let Some((sb, slots)) = &b.erofs else {
            return Err(GroupError::NotErofs { index: i, digest: b.short() });
        };
        claimed[i] = true;
        // Tags first, then order for the rest.
        let mut owner: Vec<Option<usize>> = vec![None; slots.len()];
        for (k, s) in slots.iter().enumerate() {
            if let Some(tag) = s.tag_text() {
                if let Some(j) = (i + 1..blobs.len()).find(|&j| !claimed[j] && blobs[j].hex() == tag) {
                    owner[k] = Some(j);
                    claimed[j] = true;
                }
            }
        }
        for o in owner.iter_mut().filter(|o| o.is_none()) {
            match (i + 1..blobs.len()).find(|&j| !claimed[j]) {
                Some(j) => {
                    *o = Some(j);
                    claimed[j] = true;
                }
                None => {
                    let left = blobs.len() - 1 - i;
                    return Err(GroupError::TooManySlots { index: i, digest: b.short(), slots: slots.len(), left });
                }
            }
        }
        let bs = sb.block_size();
        let mut devices = Vec::with_capacity(slots.len());
        let primary = b.size.div_ceil(bs) * bs;
        let mut taken: Vec<(Range<u64>, String)> = vec![(0..primary, format!("the primary blob {}", b.short()))];
        for (k, (s, j)) in slots.iter().zip(owner).enumerate() {
            let slot = k + 1;
            let j = j.unwrap_or(i);
            let blob = &blobs[j];
            if s.blocks_hi != 0 || s.uniaddr_hi != 0 || u64::from(s.uniaddr_lo) + u64::from(s.blocks_lo) > u64::from(u32::MAX) {
                return Err(GroupError::HighBits { slot, digest: b.short() });
            }
            if s.blocks_lo == 0 {
                return Err(GroupError::ZeroBlocks { slot, digest: b.short() });
            }
            let blocks = u64::from(s.blocks_lo);
            if blocks * bs > blob.size.div_ceil(bs) * bs {
                return Err(GroupError::PastBlob { slot, digest: b.short(), blocks, bs, blob: blob.short(), size: blob.size });
            }
            let start = u64::from(s.uniaddr_lo) * bs;
            let r = start..start + blocks * bs;
            if let Some((_, what)) = taken.iter().find(|(t, _)| t.start < r.end && r.start < t.end) {
                return Err(GroupError::Overlap { slot, digest: b.short(), uniaddr: u64::from(s.uniaddr_lo), what: what.clone() });
            }
            taken.push((r, format!("device {slot}")));
            devices.push(DevicePlace { blob: j, start, len: (blocks * bs).min(blob.size) });
        }
        groups.push(FsGroup { primary: i, devices, block_bits: sb.blkszbits });
    }
    Ok(groups)
}

/// Alignment of every blob in a merged address space.
pub const BLOB_ALIGN: u64 = 4096;

/// Where each blob of a merged image goes: after `head` bytes (the merged
/// metadata), in order, each at a base aligned to `align` (a multiple of
/// [`BLOB_ALIGN`]: the agent passes its fetch unit, so that no fetch unit
/// spans two blobs). Returns the bases and the size of the address space.
pub fn place_blobs(head: u64, sizes: &[u64], align: u64) -> Option<(Vec<u64>, u64)> {
    let align = align.max(BLOB_ALIGN).checked_next_multiple_of(BLOB_ALIGN)?;
    let mut pos = head.checked_next_multiple_of(align)?;
    let mut bases = Vec::with_capacity(sizes.len());
    for &s in sizes {
        bases.push(pos);
        pos = pos.checked_add(s)?.checked_next_multiple_of(align)?;
    }
    let end = match (bases.last(), sizes.last()) {
        (Some(b), Some(s)) => b + s,
        _ => head,
    };
    Some((bases, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(extra: u16, bits: u8) -> Superblock {
        let mut b = vec![0u8; 4096];
        b[1024..1028].copy_from_slice(&crate::erofs::format::EROFS_MAGIC.to_le_bytes());
        b[1024 + 12] = bits;
        b[1024 + 86..1024 + 88].copy_from_slice(&extra.to_le_bytes());
        Superblock::parse(&b).unwrap()
    }

    fn slot(tag: &str, blocks: u32, uniaddr: u32) -> DeviceSlot {
        let mut t = [0u8; 64];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        DeviceSlot { tag: t, blocks_lo: blocks, uniaddr_lo: uniaddr, blocks_hi: 0, uniaddr_hi: 0 }
    }

    fn blob(n: u8, size: u64, erofs: Option<(Superblock, Vec<DeviceSlot>)>) -> BlobInfo {
        BlobInfo { digest: format!("sha256:{}", format!("{n:02x}").repeat(32)), size, erofs }
    }

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn plain_layers_are_one_group_each() {
        let blobs = vec![blob(1, 8192, Some((sb(0, 12), vec![]))), blob(2, 100, Some((sb(0, 12), vec![])))];
        let g = group_layers(&blobs).unwrap();
        assert_eq!(g, vec![
            FsGroup { primary: 0, devices: vec![], block_bits: 12 },
            FsGroup { primary: 1, devices: vec![], block_bits: 12 },
        ]);
        assert_eq!(g[1].flat_size(&blobs), 100);
    }

    #[test]
    fn devices_by_tag_then_by_order() {
        // Layer 0 has two slots: one tagged with layer 3's digest, one untagged.
        let blobs = vec![
            blob(1, 8192, Some((sb(2, 12), vec![slot(&hex(4), 3, 10), slot("", 2, 2)]))),
            blob(2, 8000, None),
            blob(3, 4096, Some((sb(0, 12), vec![]))),
            blob(4, 12288, None),
        ];
        let g = group_layers(&blobs).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].devices, vec![
            DevicePlace { blob: 3, start: 10 * 4096, len: 12288 },
            DevicePlace { blob: 1, start: 2 * 4096, len: 8000 },
        ]);
        assert_eq!(g[0].flat_size(&blobs), 13 * 4096);
        assert_eq!(g[1].primary, 2);
    }

    #[test]
    fn bad_device_tables_are_refused() {
        let primary = |slots: Vec<DeviceSlot>| blob(1, 8192, Some((sb(slots.len() as u16, 12), slots)));
        let data = |n, size| blob(n, size, None);
        let cases: Vec<(Vec<BlobInfo>, &str)> = vec![
            (vec![primary(vec![slot("", 0, 0)]), data(2, 4096)], "has zero blocks"),
            (vec![primary(vec![slot("", 1, 1)]), data(2, 4096)], "overlaps the primary blob"),
            (vec![primary(vec![slot("", 2, 2), slot("", 2, 3)]), data(2, 8192), data(3, 8192)], "overlaps device 1"),
            (vec![primary(vec![slot("", 3, 2)]), data(2, 8192)], "claims 3 blocks"),
            (vec![primary(vec![slot("", 1, 2), slot("", 1, 3)]), data(2, 4096)], "has 2 slots but only 1 layers follow"),
            (vec![primary(vec![DeviceSlot { blocks_hi: 1, ..slot("", 1, 2) }]), data(2, 4096)], "beyond 2^32"),
            (vec![primary(vec![slot("", 1, u32::MAX)]), data(2, 4096)], "beyond 2^32"),
            (vec![data(2, 4096)], "is not an EROFS image"),
        ];
        for (blobs, want) in cases {
            let e = group_layers(&blobs).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
            assert!(!e.contains('\n'));
        }
        // A blob larger than its slot (a tar's trailing zero records) is fine.
        assert!(group_layers(&[primary(vec![slot("", 1, 2)]), data(2, 5000)]).is_ok());
    }

    #[test]
    fn blobs_are_placed_aligned() {
        assert_eq!(place_blobs(5000, &[4096, 10, 1], BLOB_ALIGN), Some((vec![8192, 12288, 16384], 16385)));
        assert_eq!(place_blobs(4096, &[], 1), Some((vec![], 4096)));
        assert_eq!(place_blobs(u64::MAX - 10, &[1], BLOB_ALIGN), None);
        // Fetch-unit alignment (256 KiB): every blob starts a unit.
        assert_eq!(place_blobs(5000, &[300_000, 10], 256 << 10), Some((vec![256 << 10, 768 << 10], (768 << 10) + 10)));
        assert_eq!(place_blobs(5000, &[1], 5000), Some((vec![8192], 8193)), "rounded up to 4 KiB");
    }
}
