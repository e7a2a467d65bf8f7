//! Requests to one bucket over one or more endpoints (the later ones mirrors of the first): HEAD of
//! an object, ranged GETs, listing pages. Endpoints are tried in order; one that fails is skipped
//! for [`ENDPOINT_BACKOFF`] while another answers. Every answer is checked: a range is 206 with
//! the Content-Range asked, the object's size and ETag, and exactly the bytes asked (200 to a range
//! request is an error and its body is not read). Refused credentials (403) are re-read once from
//! their file, when they came from one.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED};
use reqwest::{Method, StatusCode, Url};

use super::credentials::{CredentialOrigin, S3Credentials};
use super::error::{classify, parse_error_body, ErrorContext, S3Error};
use super::list::{self, ListPage, ListQuery, ListVersion, Listing};
use super::location::{effective_url_style, request_url, shown};
use super::options::{SigVersion, UrlStyle};
use super::sign;

/// A failed endpoint is not asked again for this long while another answers.
pub const ENDPOINT_BACKOFF: Duration = Duration::from_secs(30);
/// Error bodies are small XML documents.
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Bound on listing pages (10^9 keys at 1000 a page): a store that never ends its listing fails.
const MAX_LIST_PAGES: u32 = 1_000_000;
/// Truncated pages that bring nothing new, in a row, before a listing is given up.
const MAX_EMPTY_PAGES: u32 = 100;

/// What HEAD says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// As sent by the store, quotes included.
    pub etag: String,
    /// Present on versioned buckets: reads then name this version.
    pub version_id: Option<String>,
    pub last_modified: Option<String>,
}

/// How to reach a bucket.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub bucket: String,
    /// Base URLs, in order.
    pub endpoints: Vec<Url>,
    pub region: String,
    /// `None`: per endpoint, see [`effective_url_style`].
    pub url_style: Option<UrlStyle>,
    pub sig: SigVersion,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

struct EndpointState {
    url: Url,
    shown: String,
    style: UrlStyle,
    down_until: Mutex<Option<Instant>>,
}

