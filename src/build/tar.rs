//! A tar stream (an OCI layer) as a writer tree.
//!
//! OCI layer rules: entries apply in order (a later entry replaces an
//! earlier one; a directory over a directory keeps its entries), PAX and GNU
//! long names, PAX `uid`/`gid`/`size`/`mtime` (with fractions) and
//! `SCHILY.xattr.*` xattrs (global `g` headers as defaults), hard links as one
//! inode, and the overlayfs conversion of whiteouts that containerd's EROFS
//! snapshotter expects (as `mkfs.erofs --tar --aufs` does): `.wh.NAME` is a
//! character device 0:0 named `NAME`, `.wh..wh..opq` sets
//! `trusted.overlay.opaque=y` on its directory, and a directory holding
//! whiteouts gets an empty `trusted.overlay.origin` so that overlayfs never
//! shows the whiteouts themselves (Linux b79e05aaa166).
//!
//! Bad input is one error: a `..` component, a name over 255 bytes, a
//! truncated stream, a checksum mismatch, a hard link to nothing.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use super::BuildError;
use crate::erofs::writer::{
    path_components, ChunkedData, FileData, Inode, Kind, Metadata, Tree, WriteError,
};

/// Where the file data of the tree will come from.
pub enum DataMode<'a> {
    /// The tar is this (uncompressed, seekable) file: reference data in place.
    InPlace(PathBuf),
    /// Copy each file's data to this spool file (whose path the writer will
    /// read); for gzip and stdin input.
    Spool { file: &'a mut std::fs::File, path: PathBuf },
    /// Tar index: every non-empty file is one chunk on device 1 at its data
    /// offset in the (uncompressed) tar, in `block_bits` blocks.
    Index { block_bits: u8 },
}

/// What reading the tar produced besides the tree.
#[derive(Clone, Debug, Default)]
pub struct TarStats {
    pub entries: u64,
    /// End of the last entry's data, rounded up to 512 (where the trailing
    /// zero records begin).
    pub end_of_entries: u64,
    /// Bytes of the whole (uncompressed) stream, trailing records included:
    /// the stream is read to its end, so a truncated gzip member is noticed.
    pub stream_len: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub hard_links: u64,
    pub skipped_xattrs: u64,
    /// Directories the stream has an entry for (the root when it has `./`);
    /// every other directory of the tree was made as a parent, with default
    /// metadata. Merging layers keeps a lower layer's metadata for those.
    pub explicit_dirs: std::collections::BTreeSet<crate::erofs::writer::InodeId>,
}

fn bad(msg: impl Into<String>) -> BuildError {
    BuildError::Source(msg.into())
}

fn tar_err(e: io::Error) -> BuildError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("the tar stream is truncated"),
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
            bad(format!("the tar stream is corrupt ({e})"))
        }
        _ => {
            let msg = e.to_string();
            if msg.contains("corrupt deflate") || msg.contains("invalid gzip") || msg.contains("gzip") {
                bad(format!("the gzip stream is corrupt or truncated ({msg})"))
            } else if msg.contains("unexpected EOF") || msg.contains("failed to fill whole buffer") {
                bad("the tar stream is truncated")
            } else if msg.contains("checksum") || msg.contains("numeric field") || msg.contains("overflow") {
                bad(format!("the tar stream is corrupt ({msg})"))
            } else {
                BuildError::io("cannot read the tar stream", e)
            }
        }
    }
}

/// Defaults from PAX headers: global (`g`) ones apply to every later entry.
#[derive(Clone, Default)]
struct Pax {
    mtime: Option<(i64, u32)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// `123.456789` → (123, 456789000); negative values as `-1.5` → (-2, 500000000).
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    let neg = int.starts_with('-');
    let secs: i64 = int.parse().ok()?;
    let mut ns: u32 = 0;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !digits.is_empty() {
        ns = format!("{digits:0<9}").parse().ok()?;
    }
    if neg && ns > 0 {
        Some((secs - 1, 1_000_000_000 - ns))
    } else {
        Some((secs, ns))
    }
}

