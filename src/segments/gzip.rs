//! Gzip spans as a segment source: the *uncompressed* tar of a layer, served
//! from its compressed blob (any [`RangeSource`]: registry, HTTP, S3, file)
//! through the layer's zinfo (DESIGN §7, issue 16).
//!
//! A fetch maps to the zinfo spans that hold it. Each span's compressed
//! bytes are one range of the blob; consecutive spans that are all missing
//! travel in one request. Before inflating, a span's bytes are checked
//! against its digest from the index artifact (`gzip::span_digest`: the
//! checkpoint record and the compressed input); then the span is inflated
//! whole. An inflate error, a short span or a digest mismatch is an error —
//! readers get EIO, never zeros, and nothing is cached.
//!
//! Concurrent fetches that need the same span share one request (an
//! in-flight map keyed by span index; the request runs as its own task, so a
//! reader that gives up does not cancel it for the others). The last few
//! inflated spans are kept in memory: the scheduler may cut one span into
//! several requests. [`RangeSource::granule`] widens a range to whole spans,
//! so the scheduler fetches and writes whole spans to the cache.
//!
//! The blob digest: the compressed bytes are hashed in order as runs arrive
//! (the first span's request starts at byte 0, so the gzip header is
//! included). [`RangeSource::verify_complete`] finishes the hash, fetching
//! whatever part of the blob never arrived in order, and compares it with
//! the layer's digest.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::{join_all, BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::gzip::{inflate_last_span, inflate_span, span_digest, Zinfo, MAX_SPAN_OUTPUT};
use crate::remote::{FetchError, RangeSource};

/// Options of a [`GzipSpans`] source; what the index artifact says about the layer.
#[derive(Clone, Debug)]
pub struct GzipSpanConfig {
    /// For logs and errors (the layer digest).
    pub label: String,
    /// Size of the uncompressed tar (the zinfo does not record it).
    pub tar_size: u64,
    /// `gzip::span_digest` of each span (lowercase hex); `None`: unchecked.
    pub span_sha256: Option<Vec<String>>,
    /// `sha256:<hex>` of the compressed blob, checked by `verify_complete`.
    pub blob_digest: Option<String>,
    /// Inflated spans kept in memory.
    pub cached_spans: usize,
    /// Most spans fetched in one request.
    pub max_run: usize,
}

impl GzipSpanConfig {
    pub fn new(label: impl Into<String>, tar_size: u64) -> GzipSpanConfig {
        GzipSpanConfig {
            label: label.into(),
            tar_size,
            span_sha256: None,
            blob_digest: None,
            cached_spans: 4,
            max_run: 8,
        }
    }
}

/// A zinfo that cannot serve this blob.
#[derive(Debug, thiserror::Error)]
#[error("layer {label}: {what}")]
pub struct GzipSpanError {
    pub label: String,
    pub what: String,
}

/// Counters, for status and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GzipSpanStats {
    /// Range requests made to the blob (runs of spans, and the digest's tail).
    pub requests: u64,
    /// Compressed bytes fetched.
    pub compressed_bytes: u64,
    pub spans_inflated: u64,
    pub digest_mismatches: u64,
    pub inflate_errors: u64,
    /// Fetches answered from inflated spans kept in memory or in flight.
    pub shared: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    compressed_bytes: AtomicU64,
    spans_inflated: AtomicU64,
    digest_mismatches: AtomicU64,
    inflate_errors: AtomicU64,
    shared: AtomicU64,
}

/// A failure shared by every waiter of a run (FetchError is not Clone).
#[derive(Clone, Debug)]
struct RunFailure {
    transient: bool,
    message: String,
}

impl From<RunFailure> for FetchError {
    fn from(f: RunFailure) -> FetchError {
        if f.transient {
            FetchError::Transient(f.message)
        } else {
            FetchError::Permanent(f.message)
        }
    }
}

impl From<FetchError> for RunFailure {
    fn from(e: FetchError) -> RunFailure {
        RunFailure { transient: e.is_transient(), message: e.to_string() }
    }
}

type RunResult = Result<Arc<Vec<Bytes>>, RunFailure>;
type RunFuture = Shared<BoxFuture<'static, RunResult>>;

