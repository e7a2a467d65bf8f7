//! OCI registry source: image references, manifests, auth, mirrors.
//!
//! Two halves. The front end ([`resolve_reference`]) turns
//! `[registry/]repo[:tag][@digest]` plus the `oci.*` options into one blob:
//! it fetches the manifest (index -> platform -> image manifest), picks the
//! layer, checks its media type, and gathers what the agent will need —
//! endpoint, credentials (from the options or the container tools' files),
//! mirrors (options and `registries.conf`), CA file — into an
//! [`OciBlobSpec`], handed to the agent on its stdin. The agent
//! ([`open_blob`]) reads byte ranges of that blob for the life of the mount,
//! renewing tokens as they expire, trying mirrors first, following CDN
//! redirects.
//!
//! The registry protocol is spoken here over the crate's reqwest client
//! rather than through `oci-client`: that crate brings its own reqwest 0.12
//! stack and its blob reads neither expose Content-Range, nor renew a token
//! on a mid-life 401, nor try mirrors, nor keep a redirect target — the
//! parts this source is mostly about. What it would have saved (reference
//! parsing, challenge parsing, manifest JSON) is small and unit-tested here.
//!
//! Nothing secret is ever displayed: [`OciBlobSpec::describe`], every Debug
//! and every error name registries and repositories, never credentials.

pub mod auth;
pub mod credentials;
pub mod manifest;
pub mod mirrors;
pub mod options;
pub mod push;
pub mod reference;
pub mod source;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::http::{ClientConfig, HttpError};
use crate::remote::{RangeSource, PROBE_LEN};

pub use credentials::Credentials;
pub use mirrors::MirrorSpec;
pub use options::OciOptions;
pub use reference::Reference;

use auth::Authenticator;
use manifest::{LayerChoice, LayerError, Manifest};
use transport::Endpoint;

/// A blob of an image, resolved by the front end and handed to the agent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciBlobSpec {
    /// The canonical reference, e.g. `docker.io/library/x:1` (credential-free).
    pub reference: String,
    /// `host[:port]` as named (`docker.io` for Docker Hub).
    pub registry: String,
    /// `scheme://host[:port]` of the registry API.
    pub endpoint: String,
    pub repository: String,
    /// `sha256:<hex>` of the layer blob.
    pub digest: String,
    /// From the descriptor; every answer's Content-Range total must match.
    pub size: u64,
    pub media_type: String,
    pub insecure: bool,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Tried in order before the registry.
    #[serde(default)]
    pub mirrors: Vec<MirrorSpec>,
    #[serde(default)]
    pub credentials: Option<Credentials>,
    /// The front end's registry authorization (token), reused by the agent.
    #[serde(default)]
    pub auth_handoff: Option<auth::AuthHandoff>,
}

impl OciBlobSpec {
    /// Credential-free text for records, logs and status.
    pub fn describe(&self) -> String {
        self.reference.clone()
    }
}

impl std::fmt::Debug for OciBlobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciBlobSpec")
            .field("reference", &self.reference)
            .field("endpoint", &self.endpoint)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("mirrors", &self.mirrors)
            .field("credentials", &self.credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Every failure is one sentence, fit for `erofs-mount`'s one line.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0}")]
    BadReference(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot read registry credentials: {0}")]
    Credentials(String),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("tag {tag:?} of image {image} not found")]
    TagNotFound { image: String, tag: String },
    #[error("image {image} has no manifest for platform {wanted}; available: {available}")]
    Platform { image: String, wanted: String, available: String },
    #[error("{registry} requires authentication; give oci.username= and oci.password= or log in (podman/docker login)")]
    AuthRequired { registry: String },
    #[error("authentication to {registry} refused")]
    AuthRefused { registry: String },
    #[error("insufficient scope: the credentials for {registry} do not grant pull access to {repository}")]
    InsufficientScope { registry: String, repository: String },
    #[error("the credentials for {registry} do not grant push access to {repository}; give oci.username= and oci.password= or log in (podman/docker login)")]
    PushDenied { registry: String, repository: String },
    #[error("registry {endpoint} unreachable: {why}")]
    Unreachable { endpoint: String, why: String },
    #[error("{endpoint}: server error (HTTP {status})")]
    Server { endpoint: String, status: u16 },
    #[error("{0}")]
    Layer(String),
    #[error("layer {digest} of {image} is not EROFS (media type {media_type:?}); name it with oci.blob= to mount it anyway")]
    NotErofs { image: String, digest: String, media_type: String },
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Fetch(String),
}

