//! Writer tests: images are parsed back with the reader's structures
//! (`format.rs`), a small decoder here, and the metadata walker.

use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dir::{DirLayout, Entry};
use super::*;
use crate::erofs::format::{self, for_each_dirent, DataLayout, FileKind, InodeHeader, Superblock};
use crate::erofs::{walk, MetaReader, WalkError, WalkLimits};

struct MemFiles(HashMap<PathBuf, Vec<u8>>);

struct MemFile(Vec<u8>);
impl ReadAt for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let s = self
            .0
            .get(offset as usize..offset as usize + buf.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(s);
        Ok(())
    }
}
impl FileReader for MemFiles {
    fn open(&self, path: &Path) -> std::io::Result<Box<dyn ReadAt + '_>> {
        self.0
            .get(path)
            .map(|d| Box::new(MemFile(d.clone())) as Box<dyn ReadAt>)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

fn build(tree: &Tree, opts: &WriterOptions) -> (Vec<u8>, ImageSummary) {
    build_with(tree, opts, &NoFiles)
}

fn build_with(tree: &Tree, opts: &WriterOptions, files: &dyn FileReader) -> (Vec<u8>, ImageSummary) {
    let mut out = Cursor::new(Vec::new());
    let s = write_image(tree, opts, files, &mut out).unwrap();
    let v = out.into_inner();
    assert_eq!(v.len() as u64, s.image_size);
    (v, s)
}

fn meta(perm: u16) -> Metadata {
    Metadata::new(perm, 0, 0, 1_700_000_000, 0)
}

/// A minimal reader of what the writer produces.
struct Img<'a> {
    d: &'a [u8],
    sb: Superblock,
}

