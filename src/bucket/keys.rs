//! Which keys of a listing become which paths of a bucket image. Pure.
//!
//! The image's root is the listed prefix; a key's path is the rest of it, split at `/`. The rule
//! for keys that are no path (README, "Bucket images"):
//! * a key with an empty segment (`a//b`, `/x`), a `.` or `..` segment (`../x`, `a/./b`), a
//!   segment longer than 255 bytes, or a NUL is **skipped**, with a warning naming it;
//! * a key that is both a file and a prefix of other keys (`a` and `a/b`) is skipped: the
//!   directory wins (it holds the other objects), with a warning naming the file;
//! * a key ending in `/` is a directory marker (as consoles create them): a directory (its
//!   LastModified is the directory's mtime); one with data is skipped with a warning.
//!
//! Nothing is renamed: every file of the image is at exactly its key minus the prefix, so a path
//! names its object and back. Directories get 0755 and the newest mtime of what they hold (their
//! marker's, when there is one); files 0644 and their object's LastModified.

use std::collections::{BTreeMap, BTreeSet};

use crate::erofs::writer::NAME_MAX;
use crate::remote::s3::ListedObject;

/// Why a key is not in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    EmptySegment,
    DotSegment,
    LongSegment,
    Nul,
    /// A key ending in `/` that holds data.
    MarkerWithData,
    /// The key is also the prefix of other keys (a directory): the directory wins.
    FileAndPrefix,
    /// Not under the listed prefix (a store that ignores `prefix=`).
    OutsidePrefix,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::EmptySegment => "it has an empty path segment",
            SkipReason::DotSegment => "it has a \".\" or \"..\" path segment",
            SkipReason::LongSegment => "a path segment is longer than 255 bytes",
            SkipReason::Nul => "it contains a NUL byte",
            SkipReason::MarkerWithData => "it ends in \"/\" (a directory marker) but holds data",
            SkipReason::FileAndPrefix => "it is also the prefix of other keys (the directory is kept)",
            SkipReason::OutsidePrefix => "it is not under the listed prefix",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub why: SkipReason,
}

/// An object that becomes a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFile {
    /// Relative path in the image (`a/b/c`).
    pub path: Vec<u8>,
    /// Index into the listing.
    pub object: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlannedTree {
    /// In the listing's (key) order.
    pub files: Vec<PlannedFile>,
    /// Every directory below the root (relative paths) and its mtime; the root's is `root_mtime`.
    pub dirs: BTreeMap<Vec<u8>, (i64, u32)>,
    pub root_mtime: (i64, u32),
    pub skipped: Vec<Skipped>,
}

enum Parsed<'a> {
    File(Vec<&'a [u8]>),
    Dir(Vec<&'a [u8]>),
}

fn split(rel: &str) -> Result<Parsed<'_>, SkipReason> {
    let (body, marker) = match rel.strip_suffix('/') {
        Some(b) => (b, true),
        None => (rel, false),
    };
    let mut parts = Vec::new();
    if !body.is_empty() {
        for seg in body.as_bytes().split(|&b| b == b'/') {
            if seg.is_empty() {
                return Err(SkipReason::EmptySegment);
            }
            if seg == b"." || seg == b".." {
                return Err(SkipReason::DotSegment);
            }
            if seg.len() > NAME_MAX {
                return Err(SkipReason::LongSegment);
            }
            if seg.contains(&0) {
                return Err(SkipReason::Nul);
            }
            parts.push(seg);
        }
    } else if marker {
        // "/" alone, or "prefix//": an empty segment.
        return Err(SkipReason::EmptySegment);
    }
    Ok(if marker { Parsed::Dir(parts) } else { Parsed::File(parts) })
}

