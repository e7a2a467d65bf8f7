//! The agent's view of an OCI blob: a [`RangeSource`] doing Range GETs.
//!
//! Endpoints are tried in order: the mirrors, then the registry itself. A
//! mirror that fails is skipped for a while ([`MIRROR_BACKOFF`]) and the
//! read goes on to the next endpoint; the registry's own error is what the
//! caller sees. A blob GET that was redirected (registries send blobs to a
//! CDN) leaves its target cached for [`REDIRECT_TTL`] or until it fails; the
//! `Authorization` header never follows a redirect off the origin. Every
//! answer is checked: 206 with a Content-Range whose total is the size from
//! the descriptor, and exactly the bytes asked.

use std::ops::Range;
use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode, Url};

use super::transport::{authorized, Endpoint};
use super::OciError;
use crate::http::{self, follow, origin};
use crate::remote::link::{LinkEstimate, LinkMeter, Sample};
use crate::remote::multi::{self, MultiAnswer, MultiRangeState};
use crate::remote::plan::MAX_PARTS;
use crate::remote::{check_content_range, check_ranges, FetchError, MultiRange, Parts, RangeSource};

/// A failed mirror is not asked again for this long.
pub const MIRROR_BACKOFF: Duration = Duration::from_secs(30);
/// A blob redirect target is reused at most this long (signed CDN URLs expire).
pub const REDIRECT_TTL: Duration = Duration::from_secs(300);

struct CachedRedirect {
    url: Url,
    /// Off the endpoint's origin: sent without Authorization.
    left_origin: bool,
    until: Instant,
}

pub struct EndpointState {
    pub endpoint: Endpoint,
    down_until: Mutex<Option<Instant>>,
    redirect: Mutex<Option<CachedRedirect>>,
}

impl EndpointState {
    pub fn new(endpoint: Endpoint) -> EndpointState {
        EndpointState { endpoint, down_until: Mutex::new(None), redirect: Mutex::new(None) }
    }

    fn is_down(&self) -> bool {
        self.down_until.lock().is_some_and(|t| Instant::now() < t)
    }

    fn set_down(&self, down: bool) {
        *self.down_until.lock() = down.then(|| Instant::now() + MIRROR_BACKOFF);
    }