impl<'a> Img<'a> {
    fn new(d: &'a [u8]) -> Self {
        let sb = Superblock::parse(d).unwrap();
        assert!(sb.verify_checksum(d).unwrap());
        Img { d, sb }
    }
    fn bs(&self) -> u64 {
        self.sb.block_size()
    }
    fn inode(&self, nid: u64) -> InodeHeader {
        let off = self.sb.inode_offset(nid).unwrap();
        InodeHeader::parse(nid, off, &self.d[off as usize..]).unwrap()
    }
    fn le32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.d[off as usize..off as usize + 4].try_into().unwrap())
    }
    /// The bytes of a flat, inline, chunk-based (primary device) or lz4 inode.
    fn content(&self, nid: u64) -> Vec<u8> {
        let h = self.inode(nid);
        let bs = self.bs();
        let size = h.size as usize;
        match h.layout {
            DataLayout::FlatPlain | DataLayout::FlatInline => {
                let mut out = Vec::new();
                let full = if h.layout == DataLayout::FlatInline { h.size / bs } else { h.blocks(self.sb.blkszbits) };
                if full > 0 {
                    let start = (h.i_u as u64 * bs) as usize;
                    out.extend_from_slice(&self.d[start..start + (full * bs) as usize]);
                }
                if h.layout == DataLayout::FlatInline {
                    let t = h.body_end().unwrap() as usize;
                    out.extend_from_slice(&self.d[t..t + (h.size % bs) as usize]);
                }
                out.truncate(size);
                out
            }
            DataLayout::ChunkBased => {
                let cl = format::ChunkLayout::new(&h, self.sb.blkszbits).unwrap();
                let mut out = vec![0u8; size];
                for i in 0..cl.nchunks {
                    let e = cl.start + i * cl.unit;
                    let entry = &self.d[e as usize..(e + cl.unit) as usize];
                    match cl.decode(entry, self.sb.device_id_mask()).unwrap() {
                        format::ChunkTarget::Hole => {}
                        format::ChunkTarget::Primary(b) => {
                            let s = (i * cl.chunk_size()) as usize;
                            let n = (cl.chunk_size() as usize).min(size - s);
                            let src = (b * bs) as usize;
                            out[s..s + n].copy_from_slice(&self.d[src..src + n]);
                        }
                        other => panic!("unexpected chunk target {other:?}"),
                    }
                }
                out
            }
            DataLayout::CompressedFull => self.decompress(&h),
            other => panic!("layout {other:?}"),
        }
    }
    fn decompress(&self, h: &InodeHeader) -> Vec<u8> {
        let bs = self.bs();
        let hdr = h.body_end().unwrap().next_multiple_of(8);
        let idx = hdr + 16;
        let n = h.size.div_ceil(bs);
        let mut out = Vec::new();
        let mut lcn = 0;
        while lcn < n {
            let e = idx + lcn * 8;
            let ty = u16::from_le_bytes(self.d[e as usize..e as usize + 2].try_into().unwrap()) & 3;
            let blk = self.le32(e + 4) as u64;
            if ty == 0 {
                let take = bs.min(h.size - lcn * bs) as usize;
                out.extend_from_slice(&self.d[(blk * bs) as usize..(blk * bs) as usize + take]);
                lcn += 1;
                continue;
            }
            assert_eq!(ty, 1);
            let e1 = e + 8;
            let d0 = u16::from_le_bytes(self.d[e1 as usize + 4..e1 as usize + 6].try_into().unwrap());
            assert!(d0 & (1 << 11) != 0, "CBLKCNT after a HEAD1");
            let cblocks = u64::from(d0 & !(1 << 11));
            let delta1 = u16::from_le_bytes(self.d[e1 as usize + 6..e1 as usize + 8].try_into().unwrap());
            let lblocks = 1 + u64::from(delta1);
            let llen = (lblocks * bs).min(h.size - lcn * bs) as usize;
            let p = &self.d[(blk * bs) as usize..((blk + cblocks) * bs) as usize];
            let start = p.iter().position(|&b| b != 0).unwrap();
            let dec = lz4_flex::block::decompress(&p[start..], llen).unwrap();
            assert_eq!(dec.len(), llen);
            out.extend_from_slice(&dec);
            lcn += lblocks;
        }
        out
    }
    fn dir(&self, nid: u64) -> Vec<(Vec<u8>, u64, u8)> {
        let h = self.inode(nid);
        assert_eq!(h.kind, FileKind::Directory);
        let data = self.content(nid);
        let bs = self.bs() as usize;
        let mut out = Vec::new();
        for block in data.chunks(bs) {
            for_each_dirent(block, |d| {
                out.push((d.name.to_vec(), d.nid, d.file_type));
                Ok(())
            })
            .unwrap();
        }
        out
    }
    fn lookup(&self, path: &str) -> u64 {
        let mut nid = self.sb.root_nid;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            nid = self
                .dir(nid)
                .into_iter()
                .find(|(n, _, _)| n == c.as_bytes())
                .unwrap_or_else(|| panic!("{path}: no {c}"))
                .1;
        }
        nid
    }
    /// (full name, value) of an inode's xattrs.
    fn xattrs(&self, nid: u64) -> Vec<(String, Vec<u8>)> {
        let h = self.inode(nid);
        let mut out = Vec::new();
        if h.xattr_icount == 0 {
            return out;
        }
        let base = (h.offset + h.inode_size()) as usize;
        let shared = self.d[base + 4] as usize;
        let prefix = |i: u8| match i {
            1 => "user.",
            2 => "system.posix_acl_access",
            3 => "system.posix_acl_default",
            4 => "trusted.",
            6 => "security.",
            _ => panic!("index {i}"),
        };
        let entry = |pos: usize, out: &mut Vec<(String, Vec<u8>)>| -> usize {
            let nl = self.d[pos] as usize;
            let idx = self.d[pos + 1];
            let vl = u16::from_le_bytes(self.d[pos + 2..pos + 4].try_into().unwrap()) as usize;
            let name = format!("{}{}", prefix(idx), String::from_utf8_lossy(&self.d[pos + 4..pos + 4 + nl]));
            out.push((name, self.d[pos + 4 + nl..pos + 4 + nl + vl].to_vec()));
            format::xattr_entry_size(&self.d[pos..pos + 4]).unwrap() as usize
        };
        for i in 0..shared {
            let id = self.le32((base + 12 + 4 * i) as u64);
            entry(self.sb.shared_xattr_offset(id).unwrap() as usize, &mut out);
        }
        let mut pos = base + 12 + 4 * shared;
        let end = base + h.xattr_size() as usize;
        while pos < end {
            pos += entry(pos, &mut out);
        }
        out.sort();
        out
    }
}

