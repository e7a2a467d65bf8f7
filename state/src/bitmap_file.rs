//! The persisted presence bitmap of a cache file (`<entry>/bitmap`).
//!
//! A set bit says "this 4 KiB block of the cache file holds the blob's bytes". Trusting a wrong
//! bit hands zeros to a reader, so a bitmap is used only if it is provably the one written
//! for this very cache file: the header names the blob size, the digest, the cache file's inode
//! and the entry's generation (new each time the cache file is created), and a SHA-256 over
//! everything before it catches torn and corrupted writes. Anything else is
//! [`LoadedBitmap::Discarded`] and the blocks are fetched again.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic      8   b"EROFSBM\0"
//! version    u32 1
//! block_size u32 4096
//! blob_size  u64
//! generation u64
//! inode      u64
//! digest     u16 length (0xFFFF = none) + bytes
//! payload    u64 length + roaring bitmap (portable format), bit n = block n
//! sha256     32  over all bytes above
//! ```
//!
//! **Durability contract:** a bit may only be saved once the block's data is on disk. The
//! caller takes the bitmap snapshot, then `fdatasync`s the cache file, then calls
//! [`save_bitmap`]; the file is written to a temporary name, fsynced, renamed over the old one
//! and the directory fsynced, so a crash leaves the old or the new bitmap, never a mix.

use std::path::Path;

use roaring::RoaringBitmap;
use sha2::{Digest, Sha256};

use crate::fsat::Dir;
use crate::StateError;

/// The block size the bitmap counts in (one bit per 4 KiB of the blob).
pub const BITMAP_BLOCK_SIZE: u64 = 4096;

const MAGIC: &[u8; 8] = b"EROFSBM\0";
const VERSION: u32 = 1;
const NO_DIGEST: u16 = u16::MAX;
const MAX_DIGEST_LEN: usize = 1024;
const SHA_LEN: usize = 32;
/// Bytes of the fixed header fields (magic .. inode, then the digest length).
const FIXED_HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8 + 2;

/// What a bitmap must have been written for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapIdentity {
    pub blob_size: u64,
    pub digest: Option<String>,
    /// Inode number of the cache file (`blob`).
    pub inode: u64,
    /// The cache entry's generation (see `EntryMeta::generation`).
    pub generation: u64,
}

/// Result of [`load_bitmap`].
#[derive(Debug, Clone, PartialEq)]
pub enum LoadedBitmap {
    /// No bitmap file: nothing is known to be present.
    Missing,
    /// A bitmap written for this cache file, intact.
    Loaded(RoaringBitmap),
    /// A bitmap that cannot be trusted (the reason, for a log line); treat as empty.
    Discarded(String),
}

fn blocks_for(blob_size: u64) -> u64 {
    blob_size.div_ceil(BITMAP_BLOCK_SIZE)
}

/// Largest payload a bitmap of `blob_size` can need: `save_bitmap` optimizes, so every
/// container is at most 8 KiB plus its descriptor; add room for the header.
fn max_payload(blob_size: u64) -> u64 {
    let containers = blocks_for(blob_size).div_ceil(65536);
    64 + containers.saturating_mul(8192 + 16)
}

/// Persists `bitmap` for the cache file named by `identity`. See the module doc: the caller
/// must have `fdatasync`ed the cache file after taking the snapshot and before this call.
pub fn save_bitmap(
    path: &Path,
    bitmap: &RoaringBitmap,
    identity: &BitmapIdentity,
) -> Result<(), StateError> {
    let (dir, name) = parent_dir(path)?;
    save_bitmap_in(&dir, &name, bitmap, identity)
}

/// The directory of `path` (opened by path: the caller's choice) and the file name in it.
fn parent_dir(path: &Path) -> Result<(Dir, String), StateError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StateError::io("open", path, std::io::ErrorKind::InvalidInput.into()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = Dir::open_root(parent, false)?
        .ok_or_else(|| StateError::io("open directory", parent, std::io::ErrorKind::NotFound.into()))?;
    Ok((dir, name.to_string()))
}

