//! The record a bucket image carries: which object backs which region of the flat address space.
//! Pure: encoding, bounded decoding and validation, unit-tested.
//!
//! ```text
//! image file:  [EROFS metadata (sb.blocks blocks) | object table | zero pad to a block]
//! flat space:  [image file][object 0][object 1]...   each object at a block-aligned address
//! ```
//!
//! The root directory carries the xattr [`XATTR_NAME`] (`trusted.erofs-fanotify.bucket`), a
//! fixed 64-byte [`Locator`]: where the table is in the image file, its length and its SHA-256.
//! The table is a small header (magic, version, a JSON [`BucketHeader`] naming the bucket, prefix,
//! endpoints, region, URL style and signature — never credentials) and one entry per object with
//! data: flat start (bytes), size, key, ETag. Each object's inode is a flat-plain file whose data
//! starts at that flat address (beyond the EROFS image's own end), so the kernel reads object i's
//! bytes at `flat_start_i + offset` of the cache file, and the agent maps that region to a ranged
//! GET of the key with `If-Match: ETag`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::remote::s3::{SigVersion, UrlStyle};

/// The root directory's xattr holding the [`Locator`].
pub const XATTR_NAME: &[u8] = b"trusted.erofs-fanotify.bucket";
/// The same name as EROFS stores it: prefix index 4 (`trusted.`) and the rest.
pub const XATTR_INDEX: u8 = 4;
pub const XATTR_SUFFIX: &[u8] = b"erofs-fanotify.bucket";

pub const LOCATOR_LEN: usize = 64;
const LOCATOR_MAGIC: &[u8; 8] = b"EFBUCKET";
const TABLE_MAGIC: &[u8; 8] = b"EFBTABLE";
pub const VERSION: u32 = 1;

/// Objects are placed on 4 KiB blocks (the image's block size).
pub const BLOCK: u64 = 4096;
/// Flat-plain inodes carry a 32-bit start block (only `blocks_lo` counts on Linux 6.18): the flat
/// space ends at 2^32 blocks (16 TiB).
pub const MAX_FLAT_END: u64 = (u32::MAX as u64) * BLOCK;
/// Objects one image may reference (the agent holds a segment for each).
pub const MAX_OBJECTS: usize = 1_000_000;
pub const MAX_HEADER_LEN: usize = 64 << 10;
pub const MAX_KEY_LEN: usize = crate::remote::s3::location::MAX_KEY_LEN;
pub const MAX_ETAG_LEN: usize = 256;
/// 1,000,000 entries of the longest key and ETag stay below this.
pub const MAX_TABLE_LEN: u64 = 1400 << 20;
const TABLE_FIXED: usize = 8 + 4 + 4 + 8;
const ENTRY_FIXED: usize = 8 + 8 + 2 + 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(pub String);

fn err(what: impl Into<String>) -> RecordError {
    RecordError(what.into())
}

/// Where the table is: the value of [`XATTR_NAME`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Byte offset of the table in the image file (block-aligned, after the EROFS blocks).
    pub table_offset: u64,
    pub table_len: u64,
    pub table_sha256: [u8; 32],
}

impl Locator {
    /// A locator of the final size (the writer's first pass lays out the metadata with it).
    pub fn placeholder() -> Locator {
        Locator { table_offset: 0, table_len: 0, table_sha256: [0; 32] }
    }

    pub fn encode(&self) -> [u8; LOCATOR_LEN] {
        let mut out = [0u8; LOCATOR_LEN];
        out[..8].copy_from_slice(LOCATOR_MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.table_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.table_len.to_le_bytes());
        out[32..64].copy_from_slice(&self.table_sha256);
        out
    }

    pub fn decode(value: &[u8]) -> Result<Locator, RecordError> {
        if value.len() != LOCATOR_LEN || &value[..8] != LOCATOR_MAGIC {
            return Err(err("its bucket record is not one this version writes"));
        }
        let version = u32::from_le_bytes(value[8..12].try_into().map_err(|_| err("short record"))?);
        if version != VERSION {
            return Err(err(format!("its bucket record has version {version} (this version reads {VERSION})")));
        }
        let u64_at = |o: usize| value[o..o + 8].try_into().map(u64::from_le_bytes).map_err(|_| err("short record"));
        let loc = Locator {
            table_offset: u64_at(16)?,
            table_len: u64_at(24)?,
            table_sha256: value[32..64].try_into().map_err(|_| err("short record"))?,
        };
        if !loc.table_offset.is_multiple_of(BLOCK) || loc.table_len < TABLE_FIXED as u64 || loc.table_len > MAX_TABLE_LEN {
            return Err(err(format!("its object table at {} ({} bytes) is misplaced", loc.table_offset, loc.table_len)));
        }
        loc.table_offset.checked_add(loc.table_len).ok_or_else(|| err("its object table ends past 2^64"))?;
        Ok(loc)
    }

