//! Reader tests: images made by our writer (every inode kind, every data
//! layout, shared and inline xattrs, hard links, devices) read back whole;
//! compact lz4 indexes of `mkfs.erofs` converted to full ones and checked
//! lcluster by lcluster; the index rebasing; the sparse byte store.

use std::collections::BTreeMap;
use std::io::Cursor;

use super::*;
use crate::erofs::format::{DataLayout, InodeHeader};
use crate::erofs::writer::{self, Chunk, ChunkedData, Compression, Device, FileData, Inode, Metadata, NoFiles, Tree, WriterOptions};

pub(crate) fn write(tree: &Tree, opts: &WriterOptions) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    writer::write_image(tree, opts, &NoFiles, &mut out).unwrap();
    out.into_inner()
}

fn meta(perm: u16) -> Metadata {
    Metadata::new(perm, 0, 0, 1_700_000_000, 0)
}

/// Deterministic, somewhat compressible bytes.
pub(crate) fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [b"alpha ", b"beta ", b"gamma\n", b"delta ", b"epsilon ", b"zeta\t"];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 6) as usize]);
        if x.is_multiple_of(11) {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// The path → nid map of a tree.
pub(crate) fn paths(t: &ImageTree) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), t.root)];
    while let Some((path, nid)) = stack.pop() {
        if let TreeBody::Directory(entries) = &t.get(nid).unwrap().body {
            for e in entries {
                let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                stack.push((p.clone(), e.nid));
                out.insert(p, e.nid);
            }
        }
    }
    out
}

/// A regular file's bytes, decoded from its map the way the kernel reads
/// them, out of `flat` (the whole flat address space; `uniaddr[k-1]` is
/// device k's first block).
pub(crate) fn content(flat: &[u8], t: &ImageTree, nid: u64) -> Vec<u8> {
    let bs = 1usize << t.block_bits();
    let uniaddr: Vec<u64> = t.devices.iter().map(|d| u64::from(d.uniaddr_lo)).collect();
    let TreeBody::Regular { size, data } = &t.get(nid).unwrap().body else { panic!("nid {nid} is not a file") };
    let size = *size as usize;
    let at = |blk: u64, len: usize| flat[blk as usize * bs..blk as usize * bs + len].to_vec();
    match data {
        FileMap::Empty => Vec::new(),
        FileMap::Flat { block } => at(*block, size),
        FileMap::Inline { block, tail } => {
            let mut out = block.map(|b| at(b, size - tail.len())).unwrap_or_default();
            out.extend_from_slice(tail);
            out
        }
        FileMap::Chunked { chunk_bits, chunks } => {
            let csize = 1usize << chunk_bits;
            let mut out = vec![0u8; size];
            for (i, c) in chunks.iter().enumerate() {
                let s = i * csize;
                let n = csize.min(size - s);
                if let Some(b) = format::flat_block(*c, &uniaddr) {
                    out[s..s + n].copy_from_slice(&at(b, n));
                }
            }
            out
        }
        FileMap::Compressed(m) => decompress(flat, bs, size, m),
    }
}

