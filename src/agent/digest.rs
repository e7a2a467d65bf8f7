//! The blob's sha256, computed as contiguous data lands rather than in a
//! second pass once the cache file is complete: after each write, whatever is
//! present from the hashed position on is read back (from the page cache:
//! it was just written) and hashed, in order. Verification then hashes only
//! what is left (nothing, when data landed in order, as a full prefetch
//! does) and compares.
//!
//! The hash covers the bytes as they are in the cache file, so it proves the
//! same as a second pass would. Only one thread hashes at a time; a writer
//! that finds the hasher busy leaves it to the next write or to `finish`.

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::cache::{CacheFile, CacheFileError};

/// Bytes read and hashed per step.
const CHUNK: u64 = 1 << 20;

#[derive(Default)]
pub struct InOrderDigest {
    state: Mutex<Hashed>,
}

#[derive(Default)]
struct Hashed {
    hasher: Sha256,
    /// Bytes `0..pos` are in `hasher`.
    pos: u64,
}

impl InOrderDigest {
    /// Hashes what is present from the current position on, without waiting
    /// for another thread that is doing so.
    pub fn advance(&self, cache: &CacheFile) {
        let Some(mut st) = self.state.try_lock() else { return };
        if let Err(e) = hash_present(&mut st, cache) {
            // Not fatal: `finish` reads (and reports) again.
            tracing::debug!(error = %e, "in-order digest: cannot read the cache file");
        }
    }

    /// Bytes hashed so far.
    pub fn position(&self) -> u64 {
        self.state.lock().pos
    }

    /// Hashes the rest of the (complete) cache file and returns
    /// `sha256:<hex>`; starts over for a later call.
    pub fn finish(&self, cache: &CacheFile) -> Result<String, CacheFileError> {
        let mut st = self.state.lock();
        let size = cache.blob_size();
        let mut buf = vec![0u8; CHUNK as usize];
        while st.pos < size {
            let n = (size - st.pos).min(CHUNK) as usize;
            cache.read_at(st.pos, &mut buf[..n])?;
            st.hasher.update(&buf[..n]);
            st.pos += n as u64;
        }
        let done = std::mem::take(&mut *st);
        Ok(format!("sha256:{}", hex::encode(done.hasher.finalize())))
    }

    /// Forgets what was hashed (presence was reset).
    pub fn reset(&self) {
        *self.state.lock() = Hashed::default();
    }
}

fn hash_present(st: &mut Hashed, cache: &CacheFile) -> Result<(), CacheFileError> {
    let size = cache.blob_size();
    let mut buf = Vec::new();
    while st.pos < size {
        let end = (st.pos + CHUNK).min(size);
        if !cache.contains(st.pos..end) {
            break;
        }
        buf.resize((end - st.pos) as usize, 0);
        cache.read_at(st.pos, &mut buf)?;
        st.hasher.update(&buf);
        st.pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_as_data_lands_gives_the_digest_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * CHUNK + 1234;
        let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let path = dir.path().join("blob");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let cache = CacheFile::open(&path, size).unwrap();
        let want = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let d = InOrderDigest::default();
        let put = |r: std::ops::Range<u64>| cache.write_range(r.start, &data[r.start as usize..r.end as usize]).unwrap();
        // Out of order: nothing hashed until the start is there.
        put(2 * CHUNK..3 * CHUNK);
        d.advance(&cache);
        assert_eq!(d.position(), 0);
        put(0..2 * CHUNK);
        d.advance(&cache);
        assert_eq!(d.position(), 3 * CHUNK, "the contiguous prefix, in one go");
        put(3 * CHUNK..size);
        d.advance(&cache);
        assert_eq!(d.position(), size);
        assert_eq!(d.finish(&cache).unwrap(), want);
        // Started over: a finish from nothing reads the whole file.
        assert_eq!(d.position(), 0);
        assert_eq!(d.finish(&cache).unwrap(), want);
    }
}