struct State {
    /// Recently inflated spans, newest last.
    cache: VecDeque<(usize, Bytes)>,
    /// Span -> (its run, the run's first span).
    inflight: HashMap<usize, (RunFuture, usize, u64)>,
    next_run: u64,
    /// The blob's bytes `[0, hashed_to)` went through `hasher`, in order.
    hashed_to: u64,
    hasher: Sha256,
    verdict: Option<bool>,
}

struct Inner {
    blob: Arc<dyn RangeSource>,
    zinfo: Zinfo,
    cfg: GzipSpanConfig,
    /// Decoded `span_sha256`.
    digests: Option<Vec<String>>,
    state: Mutex<State>,
    counters: Counters,
}

/// The uncompressed tar of a gzip layer as a [`RangeSource`].
#[derive(Clone)]
pub struct GzipSpans {
    inner: Arc<Inner>,
}

/// Largest span output accepted: a span is the span size plus at most one
/// deflate block (zlib's blocks stay below a few MiB).
fn max_span_output(span_size: u64) -> u64 {
    span_size.saturating_mul(2).saturating_add(16 << 20).min(MAX_SPAN_OUTPUT)
}

impl GzipSpans {
    /// Checks the zinfo against the blob and the tar size (untrusted input:
    /// every span must lie inside the blob and the tar, with bounded sizes).
    pub fn new(blob: Arc<dyn RangeSource>, zinfo: Zinfo, cfg: GzipSpanConfig) -> Result<GzipSpans, GzipSpanError> {
        let bad = |what: String| GzipSpanError { label: cfg.label.clone(), what };
        let blob_size = blob.size();
        if cfg.tar_size == 0 {
            return Err(bad("the tar size is 0".into()));
        }
        zinfo.check_bounds(blob_size, cfg.tar_size).map_err(|e| bad(e.to_string()))?;
        let cap = max_span_output(zinfo.span_size());
        for k in 0..zinfo.span_count() {
            let input = zinfo.span_input_range(k, blob_size).map_err(|e| bad(e.to_string()))?;
            let output = zinfo.span_output_range(k, cfg.tar_size).map_err(|e| bad(e.to_string()))?;
            let out_len = output.end - output.start;
            if out_len > cap {
                return Err(bad(format!("zinfo span {k} holds {out_len} bytes, more than a span of {} may", zinfo.span_size())));
            }
            // Stored blocks and member headers cost a little over the output;
            // far more compressed input than output is no span of a real stream.
            let in_len = input.end - input.start;
            if in_len > out_len.saturating_mul(2).saturating_add(1 << 20) {
                return Err(bad(format!("zinfo span {k} needs {in_len} compressed bytes for {out_len} bytes of output")));
            }
        }
        let digests = match &cfg.span_sha256 {
            None => None,
            Some(d) if d.len() == zinfo.span_count() => Some(d.clone()),
            Some(d) => return Err(bad(format!("{} span digests for {} zinfo spans", d.len(), zinfo.span_count()))),
        };
        Ok(GzipSpans {
            inner: Arc::new(Inner {
                blob,
                zinfo,
                digests,
                state: Mutex::new(State {
                    cache: VecDeque::new(),
                    inflight: HashMap::new(),
                    next_run: 0,
                    hashed_to: 0,
                    hasher: Sha256::new(),
                    verdict: None,
                }),
                counters: Counters::default(),
                cfg,
            }),
        })
    }

    /// The size of the uncompressed tar when nothing recorded it (a zinfo
    /// does not; erofs-utils' `oci.tarindex=`/`oci.zinfo=` files give only
    /// the device's blocks, which end before the tar's trailing records):
    /// one request for the last span, inflated to the stream's end.
    pub async fn measure_tar_size(blob: &dyn RangeSource, zinfo: &Zinfo, label: &str) -> Result<u64, GzipSpanError> {
        let bad = |what: String| GzipSpanError { label: label.to_string(), what };
        let k = zinfo.span_count().checked_sub(1).ok_or_else(|| bad("the zinfo has no checkpoints".into()))?;
        let input = zinfo.span_input_range(k, blob.size()).map_err(|e| bad(e.to_string()))?;
        let out_start = zinfo.checkpoint(k).map(|c| c.out_offset).ok_or_else(|| bad("the zinfo lost a checkpoint".into()))?;
        if input.end - input.start > max_span_output(zinfo.span_size()).saturating_mul(2).saturating_add(1 << 20) {
            return Err(bad(format!("the last zinfo span needs {} compressed bytes", input.end - input.start)));
        }
        let bytes = blob.fetch(input.clone()).await.map_err(|e| bad(format!("cannot fetch the last span: {e}")))?;
        if bytes.len() as u64 != input.end - input.start {
            return Err(bad(format!("the blob returned {} bytes for {input:?}", bytes.len())));
        }
        let cap = max_span_output(zinfo.span_size());
        let zinfo = zinfo.clone();
        let tail = tokio::task::spawn_blocking(move || inflate_last_span(&zinfo, &bytes, cap))
            .await
            .map_err(|e| bad(format!("the inflate task failed: {e}")))?
            .map_err(|e| bad(format!("the last span does not inflate: {e}")))?;
        out_start.checked_add(tail.len() as u64).ok_or_else(|| bad("the tar size overflows".into()))
    }