struct Reader<'a>(&'a [u8]);
impl MetaReader for Reader<'_> {
    fn prefetch(&mut self, _: &[Range<u64>]) -> Result<(), WalkError> {
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

/// Everything the walker must have local lies below `metadata_end`, in one range.
fn assert_one_metadata_range(img: &[u8], s: &ImageSummary) {
    let map = walk(&mut Reader(img), img.len() as u64, &WalkLimits::default()).unwrap();
    let end = s.metadata_end.next_multiple_of(4096).min(img.len() as u64);
    assert_eq!(map.required, vec![0..end], "required ranges of a lazy-layout image");
    for r in &map.data_extents {
        assert!(r.start >= s.metadata_end, "data extent {r:?} inside the metadata");
    }
}

fn sample_tree() -> Tree {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let dir = t.add(Inode::dir(Metadata::new(0o750, 1, 2, 1_700_000_000, 0)));
    t.link(r, b"dir", dir).unwrap();
    let tiny = t.add(Inode::bytes(meta(0o644), b"hello\n").with_xattr(b"user.k", b"v"));
    t.link(dir, b"tiny", tiny).unwrap();
    t.link(r, b"hard", tiny).unwrap();
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let bl = t.add(Inode::bytes(meta(0o600), &block));
    t.link(r, b"block", bl).unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let b = t.add(Inode::bytes(Metadata::new(0o644, 70000, 80000, 1_600_000_000, 123_456_789), &big));
    t.link(r, b"big", b).unwrap();
    let e = t.add(Inode::bytes(meta(0o644), b""));
    t.link(r, b"empty", e).unwrap();
    let s = t.add(Inode::symlink(meta(0o777), b"dir/tiny"));
    t.link(r, b"link", s).unwrap();
    let long = vec![b'x'; 4095];
    let s2 = t.add(Inode::symlink(meta(0o777), &long));
    t.link(r, b"longlink", s2).unwrap();
    let c = t.add(Inode::new(meta(0o600), Kind::CharDevice { major: 1, minor: 300 }));
    t.link(r, b"cdev", c).unwrap();
    let bd = t.add(Inode::new(meta(0o600), Kind::BlockDevice { major: 259, minor: 65537 }));
    t.link(r, b"bdev", bd).unwrap();
    let f = t.add(Inode::new(meta(0o644), Kind::Fifo));
    t.link(r, b"fifo", f).unwrap();
    let so = t.add(Inode::new(meta(0o755), Kind::Socket));
    t.link(r, b"sock", so).unwrap();
    t
}

#[test]
fn roundtrip_of_every_kind() {
    let t = sample_tree();
    let (img, s) = build(&t, &WriterOptions::default());
    let im = Img::new(&img);
    assert_eq!(im.inode(im.lookup("dir/tiny")).nid, im.lookup("hard"), "a hard link is one inode");
    let tiny = im.inode(im.lookup("hard"));
    assert_eq!(tiny.layout, DataLayout::FlatInline);
    assert_eq!(im.content(tiny.nid), b"hello\n");
    assert_eq!(im.xattrs(tiny.nid), vec![("user.k".into(), b"v".to_vec())]);
    let nlink = u16::from_le_bytes(img[tiny.offset as usize + 6..tiny.offset as usize + 8].try_into().unwrap());
    assert_eq!(nlink, 2);
    let block = im.inode(im.lookup("block"));
    assert_eq!((block.layout, block.size), (DataLayout::FlatPlain, 4096));
    assert_eq!(im.content(block.nid)[7], 49);
    let big = im.inode(im.lookup("big"));
    assert!(big.extended, "uid/gid > 65535 and a foreign mtime need an extended inode");
    let off = big.offset as usize;
    assert_eq!(u32::from_le_bytes(img[off + 24..off + 28].try_into().unwrap()), 70000);
    assert_eq!(u32::from_le_bytes(img[off + 40..off + 44].try_into().unwrap()), 123_456_789);
    assert_eq!(im.content(big.nid).len(), 200_000);
    assert_eq!(im.content(big.nid)[199_999], (199_999 % 251) as u8);
    assert_eq!(im.content(im.lookup("link")), b"dir/tiny");
    let ll = im.inode(im.lookup("longlink"));
    assert_eq!((ll.layout, ll.size), (DataLayout::FlatPlain, 4095));
    assert_eq!(im.content(ll.nid), vec![b'x'; 4095]);
    let c = im.inode(im.lookup("cdev"));
    assert_eq!(c.i_u, ondisk::encode_rdev(1, 300));
    assert_eq!(ondisk::encode_rdev(259, 65537), (65537 & 0xff) | (259 << 8) | ((65537 & !0xff) << 12));
    assert_eq!(im.inode(im.lookup("fifo")).kind, FileKind::Fifo);
    assert_eq!(im.inode(im.lookup("sock")).kind, FileKind::Socket);
    let root = im.dir(im.sb.root_nid);
    let names: Vec<&[u8]> = root.iter().map(|e| e.0.as_slice()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(root.iter().find(|e| e.0 == b"..").unwrap().1, im.sb.root_nid);
    let d = im.inode(im.lookup("dir"));
    assert_eq!(d.mode & 0o7777, 0o750);
    assert_eq!(im.dir(d.nid).iter().find(|e| e.0 == b"..").unwrap().1, im.sb.root_nid);
    assert_eq!(s.inodes, 12);
    assert_one_metadata_range(&img, &s);
}

#[test]
fn dirents_sort_and_split_into_blocks() {
    let e = |n: &str| Entry { name: n.as_bytes().to_vec(), target: 0u32, file_type: 1 };
    let l = DirLayout::new(e("."), e(".."), vec![e("b"), e("-a"), e("a"), e("ab")], 4096);
    let names: Vec<&[u8]> = l.entries.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names, vec![&b"-a"[..], b".", b"..", b"a", b"ab", b"b"]);
    // 500 names of 100 bytes: 112 bytes each, 36 per 4 KiB block.
    let many: Vec<_> = (0..500).map(|i| e(&format!("{i:0100}"))).collect();
    let l = DirLayout::new(e("."), e(".."), many, 4096);
    assert!(l.blocks.len() > 1);
    for (i, (range, used)) in l.blocks.iter().enumerate() {
        assert!(*used <= 4096);
        let block = l.encode_block(i, |_| 7);
        let mut n = 0;
        for_each_dirent(&block, |d| {
            assert_eq!(d.nid, 7);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, range.len());
    }
}

#[test]
fn thousands_of_entries_are_found_by_binary_search() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let d = t.add(Inode::dir(meta(0o755)));
    t.link(r, b"d", d).unwrap();
    for i in 0..5000 {
        let f = t.add(Inode::bytes(meta(0o644), format!("{i}").as_bytes()));
        t.link(d, format!("file-{i}").as_bytes(), f).unwrap();
    }
    let (img, s) = build(&t, &WriterOptions::default());
    let im = Img::new(&img);
    let dnid = im.lookup("d");
    let h = im.inode(dnid);
    assert!(h.size > 4096 * 10, "many blocks");
    // The kernel's lookup: binary search on each block's first name, then in the block.
    let data = im.content(dnid);
    let blocks: Vec<Vec<(Vec<u8>, u64)>> = data
        .chunks(4096)
        .map(|b| {
            let mut v = Vec::new();
            for_each_dirent(b, |d| {
                v.push((d.name.to_vec(), d.nid));
                Ok(())
            })
            .unwrap();
            v
        })
        .collect();
    for w in blocks.windows(2) {
        assert!(w[0].last().unwrap().0 < w[1][0].0);
    }
    for i in (0..5000).step_by(97) {
        let name = format!("file-{i}").into_bytes();
        let bi = blocks.partition_point(|b| b[0].0 <= name) - 1;
        let e = blocks[bi].binary_search_by(|x| x.0.cmp(&name)).map(|j| blocks[bi][j].1).unwrap();
        assert_eq!(im.content(e), format!("{i}").as_bytes());
    }
    assert_one_metadata_range(&img, &s);
}

#[test]
fn xattr_names_map_to_erofs_indexes() {
    assert_eq!(xattr::split_name(b"user.a").unwrap(), (1, &b"a"[..]));
    assert_eq!(xattr::split_name(b"system.posix_acl_access").unwrap(), (2, &b""[..]));
    assert_eq!(xattr::split_name(b"system.posix_acl_default").unwrap(), (3, &b""[..]));
    assert_eq!(xattr::split_name(b"trusted.overlay.opaque").unwrap(), (4, &b"overlay.opaque"[..]));
    assert_eq!(xattr::split_name(b"security.capability").unwrap(), (6, &b"capability"[..]));
    assert!(xattr::split_name(b"system.nfs4_acl").is_err());
    assert!(xattr::split_name(b"user.").is_err());
    assert!(xattr::encode(b"user.big", &vec![0u8; 65536]).is_err());
    let mut out = Vec::new();
    ondisk::encode_xattr_entry(1, b"ab", b"xyz", &mut out);
    assert_eq!(out, vec![2, 1, 3, 0, b'a', b'b', b'x', b'y', b'z', 0, 0, 0]);
}

#[test]
fn shared_and_inline_xattrs() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let acl: Vec<u8> = vec![2, 0, 0, 0, 1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff, 4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff];
    let cap = vec![1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for i in 0..3 {
        let f = t.add(
            Inode::bytes(meta(0o644), b"x")
                .with_xattr(b"security.selinux", b"system_u:object_r:usr_t:s0")
                .with_xattr(b"user.only", format!("{i}").as_bytes())
                .with_xattr(b"system.posix_acl_access", &acl)
                .with_xattr(b"security.capability", &cap),
        );
        t.link(r, format!("f{i}").as_bytes(), f).unwrap();
    }
    let (img, s) = build(&t, &WriterOptions::default());
    assert_eq!(s.shared_xattrs, 3, "selinux, acl and capability are shared, user.only is not");
    let im = Img::new(&img);
    let x = im.xattrs(im.lookup("f2"));
    assert_eq!(x.len(), 4);
    assert!(x.contains(&("user.only".into(), b"2".to_vec())));
    assert!(x.contains(&("system.posix_acl_access".into(), acl.clone())));
    assert!(x.contains(&("security.capability".into(), cap.clone())));
    let h = im.inode(im.lookup("f2"));
    assert_eq!(img[(h.offset + 32 + 4) as usize], 3, "three shared ids");
    // Without sharing everything is inline.
    let (img, s) = build(&t, &WriterOptions { shared_xattr_min_refs: 0, ..WriterOptions::default() });
    assert_eq!(s.shared_xattrs, 0);
    assert_eq!(Img::new(&img).xattrs(Img::new(&img).lookup("f0")).len(), 4);
    assert_one_metadata_range(&img, &s);
}

#[test]
fn compact_inodes_when_everything_fits() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let a = t.add(Inode::bytes(meta(0o644), b"a"));
    t.link(r, b"a", a).unwrap();
    let b = t.add(Inode::bytes(Metadata::new(0o644, 0, 0, 1_700_000_000, 5), b"b"));
    t.link(r, b"b", b).unwrap();
    let (img, s) = build(&t, &WriterOptions::default());
    let im = Img::new(&img);
    assert!(!im.inode(im.lookup("a")).extended);
    assert!(im.inode(im.lookup("b")).extended, "nanoseconds other than the epoch's");
    assert_eq!(s.extended_inodes, 1);
    // The epoch is the most common mtime.
    assert_eq!(u64::from_le_bytes(img[1024 + 24..1024 + 32].try_into().unwrap()), 1_700_000_000);
}

