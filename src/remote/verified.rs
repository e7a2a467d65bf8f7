//! Chunk-verified reads: every byte a source serves is checked against a
//! sha256 per fixed chunk of the blob (the index artifact's `chunkSha256`)
//! before anything is written to the cache or shown to a reader.
//!
//! Requests are widened to whole chunks ([`RangeSource::granule`] says so, so
//! the scheduler asks for and writes whole chunks), each chunk is hashed and
//! compared; a chunk that does not match is fetched once more (a source with
//! mirrors may answer from another one), then the fetch fails permanently:
//! the reader gets `EIO` and nothing wrong is marked present. Without this,
//! a server answering valid `206`s with wrong bytes is only caught by the
//! whole-blob digest at completion, after readers saw them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{check_ranges, FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

/// Smallest chunk accepted: a page (the cache's unit).
pub const MIN_CHUNK: u64 = 4096;

/// The expected sha256 of every `chunk_size` chunk of a blob (the last may be short).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkDigests {
    chunk_size: u64,
    size: u64,
    sha256: Vec<[u8; 32]>,
}

impl ChunkDigests {
    /// From the artifact's fields; untrusted: the chunk size must be a power of two of at least a
    /// page, and there must be exactly one 64-hex-digit digest per chunk of a `size`-byte blob.
    pub fn new(chunk_size: u64, hex_digests: &[String], size: u64) -> Result<ChunkDigests, String> {
        if !chunk_size.is_power_of_two() || chunk_size < MIN_CHUNK {
            return Err(format!("chunk size {chunk_size} is not a power of two of at least {MIN_CHUNK}"));
        }
        let want = size.div_ceil(chunk_size);
        if hex_digests.len() as u64 != want {
            return Err(format!("{} chunk digests for {want} chunks", hex_digests.len()));
        }
        let mut sha256 = Vec::with_capacity(hex_digests.len());
        for (i, h) in hex_digests.iter().enumerate() {
            let mut d = [0u8; 32];
            hex::decode_to_slice(h, &mut d).map_err(|_| format!("chunk digest {i} is not 64 hex digits"))?;
            sha256.push(d);
        }
        Ok(ChunkDigests { chunk_size, size, sha256 })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// `range` widened to whole chunks (the last ends at the blob's end).
    pub fn widen(&self, range: &Range<u64>) -> Range<u64> {
        let start = range.start - range.start % self.chunk_size;
        let end = range.end.checked_next_multiple_of(self.chunk_size).unwrap_or(u64::MAX).min(self.size);
        start..end.max(start)
    }

    /// Checks `bytes`, the blob from `start` (a chunk boundary) over whole chunks. Returns the
    /// first chunk index that does not match.
    pub fn check(&self, start: u64, bytes: &[u8]) -> Result<(), u64> {
        let first = start / self.chunk_size;
        if !start.is_multiple_of(self.chunk_size) {
            return Err(first);
        }
        let end = start.saturating_add(bytes.len() as u64);
        if end != self.size && !end.is_multiple_of(self.chunk_size) {
            return Err(end / self.chunk_size);
        }
        for (n, piece) in bytes.chunks(self.chunk_size as usize).enumerate() {
            let i = first + n as u64;
            let want = usize::try_from(i).ok().and_then(|i| self.sha256.get(i)).ok_or(i)?;
            if Sha256::digest(piece).as_slice() != want {
                return Err(i);
            }
        }
        Ok(())
    }
}

/// A source whose every answer is checked chunk by chunk (see the module doc).
pub struct VerifiedSource {
    inner: Arc<dyn RangeSource>,
    digests: ChunkDigests,
    /// Chunks that did not match (each attempt).
    pub mismatches: AtomicU64,
}

impl VerifiedSource {
    pub fn new(inner: Arc<dyn RangeSource>, digests: ChunkDigests) -> VerifiedSource {
        VerifiedSource { inner, digests, mismatches: AtomicU64::new(0) }
    }

    fn mismatch(&self, chunk: u64, attempt: u32) {
        self.mismatches.fetch_add(1, Ordering::Relaxed);
        let c = self.digests.chunk_size;
        tracing::warn!(source = %self.inner.describe(), chunk, start = chunk * c, attempt, "bytes do not match the index's chunk digest");
    }

    fn failed(&self, chunk: u64) -> FetchError {
        let c = self.digests.chunk_size;
        FetchError::Permanent(format!(
            "{}: bytes {}..{} do not match the index artifact's chunk digest (twice)",
            self.inner.describe(),
            chunk * c,
            ((chunk + 1) * c).min(self.digests.size)
        ))
    }

    /// Whole chunks `wide`, checked; fetched once more on a mismatch.
    async fn fetch_checked(&self, wide: Range<u64>) -> Result<Bytes, FetchError> {
        let mut bad = 0;
        for attempt in 1..=2 {
            let bytes = self.inner.fetch(wide.clone()).await?;
            if bytes.len() as u64 != wide.end - wide.start {
                return Err(FetchError::Permanent(format!("{} returned {} bytes for {wide:?}", self.inner.describe(), bytes.len())));
            }
            match self.digests.check(wide.start, &bytes) {
                Ok(()) => return Ok(bytes),
                Err(chunk) => {
                    self.mismatch(chunk, attempt);
                    bad = chunk;
                }
            }
        }
        Err(self.failed(bad))
    }

