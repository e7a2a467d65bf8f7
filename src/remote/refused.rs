//! Regions of the address space that proved wrong for good.
//!
//! When a segment of a layout fails its whole-source check at completion twice (a tar that does
//! not hash to its diff_id: a forged zinfo, a buggy index), fetching it again would only put the
//! same wrong bytes back in front of readers. Its region is refused instead: every fetch that
//! touches it fails permanently (readers get `EIO`), whichever source (or mirror) would serve it.
//! The agent wraps its scheduler's source in [`RefusingSource`]; completion refuses through the
//! shared [`RefusedRanges`].

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::RwLock;

use super::{FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

/// Refused regions and why, shared between completion and the fetch path.
#[derive(Default, Debug)]
pub struct RefusedRanges {
    refused: RwLock<Vec<(Range<u64>, String)>>,
}

impl RefusedRanges {
    /// Refuses `range` from now on; `why` is what a failed fetch says.
    pub fn refuse(&self, range: Range<u64>, why: String) {
        if range.start < range.end {
            self.refused.write().push((range, why));
        }
    }

    /// Why a fetch of any of `ranges` must fail, if one touches a refused region.
    pub fn refusal<'a>(&self, ranges: impl IntoIterator<Item = &'a Range<u64>>) -> Option<String> {
        let refused = self.refused.read();
        if refused.is_empty() {
            return None;
        }
        ranges.into_iter().find_map(|r| {
            refused.iter().find(|(bad, _)| bad.start < r.end && r.start < bad.end).map(|(_, why)| why.clone())
        })
    }

    pub fn is_empty(&self) -> bool {
        self.refused.read().is_empty()
    }
}

/// A source that fails every fetch touching a refused region and forwards the rest.
pub struct RefusingSource {
    inner: Arc<dyn RangeSource>,
    refused: Arc<RefusedRanges>,
}

impl RefusingSource {
    pub fn new(inner: Arc<dyn RangeSource>, refused: Arc<RefusedRanges>) -> RefusingSource {
        RefusingSource { inner, refused }
    }
}

impl RangeSource for RefusingSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        if let Some(why) = self.refused.refusal([&range]) {
            return Box::pin(async move { Err(FetchError::Permanent(why)) });
        }
        self.inner.fetch(range)
    }

    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        if let Some(why) = self.refused.refusal(&ranges) {
            return Box::pin(async move { Err(FetchError::Permanent(why)) });
        }
        self.inner.fetch_many(ranges)
    }

    fn granule(&self, range: Range<u64>) -> Range<u64> {
        self.inner.granule(range)
    }

    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        self.inner.verify_complete()
    }

    fn multi_range(&self) -> MultiRange {
        self.inner.multi_range()
    }

    fn link(&self) -> LinkEstimate {
        self.inner.link()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn served_by(&self) -> Option<String> {
        self.inner.served_by()
    }

    fn region(&self, offset: u64) -> Range<u64> {
        self.inner.region(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Zeros(u64);

    impl RangeSource for Zeros {
        fn size(&self) -> u64 {
            self.0
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move { Ok(Bytes::from(vec![0u8; (range.end - range.start) as usize])) })
        }
        fn describe(&self) -> String {
            "zeros".into()
        }
    }

    #[tokio::test]
    async fn fetches_touching_a_refused_region_fail_and_the_rest_pass() {
        let refused = Arc::new(RefusedRanges::default());
        let s = RefusingSource::new(Arc::new(Zeros(1 << 20)), Arc::clone(&refused));
        assert_eq!(s.fetch(0..4096).await.unwrap().len(), 4096);
        refused.refuse(8192..16384, "layer 1 does not hash to its diff_id".into());
        refused.refuse(5..5, "empty: ignored".into());
        assert!(!refused.is_empty());
        assert_eq!(s.fetch(0..4096).await.unwrap().len(), 4096, "before the region");
        assert_eq!(s.fetch(16384..20000).await.unwrap().len(), 3616, "after it (ends are exclusive)");
        let e = s.fetch(16383..16385).await.unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("diff_id"), "{e}");
        assert!(s.fetch_many(vec![0..10, 9000..9001]).await.is_err(), "one range inside is enough");
        let parts = s.fetch_many(vec![0..10, 20000..20010]).await.unwrap();
        assert_eq!(parts.bytes.len(), 2);
    }
}