impl OciError {
    /// Worth retrying: the network or the server, not the request.
    pub fn is_transient(&self) -> bool {
        matches!(self, OciError::Unreachable { .. } | OciError::Server { .. } | OciError::Transient(_))
    }
}

impl From<HttpError> for OciError {
    fn from(e: HttpError) -> OciError {
        match e {
            HttpError::Unreachable { endpoint, why } => OciError::Unreachable { endpoint, why },
            HttpError::Transient(m) => OciError::Transient(m),
            HttpError::Permanent(m) => OciError::Protocol(m),
        }
    }
}

/// Connect bound for the front end's requests.
const RESOLVE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Resolves an image reference to one blob (front end side; blocking).
/// An image of several layers needs `oci.layer`/`oci.blob` here; see
/// [`resolve_image`] for mounting all of them.
pub fn resolve_reference(reference: &str, o: &OciOptions) -> Result<OciBlobSpec, OciError> {
    match resolve_image(reference, o)? {
        ResolvedImage::Blob(b) => Ok(*b),
        ResolvedImage::Layers(layers) => {
            let listing = layers.iter().enumerate().map(|(i, l)| format!("{i}: {} ({}, {} bytes)", l.digest, l.media_type, l.size)).collect::<Vec<_>>().join("; ");
            Err(OciError::Layer(format!(
                "image {} has several layers; choose one with oci.layer=N or oci.blob=DIGEST: {listing}",
                layers.first().map(|l| l.reference.as_str()).unwrap_or(reference)
            )))
        }
    }
}

/// What an image reference names: one blob (a one-layer image, or the layer
/// `oci.layer`/`oci.blob` picked), or every layer of the image, in
/// manifest order (to be mounted as one filesystem).
#[derive(Debug, Clone)]
pub enum ResolvedImage {
    Blob(Box<OciBlobSpec>),
    Layers(Vec<OciBlobSpec>),
}

/// Resolves an image reference (front end side; blocking).
pub fn resolve_image(reference: &str, o: &OciOptions) -> Result<ResolvedImage, OciError> {
    resolve_image_and_config(reference, o).map(|(image, _)| image)
}