#[test]
fn large_sparse_files_use_extended_inodes_and_holes() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let size = 5u64 << 30;
    let path = PathBuf::from("/sparse");
    let mut data = vec![0u8; 4096];
    data[..4].copy_from_slice(b"tail");
    // The source: 5 GiB whose only data is the last 4 KiB (MemFile holds
    // just that block at the matching offset through a shifted reader).
    struct Shifted(Vec<u8>, u64);
    impl ReadAt for Shifted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let rel = offset.checked_sub(self.1).ok_or_else(|| std::io::Error::other("read of a hole"))?;
            buf.copy_from_slice(&self.0[rel as usize..rel as usize + buf.len()]);
            Ok(())
        }
    }
    struct F(Vec<u8>, u64);
    impl FileReader for F {
        fn open(&self, _: &Path) -> std::io::Result<Box<dyn ReadAt + '_>> {
            Ok(Box::new(Shifted(self.0.clone(), self.1)))
        }
    }
    let chunk = 1u64 << 20;
    let tail_start = size - 4096;
    let f = t.add(Inode::file(
        meta(0o644),
        size,
        FileData::Local { path, offset: 0, data_ranges: Some(std::iter::once(tail_start..size).collect()) },
    ));
    t.link(r, b"sparse", f).unwrap();
    // The last chunk is read whole: give the reader the whole last chunk.
    let mut last = vec![0u8; chunk as usize];
    last[chunk as usize - 4096..chunk as usize - 4092].copy_from_slice(b"tail");
    let files = F(last, size - chunk);
    let (img, s) = build_with(&t, &WriterOptions::default(), &files);
    assert!(s.image_size < 2 << 20, "holes take no space: {}", s.image_size);
    let im = Img::new(&img);
    let h = im.inode(im.lookup("sparse"));
    assert!(h.extended);
    assert_eq!((h.layout, h.size), (DataLayout::ChunkBased, size));
    let cl = format::ChunkLayout::new(&h, 12).unwrap();
    assert_eq!(cl.nchunks, size / chunk);
    let e = cl.start + (cl.nchunks - 1) * cl.unit;
    let b = im.le32(e) as u64;
    assert_eq!(&img[(b * 4096 + chunk - 4096) as usize..][..4], b"tail");
    assert_eq!(im.le32(cl.start), u32::MAX, "a hole");
    let _ = data;
}

