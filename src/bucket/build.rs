//! Writes a bucket image: the tree of a listing (see [`super::keys`]), metadata only, every file
//! a flat-plain inode at its object's flat address, the object table after the EROFS blocks and
//! the locator on the root directory (see [`super::record`]).
//!
//! Two layout passes, as for tar indexes: the first with placeholder addresses (every field has
//! its final width, so the metadata's size is final), then the table is placed after the
//! metadata, the objects after the table, and the second pass writes the real addresses. No byte
//! of any object is read.

use std::io::{Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

use crate::erofs::writer::{self, FileData, Inode, InodeId, Metadata, NoFiles, Tree, WriteError, WriterOptions};
use crate::remote::s3::ListedObject;

use super::keys::{PlannedTree, Skipped};
use super::record::{self, BucketHeader, Locator, RecordError, Table, TableEntry, BLOCK};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("{0}")]
    Write(#[from] WriteError),
    #[error("cannot write the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What was written.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BuildReport {
    pub files: u64,
    pub directories: u64,
    /// Objects with data (each a segment of a mount).
    pub objects: u64,
    /// Bytes of the objects the image references.
    pub object_bytes: u64,
    /// The EROFS metadata (superblock, inodes, directories).
    pub metadata_bytes: u64,
    pub table_bytes: u64,
    /// Bytes of the image file.
    pub image_bytes: u64,
    /// End of the flat address space (the cache file's size when mounted).
    pub address_space: u64,
    pub extended_inodes: u64,
}

/// How to write: a UUID, or `None` to derive one from the content (reproducible).
pub struct BuildOptions {
    pub uuid: Option<[u8; 16]>,
}

const FILE_MODE: u16 = 0o644;
const DIR_MODE: u16 = 0o755;

/// Writes the image of `planned` (from `listing`) to `out` (an empty file). Every object with data
/// must have an ETag.
pub fn write_bucket_image(
    out: &mut std::fs::File,
    header: &BucketHeader,
    listing: &[ListedObject],
    planned: &PlannedTree,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    let meta = |mode: u16, (s, ns): (i64, u32)| Metadata::new(mode, 0, 0, s, ns);
    let mut tree = Tree::new(meta(DIR_MODE, planned.root_mtime));
    let root = tree.root();
    tree.get_mut(root).xattrs.insert(record::XATTR_NAME.to_vec(), Locator::placeholder().encode().to_vec());
    // Sorted, so every parent comes before its children.
    for (path, &mtime) in &planned.dirs {
        tree.insert_path(path, Inode::dir(meta(DIR_MODE, mtime)), meta(DIR_MODE, planned.root_mtime))?;
    }
    let mut entries = Vec::new();
    let mut with_data: Vec<InodeId> = Vec::new();
    for f in &planned.files {
        let o = listing.get(f.object).ok_or_else(|| BuildError::Invalid("internal error: a file without its object".into()))?;
        let data = if o.size == 0 { FileData::Empty } else { FileData::FlatAddress { block: 0 } };
        let id = tree.insert_path(&f.path, Inode::file(meta(FILE_MODE, o.last_modified.unwrap_or((0, 0))), o.size, data), meta(DIR_MODE, planned.root_mtime))?;
        if o.size > 0 {
            let etag = o.etag.clone().filter(|e| !e.is_empty()).ok_or_else(|| BuildError::Invalid(format!("object {:?} has no ETag", o.key)))?;
            entries.push(TableEntry { flat_start: 0, size: o.size, key: o.key.clone(), etag });
            with_data.push(id);
        }
    }
    if entries.len() > record::MAX_OBJECTS {
        return Err(BuildError::Invalid(format!(
            "{} objects with data: more than the {} one image may reference; build images of smaller prefixes",
            entries.len(),
            record::MAX_OBJECTS
        )));
    }
    let mut wopts = WriterOptions { metadata_only: true, ..WriterOptions::default() };
    match opts.uuid {
        Some(u) => wopts.uuid = u,
        None => wopts.derive_uuid = true,
    }

    // Pass 1: the metadata's size, with every field at its final width.
    let metadata_bytes = writer::plan(&tree, &wopts, &NoFiles)?.summary().image_size;
    let table_offset = metadata_bytes.next_multiple_of(BLOCK);
    let mut table = Table { header: header.clone(), entries };
    let table_len = table.encoded_len()?;
    let image_bytes = table_offset
        .checked_add(table_len)
        .map(|e| e.next_multiple_of(BLOCK))
        .ok_or_else(|| BuildError::Invalid("the object table is too large".into()))?;
    let sizes: Vec<u64> = table.entries.iter().map(|e| e.size).collect();
    let starts = record::place(&sizes, image_bytes)?;
    for ((e, id), start) in table.entries.iter_mut().zip(&with_data).zip(&starts) {
        e.flat_start = *start;
        if let writer::Kind::Regular { data, .. } = &mut tree.get_mut(*id).kind {
            *data = FileData::FlatAddress { block: start / BLOCK };
        }
    }
    table.validate(image_bytes)?;
    let table_bytes = table.encode()?;
    if table_bytes.len() as u64 != table_len {
        return Err(BuildError::Invalid("internal error: the table's length changed".into()));
    }
    let locator = Locator { table_offset, table_len, table_sha256: Sha256::digest(&table_bytes).into() };
    tree.get_mut(root).xattrs.insert(record::XATTR_NAME.to_vec(), locator.encode().to_vec());

    // Pass 2: the real addresses; the layout must not move.
    let plan = writer::plan(&tree, &wopts, &NoFiles)?;
    if plan.summary().image_size != metadata_bytes {
        return Err(BuildError::Invalid("internal error: the metadata's size changed between passes".into()));
    }
    let summary = plan.write(out, &NoFiles)?;
    out.seek(SeekFrom::Start(table_offset))?;
    out.write_all(&table_bytes)?;
    out.set_len(image_bytes)?;
    Ok(BuildReport {
        files: planned.files.len() as u64,
        directories: planned.dirs.len() as u64 + 1,
        objects: table.entries.len() as u64,
        object_bytes: table.entries.iter().map(|e| e.size).sum(),
        metadata_bytes,
        table_bytes: table_len,
        image_bytes,
        address_space: table.space_end(image_bytes),
        extended_inodes: summary.extended_inodes,
    })
}

