//! The registry's write side, and the reads that pushing and converting need.
//!
//! A [`Repository`] is one repository of one registry with its client and its
//! authorization (the same credentials, credential files, CA file and
//! `oci.insecure` as mounting; tokens ask for `pull,push` when the
//! repository is opened for writing). On it:
//!
//! - blobs: [`Repository::blob_exists`] (HEAD), [`Repository::push_blob`]
//!   (HEAD, then a cross-repository mount when asked, else a monolithic
//!   upload — POST, PUT `?digest=` — or, above [`UploadOptions::chunk_size`],
//!   a chunked one — POST, PATCH with `Content-Range` per chunk, PUT — that
//!   resumes after a failed chunk from the offset the registry reports).
//!   File blobs are streamed from the file, one chunk of 1 MiB in memory at a
//!   time; [`Blob::from_file`] hashes the file first (the PUT names the
//!   digest).
//! - manifests: [`Repository::put_manifest`] by tag or digest with its
//!   media type as Content-Type; [`Repository::get_manifest`] and
//!   [`Repository::resolve_image`] (index -> platform -> image manifest);
//!   [`Repository::get_blob`] (a config blob, capped, digest-checked) and
//!   [`Repository::open_blob`] (a streamed layer).
//! - artifacts and referrers: [`Repository::push_artifact`] (an artifact
//!   manifest with `artifactType` and `subject`, empty config, pushed by
//!   digest; when the registry does not acknowledge the subject with
//!   `OCI-Subject`, the referrers tag `sha256-<hex>` is updated too),
//!   [`Repository::referrers`] (the referrers API, or the tag schema when
//!   the registry answers 404 — Debian's docker-registry 2.8 has no API),
//!   [`Repository::add_referrer`] / [`Repository::remove_referrer`] (the tag
//!   schema's index, kept in step when several artifacts exist).
//!
//! Manifests are built from the `oci-spec` types by the pure functions at
//! the end ([`image_manifest`], [`artifact_manifest`], [`erofs_config`],
//! [`merge_referrer`], ...) and serialised with sorted keys ([`to_json`]):
//! the same content gives the same digest.
//!
//! Requests: every one is counted ([`Repository::requests`]). Pushing a new
//! blob costs HEAD + POST + PUT (+ one PATCH per chunk); a blob already
//! there costs the HEAD only.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType, Platform};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::http::{self, origin, ClientConfig};

use super::auth::{parse_challenge, Access, Authenticator, Challenge};
use super::credentials::CredentialFiles;
use super::manifest::{self, Manifest};
use super::reference::{self, Reference};
use super::transport::{self, Endpoint};
use super::{OciError, OciOptions};

/// The EROFS layer media type of the image spec (the one `push` writes).
pub const ERFS_LAYER_MEDIA_TYPE: &str = manifest::EROFS_MEDIA_TYPES[0];
pub const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The empty config of artifacts (`{}`).
pub const OCI_EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// Blobs up to this size are uploaded in one PUT; larger ones in chunks of it.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// Image configs larger than this are refused (real ones are KiBs; long histories reach a few 100 KiB).
pub const MAX_CONFIG_BYTES: usize = 8 << 20;
/// A referrers index larger than this is refused.
pub const MAX_REFERRERS_BYTES: usize = 4 << 20;

/// Bytes read from a file per body frame.
const FILE_READ_CHUNK: u64 = 1 << 20;
/// Tries of one upload (or of one chunk) on transient errors.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Bound of a request without a large body (HEAD, POST, manifests, configs).
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A body streaming below this rate counts as stalled (uploads and layer downloads).
const MIN_BYTES_PER_SEC: u64 = 256 << 10;
/// Referrers tag updates retried when a concurrent writer replaced ours.
const REFERRER_UPDATE_ATTEMPTS: u32 = 4;

/// How blobs are uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOptions {
    /// Monolithic up to this size, chunked (in pieces of it, or the
    /// registry's `OCI-Chunk-Min-Length` if larger) above.
    pub chunk_size: u64,
    /// Try a cross-repository mount from this repository of the same
    /// registry before uploading (it must be in the [`Access::mount_from`]
    /// the repository was opened with, for token registries).
    pub mount_from: Option<String>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions { chunk_size: DEFAULT_CHUNK_SIZE, mount_from: None }
    }
}

#[derive(Clone)]
enum BlobBody {
    Bytes(Bytes),
    File(Arc<File>),
}

/// Content to upload, with its digest and size.
#[derive(Clone)]
pub struct Blob {
    body: BlobBody,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
}

impl Blob {
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob { digest: sha256_digest(&bytes), size: bytes.len() as u64, body: BlobBody::Bytes(bytes) }
    }

    /// Opens and hashes a file (read once here, once more by the upload).
    pub fn from_file(path: &Path) -> std::io::Result<Blob> {
        let file = File::open(path)?;
        let (digest, size) = sha256_reader(&file)?;
        Ok(Blob { body: BlobBody::File(Arc::new(file)), digest, size })
    }

    /// The descriptor of this blob as `media_type`.
    pub fn descriptor(&self, media_type: &str) -> Result<Descriptor, OciError> {
        descriptor(media_type, &self.digest, self.size)
    }

    fn part(&self, offset: u64, len: u64) -> UploadBody {
        match &self.body {
            BlobBody::Bytes(b) => {
                let (start, end) = (offset as usize, (offset + len) as usize);
                UploadBody::Bytes(b.slice(start..end))
            }
            BlobBody::File(f) => UploadBody::File { file: f.clone(), offset, len },
        }
    }
}