    async fn fetch_many_checked(&self, ranges: Vec<Range<u64>>) -> Result<Parts, FetchError> {
        check_ranges(&ranges, self.digests.size)?;
        // Whole chunks, touching ones joined: sorted and disjoint as the asked ranges are.
        let mut wide: Vec<Range<u64>> = Vec::new();
        for r in &ranges {
            let w = self.digests.widen(r);
            match wide.last_mut() {
                Some(last) if w.start <= last.end => last.end = last.end.max(w.end),
                _ => wide.push(w),
            }
        }
        let parts = self.inner.fetch_many(wide.clone()).await?;
        if parts.bytes.len() != wide.len() {
            return Err(FetchError::Permanent(format!("{} returned {} parts for {}", self.inner.describe(), parts.bytes.len(), wide.len())));
        }
        let mut requests = parts.requests;
        let mut got = Vec::with_capacity(wide.len());
        for (w, bytes) in wide.iter().zip(parts.bytes) {
            let ok = bytes.len() as u64 == w.end - w.start && {
                match self.digests.check(w.start, &bytes) {
                    Ok(()) => true,
                    Err(chunk) => {
                        self.mismatch(chunk, 1);
                        false
                    }
                }
            };
            if ok {
                got.push(bytes);
            } else {
                // Once more on its own; a second mismatch fails the fetch.
                let bytes = self.inner.fetch(w.clone()).await?;
                requests = requests.saturating_add(1);
                if bytes.len() as u64 != w.end - w.start {
                    return Err(FetchError::Permanent(format!("{} returned {} bytes for {w:?}", self.inner.describe(), bytes.len())));
                }
                if let Err(chunk) = self.digests.check(w.start, &bytes) {
                    self.mismatch(chunk, 2);
                    return Err(self.failed(chunk));
                }
                got.push(bytes);
            }
        }
        // The asked ranges, cut out of the whole chunks that hold them.
        let mut out = Vec::with_capacity(ranges.len());
        let mut k = 0;
        for r in &ranges {
            while k < wide.len() && wide[k].end < r.end {
                k += 1;
            }
            let w = wide.get(k).filter(|w| w.start <= r.start && r.end <= w.end).ok_or_else(|| {
                FetchError::Permanent(format!("internal error: {r:?} outside the widened requests"))
            })?;
            out.push(got[k].slice((r.start - w.start) as usize..(r.end - w.start) as usize));
        }
        Ok(Parts { bytes: out, requests })
    }
}

impl RangeSource for VerifiedSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            if range.start >= range.end || range.end > self.digests.size {
                return Err(FetchError::Permanent(format!("range {range:?} outside the blob of {} bytes", self.digests.size)));
            }
            let wide = self.digests.widen(&range);
            let bytes = self.fetch_checked(wide.clone()).await?;
            Ok(bytes.slice((range.start - wide.start) as usize..(range.end - wide.start) as usize))
        })
    }

    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(self.fetch_many_checked(ranges))
    }

    /// Whole chunks (and whatever the inner source widens to, widened again).
    fn granule(&self, range: Range<u64>) -> Range<u64> {
        self.digests.widen(&self.inner.granule(range))
    }

    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        self.inner.verify_complete()
    }

    fn multi_range(&self) -> MultiRange {
        self.inner.multi_range()
    }

    fn link(&self) -> LinkEstimate {
        self.inner.link()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn served_by(&self) -> Option<String> {
        self.inner.served_by()
    }

    fn region(&self, offset: u64) -> Range<u64> {
        self.inner.region(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A blob whose answers are corrupted in `[bad.start, bad.end)` for the first `lies` answers
    /// that touch it; counts requests.
    struct Liar {
        data: Vec<u8>,
        bad: Range<u64>,
        lies: AtomicU32,
        requests: AtomicU32,
    }

    impl Liar {
        fn answer(&self, r: &Range<u64>) -> Bytes {
            let mut b = self.data[r.start as usize..r.end as usize].to_vec();
            if r.start < self.bad.end && self.bad.start < r.end && self.lies.load(Ordering::Relaxed) > 0 {
                self.lies.fetch_sub(1, Ordering::Relaxed);
                let at = (self.bad.start.max(r.start) - r.start) as usize;
                b[at] ^= 0xff;
            }
            Bytes::from(b)
        }
    }

    impl RangeSource for Liar {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(self.answer(&range)) })
        }
        fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok(Parts { bytes: ranges.iter().map(|r| self.answer(r)).collect(), requests: 1 }) })
        }
        fn describe(&self) -> String {
            "liar".into()
        }
    }

    const CHUNK: u64 = 8192;

    fn blob() -> Vec<u8> {
        (0..(5 * CHUNK + 1000)).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn digests(data: &[u8]) -> Vec<String> {
        data.chunks(CHUNK as usize).map(|c| hex::encode(Sha256::digest(c))).collect()
    }

    fn source(lies: u32) -> (Arc<Liar>, VerifiedSource) {
        let data = blob();
        let d = ChunkDigests::new(CHUNK, &digests(&data), data.len() as u64).unwrap();
        let liar = Arc::new(Liar { data, bad: 3 * CHUNK + 10..3 * CHUNK + 11, lies: AtomicU32::new(lies), requests: AtomicU32::new(0) });
        (liar.clone(), VerifiedSource::new(liar, d))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    #[test]
    fn digests_are_checked_when_parsed() {
        let data = blob();
        let ok = digests(&data);
        let size = data.len() as u64;
        assert!(ChunkDigests::new(CHUNK, &ok, size).is_ok());
        assert!(ChunkDigests::new(CHUNK, &ok[1..], size).unwrap_err().contains("5 chunk digests for 6"));
        assert!(ChunkDigests::new(3000, &ok, size).unwrap_err().contains("power of two"));
        assert!(ChunkDigests::new(2048, &ok, size).unwrap_err().contains("power of two"));
        let mut bad = ok.clone();
        bad[2] = "zz".repeat(32);
        assert!(ChunkDigests::new(CHUNK, &bad, size).unwrap_err().contains("digest 2"));
    }

    #[test]
    fn widening_and_checking() {
        let data = blob();
        let d = ChunkDigests::new(CHUNK, &digests(&data), data.len() as u64).unwrap();
        assert_eq!(d.widen(&(10..20)), 0..CHUNK);
        assert_eq!(d.widen(&(CHUNK..CHUNK + 1)), CHUNK..2 * CHUNK);
        assert_eq!(d.widen(&(5 * CHUNK + 5..5 * CHUNK + 6)), 5 * CHUNK..data.len() as u64, "the last chunk is short");
        assert_eq!(d.check(CHUNK, &data[CHUNK as usize..3 * CHUNK as usize]), Ok(()));
        assert_eq!(d.check(5 * CHUNK, &data[5 * CHUNK as usize..]), Ok(()));
        assert_eq!(d.check(100, &data[100..CHUNK as usize]), Err(0), "not at a chunk boundary");
        assert_eq!(d.check(0, &data[..100]), Err(0), "not whole chunks");
        let mut wrong = data[..2 * CHUNK as usize].to_vec();
        wrong[CHUNK as usize + 3] ^= 1;
        assert_eq!(d.check(0, &wrong), Err(1));
    }

    #[test]
    fn right_bytes_pass_cut_to_what_was_asked() {
        let (liar, s) = source(0);
        let rt = rt();
        let data = blob();
        assert_eq!(rt.block_on(s.fetch(100..200)).unwrap(), &data[100..200]);
        let asked = vec![10..20, 30..CHUNK + 5, 2 * CHUNK + 1..2 * CHUNK + 2, 5 * CHUNK..5 * CHUNK + 1000];
        let parts = rt.block_on(s.fetch_many(asked.clone())).unwrap();
        for (r, b) in asked.iter().zip(&parts.bytes) {
            assert_eq!(b, &data[r.start as usize..r.end as usize], "{r:?}");
        }
        assert_eq!(parts.requests, 1);
        assert_eq!(liar.requests.load(Ordering::Relaxed), 2);
        assert_eq!(s.granule(100..200), 0..CHUNK);
        assert_eq!(s.mismatches.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_lie_is_fetched_again_two_fail_and_nothing_wrong_is_returned() {
        let rt = rt();
        let data = blob();
        // One wrong answer: the chunk is fetched once more and the right bytes come back.
        let (_, s) = source(1);
        assert_eq!(rt.block_on(s.fetch(3 * CHUNK..3 * CHUNK + 100)).unwrap(), &data[3 * CHUNK as usize..3 * CHUNK as usize + 100]);
        assert_eq!(s.mismatches.load(Ordering::Relaxed), 1);
        let (_, s) = source(1);
        let parts = rt.block_on(s.fetch_many(vec![0..10, 3 * CHUNK + 5..3 * CHUNK + 20])).unwrap();
        assert_eq!(parts.bytes[1], &data[3 * CHUNK as usize + 5..3 * CHUNK as usize + 20]);
        assert_eq!(parts.requests, 2, "the multi-range request and the chunk fetched again");
        // Lying every time: a permanent error, never the bytes.
        let (_, s) = source(u32::MAX);
        let e = rt.block_on(s.fetch(3 * CHUNK + 100..3 * CHUNK + 200)).unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("do not match"), "{e}");
        let e = rt.block_on(s.fetch_many(vec![0..10, 3 * CHUNK..3 * CHUNK + 1])).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
        // Chunks away from the lie still read.
        assert_eq!(rt.block_on(s.fetch(0..10)).unwrap(), &data[..10]);
    }
}