    fn cached_redirect(&self) -> Option<(Url, bool)> {
        let mut g = self.redirect.lock();
        match &*g {
            Some(c) if Instant::now() < c.until => Some((c.url.clone(), c.left_origin)),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }
}

pub struct OciSource {
    client: reqwest::Client,
    /// Mirrors first, the registry last.
    endpoints: Vec<EndpointState>,
    digest: String,
    size: u64,
    /// Credential-free, e.g. `docker.io/library/x:1`.
    reference: String,
    served_by: Mutex<Option<String>>,
    /// Multi-range support of the endpoint (or CDN) serving us.
    multi: MultiRangeState,
    meter: LinkMeter,
}

/// What one blob GET asks for.
#[derive(Clone, Copy)]
enum Want<'a> {
    One(&'a Range<u64>),
    Many(&'a [Range<u64>]),
}

/// What it got.
enum Got {
    One(Bytes),
    Many(MultiAnswer),
}

impl OciSource {
    pub fn new(client: reqwest::Client, endpoints: Vec<EndpointState>, digest: String, size: u64, reference: String) -> OciSource {
        OciSource {
            client,
            endpoints,
            digest,
            size,
            reference,
            served_by: Mutex::new(None),
            multi: MultiRangeState::default(),
            meter: LinkMeter::default(),
        }
    }

    async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, FetchError> {
        if range.start >= range.end || range.end > self.size {
            return Err(FetchError::Permanent(format!("range {range:?} outside blob of {} bytes", self.size)));
        }
        match self.fetch_want(Want::One(&range)).await? {
            Got::One(b) => Ok(b),
            Got::Many(_) => Err(FetchError::Permanent("internal: a multi-range answer to a single range".into())),
        }
    }

    async fn fetch_many_inner(&self, ranges: Vec<Range<u64>>) -> Result<Parts, FetchError> {
        check_ranges(&ranges, self.size)?;
        if ranges.len() == 1 {
            let b = self.fetch_range(ranges[0].clone()).await?;
            return Ok(Parts { bytes: vec![b], requests: 1 });
        }
        let mut out = Parts::default();
        for chunk in ranges.chunks(MAX_PARTS) {
            if self.multi.get() != MultiRange::Unsupported && chunk.len() > 1 {
                match self.fetch_want(Want::Many(chunk)).await? {
                    Got::Many(MultiAnswer::Parts(bytes)) => {
                        self.multi.supported();
                        out.bytes.extend(bytes);
                        out.requests += 1;
                        continue;
                    }
                    Got::Many(MultiAnswer::Fallback(why)) => {
                        out.requests += 1;
                        self.multi.unsupported(&self.describe(), &why);
                    }
                    Got::One(_) => return Err(FetchError::Permanent("internal: a single answer to a multi-range request".into())),
                }
            }
            let gap = self.meter.estimate().request_gap();
            let got = multi::fetch_merged(|r| self.fetch_range(r), chunk, gap, 8 << 20).await?;
            out.bytes.extend(got.bytes);
            out.requests += got.requests;
        }
        Ok(out)
    }

    /// Tries the endpoints in order (see the module docs).
    async fn fetch_want(&self, want: Want<'_>) -> Result<Got, FetchError> {
        let last = self.endpoints.len().saturating_sub(1);
        let mut last_error = FetchError::Permanent("no endpoint to read from".into());
        for (i, st) in self.endpoints.iter().enumerate() {
            if i != last && st.is_down() {
                continue;
            }
            match self.fetch_from(st, want).await {
                Ok((got, served)) => {
                    if i != last {
                        st.set_down(false);
                    }
                    *self.served_by.lock() = Some(served);
                    return Ok(got);
                }
                Err(e) if i != last => {
                    tracing::warn!(endpoint = %st.endpoint.shown(), error = %e, "mirror failed; trying the next endpoint");
                    st.set_down(true);
                    last_error = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error)
    }

    /// Reads an answer as `want` says, timing it for the link meter.
    async fn read_want(&self, resp: reqwest::Response, want: Want<'_>, shown: &str, sent: Instant) -> Result<Got, FetchError> {
        let first_byte = sent.elapsed();
        match want {
            Want::One(range) => {
                let bytes = read_range(resp, range, self.size, shown).await?;
                self.meter.observe(Sample { first_byte, body: sent.elapsed() - first_byte, bytes: bytes.len() as u64, parts: 1 });
                Ok(Got::One(bytes))
            }
            Want::Many(ranges) => {
                let answer = multi::read_multi(resp, ranges, self.size, shown).await?;
                if let MultiAnswer::Parts(_) = &answer {
                    let bytes = crate::ranges::total_len(ranges);
                    self.meter.observe(Sample { first_byte, body: sent.elapsed() - first_byte, bytes, parts: ranges.len() });
                }
                Ok(Got::Many(answer))
            }
        }
    }

    async fn fetch_from(&self, st: &EndpointState, want: Want<'_>) -> Result<(Got, String), FetchError> {
        let mut headers = HeaderMap::new();
        let value = match want {
            Want::One(range) => format!("bytes={}-{}", range.start, range.end - 1),
            Want::Many(ranges) => crate::http::multipart::range_header(ranges),
        };
        let r = HeaderValue::from_str(&value).map_err(|_| FetchError::Permanent("bad range".into()))?;
        headers.insert(RANGE, r);
        if let Some((url, left_origin)) = st.cached_redirect() {
            let auth = if left_origin { None } else { st.endpoint.auth.header(&self.client).await.ok().and_then(|h| h.0) };
            let tried = async {
                let sent = Instant::now();
                let answer = follow(&self.client, Method::GET, url.clone(), headers.clone(), auth.as_deref()).await?;
                self.read_want(answer.response, want, &origin(&answer.final_url), sent).await
            };
            match tried.await {
                Ok(got) => return Ok((got, format!("{} (redirected from {})", origin(&url), st.endpoint.shown()))),
                Err(e) => {
                    tracing::debug!(target = %origin(&url), error = %e, "cached blob redirect failed; asking the registry again");
                    *st.redirect.lock() = None;
                }
            }
        }
        let url = st.endpoint.url(&format!("blobs/{}", self.digest)).map_err(FetchError::from)?;
        let sent = Instant::now();
        let answer = authorized(&self.client, &st.endpoint, Method::GET, url.clone(), headers).await?;
        let final_url = answer.final_url.clone();
        let left_origin = answer.left_origin;
        let got = self.read_want(answer.response, want, &origin(&final_url), sent).await?;
        if final_url != url {
            *st.redirect.lock() = Some(CachedRedirect { url: final_url.clone(), left_origin, until: Instant::now() + REDIRECT_TTL });
            return Ok((got, format!("{} (redirected from {})", origin(&final_url), st.endpoint.shown())));
        }
        Ok((got, st.endpoint.shown()))
    }
}

impl From<OciError> for FetchError {
    fn from(e: OciError) -> FetchError {
        if e.is_transient() {
            FetchError::Transient(e.to_string())
        } else {
            FetchError::Permanent(e.to_string())
        }
    }
}

impl RangeSource for OciSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(self.fetch_range(range))
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
        match self.served_by() {
            Some(s) => format!("{}@{} via {s}", self.reference, self.digest),
            None => format!("{}@{}", self.reference, self.digest),
        }
    }

    fn served_by(&self) -> Option<String> {
        self.served_by.lock().clone()
    }
}

/// Checks a blob range answer and reads exactly the bytes asked.
pub async fn read_range(resp: reqwest::Response, range: &Range<u64>, size: u64, shown: &str) -> Result<Bytes, FetchError> {
    let status = resp.status();
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| FetchError::Permanent(format!("{shown}: 206 without Content-Range")))?
                .to_string();
            check_content_range(&cr, range, Some(size)).map_err(|e| match e {
                FetchError::Permanent(m) | FetchError::Transient(m) => FetchError::Permanent(format!("{shown}: {m}")),
            })?;
        }
        // A server that ignores Range is fine only when the whole blob was asked.
        StatusCode::OK if range.start == 0 && range.end == size => {}
        StatusCode::OK => return Err(FetchError::Permanent(format!("{shown}: server ignores HTTP Range requests"))),
        other => return Err(http::status_error(other, shown).into()),
    }
    Ok(http::read_exact(resp, range.end - range.start).await?)
}


