//! Plain HTTP(S) remote: a Range-capable URL of a blob or image file.

use std::ops::Range;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::http::{self, redact_url, ClientConfig};

use super::{check_content_range, FetchError, RangeSource, PROBE_LEN};

pub struct HttpSource {
    client: reqwest::Client,
    url: reqwest::Url,
    size: u64,
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
        let answer = http::follow(&client, reqwest::Method::GET, url.clone(), range_headers(&(0..PROBE_LEN))?, None)
            .await
            .map_err(FetchError::from)?;
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
        Ok((HttpSource { client, url, size }, probe))
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
            let resp = http::follow(&self.client, reqwest::Method::GET, self.url.clone(), range_headers(&range)?, None)
                .await?
                .response;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let cr = header_str(&resp, CONTENT_RANGE)
                        .ok_or_else(|| FetchError::Permanent(format!("{shown}: 206 without Content-Range")))?;
                    check_content_range(&cr, &range, Some(self.size))?;
                }
                StatusCode::OK if range.start == 0 && range.end == self.size => {}
                other => return Err(http::status_error(other, &shown).into()),
            }
            Ok(http::read_exact(resp, range.end - range.start).await?)
        })
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
