//! Tests: synthetic structures, real images built with `mkfs.erofs` (skipped
//! when it is missing, unless `CI=true`) cross-checked against `dump.erofs`,
//! corrupted images, and random mutations.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::format::{self, ChunkLayout, ChunkTarget, FileKind, InodeHeader};
use super::*;
use crate::ranges;

// ---------------------------------------------------------------------------
// Helpers

/// A `MetaReader` over image bytes that enforces the prefetch contract and
/// records every prefetch call.
struct ImageReader {
    data: Vec<u8>,
    covered: Vec<Range<u64>>,
    calls: Vec<Vec<Range<u64>>>,
}

impl ImageReader {
    fn new(data: Vec<u8>) -> Self {
        ImageReader {
            data,
            covered: Vec::new(),
            calls: Vec::new(),
        }
    }

    fn is_covered(&self, r: &Range<u64>) -> bool {
        self.covered
            .iter()
            .any(|c| c.start <= r.start && r.end <= c.end)
    }
}

impl MetaReader for ImageReader {
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError> {
        assert!(!ranges.is_empty(), "empty prefetch call");
        for w in ranges.windows(2) {
            assert!(
                w[0].end < w[1].start,
                "prefetch ranges not sorted and merged: {w:?}"
            );
        }
        for r in ranges {
            assert!(
                r.start < r.end && r.end <= self.data.len() as u64,
                "bad range {r:?}"
            );
            assert!(
                !self
                    .covered
                    .iter()
                    .any(|c| c.start < r.end && r.start < c.end),
                "range {r:?} prefetched twice"
            );
        }
        let mut all = std::mem::take(&mut self.covered);
        all.extend(ranges.iter().cloned());
        self.covered = ranges::normalize(all);
        self.calls.push(ranges.to_vec());
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let r = offset..offset + buf.len() as u64;
        if !self.is_covered(&r) {
            return Err(WalkError::Io(format!("read {r:?} was not prefetched")));
        }
        buf.copy_from_slice(&self.data[r.start as usize..r.end as usize]);
        Ok(())
    }
}

fn walk_bytes(data: Vec<u8>) -> (Result<ImageMap, WalkError>, ImageReader) {
    walk_bytes_with(data, &WalkLimits::default())
}

fn walk_bytes_with(
    data: Vec<u8>,
    limits: &WalkLimits,
) -> (Result<ImageMap, WalkError>, ImageReader) {
    let size = data.len() as u64;
    let mut reader = ImageReader::new(data);
    let res = walk(&mut reader, size, limits);
    (res, reader)
}

/// Deterministic xorshift64* generator (no extra crates).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Compressible text.
    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = [
            "erofs ",
            "fanotify ",
            "block ",
            "cluster ",
            "lazy ",
            "mount ",
            "index\n",
            "page ",
        ];
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            v.extend_from_slice(WORDS[self.below(8) as usize].as_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The tests that run tools are #[ignore]d: run with --include-ignored, they
/// need their tools and say which one is missing.
fn require_tool(tool: &str) {
    assert!(Command::new(tool).arg("--help").output().is_ok(), "{tool} is not installed");
}

struct Built {
    _dir: tempfile::TempDir,
    tree: PathBuf,
    image: PathBuf,
    data: Vec<u8>,
}

/// Builds a tree with `fill` and an image of it with `mkfs.erofs ARGS`.
fn build(fill: impl FnOnce(&Path), args: &[&str]) -> Built {
    require_tool("mkfs.erofs");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    fill(&tree);
    let image = dir.path().join("image.erofs");
    let out = Command::new("mkfs.erofs")
        .args(args)
        .arg("--quiet")
        .arg(&image)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.erofs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&image).unwrap();
    Built { _dir: dir, tree, image, data }
}

fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