/// The warning line for a skipped key (keys are shown escaped: they may hold any character).
pub fn skipped_line(s: &Skipped) -> String {
    format!("skipping key {:?}: {}", s.key, s.why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::keys::plan_tree;
    use crate::bucket::read;
    use crate::remote::s3::{SigVersion, UrlStyle};

    fn header() -> BucketHeader {
        BucketHeader {
            bucket: "bkt".into(),
            prefix: String::new(),
            endpoints: vec!["http://127.0.0.1:9000".into()],
            region: "us-east-1".into(),
            url_style: Some(UrlStyle::Path),
            sig: SigVersion::V4,
        }
    }

    fn obj(key: &str, size: u64) -> ListedObject {
        ListedObject { key: key.into(), size, etag: Some(format!("\"{}\"", key.len())), last_modified: Some((1_700_000_000, 5)) }
    }

    #[test]
    fn the_image_records_every_object_where_its_inode_points() {
        let listing = vec![obj("a/b/one", 10), obj("a/two", 5 << 30), obj("empty", 0), obj("z/3", 4096), obj("a//skip", 1)];
        let planned = plan_tree("", &listing);
        let mut f = tempfile::tempfile().unwrap();
        let report = write_bucket_image(&mut f, &header(), &listing, &planned, &BuildOptions { uuid: None }).unwrap();
        assert_eq!(report.files, 4);
        assert_eq!(report.objects, 3, "the empty object needs no segment");
        assert_eq!(report.object_bytes, 10 + (5 << 30) + 4096);
        assert_eq!(report.extended_inodes, 1, "the 5 GiB file");
        let len = f.metadata().unwrap().len();
        assert_eq!(len, report.image_bytes);
        assert_eq!(len % BLOCK, 0);

        let bytes = {
            use std::io::Read;
            let mut b = Vec::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut b).unwrap();
            b
        };
        let (sb, locator, table) = read::tests::locate_bytes(&bytes).unwrap();
        let (locator, table) = (locator.expect("a bucket image"), table.expect("its table"));
        assert!(locator.table_offset >= sb.blocks * BLOCK, "the table is after the EROFS blocks");
        assert_eq!(table.header, header());
        let keys: Vec<&str> = table.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["a/b/one", "a/two", "z/3"]);
        assert_eq!(table.entries[0].flat_start, report.image_bytes);
        assert_eq!(table.entries[1].flat_start, report.image_bytes + 4096);
        assert_eq!(table.entries[2].flat_start, report.image_bytes + 4096 + (5 << 30));
        assert_eq!(report.address_space, table.entries[2].flat_start + 4096);
        assert_eq!(table.entries[1].etag, "\"5\"");

        // The inodes point where the table says: walk the image with the crate's walker.
        struct Bytes<'a>(&'a [u8]);
        impl crate::erofs::MetaReader for Bytes<'_> {
            fn prefetch(&mut self, _: &[std::ops::Range<u64>]) -> Result<(), crate::erofs::WalkError> {
                Ok(())
            }
            fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), crate::erofs::WalkError> {
                let o = offset as usize;
                match self.0.get(o..o + buf.len()) {
                    Some(b) => buf.copy_from_slice(b),
                    None => buf.fill(0),
                }
                Ok(())
            }
        }
        let map = crate::erofs::walk(&mut Bytes(&bytes), report.address_space, &crate::erofs::WalkLimits::default()).unwrap();
        let want: Vec<std::ops::Range<u64>> = {
            let mut v: Vec<std::ops::Range<u64>> = table.entries.iter().map(|e| e.flat_start..e.flat_end()).collect();
            // Adjacent objects merge into one extent.
            v = crate::ranges::normalize(v);
            v
        };
        assert_eq!(map.data_extents, want);
        assert_eq!(map.required, vec![0..report.image_bytes], "everything of the image file is metadata");
        assert_eq!(map.regular_files, 4);
    }

    #[test]
    fn the_same_listing_gives_the_same_bytes() {
        let listing = vec![obj("x", 1), obj("y/z", 2)];
        let planned = plan_tree("", &listing);
        let write = || {
            let mut f = tempfile::tempfile().unwrap();
            write_bucket_image(&mut f, &header(), &listing, &planned, &BuildOptions { uuid: None }).unwrap();
            use std::io::Read;
            let mut b = Vec::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut b).unwrap();
            b
        };
        assert_eq!(write(), write());
    }

    #[test]
    fn ten_thousand_objects_make_one_small_image() {
        let listing: Vec<ListedObject> = (0..10_000).map(|i| obj(&format!("d{:02}/sub {}/o{i:05} ü%.bin", i % 100, i % 7), 1 + i as u64 * 3)).collect();
        let planned = plan_tree("", &listing);
        assert!(planned.skipped.is_empty());
        let mut f = tempfile::tempfile().unwrap();
        let report = write_bucket_image(&mut f, &header(), &listing, &planned, &BuildOptions { uuid: None }).unwrap();
        assert_eq!((report.files, report.objects), (10_000, 10_000));
        assert_eq!(report.directories, 1 + 100 + 700);
        // Metadata and table stay small (a few hundred bytes an object).
        assert!(report.image_bytes < 10_000 * 400, "{report:?}");
        let mut bytes = Vec::new();
        use std::io::Read;
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut bytes).unwrap();
        let (_, _, table) = read::tests::locate_bytes(&bytes).unwrap();
        let table = table.unwrap();
        assert_eq!(table.entries.len(), 10_000);
        let keys: Vec<&str> = listing.iter().map(|o| o.key.as_str()).collect();
        let got: Vec<&str> = table.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got, keys, "every object recorded once, in the listing's order");
    }

    #[test]
    fn an_object_without_etag_is_refused() {
        let mut listing = vec![obj("x", 1)];
        listing[0].etag = None;
        let planned = plan_tree("", &listing);
        let mut f = tempfile::tempfile().unwrap();
        let e = write_bucket_image(&mut f, &header(), &listing, &planned, &BuildOptions { uuid: None }).unwrap_err();
        assert!(e.to_string().contains("no ETag"), "{e}");
    }
}
