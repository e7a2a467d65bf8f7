//! Plain HTTP(S) remote: a Range-capable URL of a blob or image file.

use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use super::{check_content_range, FetchError, RangeSource};

/// Bytes read at open time: enough for the EROFS superblock (at 1024).
pub const PROBE_LEN: u64 = 4096;

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Per-request bound (headers and body).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { request_timeout: Duration::from_secs(10), connect_timeout: Duration::from_secs(5) }
    }
}

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
    pub async fn open(url: &str, cfg: &HttpConfig) -> Result<(HttpSource, Bytes), OpenError> {
        let url = reqwest::Url::parse(url).map_err(|_| OpenError::BadUrl(redact_url(url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OpenError::BadUrl(redact_url(url.as_str())));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| FetchError::Permanent(format!("cannot build HTTP client: {e}")))?;
        let shown = redact_url(url.as_str());
        let resp = client
            .get(url.clone())
            .header(RANGE, format!("bytes=0-{}", PROBE_LEN - 1))
            .send()
            .await
            .map_err(|e| classify_send_error(&e, &shown))?;
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
            other => return Err(status_error(other, &shown).into()),
        };
        let probe = read_body(resp, want).await?;
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
            let resp = self
                .client
                .get(self.url.clone())
                .header(RANGE, format!("bytes={}-{}", range.start, range.end - 1))
                .send()
                .await
                .map_err(|e| classify_send_error(&e, &shown))?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let cr = header_str(&resp, CONTENT_RANGE)
                        .ok_or_else(|| FetchError::Permanent(format!("{shown}: 206 without Content-Range")))?;
                    check_content_range(&cr, &range, Some(self.size))?;
                }
                StatusCode::OK if range.start == 0 && range.end == self.size => {}
                other => return Err(status_error(other, &shown)),
            }
            read_body(resp, range.end - range.start).await
        })
    }

    fn describe(&self) -> String {
        redact_url(self.url.as_str())
    }
}

fn header_str(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Reads exactly `want` bytes; a longer body is an error, a shorter one transient.
pub(crate) async fn read_body(mut resp: reqwest::Response, want: u64) -> Result<Bytes, FetchError> {
    if let Some(len) = resp.content_length() {
        if len != want {
            return Err(FetchError::Permanent(format!("Content-Length {len}, expected {want}")));
        }
    }
    let cap = usize::try_from(want).map_err(|_| FetchError::Permanent("range too large".into()))?;
    let mut buf = BytesMut::with_capacity(cap);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > cap {
                    return Err(FetchError::Permanent(format!("body longer than the {want} bytes asked")));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(FetchError::Transient(format!("body read failed after {} of {want} bytes: {}", buf.len(), error_chain(&e)))),
        }
    }
    if buf.len() != cap {
        return Err(FetchError::Transient(format!("short body: {} of {want} bytes", buf.len())));
    }
    Ok(buf.freeze())
}

pub(crate) fn status_error(status: StatusCode, shown: &str) -> FetchError {
    let code = status.as_u16();
    match code {
        404 => FetchError::Permanent(format!("{shown}: not found (HTTP 404)")),
        401 | 403 => FetchError::Permanent(format!("{shown}: access denied (HTTP {code})")),
        416 => FetchError::Permanent(format!("{shown}: range not satisfiable (HTTP 416)")),
        408 | 429 | 500..=599 => FetchError::Transient(format!("{shown}: server error (HTTP {code})")),
        _ => FetchError::Permanent(format!("{shown}: unexpected HTTP status {code}")),
    }
}

fn classify_send_error(e: &reqwest::Error, shown: &str) -> FetchError {
    let chain = error_chain(e);
    if e.is_timeout() {
        FetchError::Transient(format!("{shown}: request timed out"))
    } else if e.is_connect() {
        FetchError::Transient(format!("{shown}: cannot connect: {chain}"))
    } else if e.is_builder() {
        FetchError::Permanent(format!("{shown}: {chain}"))
    } else {
        FetchError::Transient(format!("{shown}: {chain}"))
    }
}

/// The innermost useful cause, e.g. "Connection refused (os error 111)".
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        last = s.to_string();
        cur = s.source();
    }
    last
}

/// A URL fit for logs and status: no user info, no query (tokens live there).
pub use erofs_fanotify_state::redact_url;
