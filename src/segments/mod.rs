//! One address space, many sources (DESIGN §7).
//!
//! The cache file is the image's flat block address space. A [`Layout`] says
//! where each region's bytes come from: a blob of a registry at some offset,
//! an S3 object, a local file, the uncompressed tar of a gzip layer. The
//! presence bitmap and the event path know only the flat space; a range that
//! crosses segments is split here and each part is fetched from its own
//! source. A single-blob image is the one-segment case of the same code.
//!
//! Regions between segments belong to no source: the image's metadata never
//! points there, so the kernel never asks for them, but fetches rounded out
//! to fetch units may cover them; they read as zeros (and are never the
//! bytes a reader sees).
//!
//! [`Layout`] is pure (validation and range arithmetic, unit-tested);
//! [`SegmentedSource`] is the `RangeSource` over it.

pub mod gzip;
pub mod tar_index;

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::{try_join_all, BoxFuture};

use crate::remote::{check_ranges, FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

/// One region of the flat address space and where its bytes come from.
#[derive(Clone)]
pub struct Segment {
    /// What it is, for status and logs (a digest, `s3://b/k`, `local`).
    pub label: String,
    /// First byte in the flat address space.
    pub start: u64,
    pub len: u64,
    /// Where the segment's first byte is in its source.
    pub source_offset: u64,
    pub source: Arc<dyn RangeSource>,
    /// `sha256:<hex>` of the whole source (an uncompressed tar's diff_id, a layer blob's digest):
    /// checked against the cache file once every byte of the address space is present.
    pub sha256: Option<String>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("label", &self.label)
            .field("start", &self.start)
            .field("len", &self.len)
            .field("source_offset", &self.source_offset)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// A whole source at `start`.
    pub fn whole(label: impl Into<String>, start: u64, source: Arc<dyn RangeSource>) -> Segment {
        Segment { label: label.into(), start, len: source.size(), source_offset: 0, source, sha256: None }
    }

    /// The same segment, its whole source checked against `sha256` at completion.
    pub fn checked(self, sha256: Option<String>) -> Segment {
        Segment { sha256, ..self }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("segment {label} is empty")]
    Empty { label: String },
    #[error("segment {label} at {start} is not 4 KiB aligned")]
    Unaligned { label: String, start: u64 },
    #[error("segments {a} and {b} overlap")]
    Overlap { a: String, b: String },
    #[error("segment {label} ends past the {size}-byte address space")]
    PastEnd { label: String, size: u64 },
    #[error("segment {label} needs bytes {start}..{end} of a source of {source_size} bytes")]
    PastSource { label: String, start: u64, end: u64, source_size: u64 },
    #[error("the address space has no segment")]
    NoSegments,
}

/// Where the bytes of the flat address space come from.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Sorted by `start`, disjoint.
    segments: Vec<Segment>,
    size: u64,
}

/// A piece of a flat range: from one segment, or from no segment (a gap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index into the layout's segments; `None` for a gap.
    pub segment: Option<usize>,
    /// The piece in the flat address space.
    pub flat: Range<u64>,
    /// The same bytes in the segment's source (empty for a gap).
    pub source: Range<u64>,
}

const ALIGN: u64 = 4096;

impl Layout {
    /// Validates untrusted placements: segments aligned, non-empty, disjoint,
    /// inside `size`, and inside their sources.
    pub fn new(mut segments: Vec<Segment>, size: u64) -> Result<Layout, LayoutError> {
        if segments.is_empty() {
            return Err(LayoutError::NoSegments);
        }
        segments.sort_by_key(|s| s.start);
        for s in &segments {
            if s.len == 0 {
                return Err(LayoutError::Empty { label: s.label.clone() });
            }
            if s.start % ALIGN != 0 {
                return Err(LayoutError::Unaligned { label: s.label.clone(), start: s.start });
            }
            match s.start.checked_add(s.len) {
                Some(end) if end <= size => {}
                _ => return Err(LayoutError::PastEnd { label: s.label.clone(), size }),
            }
            let source_size = s.source.size();
            match s.source_offset.checked_add(s.len) {
                Some(end) if end <= source_size => {}
                _ => {
                    return Err(LayoutError::PastSource {
                        label: s.label.clone(),
                        start: s.source_offset,
                        end: s.source_offset.saturating_add(s.len),
                        source_size,
                    })
                }
            }
        }
        for w in segments.windows(2) {
            if w[0].end() > w[1].start {
                return Err(LayoutError::Overlap { a: w[0].label.clone(), b: w[1].label.clone() });
            }
        }
        Ok(Layout { segments, size })
    }