    pub fn stats(&self) -> GzipSpanStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GzipSpanStats {
            requests: g(&c.requests),
            compressed_bytes: g(&c.compressed_bytes),
            spans_inflated: g(&c.spans_inflated),
            digest_mismatches: g(&c.digest_mismatches),
            inflate_errors: g(&c.inflate_errors),
            shared: g(&c.shared),
        }
    }

    pub fn zinfo(&self) -> &Zinfo {
        &self.inner.zinfo
    }

    /// The blob digest check's outcome, once made.
    pub fn blob_verdict(&self) -> Option<bool> {
        self.inner.state.lock().verdict
    }

    async fn fetch_range(&self, range: Range<u64>) -> Result<Bytes, FetchError> {
        let inner = &self.inner;
        let tar_size = inner.cfg.tar_size;
        if range.start >= range.end || range.end > tar_size {
            return Err(FetchError::Permanent(format!(
                "range {range:?} outside the {tar_size}-byte tar of layer {}",
                inner.cfg.label
            )));
        }
        let spans = inner.zinfo.spans_for_range(range.clone(), tar_size);
        // Each span: ready bytes, or a run to wait for (and the span's place in it).
        enum Part {
            Ready(Bytes),
            Wait(RunFuture, usize),
        }
        let mut parts: Vec<(usize, Part)> = Vec::with_capacity(spans.len());
        let mut new_runs: Vec<(Range<usize>, u64)> = Vec::new();
        {
            let mut st = inner.state.lock();
            let mut fresh: Vec<usize> = Vec::new();
            for k in spans.clone() {
                if let Some((_, b)) = st.cache.iter().find(|(s, _)| *s == k) {
                    inner.counters.shared.fetch_add(1, Ordering::Relaxed);
                    parts.push((k, Part::Ready(b.clone())));
                } else if let Some((fut, first, _)) = st.inflight.get(&k) {
                    inner.counters.shared.fetch_add(1, Ordering::Relaxed);
                    parts.push((k, Part::Wait(fut.clone(), k - first)));
                } else {
                    fresh.push(k);
                    // A placeholder, filled once the runs exist.
                    parts.push((k, Part::Ready(Bytes::new())));
                }
            }
            // Consecutive fresh spans form runs of at most max_run.
            let max_run = inner.cfg.max_run.max(1);
            for &k in &fresh {
                match new_runs.last_mut() {
                    Some((r, _)) if r.end == k && r.len() < max_run => r.end += 1,
                    _ => {
                        let id = st.next_run;
                        st.next_run += 1;
                        new_runs.push((k..k + 1, id));
                    }
                }
            }
            for (run, id) in &new_runs {
                let fut = spawn_run(Arc::clone(inner), run.clone(), *id);
                for k in run.clone() {
                    st.inflight.insert(k, (fut.clone(), run.start, *id));
                }
            }
            for (k, part) in parts.iter_mut() {
                if let Part::Ready(b) = part {
                    if b.is_empty() && fresh.contains(k) {
                        if let Some((fut, first, _)) = st.inflight.get(k) {
                            *part = Part::Wait(fut.clone(), *k - first);
                        }
                    }
                }
            }
        }
        let waited = join_all(parts.into_iter().map(|(k, part)| async move {
            match part {
                Part::Ready(b) => Ok((k, b)),
                Part::Wait(fut, i) => {
                    let spans = fut.await.map_err(FetchError::from)?;
                    spans.get(i).cloned().map(|b| (k, b)).ok_or_else(|| FetchError::Permanent("a span run lost a span".into()))
                }
            }
        }))
        .await;
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for item in waited {
            let (k, bytes) = item?;
            let span = inner.zinfo.span_output_range(k, tar_size).map_err(|e| FetchError::Permanent(e.to_string()))?;
            if bytes.len() as u64 != span.end - span.start {
                return Err(FetchError::Permanent(format!("span {k} of layer {} inflated to the wrong size", inner.cfg.label)));
            }
            let from = range.start.max(span.start) - span.start;
            let to = range.end.min(span.end) - span.start;
            if from < to {
                out.extend_from_slice(&bytes[from as usize..to as usize]);
            }
        }
        if out.len() as u64 != range.end - range.start {
            return Err(FetchError::Permanent(format!(
                "layer {}: the spans hold {} of the {} bytes asked for",
                inner.cfg.label,
                out.len(),
                range.end - range.start
            )));
        }
        Ok(out.freeze())
    }

    async fn verify_blob(&self) -> Result<Option<bool>, FetchError> {
        let inner = &self.inner;
        let Some(want) = inner.cfg.blob_digest.clone() else {
            return Ok(None);
        };
        let size = inner.blob.size();
        const CHUNK: u64 = 8 << 20;
        loop {
            let pos = {
                let st = inner.state.lock();
                if let Some(v) = st.verdict {
                    return Ok(Some(v));
                }
                st.hashed_to
            };
            if pos >= size {
                break;
            }
            let end = pos.saturating_add(CHUNK).min(size);
            inner.counters.requests.fetch_add(1, Ordering::Relaxed);
            let bytes = inner.blob.fetch(pos..end).await?;
            if bytes.len() as u64 != end - pos {
                return Err(FetchError::Permanent(format!("the blob of layer {} returned a short range", inner.cfg.label)));
            }
            inner.counters.compressed_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            feed_hash(inner, pos, &bytes, &want);
        }
        let verdict = {
            let mut st = inner.state.lock();
            if st.verdict.is_none() {
                let got = format!("sha256:{}", hex::encode(st.hasher.clone().finalize()));
                st.verdict = Some(got == want);
            }
            st.verdict
        };
        Ok(verdict)
    }
}

