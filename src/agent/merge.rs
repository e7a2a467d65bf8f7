//! The layers of an image as one address space (DESIGN §7, issue 15).
//!
//! Each layer is opened (one probe request each, concurrently) and its
//! superblock read; [`crate::merge::layout::group_layers`] says which layers
//! make which filesystem and validates every device table. Then:
//!
//! - **one filesystem** (a multi-blob image: a primary and its devices) is
//!   mounted as it is: the primary at 0, each device's blob at
//!   `uniaddr << blkszbits` (flatdev);
//! - **several filesystems** are merged: each one's metadata is fetched into
//!   memory (the walk's coalesced rounds), read into a tree, and the trees
//!   are merged by overlay rules into a metadata image written by our writer
//!   ([`crate::merge::build_merged`]). The address space is
//!   `[merged image | blob 0 | blob 1 | …]`: the merged image is written
//!   locally before the mount and every file's data is read from its own
//!   layer's blob. The placement is recorded with the cache entry so that a
//!   later mount of the same layers needs neither the walk nor the merge.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{try_join_all, BoxFuture};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::erofs::format::{DeviceSlot, Superblock};
use crate::erofs::reader::{read_tree, ImageBytes, ImageTree, SparseImage};
use crate::erofs::{self, MetaReader, WalkError, WalkLimits};
use crate::http::ClientConfig;
use crate::merge::layout::{group_layers, BlobInfo, FsGroup};
use crate::merge::{build_merged_aligned, MergeStats};
use crate::ranges;
use crate::remote::{fetch_with_retry, FetchError, RangeSource, RetryPolicy, PROBE_LEN};
use crate::segments::{Layout, Segment, SegmentedSource};

use super::sources::{open_one, LayersSpec, OpenError, Transience};

/// Label of the merged metadata's segment.
pub const MERGED_LABEL: &str = "merged";
/// A device table larger than this is refused before it is fetched.
const MAX_DEVICE_SLOTS: u16 = 256;

/// What [`open_layers`] made of an image's layers.
pub struct OpenedLayers {
    pub source: Arc<dyn RangeSource>,
    pub layout: Layout,
    /// The address space's first bytes: the merged image (all of it), or
    /// the primary blob's probe.
    pub head: Option<Bytes>,
    /// A merged image: bytes `0..merged_len` are its metadata (written
    /// locally: `head`, or already in the cache file).
    pub merged_len: Option<u64>,
    /// Where the metadata ends: EROFS keeps it on the primary device, so
    /// nothing after it (the blobs of devices or of layers) needs to be local
    /// before the mount.
    pub metadata_end: u64,
    /// What to record with the cache entry (a merged placement).
    pub record: Option<serde_json::Value>,
    pub stats: Option<MergeStats>,
    /// Requests the walk of the layers' metadata made.
    pub walk_requests: u64,
    /// What the walk fetched of the layers, at its place in the address
    /// space: written to the cache file too, so that those bytes are never
    /// fetched again (by this entry, or by another image sharing a layer).
    pub fetched: Vec<(u64, Bytes)>,
}

/// A merged placement as recorded with the cache entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedRecord {
    /// `merge-v1`.
    pub kind: String,
    pub image_len: u64,
    pub size: u64,
    pub blobs: Vec<RecordedBlob>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedBlob {
    pub digest: String,
    pub size: u64,
    pub base: u64,
}

const RECORD_KIND: &str = "merge-v1";