    /// The table's bytes in the image file.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.table_offset..self.table_offset.saturating_add(self.table_len)
    }

    /// Checks fetched table bytes against the recorded hash.
    pub fn check(&self, table: &[u8]) -> Result<(), RecordError> {
        if table.len() as u64 != self.table_len || Sha256::digest(table).as_slice() != self.table_sha256 {
            return Err(err("its object table does not match the hash its record gives"));
        }
        Ok(())
    }
}

/// Where the objects are, credential-free.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketHeader {
    pub bucket: String,
    /// The listed prefix (empty, or ending in `/`): the image's root is this "directory".
    pub prefix: String,
    /// Base URLs used at build time, tried in order (mirrors after the first).
    pub endpoints: Vec<String>,
    pub region: String,
    #[serde(default)]
    pub url_style: Option<UrlStyle>,
    pub sig: SigVersion,
}

impl BucketHeader {
    fn validate(&self) -> Result<(), RecordError> {
        use crate::remote::s3::location::{check_bucket, parse_endpoint};
        check_bucket(&self.bucket).map_err(|e| err(format!("its bucket record names no bucket: {e}")))?;
        if self.endpoints.is_empty() || self.endpoints.len() > 16 {
            return Err(err("its bucket record has no (or too many) endpoints"));
        }
        for e in &self.endpoints {
            parse_endpoint(e).map_err(|why| err(format!("its bucket record has a bad endpoint {e:?}: {why}")))?;
        }
        if self.region.is_empty() || self.region.len() > 64 || !self.region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(err(format!("its bucket record has a bad region {:?}", self.region)));
        }
        if self.prefix.len() > MAX_KEY_LEN || !(self.prefix.is_empty() || self.prefix.ends_with('/')) {
            return Err(err("its bucket record has a bad prefix"));
        }
        Ok(())
    }

    /// `s3://BUCKET/PREFIX`
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// One object with data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// First byte of the object in the flat address space (block-aligned).
    pub flat_start: u64,
    pub size: u64,
    pub key: String,
    /// As the listing gave it, quotes included.
    pub etag: String,
}

impl TableEntry {
    /// End of the object's last block.
    pub fn flat_end(&self) -> u64 {
        self.size.checked_next_multiple_of(BLOCK).map_or(u64::MAX, |len| self.flat_start.saturating_add(len))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub header: BucketHeader,
    /// Sorted by flat start, disjoint.
    pub entries: Vec<TableEntry>,
}

impl Table {
    /// The encoded length; it does not depend on the flat starts, so the objects can be placed
    /// after the table before it is encoded.
    pub fn encoded_len(&self) -> Result<u64, RecordError> {
        let header = serde_json::to_vec(&self.header).map_err(|e| err(e.to_string()))?;
        let entries: usize = self.entries.iter().map(|e| ENTRY_FIXED + e.key.len() + e.etag.len()).sum();
        Ok((TABLE_FIXED + header.len() + entries) as u64)
    }

    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let header = serde_json::to_vec(&self.header).map_err(|e| err(e.to_string()))?;
        if header.len() > MAX_HEADER_LEN {
            return Err(err("the bucket header is too long"));
        }
        if self.entries.len() > MAX_OBJECTS {
            return Err(err(format!("more than {MAX_OBJECTS} objects")));
        }
        let mut out = Vec::with_capacity(self.encoded_len()? as usize);
        out.extend_from_slice(TABLE_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for e in &self.entries {
            if e.key.len() > MAX_KEY_LEN || e.etag.len() > MAX_ETAG_LEN {
                return Err(err(format!("object {:?}: key or ETag too long", e.key)));
            }
            out.extend_from_slice(&e.flat_start.to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&(e.key.len() as u16).to_le_bytes());
            out.extend_from_slice(&(e.etag.len() as u16).to_le_bytes());
            out.extend_from_slice(e.key.as_bytes());
            out.extend_from_slice(e.etag.as_bytes());
        }
        Ok(out)
    }