/// Feeds the in-order blob hash with bytes `[at, at + len)` where they
/// continue it; finishes the verdict at the blob's end.
fn feed_hash(inner: &Inner, at: u64, bytes: &[u8], want: &str) {
    let size = inner.blob.size();
    let end = at + bytes.len() as u64;
    let mut st = inner.state.lock();
    if st.verdict.is_some() || at > st.hashed_to || end <= st.hashed_to {
        return;
    }
    let skip = (st.hashed_to - at) as usize;
    st.hasher.update(&bytes[skip..]);
    st.hashed_to = end;
    if end == size {
        let got = format!("sha256:{}", hex::encode(st.hasher.clone().finalize()));
        let ok = got == want;
        if !ok {
            tracing::error!(layer = %inner.cfg.label, expected = want, got = %got, "the layer blob does not match its digest");
        }
        st.verdict = Some(ok);
    }
}

/// Starts the request of a run of spans as its own task; every fetch that
/// needs one of them waits on the shared result.
fn spawn_run(inner: Arc<Inner>, run: Range<usize>, id: u64) -> RunFuture {
    let task = tokio::spawn({
        let inner = Arc::clone(&inner);
        let run = run.clone();
        async move {
            let result = fetch_run(&inner, run.clone()).await;
            let mut st = inner.state.lock();
            for k in run.clone() {
                if st.inflight.get(&k).is_some_and(|(_, _, rid)| *rid == id) {
                    st.inflight.remove(&k);
                }
            }
            if let Ok(spans) = &result {
                let keep = inner.cfg.cached_spans;
                for (k, b) in run.zip(spans.iter()) {
                    if keep == 0 {
                        break;
                    }
                    st.cache.retain(|(s, _)| *s != k);
                    st.cache.push_back((k, b.clone()));
                    while st.cache.len() > keep {
                        st.cache.pop_front();
                    }
                }
            }
            result
        }
    });
    async move {
        match task.await {
            Ok(r) => r,
            Err(e) => Err(RunFailure { transient: true, message: format!("a span fetch task failed: {e}") }),
        }
    }
    .boxed()
    .shared()
}