fn apply_pax(pax: &mut Pax, exts: tar::PaxExtensions<'_>, stats: &mut TarStats) -> Result<(), BuildError> {
    for ext in exts {
        let ext = ext.map_err(|e| bad(format!("a PAX header is corrupt ({e})")))?;
        let key = ext.key_bytes();
        if key == b"mtime" {
            pax.mtime = Some(parse_pax_time(ext.value_bytes()).ok_or_else(|| bad("a PAX mtime is not a number"))?);
        } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            if crate::erofs::writer::xattr::is_representable(name) {
                pax.xattrs.insert(name.to_vec(), ext.value_bytes().to_vec());
            } else {
                tracing::warn!("xattr {:?} cannot be stored in EROFS, skipped", String::from_utf8_lossy(name));
                stats.skipped_xattrs += 1;
            }
        } else if key.starts_with(b"LIBARCHIVE.xattr.") || key.starts_with(b"SCHILY.acl.") {
            tracing::warn!("PAX record {:?} is not supported, skipped", String::from_utf8_lossy(key));
            stats.skipped_xattrs += 1;
        }
    }
    Ok(())
}

/// Bounds the tree a hostile stream can make us build.
const MAX_ENTRIES: u64 = 50_000_000;

struct Counting<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl TarStats {
    /// The tar's block count as `mkfs.erofs --tar=i` records it in the
    /// device slot: up to the end of the last entry plus the two
    /// end-of-archive records, if the stream has them.
    pub fn device_blocks(&self) -> u64 {
        (self.end_of_entries + 1024).min(self.stream_len.max(self.end_of_entries)).div_ceil(512)
    }
}

fn dir_meta_default() -> Metadata {
    Metadata::with_permissions(0o755)
}

