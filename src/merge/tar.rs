//! Merging the tar indexes of an image's layers into one metadata image
//! (issue 16: whole ordinary images, unconverted).
//!
//! A tar index (`build --tar-index`, erofs-utils `mkfs.erofs --tar=i`) is
//! metadata whose files are chunks on its one device, the layer's
//! uncompressed tar. The merge applies the layers' trees with overlayfs'
//! rules, as for EROFS layers ([`super::merge_layers`]), but only the tars
//! take part in the address space: `[merged metadata | tar 0 | tar 1 | …]`.
//! The index files themselves are not placed (nothing of a file's data is
//! in them: a layer whose files point into its index is refused), and each
//! device slot of the merged image names its tar by the layer's diff_id.
//!
//! Pure: trees and placements in, image bytes out.

use crate::erofs::reader::ImageTree;

use super::{build_in_two_passes, layout, merge_layers, merged_options, Assembled, DeviceBase, LayerView, MergeError, MergedImage, PlacedBlob};

/// Tar indexes have 512-byte blocks (the tar's record size).
const TAR_BLOCK_BITS: u8 = 9;

/// One layer's tar index as the merge sees it.
#[derive(Clone, Debug)]
pub struct TarLayer<'a> {
    /// For messages (e.g. the layer blob's short digest).
    pub name: String,
    /// Read from the layer's index file.
    pub tree: &'a ImageTree,
    /// Where the index puts its tar in its own flat space (`uniaddr * 512`).
    pub tar_start: u64,
    /// Bytes of the tar the index refers to (the device slot's `blocks * 512`).
    pub tar_len: u64,
    /// `sha256:<hex>` of the uncompressed tar: the merged device slot's tag.
    pub diff_id: String,
}