    /// Decodes untrusted table bytes (bounded: no allocation from an unchecked length).
    pub fn decode(bytes: &[u8]) -> Result<Table, RecordError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(8)? != TABLE_MAGIC {
            return Err(err("its object table has no table magic"));
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(err(format!("its object table has version {version}")));
        }
        let header_len = r.u32()? as usize;
        let count = r.u64()?;
        if header_len > MAX_HEADER_LEN {
            return Err(err("its object table's header is too long"));
        }
        // Each entry takes at least ENTRY_FIXED bytes: the count is bounded by what is there.
        if count > MAX_OBJECTS as u64 || count > (bytes.len() / ENTRY_FIXED) as u64 {
            return Err(err(format!("its object table claims {count} objects")));
        }
        let header: BucketHeader =
            serde_json::from_slice(r.take(header_len)?).map_err(|e| err(format!("its object table's header: {e}")))?;
        header.validate()?;
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let flat_start = r.u64()?;
            let size = r.u64()?;
            let key_len = r.u16()? as usize;
            let etag_len = r.u16()? as usize;
            if key_len == 0 || key_len > MAX_KEY_LEN || etag_len == 0 || etag_len > MAX_ETAG_LEN {
                return Err(err("its object table has an entry with a bad key or ETag length"));
            }
            let key = String::from_utf8(r.take(key_len)?.to_vec()).map_err(|_| err("its object table has a key that is not UTF-8"))?;
            let etag = String::from_utf8(r.take(etag_len)?.to_vec()).map_err(|_| err("its object table has an ETag that is not UTF-8"))?;
            entries.push(TableEntry { flat_start, size, key, etag });
        }
        if r.pos != bytes.len() {
            return Err(err("its object table has trailing bytes"));
        }
        Ok(Table { header, entries })
    }

    /// Checks the placements: every object non-empty, block-aligned, at or after `objects_from`,
    /// sorted, disjoint (each in whole blocks), inside the 32-bit block space; keys valid and
    /// distinct.
    pub fn validate(&self, objects_from: u64) -> Result<(), RecordError> {
        let mut next = objects_from;
        let mut keys = std::collections::HashSet::with_capacity(self.entries.len());
        for e in &self.entries {
            let shown = || format!("object {:?} at {}", e.key, e.flat_start);
            if e.size == 0 {
                return Err(err(format!("its object table lists an empty object ({})", shown())));
            }
            if !e.flat_start.is_multiple_of(BLOCK) || e.flat_start < next {
                return Err(err(format!("its object table places {} where it overlaps or is unaligned", shown())));
            }
            match e.size.checked_next_multiple_of(BLOCK).and_then(|len| e.flat_start.checked_add(len)) {
                Some(end) if end <= MAX_FLAT_END => next = end,
                _ => return Err(err(format!("its object table places {} past 2^32 blocks", shown()))),
            }
            crate::remote::s3::location::check_key(&e.key).map_err(|why| err(format!("{}: {why}", shown())))?;
            if !keys.insert(e.key.as_str()) {
                return Err(err(format!("its object table lists {:?} twice", e.key)));
            }
        }
        Ok(())
    }

    /// End of the flat address space: the end of the last object's last block (or `floor`).
    pub fn space_end(&self, floor: u64) -> u64 {
        self.entries.last().map_or(floor, |e| e.flat_end().max(floor))
    }
}