    /// The one-segment layout of a single blob.
    pub fn single(label: impl Into<String>, source: Arc<dyn RangeSource>) -> Layout {
        let size = source.size();
        Layout { segments: vec![Segment::whole(label, 0, source)], size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Splits a flat range (clamped to the address space) into pieces, in order.
    pub fn split(&self, range: Range<u64>) -> Vec<Piece> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        let mut out = Vec::new();
        if range.start >= range.end {
            return out;
        }
        let mut pos = range.start;
        // The first segment that ends after `pos`.
        let first = self.segments.partition_point(|s| s.end() <= pos);
        for (i, s) in self.segments.iter().enumerate().skip(first) {
            if s.start >= range.end {
                break;
            }
            if s.start > pos {
                out.push(Piece { segment: None, flat: pos..s.start, source: 0..0 });
                pos = s.start;
            }
            let end = s.end().min(range.end);
            let src = s.source_offset + (pos - s.start);
            out.push(Piece { segment: Some(i), flat: pos..end, source: src..src + (end - pos) });
            pos = end;
        }
        if pos < range.end {
            out.push(Piece { segment: None, flat: pos..range.end, source: 0..0 });
        }
        out
    }

    /// The segment holding flat byte `offset`, if any.
    pub fn segment_at(&self, offset: u64) -> Option<&Segment> {
        let i = self.segments.partition_point(|s| s.end() <= offset);
        self.segments.get(i).filter(|s| s.start <= offset)
    }

    /// The region holding `offset` (clamped to the space): a segment with the rest of its last
    /// 4 KiB block (the page a reader of its end asks for), or the gap between two of them.
    pub fn region(&self, offset: u64) -> Range<u64> {
        // The ends of segment i's region: its start, and its end rounded up to a block, short of
        // the next segment and the space's end.
        let region_end = |i: usize| {
            let s = &self.segments[i];
            let next = self.segments.get(i + 1).map_or(self.size, |n| n.start);
            s.end().checked_next_multiple_of(ALIGN).unwrap_or(u64::MAX).min(next).min(self.size)
        };
        let after = self.segments.partition_point(|s| s.start <= offset);
        let Some(i) = after.checked_sub(1) else {
            return 0..self.segments.first().map_or(self.size, |s| s.start);
        };
        let end = region_end(i);
        if offset < end {
            return self.segments[i].start..end;
        }
        end..self.segments.get(i + 1).map_or(self.size, |n| n.start)
    }
}

/// The `RangeSource` over a [`Layout`]: each piece of a request goes to its
/// own source, concurrently; gaps read as zeros.
pub struct SegmentedSource {
    layout: Layout,
}

impl SegmentedSource {
    pub fn new(layout: Layout) -> SegmentedSource {
        SegmentedSource { layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Several sorted, disjoint ranges: the pieces of each segment go to its source in one
    /// `fetch_many` (its multi-range requests), the segments concurrently; each asked range is put
    /// back together from its pieces (gaps as zeros).
    async fn fetch_many_ranges(&self, ranges: Vec<Range<u64>>) -> Result<Parts, FetchError> {
        check_ranges(&ranges, self.layout.size)?;
        let pieces: Vec<Vec<Piece>> = ranges.iter().map(|r| self.layout.split(r.clone())).collect();
        // Per segment, in flat order; the flat-to-source map of a segment is linear, so its
        // source ranges are sorted and disjoint too.
        let mut asked: std::collections::BTreeMap<usize, Vec<Range<u64>>> = Default::default();
        for p in pieces.iter().flatten() {
            if let Some(i) = p.segment {
                asked.entry(i).or_default().push(p.source.clone());
            }
        }
        let answers = try_join_all(asked.into_iter().map(|(i, want)| async move {
            let n = want.len();
            let parts = self.layout.segments[i].source.fetch_many(want).await?;
            if parts.bytes.len() != n {
                return Err(FetchError::Permanent(format!("a source returned {} parts for {n}", parts.bytes.len())));
            }
            Ok::<_, FetchError>((i, parts))
        }))
        .await?;
        let mut requests = 0u32;
        let mut answered: std::collections::HashMap<usize, std::collections::VecDeque<Bytes>> = Default::default();
        for (i, parts) in answers {
            requests = requests.saturating_add(parts.requests);
            answered.insert(i, parts.bytes.into());
        }
        let mut next = |p: &Piece, i: usize| -> Result<Bytes, FetchError> {
            let bytes = answered
                .get_mut(&i)
                .and_then(|q| q.pop_front())
                .ok_or_else(|| FetchError::Permanent("a source returned fewer parts than asked".into()))?;
            if bytes.len() as u64 != p.flat.end - p.flat.start {
                return Err(FetchError::Permanent(format!("a source returned {} bytes for {:?}", bytes.len(), p.source)));
            }
            Ok(bytes)
        };
        let mut out = Vec::with_capacity(ranges.len());
        for (range, ps) in ranges.iter().zip(&pieces) {
            // One piece of one segment: the source's bytes, untouched.
            if let [p @ Piece { segment: Some(i), .. }] = ps.as_slice() {
                out.push(next(p, *i)?);
                continue;
            }
            let mut buf = BytesMut::with_capacity((range.end - range.start) as usize);
            for p in ps {
                match p.segment {
                    Some(i) => buf.extend_from_slice(&next(p, i)?),
                    None => buf.resize(buf.len() + (p.flat.end - p.flat.start) as usize, 0),
                }
            }
            out.push(buf.freeze());
        }
        Ok(Parts { bytes: out, requests })
    }

    async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, FetchError> {
        if range.start >= range.end || range.end > self.layout.size {
            return Err(FetchError::Permanent(format!("range {range:?} outside the {}-byte image", self.layout.size)));
        }
        let pieces = self.layout.split(range.clone());
        // One piece of one segment: hand the source's bytes through untouched.
        if let [Piece { segment: Some(i), source, .. }] = pieces.as_slice() {
            return self.layout.segments[*i].source.fetch(source.clone()).await;
        }
        let fetched = try_join_all(pieces.iter().map(|p| async move {
            match p.segment {
                Some(i) => self.layout.segments[i].source.fetch(p.source.clone()).await,
                None => Ok(Bytes::from(vec![0u8; (p.flat.end - p.flat.start) as usize])),
            }
        }))
        .await?;
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for (piece, bytes) in pieces.iter().zip(fetched) {
            if bytes.len() as u64 != piece.flat.end - piece.flat.start {
                return Err(FetchError::Permanent(format!(
                    "a source returned {} bytes for {:?}",
                    bytes.len(),
                    piece.source
                )));
            }
            out.extend_from_slice(&bytes);
        }
        Ok(out.freeze())
    }
}

impl RangeSource for SegmentedSource {
    fn size(&self) -> u64 {
        self.layout.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(self.fetch_range(range))
    }

    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(self.fetch_many_ranges(ranges))
    }

    /// What every segment's source can do: multi-range only when all take it.
    fn multi_range(&self) -> MultiRange {
        let all: Vec<MultiRange> = self.layout.segments.iter().map(|s| s.source.multi_range()).collect();
        if all.contains(&MultiRange::Unsupported) || all.is_empty() {
            MultiRange::Unsupported
        } else if all.iter().all(|m| *m == MultiRange::Supported) {
            MultiRange::Supported
        } else {
            MultiRange::Unknown
        }
    }

    /// The first segment's link (a single blob: its own; the segments of one image are
    /// normally served by one registry or bucket).
    fn link(&self) -> LinkEstimate {
        self.layout.segments.first().map(|s| s.source.link()).unwrap_or_default()
    }

    /// Each piece widened to its source's granule, mapped back to the flat
    /// space and kept inside its segment.
    fn granule(&self, range: Range<u64>) -> Range<u64> {
        let mut out = range.clone();
        for p in self.layout.split(range) {
            let Some(i) = p.segment else { continue };
            let s = &self.layout.segments[i];
            let g = s.source.granule(p.source.clone());
            let lo = g.start.max(s.source_offset).min(p.source.start);
            let hi = g.end.min(s.source_offset + s.len).max(p.source.end);
            out.start = out.start.min(s.start + (lo - s.source_offset));
            out.end = out.end.max(s.start + (hi - s.source_offset));
        }
        out
    }

    /// Every segment's own whole-source check: a failure of any is a failure.
    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        Box::pin(async move {
            let mut verdict = None;
            for s in &self.layout.segments {
                match s.source.verify_complete().await? {
                    Some(false) => return Ok(Some(false)),
                    Some(true) => verdict = Some(true),
                    None => {}
                }
            }
            Ok(verdict)
        })
    }

