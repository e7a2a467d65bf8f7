//! Multi-range requests for the HTTP-based sources: the answer's checks, the
//! fallbacks, and what a source remembers about its server.
//!
//! A multi-range GET is answered with `206 multipart/byteranges` by servers
//! that take it (Go's `http.ServeContent`, hence Debian's docker-registry,
//! nginx, CloudFront for ascending disjoint ranges). Anything else means the
//! source falls back to single ranges for good: `200` (the whole blob — its
//! body is not read, the connection is dropped), `416`, `400`, `501`, or a
//! `206` whose body does not match the request (parsed with bounds checks by
//! `http::multipart`: wrong boundary, overlapping or missing parts, a part
//! nobody asked for, a truncated body). The first multi-range request is the
//! probe: no extra request is made to find out.
//!
//! The fallback fetches the asked ranges merged with the link's request gap
//! (one request per merged range, a few in flight) and slices the asked
//! bytes out.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use reqwest::StatusCode;

use super::{FetchError, MultiRange, Parts};
use crate::http::{self, multipart};
use crate::ranges;

/// Single-range requests in flight at once for one fallback.
pub const FALLBACK_PARALLEL: usize = 8;

/// What a source knows about its server's multi-range support.
#[derive(Default)]
pub struct MultiRangeState(AtomicU8);

const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

impl MultiRangeState {
    pub fn get(&self) -> MultiRange {
        match self.0.load(Ordering::Relaxed) {
            SUPPORTED => MultiRange::Supported,
            UNSUPPORTED => MultiRange::Unsupported,
            _ => MultiRange::Unknown,
        }
    }

    pub fn supported(&self) {
        let _ = self.0.compare_exchange(UNKNOWN, SUPPORTED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Remembers the fallback; says why once.
    pub fn unsupported(&self, shown: &str, why: &str) {
        if self.0.swap(UNSUPPORTED, Ordering::Relaxed) != UNSUPPORTED {
            tracing::info!(source = shown, why, "no multi-range requests for this source; single ranges from now on");
        }
    }
}

/// The answer to a multi-range request.
pub enum MultiAnswer {
    /// One `Bytes` per asked range, in order.
    Parts(Vec<Bytes>),
    /// The server does not do it (or not right): fall back, and why.
    Fallback(String),
}

/// Body bytes a multipart answer may add to the data: per part a delimiter
/// and headers (bounded by the parser), plus the close delimiter.
fn framing_cap(parts: usize) -> u64 {
    (parts as u64).saturating_mul(multipart::MAX_PART_HEADER_BYTES as u64 + 160).saturating_add(4096)
}

/// Checks and reads the answer to a multi-range request for `asked` (sorted,
/// disjoint) of a blob of `size` bytes. Errors are the ones retrying can fix
/// (a body cut short, a 5xx); an answer that shows the server does not do
/// multi-range is a [`MultiAnswer::Fallback`].
pub async fn read_multi(resp: reqwest::Response, asked: &[Range<u64>], size: u64, shown: &str) -> Result<MultiAnswer, FetchError> {
    let status = resp.status();
    match status {
        StatusCode::PARTIAL_CONTENT => {}
        // The whole blob: not read (dropping the response drops the connection).
        StatusCode::OK => return Ok(MultiAnswer::Fallback("the server answered 200 with the whole blob".into())),
        StatusCode::RANGE_NOT_SATISFIABLE | StatusCode::BAD_REQUEST | StatusCode::NOT_IMPLEMENTED => {
            return Ok(MultiAnswer::Fallback(format!("the server answered HTTP {}", status.as_u16())))
        }
        other => return Err(http::status_error(other, shown).into()),
    }
    let header = |name| resp.headers().get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok()).map(str::to_owned);
    let content_type = header(CONTENT_TYPE);
    let content_range = header(CONTENT_RANGE);
    // A server may coalesce close ranges into one part (RFC 9110 §14.2): the
    // gaps come too, up to as much again as was asked (and 1 MiB).
    let asked_bytes = ranges::total_len(asked);
    let span = match (asked.first(), asked.last()) {
        (Some(f), Some(l)) => l.end.saturating_sub(f.start),
        _ => 0,
    };
    let coalesced = span.min(asked_bytes.saturating_mul(2).saturating_add(1 << 20));
    let cap = asked_bytes.saturating_add(framing_cap(asked.len())).max(coalesced.saturating_add(framing_cap(asked.len())));
    let cap = usize::try_from(cap).map_err(|_| FetchError::Permanent("multi-range request too large".into()))?;
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Ok(MultiAnswer::Fallback("a multi-range body longer than what was asked".into()));
    }
    let body = match http::read_capped(resp, cap).await {
        Ok(b) => Bytes::from(b),
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => return Ok(MultiAnswer::Fallback(format!("{e}"))),
    };
    let parts = match multipart::parse_partial_response(content_type.as_deref(), content_range.as_deref(), &body, asked, size) {
        Ok(parts) => parts,
        Err(e) => return Ok(MultiAnswer::Fallback(format!("the multipart body does not match the request: {e}"))),
    };
    let base = body.as_ptr() as usize;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        // Each part borrows from `body`: turn it into a slice of the same buffer.
        let start = (p.data.as_ptr() as usize).checked_sub(base);
        let end = start.and_then(|s| s.checked_add(p.data.len())).filter(|&e| e <= body.len());
        match (start, end) {
            (Some(s), Some(e)) => out.push(body.slice(s..e)),
            _ => return Err(FetchError::Permanent("internal: multipart part outside its body".into())),
        }
    }
    Ok(MultiAnswer::Parts(out))
}