/// [`resolve_image`], and the image's config blob as a blob of the same
/// repository (for its `rootfs.diff_ids`).
pub fn resolve_image_and_config(reference: &str, o: &OciOptions) -> Result<(ResolvedImage, Option<OciBlobSpec>), OciError> {
    let parsed = Reference::parse(reference).map_err(|e| OciError::BadReference(e.to_string()))?;
    let choice = match (&o.blob, o.layer) {
        (Some(_), Some(_)) => return Err(OciError::Config("oci.blob and oci.layer cannot be used together".into())),
        (Some(b), None) => LayerChoice::Digest(reference::parse_digest(b).map_err(|e| OciError::Config(format!("oci.blob: {e}")))?),
        (None, Some(n)) => LayerChoice::Index(n),
        (None, None) => LayerChoice::Only,
    };
    let platform = match &o.platform {
        Some(p) => manifest::parse_platform(p).map_err(|e| OciError::Config(format!("oci.platform: {e}")))?,
        None => manifest::host_platform(),
    };
    let files = credentials::CredentialFiles::from_env();
    let creds = credentials_for(&files, &parsed, o)?;
    let mut mirror_specs = Vec::new();
    let mut found = Vec::new();
    for m in &o.mirrors {
        let (hm, c) = mirrors::mirror_from_option(m, &parsed.repository, o.insecure).map_err(OciError::Config)?;
        found.push((hm, c));
    }
    for hm in mirrors::host_mirrors(&mirrors::host_config_files(), &parsed.registry, &parsed.repository)
        .map_err(OciError::Config)?
    {
        found.push((hm, None));
    }
    for (hm, c) in found {
        let creds = match c {
            Some(c) => Some(c),
            None => {
                let host = hm.base.split_once("://").map_or(hm.base.as_str(), |(_, h)| h);
                files.lookup(host, &hm.repository).unwrap_or_else(|e| {
                    tracing::warn!(mirror = %hm.base, error = %e, "cannot read mirror credentials; trying anonymously");
                    None
                })
            }
        };
        mirror_specs.push(MirrorSpec { base: hm.base, repository: hm.repository, credentials: creds });
    }
    let scheme = if o.insecure { "http" } else { "https" };
    let endpoint = format!("{scheme}://{}", parsed.api_host());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OciError::Config(format!("cannot start the async runtime: {e}")))?;
    let client = crate::http::build_client(&ClientConfig {
        connect_timeout: RESOLVE_CONNECT_TIMEOUT,
        request_timeout: RESOLVE_REQUEST_TIMEOUT,
        ca_file: o.cafile.clone(),
    })
    .map_err(|e| OciError::Config(e.to_string()))?;
    let ep = Endpoint::new(
        &endpoint,
        &parsed.repository,
        false,
        Authenticator::new(&parsed.registry, &parsed.repository, creds.clone()),
    )?;
    let (layers, config) = runtime.block_on(resolve_layers_and_config(&client, &ep, &parsed, &platform, &choice))?;
    let mut specs = Vec::with_capacity(layers.len());
    for layer in &layers {
        // Cache keys and blob URLs need sha256.
        let digest = reference::parse_digest(layer.digest().as_ref())
            .map_err(|e| OciError::Layer(format!("layer {} of {parsed}: {e}", layer.digest())))?;
        specs.push(OciBlobSpec {
            reference: parsed.to_string(),
            registry: parsed.registry.clone(),
            endpoint: endpoint.clone(),
            repository: parsed.repository.clone(),
            digest,
            size: layer.size(),
            media_type: layer.media_type().to_string(),
            insecure: o.insecure,
            ca_file: o.cafile.clone(),
            mirrors: mirror_specs.clone(),
            credentials: creds.clone(),
            auth_handoff: ep.auth.export(),
        });
    }
    let config = match (config, specs.first()) {
        (Some(c), Some(first)) => {
            let digest = reference::parse_digest(c.digest().as_ref())
                .map_err(|e| OciError::Protocol(format!("the config {} of {parsed}: {e}", c.digest())))?;
            Some(OciBlobSpec { digest, size: c.size(), media_type: c.media_type().to_string(), ..first.clone() })
        }
        _ => None,
    };
    match specs.len() {
        1 => Ok((ResolvedImage::Blob(Box::new(specs.remove(0))), config)),
        _ => Ok((ResolvedImage::Layers(specs), config)),
    }
}

/// Layers of one image a mount takes (a manifest is untrusted: every layer
/// costs a probe request and a segment).
pub const MAX_LAYERS: usize = 128;
/// The credentials for `r`: `oci.username`/`oci.password`, else the
/// container tools' files (docker config, containers auth.json, helpers).
pub(crate) fn credentials_for(
    files: &credentials::CredentialFiles,
    r: &Reference,
    o: &OciOptions,
) -> Result<Option<Credentials>, OciError> {
    match (&o.username, &o.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::Basic { username: u.clone(), password: p.clone() })),
        (Some(_), None) | (None, Some(_)) => Err(OciError::Config("oci.username and oci.password go together".into())),
        (None, None) => files.lookup(&r.registry, &r.repository).map_err(OciError::Credentials),
    }
}