#[test]
fn lz4_files_decompress_to_their_source() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let text: Vec<u8> = (0..300_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
    let f = t.add(Inode::bytes(meta(0o644), &text));
    t.link(r, b"text", f).unwrap();
    let mut noise = vec![0u8; 100_000];
    let mut x = 1u64;
    for b in noise.iter_mut() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    let n = t.add(Inode::bytes(meta(0o644), &noise));
    t.link(r, b"noise", n).unwrap();
    let mixed: Vec<u8> = noise.iter().chain(text[..70_001].iter()).copied().collect();
    let m = t.add(Inode::bytes(meta(0o644), &mixed));
    t.link(r, b"mixed", m).unwrap();
    let opts = WriterOptions { compression: Compression::Lz4 { pcluster_bytes: 65536 }, ..WriterOptions::default() };
    let (img, s) = build(&t, &opts);
    assert_eq!(s.compressed_files, 2, "text and mixed compress, noise does not");
    let im = Img::new(&img);
    assert_eq!(img[1024 + 80] & 0x3, 0x3, "LZ4_0PADDING and COMPR_CFGS");
    let th = im.inode(im.lookup("text"));
    assert_eq!(th.layout, DataLayout::CompressedFull);
    assert!(u64::from(th.i_u) * 4096 < text.len() as u64 / 2);
    assert_eq!(im.content(th.nid), text);
    assert_eq!(im.content(im.lookup("mixed")), mixed);
    let nh = im.inode(im.lookup("noise"));
    assert_ne!(nh.layout, DataLayout::CompressedFull);
    assert_eq!(im.content(nh.nid), noise);
    assert_one_metadata_range(&img, &s);
}

