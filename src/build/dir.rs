//! A source directory as a writer tree: `lstat` on everything, symlinks are
//! never followed inside the source, hard links become one inode, sparse
//! files keep their holes (SEEK_DATA/SEEK_HOLE), xattrs EROFS can store are
//! kept (others are skipped with a warning).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{rel_display, show, BuildError};
use crate::erofs::writer::{FileData, Inode, InodeId, Kind, Metadata, Tree};

/// What the walk saw.
#[derive(Clone, Debug, Default)]
pub struct DirStats {
    pub entries: u64,
    pub hard_links: u64,
    pub sparse_files: u64,
    pub skipped_xattrs: u64,
}

fn meta_of(st: &fs::Metadata) -> Metadata {
    Metadata::new(
        (st.mode() & 0o7777) as u16,
        st.uid(),
        st.gid(),
        st.mtime(),
        st.mtime_nsec().clamp(0, 999_999_999) as u32,
    )
}

/// Reads the xattrs of `path` (not following a symlink).
fn read_xattrs(path: &Path, inode: &mut Inode, stats: &mut DirStats) -> Result<(), BuildError> {
    let names = match ::xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(BuildError::io(format!("cannot list the xattrs of {}", show(path)), e)),
    };
    for name in names {
        let name_bytes = name.as_bytes();
        if !crate::erofs::writer::xattr::is_representable(name_bytes) {
            tracing::warn!("{}: xattr {:?} cannot be stored in EROFS, skipped", show(path), name);
            stats.skipped_xattrs += 1;
            continue;
        }
        match ::xattr::get(path, &name) {
            Ok(Some(v)) => {
                inode.xattrs.insert(name_bytes.to_vec(), v);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(BuildError::io(format!("cannot read xattr {:?} of {}", name, show(path)), e))
            }
        }
    }
    Ok(())
}

/// Byte ranges holding data in a sparse file.
fn data_ranges(path: &Path, size: u64) -> Result<Vec<std::ops::Range<u64>>, BuildError> {
    use nix::unistd::{lseek, Whence};
    let f = fs::File::open(path).map_err(|e| BuildError::io(format!("cannot open {}", show(path)), e))?;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size_i = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < size_i {
        let start = match lseek(&f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            // No SEEK_DATA support: all of it is data.
            Err(nix::errno::Errno::EINVAL) => return Ok(std::iter::once(0..size).collect()),
            Err(e) => return Err(BuildError::io(format!("SEEK_DATA on {}", show(path)), e.into())),
        };
        let end = match lseek(&f, start, Whence::SeekHole) {
            Ok(e) => e,
            Err(e) => return Err(BuildError::io(format!("SEEK_HOLE on {}", show(path)), e.into())),
        };
        if end <= start {
            break;
        }
        out.push(start as u64..(end as u64).min(size));
        pos = end;
    }
    Ok(out)
}

/// Walks `src` into a tree. `src` itself may be a symlink to a directory;
/// nothing below it is followed.
pub fn tree_from_dir(src: &Path) -> Result<(Tree, DirStats), BuildError> {
    let lst = fs::symlink_metadata(src)
        .map_err(|e| BuildError::io(format!("cannot access {}", show(src)), e))?;
    let root_path: PathBuf = if lst.file_type().is_symlink() {
        match fs::canonicalize(src) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(BuildError::Source(format!("{} is a symlink loop", show(src))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BuildError::Source(format!("{} is a dangling symlink", show(src))))
            }
            Err(e) => return Err(BuildError::io(format!("cannot resolve {}", show(src)), e)),
        }
    } else {
        src.to_path_buf()
    };
    let root_st = fs::symlink_metadata(&root_path)
        .map_err(|e| BuildError::io(format!("cannot access {}", show(&root_path)), e))?;
    if !root_st.is_dir() {
        return Err(BuildError::Source(format!("{} is not a directory", show(src))));
    }
    let mut stats = DirStats::default();
    let mut tree = Tree::new(meta_of(&root_st));
    let root = tree.root();
    read_xattrs(&root_path, tree.get_mut(root), &mut stats)?;

    let mut visited_dirs: HashSet<(u64, u64)> = HashSet::new();
    visited_dirs.insert((root_st.dev(), root_st.ino()));
    let mut links: HashMap<(u64, u64), InodeId> = HashMap::new();
    // (directory on disk, its inode, its path relative to the root)
    let mut stack: Vec<(PathBuf, InodeId, Vec<u8>)> = vec![(root_path.clone(), root, Vec::new())];
    while let Some((dir_path, dir_id, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir_path)
            .map_err(|e| BuildError::io(format!("cannot read the directory {}", show(&dir_path)), e))?;
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(|e| BuildError::io(format!("cannot read the directory {}", show(&dir_path)), e))?;
            names.push(e.file_name());
        }
        names.sort();
        for name in names {
            let nb = name.as_bytes();
            let path = dir_path.join(&name);
            let mut child_rel = rel.clone();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(nb);
            let st = fs::symlink_metadata(&path)
                .map_err(|e| BuildError::io(format!("cannot access {}", show(&path)), e))?;
            stats.entries += 1;
            let ft = st.file_type();
            let key = (st.dev(), st.ino());
            if ft.is_dir() {
                if !visited_dirs.insert(key) {
                    return Err(BuildError::Source(format!(
                        "the directory {} of {} is reachable twice (a bind mount loop?)",
                        rel_display(&child_rel),
                        show(src)
                    )));
                }
            } else if st.nlink() > 1 {
                if let Some(&id) = links.get(&key) {
                    tree.link(dir_id, nb, id)?;
                    stats.hard_links += 1;
                    continue;
                }
            }
            let meta = meta_of(&st);
            let kind = if ft.is_dir() {
                Kind::empty_dir()
            } else if ft.is_file() {
                let size = st.len();
                let sparse = size > 0 && st.blocks().saturating_mul(512) < size;
                let data_ranges = if sparse {
                    stats.sparse_files += 1;
                    Some(data_ranges(&path, size)?)
                } else {
                    None
                };
                let data = if size == 0 {
                    FileData::Empty
                } else {
                    FileData::Local { path: path.clone(), offset: 0, data_ranges }
                };
                Kind::Regular { size, data }
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)
                    .map_err(|e| BuildError::io(format!("cannot read the symlink {}", show(&path)), e))?;
                Kind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = st.rdev();
                let (major, minor) = (libc::major(rdev), libc::minor(rdev));
                if ft.is_char_device() {
                    Kind::CharDevice { major, minor }
                } else {
                    Kind::BlockDevice { major, minor }
                }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_socket() {
                Kind::Socket
            } else {
                return Err(BuildError::Source(format!("{}: unknown file type", show(&path))));
            };
            let mut inode = Inode::new(meta, kind);
            read_xattrs(&path, &mut inode, &mut stats)?;
            let is_dir = inode.kind.is_dir();
            let id = tree.add(inode);
            tree.link(dir_id, nb, id)?;
            if is_dir {
                stack.push((path, id, child_rel));
            } else if st.nlink() > 1 {
                links.insert(key, id);
            }
        }
    }
    Ok((tree, stats))
}