    fn describe(&self) -> String {
        match self.layout.segments.as_slice() {
            [one] => one.source.describe(),
            many => format!("{} segments", many.len()),
        }
    }

    fn region(&self, offset: u64) -> Range<u64> {
        self.layout.region(offset)
    }

    fn served_by(&self) -> Option<String> {
        let mut served: Vec<String> = self.layout.segments.iter().filter_map(|s| s.source.served_by()).collect();
        served.dedup();
        (!served.is_empty()).then(|| served.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes `i as u8 ^ seed` for position i.
    struct Pattern {
        size: u64,
        seed: u8,
    }

    impl RangeSource for Pattern {
        fn size(&self) -> u64 {
            self.size
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move {
                if range.end > self.size {
                    return Err(FetchError::Permanent("past the end".into()));
                }
                Ok(range.map(|i| i as u8 ^ self.seed).collect::<Vec<u8>>().into())
            })
        }
        fn describe(&self) -> String {
            format!("pattern {}", self.seed)
        }
    }

    fn seg(label: &str, start: u64, len: u64, offset: u64, size: u64, seed: u8) -> Segment {
        Segment { label: label.into(), start, len, source_offset: offset, source: Arc::new(Pattern { size, seed }), sha256: None }
    }

    #[test]
    fn placements_are_validated() {
        let ok = Layout::new(vec![seg("b", 8192, 4096, 0, 4096, 2), seg("a", 0, 4096, 0, 4096, 1)], 16384).unwrap();
        assert_eq!(ok.segments()[0].label, "a", "sorted");
        let cases = [
            (vec![seg("a", 0, 8192, 0, 8192, 1), seg("b", 4096, 4096, 0, 4096, 2)], LayoutError::Overlap { a: "a".into(), b: "b".into() }),
            (vec![seg("a", 100, 4096, 0, 4096, 1)], LayoutError::Unaligned { label: "a".into(), start: 100 }),
            (vec![seg("a", 0, 0, 0, 4096, 1)], LayoutError::Empty { label: "a".into() }),
            (vec![seg("a", 12288, 8192, 0, 8192, 1)], LayoutError::PastEnd { label: "a".into(), size: 16384 }),
            (vec![seg("a", 0, 4096, 1, 4096, 1)], LayoutError::PastSource { label: "a".into(), start: 1, end: 4097, source_size: 4096 }),
            (vec![seg("a", u64::MAX & !4095, 8192, 0, 8192, 1)], LayoutError::PastEnd { label: "a".into(), size: 16384 }),
            (vec![], LayoutError::NoSegments),
        ];
        for (segments, want) in cases {
            assert_eq!(Layout::new(segments, 16384).unwrap_err(), want);
        }
    }

    #[test]
    fn ranges_split_at_segments_and_gaps() {
        let l = Layout::new(vec![seg("a", 0, 8192, 100, 10_000, 1), seg("b", 16384, 4096, 0, 4096, 2)], 24576).unwrap();
        assert_eq!(
            l.split(4096..20000),
            vec![
                Piece { segment: Some(0), flat: 4096..8192, source: 4196..8292 },
                Piece { segment: None, flat: 8192..16384, source: 0..0 },
                Piece { segment: Some(1), flat: 16384..20000, source: 0..3616 },
            ]
        );
        assert_eq!(l.split(20480..30000), vec![Piece { segment: None, flat: 20480..24576, source: 0..0 }], "clamped");
        assert!(l.split(5..5).is_empty());
        assert_eq!(l.segment_at(8191).map(|s| s.label.as_str()), Some("a"));
        assert!(l.segment_at(8192).is_none());
        assert_eq!(l.segment_at(16384).map(|s| s.label.as_str()), Some("b"));
    }

    /// A pattern source that counts its `fetch_many` calls and says it takes multi-range.
    struct Multi(Pattern, std::sync::atomic::AtomicU32);

    impl RangeSource for Multi {
        fn size(&self) -> u64 {
            self.0.size
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            self.0.fetch(range)
        }
        fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
            Box::pin(async move {
                self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut bytes = Vec::new();
                for r in ranges {
                    bytes.push(self.0.fetch(r).await?);
                }
                Ok(Parts { bytes, requests: 1 })
            })
        }
        fn multi_range(&self) -> MultiRange {
            MultiRange::Supported
        }
        fn describe(&self) -> String {
            "multi".into()
        }
    }