#[test]
fn external_chunks_and_flat_addresses() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let c = ChunkedData::contiguous(1, 1000, 3_000_000, 9).unwrap();
    assert_eq!(c.chunks, vec![Chunk::At { device: 1, block: 1000 }]);
    assert_eq!(c.chunk_bits, 22);
    let f = t.add(Inode::file(meta(0o644), 3_000_000, FileData::Chunked(c.clone())));
    t.link(r, b"in-tar", f).unwrap();
    let g = t.add(Inode::file(meta(0o644), 10_000, FileData::FlatAddress { block: 1 << 20 }));
    t.link(r, b"flat", g).unwrap();
    let mut opts = WriterOptions {
        block_bits: 9,
        metadata_only: true,
        devices: vec![Device { tag: [7; 64], blocks: 9000, uniaddr: 0 }],
        ..WriterOptions::default()
    };
    let (img, s) = build(&t, &opts);
    assert_eq!(s.data_bytes, 0);
    let im = Img::new(&img);
    assert_eq!(im.sb.extra_devices, 1);
    let dt = im.sb.device_table().unwrap();
    assert_eq!(&img[dt.start as usize..dt.start as usize + 64], &[7u8; 64][..]);
    assert_eq!(im.le32(dt.start + 64), 9000);
    let h = im.inode(im.lookup("in-tar"));
    let cl = format::ChunkLayout::new(&h, 9).unwrap();
    let e = &img[cl.start as usize..cl.start as usize + 8];
    assert_eq!(cl.decode(e, im.sb.device_id_mask()), Some(format::ChunkTarget::OtherDevice { device: 1, blkaddr: 1000 }));
    let fh = im.inode(im.lookup("flat"));
    assert_eq!((fh.layout, fh.i_u), (DataLayout::FlatPlain, 1 << 20));
    // A chunk on a device the table does not have is refused.
    opts.devices.clear();
    let mut out = Cursor::new(Vec::new());
    assert!(write_image(&t, &opts, &NoFiles, &mut out).is_err());
    // Local data in a metadata-only image is refused.
    let mut t2 = Tree::new(meta(0o755));
    let x = t2.add(Inode::bytes(meta(0o644), b"local"));
    t2.link(t2.root(), b"x", x).unwrap();
    assert!(write_image(&t2, &WriterOptions { metadata_only: true, ..WriterOptions::default() }, &NoFiles, &mut out).is_err());
}