/// Fetches `asked` (sorted, disjoint) with single-range requests of the
/// ranges merged across gaps up to `gap` (none longer than `max_len` unless
/// one asked range is), a few in flight, and slices the asked bytes out.
pub async fn fetch_merged<F, Fut>(fetch_one: F, asked: &[Range<u64>], gap: u64, max_len: u64) -> Result<Parts, FetchError>
where
    F: Fn(Range<u64>) -> Fut,
    Fut: Future<Output = Result<Bytes, FetchError>>,
{
    let merged = if gap == 0 { asked.to_vec() } else { ranges::coalesce(asked.to_vec(), gap, max_len) };
    let fetched: Vec<Bytes> = stream::iter(merged.iter().cloned().map(&fetch_one))
        .buffered(FALLBACK_PARALLEL)
        .try_collect()
        .await?;
    let bytes = slice_out(&merged, &fetched, asked)?;
    Ok(Parts { bytes, requests: merged.len() as u32 })
}

/// The bytes of each `asked` range from the `fetched` bytes of `merged`
/// (sorted; every asked range inside one merged range).
pub fn slice_out(merged: &[Range<u64>], fetched: &[Bytes], asked: &[Range<u64>]) -> Result<Vec<Bytes>, FetchError> {
    let mut out = Vec::with_capacity(asked.len());
    let mut i = 0usize;
    for a in asked {
        while i < merged.len() && merged[i].end < a.end {
            i += 1;
        }
        let (Some(m), Some(b)) = (merged.get(i), fetched.get(i)) else {
            return Err(FetchError::Permanent("internal: asked range outside the merged ranges".into()));
        };
        let s = a.start.checked_sub(m.start).and_then(|s| usize::try_from(s).ok());
        let e = a.end.checked_sub(m.start).and_then(|e| usize::try_from(e).ok());
        match (s, e) {
            (Some(s), Some(e)) if s <= e && e <= b.len() => out.push(b.slice(s..e)),
            _ => return Err(FetchError::Permanent("internal: asked range outside the merged ranges".into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn blob() -> Vec<u8> {
        (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn merged_singles_slice_back_the_asked_ranges() {
        let data = Bytes::from(blob());
        let calls = AtomicU32::new(0);
        let fetch = |r: Range<u64>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let d = data.clone();
            async move { Ok(d.slice(r.start as usize..r.end as usize)) }
        };
        let asked = vec![10..20, 30..40, 5000..6000, 90_000..90_001];
        let parts = fetch_merged(fetch, &asked, 100, u64::MAX).await.unwrap();
        assert_eq!(parts.requests, 3, "10..40 merged, the others alone");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        for (r, b) in asked.iter().zip(&parts.bytes) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize]);
        }
        let none = fetch_merged(|_| async { Ok(Bytes::new()) }, &[], 100, u64::MAX).await.unwrap();
        assert_eq!((none.requests, none.bytes.len()), (0, 0));
    }

    #[test]
    fn state_remembers_the_fallback() {
        let s = MultiRangeState::default();
        assert_eq!(s.get(), MultiRange::Unknown);
        s.supported();
        assert_eq!(s.get(), MultiRange::Supported);
        s.unsupported("x", "200");
        assert_eq!(s.get(), MultiRange::Unsupported);
        s.supported();
        assert_eq!(s.get(), MultiRange::Unsupported, "a fallback is for good");
    }
}