/// Opens the layers of `spec` as one address space. `recorded` is what an
/// earlier mount recorded with the cache entry: when it matches the layers,
/// the merge is not redone (the merged image is expected in the cache file;
/// `head` is then `None`).
pub async fn open_layers(
    spec: &LayersSpec,
    http: &ClientConfig,
    retry: &RetryPolicy,
    blob_align: u64,
    recorded: Option<&serde_json::Value>,
    share: Option<(&erofs_fanotify_state::CacheDir, &str)>,
) -> Result<OpenedLayers, OpenError> {
    let name = &spec.name;
    if spec.layers.is_empty() {
        return Err(OpenError(format!("{name}: an image without layers"), Transience::Permanent));
    }
    let opened = try_join_all(spec.layers.iter().map(|l| open_one(l, http))).await?;
    let mut blobs = Vec::with_capacity(opened.len());
    for (layer, (source, probe)) in spec.layers.iter().zip(&opened) {
        let digest = layer.digest().ok_or_else(|| OpenError(format!("{name}: layer {} has no digest", layer.describe()), Transience::Permanent))?;
        let erofs = probe_erofs(source.as_ref(), probe, retry).await.map_err(|e| OpenError(format!("{name}: layer {digest}: {e}"), Transience::Permanent))?;
        blobs.push(BlobInfo { digest, size: source.size(), erofs });
    }
    let groups = group_layers(&blobs).map_err(|e| OpenError(format!("{name}: {e}"), Transience::Permanent))?;
    // Bytes another cache entry of the same blob holds are read from there, not fetched.
    let sources: Vec<Arc<dyn RangeSource>> = opened
        .iter()
        .zip(&blobs)
        .map(|((s, _), b)| match share {
            Some((cache, own_key)) => super::share::SharedSource::wrap(Arc::clone(s), &b.digest, cache, own_key),
            None => Arc::clone(s),
        })
        .collect();

    if let [group] = groups.as_slice() {
        return flatdev(name, group, &blobs, &sources, &opened[group.primary].1);
    }

    if let Some(rec) = recorded.and_then(|v| serde_json::from_value::<MergedRecord>(v.clone()).ok()) {
        let same = rec.kind == RECORD_KIND
            && rec.blobs.len() == blobs.len()
            && rec.blobs.iter().zip(&blobs).all(|(r, b)| r.digest == b.digest && r.size == b.size);
        if same {
            let layout = merged_layout(name, &rec, &sources, None)?;
            tracing::info!(layers = blobs.len(), image_len = rec.image_len, "merged metadata reused from the cache entry");
            return Ok(OpenedLayers {
                source: Arc::new(SegmentedSource::new(layout.clone())),
                layout,
                head: None,
                merged_len: Some(rec.image_len),
                metadata_end: rec.image_len,
                record: None,
                stats: None,
                walk_requests: 0,
                fetched: Vec::new(),
            });
        }
    }

    // Each filesystem's metadata, walked in its own flat address space.
    let handle = tokio::runtime::Handle::current();
    let mut trees: Vec<ImageTree> = Vec::with_capacity(groups.len());
    // (blob index, offset in the blob, bytes) of what the walks fetched.
    let mut pieces: Vec<(usize, u64, Bytes)> = Vec::new();
    let requests = Arc::new(AtomicU64::new(0));
    for g in &groups {
        let space = group_space(g, &blobs, &sources).map_err(|e| OpenError(format!("{name}: {e}"), Transience::Permanent))?;
        let bytes = LayerBytes {
            source: space,
            image: Mutex::new(SparseImage::new(g.flat_size(&blobs))),
            handle: handle.clone(),
            retry: retry.clone(),
            requests: Arc::clone(&requests),
        };
        let shown = crate::merge::short(&blobs[g.primary].digest);
        let (tree, held) = tokio::task::spawn_blocking(move || {
            let mut bytes = bytes;
            let size = bytes.source.size();
            erofs::walk(&mut bytes, size, &WalkLimits::default())?;
            let tree = read_tree(&bytes, &WalkLimits::default())?;
            let held: Vec<(u64, Bytes)> = bytes.image.lock().pieces().map(|(o, b)| (o, b.clone())).collect();
            Ok::<_, WalkError>((tree, held))
        })
        .await
        .map_err(|e| OpenError(format!("{name}: the metadata walk failed: {e}"), Transience::Permanent))?
        .map_err(|e| OpenError(format!("{name}: layer {shown}: cannot read its EROFS metadata: {e}"), Transience::Permanent))?;
        trees.push(tree);
        for (off, b) in held {
            let end = off + b.len() as u64;
            // Where the piece lies: the primary at 0, each device at its start (pieces across two are dropped).
            let place = if end <= blobs[g.primary].size {
                Some((g.primary, off))
            } else {
                g.devices.iter().find(|d| off >= d.start && end <= d.start + d.len).map(|d| (d.blob, off - d.start))
            };
            if let Some((blob, at)) = place {
                pieces.push((blob, at, b));
            }
        }
    }
    let merged = tokio::task::spawn_blocking(move || build_merged_aligned(&blobs, &groups, &trees, blob_align))
        .await
        .map_err(|e| OpenError(format!("{name}: the merge failed: {e}"), Transience::Permanent))?
        .map_err(|e| OpenError(format!("{name}: {e}"), Transience::Permanent))?;
    let rec = MergedRecord {
        kind: RECORD_KIND.into(),
        image_len: merged.image.len() as u64,
        size: merged.size,
        blobs: merged.blobs.iter().map(|b| RecordedBlob { digest: b.digest.clone(), size: b.size, base: b.base }).collect(),
    };
    let image = Bytes::from(merged.image);
    let layout = merged_layout(name, &rec, &sources, Some(image.clone()))?;
    let fetched = pieces
        .into_iter()
        .filter_map(|(blob, at, b)| {
            let placed = rec.blobs.get(blob)?;
            // A piece ending at its blob's end is padded to the 4 KiB block (the gap after a blob reads as zeros).
            let b = if at + b.len() as u64 == placed.size && b.len() % 4096 != 0 {
                let mut v = b.to_vec();
                v.resize(b.len().next_multiple_of(4096), 0);
                Bytes::from(v)
            } else {
                b
            };
            Some((placed.base + at, b))
        })
        .collect();
    tracing::info!(
        layers = rec.blobs.len(),
        image_len = rec.image_len,
        size = rec.size,
        entries = merged.stats.entries,
        whiteouts = merged.stats.whiteouts,
        opaque_dirs = merged.stats.opaque_dirs,
        walk_requests = requests.load(Ordering::Relaxed),
        "layers merged"
    );
    Ok(OpenedLayers {
        source: Arc::new(SegmentedSource::new(layout.clone())),
        layout,
        head: Some(image),
        merged_len: Some(rec.image_len),
        metadata_end: rec.image_len,
        record: serde_json::to_value(&rec).ok(),
        stats: Some(merged.stats),
        walk_requests: requests.load(Ordering::Relaxed),
        fetched,
    })
}