#[test]
fn data_order_puts_listed_files_first() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let mut ids = Vec::new();
    for i in 0..4u8 {
        let f = t.add(Inode::bytes(meta(0o644), &vec![i; 10_000]));
        t.link(r, &[b'a' + i], f).unwrap();
        ids.push(f);
    }
    let opts = WriterOptions { data_order: vec![ids[3], ids[1]], ..WriterOptions::default() };
    let p = plan(&t, &opts, &NoFiles).unwrap();
    let end = p.metadata_end();
    assert_eq!(p.data_range(ids[3]).unwrap().start, end);
    assert_eq!(p.data_range(ids[1]).unwrap().start, p.data_range(ids[3]).unwrap().end);
    assert!(p.data_range(ids[0]).unwrap().start > p.data_range(ids[1]).unwrap().start);
}

#[test]
fn same_tree_same_bytes() {
    let opts = WriterOptions { derive_uuid: true, ..WriterOptions::default() };
    let (a, _) = build(&sample_tree(), &opts);
    let (b, _) = build(&sample_tree(), &opts);
    assert_eq!(a, b);
    let mut other = sample_tree();
    let x = other.add(Inode::bytes(meta(0o644), b"more"));
    other.link(other.root(), b"more", x).unwrap();
    let (c, _) = build(&other, &opts);
    assert_ne!(a[1024 + 48..1024 + 64], c[1024 + 48..1024 + 64], "distinct trees, distinct UUIDs");
    let lz = WriterOptions { compression: Compression::Lz4 { pcluster_bytes: 65536 }, ..opts };
    assert_eq!(build(&sample_tree(), &lz).0, build(&sample_tree(), &lz).0);
}

