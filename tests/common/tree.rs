//! Comparing a mounted tree with its source, and reading files through mmap.
//!
//! `compare_trees` walks both trees in parallel and reports every difference it finds (up to a limit):
//! missing or extra entries, file type, permission bits (incl. setuid/sticky), owner, size, bytes (first
//! differing offset), symlink targets and `user.*` xattrs. Reading errors (EIO from the agent) are
//! differences too. `assert_tree_identical` panics with the report.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const MAX_REPORTED: usize = 25;

#[derive(Debug, Default)]
pub struct TreeReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub differences: Vec<String>,
}

impl TreeReport {
    fn differ(&mut self, what: String) {
        if self.differences.len() < MAX_REPORTED {
            self.differences.push(what);
        } else if self.differences.len() == MAX_REPORTED {
            self.differences
                .push("... (more differences not listed)".into());
        }
    }
}

/// Panics unless `mounted` has exactly the entries, bytes, modes, owners, symlink targets and user xattrs
/// of `source`; returns what was compared.
pub fn assert_tree_identical(source: &Path, mounted: &Path) -> TreeReport {
    let report = compare_trees(source, mounted);
    assert!(
        report.differences.is_empty(),
        "{} differs from {} ({} files, {} bytes compared):\n  {}",
        mounted.display(),
        source.display(),
        report.files,
        report.bytes,
        report.differences.join("\n  ")
    );
    report
}

pub fn compare_trees(source: &Path, mounted: &Path) -> TreeReport {
    let mut report = TreeReport::default();
    compare_entry(source, mounted, Path::new("."), &mut report);
    report
}

fn compare_entry(src: &Path, dst: &Path, rel: &Path, report: &mut TreeReport) {
    let show = rel.display();
    let src_meta = match src.symlink_metadata() {
        Ok(m) => m,
        Err(e) => return report.differ(format!("{show}: cannot lstat source: {e}")),
    };
    let dst_meta = match dst.symlink_metadata() {
        Ok(m) => m,
        Err(e) => return report.differ(format!("{show}: missing in mount: {e}")),
    };
    let (src_type, dst_type) = (file_type(&src_meta), file_type(&dst_meta));
    if src_type != dst_type {
        return report.differ(format!(
            "{show}: type {src_type} in source, {dst_type} in mount"
        ));
    }
    if src_meta.mode() & 0o7777 != dst_meta.mode() & 0o7777 {
        report.differ(format!(
            "{show}: mode {:o} in source, {:o} in mount",
            src_meta.mode() & 0o7777,
            dst_meta.mode() & 0o7777
        ));
    }
    if (src_meta.uid(), src_meta.gid()) != (dst_meta.uid(), dst_meta.gid()) {
        report.differ(format!(
            "{show}: owner {}:{} in source, {}:{} in mount",
            src_meta.uid(),
            src_meta.gid(),
            dst_meta.uid(),
            dst_meta.gid()
        ));
    }
    match (user_xattrs(src), user_xattrs(dst)) {
        (Ok(a), Ok(b)) if a != b => report.differ(format!(
            "{show}: user xattrs differ: source {a:?}, mount {b:?}"
        )),
        (Err(e), _) => report.differ(format!("{show}: source xattrs: {e}")),
        (_, Err(e)) => report.differ(format!("{show}: mount xattrs: {e}")),
        _ => {}
    }
    match src_type {
        "file" => {
            report.files += 1;
            if src_meta.len() != dst_meta.len() {
                return report.differ(format!(
                    "{show}: size {} in source, {} in mount",
                    src_meta.len(),
                    dst_meta.len()
                ));
            }
            match compare_contents(src, dst) {
                Ok(n) => report.bytes += n,
                Err(e) => report.differ(format!("{show}: {e}")),
            }
        }
        "symlink" => {
            report.symlinks += 1;
            match (std::fs::read_link(src), std::fs::read_link(dst)) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(a), Ok(b)) => report.differ(format!(
                    "{show}: symlink -> {a:?} in source, -> {b:?} in mount"
                )),
                (a, b) => report.differ(format!("{show}: readlink source {a:?}, mount {b:?}")),
            }
        }
        "dir" => {
            report.dirs += 1;
            let (src_names, dst_names) = match (dir_names(src), dir_names(dst)) {
                (Ok(a), Ok(b)) => (a, b),
                (a, b) => {
                    return report.differ(format!(
                        "{show}: readdir source {:?}, mount {:?}",
                        a.err(),
                        b.err()
                    ))
                }
            };
            for extra in dst_names.iter().filter(|n| !src_names.contains(n)) {
                report.differ(format!(
                    "{}: extra entry in mount",
                    rel.join(extra).display()
                ));
            }
            for name in &src_names {
                if !dst_names.contains(name) {
                    report.differ(format!("{}: missing in mount", rel.join(name).display()));
                    continue;
                }
                compare_entry(&src.join(name), &dst.join(name), &rel.join(name), report);
            }
        }
        _ => {}
    }
}

