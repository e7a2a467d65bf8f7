//! Merge tests without a kernel: layers written by our writer, merged,
//! the merged image read back and every file decoded out of the flat
//! address space `[merged | blob 0 | blob 1 | …]`, against a model of
//! overlayfs' rules applied to the same layer descriptions.

use std::collections::BTreeMap;

use super::layout::{group_layers, BlobInfo};
use super::*;
use crate::erofs::reader::tests::{content, paths, text, write};
use crate::erofs::reader::{read_tree, ImageTree};
use crate::erofs::writer::{Compression, Kind, Metadata, Tree, WriterOptions};
use crate::erofs::WalkLimits;

/// One entry of a layer.
#[derive(Clone)]
enum E {
    File(&'static str, Vec<u8>),
    Dir(&'static str),
    Whiteout(&'static str),
    /// An opaque directory (its entries follow as other entries).
    Opaque(&'static str),
    /// A hard link to a file of the same layer.
    Link(&'static str, &'static str),
    Sym(&'static str, &'static str),
}

fn meta(perm: u16) -> Metadata {
    Metadata::new(perm, 0, 0, 1_700_000_000, 0)
}

fn layer_tree(entries: &[E]) -> Tree {
    let mut t = Tree::new(meta(0o755));
    for e in entries {
        match e {
            E::File(p, d) => {
                t.insert_path(p.as_bytes(), Inode::bytes(meta(0o644), d).with_xattr(b"user.layer", p.as_bytes()), meta(0o755)).unwrap();
            }
            E::Dir(p) => {
                t.mkdir_p(p.as_bytes(), meta(0o711)).unwrap();
            }
            E::Whiteout(p) => {
                t.insert_path(p.as_bytes(), Inode::new(meta(0), Kind::CharDevice { major: 0, minor: 0 }), meta(0o755)).unwrap();
            }
            E::Opaque(p) => {
                let d = t.mkdir_p(p.as_bytes(), meta(0o750)).unwrap();
                t.get_mut(d).xattrs.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
                t.get_mut(d).xattrs.insert(b"trusted.overlay.origin".to_vec(), Vec::new());
            }
            E::Link(p, target) => {
                t.hard_link(p.as_bytes(), target.as_bytes(), meta(0o755)).unwrap();
            }
            E::Sym(p, target) => {
                t.insert_path(p.as_bytes(), Inode::symlink(meta(0o777), target.as_bytes()), meta(0o755)).unwrap();
            }
        }
    }
    t
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
    Sym(Vec<u8>),
}

/// overlayfs' rules, on paths.
fn apply(model: &mut BTreeMap<String, Node>, entries: &[E]) {
    let remove = |m: &mut BTreeMap<String, Node>, p: &str| {
        m.remove(p);
        let prefix = format!("{p}/");
        m.retain(|k, _| !k.starts_with(&prefix));
    };
    let parents = |m: &mut BTreeMap<String, Node>, p: &str| {
        let mut acc = String::new();
        for c in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            acc = if acc.is_empty() { (*c).to_string() } else { format!("{acc}/{c}") };
            if m.get(&acc) != Some(&Node::Dir) {
                let prefix = format!("{acc}/");
                m.retain(|k, _| !k.starts_with(&prefix));
                m.insert(acc.clone(), Node::Dir);
            }
        }
    };
    // The layer's own content of each path (for hard links).
    let mut own: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for e in entries {
        match e {
            E::File(p, d) => {
                parents(model, p);
                remove(model, p);
                model.insert(p.to_string(), Node::File(d.clone()));
                own.insert(p, d.clone());
            }
            E::Dir(p) => {
                parents(model, p);
                if model.get(*p) != Some(&Node::Dir) {
                    remove(model, p);
                    model.insert(p.to_string(), Node::Dir);
                }
            }
            E::Opaque(p) => {
                parents(model, p);
                remove(model, p);
                model.insert(p.to_string(), Node::Dir);
            }
            E::Whiteout(p) => {
                parents(model, p);
                remove(model, p);
            }
            E::Link(p, t) => {
                parents(model, p);
                remove(model, p);
                model.insert(p.to_string(), Node::File(own[t].clone()));
            }
            E::Sym(p, t) => {
                parents(model, p);
                remove(model, p);
                model.insert(p.to_string(), Node::Sym(t.as_bytes().to_vec()));
            }
        }
    }
}

struct Built {
    blobs: Vec<BlobInfo>,
    data: Vec<Vec<u8>>,
    trees: Vec<ImageTree>,
}

fn build_layers(layers: &[(Vec<E>, WriterOptions)]) -> Built {
    let mut b = Built { blobs: Vec::new(), data: Vec::new(), trees: Vec::new() };
    for (i, (entries, opts)) in layers.iter().enumerate() {
        let img = write(&layer_tree(entries), opts);
        let t = read_tree(img.as_slice(), &WalkLimits::default()).unwrap();
        b.blobs.push(BlobInfo { digest: format!("sha256:{}", format!("{i:02x}").repeat(32)), size: img.len() as u64, erofs: Some((t.sb.clone(), t.devices.clone())) });
        b.data.push(img);
        b.trees.push(t);
    }
    b
}

/// The flat address space of a merged image.
fn flat(m: &MergedImage, data: &[Vec<u8>]) -> Vec<u8> {
    let mut f = vec![0u8; m.size as usize];
    f[..m.image.len()].copy_from_slice(&m.image);
    for (b, d) in m.blobs.iter().zip(data) {
        f[b.base as usize..b.base as usize + d.len()].copy_from_slice(d);
    }
    f
}

/// What the merged image shows, as the model's paths.
fn shown(m: &MergedImage, f: &[u8]) -> (BTreeMap<String, Node>, ImageTree) {
    let t = read_tree(m.image.as_slice(), &WalkLimits::default()).unwrap();
    let mut out = BTreeMap::new();
    for (p, nid) in paths(&t) {
        let i = t.get(nid).unwrap();
        assert!(!i.xattrs.keys().any(|k| k.starts_with(b"trusted.overlay.")), "{p}: overlay xattrs are not shown");
        let node = match &i.body {
            TreeBody::Directory(_) => Node::Dir,
            TreeBody::Regular { .. } => Node::File(content(f, &t, nid)),
            TreeBody::Symlink(s) => Node::Sym(s.clone()),
            other => panic!("{p}: {other:?}"),
        };
        out.insert(p.trim_start_matches('/').to_string(), node);
    }
    (out, t)
}

fn three_layers() -> Vec<(Vec<E>, WriterOptions)> {
    let plain = WriterOptions::default();
    let lz4 = WriterOptions { compression: Compression::Lz4 { pcluster_bytes: 16384 }, ..WriterOptions::default() };
    vec![
        (
            vec![
                E::File("etc/a", text(1, 5000)),
                E::File("etc/b", b"bee".to_vec()),
                E::File("usr/bin/tool", text(2, 8192)),
                E::File("usr/lib/big", text(3, 200_000)),
                E::File("opq/old1", b"old".to_vec()),
                E::File("opq/sub/old2", b"old2".to_vec()),
                E::File("wh/victim", b"v".to_vec()),
                E::File("wh/keep", b"k".to_vec()),
                E::File("hl/a", text(4, 9000)),
                E::Link("hl/b", "hl/a"),
                E::Link("hl/c", "hl/a"),
                E::File("d2f/x", b"x".to_vec()),
                E::File("f2d", b"file".to_vec()),
                E::Sym("link", "etc/a"),
                E::Whiteout("nothing-to-hide"),
            ],
            plain.clone(),
        ),
        (
            vec![
                E::File("etc/a", text(5, 70_000)),
                E::Whiteout("wh/victim"),
                E::Opaque("opq"),
                E::File("opq/new", text(6, 30_000)),
                E::File("hl/a", b"replaced".to_vec()),
                E::File("d2f", text(7, 12_345)),
                E::File("f2d/y", b"y".to_vec()),
                E::File("usr/lib/python/mod.py", text(8, 100_000)),
                E::Dir("empty/dir"),
            ],
            lz4,
        ),
        (
            vec![
                E::Whiteout("etc/b"),
                E::File("usr/bin/tool", text(9, 4096 * 3 + 17)),
                E::File("usr/lib/python/mod.py", b"upper wins".to_vec()),
                E::Whiteout("usr/lib/big"),
                E::File("opq/new2", b"n2".to_vec()),
                E::Sym("link", "usr/bin/tool"),
            ],
            plain,
        ),
    ]
}

#[test]
fn merged_tree_is_the_layers_applied_in_order() {
    let layers = three_layers();
    let b = build_layers(&layers);
    let groups = group_layers(&b.blobs).unwrap();
    assert_eq!(groups.len(), 3);
    let m = build_merged(&b.blobs, &groups, &b.trees).unwrap();
    let mut model = BTreeMap::new();
    for (entries, _) in &layers {
        apply(&mut model, entries);
    }
    let f = flat(&m, &b.data);
    let (got, t) = shown(&m, &f);
    assert_eq!(got.keys().collect::<Vec<_>>(), model.keys().collect::<Vec<_>>());
    for (p, n) in &model {
        assert!(got[p] == *n, "{p} differs");
    }
    // Hard links survive; the replaced name left them.
    let p = paths(&t);
    assert_eq!(p["/hl/b"], p["/hl/c"]);
    assert_ne!(p["/hl/a"], p["/hl/b"]);
    assert_eq!(t.get(p["/hl/b"]).unwrap().nlink, 2);
    assert_eq!(m.stats.compressed_files, 4, "{:?}", m.stats);
    assert!(m.stats.whiteouts >= 3 && m.stats.opaque_dirs == 1, "{:?}", m.stats);
    // Upper directory attributes win; xattrs of files come along.
    assert_eq!(t.get(p["/empty/dir"]).unwrap().permissions(), 0o711);
    // Layer 2 names opq/new2, so its own (implicit, 0755) opq is the upper one.
    assert_eq!(t.get(p["/opq"]).unwrap().permissions(), 0o755);
    assert_eq!(t.get(p["/opq/new"]).unwrap().xattrs.get(&b"user.layer"[..]), Some(&b"opq/new".to_vec()));
    // Every blob sits aligned after the image, in order.
    assert!(m.blobs[0].base >= m.image.len() as u64 && m.blobs.iter().all(|x| x.base % 4096 == 0));
    assert!(m.blobs.windows(2).all(|w| w[0].base + w[0].size <= w[1].base));
    assert_eq!(m.size, m.blobs[2].base + m.blobs[2].size);
}

#[test]
fn merged_image_is_a_valid_multi_blob_image_of_its_layers() {
    let b = build_layers(&three_layers());
    let m = build_merged(&b.blobs, &group_layers(&b.blobs).unwrap(), &b.trees).unwrap();
    let t = read_tree(m.image.as_slice(), &WalkLimits::default()).unwrap();
    assert_eq!(t.devices.len(), 3);
    let mut blobs = vec![BlobInfo { digest: "sha256:".to_string() + &"ff".repeat(32), size: m.image.len() as u64, erofs: Some((t.sb.clone(), t.devices.clone())) }];
    // Pushed in another order: the tags find them.
    blobs.push(b.blobs[2].clone());
    blobs.push(b.blobs[0].clone());
    blobs.push(b.blobs[1].clone());
    for x in &mut blobs[1..] {
        x.erofs = None;
    }
    let g = group_layers(&blobs).unwrap();
    assert_eq!(g.len(), 1);
    let by_blob: Vec<usize> = g[0].devices.iter().map(|d| d.blob).collect();
    assert_eq!(by_blob, vec![2, 3, 1]);
    for (d, placed) in g[0].devices.iter().zip(&m.blobs) {
        assert_eq!(d.start, placed.base);
    }
    // Deterministic: the same layers give the same bytes.
    let again = build_merged(&b.blobs, &group_layers(&b.blobs).unwrap(), &b.trees).unwrap();
    assert_eq!(again.image, m.image);
}

#[test]
fn small_blocks_and_tails_that_do_not_fit() {
    // A 4 KiB layer with an inline tail of 3000 bytes merged with a 512-byte
    // block layer: the merged image has 512-byte blocks, the tail becomes a
    // local chunk.
    let small = WriterOptions { block_bits: 9, ..WriterOptions::default() };
    let layers = vec![
        (vec![E::File("t", text(20, 4096 * 2 + 3000)), E::File("u", text(21, 100))], WriterOptions::default()),
        (vec![E::File("s", text(22, 700))], small),
    ];
    let b = build_layers(&layers);
    let m = build_merged(&b.blobs, &group_layers(&b.blobs).unwrap(), &b.trees).unwrap();
    assert_eq!(m.block_bits, 9);
    let f = flat(&m, &b.data);
    let (got, t) = shown(&m, &f);
    assert_eq!(got["t"], Node::File(text(20, 4096 * 2 + 3000)));
    assert_eq!(got["u"], Node::File(text(21, 100)));
    assert_eq!(got["s"], Node::File(text(22, 700)));
    let p = paths(&t);
    assert!(matches!(t.get(p["/t"]).unwrap().body, TreeBody::Regular { data: FileMap::Chunked { .. }, .. }));
    // A compressed 4 KiB layer cannot go into 512-byte blocks.
    let lz4 = WriterOptions { compression: Compression::Lz4 { pcluster_bytes: 16384 }, ..WriterOptions::default() };
    let layers = vec![
        (vec![E::File("z", text(23, 100_000))], lz4),
        (vec![E::File("s", b"s".to_vec())], WriterOptions { block_bits: 9, ..WriterOptions::default() }),
    ];
    let b = build_layers(&layers);
    let e = build_merged(&b.blobs, &group_layers(&b.blobs).unwrap(), &b.trees).unwrap_err().to_string();
    assert!(e.contains("compressed file with 4096-byte blocks"), "{e}");
}

#[test]
fn chunked_layers_with_devices_map_through_their_tables() {
    // A tar-index-like layer: an index whose files are chunks on device 1,
    // plus a flat address beyond the primary (device 1 by its uniaddr).
    let mut tar = vec![0u8; 64 * 1024];
    tar[8192..8192 + 11].copy_from_slice(b"hello chunk");
    tar[20480..20480 + 9].copy_from_slice(b"flat addr");
    let mut t = Tree::new(meta(0o755));
    let c = ChunkedData::contiguous(1, 16, 11, 9).unwrap();
    t.insert_path(b"c", Inode::file(meta(0o644), 11, FileData::Chunked(c)), meta(0o755)).unwrap();
    let opts0 = WriterOptions { block_bits: 9, metadata_only: true, devices: vec![Device { tag: [0; 64], blocks: 128, uniaddr: 0 }], ..WriterOptions::default() };
    let index_len = planned_size(&t, &opts0).unwrap();
    let uniaddr = (index_len / 512) as u32;
    t.insert_path(b"f", Inode::file(meta(0o644), 9, FileData::FlatAddress { block: u64::from(uniaddr) + 40 }), meta(0o755)).unwrap();
    let opts = WriterOptions { devices: vec![Device { tag: [0; 64], blocks: 128, uniaddr }], ..opts0 };
    let index = write(&t, &opts);
    let it = read_tree(index.as_slice(), &WalkLimits::default()).unwrap();
    let other = write(&layer_tree(&[E::File("o", b"other".to_vec())]), &WriterOptions::default());
    let ot = read_tree(other.as_slice(), &WalkLimits::default()).unwrap();
    let blobs = vec![
        BlobInfo { digest: format!("sha256:{}", "01".repeat(32)), size: index.len() as u64, erofs: Some((it.sb.clone(), it.devices.clone())) },
        BlobInfo { digest: format!("sha256:{}", "02".repeat(32)), size: tar.len() as u64, erofs: None },
        BlobInfo { digest: format!("sha256:{}", "03".repeat(32)), size: other.len() as u64, erofs: Some((ot.sb.clone(), vec![])) },
    ];
    let groups = group_layers(&blobs).unwrap();
    assert_eq!(groups.len(), 2);
    let m = build_merged(&blobs, &groups, &[it, ot]).unwrap();
    let f = flat(&m, &[index, tar, other]);
    let (got, _) = shown(&m, &f);
    assert_eq!(got["c"], Node::File(b"hello chunk".to_vec()));
    assert_eq!(got["f"], Node::File(b"flat addr".to_vec()));
    assert_eq!(got["o"], Node::File(b"other".to_vec()));
}