pub(crate) fn save_bitmap_in(
    dir: &Dir,
    name: &str,
    bitmap: &RoaringBitmap,
    identity: &BitmapIdentity,
) -> Result<(), StateError> {
    let path = dir.join(name);
    let digest = identity.digest.as_deref().map(str::as_bytes);
    if digest.is_some_and(|d| d.len() > MAX_DIGEST_LEN) {
        return Err(StateError::Serialize {
            path,
            reason: "digest too long".into(),
        });
    }
    // Run containers make a mostly-complete bitmap a few bytes long.
    let mut compact = bitmap.clone();
    compact.optimize();
    let mut payload = Vec::with_capacity(compact.serialized_size());
    compact
        .serialize_into(&mut payload)
        .map_err(|e| StateError::Serialize {
            path: path.clone(),
            reason: e.to_string(),
        })?;

    let mut out = Vec::with_capacity(FIXED_HEADER + MAX_DIGEST_LEN + 8 + payload.len() + SHA_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(BITMAP_BLOCK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&identity.blob_size.to_le_bytes());
    out.extend_from_slice(&identity.generation.to_le_bytes());
    out.extend_from_slice(&identity.inode.to_le_bytes());
    match digest {
        Some(d) => {
            out.extend_from_slice(&(d.len() as u16).to_le_bytes());
            out.extend_from_slice(d);
        }
        None => out.extend_from_slice(&NO_DIGEST.to_le_bytes()),
    }
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    dir.write_atomic(name, &out, 0o600)
}

/// A little cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

/// Reads the bitmap at `path` and returns it only if it is intact and was written for the
/// cache file described by `expected`. I/O errors other than "not found" are errors; every
/// kind of bad content is `Discarded(reason)`.
pub fn load_bitmap(path: &Path, expected: &BitmapIdentity) -> Result<LoadedBitmap, StateError> {
    match parent_dir(path) {
        Ok((dir, name)) => load_bitmap_in(&dir, &name, expected),
        Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(LoadedBitmap::Missing),
        Err(e) => Err(e),
    }
}

pub(crate) fn load_bitmap_in(dir: &Dir, name: &str, expected: &BitmapIdentity) -> Result<LoadedBitmap, StateError> {
    let cap =
        (FIXED_HEADER + MAX_DIGEST_LEN + 8 + SHA_LEN) as u64 + max_payload(expected.blob_size);
    let bytes = match dir.read_capped(name, cap) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(LoadedBitmap::Missing),
        Err(StateError::CorruptRecord { reason, .. }) => {
            return Ok(LoadedBitmap::Discarded(reason))
        }
        Err(e) => return Err(e),
    };
    Ok(match parse(&bytes, expected) {
        Ok(bitmap) => LoadedBitmap::Loaded(bitmap),
        Err(reason) => LoadedBitmap::Discarded(reason),
    })
}