fn file_type(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_char_device() {
        "chardev"
    } else if t.is_block_device() {
        "blockdev"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

fn dir_names(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

/// Compares two files chunk by chunk; Ok(bytes compared) or a description of the first difference.
pub fn compare_contents(src: &Path, dst: &Path) -> Result<u64, String> {
    let mut a = std::fs::File::open(src).map_err(|e| format!("open source: {e}"))?;
    let mut b = std::fs::File::open(dst).map_err(|e| format!("open in mount: {e}"))?;
    let mut buf_a = vec![0u8; 1 << 20];
    let mut buf_b = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n =
            read_full(&mut a, &mut buf_a).map_err(|e| format!("read source at {offset}: {e}"))?;
        let m =
            read_full(&mut b, &mut buf_b).map_err(|e| format!("read in mount at {offset}: {e}"))?;
        if let Some(i) = (0..n.min(m)).find(|&i| buf_a[i] != buf_b[i]) {
            let at = offset + i as u64;
            let zeros = buf_b[i..m].iter().take(4096).all(|&x| x == 0);
            return Err(format!(
                "bytes differ at offset {at} (block {}){}",
                at / 4096,
                if zeros {
                    ", mount reads zeros there"
                } else {
                    ""
                }
            ));
        }
        if n != m {
            return Err(format!(
                "length differs after offset {offset}: source chunk {n}, mount chunk {m}"
            ));
        }
        if n == 0 {
            return Ok(offset);
        }
        offset += n as u64;
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `user.*` xattrs of `path` (not following symlinks), name -> value.
pub fn user_xattrs(path: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a size query (NULL buffer, size 0) on a NUL-terminated path.
    let size = unsafe { libc::llistxattr(cpath.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = vec![0u8; size as usize];
    // SAFETY: `names` has room for `size` bytes.
    let size = unsafe {
        libc::llistxattr(
            cpath.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    names.truncate(size as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let cname = CString::new(name).map_err(std::io::Error::other)?;
        let mut value = vec![0u8; 65536];
        // SAFETY: `value` has room for 64 KiB, the xattr value limit.
        let n = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr() as *mut libc::c_void,
                value.len(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        value.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(out)
}

/// Reads a whole file through a private read-only mapping, touching its pages in a scattered order
/// (stride of 7 pages, wrapping) so that page faults, not sequential readahead, drive the reads.
pub fn mmap_read(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: mapping a file we hold open, read-only and private; unmapped below before returning.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = vec![0u8; len];
    let pages = len.div_ceil(4096);
    // A stride coprime with the page count visits every page exactly once.
    let stride = [7usize, 11, 13, 17, 19]
        .into_iter()
        .find(|s| !pages.is_multiple_of(*s))
        .unwrap_or(1);
    for i in 0..pages {
        let start = (i * stride % pages) * 4096;
        let end = (start + 4096).min(len);
        // SAFETY: [start, end) lies inside the mapping of `len` bytes. A failed fault raises SIGBUS, which
        // fails the test loudly; that is what an EIO on mmap looks like.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (addr as *const u8).add(start),
                out.as_mut_ptr().add(start),
                end - start,
            );
        }
    }
    // SAFETY: unmapping exactly what we mapped.
    unsafe { libc::munmap(addr, len) };
    Ok(out)
}

/// Finds the first offset where two byte slices differ (for messages).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() != b.len() {
            Some(a.len().min(b.len()))
        } else {
            None
        })
}

/// Asserts two buffers are equal, with a short message instead of dumping megabytes.
pub fn assert_same_bytes(expected: &[u8], actual: &[u8], what: &str) {
    if let Some(at) = first_difference(expected, actual) {
        panic!(
            "{what}: differs at offset {at} (expected {} bytes, got {}; got zeros from there: {})",
            expected.len(),
            actual.len(),
            actual
                .get(at..)
                .map(|r| r.iter().take(4096).all(|&x| x == 0))
                .unwrap_or(false)
        );
    }
}

/// Paths of all entries (relative) under `root`, for leftovers checks.
pub fn list_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false) {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    walk(root, &mut out);
    out
}