#[test]
fn bad_input_is_refused() {
    let mut t = Tree::new(meta(0o755));
    let r = t.root();
    let f = t.add(Inode::bytes(meta(0o644), b"x"));
    assert!(t.link(r, &[b'n'; 256], f).is_err(), "names over 255 bytes");
    assert!(t.link(r, &[b'n'; 255], f).is_ok());
    assert!(t.link(r, b"a/b", f).is_err());
    assert!(t.link(r, b"..", f).is_err());
    assert!(t.insert_path(b"a/../b", Inode::bytes(meta(0o644), b"x"), meta(0o755)).is_err());
    assert!(t.hard_link(b"h", b"missing", meta(0o755)).is_err());
    let s = t.add(Inode::symlink(meta(0o777), &[b'x'; 4096]));
    t.link(r, b"s", s).unwrap();
    assert!(write_image(&t, &WriterOptions::default(), &NoFiles, &mut Cursor::new(Vec::new())).is_err());
    t.unlink(r, b"s");
    let x = t.add(Inode::bytes(meta(0o644), b"x").with_xattr(b"system.other", b"1"));
    t.link(r, b"x", x).unwrap();
    assert!(write_image(&t, &WriterOptions::default(), &NoFiles, &mut Cursor::new(Vec::new())).is_err());
    // A local file that shrank between layout and write.
    let mut t = Tree::new(meta(0o755));
    let f = t.add(Inode::file(meta(0o644), 10_000, FileData::Local { path: "/f".into(), offset: 0, data_ranges: None }));
    t.link(t.root(), b"f", f).unwrap();
    let files = MemFiles([(PathBuf::from("/f"), vec![1u8; 5000])].into_iter().collect());
    let e = write_image(&t, &WriterOptions::default(), &files, &mut Cursor::new(Vec::new())).unwrap_err();
    assert!(matches!(e, WriteError::SourceChanged(_)), "{e}");
}

#[test]
fn tree_edits_apply_like_archive_entries() {
    let mut t = Tree::new(meta(0o755));
    t.insert_path(b"a/b/c", Inode::bytes(meta(0o644), b"1"), meta(0o700)).unwrap();
    let a = t.lookup_path(b"a").unwrap();
    assert_eq!(t.get(a).meta.permissions, 0o700);
    // A directory entry over an implicit directory keeps its children.
    t.insert_path(b"a/", Inode::dir(meta(0o711)), meta(0o755)).unwrap();
    assert_eq!(t.get(t.lookup_path(b"a").unwrap()).meta.permissions, 0o711);
    assert!(t.lookup_path(b"a/b/c").is_some());
    // A file over a directory replaces it.
    t.insert_path(b"./a/b", Inode::bytes(meta(0o644), b"2"), meta(0o755)).unwrap();
    assert!(t.lookup_path(b"a/b/c").is_none());
    t.hard_link(b"x/h", b"a/b", meta(0o755)).unwrap();
    assert_eq!(t.lookup_path(b"x/h"), t.lookup_path(b"a/b"));
    assert!(t.remove_path(b"a/b").unwrap());
    let r = t.reachable().unwrap();
    let h = t.lookup_path(b"x/h").unwrap();
    assert_eq!(r.nlink[h.index()], 1);
    assert_eq!(r.nlink[t.root().index()], 4, "root: 2 + two subdirectories");
}

#[test]
fn in_memory_bytes_match_their_size() {
    let mut t = Tree::new(meta(0o755));
    let f = t.add(Inode::file(meta(0o644), 10, FileData::Bytes(Arc::from(&b"short"[..]))));
    t.link(t.root(), b"f", f).unwrap();
    assert!(plan(&t, &WriterOptions::default(), &NoFiles).is_err());
}