/// One request for the compressed bytes of `run`, each span checked and inflated.
async fn fetch_run(inner: &Arc<Inner>, run: Range<usize>) -> RunResult {
    let label = &inner.cfg.label;
    let blob_size = inner.blob.size();
    let z = &inner.zinfo;
    let perm = |message: String| RunFailure { transient: false, message };
    let first = z.span_input_range(run.start, blob_size).map_err(|e| perm(e.to_string()))?;
    let last = z.span_input_range(run.end - 1, blob_size).map_err(|e| perm(e.to_string()))?;
    // Span 0's request starts at the blob's first byte: the gzip header joins
    // the in-order digest of the blob for a few bytes more.
    let start = if run.start == 0 { 0 } else { first.start };
    let request = start..last.end;
    inner.counters.requests.fetch_add(1, Ordering::Relaxed);
    let bytes = inner.blob.fetch(request.clone()).await.map_err(RunFailure::from)?;
    if bytes.len() as u64 != request.end - request.start {
        return Err(RunFailure {
            transient: true,
            message: format!("layer {label}: the blob returned {} bytes for {request:?}", bytes.len()),
        });
    }
    inner.counters.compressed_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    if let Some(want) = &inner.cfg.blob_digest {
        feed_hash(inner, request.start, &bytes, want);
    }
    let inner2 = Arc::clone(inner);
    let spans = tokio::task::spawn_blocking(move || {
        let inner = inner2;
        let z = &inner.zinfo;
        let mut out = Vec::with_capacity(run.len());
        for k in run {
            let r = z.span_input_range(k, blob_size).map_err(|e| perm(e.to_string()))?;
            let compressed = &bytes[(r.start - request.start) as usize..(r.end - request.start) as usize];
            if let Some(digests) = &inner.digests {
                let got = span_digest(z, k, compressed).map_err(|e| perm(e.to_string()))?;
                if got != digests[k] {
                    inner.counters.digest_mismatches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(layer = %inner.cfg.label, span = k, "span bytes do not match the index's digest; readers get EIO");
                    return Err(perm(format!(
                        "layer {}: span {k} does not match its digest in the index (a corrupt blob or a forged index)",
                        inner.cfg.label
                    )));
                }
            }
            match inflate_span(z, k, compressed, inner.cfg.tar_size) {
                Ok(v) => {
                    inner.counters.spans_inflated.fetch_add(1, Ordering::Relaxed);
                    out.push(Bytes::from(v));
                }
                Err(e) => {
                    inner.counters.inflate_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(layer = %inner.cfg.label, span = k, error = %e, "span does not inflate; readers get EIO");
                    return Err(perm(format!("layer {}: {e}", inner.cfg.label)));
                }
            }
        }
        Ok(Arc::new(out))
    })
    .await
    .map_err(|e| RunFailure { transient: true, message: format!("the inflate task failed: {e}") })?;
    spans
}

impl RangeSource for GzipSpans {
    fn size(&self) -> u64 {
        self.inner.cfg.tar_size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(self.fetch_range(range))
    }

    fn describe(&self) -> String {
        format!("gzip spans of {}", self.inner.blob.describe())
    }

    fn served_by(&self) -> Option<String> {
        self.inner.blob.served_by()
    }

    /// Whole spans: decompression starts at a checkpoint anyway.
    fn granule(&self, range: Range<u64>) -> Range<u64> {
        let tar_size = self.inner.cfg.tar_size;
        let spans = self.inner.zinfo.spans_for_range(range.clone(), tar_size);
        if spans.is_empty() {
            return range;
        }
        let z = &self.inner.zinfo;
        match (z.span_output_range(spans.start, tar_size), z.span_output_range(spans.end - 1, tar_size)) {
            (Ok(a), Ok(b)) => a.start.min(range.start)..b.end.max(range.end).min(tar_size),
            _ => range,
        }
    }

    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        Box::pin(self.verify_blob())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gzip::{build_zinfo, BuilderOptions};
    use std::io::Write;

    /// A blob in memory that counts requests, can corrupt a byte, and can hold fetches.
    struct Blob {
        data: Vec<u8>,
        requests: AtomicU64,
        bytes: AtomicU64,
        flip: Mutex<Option<u64>>,
        gate: tokio::sync::Semaphore,
    }

