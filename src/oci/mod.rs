//! OCI registry source: image references, manifests, auth, mirrors.
//! (Placeholder until the OCI issue: references are refused clearly.)

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::remote::http::HttpConfig;
use crate::remote::RangeSource;

/// A blob of an image, resolved by the front end.
#[derive(Clone, Serialize, Deserialize)]
pub struct OciBlobSpec {
    pub reference: String,
    pub digest: String,
    pub size: u64,
}

impl OciBlobSpec {
    pub fn describe(&self) -> String {
        self.reference.clone()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OciError(pub String);

pub async fn open_blob(spec: &OciBlobSpec, _http: &HttpConfig) -> Result<(Arc<dyn RangeSource>, Bytes), OciError> {
    Err(OciError(format!("{}: image references are not supported yet; use the blob URL", spec.reference)))
}

/// Resolves an image reference to one blob (front end side).
pub fn resolve_reference(reference: &str, _opts: &crate::mount::MountOptions) -> Result<OciBlobSpec, OciError> {
    Err(OciError(format!(
        "unsupported source {reference:?}: image references are not supported yet; use an http(s):// URL of the blob"
    )))
}