    #[test]
    fn fetch_many_asks_each_segment_once_and_puts_ranges_back_together() {
        let a = Arc::new(Multi(Pattern { size: 10_000, seed: 1 }, Default::default()));
        let b = Arc::new(Multi(Pattern { size: 4096, seed: 2 }, Default::default()));
        let l = Layout::new(
            vec![
                Segment { label: "a".into(), start: 0, len: 8192, source_offset: 100, source: a.clone(), sha256: None },
                Segment { label: "b".into(), start: 16384, len: 4096, source_offset: 0, source: b.clone(), sha256: None },
            ],
            24576,
        )
        .unwrap();
        let src = SegmentedSource::new(l);
        assert_eq!(src.multi_range(), MultiRange::Supported);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // Inside a, across a / gap / b, inside b, and in the gap after b.
        let asked = vec![0..10, 4000..5000, 8000..17000, 18000..18100, 20480..24576];
        let parts = rt.block_on(src.fetch_many(asked.clone())).unwrap();
        assert_eq!(parts.requests, 2, "one request per segment's source");
        assert_eq!(a.1.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(b.1.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(parts.bytes.len(), asked.len());
        for (r, got) in asked.iter().zip(&parts.bytes) {
            let one = rt.block_on(src.fetch(r.clone())).unwrap();
            assert_eq!(got, &one, "{r:?}");
        }
        assert!(parts.bytes[4].iter().all(|&x| x == 0), "the gap after b reads as zeros");
        assert!(rt.block_on(src.fetch_many(vec![10..20, 5..15])).is_err(), "unsorted ranges are refused");
        // One segment that does not take multi-range makes the whole space single-range.
        let mixed = SegmentedSource::new(
            Layout::new(vec![seg("p", 0, 4096, 0, 4096, 1), Segment { label: "m".into(), start: 4096, len: 4096, source_offset: 0, source: b, sha256: None }], 8192).unwrap(),
        );
        assert_eq!(mixed.multi_range(), MultiRange::Unsupported);
    }

    /// Serves whole units of 10 000 bytes.
    struct Chunky(Pattern);

    impl RangeSource for Chunky {
        fn size(&self) -> u64 {
            self.0.size
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            self.0.fetch(range)
        }
        fn describe(&self) -> String {
            "chunky".into()
        }
        fn granule(&self, r: Range<u64>) -> Range<u64> {
            (r.start / 10_000 * 10_000)..(r.end.div_ceil(10_000) * 10_000).min(self.0.size)
        }
    }

    #[test]
    fn granules_map_back_to_the_flat_space_inside_their_segment() {
        let chunky = Arc::new(Chunky(Pattern { size: 50_000, seed: 4 }));
        // The segment starts 5000 bytes into its source and ends at 45 000.
        let l = Layout::new(
            vec![
                seg("a", 0, 8192, 0, 8192, 1),
                Segment { label: "c".into(), start: 8192, len: 40_000, source_offset: 5000, source: chunky, sha256: None },
            ],
            49_152,
        )
        .unwrap();
        let src = SegmentedSource::new(l);
        // Flat 20 000 = source 16 808: widened to source 10 000..20 000.
        assert_eq!(src.granule(20_000..20_001), 13_192..23_192);
        // At the segment's start the granule is cut at the segment (source 5000).
        assert_eq!(src.granule(8192..8200), 8192..13_192);
        // Pieces of other sources keep their range; a gap is kept as asked.
        assert_eq!(src.granule(100..200), 100..200);
        assert_eq!(src.granule(48_500..49_000), 48_500..49_000);
        // At its end, cut at the segment's end (source 45 000).
        assert_eq!(src.granule(48_000..48_100), 43_192..48_192);
    }

    #[test]
    fn regions_are_segments_with_their_last_block_and_the_gaps_between() {
        // a: 0..5000 (its region runs to 8192); b: 8192..12288; c: 20480..21000; space 32768.
        let l = Layout::new(
            vec![seg("a", 0, 5000, 0, 5000, 1), seg("b", 8192, 4096, 0, 4096, 2), seg("c", 20480, 520, 0, 520, 3)],
            32768,
        )
        .unwrap();
        assert_eq!(l.region(0), 0..8192);
        assert_eq!(l.region(4999), 0..8192);
        assert_eq!(l.region(5000), 0..8192, "the rest of a's last block");
        assert_eq!(l.region(8192), 8192..12288);
        assert_eq!(l.region(12288), 12288..20480, "a gap");
        assert_eq!(l.region(20479), 12288..20480);
        assert_eq!(l.region(20480), 20480..24576);
        assert_eq!(l.region(24576), 24576..32768);
        assert_eq!(l.region(40000), 24576..32768, "past the end: the last region");
        let late = Layout::new(vec![seg("x", 8192, 4096, 0, 4096, 1)], 16384).unwrap();
        assert_eq!(late.region(100), 0..8192, "a gap before the first segment");
        let src = SegmentedSource::new(late);
        assert_eq!(RangeSource::region(&src, 9000), 8192..12288);
    }

    #[tokio::test]
    async fn fetches_assemble_pieces_from_their_sources() {
        let l = Layout::new(vec![seg("a", 0, 8192, 100, 10_000, 1), seg("b", 16384, 4096, 0, 4096, 2)], 24576).unwrap();
        let src = SegmentedSource::new(l);
        let got = src.fetch(8000..16500).await.unwrap();
        assert_eq!(got.len(), 8500);
        assert!(got[..192].iter().enumerate().all(|(i, &b)| b == (8100 + i as u64) as u8 ^ 1));
        assert!(got[192..8384].iter().all(|&b| b == 0), "the gap reads as zeros");
        assert!(got[8384..].iter().enumerate().all(|(i, &b)| b == i as u8 ^ 2));
        assert!(src.fetch(0..30000).await.is_err());
        assert_eq!(src.describe(), "2 segments");
        let single = SegmentedSource::new(Layout::single("x", Arc::new(Pattern { size: 5000, seed: 3 })));
        assert_eq!(single.fetch(4000..5000).await.unwrap()[0], 4000u64 as u8 ^ 3);
        assert_eq!(single.describe(), "pattern 3");
    }
}
