//! The agent's view of an S3 object: a [`RangeSource`] doing ranged GETs of one version.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::client::{ObjectInfo, S3Client};
use super::error::S3Error;
use crate::remote::{FetchError, RangeSource};

/// One object version. Sources of many objects of a bucket share one client (and its connections).
pub struct S3Source {
    client: Arc<S3Client>,
    key: String,
    info: ObjectInfo,
}

impl S3Source {
    pub fn new(client: Arc<S3Client>, key: String, info: ObjectInfo) -> S3Source {
        S3Source { client, key, info }
    }

    pub fn client(&self) -> &S3Client {
        &self.client
    }

    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    pub async fn read(&self, range: Range<u64>) -> Result<Bytes, S3Error> {
        self.client.get_range(&self.key, range, &self.info).await
    }
}

impl From<S3Error> for FetchError {
    fn from(e: S3Error) -> FetchError {
        if e.is_transient() {
            FetchError::Transient(e.to_string())
        } else {
            FetchError::Permanent(e.to_string())
        }
    }
}

impl RangeSource for S3Source {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move { self.read(range).await.map_err(FetchError::from) })
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.client.bucket(), self.key)
    }

    fn served_by(&self) -> Option<String> {
        self.client.served_by()
    }
}