/// Maps a listing under `prefix` (empty or ending in `/`) to the image's tree.
pub fn plan_tree(prefix: &str, objects: &[ListedObject]) -> PlannedTree {
    let mut out = PlannedTree::default();
    let mut files: Vec<(Vec<u8>, usize)> = Vec::new();
    // Directories implied by files and markers, with the newest mtime seen below (or the marker's).
    let mut implied: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut marker_mtime: BTreeMap<Vec<u8>, (i64, u32)> = BTreeMap::new();
    let mut root_marker: Option<(i64, u32)> = None;
    for (i, o) in objects.iter().enumerate() {
        let skip = |why| Skipped { key: o.key.clone(), why };
        let Some(rel) = o.key.strip_prefix(prefix) else {
            out.skipped.push(skip(SkipReason::OutsidePrefix));
            continue;
        };
        let mtime = o.last_modified.unwrap_or((0, 0));
        if rel.is_empty() {
            // The prefix's own marker: the root.
            if o.size > 0 {
                out.skipped.push(skip(SkipReason::MarkerWithData));
            } else {
                root_marker = Some(mtime);
            }
            continue;
        }
        match split(rel) {
            Err(why) => out.skipped.push(skip(why)),
            Ok(Parsed::Dir(parts)) => {
                if o.size > 0 {
                    out.skipped.push(skip(SkipReason::MarkerWithData));
                    continue;
                }
                for n in 1..=parts.len() {
                    implied.insert(parts[..n].join(&b'/'));
                }
                marker_mtime.insert(parts.join(&b'/'), mtime);
            }
            Ok(Parsed::File(parts)) => {
                for n in 1..parts.len() {
                    implied.insert(parts[..n].join(&b'/'));
                }
                files.push((parts.join(&b'/'), i));
            }
        }
    }
    // A file that is also a directory: the directory wins.
    let mut newest_below: BTreeMap<Vec<u8>, (i64, u32)> = BTreeMap::new();
    let mut root_newest: Option<(i64, u32)> = None;
    for (path, i) in files {
        if implied.contains(&path) {
            out.skipped.push(Skipped { key: objects[i].key.clone(), why: SkipReason::FileAndPrefix });
            continue;
        }
        let mtime = objects[i].last_modified.unwrap_or((0, 0));
        root_newest = root_newest.max(Some(mtime));
        for (n, &b) in path.iter().enumerate() {
            if b == b'/' {
                let e = newest_below.entry(path[..n].to_vec()).or_insert(mtime);
                *e = (*e).max(mtime);
            }
        }
        out.files.push(PlannedFile { path, object: i });
    }
    for d in implied {
        let mtime = marker_mtime.get(&d).or(newest_below.get(&d)).copied().unwrap_or((0, 0));
        root_newest = root_newest.max(Some(mtime));
        out.dirs.insert(d, mtime);
    }
    out.root_mtime = root_marker.or(root_newest).unwrap_or((0, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64, t: i64) -> ListedObject {
        ListedObject { key: key.into(), size, etag: Some("\"e\"".into()), last_modified: Some((t, 0)) }
    }

    fn paths(p: &PlannedTree) -> Vec<String> {
        p.files.iter().map(|f| String::from_utf8(f.path.clone()).unwrap()).collect()
    }

    fn skipped(p: &PlannedTree) -> Vec<(String, SkipReason)> {
        p.skipped.iter().map(|s| (s.key.clone(), s.why.clone())).collect()
    }

    #[test]
    fn keys_become_paths_and_prefixes_directories() {
        let listing = [obj("a/b/c.txt", 3, 10), obj("a/d", 1, 30), obj("ü/日本 語 100%.txt", 1, 20), obj("top", 0, 5)];
        let p = plan_tree("", &listing);
        assert_eq!(paths(&p), vec!["a/b/c.txt", "a/d", "ü/日本 語 100%.txt", "top"]);
        assert!(p.skipped.is_empty());
        let dirs: Vec<(String, i64)> = p.dirs.iter().map(|(k, v)| (String::from_utf8(k.clone()).unwrap(), v.0)).collect();
        assert_eq!(dirs, vec![("a".into(), 30), ("a/b".into(), 10), ("ü".into(), 20)]);
        assert_eq!(p.root_mtime, (30, 0));
        assert_eq!(p.files[2].object, 2);
    }

    #[test]
    fn the_prefix_is_the_root() {
        let listing = [obj("data/", 0, 99), obj("data/x", 1, 1), obj("data/sub/", 0, 50), obj("other", 1, 1)];
        let p = plan_tree("data/", &listing);
        assert_eq!(paths(&p), vec!["x"]);
        assert_eq!(p.root_mtime, (99, 0), "the prefix's marker");
        assert_eq!(p.dirs.get(b"sub".as_slice()), Some(&(50, 0)), "an empty directory from its marker");
        assert_eq!(skipped(&p), vec![("other".into(), SkipReason::OutsidePrefix)]);
    }

    #[test]
    fn keys_that_are_no_paths_are_skipped_with_their_reason() {
        let long = format!("d/{}", "n".repeat(256));
        let listing = [
            obj("../x", 1, 1),
            obj("./y", 1, 1),
            obj("a//b", 1, 1),
            obj("a/./b", 1, 1),
            obj("/lead", 1, 1),
            obj("both", 5, 1),
            obj("both/inside", 5, 1),
            obj("mark/", 3, 1),
            obj(&long, 1, 1),
            obj("nul\0x", 1, 1),
            obj("fine", 1, 1),
            obj("dir/", 0, 7),
            obj("dir", 4, 1),
        ];
        let p = plan_tree("", &listing);
        assert_eq!(paths(&p), vec!["both/inside", "fine"]);
        let mut got = skipped(&p);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = vec![
            ("../x".to_string(), SkipReason::DotSegment),
            ("./y".into(), SkipReason::DotSegment),
            ("a//b".into(), SkipReason::EmptySegment),
            ("a/./b".into(), SkipReason::DotSegment),
            ("/lead".into(), SkipReason::EmptySegment),
            ("both".into(), SkipReason::FileAndPrefix),
            ("mark/".into(), SkipReason::MarkerWithData),
            (long.clone(), SkipReason::LongSegment),
            ("nul\0x".into(), SkipReason::Nul),
            ("dir".into(), SkipReason::FileAndPrefix),
        ];
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
        // "a" is no directory: every key under it was skipped.
        assert!(!p.dirs.contains_key(b"a".as_slice()));
        assert!(p.dirs.contains_key(b"dir".as_slice()) && p.dirs.contains_key(b"both".as_slice()));
        assert!(SkipReason::FileAndPrefix.to_string().contains("directory is kept"));
    }
}
