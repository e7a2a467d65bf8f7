//! S3 and S3-compatible object stores as a source: an EROFS image stored as one object.
//!
//! Sources: `s3://BUCKET/KEY` (endpoint from `-o s3.endpoint=`, else `AWS_ENDPOINT_URL_S3` /
//! `AWS_ENDPOINT_URL` / the profile's `endpoint_url`, else AWS's regional endpoint), or
//! erofs-utils' form `-o s3.endpoint=URL[,s3.region=R][,s3.urlstyle=path|vhost][,s3.sig=2|4]
//! [,s3.passwd_file=F] BUCKET/KEY`. `s3.endpoint` repeats: mirrors, tried in order.
//!
//! Two halves, as for registries. The front end ([`resolve_object`]) finds the credentials
//! ([`credentials`]), HEADs the object for its size and ETag (so every refusal is one clear line
//! at mount time, [`S3Error`]) and gathers it all into an [`S3ObjectSpec`], which reaches the
//! agent inside its source spec on stdin. The agent ([`open_object`]) reads ranges of exactly that
//! version for the life of the mount: every GET carries `If-Match: ETAG` (and `versionId` on
//! versioned buckets), so a re-uploaded object is an error (readers get EIO), never a mix of two
//! versions. The cache entry is keyed by bucket, key, ETag and size ([`S3ObjectSpec::cache_key`]),
//! so a remount after a change starts a new entry and never serves the old bytes.
//!
//! Listing ([`S3Client::list_all`], v2 continuation or v1 markers) is here for bucket images.

pub mod client;
pub mod credentials;
pub mod error;
pub mod list;
pub mod location;
pub mod options;
pub mod sign;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use client::{ClientConfig, ObjectInfo, S3Client};
pub use credentials::{AwsEnvironment, CredentialOrigin, S3Credentials};
pub use error::S3Error;
pub use list::{ListQuery, ListVersion, ListedObject, Listing};
pub use location::ObjectLocation;
pub use options::{S3OptionError, S3Options, SigVersion, UrlStyle};
pub use source::S3Source;

use crate::http::ClientConfig as HttpConfig;
use crate::remote::PROBE_LEN;
use crate::remote::RangeSource;

/// Used when neither an option, the environment nor the profile names a region.
pub const DEFAULT_REGION: &str = "us-east-1";

/// One object version, resolved by the front end and handed to the agent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3ObjectSpec {
    pub bucket: String,
    pub key: String,
    /// Base URLs, tried in order.
    pub endpoints: Vec<String>,
    pub region: String,
    #[serde(default)]
    pub url_style: Option<UrlStyle>,
    pub sig: SigVersion,
    pub size: u64,
    pub etag: String,
    #[serde(default)]
    pub version_id: Option<String>,
    #[serde(default)]
    pub credentials: Option<S3Credentials>,
    pub credential_origin: CredentialOrigin,
}

impl S3ObjectSpec {
    /// Credential-free text for records, logs and status: `s3://BUCKET/KEY`.
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// `s3-<32 hex of sha256(bucket, key, ETag, size)>`: the same for every endpoint (mirrors
    /// share the entry), new when the object changes (a stale entry is never reused).
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        for part in [self.bucket.as_bytes(), self.key.as_bytes(), self.etag.as_bytes(), self.size.to_string().as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        format!("s3-{}", &hex::encode(h.finalize())[..32])
    }

    fn object_info(&self) -> ObjectInfo {
        ObjectInfo { size: self.size, etag: self.etag.clone(), version_id: self.version_id.clone(), last_modified: None }
    }

    fn client_config(&self, connect_timeout: Duration, request_timeout: Duration) -> Result<ClientConfig, S3Error> {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| location::parse_endpoint(e).map_err(|why| S3Error::Config(format!("s3.endpoint {e:?}: {why}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClientConfig {
            bucket: self.bucket.clone(),
            endpoints,
            region: self.region.clone(),
            url_style: self.url_style,
            sig: self.sig,
            connect_timeout,
            request_timeout,
        })
    }
}

impl std::fmt::Debug for S3ObjectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3ObjectSpec")
            .field("object", &self.describe())
            .field("endpoints", &self.endpoints)
            .field("region", &self.region)
            .field("size", &self.size)
            .field("etag", &self.etag)
            .field("credentials", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("origin", &self.credential_origin)
            .finish()
    }
}

/// True when `source` (with these options) names an S3 object: `s3://…`, or any `s3.endpoint`.
pub fn is_s3_source(source: &str, opts: &S3Options) -> bool {
    source.starts_with("s3://") || !opts.endpoints.is_empty()
}

/// Everything needed to talk to one bucket, from the options and the environment: for mounting
/// and for listing (`build --s3`).
pub struct BucketAccess {
    pub client: S3Client,
    pub region: String,
    pub endpoints: Vec<String>,
    pub url_style: Option<UrlStyle>,
    pub sig: SigVersion,
    pub credentials: Option<S3Credentials>,
    pub origin: CredentialOrigin,
}