fn set_xattr(path: &Path, name: &str, value: &str) {
    let out = Command::new("setfattr")
        .args(["-n", name, "-v", value])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setfattr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tree with most kinds of files and sizes.
fn mixed_tree(root: &Path) {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    write(&root.join("empty"), b"");
    write(&root.join("one"), b"x");
    for n in [4095usize, 4096, 4097, 8192, 12345] {
        write(&root.join(format!("rand{n}")), &rng.bytes(n));
    }
    write(&root.join("text200k"), &rng.text(200 * 1024));
    let mut mixed = rng.bytes(700 * 1024);
    mixed.extend(rng.text(800 * 1024));
    write(&root.join("sub/mixed"), &mixed);
    write(&root.join("sub/deeper/big"), &rng.text(5 << 20));
    write(&root.join("sub/deeper/small"), b"hello\n");
    for i in 0..250 {
        write(
            &root.join(format!("bigdir/entry-with-a-rather-long-name-{i:04}")),
            &rng.text(100 + (i * 37) % 5000),
        );
    }
    // A sparse file: holes, then data.
    let sparse = root.join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(300 * 1024).unwrap();
    drop(f);
    let mut content = std::fs::read(&sparse).unwrap();
    content[200 * 1024..210 * 1024].copy_from_slice(&rng.bytes(10 * 1024));
    std::fs::write(&sparse, content).unwrap();
    std::os::unix::fs::symlink("rand4095", root.join("link-short")).unwrap();
    std::os::unix::fs::symlink("t/".repeat(1400), root.join("link-long")).unwrap();
    std::fs::hard_link(root.join("text200k"), root.join("sub/hardlink")).unwrap();
    let status = Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::create_dir(root.join("emptydir")).unwrap();
}

/// Regular files under `tree`, as image paths ("/a/b").
fn regular_files(tree: &Path) -> Vec<String> {
    fn visit(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().into_string().unwrap();
            let path = format!("{prefix}/{name}");
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                visit(&e.path(), &path, out);
            } else if ft.is_file() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    visit(tree, "", &mut out);
    out
}

/// Physical extents `dump.erofs --path=PATH -e` reports, each flagged
/// `inline` when it is stored in the inode's metadata (the tail of a
/// FLAT_INLINE inode, a tail-packed pcluster).
fn dump_extents(image: &Path, path: &str) -> Vec<(Range<u64>, bool)> {
    let out = Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg("-e")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump.erofs {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let layout: u32 = text
        .split("Layout:")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .expect("layout in dump output");
    let mut extents = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.trim_start().starts_with("Ext:") {
            in_table = true;
            continue;
        }
        if !in_table || !line.contains('|') {
            continue;
        }
        // "   0:        0..    4280 |    4280 :      24576..     28672 |    4096"
        let parts: Vec<&str> = line.split('|').collect();
        let phys = parts[1].split(':').nth(1).unwrap();
        let (a, b) = phys.split_once("..").unwrap();
        let plen: u64 = parts[2].trim().parse().unwrap();
        let compressed = layout == 1 || layout == 3;
        extents.push((
            a.trim().parse().unwrap()..b.trim().parse().unwrap(),
            compressed && !plen.is_multiple_of(4096),
        ));
    }
    if layout == 2 {
        if let Some(last) = extents.last_mut() {
            last.1 = true;
        }
    }
    extents
}

fn covered_by(set: &[Range<u64>], r: &Range<u64>) -> bool {
    set.iter().any(|c| c.start <= r.start && r.end <= c.end)
}

fn intersects(set: &[Range<u64>], r: &Range<u64>) -> bool {
    set.iter().any(|c| c.start < r.end && r.start < c.end)
}

fn check_invariants(map: &ImageMap) {
    for list in [&map.data_extents, &map.required] {
        for w in list.windows(2) {
            assert!(w[0].end < w[1].start, "not sorted and merged: {w:?}");
        }
        for r in list.iter() {
            assert!(r.start < r.end && r.end <= map.image_size);
        }
    }
    for r in &map.required {
        assert_eq!(
            r.start % PAGE_SIZE,
            0,
            "required range {r:?} not page aligned"
        );
        assert!(r.end % PAGE_SIZE == 0 || r.end == map.image_size);
    }
    let mut all = map.data_extents.clone();
    all.extend(map.required.iter().cloned());
    assert_eq!(
        map.data_bytes() + map.required_bytes(),
        map.image_size,
        "not disjoint"
    );
    assert_eq!(
        ranges::normalize(all),
        vec![0..map.image_size],
        "does not cover the image"
    );
    assert!(
        map.required.first().is_some_and(|r| r.start == 0),
        "superblock page not required"
    );
}

/// Every extent dump.erofs reports is data (block aligned) or required
/// (inline), and with `exact`, the data extents are exactly those extents.
fn crosscheck(b: &Built, map: &ImageMap, exact: bool) -> usize {
    let bs = u64::from(map.block_size);
    let mut union = Vec::new();
    let mut checked = 0;
    for path in regular_files(&b.tree) {
        for (e, inline) in dump_extents(&b.image, &path) {
            if !inline {
                assert_eq!(e.start % bs, 0, "{path}: unaligned data extent {e:?}");
                let r = e.start..e.end.div_ceil(bs) * bs;
                if !covered_by(&map.data_extents, &r) {
                    let keep = std::env::temp_dir().join("erofs-crosscheck-failure.img");
                    let _ = std::fs::copy(&b.image, &keep);
                    panic!(
                        "{path}: data extent {r:?} not in data_extents (image kept at {})",
                        keep.display()
                    );
                }
                union.push(r);
            } else {
                assert!(
                    covered_by(&map.required, &e),
                    "{path}: inline extent {e:?} not required"
                );
                assert!(
                    !intersects(&map.data_extents, &e),
                    "{path}: inline extent {e:?} counted as data"
                );
            }
            checked += 1;
        }
    }
    if exact {
        assert_eq!(
            ranges::normalize(union),
            map.data_extents,
            "data_extents differ from dump.erofs"
        );
    }
    checked
}

fn walk_ok(b: &Built) -> (ImageMap, ImageReader) {
    walk_ok_with(b, &WalkOptions::default())
}

/// A walk that reads the superblock's page first and guesses nothing: each
/// level's reads show.
fn plain_walk() -> WalkOptions {
    WalkOptions { first_read: PAGE_SIZE, contiguous_guess_max: 0 }
}

fn walk_ok_with(b: &Built, opts: &WalkOptions) -> (ImageMap, ImageReader) {
    let size = b.data.len() as u64;
    let mut reader = ImageReader::new(b.data.clone());
    let res = walk_with(&mut reader, size, &WalkLimits::default(), opts);
    let map = res.unwrap_or_else(|e| {
        let keep = std::env::temp_dir().join("erofs-walk-failure.img");
        let _ = std::fs::copy(&b.image, &keep);
        panic!("walk failed: {e} (image kept at {})", keep.display())
    });
    check_invariants(&map);
    // Everything the walker prefetched is metadata the agent must keep, but
    // for the head (the first read) and a guessed run of metadata.
    let head = opts.first_read;
    let guess = map.contiguous_guess.map(|[s, e]| s..e);
    for call in &reader.calls {
        for r in call {
            let guessed = guess.as_ref().is_some_and(|g| g.start <= r.start && r.end <= g.end);
            assert!(
                r.end <= head || guessed || covered_by(&map.required, r),
                "prefetched {r:?} is not required"
            );
            assert_eq!(r.start % PAGE_SIZE, 0);
        }
    }
    assert_eq!(map.prefetch_calls as usize, reader.calls.len());
    (map, reader)
}

// ---------------------------------------------------------------------------
// Synthetic structures

fn synthetic_superblock(incompat: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let sb = &mut b[1024..];
    sb[0..4].copy_from_slice(&format::EROFS_MAGIC.to_le_bytes());
    sb[12] = 12;
    sb[14..16].copy_from_slice(&0x0102u16.to_le_bytes());
    sb[36..40].copy_from_slice(&100u32.to_le_bytes());
    sb[40..44].copy_from_slice(&3u32.to_le_bytes());
    sb[80..84].copy_from_slice(&incompat.to_le_bytes());
    sb[112..120].copy_from_slice(&0x1234_5678_9ABCu64.to_le_bytes());
    b
}

#[test]
fn superblock_parse_and_features() {
    let sb = probe_superblock(&synthetic_superblock(0)).unwrap();
    assert_eq!(
        (sb.block_size(), sb.root_nid, sb.blocks, sb.meta_blkaddr),
        (4096, 0x0102, 100, 3)
    );
    assert_eq!(sb.inode_offset(2), Some(3 * 4096 + 64));

    let sb48 = probe_superblock(&synthetic_superblock(format::feature::INCOMPAT_48BIT)).unwrap();
    assert_eq!(sb48.root_nid, 0x1234_5678_9ABC);
    assert_eq!(sb48.blocks, 100 | (0x0102u64 << 32));

    for bits in [format::feature::INCOMPAT_METABOX, 0x8000] {
        assert!(matches!(
            probe_superblock(&synthetic_superblock(bits)),
            Err(WalkError::Unsupported(_))
        ));
    }
    let mut bad = synthetic_superblock(0);
    bad[1024 + 12] = 20;
    assert!(matches!(
        probe_superblock(&bad),
        Err(WalkError::Unsupported(_))
    ));
    assert!(matches!(
        probe_superblock(&[0u8; 4096]),
        Err(WalkError::NotErofs)
    ));
    assert!(matches!(
        probe_superblock(&[0u8; 100]),
        Err(WalkError::NotErofs)
    ));
}

#[test]
fn superblock_checksum_is_verified() {
    let mut b = synthetic_superblock(0);
    b[1024 + 8] = 1; // COMPAT_SB_CHKSUM
    let mut area = b[1024..].to_vec();
    area[4..8].fill(0);
    let crc = format::crc32c(!0, &area);
    b[1028..1032].copy_from_slice(&crc.to_le_bytes());
    probe_superblock(&b).unwrap();
    b[1024 + 70] ^= 1;
    assert!(matches!(probe_superblock(&b), Err(WalkError::Corrupt(m)) if m.contains("checksum")));
}

#[test]
fn inode_header_layouts() {
    // Compact regular file, FLAT_PLAIN, NLINK_1 set: i_nb is startblk_hi.
    let mut c = [0u8; 32];
    c[0..2].copy_from_slice(&(1u16 << 4).to_le_bytes());
    c[4..6].copy_from_slice(&0o100644u16.to_le_bytes());
    c[6..8].copy_from_slice(&2u16.to_le_bytes());
    c[8..12].copy_from_slice(&5000u32.to_le_bytes());
    c[16..20].copy_from_slice(&7u32.to_le_bytes());
    let h = InodeHeader::parse(9, 4096, &c).unwrap();
    assert_eq!(h.kind, FileKind::Regular);
    assert_eq!(h.flat_startblk(), Some(7 | (2u64 << 32)));
    assert_eq!(h.blocks(12), 2);
    assert_eq!(h.body_end(), Some(4096 + 32));

    // Directory: i_nb is nlink, never address bits; xattr body 12 + 4*2.
    c[0..2].copy_from_slice(&(1u16 << 4).to_le_bytes());
    c[2..4].copy_from_slice(&3u16.to_le_bytes());
    c[4..6].copy_from_slice(&0o040755u16.to_le_bytes());
    let d = InodeHeader::parse(9, 4096, &c).unwrap();
    assert_eq!(d.flat_startblk(), Some(7));
    assert_eq!(d.xattr_size(), 20);

    // FLAT_PLAIN with the null address has no data.
    c[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        InodeHeader::parse(9, 4096, &c).unwrap().flat_startblk(),
        None
    );

    // Extended inodes need 64 bytes; unknown i_format bits are refused.
    let mut e = [0u8; 64];
    e[0] = 1;
    e[4..6].copy_from_slice(&0o100644u16.to_le_bytes());
    assert!(InodeHeader::parse(1, 0, &e[..32]).is_err());
    assert!(InodeHeader::parse(1, 0, &e).unwrap().extended);
    e[0] = 0x40;
    assert!(matches!(
        InodeHeader::parse(1, 0, &e),
        Err(WalkError::Unsupported(_))
    ));
    let mut bogus = [0u8; 32];
    bogus[4..6].copy_from_slice(&0o170000u16.to_le_bytes());
    assert!(matches!(
        InodeHeader::parse(1, 0, &bogus),
        Err(WalkError::Corrupt(_))
    ));
}

#[test]
fn chunk_index_decoding() {
    let mut c = [0u8; 32];
    c[0..2].copy_from_slice(&(4u16 << 1).to_le_bytes()); // CHUNK_BASED
    c[4..6].copy_from_slice(&0o100644u16.to_le_bytes());
    c[8..12].copy_from_slice(&100_000u32.to_le_bytes());
    c[16..18].copy_from_slice(&(0x20u16 | 0x40 | 1).to_le_bytes()); // indexes, 48-bit, 2 blocks
    let h = InodeHeader::parse(0, 8192, &c).unwrap();
    let l = ChunkLayout::new(&h, 12).unwrap();
    assert_eq!(
        (l.unit, l.chunk_size(), l.nchunks, l.start),
        (8, 8192, 13, 8192 + 32)
    );
    let entry = |hi: u16, dev: u16, lo: u32| {
        let mut e = [0u8; 8];
        e[0..2].copy_from_slice(&hi.to_le_bytes());
        e[2..4].copy_from_slice(&dev.to_le_bytes());
        e[4..8].copy_from_slice(&lo.to_le_bytes());
        e
    };
    assert_eq!(
        l.decode(&entry(1, 0, 5), 1),
        Some(ChunkTarget::Primary((1 << 32) | 5))
    );
    assert_eq!(
        l.decode(&entry(0, 1, 5), 1),
        Some(ChunkTarget::OtherDevice {
            device: 1,
            blkaddr: 5
        })
    );
    assert_eq!(l.decode(&entry(0, 2, 5), 1), Some(ChunkTarget::Primary(5)));
    assert_eq!(
        l.decode(&entry(0xFFFF, 0, u32::MAX), 1),
        Some(ChunkTarget::Hole)
    );
    assert_eq!(l.decode(&[1, 2], 1), None);
}

fn dir_block(entries: &[(u64, &str)], len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let mut nameoff = entries.len() * 12;
    for (i, (nid, name)) in entries.iter().enumerate() {
        b[i * 12..i * 12 + 8].copy_from_slice(&nid.to_le_bytes());
        b[i * 12 + 8..i * 12 + 10].copy_from_slice(&(nameoff as u16).to_le_bytes());
        b[nameoff..nameoff + name.len()].copy_from_slice(name.as_bytes());
        nameoff += name.len();
    }
    b
}

#[test]
fn dirent_parsing() {
    let b = dir_block(&[(1, "."), (2, ".."), (77, "file")], 64);
    let mut seen = Vec::new();
    format::for_each_dirent(&b, |d| {
        seen.push((
            d.nid,
            String::from_utf8_lossy(d.name).into_owned(),
            d.is_dot_or_dotdot(),
        ));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![
            (1, ".".into(), true),
            (2, "..".into(), true),
            (77, "file".into(), false)
        ]
    );

    // First name offset beyond the block: a huge dirent count.
    let mut huge = b.clone();
    huge[8..10].copy_from_slice(&0xFFF0u16.to_le_bytes());
    assert!(format::for_each_dirent(&huge, |_| Ok(())).is_err());
    // Name offsets going backwards.
    let mut back = b.clone();
    back[20..22].copy_from_slice(&40u16.to_le_bytes());
    back[32..34].copy_from_slice(&37u16.to_le_bytes());
    assert!(format::for_each_dirent(&back, |_| Ok(())).is_err());
    assert!(format::for_each_dirent(&b[..8], |_| Ok(())).is_err());
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn image_map_serializes() {
    let map = ImageMap {
        block_size: 4096,
        image_size: 10000,
        data_extents: vec![4096..8192],
        required: vec![0..4096, 8192..10000],
        inodes: 3,
        directories: 1,
        regular_files: 2,
        symlinks: 0,
        shared_xattrs: 0,
        depth: 0,
        prefetch_calls: 3,
        round_trips: 2,
        file_extents: vec![4096..8192],
        contiguous_guess: None,
    };
    let json = serde_json::to_string(&map).unwrap();
    assert_eq!(serde_json::from_str::<ImageMap>(&json).unwrap(), map);
}

// ---------------------------------------------------------------------------
// Real images

/// Every mkfs.erofs layout we know of: the walk's data extents are exactly
/// what dump.erofs reports, and everything else is required.
#[test]
#[ignore = "needs mkfs.erofs and dump.erofs (erofs-utils)"]
fn mkfs_variants_match_dump() {
    let variants: &[&[&str]] = &[
        &[],
        &["-Enoinline_data"],
        &["-Eforce-inode-compact"],
        &["-Eforce-inode-extended"],
        &["-x-1"],
        &["-zlz4"],
        &["-zlz4hc"],
        &["-zlz4hc,12", "-Eztailpacking"],
        &["-zlz4", "-Elegacy-compress"],
        &["-zlz4hc", "-C65536"],
        &["-zlz4hc", "-C16384", "-Eztailpacking"],
        &["-zlz4", "-C32768", "-Elegacy-compress"],
        &["-zlz4hc", "-Eforce-inode-compact,noinline_data"],
        &["--chunksize=8192"],
        &["--chunksize=65536"],
        &["--chunksize=8192", "-Eforce-inode-blockmap"],
        &["--chunksize=1048576", "-Eforce-chunk-indexes"],
    ];
    for args in variants {
        let b = build(mixed_tree, args);
        let (map, _) = walk_ok(&b);
        assert_eq!(map.block_size, 4096, "{args:?}");
        assert!(map.regular_files >= 250 && map.symlinks == 2 && map.directories >= 5, "{args:?}: {map:?}");
        let n = crosscheck(&b, &map, true);
        assert!(n > 250, "{args:?}: {n} extents checked");
    }
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn extra_device_data_is_excluded() {
    require_tool("mkfs.erofs");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    mixed_tree(&tree);
    let image = dir.path().join("meta.erofs");
    let blob = dir.path().join("blob");
    let out = Command::new("mkfs.erofs")
        .args(["--quiet", "--chunksize=65536"])
        .arg(format!("--blobdev={}", blob.display()))
        .arg(&image)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&image).unwrap();
    let sb = probe_superblock(&data).unwrap();
    assert_eq!(sb.extra_devices, 1);
    let (res, _) = walk_bytes(data.clone());
    let map = res.unwrap();
    check_invariants(&map);
    assert!(
        map.data_extents.is_empty(),
        "chunks on the blob device counted: {map:?}"
    );
    assert!(map.regular_files >= 250);
}

#[test]
#[ignore = "needs mkfs.erofs and dump.erofs and setfattr"]
fn xattrs_inline_and_shared() {
    require_tool("setfattr");
    let fill = |root: &Path| {
        mixed_tree(root);
        let mut rng = Rng(7);
        for i in 0..40 {
            let p = root.join(format!("xa/f{i}"));
            write(&p, &rng.text(3000 + i * 100));
            // Shared by many files: mkfs moves it to the shared area.
            set_xattr(&p, "user.common", "the-same-value-everywhere");
            set_xattr(&p, &format!("user.own{i}"), &"v".repeat(i * 20));
        }
        // A long xattr body pushes inline data and indexes away from the slot.
        set_xattr(&root.join("text200k"), "user.big", &"B".repeat(1500));
        set_xattr(&root.join("sub/deeper/big"), "user.big", &"C".repeat(1900));
        set_xattr(&root.join("sub"), "user.dir", "d");
        set_xattr(&root.join("bigdir"), "user.dir", &"D".repeat(1200));
    };
    for args in [
        &[][..],
        &["-zlz4hc", "-Eztailpacking"],
        &["--chunksize=8192"],
        &["-zlz4", "-Elegacy-compress"],
    ] {
        let b = build(fill, args);
        let (map, _) = walk_ok(&b);
        assert!(map.shared_xattrs >= 1, "expected shared xattrs");
        crosscheck(&b, &map, true);
    }
}

#[test]
#[ignore = "needs mkfs.erofs and dump.erofs"]
fn round_trips_grow_with_depth_not_file_count() {
    let many = |n: usize| {
        move |root: &Path| {
            for d in 0..3 {
                for i in 0..n {
                    write(
                        &root.join(format!("d{d}/file-{i:05}")),
                        format!("{i}").as_bytes(),
                    );
                }
            }
        }
    };
    let small = build(many(10), &[]);
    let large = build(many(1000), &[]);
    let (small_map, small_r) = walk_ok_with(&small, &plain_walk());
    let (large_map, large_r) = walk_ok_with(&large, &plain_walk());
    assert_eq!(large_map.regular_files, 3000);
    assert_eq!(small_map.prefetch_calls as usize, small_r.calls.len());
    eprintln!(
        "round trips: 30 files {}, 3000 files {}",
        small_r.calls.len(),
        large_r.calls.len()
    );
    // Levels: root, 3 directories, 3000 files; a few calls each at most.
    assert!(large_r.calls.len() <= small_r.calls.len() + 3);
    assert!(large_r.calls.len() <= 8);
    crosscheck(&large, &large_map, false);

    let deep = |root: &Path| {
        let mut p = root.to_path_buf();
        for level in 0..45 {
            p = p.join(format!("level{level}"));
            write(
                &p.join("file"),
                format!("{level}").repeat(level * 100).as_bytes(),
            );
        }
    };
    let d = build(deep, &[]);
    let (deep_map, deep_r) = walk_ok_with(&d, &plain_walk());
    eprintln!(
        "round trips: depth {} -> {}",
        deep_map.depth,
        deep_r.calls.len()
    );
    assert_eq!(deep_map.depth, 46);
    // Consecutive levels often share inode blocks, so not every level costs
    // a call; but a deep chain costs more than a wide tree.
    assert!(deep_r.calls.len() > large_r.calls.len() + 5);
    assert!(deep_r.calls.len() <= 3 * 47 + 1);
    crosscheck(&d, &deep_map, true);
}

// ---------------------------------------------------------------------------
// Corrupted images

/// Finds the dirent named `name` (unique in the image) in a block-aligned
/// directory block; returns the dirent's byte offset and its nid.
fn find_dirent(data: &[u8], name: &[u8]) -> (usize, u64) {
    let mut from = 0;
    while let Some(p) = data[from..]
        .windows(name.len())
        .position(|w| w == name)
        .map(|p| p + from)
    {
        let block = p & !4095;
        let b = &data[block..(block + 4096).min(data.len())];
        let first = u16::from_le_bytes([b[8], b[9]]) as usize;
        if (12..4096).contains(&first) && first.is_multiple_of(12) {
            for i in 0..first / 12 {
                let off = u16::from_le_bytes([b[i * 12 + 8], b[i * 12 + 9]]) as usize;
                if block + off == p {
                    let nid = u64::from_le_bytes(b[i * 12..i * 12 + 8].try_into().unwrap());
                    return (block + i * 12, nid);
                }
            }
        }
        from = p + 1;
    }
    panic!("dirent {} not found", String::from_utf8_lossy(name));
}

/// Directories larger than a block, so the first entries ("aa*" sort
/// first) sit in a block-aligned directory block that `find_dirent` can patch.
fn patchable_tree(root: &Path) {
    let pad = |dir: &Path| {
        for i in 0..150 {
            write(
                &dir.join(format!("pad-{i:04}-with-a-long-name-to-fill-blocks")),
                b"p",
            );
        }
    };
    pad(root);
    write(&root.join("aaa-top-file-zz"), b"top");
    let outer = root.join("aab-outer-dir-zz");
    pad(&outer);
    write(&outer.join("aaa-inner-dir-zz/leaf"), b"leaf");
    write(&outer.join("aab-leaf-zz"), &[b'x'; 5000]);
}

fn patchable() -> Built {
    build(patchable_tree, &["-Enoinline_data", "-Enosbcrc"])
}

fn expect_err(data: Vec<u8>, pred: impl Fn(&WalkError) -> bool) -> WalkError {
    let (res, _) = walk_bytes(data);
    let err = res.expect_err("walk should fail");
    assert!(pred(&err), "unexpected error: {err}");
    eprintln!("ok: {err}");
    err
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn garbage_and_truncation_fail_cleanly() {
    let mut rng = Rng(99);
    expect_err(rng.bytes(1 << 20), |e| matches!(e, WalkError::NotErofs));
    expect_err(vec![0; 100], |e| matches!(e, WalkError::NotErofs));
    let b = build(mixed_tree, &[]);
    for cut in [
        1100,
        4096,
        b.data.len() / 4,
        b.data.len() / 2,
        b.data.len() - 4096,
    ] {
        let err = expect_err(b.data[..cut].to_vec(), |_| true);
        assert!(!matches!(err, WalkError::Io(_)), "cut {cut}: {err}");
    }
    // A flipped superblock byte fails the checksum.
    let mut bad = b.data.clone();
    bad[1024 + 70] ^= 0x40;
    expect_err(
        bad,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("checksum")),
    );
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn corrupted_root_nid() {
    let b = patchable();
    let mut far = b.data.clone();
    far[1024 + 14..1024 + 16].copy_from_slice(&0xFFFFu16.to_le_bytes());
    expect_err(
        far,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("outside")),
    );

    let (_, file_nid) = find_dirent(&b.data, b"aaa-top-file-zz");
    let mut not_dir = b.data.clone();
    not_dir[1024 + 14..1024 + 16].copy_from_slice(&(file_nid as u16).to_le_bytes());
    expect_err(
        not_dir,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("not a directory")),
    );
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn directory_cycle_is_detected() {
    let b = patchable();
    let sb = probe_superblock(&b.data).unwrap();
    // inner-dir-zz -> root: the root becomes reachable twice.
    let (off, _) = find_dirent(&b.data, b"aaa-inner-dir-zz");
    let mut cyc = b.data.clone();
    cyc[off..off + 8].copy_from_slice(&sb.root_nid.to_le_bytes());
    expect_err(
        cyc,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("reachable twice")),
    );

    // top-file-zz -> outer-dir-zz: a directory hard link.
    let (outer_off, outer_nid) = find_dirent(&b.data, b"aab-outer-dir-zz");
    let (top_off, _) = find_dirent(&b.data, b"aaa-top-file-zz");
    assert_ne!(outer_off, top_off);
    let mut twice = b.data.clone();
    twice[top_off..top_off + 8].copy_from_slice(&outer_nid.to_le_bytes());
    expect_err(
        twice,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("reachable twice")),
    );

    // A regular file linked twice is a hard link: fine.
    let (leaf_off, _) = find_dirent(&b.data, b"aab-leaf-zz");
    let (_, top_nid) = find_dirent(&b.data, b"aaa-top-file-zz");
    let mut hard = b.data.clone();
    hard[leaf_off..leaf_off + 8].copy_from_slice(&top_nid.to_le_bytes());
    let (res, _) = walk_bytes(hard);
    check_invariants(&res.unwrap());
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn huge_dirent_count_and_bad_dirents() {
    let b = patchable();
    let (off, _) = find_dirent(&b.data, b"aaa-inner-dir-zz");
    let block = off & !4095;
    let mut huge = b.data.clone();
    huge[block + 8..block + 10].copy_from_slice(&0xFFF0u16.to_le_bytes());
    expect_err(
        huge,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("first name offset")),
    );

    let mut outside = b.data.clone();
    outside[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(
        outside,
        |e| matches!(e, WalkError::Corrupt(m) if m.contains("outside the image")),
    );
}

#[test]
#[ignore = "needs mkfs.erofs"]
fn limits_are_enforced() {
    let b = patchable();
    let walk_limited = |limits: WalkLimits| walk_bytes_with(b.data.clone(), &limits).0;
    let err = walk_limited(WalkLimits {
        max_inodes: 5,
        ..WalkLimits::default()
    })
    .unwrap_err();
    assert!(matches!(err, WalkError::LimitExceeded(_)), "{err}");
    let err = walk_limited(WalkLimits {
        max_depth: 1,
        ..WalkLimits::default()
    })
    .unwrap_err();
    assert!(matches!(err, WalkError::LimitExceeded(_)), "{err}");
    let err = walk_limited(WalkLimits {
        max_dir_size: 64,
        ..WalkLimits::default()
    })
    .unwrap_err();
    assert!(matches!(err, WalkError::LimitExceeded(_)), "{err}");
    let err = walk_limited(WalkLimits {
        max_meta_bytes: 8192,
        ..WalkLimits::default()
    })
    .unwrap_err();
    assert!(matches!(err, WalkError::LimitExceeded(_)), "{err}");
    let map = walk_limited(WalkLimits {
        max_depth: 3,
        max_inodes: 400,
        ..WalkLimits::default()
    })
    .unwrap();
    assert_eq!(map.depth, 3);
}

/// Random byte mutations of small real images never panic, never violate
/// the prefetch contract (the reader asserts it), and either fail with an
/// error or produce a consistent map.
#[test]
#[ignore = "needs mkfs.erofs"]
fn fuzz_mutations_never_panic() {
    let small = |root: &Path| {
        let mut rng = Rng(3);
        write(&root.join("a"), &rng.text(30_000));
        write(&root.join("d/b"), &rng.bytes(9000));
        write(&root.join("d/e/c"), &rng.text(70_000));
        write(&root.join("d/e/tiny"), b"t");
        std::os::unix::fs::symlink("a", root.join("l")).unwrap();
        for i in 0..12 {
            write(&root.join(format!("many/n{i}")), &rng.text(i * 700));
        }
    };
    let variants: [&[&str]; 4] = [
        &["-Enosbcrc"],
        &["-Enosbcrc", "-zlz4hc", "-Eztailpacking", "-C16384"],
        &["-Enosbcrc", "-zlz4", "-Elegacy-compress"],
        &["-Enosbcrc", "--chunksize=8192"],
    ];
    let limits = WalkLimits {
        max_inodes: 10_000,
        max_meta_bytes: 64 << 20,
        ..WalkLimits::default()
    };
    let mut rng = Rng(0xF022);
    let mut outcomes = [0usize; 2];
    for args in variants {
        let b = build(small, args);
        let (base, _) = walk_ok(&b);
        let len = b.data.len() as u64;
        for _ in 0..1000 {
            let mut data = b.data.clone();
            for _ in 0..1 + rng.below(8) {
                // Mostly hit metadata, where the parsers are.
                let pos = if rng.below(10) < 8 {
                    let r = &base.required[rng.below(base.required.len() as u64) as usize];
                    r.start + rng.below(r.end - r.start)
                } else {
                    rng.below(len)
                } as usize;
                match rng.below(4) {
                    0 => data[pos] = rng.next() as u8,
                    1 => data[pos] ^= 1 << rng.below(8),
                    2 => data[pos] = 0xFF,
                    _ => data[pos] = 0,
                }
            }
            if rng.below(25) == 0 {
                data.truncate(rng.below(len) as usize);
            }
            match walk_bytes_with(data, &limits).0 {
                Ok(map) => {
                    check_invariants(&map);
                    outcomes[0] += 1;
                }
                Err(_) => outcomes[1] += 1,
            }
        }
    }
    eprintln!(
        "fuzz: {} walks succeeded, {} failed cleanly",
        outcomes[0], outcomes[1]
    );
}

/// A pipelined `MetaReader`: batches stay in flight until `wait`, which
/// delivers the oldest one (a link where every request takes one round
/// trip and answers come in order). Counts batches; the walk reports the
/// longest chain of dependent round trips.
struct PipeReader {
    data: Vec<u8>,
    covered: Vec<Range<u64>>,
    in_flight: std::collections::VecDeque<Vec<Range<u64>>>,
    batches: Vec<Vec<Range<u64>>>,
}

impl PipeReader {
    fn new(data: Vec<u8>) -> Self {
        PipeReader { data, covered: Vec::new(), in_flight: Default::default(), batches: Vec::new() }
    }
}

impl MetaReader for PipeReader {
    fn prefetch(&mut self, _: &[Range<u64>]) -> Result<(), WalkError> {
        panic!("a pipelined walk submits")
    }
    fn submit(&mut self, ranges: &[Range<u64>]) -> Result<Vec<Range<u64>>, WalkError> {
        for r in ranges {
            assert!(r.start < r.end && r.end <= self.data.len() as u64, "bad range {r:?}");
            assert!(
                !self.batches.iter().flatten().any(|c| c.start < r.end && r.start < c.end),
                "range {r:?} asked twice"
            );
        }
        self.batches.push(ranges.to_vec());
        self.in_flight.push_back(ranges.to_vec());
        Ok(Vec::new())
    }
    fn wait(&mut self) -> Result<Vec<Range<u64>>, WalkError> {
        let batch = self.in_flight.pop_front().expect("wait with nothing in flight");
        let mut all = std::mem::take(&mut self.covered);
        all.extend(batch.iter().cloned());
        self.covered = ranges::normalize(all);
        Ok(batch)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let r = offset..offset + buf.len() as u64;
        assert!(self.covered.iter().any(|c| c.start <= r.start && r.end <= c.end), "read {r:?} before it arrived");
        buf.copy_from_slice(&self.data[r.start as usize..r.end as usize]);
        Ok(())
    }
}

fn pipe_walk(data: &[u8], opts: &WalkOptions) -> (ImageMap, PipeReader) {
    let mut reader = PipeReader::new(data.to_vec());
    let map = walk_with(&mut reader, data.len() as u64, &WalkLimits::default(), opts).expect("pipelined walk");
    check_invariants(&map);
    (map, reader)
}

/// The pipelined walk costs about one round trip per directory level: a
/// child's inode is asked for as soon as the block naming it is in. Its map
/// is the one a synchronous walk makes.
#[test]
#[ignore = "needs mkfs.erofs"]
fn pipelined_walk_round_trips_follow_depth() {
    let deep = |root: &Path| {
        let mut p = root.to_path_buf();
        for level in 0..12 {
            p = p.join(format!("level{level}"));
            // Wide enough that every directory has blocks of its own.
            for i in 0..150 {
                write(&p.join(format!("file-with-a-long-name-{i:04}")), format!("{level}-{i}").as_bytes());
            }
        }
    };
    let d = build(deep, &[]);
    let (sync_map, _) = walk_ok_with(&d, &plain_walk());
    let (map, reader) = pipe_walk(&d.data, &plain_walk());
    assert_eq!(map.data_extents, sync_map.data_extents);
    assert_eq!(map.required, sync_map.required);
    assert_eq!(map.depth, 13);
    eprintln!("depth {}: {} round trips, {} batches", map.depth, map.round_trips, reader.batches.len());
    // A level is the inode of a directory and then its blocks: two dependent
    // reads, unless they share a page (at most 2 per level, +1 superblock).
    assert!(map.round_trips <= 2 * (map.depth + 1) + 1, "{} round trips", map.round_trips);
    assert_eq!(map.prefetch_calls as usize, reader.batches.len());
    // Batches, not inodes: 1800 inodes in a few dozen requests.
    assert!(reader.batches.len() <= 3 * (map.depth as usize + 2), "{} batches", reader.batches.len());
    crosscheck(&d, &map, true);
}

/// A walk of an image given by EROFS_WALK_IMAGE (e.g. the benchmark's), with
/// the pipelined reader: prints round trips, batches and bytes (a measuring
/// tool: without the variable it has nothing to check).
#[test]
#[ignore = "needs EROFS_WALK_IMAGE"]
fn walk_of_a_given_image() {
    let Ok(path) = std::env::var("EROFS_WALK_IMAGE") else { return };
    let data = std::fs::read(&path).unwrap();
    for opts in [plain_walk(), WalkOptions::default()] {
        let (map, reader) = pipe_walk(&data, &opts);
        let asked: u64 = reader.batches.iter().map(|b| ranges::total_len(b)).sum();
        let ranges_asked: usize = reader.batches.iter().map(|b| b.len()).sum();
        eprintln!(
            "{opts:?}: depth {} round trips {} batches {} ranges {} asked {} KiB, required {} KiB in {} ranges, guess {:?}, {} file extents",
            map.depth, map.round_trips, reader.batches.len(), ranges_asked, asked >> 10, map.required_bytes() >> 10, map.required.len(), map.contiguous_guess, map.file_extents.len()
        );
        // The target: about one round trip per level, plus two.
        assert!(map.round_trips <= map.depth + 3, "{} round trips for depth {}", map.round_trips, map.depth);
        assert_eq!(map.prefetch_calls as usize, reader.batches.len());
    }
}

/// A tree shaped like a root filesystem: only directories and symlinks at
/// the top, thousands of small files below, a few big ones.
fn rootfs_like_tree(root: &Path) {
    let mut rng = Rng(0x00B0_07F5);
    for top in ["boot", "dev", "home", "media", "mnt", "opt", "proc", "root", "run", "srv", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(top)).unwrap();
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    for i in 0..400 {
        write(&root.join(format!("etc/conf-{i:03}.conf")), &rng.text(200 + (i * 37) % 3000));
    }
    for d in 0..20 {
        for i in 0..120 {
            let n = if i % 10 == 0 { 40_000 } else { 100 + (i * 53) % 6000 };
            write(&root.join(format!("usr/lib/python3/pkg{d:02}/sub/module_{i:03}.py")), &rng.text(n));
        }
    }
    write(&root.join("usr/bin/python3"), &rng.bytes(3 << 20));
    write(&root.join("var/cache/big.bin"), &rng.text(2 << 20));
}

fn writer_image(tree: &Path, compression: crate::erofs::writer::Compression) -> Vec<u8> {
    let (t, _) = crate::build::dir::tree_from_dir(tree).unwrap();
    let opts = crate::erofs::writer::WriterOptions { compression, ..Default::default() };
    let mut out = std::io::Cursor::new(Vec::new());
    crate::erofs::writer::write_image(&t, &opts, &crate::build::LocalFiles, &mut out).unwrap();
    out.into_inner()
}

/// Images of our writer keep all metadata in one run after the superblock:
/// the walk asks for the head and then that run at once — two round trips,
/// two batches, whatever the depth — and finds nothing outside it.
#[test]
fn writer_images_walk_in_the_head_and_one_guessed_run() {
    use crate::erofs::writer::{Compression, DEFAULT_LZ4_PCLUSTER};
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    rootfs_like_tree(&tree);
    for compression in [Compression::None, Compression::Lz4 { pcluster_bytes: DEFAULT_LZ4_PCLUSTER }] {
        let data = writer_image(&tree, compression);
        let guessing = WalkOptions { contiguous_guess_max: 64 << 20, ..WalkOptions::default() };
        let (map, reader) = pipe_walk(&data, &guessing);
        let head = guessing.first_read;
        assert!(map.required_bytes() > 2 * head, "{compression:?}: metadata fits the head; the test needs more");
        let [gs, ge] = map.contiguous_guess.unwrap_or_else(|| panic!("{compression:?}: no guess"));
        assert_eq!(gs, head);
        assert_eq!(map.required.len(), 1, "{compression:?}: metadata is one run");
        assert!(ge >= map.required[0].end, "{compression:?}: the guess {gs}..{ge} misses metadata up to {}", map.required[0].end);
        let asked: u64 = reader.batches.iter().map(|b| ranges::total_len(b)).sum();
        assert!(asked <= map.required_bytes() * 5 / 4 + head, "{compression:?}: asked {asked} for {} of metadata", map.required_bytes());
        assert_eq!(reader.batches.len(), 2, "{compression:?}: head and run: {:?}", reader.batches);
        assert_eq!(map.round_trips, 2, "{compression:?}");
        assert!(map.depth >= 5);
        // The same map as a walk that guesses nothing.
        let (plain, _) = pipe_walk(&data, &plain_walk());
        assert_eq!(plain.required, map.required);
        assert_eq!(plain.data_extents, map.data_extents);
        assert_eq!(plain.file_extents, map.file_extents);
        assert!(plain.round_trips > 3, "{compression:?}: without the guess: {}", plain.round_trips);
    }
}

/// Each regular file's data is one extent of the map, found by offset.
#[test]
fn file_extents_name_each_file() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    rootfs_like_tree(&tree);
    let data = writer_image(&tree, crate::erofs::writer::Compression::None);
    let (map, _) = pipe_walk(&data, &WalkOptions::default());
    assert!(map.file_extents.windows(2).all(|w| w[0].end <= w[1].start));
    // Files with data blocks: 3 MiB python3, 2 MiB big.bin, the 40 kB modules, the >4 KiB ones.
    assert!(map.file_extents.len() >= 240, "{}", map.file_extents.len());
    let big = map.file_extents.iter().find(|r| r.end - r.start >= 3 << 20).expect("the 3 MiB file").clone();
    assert_eq!(map.file_extent(big.start + 12345), Some(big.clone()));
    assert_eq!(map.file_extent(big.end - 1), Some(big.clone()));
    assert_ne!(map.file_extent(big.end), Some(big.clone()));
    assert_eq!(map.file_extent(0), None, "the superblock is no file");
    for r in &map.file_extents {
        assert!(covered_by(&map.data_extents, r), "{r:?} is not data");
    }
}
