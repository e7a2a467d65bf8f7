//! Sources added by later mounts of the same blob.
//!
//! One agent serves every mount of a blob. A second mount may name the blob by another source: another
//! URL of the same `…/blobs/sha256:…`, another registry or mirror, other credentials. That source is
//! honoured, not ignored: once opened (its size must match) it serves the blob too, tried in the order
//! added whenever the agent's own source fails. Bytes from any of them are the same blob's: the digest
//! check at completion covers them all.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};

use crate::http::ClientConfig;
use crate::remote::{FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

use super::sources::{open_source, SourceSpec};

/// The agent's source plus the sources later mounts added.
pub struct AddedSources {
    primary: Arc<dyn RangeSource>,
    /// The specs already serving (the agent's own first): a repeated one is not added twice.
    specs: Mutex<Vec<SourceSpec>>,
    added: RwLock<Vec<Arc<dyn RangeSource>>>,
    /// Which added source served last (index), for `served_by`.
    last: Mutex<Option<usize>>,
    http: ClientConfig,
}

/// What [`AddedSources::add`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// The spec names a source already serving (the same endpoint and credentials).
    Known,
    /// Opened and added; its description.
    Added(String),
}

/// Two specs name the same source when they differ at most in what does not change where bytes come
/// from: the reference text (a tag vs a digest of the same blob) and a front end's token.
pub fn same_source(a: &SourceSpec, b: &SourceSpec) -> bool {
    fn essence(s: &SourceSpec) -> serde_json::Value {
        let mut v = serde_json::to_value(s).unwrap_or(serde_json::Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.remove("auth_handoff");
            obj.remove("reference");
        }
        v
    }
    essence(a) == essence(b)
}

impl AddedSources {
    pub fn new(primary: Arc<dyn RangeSource>, own: SourceSpec, http: ClientConfig) -> AddedSources {
        AddedSources {
            primary,
            specs: Mutex::new(vec![own]),
            added: RwLock::new(Vec::new()),
            last: Mutex::new(None),
            http,
        }
    }

    /// Opens `spec` and adds it, unless it is a source already serving. The blob size must match.
    pub async fn add(&self, spec: SourceSpec) -> Result<Added, String> {
        if self.specs.lock().iter().any(|s| same_source(s, &spec)) {
            return Ok(Added::Known);
        }
        let shown = spec.describe();
        let opened = open_source(&spec, &self.http).await.map_err(|e| format!("cannot open {shown}: {e}"))?;
        let size = opened.source.size();
        if size != self.primary.size() {
            return Err(format!("{shown} is {size} bytes, the blob served is {} bytes", self.primary.size()));
        }
        let mut specs = self.specs.lock();
        if specs.iter().any(|s| same_source(s, &spec)) {
            return Ok(Added::Known);
        }
        specs.push(spec);
        self.added.write().push(opened.source);
        tracing::info!(source = %shown, "a later mount's source serves this blob too");
        Ok(Added::Added(shown))
    }

    pub fn added_count(&self) -> usize {
        self.added.read().len()
    }
}

impl RangeSource for AddedSources {
    fn size(&self) -> u64 {
        self.primary.size()
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            let first = match self.primary.fetch(range.clone()).await {
                Ok(bytes) => {
                    *self.last.lock() = None;
                    return Ok(bytes);
                }
                Err(e) => e,
            };
            let added: Vec<Arc<dyn RangeSource>> = self.added.read().clone();
            let mut transient = first.is_transient();
            for (i, source) in added.iter().enumerate() {
                match source.fetch(range.clone()).await {
                    Ok(bytes) => {
                        *self.last.lock() = Some(i);
                        return Ok(bytes);
                    }
                    Err(e) => {
                        tracing::debug!(source = %source.describe(), error = %e, "added source failed too");
                        transient |= e.is_transient();
                    }
                }
            }
            // Retry while any of them may recover.
            Err(if transient { FetchError::Transient(first.to_string()) } else { first })
        })
    }

    // The primary's shape (regions, granules, multi-range, link) is the
    // blob's: the scheduler cuts units at its regions and plans by its link.
    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(async move {
            match self.primary.fetch_many(ranges.clone()).await {
                Ok(parts) => Ok(parts),
                Err(_) if !self.added.read().is_empty() => {
                    crate::remote::multi::fetch_merged(|r| self.fetch(r), &ranges, 0, u64::MAX).await
                }
                Err(e) => Err(e),
            }
        })
    }

    fn multi_range(&self) -> MultiRange {
        self.primary.multi_range()
    }

    fn link(&self) -> LinkEstimate {
        self.primary.link()
    }

    fn region(&self, offset: u64) -> Range<u64> {
        self.primary.region(offset)
    }

    fn granule(&self, range: Range<u64>) -> Range<u64> {
        self.primary.granule(range)
    }

    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        self.primary.verify_complete()
    }

    fn describe(&self) -> String {
        self.primary.describe()
    }

    fn served_by(&self) -> Option<String> {
        let last = *self.last.lock();
        match last.and_then(|i| self.added.read().get(i).map(|s| s.served_by().unwrap_or_else(|| s.describe()))) {
            Some(by) => Some(by),
            None => self.primary.served_by(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    struct Fixed {
        data: Vec<u8>,
        fail: bool,
        calls: AtomicU64,
    }

    impl RangeSource for Fixed {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, SeqCst);
                if self.fail {
                    Err(FetchError::Permanent("down".into()))
                } else {
                    Ok(Bytes::copy_from_slice(&self.data[range.start as usize..range.end as usize]))
                }
            })
        }
        fn describe(&self) -> String {
            format!("fixed fail={}", self.fail)
        }
    }

    fn fixed(fail: bool) -> Arc<Fixed> {
        Arc::new(Fixed { data: (0..100u8).collect(), fail, calls: AtomicU64::new(0) })
    }

    fn spec(url: &str) -> SourceSpec {
        SourceSpec::Url { url: url.into() }
    }

    #[test]
    fn an_added_source_serves_when_the_first_fails() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (down, up) = (fixed(true), fixed(false));
        let s = AddedSources::new(down.clone(), spec("http://a/x"), ClientConfig::default());
        s.added.write().push(up.clone());
        let got = rt.block_on(s.fetch(10..20)).unwrap();
        assert_eq!(&got[..], &(10..20u8).collect::<Vec<_>>()[..]);
        assert_eq!((down.calls.load(SeqCst), up.calls.load(SeqCst)), (1, 1));
        assert_eq!(s.served_by().as_deref(), Some("fixed fail=false"));
        // Nothing serves: the first source's error, permanent as it was.
        let s = AddedSources::new(fixed(true), spec("http://a/x"), ClientConfig::default());
        s.added.write().push(fixed(true));
        assert!(!rt.block_on(s.fetch(0..1)).unwrap_err().is_transient());
    }

    #[test]
    fn the_same_source_is_known_and_not_opened_again() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let s = AddedSources::new(fixed(false), spec("http://a/x"), ClientConfig::default());
        assert_eq!(rt.block_on(s.add(spec("http://a/x"))), Ok(Added::Known));
        assert_eq!(s.added_count(), 0);
        assert!(!same_source(&spec("http://a/x"), &spec("http://b/x")));
    }
}
