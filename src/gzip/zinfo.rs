//! The zinfo file: erofs-utils `lib/gzran.c` = SOCI `gzip_zinfo` version 2.
//!
//! ```text
//! header      le32 count, le64 span_size                      12 bytes
//! checkpoint  le64 in, le64 out, u8 bits, window[32768]    32785 bytes, × count
//! ```
//!
//! Checkpoint *k* says: the deflate stream can be resumed at byte `in` of the
//! compressed blob (`bits` > 0: the last `bits` bits of byte `in - 1` come
//! first), producing uncompressed byte `out` onwards, given `window`, the
//! 32 KiB of output before `out`. Span *k* is the uncompressed range
//! `[out_k, out_{k+1})` (the last one ends at the stream's total size, which
//! the format does not record: the caller keeps it).
//!
//! A zinfo is untrusted input. [`Zinfo::parse`] checks the structure (size
//! matches the count exactly, first checkpoint at output 0, `in` strictly
//! increasing, `out` never decreasing, `bits` ≤ 7); [`Zinfo::check_bounds`]
//! checks it against the blob and stream sizes. `out` may repeat: gzran
//! records a checkpoint at every gzip member start, and an empty member
//! starts where the previous one ended (its span is empty).

use std::ops::Range;

use super::ZinfoError;

/// Bytes of deflate history a checkpoint carries.
pub const WINDOW_SIZE: usize = 32768;
/// Size of the zinfo header.
pub const HEADER_SIZE: usize = 12;
/// Size of one checkpoint on disk.
pub const CHECKPOINT_SIZE: usize = 8 + 8 + 1 + WINDOW_SIZE;
/// Default distance between checkpoints (erofs-utils and SOCI use 4 MiB).
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;
/// Largest span size accepted (gzran.c keeps it in a u32).
pub const MAX_SPAN_SIZE: u64 = u32::MAX as u64;

/// Where one checkpoint resumes the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first byte not yet consumed.
    pub in_offset: u64,
    /// Offset in the uncompressed stream.
    pub out_offset: u64,
    /// Unused bits (0..=7) at the top of byte `in_offset - 1` that belong to
    /// the stream from here on.
    pub bits: u8,
}

impl Checkpoint {
    /// First compressed byte the resume needs.
    pub fn input_start(&self) -> u64 {
        self.in_offset - u64::from(self.bits > 0)
    }
}

/// A parsed (or built) zinfo. Keeps the file's bytes: windows are slices of
/// them, so parsing copies nothing and [`Zinfo::as_bytes`] is the file.
#[derive(Clone, PartialEq, Eq)]
pub struct Zinfo {
    span_size: u64,
    points: Vec<Checkpoint>,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Zinfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zinfo")
            .field("span_size", &self.span_size)
            .field("points", &self.points)
            .finish_non_exhaustive()
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Zinfo {
    /// Parses and checks a zinfo file (version 2). Memory use is the file's
    /// own size: cap what you fetch before calling this.
    pub fn parse(bytes: Vec<u8>) -> Result<Zinfo, ZinfoError> {
        if bytes.len() < HEADER_SIZE {
            return Err(ZinfoError::TooShort(bytes.len()));
        }
        let count = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as u64;
        let span_size = le64(&bytes[4..]);
        let body = (bytes.len() - HEADER_SIZE) as u64;
        let expected = count.checked_mul(CHECKPOINT_SIZE as u64);
        if expected != Some(body) {
            if count.checked_sub(1).map(|c| c * CHECKPOINT_SIZE as u64) == Some(body) {
                return Err(ZinfoError::Version1);
            }
            return Err(ZinfoError::SizeMismatch {
                len: bytes.len() as u64,
                count,
            });
        }
        if count == 0 {
            return Err(ZinfoError::Empty);
        }
        if span_size == 0 || span_size > MAX_SPAN_SIZE {
            return Err(ZinfoError::BadSpanSize(span_size));
        }
        let mut points = Vec::with_capacity(count as usize);
        for (index, rec) in bytes[HEADER_SIZE..]
            .chunks_exact(CHECKPOINT_SIZE)
            .enumerate()
        {
            let p = Checkpoint {
                in_offset: le64(rec),
                out_offset: le64(&rec[8..]),
                bits: rec[16],
            };
            check_point(index, &p, points.last())?;
            points.push(p);
        }
        Ok(Zinfo {
            span_size,
            points,
            bytes,
        })
    }

    /// Builds a zinfo from checkpoints and windows (the builder's output),
    /// checked the same way as a parsed one.
    pub(crate) fn from_parts(
        span_size: u64,
        points: Vec<Checkpoint>,
        windows: &[Box<[u8]>],
    ) -> Result<Zinfo, ZinfoError> {
        let count = u32::try_from(points.len())
            .map_err(|_| ZinfoError::TooManyCheckpoints(points.len() as u64))?;
        let mut bytes = Vec::with_capacity(HEADER_SIZE + points.len() * CHECKPOINT_SIZE);
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&span_size.to_le_bytes());
        for (p, w) in points.iter().zip(windows) {
            bytes.extend_from_slice(&p.in_offset.to_le_bytes());
            bytes.extend_from_slice(&p.out_offset.to_le_bytes());
            bytes.push(p.bits);
            bytes.extend_from_slice(w);
        }
        Zinfo::parse(bytes)
    }