/// Merges the layers, lowest first; each tar at a base aligned to `align`
/// (a multiple of 4 KiB: the agent's fetch unit keeps a unit inside one tar).
/// The result's `blobs` are the tars (digest = diff_id, size = `tar_len`).
pub fn merge_tar_indexes(layers: &[TarLayer], align: u64) -> Result<MergedImage, MergeError> {
    if layers.is_empty() {
        return Err(MergeError::Write("no layers to merge".into()));
    }
    for l in layers {
        if l.tree.block_bits() != TAR_BLOCK_BITS {
            return Err(MergeError::Unsupported {
                layer: l.name.clone(),
                what: format!("{}-byte blocks: not a tar index", 1u64 << l.tree.block_bits().min(63)),
            });
        }
        if l.tar_len == 0 || l.tar_start == 0 {
            return Err(MergeError::Corrupt { layer: l.name.clone(), what: "its tar is not placed".into() });
        }
    }
    let sizes: Vec<u64> = layers.iter().map(|l| l.tar_len).collect();
    let assemble = |head: u64| {
        let (bases, size) =
            layout::place_blobs(head, &sizes, align).ok_or_else(|| MergeError::Write("the merged address space overflows".into()))?;
        let views: Vec<LayerView> = layers
            .iter()
            .zip(&bases)
            .map(|(l, &base)| LayerView {
                name: l.name.clone(),
                tree: l.tree,
                // The index is not placed: any data in it is "outside the layer's blobs".
                primary_size: 0,
                primary_base: 0,
                devices: vec![DeviceBase { start: l.tar_start, len: l.tar_len, base }],
            })
            .collect();
        let (tree, stats) = merge_layers(&views, TAR_BLOCK_BITS)?;
        let placed: Vec<PlacedBlob> = layers
            .iter()
            .zip(&bases)
            .map(|(l, &base)| PlacedBlob { digest: l.diff_id.clone(), size: l.tar_len, base })
            .collect();
        let opts = merged_options(TAR_BLOCK_BITS, &placed)?;
        Ok::<Assembled, MergeError>((tree, stats, opts, placed, size))
    };
    build_in_two_passes(assemble, TAR_BLOCK_BITS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::build::layer::{index_layer, LayerOptions};
    use crate::erofs::reader::tests::{content, paths};
    use crate::erofs::reader::{read_tree, TreeBody};
    use crate::erofs::WalkLimits;

    enum T<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Link(&'a str, &'a str),
    }

    fn tar_of(entries: &[T]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                T::File(p, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(d.len() as u64);
                    h.set_cksum();
                    b.append_data(&mut h, p, *d).unwrap();
                }
                T::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    h.set_cksum();
                    b.append_data(&mut h, p, std::io::empty()).unwrap();
                }
                T::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// The layer's index file, its tree and its tar placement.
    fn indexed(tar: &[u8]) -> (Vec<u8>, ImageTree, u64, u64, String) {
        let mut out = std::io::Cursor::new(Vec::new());
        let l = index_layer(tar, &mut out, None, &LayerOptions::default()).unwrap();
        let bytes = out.into_inner();
        let tree = read_tree(bytes.as_slice(), &WalkLimits::default()).unwrap();
        (bytes, tree, u64::from(l.uniaddr) * 512, u64::from(l.device_blocks) * 512, l.diff_id)
    }

    #[test]
    fn layers_merge_over_their_tars_and_every_file_reads_from_its_own_tar() {
        let big: Vec<u8> = (0..70_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let lower = tar_of(&[
            T::Dir("a"),
            T::File("a/x", b"lower x\n"),
            T::File("a/y", b"lower y\n"),
            T::Dir("b"),
            T::File("b/z", b"lower z\n"),
            T::File("big", &big),
            T::Link("a/hard", "a/y"),
        ]);
        let upper = tar_of(&[
            T::File("a/.wh.x", b""),
            T::Dir("b"),
            T::File("b/.wh..wh..opq", b""),
            T::File("b/w", b"upper w\n"),
            T::File("a/y", b"upper y, longer than before\n"),
            T::File("c", b"upper c\n"),
        ]);
        let (_, t0, s0, l0, d0) = indexed(&lower);
        let (_, t1, s1, l1, d1) = indexed(&upper);
        let layers = [
            TarLayer { name: "lower".into(), tree: &t0, tar_start: s0, tar_len: l0, diff_id: d0.clone() },
            TarLayer { name: "upper".into(), tree: &t1, tar_start: s1, tar_len: l1, diff_id: d1.clone() },
        ];
        let m = merge_tar_indexes(&layers, 1 << 16).unwrap();
        assert_eq!(m.block_bits, 9);
        assert_eq!(m.blobs.len(), 2);
        assert_eq!((m.blobs[0].digest.as_str(), m.blobs[1].digest.as_str()), (d0.as_str(), d1.as_str()));
        assert!(m.blobs[0].base >= m.image.len() as u64 && m.blobs[0].base.is_multiple_of(1 << 16));
        assert!(m.blobs[1].base >= m.blobs[0].base + l0 && m.blobs[1].base.is_multiple_of(1 << 16));
        assert_eq!(m.size, m.blobs[1].base + l1);
        assert!((m.stats.whiteouts, m.stats.opaque_dirs) == (1, 1), "{:?}", m.stats);

        // The flat space: the merged image, then each tar where the merge put it.
        let mut flat = vec![0u8; m.size as usize];
        flat[..m.image.len()].copy_from_slice(&m.image);
        for (b, tar) in m.blobs.iter().zip([&lower, &upper]) {
            flat[b.base as usize..(b.base + b.size) as usize].copy_from_slice(&tar[..b.size as usize]);
        }
        let t = read_tree(m.image.as_slice(), &WalkLimits::default()).unwrap();
        let mut shown = BTreeMap::new();
        for (p, nid) in paths(&t) {
            if let TreeBody::Regular { .. } = t.get(nid).unwrap().body {
                shown.insert(p.trim_start_matches('/').to_string(), content(&flat, &t, nid));
            }
        }
        let want: BTreeMap<String, Vec<u8>> = [
            ("a/y", b"upper y, longer than before\n".to_vec()),
            ("a/hard", b"lower y\n".to_vec()),
            ("b/w", b"upper w\n".to_vec()),
            ("big", big.clone()),
            ("c", b"upper c\n".to_vec()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(shown, want);
        // The device table names each tar by its diff_id, at its base.
        let sb = crate::erofs::Superblock::parse(&m.image).unwrap();
        assert_eq!(sb.extra_devices, 2);
    }

    #[test]
    fn layers_that_are_not_tar_indexes_or_point_into_their_index_are_refused() {
        let (_, t0, s0, l0, d0) = indexed(&tar_of(&[T::File("f", b"data")]));
        assert!(merge_tar_indexes(&[], 4096).is_err());
        let unplaced = TarLayer { name: "x".into(), tree: &t0, tar_start: 0, tar_len: l0, diff_id: d0.clone() };
        assert!(matches!(merge_tar_indexes(&[unplaced], 4096), Err(MergeError::Corrupt { .. })));
        // A placement whose tar is shorter than the files say: the chunk lies outside it.
        let short = TarLayer { name: "x".into(), tree: &t0, tar_start: s0, tar_len: 512, diff_id: d0.clone() };
        let e = merge_tar_indexes(&[short], 4096).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        // An image with 4 KiB blocks is not a tar index.
        let mut plain = crate::erofs::writer::Tree::new(crate::erofs::writer::Metadata::with_permissions(0o755));
        plain.insert_path(b"f", crate::erofs::writer::Inode::bytes(crate::erofs::writer::Metadata::with_permissions(0o644), b"x"), crate::erofs::writer::Metadata::with_permissions(0o755)).unwrap();
        let bytes = crate::erofs::reader::tests::write(&plain, &crate::erofs::writer::WriterOptions::default());
        let t = read_tree(bytes.as_slice(), &WalkLimits::default()).unwrap();
        let four_k = TarLayer { name: "y".into(), tree: &t, tar_start: 4096, tar_len: 4096, diff_id: d0 };
        assert!(matches!(merge_tar_indexes(&[four_k], 4096), Err(MergeError::Unsupported { .. })));
    }
}