/// The superblock and device table of a layer, when it is EROFS.
async fn probe_erofs(
    source: &dyn RangeSource,
    probe: &[u8],
    retry: &RetryPolicy,
) -> Result<Option<(Superblock, Vec<DeviceSlot>)>, String> {
    let Ok(sb) = erofs::probe_superblock(probe) else { return Ok(None) };
    let Some(table) = sb.device_table() else { return Ok(Some((sb, Vec::new()))) };
    if sb.extra_devices > MAX_DEVICE_SLOTS {
        return Err(format!("a device table of {} slots (at most {MAX_DEVICE_SLOTS})", sb.extra_devices));
    }
    if table.end > source.size() {
        return Err("its device table lies past the end of the blob".into());
    }
    let bytes = match probe.get(table.start as usize..table.end as usize) {
        Some(b) => Bytes::copy_from_slice(b),
        None => fetch_with_retry(source, table.clone(), retry).await.map_err(|(e, _)| e.to_string())?.bytes,
    };
    let slots = sb.device_slots(&bytes).map_err(|e| e.to_string())?;
    Ok(Some((sb, slots)))
}

/// A filesystem's own flat address space: its primary at 0, its devices at
/// their `uniaddr`.
fn group_space(g: &FsGroup, blobs: &[BlobInfo], sources: &[Arc<dyn RangeSource>]) -> Result<Arc<dyn RangeSource>, String> {
    if g.devices.is_empty() {
        return Ok(Arc::clone(&sources[g.primary]));
    }
    let mut segments = vec![Segment::whole(blobs[g.primary].digest.clone(), 0, Arc::clone(&sources[g.primary]))];
    for d in &g.devices {
        segments.push(Segment { label: blobs[d.blob].digest.clone(), start: d.start, len: d.len, source_offset: 0, source: Arc::clone(&sources[d.blob]), sha256: None });
    }
    let layout = Layout::new(segments, g.flat_size(blobs)).map_err(|e| e.to_string())?;
    Ok(Arc::new(SegmentedSource::new(layout)))
}

/// One filesystem of several blobs: mounted as it is (flatdev).
fn flatdev(
    name: &str,
    g: &FsGroup,
    blobs: &[BlobInfo],
    sources: &[Arc<dyn RangeSource>],
    probe: &Bytes,
) -> Result<OpenedLayers, OpenError> {
    let mut segments = vec![Segment::whole(blobs[g.primary].digest.clone(), 0, Arc::clone(&sources[g.primary]))];
    for d in &g.devices {
        segments.push(Segment { label: blobs[d.blob].digest.clone(), start: d.start, len: d.len, source_offset: 0, source: Arc::clone(&sources[d.blob]), sha256: None });
    }
    let layout = Layout::new(segments, g.flat_size(blobs)).map_err(|e| OpenError(format!("{name}: {e}"), Transience::Permanent))?;
    let want = PROBE_LEN.min(layout.size()) as usize;
    Ok(OpenedLayers {
        source: Arc::new(SegmentedSource::new(layout.clone())),
        layout,
        head: Some(probe.slice(..want.min(probe.len()))),
        merged_len: None,
        metadata_end: blobs[g.primary].size,
        record: None,
        stats: None,
        walk_requests: 0,
        fetched: Vec::new(),
    })
}