/// Connect bound and per-request bound of the front end's requests.
const FRONT_END_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FRONT_END_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl BucketAccess {
    /// Resolves credentials, region and endpoints for `bucket` (no request is sent).
    pub fn new(bucket: &str, opts: &S3Options, env: &AwsEnvironment) -> Result<BucketAccess, S3Error> {
        location::check_bucket(bucket).map_err(S3Error::Config)?;
        let found = credentials::resolve(env, opts, bucket).map_err(S3Error::Credentials)?;
        let region = found.region.clone().unwrap_or_else(|| DEFAULT_REGION.to_string());
        let endpoints = if !opts.endpoints.is_empty() {
            opts.endpoints.clone()
        } else if let Some(e) = &found.endpoint_url {
            vec![e.clone()]
        } else {
            vec![location::aws_endpoint(&region)]
        };
        let parsed = endpoints
            .iter()
            .map(|e| location::parse_endpoint(e).map_err(|why| S3Error::Config(format!("S3 endpoint {e:?}: {why}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let url_style = opts.url_style.or(found.url_style);
        let sig = opts.sig.unwrap_or(SigVersion::V4);
        let cfg = ClientConfig {
            bucket: bucket.to_string(),
            endpoints: parsed,
            region: region.clone(),
            url_style,
            sig,
            connect_timeout: FRONT_END_CONNECT_TIMEOUT,
            request_timeout: FRONT_END_REQUEST_TIMEOUT,
        };
        let client = S3Client::new(&cfg, found.credentials.clone(), found.origin.clone())?;
        Ok(BucketAccess { client, region, endpoints, url_style, sig, credentials: found.credentials, origin: found.origin })
    }
}

/// Front end: `s3://BUCKET/KEY` or `BUCKET/KEY` (with `s3.endpoint`) to one object version,
/// HEAD included (blocking).
pub fn resolve_object(source: &str, opts: &S3Options) -> Result<S3ObjectSpec, S3Error> {
    resolve_object_in(source, opts, &AwsEnvironment::from_env())
}

/// [`resolve_object`] with an explicit environment.
pub fn resolve_object_in(source: &str, opts: &S3Options, env: &AwsEnvironment) -> Result<S3ObjectSpec, S3Error> {
    let location = if source.starts_with("s3://") {
        ObjectLocation::parse_s3_url(source)
    } else {
        ObjectLocation::parse_bucket_key(source).map_err(|e| format!("S3 source {source:?}: {e}"))
    }
    .map_err(S3Error::Config)?;
    let access = BucketAccess::new(&location.bucket, opts, env)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| S3Error::Config(format!("cannot start the async runtime: {e}")))?;
    let info = runtime.block_on(access.client.head_object(&location.key))?;
    if info.size == 0 {
        return Err(S3Error::Config(format!("object {} is empty", location.display())));
    }
    Ok(S3ObjectSpec {
        bucket: location.bucket,
        key: location.key,
        endpoints: access.endpoints,
        region: access.region,
        url_style: access.url_style,
        sig: access.sig,
        size: info.size,
        etag: info.etag,
        version_id: info.version_id,
        credentials: access.credentials,
        credential_origin: access.origin,
    })
}

/// Agent: the range source of the object version and its first bytes (the superblock probe). The
/// probe's answer must still carry the ETag and size the front end saw.
pub async fn open_object(spec: &S3ObjectSpec, http: &HttpConfig) -> Result<(Arc<dyn RangeSource>, Bytes), S3Error> {
    if spec.size == 0 {
        return Err(S3Error::Config(format!("object {} is empty", spec.describe())));
    }
    let cfg = spec.client_config(http.connect_timeout, http.request_timeout)?;
    let client = S3Client::new(&cfg, spec.credentials.clone(), spec.credential_origin.clone())?;
    let source = S3Source::new(Arc::new(client), spec.key.clone(), spec.object_info());
    let probe = source.read(0..PROBE_LEN.min(spec.size)).await?;
    Ok((Arc::new(source), probe))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> S3ObjectSpec {
        S3ObjectSpec {
            bucket: "bkt".into(),
            key: "img/a.erofs".into(),
            endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            region: "us-east-1".into(),
            url_style: None,
            sig: SigVersion::V4,
            size: 4096,
            etag: "\"abc\"".into(),
            version_id: None,
            credentials: Some(S3Credentials { access_key_id: "AKID".into(), secret_access_key: "hunter2".into(), session_token: Some("tok".into()) }),
            credential_origin: CredentialOrigin::Environment,
        }
    }

    #[test]
    fn cache_key_follows_the_object_version_not_the_endpoint() {
        let a = spec();
        let key = a.cache_key();
        assert!(key.starts_with("s3-") && key.len() == 35, "{key}");
        erofs_fanotify_state::validate_cache_key(&key).unwrap();
        let mut b = a.clone();
        b.endpoints.reverse();
        b.credentials = None;
        assert_eq!(b.cache_key(), key);
        let mut c = a.clone();
        c.etag = "\"abd\"".into();
        assert_ne!(c.cache_key(), key);
        let mut d = a.clone();
        d.size += 1;
        assert_ne!(d.cache_key(), key);
        // Length-prefixed parts: moving a byte between bucket and key changes the key.
        let mut e = a.clone();
        e.bucket = "bkti".into();
        e.key = "mg/a.erofs".into();
        assert_ne!(e.cache_key(), key);
    }

    #[test]
    fn nothing_secret_is_displayed() {
        let s = spec();
        assert_eq!(s.describe(), "s3://bkt/img/a.erofs");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("tok\"") && !dbg.contains("AKID"), "{dbg}");
        // The spec itself carries them to the agent (stdin) and back.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<S3ObjectSpec>(&json).unwrap(), s);
    }

    #[test]
    fn s3_sources_are_recognised() {
        assert!(is_s3_source("s3://b/k", &S3Options::default()));
        assert!(!is_s3_source("docker.io/library/x:1", &S3Options::default()));
        let o = S3Options { endpoints: vec!["http://h".into()], ..Default::default() };
        assert!(is_s3_source("bkt/key", &o));
    }
}