/// Reads a tar stream into a tree. `reader` yields the uncompressed tar.
pub fn tree_from_tar(reader: impl Read, mode: DataMode<'_>) -> Result<(Tree, TarStats), BuildError> {
    let mut mode = mode;
    let mut stats = TarStats::default();
    let mut tree = Tree::new(dir_meta_default());
    let counter = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let mut archive = tar::Archive::new(Counting { inner: reader, count: counter.clone() });
    let mut global = Pax::default();
    let mut spool_pos = 0u64;
    let entries = archive.entries().map_err(tar_err)?;
    for entry in entries {
        if stats.entries >= MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} tar entries")));
        }
        let mut entry = entry.map_err(tar_err)?;
        let header = entry.header().clone();
        let et = header.entry_type();
        if et.is_pax_global_extensions() {
            let data = {
                let mut v = Vec::new();
                (&mut entry).take(1 << 20).read_to_end(&mut v).map_err(tar_err)?;
                v
            };
            apply_pax(&mut global, tar::PaxExtensions::new(&data), &mut stats)?;
            continue;
        }
        stats.entries += 1;
        let data_pos = entry.raw_file_position();
        let size = entry.size();
        stats.end_of_entries = stats.end_of_entries.max((data_pos + size).next_multiple_of(512));

        let mut pax = global.clone();
        if let Some(exts) = entry.pax_extensions().map_err(tar_err)? {
            apply_pax(&mut pax, exts, &mut stats)?;
        }
        let path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&path).into_owned();
        let comps = path_components(&path).map_err(|e| bad(format!("tar entry {shown:?}: {e}")))?;
        let (mtime, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => (header.mtime().map_err(tar_err)? as i64, 0),
        };
        let meta = Metadata::new(
            (header.mode().map_err(tar_err)? & 0o7777) as u16,
            header.uid().map_err(tar_err)? as u32,
            header.gid().map_err(tar_err)? as u32,
            mtime,
            mtime_nsec,
        );
        let parent_path: Vec<u8> = match comps.split_last() {
            Some((_, parents)) => parents.join(&b'/'),
            None => Vec::new(),
        };
        let last = comps.last().copied().unwrap_or(b"");

        // Whiteouts.
        if last == b".wh..wh..opq" {
            let dir = tree.mkdir_p(&parent_path, dir_meta_default()).map_err(|e| bad(format!("tar entry {shown:?}: {e}")))?;
            tree.get_mut(dir)
                .xattrs
                .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
            stats.opaque_dirs += 1;
            continue;
        }
        if let Some(hidden) = last.strip_prefix(b".wh.") {
            if hidden.starts_with(b".wh.") {
                tracing::warn!("tar entry {shown:?}: aufs metadata, skipped");
                continue;
            }
            let mut p = parent_path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(hidden);
            tree.insert_path(&p, Inode::new(meta, Kind::CharDevice { major: 0, minor: 0 }), dir_meta_default())
                .map_err(|e| bad(format!("tar entry {shown:?}: {e}")))?;
            let dir = tree.mkdir_p(&parent_path, dir_meta_default()).map_err(|e| bad(format!("tar entry {shown:?}: {e}")))?;
            tree.get_mut(dir)
                .xattrs
                .insert(b"trusted.overlay.origin".to_vec(), Vec::new());
            stats.whiteouts += 1;
            continue;
        }

        let with_xattrs = |mut inode: Inode| {
            inode.xattrs = pax.xattrs.clone();
            inode
        };
        let kind = match et {
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("hard link {shown:?} without a target")))?
                    .into_owned();
                tree.hard_link(&path, &target, dir_meta_default())
                    .map_err(|e| bad(format!("tar entry {shown:?}: {e}")))?;
                stats.hard_links += 1;
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let data = if size == 0 {
                    FileData::Empty
                } else {
                    match &mut mode {
                        DataMode::InPlace(p) => FileData::Local { path: p.clone(), offset: data_pos, data_ranges: None },
                        DataMode::Spool { file, path } => {
                            let n = io::copy(&mut (&mut entry).take(size), file)
                                .map_err(|e| match e.kind() {
                                    io::ErrorKind::UnexpectedEof => bad("the tar stream is truncated"),
                                    _ => tar_err(e),
                                })?;
                            if n != size {
                                return Err(bad("the tar stream is truncated"));
                            }
                            let d = FileData::Local { path: path.clone(), offset: spool_pos, data_ranges: None };
                            spool_pos += size;
                            d
                        }
                        DataMode::Index { block_bits } => {
                            if data_pos % (1u64 << *block_bits) != 0 {
                                return Err(bad(format!("tar entry {shown:?}: data not block aligned")));
                            }
                            FileData::Chunked(
                                ChunkedData::contiguous(1, data_pos >> *block_bits, size, *block_bits)
                                    .map_err(BuildError::Write)?,
                            )
                        }
                    }
                };
                Kind::Regular { size, data }
            }
            tar::EntryType::Directory => Kind::empty_dir(),
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("symlink {shown:?} without a target")))?
                    .into_owned();
                Kind::Symlink(target)
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major().map_err(tar_err)?.unwrap_or(0);
                let minor = header.device_minor().map_err(tar_err)?.unwrap_or(0);
                if et == tar::EntryType::Char {
                    Kind::CharDevice { major, minor }
                } else {
                    Kind::BlockDevice { major, minor }
                }
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::GNUSparse => {
                return Err(bad(format!("tar entry {shown:?}: GNU sparse members are not supported")))
            }
            other => {
                tracing::warn!("tar entry {shown:?}: type {other:?} skipped");
                continue;
            }
        };
        if comps.is_empty() && !kind.is_dir() {
            return Err(bad(format!("tar entry {shown:?} is not a directory but names the root")));
        }
        let is_dir = kind.is_dir();
        let id = tree
            .insert_path(&path, with_xattrs(Inode::new(meta, kind)), dir_meta_default())
            .map_err(|e: WriteError| bad(format!("tar entry {shown:?}: {e}")))?;
        if is_dir {
            stats.explicit_dirs.insert(id);
        }
    }
    // The rest: trailing zero records (and, for gzip, the member trailers
    // whose CRC the decoder checks).
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(tar_err)?;
    stats.stream_len = counter.get();
    if let DataMode::Spool { file, .. } = &mut mode {
        file.flush().map_err(|e| BuildError::io("cannot write the spool file", e))?;
    }
    Ok((tree, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erofs::writer::Chunk;

    fn header(path: &str, ty: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(ty);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    fn tar_of(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn raw_entry(out: &mut Vec<u8>, name: &[u8], ty: u8, data: &[u8]) {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = ty;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    #[test]
    fn oci_whiteouts_opaque_dirs_and_hard_links() {
        let data = tar_of(|b| {
            b.append(&header("d/", tar::EntryType::Directory, 0), &[][..]).unwrap();
            b.append(&header("d/f", tar::EntryType::Regular, 3), &b"abc"[..]).unwrap();
            let mut l = header("d/l", tar::EntryType::Link, 0);
            l.set_link_name("d/f").unwrap();
            l.set_cksum();
            b.append(&l, &[][..]).unwrap();
            b.append(&header("d/.wh.gone", tar::EntryType::Regular, 0), &[][..]).unwrap();
            b.append(&header("o/.wh..wh..opq", tar::EntryType::Regular, 0), &[][..]).unwrap();
            let long = format!("d/{}", "n".repeat(200));
            b.append_data(&mut header("x", tar::EntryType::Regular, 2), &long, &b"hi"[..]).unwrap();
        });
        let (t, stats) = tree_from_tar(&data[..], DataMode::Index { block_bits: 9 }).unwrap();
        assert_eq!((stats.whiteouts, stats.opaque_dirs, stats.hard_links), (1, 1, 1));
        assert_eq!(t.lookup_path(b"d/f"), t.lookup_path(b"d/l"));
        let gone = t.get(t.lookup_path(b"d/gone").unwrap());
        assert!(gone.kind.is_whiteout());
        let d = t.get(t.lookup_path(b"d").unwrap());
        assert_eq!(d.xattrs.get(&b"trusted.overlay.origin"[..]), Some(&Vec::new()));
        let o = t.get(t.lookup_path(b"o").unwrap());
        assert_eq!(o.xattrs.get(&b"trusted.overlay.opaque"[..]).map(|v| v.as_slice()), Some(&b"y"[..]));
        assert!(t.lookup_path(format!("d/{}", "n".repeat(200)).as_bytes()).is_some(), "GNU long name");
        // Index mode: the chunk is at the data offset / 512 on device 1.
        let f = t.get(t.lookup_path(b"d/f").unwrap());
        match &f.kind {
            Kind::Regular { size: 3, data: FileData::Chunked(c) } => {
                assert_eq!(c.chunks, vec![Chunk::At { device: 1, block: 2 }]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(stats.stream_len, data.len() as u64);
        // `d/` has an entry; `o` was only made as the parent of its marker.
        assert!(stats.explicit_dirs.contains(&t.lookup_path(b"d").unwrap()));
        assert!(!stats.explicit_dirs.contains(&t.lookup_path(b"o").unwrap()));
        assert!(stats.device_blocks() * 512 <= data.len() as u64);
    }

    #[test]
    fn pax_times_and_xattrs() {
        let data = tar_of(|b| {
            let mut pax = Vec::new();
            for (k, v) in [("mtime", "1700000000.25"), ("SCHILY.xattr.user.k", "v"), ("SCHILY.xattr.system.weird", "1")] {
                let rec = format!(" {k}={v}\n");
                let mut len = rec.len() + 1;
                if format!("{len}{rec}").len() != len {
                    len += 1;
                }
                pax.extend_from_slice(format!("{len}{rec}").as_bytes());
            }
            b.append(&header("PaxHeader", tar::EntryType::XHeader, pax.len() as u64), &pax[..]).unwrap();
            b.append(&header("f", tar::EntryType::Regular, 1), &b"z"[..]).unwrap();
        });
        let (t, stats) = tree_from_tar(&data[..], DataMode::Index { block_bits: 9 }).unwrap();
        let f = t.get(t.lookup_path(b"f").unwrap());
        assert_eq!((f.meta.mtime, f.meta.mtime_nsec), (1_700_000_000, 250_000_000));
        assert_eq!(f.xattrs.get(&b"user.k"[..]).map(|v| v.as_slice()), Some(&b"v"[..]));
        assert_eq!(f.xattrs.len(), 1);
        assert_eq!(stats.skipped_xattrs, 1);
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
    }

    #[test]
    fn bad_tars_are_one_clear_error() {
        let mut dotdot = Vec::new();
        raw_entry(&mut dotdot, b"a/../../etc/passwd", b'0', b"x");
        dotdot.extend_from_slice(&[0u8; 1024]);
        let e = tree_from_tar(&dotdot[..], DataMode::Index { block_bits: 9 }).unwrap_err();
        assert!(e.to_string().contains(".."), "{e}");

        let long = format!("d/{}", "n".repeat(256));
        let data = tar_of(|b| {
            b.append_data(&mut header("x", tar::EntryType::Regular, 1), &long, &b"z"[..]).unwrap();
        });
        let e = tree_from_tar(&data[..], DataMode::Index { block_bits: 9 }).unwrap_err();
        assert!(e.to_string().contains("longer than 255"), "{e}");

        let data = tar_of(|b| {
            b.append(&header("f", tar::EntryType::Regular, 5000), &vec![1u8; 5000][..]).unwrap();
        });
        let e = tree_from_tar(&data[..1500], DataMode::Index { block_bits: 9 }).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let cut = &gz[..gz.len() - 10];
        let dec = flate2::read::MultiGzDecoder::new(cut);
        let e = tree_from_tar(dec, DataMode::Index { block_bits: 9 }).unwrap_err();
        assert!(e.to_string().contains("truncated") || e.to_string().contains("corrupt"), "{e}");

        let mut abs = Vec::new();
        raw_entry(&mut abs, b"/etc/x", b'0', b"x");
        abs.extend_from_slice(&[0u8; 1024]);
        let (t, _) = tree_from_tar(&abs[..], DataMode::Index { block_bits: 9 }).unwrap();
        assert!(t.lookup_path(b"etc/x").is_some(), "a leading / is stripped, as tar -x does");
    }
}
