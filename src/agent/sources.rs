//! Which source serves a mount: the front end names it in a [`SourceSpec`]
//! (handed to the agent on its stdin: a spec may carry credentials, never
//! logged), and the agent's start-up opens it here — the one place that
//! knows every kind of source, as erofs-utils' `mount/main.c` picks among
//! `lib/remotes/*`. The event path only ever sees a `RangeSource`.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::http::{redact_url, ClientConfig};
use crate::remote::{HttpSource, RangeSource};

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceSpec {
    /// A Range-capable http(s) URL of the blob.
    Url { url: String },
    /// A blob of an OCI image, already resolved to its digest and size.
    Oci(Box<crate::oci::OciBlobSpec>),
    /// One version (ETag) of an S3 object.
    S3(Box<crate::remote::s3::S3ObjectSpec>),
}

impl std::fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials never reach a log line.
        write!(f, "{}", self.describe())
    }
}

impl SourceSpec {
    /// Credential-free text for records, logs and status.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Url { url } => redact_url(url),
            SourceSpec::Oci(spec) => spec.describe(),
            SourceSpec::S3(spec) => spec.describe(),
        }
    }

    /// The blob digest, when the source names one.
    pub fn digest(&self) -> Option<String> {
        match self {
            SourceSpec::Url { url } => digest_from_url(url),
            SourceSpec::Oci(spec) => Some(spec.digest.clone()),
            SourceSpec::S3(_) => None,
        }
    }

    /// The cache entry key: the digest when known, else a hash of the URL.
    pub fn cache_key(&self) -> Result<String, String> {
        match (self.digest(), self) {
            (Some(d), _) => erofs_fanotify_state::cache_key_for_digest(&d).map_err(|e| e.to_string()),
            (None, SourceSpec::Url { url }) => Ok(erofs_fanotify_state::cache_key_for_url(url)),
            (None, SourceSpec::Oci(_)) => Err("an OCI source without a digest".into()),
            (None, SourceSpec::S3(spec)) => Ok(spec.cache_key()),
        }
    }
}

/// An opened remote: the range source plus the first bytes of the blob
/// (enough for the EROFS superblock).
pub struct OpenedSource {
    pub source: Arc<dyn RangeSource>,
    pub probe: Bytes,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String, pub Transience);

/// Whether opening again later may succeed (a 503, a refused connection), or not (a 404, not a blob).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transience {
    Transient,
    Permanent,
}

impl OpenError {
    pub fn is_transient(&self) -> bool {
        self.1 == Transience::Transient
    }
}

fn transience(transient: bool) -> Transience {
    if transient {
        Transience::Transient
    } else {
        Transience::Permanent
    }
}

pub async fn open_source(spec: &SourceSpec, http: &ClientConfig) -> Result<OpenedSource, OpenError> {
    match spec {
        SourceSpec::Url { url } => {
            let (source, probe) = HttpSource::open(url, http).await.map_err(|e| {
                let transient = matches!(&e, crate::remote::http::OpenError::Fetch(f) if f.is_transient());
                OpenError(e.to_string(), transience(transient))
            })?;
            Ok(OpenedSource { source: Arc::new(source), probe })
        }
        SourceSpec::Oci(blob) => {
            let (source, probe) =
                crate::oci::open_blob(blob, http).await.map_err(|e| OpenError(e.to_string(), transience(e.is_transient())))?;
            Ok(OpenedSource { source, probe })
        }
        SourceSpec::S3(object) => {
            let (source, probe) =
                crate::remote::s3::open_object(object, http).await.map_err(|e| OpenError(e.to_string(), Transience::Permanent))?;
            Ok(OpenedSource { source, probe })
        }
    }
}

/// `…/blobs/sha256:<hex>` names its digest; other URLs have none we can trust.
pub fn digest_from_url(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let last = path.rsplit('/').next()?;
    let hex = last.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_only_from_blob_urls() {
        let hex = "a".repeat(64);
        assert_eq!(
            digest_from_url(&format!("http://r:5000/v2/x/blobs/sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(digest_from_url("http://r/image.erofs"), None);
        assert_eq!(digest_from_url("http://r/v2/x/blobs/sha256:abc"), None);
        assert_eq!(digest_from_url(&format!("http://r/v2/x/blobs/sha256:{}", "A".repeat(64))), None);
    }

    #[test]
    fn url_keys_and_descriptions_hide_credentials() {
        let spec = SourceSpec::Url { url: "https://u:secret@h/x.erofs?sig=abc".into() };
        assert!(!spec.describe().contains("secret"));
        assert!(!spec.describe().contains("abc"));
        assert!(!format!("{spec:?}").contains("secret"));
        assert!(spec.cache_key().unwrap().starts_with("url-"));
    }
}