    impl Blob {
        fn new(data: Vec<u8>) -> Arc<Blob> {
            Arc::new(Blob {
                data,
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                flip: Mutex::new(None),
                gate: tokio::sync::Semaphore::new(1 << 20),
            })
        }
    }

    impl RangeSource for Blob {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            Box::pin(async move {
                let _g = self.gate.acquire().await;
                self.requests.fetch_add(1, Ordering::SeqCst);
                self.bytes.fetch_add(range.end - range.start, Ordering::SeqCst);
                let mut v = self.data[range.start as usize..range.end as usize].to_vec();
                if let Some(at) = *self.flip.lock() {
                    if range.contains(&at) {
                        v[(at - range.start) as usize] ^= 0x40;
                    }
                }
                Ok(Bytes::from(v))
            })
        }
        fn describe(&self) -> String {
            "test blob".into()
        }
    }

    fn tar_like(len: usize) -> Vec<u8> {
        // Compressible but not trivially: words with a varying counter.
        let mut v = Vec::with_capacity(len);
        let mut i = 0u64;
        while v.len() < len {
            v.extend_from_slice(format!("line {i} of the layer {}\n", i.wrapping_mul(0x9e37_79b9) % 9973).as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    struct Rig {
        raw: Vec<u8>,
        blob: Arc<Blob>,
        zinfo: Zinfo,
        digests: Vec<String>,
        blob_digest: String,
    }

    /// Two gzip members (a member boundary inside the stream), spans of 256 KiB.
    fn rig() -> Rig {
        let raw = tar_like(3 << 20);
        let mut gz = Vec::new();
        for part in [&raw[..1_000_000], &raw[1_000_000..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(part).unwrap();
            gz.extend(e.finish().unwrap());
        }
        let built = build_zinfo(&gz[..], BuilderOptions { span_size: 256 << 10, ..BuilderOptions::default() }).unwrap();
        let digests = crate::gzip::span_digests(&built.zinfo, &mut std::io::Cursor::new(&gz), gz.len() as u64).unwrap();
        Rig {
            raw,
            blob_digest: built.blob_digest.clone().unwrap(),
            blob: Blob::new(gz),
            zinfo: built.zinfo,
            digests,
        }
    }

    fn source(r: &Rig) -> GzipSpans {
        let mut cfg = GzipSpanConfig::new("test", r.raw.len() as u64);
        cfg.span_sha256 = Some(r.digests.clone());
        cfg.blob_digest = Some(r.blob_digest.clone());
        GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_uncompressed_ranges_at_random_offsets() {
        let r = rig();
        assert!(r.zinfo.span_count() >= 8, "{} spans", r.zinfo.span_count());
        let s = source(&r);
        let mut seed = 17u64;
        for _ in 0..40 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = (seed >> 20) % r.raw.len() as u64;
            let len = 1 + (seed >> 8) % 600_000;
            let end = (start + len).min(r.raw.len() as u64);
            let got = s.fetch(start..end).await.unwrap();
            assert!(got[..] == r.raw[start as usize..end as usize], "{start}..{end}");
        }
        // The whole tar in one go, and a granule is whole spans.
        let all = s.fetch(0..r.raw.len() as u64).await.unwrap();
        assert!(all[..] == r.raw[..]);
        let g = s.granule(300_000..300_001);
        let k = r.zinfo.span_for_offset(300_000, r.raw.len() as u64).unwrap();
        assert_eq!(g, r.zinfo.span_output_range(k, r.raw.len() as u64).unwrap());
        assert_eq!(s.granule(0..r.raw.len() as u64), 0..r.raw.len() as u64);
        assert_eq!(s.stats().digest_mismatches, 0);
        // Every span has been fetched in order at some point? Not necessarily:
        // verify_complete fetches what the in-order hash missed.
        assert_eq!(s.verify_complete().await.unwrap(), Some(true));
        assert_eq!(s.blob_verdict(), Some(true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_the_spans_touched() {
        let r = rig();
        let size = r.raw.len() as u64;
        let blob_size = r.blob.size();
        // One span per request: a range over spans 2..=5 is four requests of
        // exactly those spans' compressed bytes.
        let mut cfg = GzipSpanConfig::new("runs", size);
        cfg.max_run = 1;
        cfg.cached_spans = 0;
        let s = GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).unwrap();
        let a = r.zinfo.span_output_range(2, size).unwrap().start + 5;
        let b = r.zinfo.span_output_range(5, size).unwrap().end - 5;
        assert_eq!(r.zinfo.spans_for_range(a..b, size), 2..6);
        let got = s.fetch(a..b).await.unwrap();
        assert!(got[..] == r.raw[a as usize..b as usize]);
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), 4);
        let want: u64 = (2..6).map(|k| r.zinfo.span_input_range(k, blob_size).unwrap()).map(|x| x.end - x.start).sum();
        assert_eq!(r.blob.bytes.load(Ordering::SeqCst), want);
        assert_eq!(s.stats().spans_inflated, 4);
        // Runs of up to max_run spans: the same range in one request of
        // in_2 - 1 .. in_6 + 1.
        let s = source(&r);
        let before = r.blob.requests.load(Ordering::SeqCst);
        s.fetch(a..b).await.unwrap();
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), before + 1);
        let run = r.zinfo.span_input_range(2, blob_size).unwrap().start..r.zinfo.span_input_range(5, blob_size).unwrap().end;
        assert_eq!(s.stats().compressed_bytes, run.end - run.start);
        // A range inside one span: one span inflated, however small.
        let s = source(&r);
        s.fetch(a..a + 1).await.unwrap();
        assert_eq!(s.stats().spans_inflated, 1);
        assert_eq!(s.stats().requests, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tar_size_is_measured_from_the_last_span() {
        let r = rig();
        let got = GzipSpans::measure_tar_size(r.blob.as_ref(), &r.zinfo, "m").await.unwrap();
        assert_eq!(got, r.raw.len() as u64);
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), 1);
        // A last span cut short (the blob ends early) fails the measurement.
        let cut = Blob::new(r.blob.data[..r.blob.data.len() - 4].to_vec());
        assert!(GzipSpans::measure_tar_size(cut.as_ref(), &r.zinfo, "m").await.is_err());
        // A zinfo for a longer stream than the blob holds.
        let small = Blob::new(r.blob.data[..r.blob.data.len() / 2].to_vec());
        assert!(GzipSpans::measure_tar_size(small.as_ref(), &r.zinfo, "m").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_in_one_span_share_one_request() {
        let r = rig();
        let s = source(&r);
        let permits = r.blob.gate.available_permits();
        let held = r.blob.gate.acquire_many(permits as u32).await.unwrap();
        let span = r.zinfo.span_output_range(3, r.raw.len() as u64).unwrap();
        let a = tokio::spawn({
            let s = s.clone();
            let at = span.start + 10;
            async move { s.fetch(at..at + 100).await }
        });
        let b = tokio::spawn({
            let s = s.clone();
            let at = span.end - 4096;
            async move { s.fetch(at..at + 4096).await }
        });
        // Both are waiting on the one run before the blob answers.
        for _ in 0..200 {
            if s.stats().shared >= 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(held);
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert!(a[..] == r.raw[span.start as usize + 10..span.start as usize + 110]);
        assert!(b[..] == r.raw[span.end as usize - 4096..span.end as usize]);
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), 1, "one request for the span");
        // Later fetches of the span come from memory.
        s.fetch(span.start..span.start + 1).await.unwrap();
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), 1);
        // Adjacent missing spans travel in one request.
        let far = r.zinfo.span_output_range(6, r.raw.len() as u64).unwrap().start;
        let far_end = r.zinfo.span_output_range(7, r.raw.len() as u64).unwrap().end;
        s.fetch(far..far_end).await.unwrap();
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), 2);
        let want: u64 = (6..8).map(|k| r.zinfo.span_input_range(k, r.blob.size()).unwrap()).map(|x| x.end - x.start).sum();
        assert!(s.stats().compressed_bytes <= want + r.zinfo.span_input_range(3, r.blob.size()).map(|x| x.end - x.start).unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_span_is_an_error_until_the_blob_heals() {
        let r = rig();
        let s = source(&r);
        let span = r.zinfo.span_input_range(2, r.blob.size()).unwrap();
        *r.blob.flip.lock() = Some(span.start + 1000);
        let out = r.zinfo.span_output_range(2, r.raw.len() as u64).unwrap();
        let e = s.fetch(out.start..out.start + 10).await.unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("does not match its digest"), "{e}");
        assert_eq!(s.stats().digest_mismatches, 1);
        // Nothing was cached: a healed blob serves it.
        *r.blob.flip.lock() = None;
        let got = s.fetch(out.start..out.start + 10).await.unwrap();
        assert!(got[..] == r.raw[out.start as usize..out.start as usize + 10]);

        // Without digests the same corruption is an inflate error, or wrong
        // bytes (never zeros, never the right bytes by accident).
        let mut cfg = GzipSpanConfig::new("nodigest", r.raw.len() as u64);
        cfg.cached_spans = 0;
        let plain = GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).unwrap();
        *r.blob.flip.lock() = Some(span.start + 1000);
        match plain.fetch(out.start..out.end).await {
            Err(e) => {
                assert!(!e.is_transient(), "{e}");
                assert_eq!(plain.stats().inflate_errors, 1);
            }
            // Deflate has no per-block check: this flip inflates to other
            // bytes of the right length. Only span digests (above) or the
            // layer's diff_id catch that; erofs-utils' files carry neither.
            Ok(b) => assert!(b[..] != r.raw[out.start as usize..out.end as usize]),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_zinfo_is_refused_or_fails_the_read() {
        let r = rig();
        // A window of zeros: its span digest no longer matches.
        let mut bytes = r.zinfo.as_bytes().to_vec();
        let k = 3;
        let w = crate::gzip::HEADER_SIZE + k * crate::gzip::CHECKPOINT_SIZE + 17;
        bytes[w..w + crate::gzip::WINDOW_SIZE].fill(0);
        let forged = Zinfo::parse(bytes).unwrap();
        let mut cfg = GzipSpanConfig::new("forged", r.raw.len() as u64);
        cfg.span_sha256 = Some(r.digests.clone());
        let s = GzipSpans::new(r.blob.clone(), forged, cfg).unwrap();
        let out = r.zinfo.span_output_range(k, r.raw.len() as u64).unwrap();
        assert!(s.fetch(out.start..out.start + 1).await.unwrap_err().to_string().contains("digest"));
        // Spans of the other checkpoints are fine.
        let ok = r.zinfo.span_output_range(1, r.raw.len() as u64).unwrap();
        assert!(s.fetch(ok.clone()).await.unwrap()[..] == r.raw[ok.start as usize..ok.end as usize]);

        // A tar size past what the zinfo can hold, a blob too short for it.
        let cfg = GzipSpanConfig::new("short", 10);
        assert!(GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).is_err());
        let small = Blob::new(r.blob.data[..1000].to_vec());
        let cfg = GzipSpanConfig::new("small", r.raw.len() as u64);
        let e = GzipSpans::new(small, r.zinfo.clone(), cfg).err().unwrap();
        assert!(e.to_string().contains("past the"), "{e}");
        // Digest count mismatch.
        let mut cfg = GzipSpanConfig::new("count", r.raw.len() as u64);
        cfg.span_sha256 = Some(vec![]);
        assert!(GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).is_err());
        // A wrong blob digest is noticed once the blob was seen whole.
        let mut cfg = GzipSpanConfig::new("blobdigest", r.raw.len() as u64);
        cfg.blob_digest = Some(format!("sha256:{}", "0".repeat(64)));
        let s = GzipSpans::new(r.blob.clone(), r.zinfo.clone(), cfg).unwrap();
        s.fetch(0..r.raw.len() as u64).await.unwrap();
        assert_eq!(s.verify_complete().await.unwrap(), Some(false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_order_reads_hash_the_blob_without_a_second_pass() {
        let r = rig();
        let s = source(&r);
        let n = r.zinfo.span_count();
        for k in 0..n {
            let out = r.zinfo.span_output_range(k, r.raw.len() as u64).unwrap();
            if !out.is_empty() {
                s.fetch(out).await.unwrap();
            }
        }
        let before = r.blob.requests.load(Ordering::SeqCst);
        assert_eq!(s.blob_verdict(), Some(true));
        assert_eq!(s.verify_complete().await.unwrap(), Some(true));
        assert_eq!(r.blob.requests.load(Ordering::SeqCst), before, "no refetch");
    }
}