/// A decoder of full lcluster indexes (lz4 and plain pclusters, big
/// pclusters, a tail-packed inline pcluster).
pub(crate) fn decompress(flat: &[u8], bs: usize, size: usize, m: &CompressedMap) -> Vec<u8> {
    let l = 1usize << m.lclusterbits;
    let n = m.indexes.len();
    let kind = |e: &[u8; 8]| u16::from_le_bytes([e[0], e[1]]) & 3;
    let heads: Vec<usize> = (0..n).filter(|&i| full_index_is_head(&m.indexes[i])).collect();
    let mut out = vec![0u8; size];
    for (hi, &lcn) in heads.iter().enumerate() {
        let e = &m.indexes[lcn];
        let start = lcn * l + usize::from(u16::from_le_bytes([e[2], e[3]]));
        if start >= size {
            continue;
        }
        let end = heads.get(hi + 1).map_or(size, |&nx| {
            let ne = &m.indexes[nx];
            (nx * l + usize::from(u16::from_le_bytes([ne[2], ne[3]]))).min(size)
        });
        let input: Vec<u8> = match &m.inline {
            Some((head, bytes)) if *head == lcn as u64 => bytes.clone(),
            _ => {
                let blk = u32::from_le_bytes([e[4], e[5], e[6], e[7]]) as usize;
                let cblk = m.indexes.get(lcn + 1).filter(|x| !full_index_is_head(x)).map_or(1, |x| {
                    let d0 = u16::from_le_bytes([x[4], x[5]]);
                    if d0 & (1 << 11) != 0 {
                        usize::from(d0 & !(1 << 11))
                    } else {
                        1
                    }
                });
                flat[blk * bs..(blk + cblk) * bs].to_vec()
            }
        };
        let want = end - start;
        if kind(e) == 0 {
            out[start..end].copy_from_slice(&input[..want]);
        } else {
            let skip = input.iter().position(|&b| b != 0).unwrap();
            let mut dec = vec![0u8; want];
            let got = lz4_flex::block::decompress_into(&input[skip..], &mut dec).unwrap();
            assert_eq!(got, want, "lcluster {lcn}: decompressed length");
            out[start..end].copy_from_slice(&dec);
        }
    }
    out
}

fn sample_tree() -> (Tree, BTreeMap<&'static str, Vec<u8>>) {
    let mut t = Tree::new(meta(0o755));
    let mut files = BTreeMap::new();
    let m = meta(0o644);
    let add = |t: &mut Tree, files: &mut BTreeMap<&'static str, Vec<u8>>, path: &'static str, data: Vec<u8>| {
        t.insert_path(path.as_bytes(), Inode::bytes(m, &data).with_xattr(b"user.common", b"shared value"), meta(0o755)).unwrap();
        files.insert(path, data);
    };
    add(&mut t, &mut files, "small", b"hello".to_vec());
    add(&mut t, &mut files, "d/tailed", text(1, 10_000));
    add(&mut t, &mut files, "d/exact", text(2, 8192));
    add(&mut t, &mut files, "d/e/empty", Vec::new());
    t.hard_link(b"d/link-to-tailed", b"d/tailed", meta(0o755)).unwrap();
    let owner = Metadata::new(0o4750, 70_000, 5, -3, 999_999_999);
    t.insert_path(b"owned", Inode::bytes(owner, b"x").with_xattr(b"security.capability", &[1, 2, 3]), meta(0o755)).unwrap();
    files.insert("owned", b"x".to_vec());
    t.insert_path(b"sym", Inode::symlink(meta(0o777), b"d/tailed"), meta(0o755)).unwrap();
    t.insert_path(b"gone", Inode::new(meta(0o000), writer::Kind::CharDevice { major: 0, minor: 0 }), meta(0o755)).unwrap();
    t.insert_path(b"blk", Inode::new(meta(0o600), writer::Kind::BlockDevice { major: 259, minor: 70_000 }), meta(0o755)).unwrap();
    t.insert_path(b"fifo", Inode::new(meta(0o600), writer::Kind::Fifo), meta(0o755)).unwrap();
    t.insert_path(b"sock", Inode::new(meta(0o600), writer::Kind::Socket), meta(0o755)).unwrap();
    let opq = t.mkdir_p(b"opaque", meta(0o700)).unwrap();
    t.get_mut(opq).xattrs.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    t.get_mut(opq).xattrs.insert(b"system.posix_acl_default".to_vec(), vec![2, 0, 0, 0]);
    for i in 0..300 {
        let name = format!("many/f{i:03}");
        t.insert_path(name.as_bytes(), Inode::bytes(m, name.as_bytes()), meta(0o755)).unwrap();
    }
    (t, files)
}