    /// The zinfo file's bytes (what erofs-utils' `--gzinfo` writes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The span size recorded in the header (informational: random access
    /// uses the checkpoints).
    pub fn span_size(&self) -> u64 {
        self.span_size
    }

    /// Number of checkpoints = number of spans.
    pub fn span_count(&self) -> usize {
        self.points.len()
    }

    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.points
    }

    pub fn checkpoint(&self, k: usize) -> Option<&Checkpoint> {
        self.points.get(k)
    }

    /// The 32 KiB of uncompressed history before checkpoint `k`.
    pub fn window(&self, k: usize) -> Option<&[u8]> {
        if k >= self.points.len() {
            return None;
        }
        let start = HEADER_SIZE + k * CHECKPOINT_SIZE + 17;
        self.bytes.get(start..start + WINDOW_SIZE)
    }

    /// Checks the checkpoints against the compressed blob's size and the
    /// uncompressed stream's total size. Call once both are known.
    pub fn check_bounds(&self, blob_size: u64, total_out: u64) -> Result<(), ZinfoError> {
        if let Some(last) = self.points.last() {
            // A checkpoint resumes inside the stream: at least the 8-byte
            // gzip trailer follows it.
            if last
                .in_offset
                .checked_add(8)
                .is_none_or(|end| end > blob_size)
            {
                return Err(ZinfoError::PastBlob {
                    index: self.points.len() - 1,
                    in_offset: last.in_offset,
                    blob_size,
                });
            }
            if last.out_offset > total_out {
                return Err(ZinfoError::PastStream {
                    index: self.points.len() - 1,
                    out_offset: last.out_offset,
                    total_out,
                });
            }
        }
        Ok(())
    }

    fn get(&self, k: usize) -> Result<&Checkpoint, ZinfoError> {
        self.points.get(k).ok_or(ZinfoError::NoSuchSpan {
            span: k,
            spans: self.points.len(),
        })
    }

    /// The compressed bytes span `k` needs: `[in_k - (bits_k ? 1 : 0),
    /// in_{k+1} + 1)` clamped to the blob, or to the blob's end for the
    /// last span. (The byte at `in_{k+1}` is not needed by the inflate; it is
    /// included as erofs-utils and the issue specify, so span digests agree.)
    pub fn span_input_range(&self, k: usize, blob_size: u64) -> Result<Range<u64>, ZinfoError> {
        let p = self.get(k)?;
        let start = p.input_start();
        let end = match self.points.get(k + 1) {
            Some(next) => next.in_offset.saturating_add(1).min(blob_size),
            None => blob_size,
        };
        if start >= end || p.in_offset > blob_size {
            return Err(ZinfoError::PastBlob {
                index: k,
                in_offset: p.in_offset,
                blob_size,
            });
        }
        Ok(start..end)
    }

    /// The uncompressed bytes span `k` yields: `[out_k, out_{k+1})`, or
    /// `[out_k, total_out)` for the last span. May be empty (an empty gzip
    /// member).
    pub fn span_output_range(&self, k: usize, total_out: u64) -> Result<Range<u64>, ZinfoError> {
        let p = self.get(k)?;
        let end = match self.points.get(k + 1) {
            Some(next) => next.out_offset,
            None => total_out,
        };
        if end < p.out_offset || end > total_out {
            return Err(ZinfoError::PastStream {
                index: k,
                out_offset: end.max(p.out_offset),
                total_out,
            });
        }
        Ok(p.out_offset..end)
    }

    /// The span holding uncompressed byte `offset` (the last checkpoint at
    /// or before it, so empty spans are skipped). `None` past `total_out`.
    pub fn span_for_offset(&self, offset: u64, total_out: u64) -> Option<usize> {
        if offset >= total_out {
            return None;
        }
        // points[0].out_offset == 0, so the partition point is >= 1.
        let k = self.points.partition_point(|p| p.out_offset <= offset);
        k.checked_sub(1)
    }

    /// The spans that together hold the uncompressed range `r` (clamped to
    /// `total_out`); empty for an empty range.
    pub fn spans_for_range(&self, r: Range<u64>, total_out: u64) -> Range<usize> {
        let end = r.end.min(total_out);
        if r.start >= end {
            return 0..0;
        }
        match (
            self.span_for_offset(r.start, total_out),
            self.span_for_offset(end - 1, total_out),
        ) {
            (Some(a), Some(b)) => a..b + 1,
            _ => 0..0,
        }
    }
}