impl EndpointState {
    fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|t| Instant::now() < t)
    }
    fn set_down(&self, down: bool) {
        *lock(&self.down_until) = down.then(|| Instant::now() + ENDPOINT_BACKOFF);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct CredentialState {
    generation: u64,
    credentials: Option<Arc<S3Credentials>>,
}

pub struct S3Client {
    http: reqwest::Client,
    endpoints: Vec<EndpointState>,
    bucket: String,
    region: String,
    sig: SigVersion,
    credentials: RwLock<CredentialState>,
    origin: CredentialOrigin,
    requests: AtomicU64,
    served_by: Mutex<Option<String>>,
}

/// One request, tried against the endpoints in turn.
enum Operation<'a> {
    Head { key: &'a str },
    Get { key: &'a str, range: Range<u64>, info: &'a ObjectInfo },
    List { query: Vec<(String, String)> },
}

enum Outcome {
    Head(ObjectInfo),
    Bytes(Bytes),
    Page(ListPage),
}

impl S3Client {
    pub fn new(cfg: &ClientConfig, credentials: Option<S3Credentials>, origin: CredentialOrigin) -> Result<S3Client, S3Error> {
        if cfg.endpoints.is_empty() {
            return Err(S3Error::Config("no S3 endpoint".into()));
        }
        // S3 answers errors with bodies and never redirects a GET we should follow blindly:
        // the shared client follows no redirects.
        let http = crate::http::build_client(&crate::http::ClientConfig {
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            ca_file: None,
        })
        .map_err(|e| S3Error::Config(e.to_string()))?;
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|url| EndpointState {
                url: url.clone(),
                shown: shown(url),
                style: effective_url_style(cfg.url_style, url, &cfg.bucket),
                down_until: Mutex::new(None),
            })
            .collect();
        Ok(S3Client {
            http,
            endpoints,
            bucket: cfg.bucket.clone(),
            region: cfg.region.clone(),
            sig: cfg.sig,
            credentials: RwLock::new(CredentialState { generation: 0, credentials: credentials.map(Arc::new) }),
            origin,
            requests: AtomicU64::new(0),
            served_by: Mutex::new(None),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// HTTP requests sent so far (all endpoints, retries included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The endpoint that gave the last successful answer.
    pub fn served_by(&self) -> Option<String> {
        lock(&self.served_by).clone()
    }

    /// Size, ETag and version of `key`.
    pub async fn head_object(&self, key: &str) -> Result<ObjectInfo, S3Error> {
        match self.run(&Operation::Head { key }).await? {
            Outcome::Head(info) => Ok(info),
            _ => Err(self.internal()),
        }
    }

    /// Exactly `range` of the version of `key` that `info` describes.
    pub async fn get_range(&self, key: &str, range: Range<u64>, info: &ObjectInfo) -> Result<Bytes, S3Error> {
        if range.start >= range.end || range.end > info.size {
            return Err(S3Error::Config(format!("range {range:?} outside the object of {} bytes", info.size)));
        }
        match self.run(&Operation::Get { key, range, info }).await? {
            Outcome::Bytes(b) => Ok(b),
            _ => Err(self.internal()),
        }
    }

    /// One listing page after `cursor` (v2: a continuation token; v1: a marker).
    pub async fn list_page(&self, version: ListVersion, query: &ListQuery, cursor: Option<&str>) -> Result<ListPage, S3Error> {
        let query = list::page_query(version, query, cursor);
        match self.run(&Operation::List { query }).await? {
            Outcome::Page(p) => Ok(p),
            _ => Err(self.internal()),
        }
    }

    /// Every page of a listing, at most `max_objects` keys (more is an error, not a silent cut).
    /// A store without v2 answers `list-type=2` with a v1 page (a truncated page with no
    /// continuation token): the listing goes on with v1 markers.
    pub async fn list_all(&self, version: ListVersion, query: &ListQuery, max_objects: usize) -> Result<Listing, S3Error> {
        let mut version = version;
        let mut out = Listing::default();
        let mut cursor: Option<String> = None;
        let mut seen_prefixes = std::collections::HashSet::new();
        let mut empty_pages = 0u32;
        loop {
            let page = self.list_page(version, query, cursor.as_deref()).await?;
            let (before_objects, before_prefixes) = (out.objects.len(), out.common_prefixes.len());
            out.pages += 1;
            let next = match version {
                ListVersion::V2 if page.truncated && page.next_continuation_token.is_none() && cursor.is_none() => {
                    tracing::info!(bucket = %self.bucket, "the store answers ListObjectsV2 with v1 pages; listing with markers");
                    version = ListVersion::V1;
                    page.v1_next_marker()
                }
                ListVersion::V2 => page.next_continuation_token.clone(),
                ListVersion::V1 => page.v1_next_marker(),
            };
            let truncated = page.truncated;
            out.objects.extend(page.objects);
            // Some stores (moto) repeat the common prefixes on every page.
            for p in page.common_prefixes {
                if seen_prefixes.insert(p.clone()) {
                    out.common_prefixes.push(p);
                }
            }
            if out.objects.len() > max_objects {
                return Err(self.protocol(format!("bucket {} has more than {max_objects} objects under {:?}", self.bucket, query.prefix)));
            }
            if !truncated {
                return Ok(out);
            }
            let next = next.ok_or_else(|| self.protocol("a truncated listing without a next token or marker".into()))?;
            // A cursor that does not move, or pages that stay empty, would loop forever. (v1 markers
            // are keys on S3 but opaque tokens on some stores, so only "moved" is checked.)
            empty_pages = if out.objects.len() == before_objects && out.common_prefixes.len() == before_prefixes { empty_pages + 1 } else { 0 };
            if cursor.as_deref() == Some(next.as_str()) || empty_pages > MAX_EMPTY_PAGES || out.pages >= MAX_LIST_PAGES {
                return Err(self.protocol("the listing does not advance".into()));
            }
            cursor = Some(next);
        }
    }

    fn internal(&self) -> S3Error {
        self.protocol("internal error: mismatched answer".into())
    }

    fn protocol(&self, what: String) -> S3Error {
        S3Error::Protocol { endpoint: self.endpoints.first().map(|e| e.shown.clone()).unwrap_or_default(), what }
    }

    /// Tries the endpoints in order (skipping ones that failed lately, unless all did). The error
    /// reported when all fail is the most telling one: a store's answer beats "unreachable".
    async fn run(&self, op: &Operation<'_>) -> Result<Outcome, S3Error> {
        let fresh: Vec<&EndpointState> = self.endpoints.iter().filter(|e| !e.is_down()).collect();
        let order: Vec<&EndpointState> = if fresh.is_empty() { self.endpoints.iter().collect() } else { fresh };
        let several = self.endpoints.len() > 1;
        let mut best: Option<S3Error> = None;
        for ep in order {
            match self.attempt_with_fresh_credentials(ep, op).await {
                Ok(outcome) => {
                    if several {
                        ep.set_down(false);
                    }
                    *lock(&self.served_by) = Some(ep.shown.clone());
                    return Ok(outcome);
                }
                Err(e) => {
                    if several {
                        tracing::warn!(endpoint = %ep.shown, error = %e, "S3 endpoint failed; trying the next one");
                        ep.set_down(true);
                    }
                    if best.as_ref().is_none_or(|b| e.weight() > b.weight()) {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.unwrap_or_else(|| self.protocol("no endpoint to ask".into())))
    }

    /// One attempt; after a refusal of the credentials, one more with the file re-read.
    async fn attempt_with_fresh_credentials(&self, ep: &EndpointState, op: &Operation<'_>) -> Result<Outcome, S3Error> {
        let (generation, creds) = self.current_credentials();
        match self.attempt(ep, op, creds.as_deref()).await {
            Err(e) if e.is_auth() && self.refresh_credentials(generation) => {
                tracing::info!(origin = %self.origin.describe(), "credentials refused; retrying with the re-read ones");
                let (_, creds) = self.current_credentials();
                self.attempt(ep, op, creds.as_deref()).await
            }
            other => other,
        }
    }

    fn current_credentials(&self) -> (u64, Option<Arc<S3Credentials>>) {
        let g = self.credentials.read().unwrap_or_else(|p| p.into_inner());
        (g.generation, g.credentials.clone())
    }

    /// Re-reads file-based credentials; true when a retry may succeed (they changed, now or since
    /// `seen_generation`).
    fn refresh_credentials(&self, seen_generation: u64) -> bool {
        if !self.origin.is_file_based() {
            return false;
        }
        let mut g = self.credentials.write().unwrap_or_else(|p| p.into_inner());
        if g.generation != seen_generation {
            return true;
        }
        match self.origin.reread(&self.bucket) {
            Ok(Some(new)) if g.credentials.as_deref() != Some(&new) => {
                g.credentials = Some(Arc::new(new));
                g.generation += 1;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the S3 credentials");
                false
            }
        }
    }

    async fn attempt(&self, ep: &EndpointState, op: &Operation<'_>, creds: Option<&S3Credentials>) -> Result<Outcome, S3Error> {
        match op {
            Operation::Head { key } => self.head_at(ep, key, creds).await.map(Outcome::Head),
            Operation::Get { key, range, info } => self.get_at(ep, key, range, info, creds).await.map(Outcome::Bytes),
            Operation::List { query } => self.list_at(ep, query, creds).await.map(Outcome::Page),
        }
    }

    async fn head_at(&self, ep: &EndpointState, key: &str, creds: Option<&S3Credentials>) -> Result<ObjectInfo, S3Error> {
        let resp = self.send(ep, Method::HEAD, key, &[], &[], creds).await?;
        let status = resp.status();
        let object = self.object_name(key);
        if status.is_success() {
            let header = |name: reqwest::header::HeaderName| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            // HEAD has no body, so the length is the header's, not the body's.
            let size = header(CONTENT_LENGTH)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| S3Error::Protocol { endpoint: ep.shown.clone(), what: format!("HEAD {object} gave no Content-Length") })?;
            let etag = header(ETAG).filter(|e| !e.trim().is_empty()).ok_or_else(|| S3Error::Protocol {
                endpoint: ep.shown.clone(),
                what: format!("HEAD {object} gave no ETag, so a changed object could not be noticed"),
            })?;
            let version_id = resp
                .headers()
                .get("x-amz-version-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && *v != "null")
                .map(str::to_string);
            return Ok(ObjectInfo { size, etag: etag.trim().to_string(), version_id, last_modified: header(LAST_MODIFIED) });
        }
        let region = bucket_region(&resp);
        drop(resp);
        // HEAD answers carry no error body: ask again with a GET of one byte to learn the code.
        let probe = self.send(ep, Method::GET, key, &[], &[("range", "bytes=0-0")], creds).await?;
        if probe.status().is_success() {
            return Err(self.classify_at(ep, status.as_u16(), None, region.as_deref(), &object));
        }
        Err(self.error_from(ep, probe, &object).await)
    }

    async fn get_at(
        &self,
        ep: &EndpointState,
        key: &str,
        range: &Range<u64>,
        info: &ObjectInfo,
        creds: Option<&S3Credentials>,
    ) -> Result<Bytes, S3Error> {
        let range_header = format!("bytes={}-{}", range.start, range.end - 1);
        let headers = [("if-match", info.etag.as_str()), ("range", range_header.as_str())];
        let version: Vec<(&str, &str)> = info.version_id.as_deref().map(|v| ("versionId", v)).into_iter().collect();
        let resp = self.send(ep, Method::GET, key, &version, &headers, creds).await?;
        let object = self.object_name(key);
        let protocol = |what: String| S3Error::Protocol { endpoint: ep.shown.clone(), what };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // Never read as the range: the body is the whole object.
            StatusCode::OK => return Err(protocol(format!("ignored the Range header for {object} (HTTP 200 to a range request)"))),
            StatusCode::PRECONDITION_FAILED => {
                return Err(S3Error::Changed { endpoint: ep.shown.clone(), object, what: "its ETag is not the mounted one".into() })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(S3Error::Changed { endpoint: ep.shown.clone(), object, what: format!("it is shorter than {} bytes now", info.size) })
            }
            _ => return Err(self.error_from(ep, resp, &object).await),
        }
        if let Some(etag) = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()) {
            if etag.trim() != info.etag {
                return Err(S3Error::Changed { endpoint: ep.shown.clone(), object, what: "it answered another ETag".into() });
            }
        }
        let cr = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| protocol(format!("206 without Content-Range for {object}")))?
            .to_string();
        crate::remote::check_content_range(&cr, range, Some(info.size)).map_err(|e| protocol(format!("{object}: {e}")))?;
        crate::http::read_exact(resp, range.end - range.start).await.map_err(|e| match e {
            crate::http::HttpError::Permanent(what) => protocol(format!("{object}: {what}")),
            transient => S3Error::Transient { endpoint: ep.shown.clone(), what: format!("{object}: {transient}") },
        })
    }

    async fn list_at(&self, ep: &EndpointState, query: &[(String, String)], creds: Option<&S3Credentials>) -> Result<ListPage, S3Error> {
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let resp = self.send(ep, Method::GET, "", &pairs, &[], creds).await?;
        let object = format!("bucket {}", self.bucket);
        if resp.status() != StatusCode::OK {
            return Err(self.error_from(ep, resp, &object).await);
        }
        let body = read_capped(resp, list::MAX_PAGE_BYTES, &ep.shown).await?;
        list::parse_page(&body).map_err(|what| S3Error::Protocol { endpoint: ep.shown.clone(), what: format!("listing {}: {what}", self.bucket) })
    }

    /// Builds, signs and sends one request. `headers` have lowercase names and are all signed.
    async fn send(
        &self,
        ep: &EndpointState,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        creds: Option<&S3Credentials>,
    ) -> Result<reqwest::Response, S3Error> {
        let (url, resource) = request_url(&ep.url, ep.style, &self.bucket, key, query)
            .map_err(|what| S3Error::Config(format!("S3 endpoint {}: {what}", ep.shown)))?;
        let mut all: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(c) = creds {
            let added = match self.sig {
                SigVersion::V4 => sign::sign_v4(method.as_str(), url.as_str(), headers, c, &self.region, SystemTime::now(), aws_sigv4::http_request::SignableBody::UnsignedPayload)
                    .map_err(|e| S3Error::Config(e.to_string()))?,
                SigVersion::V2 => sign::sign_v2(method.as_str(), &resource, headers, c, SystemTime::now()),
            };
            all.extend(added);
        }
        let mut req = self.http.request(method, url);
        for (k, v) in &all {
            req = req.header(k.as_str(), v.as_str());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        req.send().await.map_err(|e| {
            let why = crate::http::error_chain(&e);
            if e.is_connect() {
                S3Error::Unreachable { endpoint: ep.shown.clone(), why }
            } else if e.is_timeout() {
                S3Error::Transient { endpoint: ep.shown.clone(), what: "no answer in time".into() }
            } else {
                S3Error::Transient { endpoint: ep.shown.clone(), what: why }
            }
        })
    }

    async fn error_from(&self, ep: &EndpointState, resp: reqwest::Response, object: &str) -> S3Error {
        let status = resp.status().as_u16();
        let region = bucket_region(&resp);
        let body = read_capped(resp, MAX_ERROR_BODY, &ep.shown).await.ok();
        let parsed = body.as_deref().and_then(parse_error_body);
        self.classify_at(ep, status, parsed.as_ref(), region.as_deref(), object)
    }

    fn classify_at(&self, ep: &EndpointState, status: u16, body: Option<&super::error::ErrorBody>, region: Option<&str>, object: &str) -> S3Error {
        let ctx = ErrorContext { endpoint: &ep.shown, bucket: &self.bucket, object, origin: &self.origin, region: &self.region };
        classify(status, body, region, &ctx)
    }

    fn object_name(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

fn bucket_region(resp: &reqwest::Response) -> Option<String> {
    resp.headers().get("x-amz-bucket-region").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Reads a body of at most `cap` bytes (a longer one is an error, stopped at the cap).
async fn read_capped(mut resp: reqwest::Response, cap: u64, endpoint: &str) -> Result<Vec<u8>, S3Error> {
    let too_long = || S3Error::Protocol { endpoint: endpoint.to_string(), what: format!("an answer longer than {cap} bytes") };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_long());
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() as u64 + chunk.len() as u64 > cap {
                    return Err(too_long());
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => {
                return Err(S3Error::Transient {
                    endpoint: endpoint.to_string(),
                    what: format!("the answer was cut short: {}", crate::http::error_chain(&e)),
                })
            }
        }
    }
}