/// How a blob got into the repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// It was there already (HEAD).
    Existed,
    /// Mounted from another repository of the registry.
    Mounted,
    /// POST + one PUT.
    Monolithic,
    /// POST + PATCHes + PUT.
    Chunked { chunks: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedBlob {
    pub digest: String,
    pub size: u64,
    pub kind: UploadKind,
}

/// The answer to a manifest PUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedManifest {
    /// `sha256:<hex>` of the bytes sent (checked against the registry's `Docker-Content-Digest`).
    pub digest: String,
    pub size: u64,
    /// The registry's `OCI-Subject` header: it indexed the manifest's
    /// subject for the referrers API itself.
    pub subject_indexed: Option<String>,
}

/// A manifest or index as fetched.
#[derive(Debug)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The body's `mediaType`, else the Content-Type.
    pub media_type: String,
    pub manifest: Manifest,
}

/// An image manifest reached from a reference (through an index when there is one).
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub manifest: ImageManifest,
    pub bytes: Vec<u8>,
    pub digest: String,
    pub media_type: String,
    /// The platform of the index entry taken (None: the reference named a manifest).
    pub platform: Option<Platform>,
}

/// Where a referrers list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferrersSource {
    /// `GET /v2/<name>/referrers/<digest>`.
    Api,
    /// The `sha256-<hex>` tag (the registry answered the API with 404).
    TagSchema,
}

/// The manifests that name a subject.
#[derive(Clone, Debug, PartialEq)]
pub struct Referrers {
    /// Filtered by the asked artifact type (whether or not the registry filtered).
    pub manifests: Vec<Descriptor>,
    pub source: ReferrersSource,
}

/// An artifact to push: its manifest is built by [`artifact_manifest`].
#[derive(Clone, Debug)]
pub struct Artifact {
    pub artifact_type: String,
    /// The manifest it refers to.
    pub subject: Descriptor,
    /// Already pushed blobs (see [`Repository::push_blob`]).
    pub layers: Vec<Descriptor>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PushedArtifact {
    /// The artifact manifest's descriptor as it appears in a referrers index
    /// (media type, digest, size, artifactType, annotations).
    pub descriptor: Descriptor,
    pub manifest: PushedManifest,
    /// `TagSchema`: the `sha256-<hex>` tag was updated; `Api`: the registry indexed it.
    pub indexed_by: ReferrersSource,
}

/// A body to send, made afresh for each try.
#[derive(Clone)]
enum UploadBody {
    Empty,
    Bytes(Bytes),
    File { file: Arc<File>, offset: u64, len: u64 },
}

impl UploadBody {
    fn len(&self) -> u64 {
        match self {
            UploadBody::Empty => 0,
            UploadBody::Bytes(b) => b.len() as u64,
            UploadBody::File { len, .. } => *len,
        }
    }

    fn body(&self) -> reqwest::Body {
        match self {
            UploadBody::Empty => reqwest::Body::from(Bytes::new()),
            UploadBody::Bytes(b) => reqwest::Body::from(b.clone()),
            UploadBody::File { file, offset, len } => file_body(file.clone(), *offset, *len),
        }
    }
}

/// `len` bytes of `file` from `offset` as a streamed body, read 1 MiB at a
/// time off the async threads.
fn file_body(file: Arc<File>, offset: u64, len: u64) -> reqwest::Body {
    let stream = futures_util::stream::try_unfold((file, offset, len), |(file, pos, left)| async move {
        if left == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        let n = left.min(FILE_READ_CHUNK);
        let f = file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, pos).map(|_| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Some((Bytes::from(buf), (file, pos + n, left - n))))
    });
    reqwest::Body::wrap_stream(stream)
}

/// Time allowed for a request carrying `len` bytes.
fn body_timeout(len: u64) -> Duration {
    SMALL_REQUEST_TIMEOUT + Duration::from_secs(len / MIN_BYTES_PER_SEC)
}

/// One repository of one registry, for reading and (when opened so) writing.
pub struct Repository {
    client: reqwest::Client,
    endpoint: Endpoint,
    reference: Reference,
    requests: AtomicU64,
}

impl Repository {
    /// Opens `reference`'s repository with the credentials, CA file and
    /// scheme of `o` (as mounting does: `oci.username`/`oci.password`, else
    /// the container tools' credential files). `access.push` asks tokens
    /// for push.
    pub fn connect(reference: &Reference, o: &OciOptions, access: Access) -> Result<Repository, OciError> {
        let files = CredentialFiles::from_env();
        let creds = super::credentials_for(&files, reference, o)?;
        let scheme = if o.insecure { "http" } else { "https" };
        // Bodies are bounded per request (by size) and per stalled read; the
        // client's own bound only catches what those miss.
        let client = http::build_client(&ClientConfig {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(24 * 3600),
            ca_file: o.cafile.clone(),
        })
        .map_err(|e| OciError::Config(e.to_string()))?;
        let auth = Authenticator::new(&reference.registry, &reference.repository, creds).with_access(access);
        let endpoint = Endpoint::new(&format!("{scheme}://{}", reference.api_host()), &reference.repository, false, auth)?;
        Ok(Repository { client, endpoint, reference: reference.clone(), requests: AtomicU64::new(0) })
    }