fn check_point(index: usize, p: &Checkpoint, prev: Option<&Checkpoint>) -> Result<(), ZinfoError> {
    let bad = |what: &'static str| ZinfoError::BadCheckpoint { index, what };
    if p.bits > 7 {
        return Err(bad("bits above 7"));
    }
    if p.in_offset == 0 {
        return Err(bad("input offset 0 (a gzip or zlib header comes first)"));
    }
    match prev {
        None if p.out_offset != 0 => Err(bad("the first checkpoint is not at output offset 0")),
        Some(q) if p.in_offset <= q.in_offset => {
            Err(bad("input offset not above the previous checkpoint's"))
        }
        Some(q) if p.out_offset < q.out_offset => {
            Err(bad("output offset below the previous checkpoint's"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(span: u64, points: &[(u64, u64, u8)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(points.len() as u32).to_le_bytes());
        b.extend_from_slice(&span.to_le_bytes());
        for &(i, o, bits) in points {
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(&o.to_le_bytes());
            b.push(bits);
            b.extend(std::iter::repeat_n(o as u8, WINDOW_SIZE));
        }
        b
    }

    #[test]
    fn parses_and_gives_ranges() {
        let z = Zinfo::parse(make(
            1 << 20,
            &[(10, 0, 0), (5000, 1_500_000, 3), (9000, 1_500_000, 0)],
        ))
        .unwrap();
        assert_eq!(z.span_count(), 3);
        assert_eq!(z.span_size(), 1 << 20);
        assert_eq!(z.window(1).unwrap()[0], 1_500_000u64 as u8);
        assert!(z.window(3).is_none());
        z.check_bounds(20_000, 3_000_000).unwrap();
        assert_eq!(z.span_input_range(0, 20_000).unwrap(), 10..5001);
        assert_eq!(z.span_input_range(1, 20_000).unwrap(), 4999..9001);
        assert_eq!(z.span_input_range(2, 20_000).unwrap(), 9000..20_000);
        assert_eq!(z.span_output_range(0, 3_000_000).unwrap(), 0..1_500_000);
        assert_eq!(
            z.span_output_range(1, 3_000_000).unwrap(),
            1_500_000..1_500_000
        );
        assert_eq!(
            z.span_output_range(2, 3_000_000).unwrap(),
            1_500_000..3_000_000
        );
        assert!(matches!(
            z.span_output_range(3, 3_000_000),
            Err(ZinfoError::NoSuchSpan { .. })
        ));
        assert_eq!(z.span_for_offset(0, 3_000_000), Some(0));
        assert_eq!(z.span_for_offset(1_499_999, 3_000_000), Some(0));
        // The empty span 1 is skipped.
        assert_eq!(z.span_for_offset(1_500_000, 3_000_000), Some(2));
        assert_eq!(z.span_for_offset(3_000_000, 3_000_000), None);
        assert_eq!(z.spans_for_range(1_000..1_600_000, 3_000_000), 0..3);
        assert_eq!(z.spans_for_range(5..5, 3_000_000), 0..0);
        assert_eq!(Zinfo::parse(z.as_bytes().to_vec()).unwrap(), z);
    }

    #[test]
    fn rejects_bad_files() {
        assert!(matches!(
            Zinfo::parse(vec![0; 11]),
            Err(ZinfoError::TooShort(11))
        ));
        assert!(matches!(
            Zinfo::parse(make(4096, &[])),
            Err(ZinfoError::Empty)
        ));
        let mut b = make(4096, &[(10, 0, 0)]);
        b.push(0);
        assert!(matches!(
            Zinfo::parse(b),
            Err(ZinfoError::SizeMismatch { .. })
        ));
        // A v1 file: count says 2, one checkpoint present.
        let mut b = make(4096, &[(10, 0, 0)]);
        b[0] = 2;
        assert!(matches!(Zinfo::parse(b), Err(ZinfoError::Version1)));
        // A huge count with a short body is a size mismatch, never an allocation.
        let mut b = make(4096, &[(10, 0, 0)]);
        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Zinfo::parse(b),
            Err(ZinfoError::SizeMismatch { .. })
        ));
        assert!(matches!(
            Zinfo::parse(make(0, &[(10, 0, 0)])),
            Err(ZinfoError::BadSpanSize(0))
        ));
        assert!(matches!(
            Zinfo::parse(make(1 << 40, &[(10, 0, 0)])),
            Err(ZinfoError::BadSpanSize(_))
        ));
        for pts in [
            &[(10, 0, 8)][..],
            &[(0, 0, 0)],
            &[(10, 5, 0)],
            &[(10, 0, 0), (10, 100, 0)],
            &[(10, 0, 0), (9, 100, 0)],
            &[(10, 0, 0), (20, 100, 0), (30, 99, 0)],
        ] {
            assert!(
                matches!(
                    Zinfo::parse(make(4096, pts)),
                    Err(ZinfoError::BadCheckpoint { .. })
                ),
                "{pts:?}"
            );
        }
    }

    #[test]
    fn bounds_are_checked() {
        let z = Zinfo::parse(make(4096, &[(10, 0, 0), (5000, 100_000, 1)])).unwrap();
        assert!(matches!(
            z.check_bounds(5007, 200_000),
            Err(ZinfoError::PastBlob { .. })
        ));
        assert!(matches!(
            z.check_bounds(6000, 99_999),
            Err(ZinfoError::PastStream { .. })
        ));
        z.check_bounds(5008, 100_000).unwrap();
        assert!(z.span_input_range(1, 4000).is_err());
        assert!(z.span_output_range(0, 50_000).is_err());
        // The +1 byte is clamped to the blob.
        assert_eq!(z.span_input_range(0, 5000).unwrap(), 10..5000);
    }
}
