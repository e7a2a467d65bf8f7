//! Plain HTTP(S) remote: a Range-capable URL of a blob or image file.

use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::http::{self, redact_url, ClientConfig};

use super::link::{LinkEstimate, LinkMeter, Sample};
use super::multi::{self, MultiAnswer, MultiRangeState};
use super::plan::MAX_PARTS;
use super::{check_content_range, check_ranges, FetchError, MultiRange, Parts, RangeSource, PROBE_LEN};

pub struct HttpSource {
    client: reqwest::Client,
    url: reqwest::Url,
    size: u64,
    multi: MultiRangeState,
    meter: LinkMeter,
}

/// Errors at open time, worded for the one line `erofs-mount` prints.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid URL {0:?}")]
    BadUrl(String),
    #[error("{0}")]
    Fetch(#[from] FetchError),
}

impl HttpSource {
    /// Connects, learns the blob size from the first range response and
    /// returns the first bytes (the superblock probe) along with the source.
    pub async fn open(url: &str, cfg: &ClientConfig) -> Result<(HttpSource, Bytes), OpenError> {
        let url = reqwest::Url::parse(url).map_err(|_| OpenError::BadUrl(redact_url(url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OpenError::BadUrl(redact_url(url.as_str())));
        }
        let client = http::build_client(cfg).map_err(FetchError::from)?;
        let shown = redact_url(url.as_str());
        let sent = Instant::now();
        let answer = http::follow(&client, reqwest::Method::GET, url.clone(), range_headers(&(0..PROBE_LEN))?, None)
            .await
            .map_err(FetchError::from)?;
        let first_byte = sent.elapsed();
        let resp = answer.response;
        let status = resp.status();
        let (size, want) = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(&resp, CONTENT_RANGE)
                    .ok_or_else(|| FetchError::Permanent(format!("{shown}: 206 response without Content-Range")))?;
                let (start, end, total) = super::parse_content_range(&cr)
                    .ok_or_else(|| FetchError::Permanent(format!("{shown}: malformed Content-Range {cr:?}")))?;
                let total = total
                    .ok_or_else(|| FetchError::Permanent(format!("{shown}: server does not report the blob size")))?;
                if start != 0 || end + 1 != PROBE_LEN.min(total) {
                    return Err(FetchError::Permanent(format!("{shown}: server sent bytes {start}-{end} for 0-{}", PROBE_LEN - 1)).into());
                }
                (total, end + 1)
            }
            StatusCode::OK => {
                return Err(FetchError::Permanent(format!(
                    "{shown}: server does not support HTTP Range requests"
                ))
                .into())
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(FetchError::Permanent(format!("{shown}: blob is empty")).into())
            }
            other => return Err(FetchError::from(http::status_error(other, &shown)).into()),
        };
        let probe = http::read_exact(resp, want).await.map_err(FetchError::from)?;
        let meter = LinkMeter::default();
        meter.observe(Sample { first_byte, body: sent.elapsed() - first_byte, bytes: want, parts: 1 });
        Ok((HttpSource { client, url, size, multi: MultiRangeState::default(), meter }, probe))
    }

    /// One multi-range request for `ranges` (at most [`MAX_PARTS`]).
    async fn fetch_multi(&self, ranges: &[Range<u64>]) -> Result<MultiAnswer, FetchError> {
        let shown = self.describe();
        let mut h = reqwest::header::HeaderMap::new();
        let v = reqwest::header::HeaderValue::from_str(&http::multipart::range_header(ranges))
            .map_err(|_| FetchError::Permanent("bad range".into()))?;
        h.insert(RANGE, v);
        let sent = Instant::now();
        let resp = http::follow(&self.client, reqwest::Method::GET, self.url.clone(), h, None).await?.response;
        let first_byte = sent.elapsed();
        let answer = multi::read_multi(resp, ranges, self.size, &shown).await?;
        if let MultiAnswer::Parts(_) = &answer {
            let bytes = crate::ranges::total_len(ranges);
            self.meter.observe(Sample { first_byte, body: sent.elapsed() - first_byte, bytes, parts: ranges.len() });
        }
        Ok(answer)
    }

    async fn fetch_many_inner(&self, ranges: Vec<Range<u64>>) -> Result<Parts, FetchError> {
        check_ranges(&ranges, self.size)?;
        if ranges.len() == 1 {
            let b = self.fetch(ranges[0].clone()).await?;
            return Ok(Parts { bytes: vec![b], requests: 1 });
        }
        let mut out = Parts::default();
        for chunk in ranges.chunks(MAX_PARTS) {
            if self.multi.get() != MultiRange::Unsupported && chunk.len() > 1 {
                match self.fetch_multi(chunk).await? {
                    MultiAnswer::Parts(bytes) => {
                        self.multi.supported();
                        out.bytes.extend(bytes);
                        out.requests += 1;
                        continue;
                    }
                    MultiAnswer::Fallback(why) => {
                        out.requests += 1;
                        self.multi.unsupported(&self.describe(), &why);
                    }
                }
            }
            let gap = self.meter.estimate().request_gap();
            let got = multi::fetch_merged(|r| self.fetch(r), chunk, gap, 8 << 20).await?;
            out.bytes.extend(got.bytes);
            out.requests += got.requests;
        }
        Ok(out)
    }
}

impl RangeSource for HttpSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            if range.start >= range.end || range.end > self.size {
                return Err(FetchError::Permanent(format!("range {range:?} outside blob of {} bytes", self.size)));
            }
            let shown = self.describe();
            let sent = Instant::now();
            let resp = http::follow(&self.client, reqwest::Method::GET, self.url.clone(), range_headers(&range)?, None)
                .await?
                .response;
            let first_byte = sent.elapsed();
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let cr = header_str(&resp, CONTENT_RANGE)
                        .ok_or_else(|| FetchError::Permanent(format!("{shown}: 206 without Content-Range")))?;
                    check_content_range(&cr, &range, Some(self.size))?;
                }
                StatusCode::OK if range.start == 0 && range.end == self.size => {}
                other => return Err(http::status_error(other, &shown).into()),
            }
            let bytes = http::read_exact(resp, range.end - range.start).await?;
            self.meter.observe(Sample { first_byte, body: sent.elapsed() - first_byte, bytes: bytes.len() as u64, parts: 1 });
            Ok(bytes)
        })
    }

    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(self.fetch_many_inner(ranges))
    }

    fn multi_range(&self) -> MultiRange {
        self.multi.get()
    }

    fn link(&self) -> LinkEstimate {
        self.meter.estimate()
    }

    fn describe(&self) -> String {
        redact_url(self.url.as_str())
    }
}

fn header_str(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn range_headers(range: &Range<u64>) -> Result<reqwest::header::HeaderMap, FetchError> {
    let mut h = reqwest::header::HeaderMap::new();
    let v = reqwest::header::HeaderValue::from_str(&format!("bytes={}-{}", range.start, range.end.saturating_sub(1)))
        .map_err(|_| FetchError::Permanent("bad range".into()))?;
    h.insert(RANGE, v);
    Ok(h)
}