    /// A repository on an explicit endpoint (tests, mirrors).
    pub fn with_endpoint(client: reqwest::Client, endpoint: Endpoint, reference: Reference) -> Repository {
        Repository { client, endpoint, reference, requests: AtomicU64::new(0) }
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// HTTP requests sent so far (token requests not counted).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn name(&self) -> String {
        self.reference.name()
    }

    /// A reference into this repository by digest (for messages and returns).
    pub fn at_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// GET/HEAD through the read path (one challenge answered, redirects followed).
    async fn read(&self, method: Method, url: Url, headers: HeaderMap) -> Result<http::Answer, OciError> {
        self.count();
        match tokio::time::timeout(SMALL_REQUEST_TIMEOUT, transport::authorized(&self.client, &self.endpoint, method, url, headers)).await {
            Ok(r) => r,
            Err(_) => Err(OciError::Unreachable { endpoint: self.endpoint.host(), why: "request timed out".into() }),
        }
    }

    /// Sends a write (POST, PATCH, PUT, DELETE) with the repository's
    /// authorization; a 401 renews it and sends again once. Redirects are
    /// not followed (registries answer writes with Location headers, not 3xx).
    async fn write(&self, method: Method, url: Url, mut headers: HeaderMap, body: UploadBody) -> Result<reqwest::Response, OciError> {
        let same_origin = origin(&url) == origin(&self.endpoint.base);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        let timeout = body_timeout(body.len());
        for attempt in 0..2 {
            let (auth, generation) = self.endpoint.auth.header(&self.client).await?;
            let mut req = self.client.request(method.clone(), url.clone()).headers(headers.clone()).timeout(timeout).body(body.body());
            if let (Some(a), true) = (auth, same_origin) {
                let mut v = HeaderValue::from_str(&a).map_err(|_| OciError::Protocol("bad authorization value".into()))?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            self.count();
            let resp = req.send().await.map_err(|e| OciError::from(http::send_error(&e, &origin(&url))))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && same_origin {
                let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                self.endpoint.auth.refresh(&self.client, challenge.as_deref(), generation).await?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let scope_error = matches!(
                    challenge.as_deref().and_then(parse_challenge),
                    Some(Challenge::Bearer { error: Some(ref e), .. }) if e == "insufficient_scope"
                );
                let body = http::read_capped(resp, 64 << 10).await.unwrap_or_default();
                let denied = scope_error || status == StatusCode::FORBIDDEN || transport::registry_error_code(&body).as_deref() == Some("DENIED");
                return Err(if !self.endpoint.auth.has_credentials() {
                    OciError::AuthRequired { registry: self.endpoint.host() }
                } else if denied {
                    OciError::PushDenied { registry: self.endpoint.host(), repository: self.endpoint.repository.clone() }
                } else {
                    OciError::AuthRefused { registry: self.endpoint.host() }
                });
            }
            return Ok(resp);
        }
        Err(OciError::AuthRefused { registry: self.endpoint.host() })
    }

    /// One clear sentence for an unexpected answer to `what`.
    async fn refused(&self, resp: reqwest::Response, what: &str) -> OciError {
        let status = resp.status().as_u16();
        if matches!(status, 408 | 429 | 500..=599) {
            return OciError::Server { endpoint: self.endpoint.host(), status };
        }
        let body = http::read_capped(resp, 64 << 10).await.unwrap_or_default();
        let detail = registry_error(&body).map(|(code, msg)| format!(" {code}{}", if msg.is_empty() { String::new() } else { format!(": {msg}") })).unwrap_or_default();
        OciError::Protocol(format!("{}: {what} refused (HTTP {status}{detail})", self.name()))
    }

    fn url(&self, tail: &str) -> Result<Url, OciError> {
        self.endpoint.url(tail)
    }

    /// A `Location` of an upload answer, resolved against the registry.
    fn location(&self, resp: &reqwest::Response) -> Result<Url, OciError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError::Protocol(format!("{}: upload answer without a Location", self.name())))?;
        let url = self.endpoint.base.join(loc).map_err(|_| OciError::Protocol(format!("{}: bad upload Location", self.name())))?;
        if !matches!(url.scheme(), "http" | "https") || (self.endpoint.base.scheme() == "https" && url.scheme() == "http") {
            return Err(OciError::Protocol(format!("{}: upload Location with a refused scheme", self.name())));
        }
        Ok(url)
    }

    // ---- blobs ----

    /// Whether the repository has the blob (HEAD; 404 is no).
    pub async fn blob_exists(&self, digest: &str) -> Result<bool, OciError> {
        let digest = reference::parse_digest(digest).map_err(OciError::Config)?;
        let answer = self.read(Method::HEAD, self.url(&format!("blobs/{digest}"))?, HeaderMap::new()).await?;
        match answer.response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            403 => Err(OciError::InsufficientScope { registry: self.endpoint.host(), repository: self.endpoint.repository.clone() }),
            _ => Err(self.refused(answer.response, &format!("HEAD of blob {digest}")).await),
        }
    }

    /// Mounts `digest` from repository `from` of the same registry. Ok(true):
    /// mounted; Ok(false): the registry could not (it started an upload
    /// instead, which is cancelled).
    pub async fn mount_blob(&self, digest: &str, from: &str) -> Result<bool, OciError> {
        match self.start_upload(Some((digest, from))).await? {
            Started::Mounted => Ok(true),
            Started::Session(s) => {
                // Not needed: say so, so that the registry can drop it now.
                let _ = self.write(Method::DELETE, s.location, HeaderMap::new(), UploadBody::Empty).await;
                Ok(false)
            }
        }
    }

    async fn start_upload(&self, mount: Option<(&str, &str)>) -> Result<Started, OciError> {
        let mut url = self.url("blobs/uploads/")?;
        if let Some((digest, from)) = mount {
            url.query_pairs_mut().append_pair("mount", digest).append_pair("from", from);
        }
        let resp = self.write(Method::POST, url, HeaderMap::new(), UploadBody::Empty).await?;
        match resp.status().as_u16() {
            201 if mount.is_some() => Ok(Started::Mounted),
            202 => {
                let location = self.location(&resp)?;
                let min_chunk = resp
                    .headers()
                    .get("oci-chunk-min-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(Started::Session(Session { location, min_chunk }))
            }
            _ => Err(self.refused(resp, "starting a blob upload").await),
        }
    }

    /// Puts `blob` into the repository unless it is there: HEAD, then a
    /// mount (if `opts.mount_from`), else a monolithic or chunked upload.
    /// Transient failures are retried; a chunked upload resumes where the
    /// registry says it got to.
    pub async fn push_blob(&self, blob: &Blob, opts: &UploadOptions) -> Result<PushedBlob, OciError> {
        let done = |kind| Ok(PushedBlob { digest: blob.digest.clone(), size: blob.size, kind });
        if self.blob_exists(&blob.digest).await? {
            return done(UploadKind::Existed);
        }
        let mut last = None;
        for attempt in 0..UPLOAD_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            let mount = opts.mount_from.as_deref().filter(|_| attempt == 0).map(|from| (blob.digest.as_str(), from));
            let session = match self.start_upload(mount).await {
                Ok(Started::Mounted) => return done(UploadKind::Mounted),
                Ok(Started::Session(s)) => s,
                Err(e) if e.is_transient() => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let result = if blob.size <= opts.chunk_size.max(1) {
                self.finish_upload(session.location, blob, blob.part(0, blob.size)).await.map(|_| UploadKind::Monolithic)
            } else {
                self.upload_chunks(session, blob, opts.chunk_size).await.map(|chunks| UploadKind::Chunked { chunks })
            };
            match result {
                Ok(kind) => return done(kind),
                Err(e) if e.is_transient() => {
                    tracing::warn!(digest = %blob.digest, error = %e, "blob upload failed; starting it again");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| OciError::Protocol("upload failed".into())))
    }

    /// The closing PUT `?digest=` (with the last bytes, or none).
    async fn finish_upload(&self, mut location: Url, blob: &Blob, body: UploadBody) -> Result<(), OciError> {
        location.query_pairs_mut().append_pair("digest", &blob.digest);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let resp = self.write(Method::PUT, location, headers, body).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.refused(resp, &format!("upload of blob {}", blob.digest)).await);
        }
        if let Some(d) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            if d != blob.digest {
                return Err(OciError::Protocol(format!("{}: the registry stored blob {} as {d}", self.name(), blob.digest)));
            }
        }
        Ok(())
    }

    /// PATCHes the blob in chunks, then PUTs; returns the number of chunks.
    async fn upload_chunks(&self, session: Session, blob: &Blob, chunk_size: u64) -> Result<u64, OciError> {
        let chunk = chunk_size.max(session.min_chunk).max(1);
        let mut location = session.location;
        let mut offset = 0u64;
        let mut chunks = 0u64;
        let mut failures = 0u32;
        while offset < blob.size {
            let len = chunk.min(blob.size - offset);
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            headers.insert(HeaderName::from_static("content-range"), header_value(&format!("{offset}-{}", offset + len - 1))?);
            let sent = self.write(Method::PATCH, location.clone(), headers, blob.part(offset, len)).await;
            let resp = match sent {
                Ok(r) if r.status() == StatusCode::ACCEPTED => r,
                Ok(r) if r.status() == StatusCode::RANGE_NOT_SATISFIABLE => {
                    return Err(self.refused(r, &format!("chunk at offset {offset} of blob {}", blob.digest)).await)
                }
                Ok(r) => {
                    let e = self.refused(r, &format!("chunk at offset {offset} of blob {}", blob.digest)).await;
                    if !e.is_transient() {
                        return Err(e);
                    }
                    failures += 1;
                    if failures >= UPLOAD_ATTEMPTS {
                        return Err(e);
                    }
                    (location, offset) = self.upload_status(&location).await?;
                    continue;
                }
                Err(e) if e.is_transient() && failures + 1 < UPLOAD_ATTEMPTS => {
                    failures += 1;
                    tracing::warn!(digest = %blob.digest, offset, error = %e, "chunk upload failed; resuming");
                    (location, offset) = self.upload_status(&location).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let next = self.location(&resp)?;
            if let Some(end) = resp.headers().get(RANGE).and_then(|v| v.to_str().ok()).and_then(parse_upload_range) {
                if end != offset + len {
                    return Err(OciError::Protocol(format!(
                        "{}: after a chunk ending at {} the registry holds {end} bytes of blob {}",
                        self.name(),
                        offset + len,
                        blob.digest
                    )));
                }
            }
            location = next;
            offset += len;
            chunks += 1;
        }
        self.finish_upload(location, blob, UploadBody::Empty).await?;
        Ok(chunks)
    }

    /// Where an upload stands (GET of its Location): the next Location and the bytes received.
    async fn upload_status(&self, location: &Url) -> Result<(Url, u64), OciError> {
        let answer = self.read(Method::GET, location.clone(), HeaderMap::new()).await?;
        let resp = answer.response;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(self.refused(resp, "the upload status").await);
        }
        let received = resp.headers().get(RANGE).and_then(|v| v.to_str().ok()).and_then(parse_upload_range).unwrap_or(0);
        let next = self.location(&resp).unwrap_or_else(|_| location.clone());
        Ok((next, received))
    }

    /// GETs a whole small blob (a config, an artifact layer), capped and
    /// checked against its digest.
    pub async fn get_blob(&self, digest: &str, cap: usize) -> Result<Vec<u8>, OciError> {
        let digest = reference::parse_digest(digest).map_err(OciError::Config)?;
        let answer = self.read(Method::GET, self.url(&format!("blobs/{digest}"))?, HeaderMap::new()).await?;
        let resp = answer.response;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(OciError::Layer(format!("blob {digest} of {} not found", self.name()))),
            _ => return Err(self.refused(resp, &format!("GET of blob {digest}")).await),
        }
        let body = tokio::time::timeout(SMALL_REQUEST_TIMEOUT, http::read_capped(resp, cap))
            .await
            .map_err(|_| OciError::Transient(format!("{}: blob {digest} timed out", self.name())))?
            .map_err(|e| match e {
                http::HttpError::Permanent(m) => OciError::Protocol(format!("{}: blob {digest}: {m}", self.name())),
                other => other.into(),
            })?;
        let got = sha256_digest(&body);
        if got != digest {
            return Err(OciError::Protocol(format!("blob {digest} of {} does not match its digest (got {got})", self.name())));
        }
        Ok(body)
    }

    /// GETs a blob from byte `from` on for streaming (its body unread): the
    /// caller reads it, bounds it by the descriptor's size and checks its
    /// digest. `from > 0` asks for a Range and insists on the 206 that
    /// starts there (a download resuming after a cut).
    pub async fn open_blob(&self, digest: &str, from: u64) -> Result<reqwest::Response, OciError> {
        let digest = reference::parse_digest(digest).map_err(OciError::Config)?;
        let mut headers = HeaderMap::new();
        if from > 0 {
            headers.insert(RANGE, header_value(&format!("bytes={from}-"))?);
        }
        let answer = self.read(Method::GET, self.url(&format!("blobs/{digest}"))?, headers).await?;
        let resp = answer.response;
        match resp.status().as_u16() {
            200 if from == 0 => Ok(resp),
            206 if from > 0 => {
                let starts = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts == Some(from) {
                    Ok(resp)
                } else {
                    Err(OciError::Protocol(format!("{}: blob {digest} resumed at the wrong offset", self.name())))
                }
            }
            200 => Err(OciError::Protocol(format!("{}: blob {digest}: the registry ignores Range requests", self.name()))),
            404 => Err(OciError::Layer(format!("blob {digest} of {} not found", self.name()))),
            _ => Err(self.refused(resp, &format!("GET of blob {digest}")).await),
        }
    }

    // ---- manifests ----

    /// PUTs a manifest (or index) under `reference` — a tag, or a digest that
    /// must be the body's — with `media_type` as its Content-Type.
    pub async fn put_manifest(&self, reference: &str, media_type: &str, body: &[u8]) -> Result<PushedManifest, OciError> {
        let digest = sha256_digest(body);
        if reference.contains(':') {
            let wanted = reference::parse_digest(reference).map_err(OciError::Config)?;
            if wanted != digest {
                return Err(OciError::Config(format!("the manifest's digest is {digest}, not {wanted}")));
            }
        } else if Reference::parse(&format!("x:{reference}")).is_err() {
            return Err(OciError::Config(format!("bad tag {reference:?}")));
        }
        if body.len() > manifest::MAX_MANIFEST_BYTES {
            return Err(OciError::Config(format!("manifest of {} bytes is too large", body.len())));
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, header_value(media_type)?);
        let resp = self
            .write(Method::PUT, self.url(&format!("manifests/{reference}"))?, headers, UploadBody::Bytes(Bytes::copy_from_slice(body)))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.refused(resp, &format!("manifest {reference}")).await);
        }
        if let Some(d) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            if d != digest {
                return Err(OciError::Protocol(format!("{}: the registry stored manifest {digest} as {d}", self.name())));
            }
        }
        let subject_indexed = resp.headers().get("oci-subject").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(PushedManifest { digest, size: body.len() as u64, subject_indexed })
    }

    /// PUTs a manifest by `reference`'s tag, or by its digest when it names
    /// only a digest (which must be the manifest's); a `tag@digest`
    /// reference is put by tag and the digest checked. Returns the digest.
    pub async fn put_manifest_at(&self, reference: &Reference, media_type: &str, bytes: &[u8]) -> Result<String, OciError> {
        let digest = sha256_digest(bytes);
        if let Some(want) = &reference.digest {
            if *want != digest {
                return Err(OciError::Config(format!("{reference} names digest {want}, but the manifest is {digest}")));
            }
        }
        let at = reference.tag.clone().unwrap_or_else(|| digest.clone());
        Ok(self.put_manifest(&at, media_type, bytes).await?.digest)
    }

    /// GETs a manifest or index by tag or digest (a digest is verified).
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest, OciError> {
        let by_digest = reference.contains(':');
        let (ct, bytes) = super::fetch_manifest(&self.client, &self.endpoint, &self.reference, reference, by_digest).await?;
        self.count();
        let manifest = manifest::parse_manifest(ct.as_deref(), &bytes).map_err(|e| OciError::Protocol(format!("{}: {e}", self.name())))?;
        let media_type = body_media_type(&bytes).or(ct.map(|c| c.split(';').next().unwrap_or("").trim().to_string())).unwrap_or_default();
        Ok(FetchedManifest { digest: sha256_digest(&bytes), bytes, media_type, manifest })
    }

    /// The image manifest of the repository's reference: through an index
    /// (and nested ones) to `platform`.
    pub async fn resolve_image(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        let mut wanted = self.reference.manifest_ref().to_string();
        let mut chosen = None;
        for depth in 0..=manifest::MAX_INDEX_DEPTH {
            let fetched = self.get_manifest(&wanted).await?;
            match fetched.manifest {
                Manifest::Index(index) => {
                    if depth == manifest::MAX_INDEX_DEPTH {
                        break;
                    }
                    let d = manifest::select_platform(index.manifests(), platform).map_err(|available| OciError::Platform {
                        image: self.reference.to_string(),
                        wanted: manifest::platform_name(platform),
                        available,
                    })?;
                    chosen = d.platform().clone();
                    wanted = d.digest().to_string();
                }
                Manifest::Image(m) => {
                    return Ok(ResolvedImage {
                        manifest: *m,
                        bytes: fetched.bytes,
                        digest: fetched.digest,
                        media_type: fetched.media_type,
                        platform: chosen,
                    })
                }
            }
        }
        Err(OciError::Protocol(format!("{}: indexes nested too deep", self.reference)))
    }

    // ---- referrers ----

    /// The manifests whose `subject` is `subject` (a digest), of
    /// `artifact_type` when given: the referrers API, or the tag schema when
    /// the registry answers it with 404 (or 405). No referrers is an empty list.
    pub async fn referrers(&self, subject: &str, artifact_type: Option<&str>) -> Result<Referrers, OciError> {
        let subject = reference::parse_digest(subject).map_err(OciError::Config)?;
        let mut url = self.url(&format!("referrers/{subject}"))?;
        if let Some(t) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", t);
        }
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(manifest::OCI_INDEX));
        let answer = self.read(Method::GET, url, headers).await?;
        let resp = answer.response;
        match resp.status().as_u16() {
            200 => {
                let body = http::read_capped(resp, MAX_REFERRERS_BYTES).await?;
                let index: ImageIndex = serde_json::from_slice(&body)
                    .map_err(|e| OciError::Protocol(format!("{}: malformed referrers index: {e}", self.name())))?;
                Ok(Referrers { manifests: filter_referrers(index.manifests(), artifact_type), source: ReferrersSource::Api })
            }
            404 | 405 => {
                let index = self.referrers_tag_index(&subject).await?;
                let manifests = index.as_ref().map(|i| filter_referrers(i.manifests(), artifact_type)).unwrap_or_default();
                Ok(Referrers { manifests, source: ReferrersSource::TagSchema })
            }
            _ => Err(self.refused(resp, &format!("referrers of {subject}")).await),
        }
    }

    /// The index under the referrers tag of `subject`, if there is one.
    async fn referrers_tag_index(&self, subject: &str) -> Result<Option<ImageIndex>, OciError> {
        let tag = referrers_tag(subject)?;
        match self.get_manifest(&tag).await {
            Ok(FetchedManifest { manifest: Manifest::Index(index), .. }) => Ok(Some(*index)),
            Ok(_) => Err(OciError::Protocol(format!("{}: the referrers tag {tag} is not an index", self.name()))),
            Err(OciError::TagNotFound { .. } | OciError::ImageNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds (or refreshes) `referrer` in the referrers tag index of
    /// `subject`, keeping every other entry. A concurrent writer that
    /// replaced the index meanwhile is noticed by reading it back, and the
    /// update is done again.
    pub async fn add_referrer(&self, subject: &str, referrer: &Descriptor) -> Result<(), OciError> {
        self.update_referrers_tag(subject, |index| merge_referrer(index, referrer.clone()), |index| {
            index.manifests().iter().any(|d| d == referrer)
        })
        .await
    }

    /// Removes the manifest `digest` from the referrers tag index of `subject`.
    pub async fn remove_referrer(&self, subject: &str, digest: &str) -> Result<(), OciError> {
        let digest = digest.to_string();
        let d2 = digest.clone();
        self.update_referrers_tag(subject, move |index| remove_referrer(index, &digest), move |index| {
            !index.manifests().iter().any(|d| d.digest().to_string() == d2)
        })
        .await
    }

    async fn update_referrers_tag(
        &self,
        subject: &str,
        change: impl Fn(Option<ImageIndex>) -> ImageIndex,
        landed: impl Fn(&ImageIndex) -> bool,
    ) -> Result<(), OciError> {
        let subject = reference::parse_digest(subject).map_err(OciError::Config)?;
        let tag = referrers_tag(&subject)?;
        for _ in 0..REFERRER_UPDATE_ATTEMPTS {
            let current = self.referrers_tag_index(&subject).await?;
            let next = change(current);
            self.put_manifest(&tag, manifest::OCI_INDEX, &to_json(&next)?).await?;
            match self.referrers_tag_index(&subject).await? {
                Some(now) if landed(&now) => return Ok(()),
                _ => tracing::debug!(tag, "the referrers tag changed under us; updating it again"),
            }
        }
        Err(OciError::Transient(format!("{}: the referrers tag {tag} keeps changing; try again", self.name())))
    }

    /// Pushes an artifact manifest (empty config, `artifact.layers` already
    /// pushed) by digest, and makes it findable from its subject: by the
    /// registry (`OCI-Subject` in the answer) or by updating the referrers tag.
    pub async fn push_artifact(&self, artifact: &Artifact) -> Result<PushedArtifact, OciError> {
        self.push_blob(&Blob::from_bytes(Bytes::from_static(EMPTY_JSON)), &UploadOptions::default()).await?;
        let m = artifact_manifest(&artifact.artifact_type, artifact.subject.clone(), artifact.layers.clone(), &artifact.annotations)?;
        let bytes = to_json(&m)?;
        let digest = sha256_digest(&bytes);
        let pushed = self.put_manifest(&digest, manifest::OCI_MANIFEST, &bytes).await?;
        let descriptor = referrer_descriptor(&m, &pushed.digest, pushed.size)?;
        let subject = artifact.subject.digest().to_string();
        let indexed_by = if pushed.subject_indexed.as_deref() == Some(subject.as_str()) {
            ReferrersSource::Api
        } else {
            self.add_referrer(&subject, &descriptor).await?;
            ReferrersSource::TagSchema
        };
        Ok(PushedArtifact { descriptor, manifest: pushed, indexed_by })
    }
}

enum Started {
    Mounted,
    Session(Session),
}

struct Session {
    location: Url,
    min_chunk: u64,
}

fn header_value(s: &str) -> Result<HeaderValue, OciError> {
    HeaderValue::from_str(s).map_err(|_| OciError::Config(format!("bad header value {s:?}")))
}

/// The bytes an upload holds from its `Range: 0-<last>` (2.8 says `0-0`
/// for none and for one byte alike: taken as none, the next PATCH then
/// fails clearly rather than duplicating a byte).
fn parse_upload_range(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix("bytes=").unwrap_or(v.trim());
    let (start, end) = v.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    let end: u64 = end.trim().parse().ok()?;
    Some(if end == 0 { 0 } else { end + 1 })
}

/// `(code, message)` of a registry error body.
fn registry_error(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("errors")?.get(0)?;
    let code: String = e.get("code")?.as_str()?.chars().take(64).collect();
    let msg: String = e.get("message").and_then(|m| m.as_str()).unwrap_or("").chars().take(200).collect();
    Some((code, msg))
}

fn body_media_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(body).ok()?.media_type.filter(|m| !m.is_empty())
}

// ---- pure parts ----

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` and length of everything `r` yields.
pub fn sha256_reader(mut r: impl std::io::Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((format!("sha256:{}", hex::encode(h.finalize())), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// JSON with sorted object keys: the same value gives the same bytes (and digest).
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, OciError> {
    serde_json::to_value(v)
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(|e| OciError::Protocol(format!("cannot serialise a manifest: {e}")))
}

/// A descriptor (the digest is validated).
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor, OciError> {
    let d = reference::parse_digest(digest).map_err(OciError::Config)?;
    let d: oci_spec::image::Digest = d.parse().map_err(|e| OciError::Config(format!("bad digest {d}: {e}")))?;
    Ok(Descriptor::new(MediaType::from(media_type), size, d))
}

/// The referrers tag of a subject: `sha256:<hex>` -> `sha256-<hex>`.
pub fn referrers_tag(subject: &str) -> Result<String, OciError> {
    let d = reference::parse_digest(subject).map_err(OciError::Config)?;
    Ok(d.replacen(':', "-", 1))
}

fn annotations_of(map: &BTreeMap<String, String>) -> Option<std::collections::HashMap<String, String>> {
    (!map.is_empty()).then(|| map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// An OCI image manifest (schema 2, with its mediaType) over `config` and `layers`.
pub fn image_manifest(config: Descriptor, layers: Vec<Descriptor>, annotations: &BTreeMap<String, String>) -> Result<ImageManifest, OciError> {
    let mut m = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config)
        .layers(layers)
        .build()
        .map_err(|e| OciError::Protocol(format!("cannot build a manifest: {e}")))?;
    m.set_annotations(annotations_of(annotations));
    Ok(m)
}

/// The empty config descriptor of artifacts (`{}`, 2 bytes).
pub fn empty_config_descriptor() -> Result<Descriptor, OciError> {
    descriptor(OCI_EMPTY_MEDIA_TYPE, &sha256_digest(EMPTY_JSON), EMPTY_JSON.len() as u64)
}

/// An artifact manifest: empty config, `artifactType`, `subject`, `layers`
/// (at least one: image-spec 1.1 asks for the empty descriptor when there
/// is nothing else).
pub fn artifact_manifest(
    artifact_type: &str,
    subject: Descriptor,
    layers: Vec<Descriptor>,
    annotations: &BTreeMap<String, String>,
) -> Result<ImageManifest, OciError> {
    if artifact_type.is_empty() || !artifact_type.contains('/') {
        return Err(OciError::Config(format!("bad artifact type {artifact_type:?}")));
    }
    let layers = if layers.is_empty() { vec![empty_config_descriptor()?] } else { layers };
    let mut m = image_manifest(empty_config_descriptor()?, layers, annotations)?;
    m.set_artifact_type(Some(MediaType::from(artifact_type)));
    m.set_subject(Some(subject));
    Ok(m)
}

/// The descriptor of a pushed manifest as a referrers index lists it:
/// media type, digest, size, artifactType (the manifest's, else its
/// config's media type) and annotations.
pub fn referrer_descriptor(m: &ImageManifest, digest: &str, size: u64) -> Result<Descriptor, OciError> {
    let mut d = descriptor(manifest::OCI_MANIFEST, digest, size)?;
    let artifact_type = m.artifact_type().clone().unwrap_or_else(|| m.config().media_type().clone());
    d.set_artifact_type(Some(artifact_type));
    d.set_annotations(m.annotations().clone());
    Ok(d)
}

/// `index` (or a new, empty one) with `referrer` added; an entry of the
/// same digest is replaced in place, every other entry is kept in order.
pub fn merge_referrer(index: Option<ImageIndex>, referrer: Descriptor) -> ImageIndex {
    let mut index = index.unwrap_or_else(empty_index);
    index.set_media_type(Some(MediaType::ImageIndex));
    let mut manifests = index.manifests().clone();
    match manifests.iter_mut().find(|d| d.digest() == referrer.digest()) {
        Some(slot) => *slot = referrer,
        None => manifests.push(referrer),
    }
    index.set_manifests(manifests);
    index
}

/// `index` without the manifest `digest` (an empty index when there was none).
pub fn remove_referrer(index: Option<ImageIndex>, digest: &str) -> ImageIndex {
    let mut index = index.unwrap_or_else(empty_index);
    index.set_media_type(Some(MediaType::ImageIndex));
    let mut manifests = index.manifests().clone();
    manifests.retain(|d| d.digest().to_string() != digest);
    index.set_manifests(manifests);
    index
}

fn empty_index() -> ImageIndex {
    let mut i = ImageIndex::default();
    i.set_schema_version(2);
    i.set_media_type(Some(MediaType::ImageIndex));
    i.set_manifests(Vec::new());
    i
}

/// The entries of `artifact_type` (all when None).
pub fn filter_referrers(manifests: &[Descriptor], artifact_type: Option<&str>) -> Vec<Descriptor> {
    manifests
        .iter()
        .filter(|d| artifact_type.is_none_or(|t| d.artifact_type().as_ref().is_some_and(|a| a.to_string() == t)))
        .cloned()
        .collect()
}

/// A minimal valid OCI image config for EROFS layers: platform, `rootfs`
/// with the layers' digests as diff_ids (EROFS layers are not compressed:
/// the uncompressed digest is the blob's), an empty `config`. No dates: the
/// same layers give the same config.
pub fn erofs_config(platform: &Platform, diff_ids: &[String]) -> Result<Vec<u8>, OciError> {
    let mut v = serde_json::json!({
        "architecture": platform.architecture().to_string(),
        "os": platform.os().to_string(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(variant) = platform.variant().as_deref().filter(|v| !v.is_empty()) {
        v["variant"] = serde_json::Value::from(variant);
    }
    to_json(&v)
}

/// The manifest of an image of EROFS layers: `config` (an OCI config blob
/// already pushed) and the layers as `application/vnd.erofs`.
pub fn erofs_image_manifest(config: (&str, u64), layers: &[(String, u64)]) -> Result<ImageManifest, OciError> {
    let config = descriptor(OCI_CONFIG_MEDIA_TYPE, config.0, config.1)?;
    let layers = layers.iter().map(|(d, s)| descriptor(ERFS_LAYER_MEDIA_TYPE, d, *s)).collect::<Result<Vec<_>, _>>()?;
    image_manifest(config, layers, &BTreeMap::new())
}

#[cfg(test)]
mod tests;
