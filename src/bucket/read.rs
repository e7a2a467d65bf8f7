//! Finding the record of a bucket image: the superblock, the root inode's xattrs (inline, or
//! shared), the locator, the table. Reads go through a [`RangeSource`] (a local file, an S3
//! object), the first 4 KiB served from the probe the source was opened with; an image written by
//! `build --s3` needs one more request: the table. The image is untrusted: every offset is checked
//! against its size, and the table against the locator's hash.

use std::ops::Range;

use bytes::Bytes;

use crate::erofs::format::{xattr_entry_size, InodeHeader, Superblock};
use crate::remote::RangeSource;

use super::record::{self, Locator, RecordError, Table};

fn err(what: impl Into<String>) -> RecordError {
    RecordError(what.into())
}

/// An image's bytes: its source and the first bytes already read.
pub struct ImageBytes<'a> {
    pub source: &'a dyn RangeSource,
    pub probe: &'a [u8],
    /// Read nothing but the probe (a read past it is an error).
    pub probe_only: bool,
}

impl ImageBytes<'_> {
    async fn read(&self, range: Range<u64>) -> Result<Bytes, RecordError> {
        let size = self.source.size();
        if range.start > range.end || range.end > size {
            return Err(err(format!("it points at bytes {range:?}, past its end ({size} bytes)")));
        }
        if range.end <= self.probe.len() as u64 {
            return Ok(Bytes::copy_from_slice(&self.probe[range.start as usize..range.end as usize]));
        }
        if self.probe_only {
            return Err(err(format!("bytes {range:?} are past its first block")));
        }
        self.source.fetch(range.clone()).await.map_err(|e| err(format!("cannot read bytes {range:?}: {e}")))
    }
}

/// Most bytes of one inode's inline xattrs (`xattr_icount` is 16 bits).
const MAX_IBODY: u64 = 12 + 4 * (u16::MAX as u64);
/// Shared xattrs of the root looked at, at most.
const MAX_SHARED: usize = 1024;

/// The superblock and, for a bucket image, its locator (`None`: an EROFS image without one).
pub async fn locate(img: &ImageBytes<'_>) -> Result<(Superblock, Option<Locator>), RecordError> {
    let first = img.read(0..4096.min(img.source.size())).await?;
    let sb = crate::erofs::probe_superblock(&first).map_err(|e| err(e.to_string()))?;
    let at = sb.inode_offset(sb.root_nid).ok_or_else(|| err("its root inode is out of range"))?;
    let head = img.read(at..at.saturating_add(64).min(img.source.size())).await?;
    let root = InodeHeader::parse(sb.root_nid, at, &head).map_err(|e| err(e.to_string()))?;
    if root.xattr_icount == 0 {
        return Ok((sb, None));
    }
    let start = at + root.inode_size();
    let len = root.xattr_size().min(MAX_IBODY);
    let end = start.checked_add(len).ok_or_else(|| err("its root xattrs are out of range"))?;
    let ibody = img.read(start..end).await?;
    let scan = scan_ibody(&ibody)?;
    let value = match scan.found {
        Some(v) => Some(v),
        None => {
            let mut found = None;
            for id in scan.shared.iter().take(MAX_SHARED) {
                let off = sb.shared_xattr_offset(*id).ok_or_else(|| err("a shared xattr is out of range"))?;
                let h = img.read(off..off.saturating_add(4)).await?;
                let size = xattr_entry_size(&h).ok_or_else(|| err("a truncated shared xattr"))?;
                let entry = img.read(off..off.saturating_add(size)).await?;
                if let Some(v) = match_entry(&entry)? {
                    found = Some(v);
                    break;
                }
            }
            found
        }
    };
    match value {
        Some(v) => Ok((sb, Some(Locator::decode(&v)?))),
        None => Ok((sb, None)),
    }
}

/// Reads and checks the table; it must lie after the EROFS blocks and inside the image.
pub async fn read_table(img: &ImageBytes<'_>, sb: &Superblock, loc: &Locator) -> Result<Table, RecordError> {
    if loc.table_offset < sb.blocks.saturating_mul(sb.block_size()) {
        return Err(err("its object table overlaps the EROFS metadata"));
    }
    let bytes = img.read(loc.range()).await?;
    loc.check(&bytes)?;
    let table = Table::decode(&bytes)?;
    // Objects start after the image file's own bytes.
    table.validate(img.source.size().checked_next_multiple_of(record::BLOCK).unwrap_or(u64::MAX))?;
    Ok(table)
}

struct IbodyScan {
    found: Option<Vec<u8>>,
    shared: Vec<u32>,
}

/// The inline xattr body: 12-byte header (`h_shared_count` at byte 4), shared ids, entries.
fn scan_ibody(b: &[u8]) -> Result<IbodyScan, RecordError> {
    if b.len() < 12 {
        return Err(err("a truncated xattr header"));
    }
    let shared_count = usize::from(b[4]);
    let mut pos = 12;
    let mut shared = Vec::with_capacity(shared_count);
    for _ in 0..shared_count {
        let id = b.get(pos..pos + 4).ok_or_else(|| err("truncated shared xattr ids"))?;
        shared.push(u32::from_le_bytes([id[0], id[1], id[2], id[3]]));
        pos += 4;
    }
    while pos + 4 <= b.len() {
        let size = xattr_entry_size(&b[pos..]).ok_or_else(|| err("a truncated xattr"))? as usize;
        let entry = b.get(pos..pos + size).ok_or_else(|| err("an xattr runs past its inode"))?;
        if let Some(v) = match_entry(entry)? {
            return Ok(IbodyScan { found: Some(v), shared });
        }
        pos += size;
    }
    Ok(IbodyScan { found: None, shared })
}