/// index -> platform -> manifest -> layer (or, with no choice and several
/// layers, all of them).
#[cfg(test)]
async fn resolve_layer(
    client: &reqwest::Client,
    ep: &Endpoint,
    r: &Reference,
    platform: &manifest::Platform,
    choice: &LayerChoice,
) -> Result<Vec<manifest::Descriptor>, OciError> {
    resolve_layers_and_config(client, ep, r, platform, choice).await.map(|(layers, _)| layers)
}

/// [`resolve_layer`] and the manifest's config descriptor.
async fn resolve_layers_and_config(
    client: &reqwest::Client,
    ep: &Endpoint,
    r: &Reference,
    platform: &manifest::Platform,
    choice: &LayerChoice,
) -> Result<(Vec<manifest::Descriptor>, Option<manifest::Descriptor>), OciError> {
    let image = r.to_string();
    let mut wanted_ref = r.manifest_ref().to_string();
    let mut by_digest = r.digest.is_some();
    for depth in 0..=manifest::MAX_INDEX_DEPTH {
        let (ct, body) = fetch_manifest(client, ep, r, &wanted_ref, by_digest).await?;
        let parsed = manifest::parse_manifest(ct.as_deref(), &body)
            .map_err(|e| OciError::Protocol(format!("{image}: {e}")))?;
        match parsed {
            Manifest::Index(index) => {
                if depth == manifest::MAX_INDEX_DEPTH {
                    break;
                }
                let d = manifest::select_platform(index.manifests(), platform).map_err(|available| OciError::Platform {
                    image: image.clone(),
                    wanted: manifest::platform_name(platform),
                    available,
                })?;
                wanted_ref = d.digest().to_string();
                by_digest = true;
            }
            Manifest::Image(m) => {
                if matches!(choice, LayerChoice::Only) && m.layers().len() > MAX_LAYERS {
                    return Err(OciError::Layer(format!("image {image} has {} layers, more than the {MAX_LAYERS} a mount takes", m.layers().len())));
                }
                if matches!(choice, LayerChoice::Only) && m.layers().len() > 1 {
                    if let Some(empty) = m.layers().iter().find(|l| l.size() == 0) {
                        return Err(layer_error(&image, LayerError::BadSize { digest: empty.digest().to_string() }));
                    }
                    return Ok((m.layers().clone(), Some(m.config().clone())));
                }
                let config = Some(m.config().clone());
                return manifest::select_layer(m.layers(), choice).map(|l| (vec![l.clone()], config)).map_err(|e| layer_error(&image, e));
            }
        }
    }
    Err(OciError::Protocol(format!("{image}: indexes nested too deep")))
}

fn layer_error(image: &str, e: LayerError) -> OciError {
    match e {
        LayerError::NoLayers => OciError::Layer(format!("image {image} has no layers")),
        LayerError::NotALayer { digest } => OciError::Layer(format!("blob {digest} is not a layer of image {image}")),
        LayerError::IndexOutOfRange { index, count } => {
            OciError::Layer(format!("image {image} has {count} layer(s); oci.layer={index} is out of range (0-based)"))
        }
        LayerError::Ambiguous { listing } => OciError::Layer(format!(
            "image {image} has several layers; choose one with oci.layer=N or oci.blob=DIGEST: {listing}"
        )),
        LayerError::NotErofs { digest, media_type } => OciError::NotErofs { image: image.to_string(), digest, media_type },
        LayerError::BadSize { digest } => OciError::Layer(format!("layer {digest} of image {image} is empty")),
    }
}

