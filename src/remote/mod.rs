//! Remotes: where the bytes of a blob come from.
//!
//! A [`RangeSource`] knows the blob's size and serves byte ranges of it. The
//! agent never cares whether the bytes come from an HTTP server, an OCI
//! registry or a local file; that is what keeps the backend (cache file +
//! fanotify) apart from the remote, as erofs-utils does. This module is the
//! trait and the implementations that need nothing but the `http` leaf; the
//! registry source lives in `oci`, and which source serves a mount is
//! decided by the agent's start-up (`agent::sources`).
//!
//! Every response is checked against what was asked (status, Content-Range,
//! length): a remote is untrusted.

pub mod file;
pub mod http;
pub mod local;
pub mod link;
pub mod multi;
pub mod plan;
pub mod refused;
pub mod retry;
pub mod s3;
pub mod verified;

use std::ops::Range;

use bytes::Bytes;
use futures_util::future::BoxFuture;

pub use file::FileSource;
pub use http::HttpSource;
pub use link::{LinkEstimate, LinkMeter};
pub use plan::{plan_requests, RequestLimits};
pub use retry::{fetch_many_with_retry, fetch_with_retry, RetryPolicy};

/// Bytes read when a source is opened: the EROFS superblock (at 1024). Kept
/// to one page: a bigger probe (128 KiB was tried, to give the link meter a
/// bandwidth sample) fetches data before anything asks for it, into another
/// segment of a layout, and past what a first mount needs; the walk's first
/// batches are planned with the meter's default until it has a sample.
pub const PROBE_LEN: u64 = 4096;

/// Why a fetch failed. Transient failures are retried, permanent ones not.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl FetchError {
    pub fn is_transient(&self) -> bool {
        matches!(self, FetchError::Transient(_))
    }
}

impl From<crate::http::HttpError> for FetchError {
    fn from(e: crate::http::HttpError) -> FetchError {
        if e.is_transient() {
            FetchError::Transient(e.to_string())
        } else {
            FetchError::Permanent(e.to_string())
        }
    }
}

/// Whether one request of a source can carry several ranges
/// (`Range: bytes=a-b,c-d` answered with `206 multipart/byteranges`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultiRange {
    /// Not tried yet: the first multi-range request is the probe.
    Unknown,
    Supported,
    /// Never asked again (the source fell back once, or cannot do it).
    Unsupported,
}

impl MultiRange {
    pub fn as_str(self) -> &'static str {
        match self {
            MultiRange::Unknown => "unknown",
            MultiRange::Supported => "yes",
            MultiRange::Unsupported => "no",
        }
    }
}

/// What [`RangeSource::fetch_many`] returns: the bytes of each asked range,
/// in asked order, and how many requests the source made for them.
#[derive(Debug, Default)]
pub struct Parts {
    pub bytes: Vec<Bytes>,
    pub requests: u32,
}

/// A source of byte ranges of one blob.
pub trait RangeSource: Send + Sync {
    /// Total size of the blob in bytes.
    fn size(&self) -> u64;
    /// Fetches exactly `range` (already clamped to the blob size by the caller).
    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>>;
    /// The range a fetch of `range` should be widened to, so the source
    /// serves whole units of its own (a gzip span: decompression starts at a
    /// checkpoint anyway). The scheduler rounds misses out to it and writes
    /// the whole granule. Default: `range` unchanged.
    fn granule(&self, range: Range<u64>) -> Range<u64> {
        range
    }
    /// A check of the whole source once every byte of it was served (a gzip
    /// layer's blob digest). `Ok(None)`: nothing to check.
    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        Box::pin(async { Ok(None) })
    }
    /// Fetches several ranges (sorted, disjoint, non-empty, inside the blob)
    /// in as few requests as the source can: one multi-range request where
    /// the server takes them. Returns exactly the asked bytes, in order. The
    /// default makes one request per range, a few at a time.
    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(async move {
            check_ranges(&ranges, self.size())?;
            multi::fetch_merged(|r| self.fetch(r), &ranges, 0, u64::MAX).await
        })
    }
    /// Whether [`fetch_many`](Self::fetch_many) can carry several ranges in
    /// one request (planners merge tighter when it can).
    fn multi_range(&self) -> MultiRange {
        MultiRange::Unsupported
    }
    /// What a request costs (measured where the source measures it).
    fn link(&self) -> LinkEstimate {
        LinkEstimate::default()
    }
    /// A short, credential-free description for logs and status.
    fn describe(&self) -> String;
    /// Which endpoint (registry, mirror, CDN) served the last data, when the
    /// source has several; credential-free.
    fn served_by(&self) -> Option<String> {
        None
    }
    /// The region around byte `offset` whose bytes come from one source: the fetch scheduler's
    /// units and read-ahead stop at its ends, so reading one part of an address space made of
    /// several sources never asks the others. Default: the whole blob.
    fn region(&self, offset: u64) -> Range<u64> {
        let _ = offset;
        0..self.size()
    }
}

/// Checks the ranges of a `fetch_many` call: sorted, disjoint, non-empty,
/// inside a blob of `size` bytes.
pub fn check_ranges(ranges: &[Range<u64>], size: u64) -> Result<(), FetchError> {
    let sorted = ranges.windows(2).all(|w| w[0].end <= w[1].start);
    let inside = ranges.iter().all(|r| r.start < r.end && r.end <= size);
    if sorted && inside {
        Ok(())
    } else {
        Err(FetchError::Permanent(format!(
            "{} ranges not sorted, disjoint and inside the blob of {size} bytes",
            ranges.len()
        )))
    }
}

/// Checks a parsed `Content-Range: bytes a-b/total` against the request.
pub fn check_content_range(
    header: &str,
    asked: &Range<u64>,
    expected_total: Option<u64>,
) -> Result<u64, FetchError> {
    let (start, end_incl, total) = parse_content_range(header)
        .ok_or_else(|| FetchError::Permanent(format!("malformed Content-Range {header:?}")))?;
    if start != asked.start || end_incl.checked_add(1) != Some(asked.end) {
        return Err(FetchError::Permanent(format!(
            "server sent bytes {start}-{end_incl}, asked for {}-{}",
            asked.start,
            asked.end.saturating_sub(1)
        )));
    }
    if let (Some(expected), Some(total)) = (expected_total, total) {
        if expected != total {
            return Err(FetchError::Permanent(format!(
                "blob size changed: server says {total} bytes, expected {expected}"
            )));
        }
    }
    total.ok_or_else(|| FetchError::Permanent("Content-Range has no total size".into()))
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(header: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = header.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t: u64 = t.parse().ok()?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, end, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_and_validates() {
        assert_eq!(parse_content_range("bytes 0-4095/10000"), Some((0, 4095, Some(10000))));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-3/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes -1/2"), None);
    }

    #[test]
    fn content_range_must_match_request_and_size() {
        assert_eq!(check_content_range("bytes 0-9/100", &(0..10), Some(100)).unwrap(), 100);
        assert!(check_content_range("bytes 0-9/100", &(0..11), Some(100)).is_err());
        assert!(check_content_range("bytes 1-10/100", &(0..10), Some(100)).is_err());
        assert!(check_content_range("bytes 0-9/101", &(0..10), Some(100)).is_err());
    }
}