#[test]
fn reads_back_what_the_writer_wrote() {
    let (tree, files) = sample_tree();
    let img = write(&tree, &WriterOptions::default());
    let t = read_tree(img.as_slice(), &WalkLimits::default()).unwrap();
    let p = paths(&t);
    for (path, data) in &files {
        let nid = p[&format!("/{path}")];
        assert_eq!(&content(&img, &t, nid), data, "{path}");
        let i = t.get(nid).unwrap();
        assert_eq!(i.xattrs.get(&b"user.common"[..]).map(Vec::as_slice), (*path != "owned").then_some(&b"shared value"[..]), "{path}");
    }
    assert_eq!(p["/d/link-to-tailed"], p["/d/tailed"], "a hard link is one nid");
    assert_eq!(t.get(p["/d/tailed"]).unwrap().nlink, 2);
    assert!(matches!(t.get(p["/d/tailed"]).unwrap().body, TreeBody::Regular { data: FileMap::Inline { block: Some(_), .. }, .. }));
    assert!(matches!(t.get(p["/d/exact"]).unwrap().body, TreeBody::Regular { data: FileMap::Flat { .. }, .. }));
    let owned = t.get(p["/owned"]).unwrap();
    assert_eq!((owned.permissions(), owned.uid, owned.gid, owned.mtime, owned.mtime_nsec), (0o4750, 70_000, 5, -3, 999_999_999));
    assert_eq!(owned.xattrs.get(&b"security.capability"[..]), Some(&vec![1, 2, 3]));
    let small = t.get(p["/small"]).unwrap();
    assert_eq!((small.mtime, small.mtime_nsec, small.mode), (1_700_000_000, 0, 0o100644));
    assert_eq!(t.get(p["/sym"]).unwrap().body, TreeBody::Symlink(b"d/tailed".to_vec()));
    assert_eq!(t.get(p["/gone"]).unwrap().body, TreeBody::CharDevice { major: 0, minor: 0 });
    assert_eq!(t.get(p["/blk"]).unwrap().body, TreeBody::BlockDevice { major: 259, minor: 70_000 });
    assert_eq!(t.get(p["/fifo"]).unwrap().body, TreeBody::Fifo);
    assert_eq!(t.get(p["/sock"]).unwrap().body, TreeBody::Socket);
    let opq = t.get(p["/opaque"]).unwrap();
    assert_eq!(opq.xattrs.get(&b"trusted.overlay.opaque"[..]), Some(&b"y".to_vec()));
    assert_eq!(opq.xattrs.get(&b"system.posix_acl_default"[..]), Some(&vec![2, 0, 0, 0]));
    assert_eq!(opq.mode & 0o170000, 0o040000);
    match &t.get(p["/many"]).unwrap().body {
        TreeBody::Directory(e) => {
            assert_eq!(e.len(), 300, "a directory of several blocks");
            assert!(e.windows(2).all(|w| w[0].name < w[1].name));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(content(&img, &t, p["/many/f299"]), b"many/f299");
}

#[test]
fn reads_lz4_external_and_device_files() {
    let mut tree = Tree::new(meta(0o755));
    let big = text(7, 300_000);
    tree.insert_path(b"z/big", Inode::bytes(meta(0o644), &big), meta(0o755)).unwrap();
    let noise: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    tree.insert_path(b"z/noise", Inode::bytes(meta(0o644), &noise), meta(0o755)).unwrap();
    let chunked = ChunkedData { chunk_bits: 12, chunks: vec![Chunk::At { device: 1, block: 3 }, Chunk::Hole, Chunk::At { device: 0, block: 9 }] };
    tree.insert_path(b"c", Inode::file(meta(0o644), 10_000, FileData::Chunked(chunked)), meta(0o755)).unwrap();
    tree.insert_path(b"f", Inode::file(meta(0o644), 5000, FileData::FlatAddress { block: 40 }), meta(0o755)).unwrap();
    let opts = WriterOptions {
        compression: Compression::Lz4 { pcluster_bytes: 16384 },
        devices: vec![Device { tag: [b'a'; 64], blocks: 10, uniaddr: 30 }],
        ..WriterOptions::default()
    };
    let img = write(&tree, &opts);
    let t = read_tree(img.as_slice(), &WalkLimits::default()).unwrap();
    assert_eq!(t.devices.len(), 1);
    assert_eq!((t.devices[0].blocks_lo, t.devices[0].uniaddr_lo), (10, 30));
    assert_eq!(t.devices[0].tag_text(), Some(&"a".repeat(64)[..]));
    let p = paths(&t);
    match &t.get(p["/z/big"]).unwrap().body {
        TreeBody::Regular { data: FileMap::Compressed(m), .. } => {
            assert!(!m.was_compact);
            assert_eq!(m.indexes.len(), 300_000usize.div_ceil(4096));
            assert!(m.max_pcluster_blocks >= 1 && m.max_pcluster_blocks <= 4);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(content(&img, &t, p["/z/big"]), big);
    assert_eq!(content(&img, &t, p["/z/noise"]), noise);
    match &t.get(p["/c"]).unwrap().body {
        TreeBody::Regular { data: FileMap::Chunked { chunk_bits: 12, chunks }, .. } => assert_eq!(
            chunks,
            &vec![ChunkTarget::OtherDevice { device: 1, blkaddr: 3 }, ChunkTarget::Hole, ChunkTarget::Primary(9)]
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.get(p["/f"]).unwrap().body, TreeBody::Regular { size: 5000, data: FileMap::Flat { block: 40 } });
    assert_eq!(format::flat_block(ChunkTarget::OtherDevice { device: 1, blkaddr: 3 }, &[30]), Some(33));
    assert_eq!(format::flat_block(ChunkTarget::OtherDevice { device: 2, blkaddr: 3 }, &[30]), None);
    assert_eq!(format::flat_block(ChunkTarget::Hole, &[30]), None);
}

#[test]
fn rebasing_moves_heads_only() {
    let idx = vec![
        full_head_index(1, 0, 100),
        full_nonhead_index(1, Some(2), 2),
        full_nonhead_index(2, None, 1),
        full_head_index(0, 512, 7),
        full_head_index(1, 0, 0), // the inline tail's head
        full_head_index(1, 0, 0), // past EOF
    ];
    let out = rebase_full_indexes(&idx, 1000, Some(4), 5 * 4096, 12).unwrap();
    assert_eq!(out[0], full_head_index(1, 0, 1100));
    assert_eq!(out[1], idx[1]);
    assert_eq!(out[2], idx[2]);
    assert_eq!(out[3], full_head_index(0, 512, 1007));
    assert_eq!(out[4], idx[4], "the inline head keeps its address");
    assert_eq!(out[5], idx[5], "a head past EOF keeps its address");
    assert!(rebase_full_indexes(&idx, u64::from(u32::MAX), None, 1 << 20, 12).is_err());
}

#[test]
fn sparse_image_holds_pieces() {
    let mut s = SparseImage::new(100);
    s.insert(10, Bytes::from_static(b"0123456789"));
    s.insert(15, Bytes::from_static(b"abcdefghij")); // overlaps: trimmed
    s.insert(0, Bytes::from_static(b"ABCDEFGHIJKL")); // overlaps the start
    let mut buf = [0u8; 25];
    s.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"ABCDEFGHIJ0123456789fghij");
    assert_eq!(s.held_bytes(), 25);
    assert_eq!(s.missing(&[0..30, 40..50]), vec![25..30, 40..50]);
    assert_eq!(s.missing(&[12..14, 26..27]), vec![26..27], "inside one piece");
    assert!(s.read_at(20, &mut [0u8; 10]).is_err(), "a byte not held");
    assert!(s.read_at(95, &mut [0u8; 10]).is_err(), "past the end");
}

/// `mkfs.erofs` (Debian's 1.5) with compact lz4 indexes, big pclusters and
/// tail packing: converted indexes decode to the same lclusters, and the
/// files decompress to their sources.
#[test]
fn compact_indexes_of_mkfs_convert_to_full() {
    let Some(dir) = mkfs_tree() else { return };
    for args in [&["-zlz4hc"][..], &["-zlz4hc", "-C16384"], &["-zlz4", "-Eztailpacking"], &["-zlz4hc", "-C65536", "-Eztailpacking"]] {
        let img = dir.path().join("img");
        let st = std::process::Command::new("mkfs.erofs").args(args).arg("-T0").arg(&img).arg(dir.path().join("src")).output().unwrap();
        if !st.status.success() {
            eprintln!("mkfs.erofs {args:?}: {}", String::from_utf8_lossy(&st.stderr));
            continue;
        }
        let data = std::fs::read(&img).unwrap();
        let t = read_tree(data.as_slice(), &WalkLimits::default()).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let p = paths(&t);
        let mut compressed = 0;
        for name in ["big", "mid", "tiny", "noise"] {
            let nid = p[&format!("/{name}")];
            let want = std::fs::read(dir.path().join("src").join(name)).unwrap();
            if let TreeBody::Regular { data: FileMap::Compressed(m), .. } = &t.get(nid).unwrap().body {
                compressed += 1;
                check_same_lclusters(&data, &t, nid, m);
            }
            assert_eq!(content(&data, &t, nid), want, "{args:?} {name}");
        }
        assert!(compressed >= 2, "{args:?}: only {compressed} compressed files");
    }
}

fn mkfs_tree() -> Option<tempfile::TempDir> {
    if std::process::Command::new("mkfs.erofs").arg("--help").output().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "mkfs.erofs missing in CI");
        eprintln!("SKIPPED: mkfs.erofs missing");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), text(11, 1_000_003)).unwrap();
    std::fs::write(src.join("mid"), text(12, 70_001)).unwrap();
    std::fs::write(src.join("tiny"), text(13, 5000)).unwrap();
    let noise: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(src.join("noise"), noise).unwrap();
    Some(dir)
}

/// Decodes the original (compact or full) indexes and the converted ones
/// with the format module and compares every lcluster.
fn check_same_lclusters(img: &[u8], t: &ImageTree, nid: u64, m: &CompressedMap) {
    let off = t.sb.inode_offset(nid).unwrap();
    let h = InodeHeader::parse(nid, off, &img[off as usize..]).unwrap();
    let header_pos = h.body_end().unwrap().next_multiple_of(8);
    let zh = ZMapHeader::parse(&img[header_pos as usize..]).unwrap();
    let orig = ZIndexLayout::new(&h, header_pos, &zh, t.sb.blkszbits).unwrap();
    // The converted indexes as a COMPRESSED_FULL inode would hold them.
    let mut full_h = h.clone();
    full_h.layout = DataLayout::CompressedFull;
    let mut fzh = zh;
    fzh.advise &= !1;
    let conv = ZIndexLayout::new(&full_h, 0, &fzh, t.sb.blkszbits).unwrap();
    let mut buf = vec![0u8; 16];
    for e in &m.indexes {
        buf.extend_from_slice(e);
    }
    struct Whole<'a>(&'a [u8]);
    impl IndexBytes for Whole<'_> {
        fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], WalkError> {
            self.0.get(pos as usize..pos as usize + len).ok_or_else(|| WalkError::Corrupt("short".into()))
        }
    }
    for lcn in 0..orig.nlclusters {
        let a = orig.load(&mut Whole(img), lcn).unwrap();
        let b = conv.load(&mut Whole(&buf), lcn).unwrap();
        assert_eq!(a, b, "nid {nid} lcluster {lcn}");
    }
}