/// GETs one manifest with every Accept type; a digest-pinned one is verified.
pub(crate) async fn fetch_manifest(
    client: &reqwest::Client,
    ep: &Endpoint,
    r: &Reference,
    wanted: &str,
    by_digest: bool,
) -> Result<(Option<String>, Vec<u8>), OciError> {
    let url = ep.url(&format!("manifests/{wanted}"))?;
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static(manifest::MANIFEST_ACCEPT));
    let answer = transport::authorized(client, ep, Method::GET, url, headers).await?;
    let resp = answer.response;
    let status = resp.status().as_u16();
    let ct = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let image = r.to_string();
    match status {
        200 => {}
        404 => {
            let body = crate::http::read_capped(resp, 64 << 10).await.unwrap_or_default();
            let code = transport::registry_error_code(&body);
            return Err(match (code.as_deref(), &r.tag, by_digest) {
                (Some("NAME_UNKNOWN"), _, _) => OciError::ImageNotFound(r.name()),
                (_, Some(tag), false) => OciError::TagNotFound { image: r.name(), tag: tag.clone() },
                _ => OciError::ImageNotFound(format!("{}@{wanted}", r.name())),
            });
        }
        403 => return Err(OciError::InsufficientScope { registry: ep.host(), repository: ep.repository.clone() }),
        408 | 429 | 500..=599 => return Err(OciError::Server { endpoint: ep.host(), status }),
        _ => return Err(OciError::Protocol(format!("{image}: the registry answered HTTP {status} for the manifest"))),
    }
    let body = crate::http::read_capped(resp, manifest::MAX_MANIFEST_BYTES).await?;
    if by_digest {
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if got != wanted {
            return Err(OciError::Protocol(format!("{image}: manifest {wanted} does not match its digest (got {got})")));
        }
    }
    Ok((ct, body))
}

/// The `rootfs.diff_ids` of an image's config blob (front end side; blocking).
pub fn fetch_diff_ids(config: &OciBlobSpec) -> Result<Vec<String>, OciError> {
    if config.size > manifest::MAX_CONFIG_BYTES {
        return Err(OciError::Protocol(format!("the image config {} is {} bytes, more than the {} read", config.digest, config.size, manifest::MAX_CONFIG_BYTES)));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OciError::Config(format!("cannot start the async runtime: {e}")))?;
    let src = blob_source(config, &ClientConfig::default())?;
    let bytes = runtime.block_on(src.fetch(0..config.size)).map_err(|e| OciError::Fetch(format!("the image config {}: {e}", config.digest)))?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if got != config.digest {
        return Err(OciError::Protocol(format!("the image config {} does not match its digest (got {got})", config.digest)));
    }
    manifest::parse_diff_ids(&bytes).map_err(|e| OciError::Protocol(format!("{}: {e}", config.reference)))
}

/// Opens the blob for the agent: the range source and its first bytes
/// (4096, or the whole blob when smaller).
pub async fn open_blob(spec: &OciBlobSpec, http: &ClientConfig) -> Result<(Arc<dyn RangeSource>, Bytes), OciError> {
    let src = blob_source(spec, http)?;
    let probe = src.fetch(0..PROBE_LEN.min(spec.size)).await.map_err(|e| OciError::Fetch(e.to_string()))?;
    Ok((src, probe))
}

/// The blob's range source, without reading anything yet (a merge of layers
/// may find the bytes in the local cache first).
pub fn blob_source(spec: &OciBlobSpec, http: &ClientConfig) -> Result<Arc<dyn RangeSource>, OciError> {
    if spec.size == 0 {
        return Err(OciError::Layer(format!("blob {} of {} is empty", spec.digest, spec.reference)));
    }
    let client = crate::http::build_client(&ClientConfig { ca_file: spec.ca_file.clone(), ..http.clone() })
        .map_err(|e| OciError::Config(e.to_string()))?;
    let mut endpoints = Vec::new();
    for m in &spec.mirrors {
        let host = m.base.split_once("://").map_or(m.base.as_str(), |(_, h)| h);
        let auth = Authenticator::new(host, &m.repository, m.credentials.clone());
        endpoints.push(source::EndpointState::new(Endpoint::new(&m.base, &m.repository, true, auth)?));
    }
    let auth = Authenticator::new(&spec.registry, &spec.repository, spec.credentials.clone());
    if let Some(h) = &spec.auth_handoff {
        auth.import(h);
    }
    endpoints.push(source::EndpointState::new(Endpoint::new(&spec.endpoint, &spec.repository, false, auth)?));
    let src = source::OciSource::new(client, endpoints, spec.digest.clone(), spec.size, spec.reference.clone());
    Ok(Arc::new(src))
}


#[cfg(test)]
mod tests;