/// Places objects of `sizes` one after the other from `first` (rounded up to a block), each on its
/// own blocks: their flat starts, or an error when they do not fit in 2^32 blocks.
pub fn place(sizes: &[u64], first: u64) -> Result<Vec<u64>, RecordError> {
    let mut at = first.checked_next_multiple_of(BLOCK).ok_or_else(|| err("the objects start past 2^64"))?;
    let mut out = Vec::with_capacity(sizes.len());
    for &size in sizes {
        out.push(at);
        at = size
            .checked_next_multiple_of(BLOCK)
            .and_then(|len| at.checked_add(len))
            .filter(|&end| end <= MAX_FLAT_END)
            .ok_or_else(|| err("the objects need more than 2^32 blocks (16 TiB) of address space; build images of smaller prefixes"))?;
    }
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| err("its object table is truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| err("truncated"))?))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| err("truncated"))?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| err("truncated"))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BucketHeader {
        BucketHeader {
            bucket: "bkt".into(),
            prefix: "data/".into(),
            endpoints: vec!["http://127.0.0.1:9000".into(), "http://127.0.0.1:9001".into()],
            region: "us-east-1".into(),
            url_style: Some(UrlStyle::Path),
            sig: SigVersion::V4,
        }
    }

    fn table(sizes: &[u64], first: u64) -> Table {
        let starts = place(sizes, first).unwrap();
        Table {
            header: header(),
            entries: sizes
                .iter()
                .zip(starts)
                .enumerate()
                .map(|(i, (&size, flat_start))| TableEntry { flat_start, size, key: format!("data/ü {i}%"), etag: format!("\"e{i}\"") })
                .collect(),
        }
    }

    #[test]
    fn tables_round_trip_and_their_length_does_not_depend_on_placement() {
        let t = table(&[1, 4096, 4097, 10 << 30], 8192);
        let bytes = t.encode().unwrap();
        assert_eq!(bytes.len() as u64, t.encoded_len().unwrap());
        let back = Table::decode(&bytes).unwrap();
        assert_eq!(back, t);
        back.validate(8192).unwrap();
        let moved = table(&[1, 4096, 4097, 10 << 30], 1 << 40);
        assert_eq!(moved.encoded_len().unwrap(), t.encoded_len().unwrap());
        // Placement: each object on its own blocks, one after the other.
        let starts: Vec<u64> = t.entries.iter().map(|e| e.flat_start).collect();
        assert_eq!(starts, vec![8192, 12288, 16384, 24576]);
        assert_eq!(t.space_end(0), 24576 + (10 << 30));
    }

    #[test]
    fn objects_past_4_gib_get_exact_addresses() {
        // A 5 GiB object, then a small one: the second starts right after the first's last block.
        let sizes = [5u64 << 30 | 123, 10];
        let starts = place(&sizes, 4096).unwrap();
        assert_eq!(starts[1], 4096 + ((5u64 << 30) + 4096));
        assert_eq!(starts[1] % BLOCK, 0);
        let t = table(&sizes, 4096);
        t.validate(4096).unwrap();
        assert!(t.entries[1].flat_start / BLOCK > u64::from(u16::MAX), "block numbers above 16 bits");
        // The 32-bit block space is the limit.
        assert!(place(&[MAX_FLAT_END], 4096).is_err());
        assert!(place(&[MAX_FLAT_END - 4096], 4096).is_ok());
        assert!(place(&[MAX_FLAT_END - 4096, 1], 4096).is_err());
    }

    #[test]
    fn locators_round_trip_and_check_the_table() {
        let t = table(&[100], 8192).encode().unwrap();
        let loc = Locator { table_offset: 4096, table_len: t.len() as u64, table_sha256: Sha256::digest(&t).into() };
        let enc = loc.encode();
        assert_eq!(Locator::decode(&enc).unwrap(), loc);
        loc.check(&t).unwrap();
        let mut bad = t.clone();
        bad[30] ^= 1;
        assert!(loc.check(&bad).is_err());
        assert!(loc.check(&t[1..]).is_err());
        assert_eq!(Locator::placeholder().encode().len(), LOCATOR_LEN);
        for broken in [&enc[..63], &[0u8; 64][..]] {
            assert!(Locator::decode(broken).is_err());
        }
        let mut v2 = enc;
        v2[8] = 2;
        assert!(Locator::decode(&v2).unwrap_err().0.contains("version 2"));
        let mut unaligned = enc;
        unaligned[16] = 1;
        assert!(Locator::decode(&unaligned).is_err());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let good = table(&[100, 200], 8192);
        let bytes = good.encode().unwrap();
        // Truncated anywhere, or with a byte too many.
        for cut in [0, 7, 20, 30, bytes.len() - 1] {
            assert!(Table::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Table::decode(&long).is_err());
        // A count far beyond the bytes there.
        let mut many = bytes.clone();
        many[16..24].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(Table::decode(&many).unwrap_err().0.contains("claims"));
        // A header that is no JSON, or names no bucket.
        let mut h = bytes.clone();
        h[24] = b'x';
        assert!(Table::decode(&h).is_err());
        let mut t = good.clone();
        t.header.bucket = "no".into();
        assert!(Table::decode(&t.encode().unwrap()).is_err());
        let mut t = good.clone();
        t.header.endpoints = vec!["ftp://x".into()];
        assert!(Table::decode(&t.encode().unwrap()).is_err());
        // Placements that overlap, go backwards, are unaligned, empty, before the objects' area,
        // or past 2^32 blocks; duplicate keys.
        type Case = Box<dyn Fn(&mut Table)>;
        let cases: Vec<Case> = vec![
            Box::new(|t| t.entries[1].flat_start = t.entries[0].flat_start),
            Box::new(|t| t.entries[1].flat_start = t.entries[0].flat_start - 4096),
            Box::new(|t| t.entries[0].flat_start += 1),
            Box::new(|t| t.entries[0].size = 0),
            Box::new(|t| t.entries[0].flat_start = 4096),
            Box::new(|t| t.entries[1].flat_start = MAX_FLAT_END),
            Box::new(|t| t.entries[1].size = u64::MAX - 10),
            Box::new(|t| t.entries[1].key = t.entries[0].key.clone()),
            Box::new(|t| t.entries[1].key = String::new()),
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut t = good.clone();
            case(&mut t);
            let decoded = t.encode().ok().and_then(|b| Table::decode(&b).ok());
            if let Some(d) = decoded {
                assert!(d.validate(8192).is_err(), "case {i} passed validation");
            }
        }
    }
}