fn parse(bytes: &[u8], expected: &BitmapIdentity) -> Result<RoaringBitmap, String> {
    let Some(body_len) = bytes
        .len()
        .checked_sub(SHA_LEN)
        .filter(|&n| n >= FIXED_HEADER)
    else {
        return Err(format!("truncated ({} bytes)", bytes.len()));
    };
    let (body, sum) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch (torn or corrupted write)".into());
    }
    let mut r = Reader { buf: body };
    let short = || "truncated header".to_string();
    if r.take(8).ok_or_else(short)? != MAGIC {
        return Err("bad magic".into());
    }
    let version = r.u32().ok_or_else(short)?;
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let block_size = r.u32().ok_or_else(short)?;
    if u64::from(block_size) != BITMAP_BLOCK_SIZE {
        return Err(format!(
            "block size {block_size}, expected {BITMAP_BLOCK_SIZE}"
        ));
    }
    let blob_size = r.u64().ok_or_else(short)?;
    let generation = r.u64().ok_or_else(short)?;
    let inode = r.u64().ok_or_else(short)?;
    let digest = match r.u16().ok_or_else(short)? {
        NO_DIGEST => None,
        n => {
            let raw = r.take(usize::from(n)).ok_or_else(short)?;
            Some(String::from_utf8(raw.to_vec()).map_err(|_| "digest is not UTF-8".to_string())?)
        }
    };
    if blob_size != expected.blob_size {
        return Err(format!(
            "written for blob size {blob_size}, expected {}",
            expected.blob_size
        ));
    }
    if digest != expected.digest {
        return Err(format!(
            "written for digest {digest:?}, expected {:?}",
            expected.digest
        ));
    }
    if inode != expected.inode {
        return Err(format!(
            "written for cache file inode {inode}, cache file is inode {}",
            expected.inode
        ));
    }
    if generation != expected.generation {
        return Err(format!(
            "written for generation {generation}, entry is generation {}",
            expected.generation
        ));
    }
    let payload_len = r.u64().ok_or_else(short)?;
    if payload_len != r.buf.len() as u64 {
        return Err(format!(
            "payload length {payload_len}, {} bytes follow",
            r.buf.len()
        ));
    }
    let mut payload = r.buf;
    let bitmap = RoaringBitmap::deserialize_from(&mut payload)
        .map_err(|e| format!("bad roaring payload: {e}"))?;
    if !payload.is_empty() {
        return Err(format!(
            "{} stray bytes after the roaring payload",
            payload.len()
        ));
    }
    if let Some(max) = bitmap.max() {
        if u64::from(max) >= blocks_for(blob_size) {
            return Err(format!(
                "block {max} is past the end of a {blob_size}-byte blob"
            ));
        }
    }
    Ok(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> BitmapIdentity {
        BitmapIdentity {
            blob_size: 10 * 65536 * 4096 + 123, // 11 containers, partial last block
            digest: Some(format!("sha256:{}", "c".repeat(64))),
            inode: 1234,
            generation: 0xfeed_beef,
        }
    }

    fn sample() -> RoaringBitmap {
        let mut b = RoaringBitmap::new();
        b.insert_range(0..100);
        b.insert_range(70_000..200_000);
        for i in (300_000..340_000).step_by(3) {
            b.insert(i); // a dense, irregular container: stays a bitmap container
        }
        b.insert(10 * 65536); // the partial last block
        b
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        assert_eq!(
            load_bitmap(&path, &identity()).unwrap(),
            LoadedBitmap::Missing
        );
        for bm in [RoaringBitmap::new(), sample()] {
            save_bitmap(&path, &bm, &identity()).unwrap();
            assert_eq!(
                load_bitmap(&path, &identity()).unwrap(),
                LoadedBitmap::Loaded(bm)
            );
        }
        let none = BitmapIdentity {
            digest: None,
            ..identity()
        };
        save_bitmap(&path, &sample(), &none).unwrap();
        assert_eq!(
            load_bitmap(&path, &none).unwrap(),
            LoadedBitmap::Loaded(sample())
        );
        // None and Some("") are different identities.
        let empty = BitmapIdentity {
            digest: Some(String::new()),
            ..identity()
        };
        assert!(matches!(
            load_bitmap(&path, &empty).unwrap(),
            LoadedBitmap::Discarded(_)
        ));
    }

    #[test]
    fn every_truncation_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        // Every length in memory (array, run and bitmap containers in the payload) ...
        let mut mixed = RoaringBitmap::new();
        mixed.insert_range(0..100);
        mixed.insert(5000);
        mixed.extend((70_000..71_000u32).step_by(3));
        mixed.extend((140_000..150_000u32).step_by(2));
        save_bitmap(&path, &mixed, &identity()).unwrap();
        let full = std::fs::read(&path).unwrap();
        assert_eq!(
            load_bitmap(&path, &identity()).unwrap(),
            LoadedBitmap::Loaded(mixed)
        );
        for len in 0..full.len() {
            assert!(
                parse(&full[..len], &identity()).is_err(),
                "truncation to {len} bytes accepted"
            );
        }
        // ... and a few through the file.
        for len in [0, 1, 8, 60, full.len() / 2, full.len() - 33, full.len() - 1] {
            std::fs::write(&path, &full[..len]).unwrap();
            match load_bitmap(&path, &identity()).unwrap() {
                LoadedBitmap::Discarded(_) => {}
                other => panic!("truncation to {len} bytes gave {other:?}"),
            }
        }
        let mut longer = full.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            load_bitmap(&path, &identity()).unwrap(),
            LoadedBitmap::Discarded(_)
        ));
    }

    #[test]
    fn every_single_bit_flip_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        let mut small = RoaringBitmap::new();
        small.insert_range(3..9);
        small.insert(4000);
        save_bitmap(&path, &small, &identity()).unwrap();
        let full = std::fs::read(&path).unwrap();
        for byte in 0..full.len() {
            for bit in 0..8 {
                let mut bad = full.clone();
                bad[byte] ^= 1 << bit;
                let reason = match parse(&bad, &identity()) {
                    Err(reason) => reason,
                    Ok(_) => panic!("flip of bit {bit} in byte {byte} accepted"),
                };
                assert!(!reason.is_empty());
            }
        }
    }

    #[test]
    fn mismatched_identity_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        save_bitmap(&path, &sample(), &identity()).unwrap();
        let id = identity();
        let cases = [
            BitmapIdentity {
                inode: id.inode + 1,
                ..id.clone()
            },
            BitmapIdentity {
                blob_size: id.blob_size + 1,
                ..id.clone()
            },
            BitmapIdentity {
                generation: id.generation ^ 1,
                ..id.clone()
            },
            BitmapIdentity {
                digest: Some(format!("sha256:{}", "d".repeat(64))),
                ..id.clone()
            },
            BitmapIdentity {
                digest: None,
                ..id.clone()
            },
        ];
        for wrong in cases {
            match load_bitmap(&path, &wrong).unwrap() {
                LoadedBitmap::Discarded(reason) => {
                    assert!(reason.contains("written for"), "{reason}")
                }
                other => panic!("{wrong:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn well_formed_but_hostile_content_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        // Bits past the end of the blob, with a valid checksum.
        let mut past = RoaringBitmap::new();
        past.insert(blocks_for(identity().blob_size) as u32);
        save_bitmap(&path, &past, &identity()).unwrap();
        assert!(
            matches!(load_bitmap(&path, &identity()).unwrap(), LoadedBitmap::Discarded(r) if r.contains("past the end"))
        );
        // A huge file is not read at all.
        let tiny = BitmapIdentity {
            blob_size: 4096,
            ..identity()
        };
        std::fs::write(&path, vec![0u8; 100_000]).unwrap();
        assert!(matches!(
            load_bitmap(&path, &tiny).unwrap(),
            LoadedBitmap::Discarded(_)
        ));
    }

    #[test]
    fn full_bitmap_of_a_large_blob_is_small_and_fits_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        let id = BitmapIdentity {
            blob_size: 1 << 40,
            ..identity()
        };
        let mut all = RoaringBitmap::new();
        all.insert_range(0..(1u32 << 28));
        save_bitmap(&path, &all, &id).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() < 64 * 1024);
        assert_eq!(load_bitmap(&path, &id).unwrap(), LoadedBitmap::Loaded(all));
        // The worst case for the cap: every other block of one container.
        let id = BitmapIdentity {
            blob_size: 65536 * 4096,
            ..identity()
        };
        let alternate: RoaringBitmap = (0..65536u32).step_by(2).collect();
        save_bitmap(&path, &alternate, &id).unwrap();
        assert_eq!(
            load_bitmap(&path, &id).unwrap(),
            LoadedBitmap::Loaded(alternate)
        );
    }
}