/// The value of `entry` (header, name, value) when it is ours.
fn match_entry(entry: &[u8]) -> Result<Option<Vec<u8>>, RecordError> {
    let (name_len, index) = match entry {
        [n, i, ..] => (usize::from(*n), *i),
        _ => return Err(err("a truncated xattr")),
    };
    let value_len = usize::from(u16::from_le_bytes([entry.get(2).copied().unwrap_or(0), entry.get(3).copied().unwrap_or(0)]));
    let name = entry.get(4..4 + name_len).ok_or_else(|| err("a truncated xattr name"))?;
    if index != record::XATTR_INDEX || name != record::XATTR_SUFFIX {
        return Ok(None);
    }
    let value = entry.get(4 + name_len..4 + name_len + value_len).ok_or_else(|| err("a truncated xattr value"))?;
    Ok(Some(value.to_vec()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::remote::FetchError;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// An image in memory that counts its fetches.
    pub(crate) struct Mem {
        pub bytes: Vec<u8>,
        pub fetches: AtomicU64,
    }

    impl RangeSource for Mem {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(Bytes::copy_from_slice(&self.bytes[range.start as usize..range.end as usize])) })
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    pub(crate) fn locate_bytes(bytes: &[u8]) -> Result<(Superblock, Option<Locator>, Option<Table>), RecordError> {
        let mem = Mem { bytes: bytes.to_vec(), fetches: AtomicU64::new(0) };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let img = ImageBytes { source: &mem, probe: &bytes[..4096.min(bytes.len())], probe_only: false };
            let (sb, loc) = locate(&img).await?;
            let table = match &loc {
                Some(l) => Some(read_table(&img, &sb, l).await?),
                None => None,
            };
            Ok((sb, loc, table))
        })
    }

    #[test]
    fn plain_images_have_no_record_and_entries_are_matched_by_index_and_name() {
        use crate::erofs::writer::{self, Inode, Metadata, NoFiles, Tree, WriterOptions};
        let mut t = Tree::new(Metadata::with_permissions(0o755));
        t.insert_path(b"f", Inode::bytes(Metadata::with_permissions(0o644), b"hello"), Metadata::with_permissions(0o755)).unwrap();
        let root = t.root();
        // `user.erofs-fanotify.bucket` is not ours.
        t.get_mut(root).xattrs.insert(b"user.erofs-fanotify.bucket".to_vec(), vec![1; 64]);
        let mut out = std::io::Cursor::new(Vec::new());
        writer::plan(&t, &WriterOptions::default(), &NoFiles).unwrap().write(&mut out, &NoFiles).unwrap();
        let (_, loc, _) = locate_bytes(out.get_ref()).unwrap();
        assert!(loc.is_none());
        // A trusted xattr of the right name but a bad value is an error, not "no record".
        t.get_mut(root).xattrs.insert(record::XATTR_NAME.to_vec(), vec![1; 64]);
        let mut out = std::io::Cursor::new(Vec::new());
        writer::plan(&t, &WriterOptions::default(), &NoFiles).unwrap().write(&mut out, &NoFiles).unwrap();
        assert!(locate_bytes(out.get_ref()).is_err());
        assert!(locate_bytes(&[0u8; 8192]).is_err(), "not EROFS");
    }

    #[test]
    fn a_shared_record_is_found_too() {
        use crate::erofs::writer::{self, Inode, Metadata, NoFiles, Tree, WriterOptions};
        use sha2::Digest;
        // The root and a file carry the same value: the writer shares it.
        let table = Table {
            header: record::BucketHeader {
                bucket: "bkt".into(),
                prefix: String::new(),
                endpoints: vec!["http://127.0.0.1:1".into()],
                region: "us-east-1".into(),
                url_style: None,
                sig: crate::remote::s3::SigVersion::V4,
            },
            entries: vec![],
        };
        let tbytes = table.encode().unwrap();
        let loc = Locator { table_offset: 1 << 20, table_len: tbytes.len() as u64, table_sha256: sha2::Sha256::digest(&tbytes).into() };
        let mut t = Tree::new(Metadata::with_permissions(0o755));
        let f = t.insert_path(b"f", Inode::bytes(Metadata::with_permissions(0o644), b"x"), Metadata::with_permissions(0o755)).unwrap();
        let root = t.root();
        t.get_mut(root).xattrs.insert(record::XATTR_NAME.to_vec(), loc.encode().to_vec());
        t.get_mut(f).xattrs.insert(record::XATTR_NAME.to_vec(), loc.encode().to_vec());
        let mut out = std::io::Cursor::new(Vec::new());
        let s = writer::plan(&t, &WriterOptions::default(), &NoFiles).unwrap().write(&mut out, &NoFiles).unwrap();
        assert_eq!(s.shared_xattrs, 1);
        let mut bytes = out.into_inner();
        bytes.resize(1 << 20, 0);
        bytes.extend_from_slice(&tbytes);
        let (_, got, table_back) = locate_bytes(&bytes).unwrap();
        assert_eq!(got, Some(loc));
        assert_eq!(table_back, Some(table));
    }
}
