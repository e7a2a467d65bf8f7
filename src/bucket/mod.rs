//! Buckets as images (issue 17, item 3): `erofs-fanotify build --s3 ENDPOINT BUCKET[/PREFIX]
//! OUT.erofs` writes a metadata-only EROFS image of a listing whose every file reads lazily from
//! its own object, and a mount of that image (a local file, or the image uploaded as an object
//! and mounted by `s3://`) needs nothing else.
//!
//! * [`record`]: what the image records (a locator xattr on the root, an object table after the
//!   EROFS blocks, each object at its own block-aligned flat address) — and why;
//! * [`keys`]: which keys become which paths (the rule for keys that are no path);
//! * [`build`]: the two-pass write;
//! * [`read`]: finding the record in an image;
//! * [`resolve`]: the front end (the image, the objects' endpoints and credentials, one check
//!   that they work) making a [`BucketImageSpec`];
//! * [`open`]: the agent turning the spec into the mount's [`Layout`](crate::segments::Layout):
//!   the image at 0, each object an [`S3Source`](crate::remote::s3::S3Source) segment sharing one
//!   client.

pub mod build;
pub mod keys;
pub mod open;
pub mod read;
pub mod record;
pub mod resolve;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent::sources::SourceSpec;
use crate::remote::s3::{CredentialOrigin, S3Credentials, SigVersion, UrlStyle};

/// A bucket image to mount, resolved by the front end and handed to the agent on stdin.
#[derive(Clone, Serialize, Deserialize)]
pub struct BucketImageSpec {
    /// The image file's own bytes: a local file or an S3 object (one version).
    pub image: Box<SourceSpec>,
    /// Hex SHA-256 of the object table the front end read: the agent refuses any other.
    pub table_sha256: String,
    pub objects: BucketObjectsSpec,
}

/// How to reach the objects (the image records where they were; mount options may override).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketObjectsSpec {
    pub bucket: String,
    pub prefix: String,
    /// Base URLs, tried in order.
    pub endpoints: Vec<String>,
    pub region: String,
    #[serde(default)]
    pub url_style: Option<UrlStyle>,
    pub sig: SigVersion,
    #[serde(default)]
    pub credentials: Option<S3Credentials>,
    pub credential_origin: CredentialOrigin,
}

impl std::fmt::Debug for BucketObjectsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketObjectsSpec")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoints", &self.endpoints)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("origin", &self.credential_origin)
            .finish()
    }
}

impl BucketImageSpec {
    /// Credential-free: the image's own name.
    pub fn describe(&self) -> String {
        self.image.describe()
    }

    /// `bucket-<32 hex of sha256(the image's key, the table's hash)>`: a new image version or a
    /// new table is a new entry; endpoints and credentials do not matter.
    pub fn cache_key(&self) -> Result<String, String> {
        let image = self.image.cache_key()?;
        let mut h = Sha256::new();
        for part in [image.as_bytes(), self.table_sha256.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Ok(format!("bucket-{}", &hex::encode(h.finalize())[..32]))
    }
}
