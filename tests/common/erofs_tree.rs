//! Strict comparison of two trees for the writer tests: every entry's type, permission bits, owner,
//! mtime (seconds and nanoseconds), size, bytes, symlink target, device number, every xattr (user.,
//! trusted., security., POSIX ACLs) and hard-link identity (names sharing an inode in one tree share
//! one in the other, and only those).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
pub struct Checks {
    pub owner: bool,
    pub mtime: bool,
    pub xattrs: bool,
    /// Compare directory mtimes too (a tar extraction may touch them).
    pub dir_mtime: bool,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub mode: bool,
    /// `nlink` and hard-link groups.
    pub links: bool,
    /// Relative paths whose bytes are not compared.
    pub skip_content: &'static [&'static str],
}

impl Checks {
    pub fn all() -> Checks {
        Checks { owner: true, mtime: true, xattrs: true, dir_mtime: true, mode: true, links: true, skip_content: &[] }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    kind: &'static str,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    size: u64,
    rdev: u64,
    nlink: u64,
    ino: (u64, u64),
    target: Option<PathBuf>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "?"
    }
}

fn scan(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
    let path = root.join(rel);
    let st = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(&path) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(&path, &n) {
                xattrs.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    let kind = kind_of(st.file_type());
    out.insert(
        rel.to_path_buf(),
        Seen {
            kind,
            perm: st.mode() & 0o7777,
            uid: st.uid(),
            gid: st.gid(),
            mtime: (st.mtime(), st.mtime_nsec()),
            size: if kind == "dir" { 0 } else { st.len() },
            rdev: if kind == "char" || kind == "block" { st.rdev() } else { 0 },
            nlink: st.nlink(),
            ino: (st.dev(), st.ino()),
            target: std::fs::read_link(&path).ok(),
            xattrs,
        },
    );
    if kind == "dir" {
        let mut names: Vec<_> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            scan(root, &rel.join(n), out);
        }
    }
}

fn same_bytes(a: &Path, b: &Path) -> Result<(), String> {
    let mut fa = std::fs::File::open(a).map_err(|e| format!("open {}: {e}", a.display()))?;
    let mut fb = std::fs::File::open(b).map_err(|e| format!("open {}: {e}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| format!("read {}: {e}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| format!("read {}: {e}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            let first = ba[..na.min(nb)].iter().zip(&bb[..na.min(nb)]).position(|(x, y)| x != y).unwrap_or(na.min(nb));
            return Err(format!("bytes differ at offset {}", pos + first as u64));
        }
        if na == 0 {
            return Ok(());
        }
        pos += na as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Every difference between `expected` and `actual` (empty when they are equal under `checks`).
pub fn differences(expected: &Path, actual: &Path, checks: Checks) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    scan(expected, Path::new(""), &mut a);
    scan(actual, Path::new(""), &mut b);
    let mut diffs = Vec::new();
    for k in a.keys().filter(|k| !b.contains_key(*k)) {
        diffs.push(format!("{}: missing", k.display()));
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("{}: unexpected", k.display()));
    }
    // Hard-link groups: the names of one inode.
    let groups = |m: &BTreeMap<PathBuf, Seen>| {
        let mut g: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        for (p, s) in m {
            if s.kind != "dir" {
                g.entry(s.ino).or_default().push(p.clone());
            }
        }
        let mut v: Vec<Vec<PathBuf>> = g.into_values().filter(|v| v.len() > 1).collect();
        v.sort();
        v
    };
    let (ga, gb) = (groups(&a), groups(&b));
    if checks.links && ga != gb {
        diffs.push(format!("hard-link groups differ: expected {ga:?}, got {gb:?}"));
    }
    for (k, x) in &a {
        let Some(y) = b.get(k) else { continue };
        let show = k.display();
        let mut d = |what: &str, e: String, g: String| diffs.push(format!("{show}: {what} expected {e}, got {g}"));
        if x.kind != y.kind {
            d("type", x.kind.into(), y.kind.into());
            continue;
        }
        let rel = k.to_string_lossy();
        let skipped = checks.skip_content.iter().any(|s| *s == rel);
        if checks.mode && x.kind != "symlink" && x.perm != y.perm {
            d("mode", format!("{:o}", x.perm), format!("{:o}", y.perm));
        }
        if checks.owner && (x.uid, x.gid) != (y.uid, y.gid) {
            d("owner", format!("{}:{}", x.uid, x.gid), format!("{}:{}", y.uid, y.gid));
        }
        if checks.mtime && (x.kind != "dir" || checks.dir_mtime) && x.mtime != y.mtime {
            d("mtime", format!("{:?}", x.mtime), format!("{:?}", y.mtime));
        }
        if x.size != y.size && !skipped {
            d("size", x.size.to_string(), y.size.to_string());
        }
        if x.rdev != y.rdev {
            d("rdev", format!("{:#x}", x.rdev), format!("{:#x}", y.rdev));
        }
        if checks.links && x.kind != "dir" && x.nlink != y.nlink {
            d("nlink", x.nlink.to_string(), y.nlink.to_string());
        }
        if x.target != y.target {
            d("symlink target", format!("{:?}", x.target), format!("{:?}", y.target));
        }
        if checks.xattrs && x.xattrs != y.xattrs {
            d("xattrs", format!("{:?}", x.xattrs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>()),
              format!("{:?}", y.xattrs.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>()));
        }
        if x.kind == "file" && x.size == y.size && !skipped {
            if let Err(e) = same_bytes(&expected.join(k), &actual.join(k)) {
                diffs.push(format!("{show}: {e}"));
            }
        }
    }
    diffs
}

pub fn assert_same_tree(expected: &Path, actual: &Path, checks: Checks) {
    let diffs = differences(expected, actual, checks);
    assert!(
        diffs.is_empty(),
        "{} differs from {}:\n  {}",
        actual.display(),
        expected.display(),
        diffs.iter().take(40).cloned().collect::<Vec<_>>().join("\n  ")
    );
}