/// The layout of a merged address space: the merged image (served from
/// memory when at hand, else only from the cache file) and the blobs.
fn merged_layout(
    name: &str,
    rec: &MergedRecord,
    sources: &[Arc<dyn RangeSource>],
    image: Option<Bytes>,
) -> Result<Layout, OpenError> {
    let head: Arc<dyn RangeSource> = Arc::new(LocalHead { len: rec.image_len, bytes: image });
    let mut segments = vec![Segment::whole(MERGED_LABEL, 0, head)];
    for (b, s) in rec.blobs.iter().zip(sources) {
        // Each blob whole: its digest is checked against the cache file at completion.
        segments.push(Segment { label: b.digest.clone(), start: b.base, len: b.size, source_offset: 0, source: Arc::clone(s), sha256: Some(b.digest.clone()) });
    }
    Layout::new(segments, rec.size).map_err(|e| OpenError(format!("{name}: the merged address space: {e}"), Transience::Permanent))
}

/// The merged image as a source: it is written to the cache file before
/// the mount, so it is never fetched (except from memory while it is made).
struct LocalHead {
    len: u64,
    bytes: Option<Bytes>,
}

impl RangeSource for LocalHead {
    fn size(&self) -> u64 {
        self.len
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        let got = match &self.bytes {
            Some(b) if range.start <= range.end && range.end <= b.len() as u64 => Ok(b.slice(range.start as usize..range.end as usize)),
            _ => Err(FetchError::Permanent("the merged metadata is not in the cache file".into())),
        };
        Box::pin(async move { got })
    }

    fn describe(&self) -> String {
        MERGED_LABEL.into()
    }
}

/// A layer's metadata fetched into memory: the walker's reader (coalesced
/// rounds) and, afterwards, the tree reader's bytes (a byte the walk did
/// not read is fetched on demand).
struct LayerBytes {
    source: Arc<dyn RangeSource>,
    image: Mutex<SparseImage>,
    handle: tokio::runtime::Handle,
    retry: RetryPolicy,
    requests: Arc<AtomicU64>,
}

/// Gaps up to this size are fetched rather than split into two requests.
const COALESCE_GAP: u64 = 64 << 10;
const MAX_REQUEST: u64 = 8 << 20;

impl LayerBytes {
    fn fetch_missing(&self, wanted: &[Range<u64>]) -> Result<(), WalkError> {
        let size = self.source.size();
        let wanted = ranges::align_out(wanted, 4096, size);
        let missing = self.image.lock().missing(&wanted);
        if missing.is_empty() {
            return Ok(());
        }
        let requests = ranges::coalesce(missing, COALESCE_GAP, MAX_REQUEST);
        self.requests.fetch_add(requests.len() as u64, Ordering::Relaxed);
        let source = Arc::clone(&self.source);
        let retry = self.retry.clone();
        let fetched = self
            .handle
            .block_on(async move {
                try_join_all(requests.into_iter().map(|r| {
                    let (source, retry) = (Arc::clone(&source), retry.clone());
                    async move { fetch_with_retry(source.as_ref(), r.clone(), &retry).await.map(|f| (r.start, f.bytes)) }
                }))
                .await
            })
            .map_err(|(e, _)| WalkError::Io(e.to_string()))?;
        let mut image = self.image.lock();
        for (start, bytes) in fetched {
            image.insert(start, bytes);
        }
        Ok(())
    }
}

impl MetaReader for LayerBytes {
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError> {
        self.fetch_missing(ranges)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        ImageBytes::read_at(self, offset, buf)
    }
}

impl ImageBytes for LayerBytes {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.source.size())
            .ok_or_else(|| WalkError::Corrupt(format!("read {offset}+{} past the end of the layer", buf.len())))?;
        if !self.image.lock().missing(std::slice::from_ref(&(offset..end))).is_empty() {
            self.fetch_missing(std::slice::from_ref(&(offset..end)))?;
        }
        self.image.lock().read_at(offset, buf)
    }
}
