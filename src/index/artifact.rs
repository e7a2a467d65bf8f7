//! The index artifact's document: what `index push` stores and a mount reads
//! to know an image's ranges without walking it (DESIGN §8, issues 11, 16).
//!
//! The artifact is an OCI artifact (`artifactType` [`ARTIFACT_TYPE`], its
//! `subject` the image manifest) whose one layer is this JSON document
//! ([`DOC_MEDIA_TYPE`]). Per layer of the image it holds:
//!
//! * EROFS layers: `blockSize`, `metadata` (the ranges that must be local
//!   before mounting), `files` (per-path data extents, so a miss maps to its
//!   file), `chunkSize` + `chunkSha256` (a digest per fixed chunk of the
//!   blob), `traces` (named access traces). **Ranges, never bytes**: every
//!   byte still comes from the digest-addressed blob.
//! * tar+gzip layers: `tarIndex` and `zinfo` (descriptors of separate blobs),
//!   `tarSize` (the uncompressed size, which zinfo lacks), `spanSha256` (per
//!   span, the sha256 of its zinfo checkpoint record followed by its
//!   compressed input, `Zinfo::span_input_range`: `gzip::span_digest`),
//!   `diffId`. `files` and `traces` are then offsets in the uncompressed tar.
//!
//! Plus an optional `merged` descriptor (merged metadata of all layers).
//!
//! Ranges are encoded flat, `[start0, end0, start1, end1, …]`, half-open;
//! `files` is `{"paths": [...], "extents": [[…flat ranges…], …]}`.
//!
//! The document is untrusted: [`parse`] caps its size and every count, and
//! checks every range, digest and path. A document that fails is reported
//! once and ignored by the caller (the mount falls back to walking).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `artifactType` of the index artifact's manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.erofs-fanotify.index.v1+json";
/// Media type of the document (the artifact's one layer).
pub const DOC_MEDIA_TYPE: &str = "application/vnd.erofs-fanotify.index.doc.v1+json";
/// Media type of a tar layer's EROFS tar index blob (`tarIndex`).
pub const TAR_INDEX_MEDIA_TYPE: &str = "application/vnd.erofs-fanotify.tarindex.v1.erofs";
/// Media type of a gzip layer's zinfo blob (`zinfo`).
pub const ZINFO_MEDIA_TYPE: &str = "application/vnd.erofs-fanotify.zinfo.v2";
/// `schemaVersion` of this document format.
pub const SCHEMA_VERSION: u32 = 1;

/// zinfo sizes, to check `spanSha256` against the zinfo descriptor (kept
/// here so this module does not depend on the gzip code).
const ZINFO_HEADER: u64 = 12;
const ZINFO_CHECKPOINT: u64 = 32785;

/// Caps for [`parse`]. Memory while parsing is a small multiple of the
/// document's size, so `max_doc_bytes` bounds it.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_doc_bytes: usize,
    pub max_layers: usize,
    /// Ranges in one list (metadata, one trace).
    pub max_ranges: usize,
    /// Files of one layer.
    pub max_files: usize,
    /// Extents of all files of one layer.
    pub max_extents: usize,
    /// Chunk digests of one layer.
    pub max_chunks: usize,
    /// Span digests of one layer.
    pub max_spans: usize,
    /// Traces of one layer.
    pub max_traces: usize,
    /// Bytes of one path.
    pub max_path_bytes: usize,
    /// Largest blob, tar or descriptor size accepted.
    pub max_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_doc_bytes: 64 << 20,
            max_layers: 256,
            max_ranges: 1 << 20,
            max_files: 1 << 20,
            max_extents: 1 << 22,
            max_chunks: 1 << 22,
            max_spans: 1 << 20,
            max_traces: 64,
            max_path_bytes: 4096,
            max_size: 1 << 50,
        }
    }
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ArtifactError {
    #[error("index document of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("index document is not valid JSON of its schema: {0}")]
    Json(String),
    #[error("index document schemaVersion {0} is not {SCHEMA_VERSION}")]
    Version(u32),
    #[error("index document mediaType {0:?} is not {DOC_MEDIA_TYPE}")]
    MediaType(String),
    #[error("index document {at}: {count} {what} exceed the limit of {max}")]
    Limit {
        at: String,
        what: &'static str,
        count: u64,
        max: u64,
    },
    #[error("index document {at}: {what}")]
    Invalid { at: String, what: String },
}

fn invalid(at: impl Into<String>, what: impl Into<String>) -> ArtifactError {
    ArtifactError::Invalid {
        at: at.into(),
        what: what.into(),
    }
}

fn limit(at: &str, what: &'static str, count: usize, max: usize) -> Result<(), ArtifactError> {
    if count > max {
        Err(ArtifactError::Limit {
            at: at.to_string(),
            what,
            count: count as u64,
            max: max as u64,
        })
    } else {
        Ok(())
    }
}

/// An OCI content descriptor (of a separate blob of the artifact).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// What a layer's blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// An EROFS image blob.
    #[serde(rename = "erofs")]
    Erofs,
    /// A tar+gzip layer served through a tar index and zinfo.
    #[serde(rename = "tar+gzip")]
    TarGzip,
    /// An uncompressed tar layer served through a tar index (the blob is the tar).
    #[serde(rename = "tar")]
    Tar,
}

/// Per-file data extents, as parallel lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTable {
    pub paths: Vec<String>,
    #[serde(
        serialize_with = "ser_range_lists",
        deserialize_with = "de_range_lists"
    )]
    pub extents: Vec<Vec<Range<u64>>>,
}

impl FileTable {
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// `(path, extents)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Range<u64>])> {
        self.paths
            .iter()
            .map(String::as_str)
            .zip(self.extents.iter().map(Vec::as_slice))
    }
}

/// One layer's index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerIndex {
    /// The layer blob's digest (`sha256:<hex>`).
    pub digest: String,
    /// The layer blob's size.
    pub size: u64,
    pub kind: LayerKind,
    /// EROFS block size (erofs layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Byte ranges of the blob that must be local before mounting (erofs).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "ser_ranges",
        deserialize_with = "de_ranges"
    )]
    pub metadata: Vec<Range<u64>>,
    #[serde(default, skip_serializing_if = "FileTable::is_empty")]
    pub files: FileTable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// Lowercase hex sha256 of each `chunk_size` chunk of the blob (the last
    /// may be short).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_sha256: Vec<String>,
    /// Named access traces (ranges in access order).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "ser_traces",
        deserialize_with = "de_traces"
    )]
    pub traces: BTreeMap<String, Vec<Range<u64>>>,
    /// tar+gzip: the EROFS tar index blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_index: Option<BlobRef>,
    /// tar+gzip: the zinfo blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zinfo: Option<BlobRef>,
    /// tar+gzip: size of the uncompressed tar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_size: Option<u64>,
    /// tar+gzip: per zinfo span, lowercase hex sha256 of its checkpoint
    /// record and compressed input (`gzip::span_digest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub span_sha256: Vec<String>,
    /// tar+gzip: the layer's diff_id (`sha256:<hex>` of the tar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
}

impl LayerIndex {
    /// The size the layer's `files` and `traces` offsets live in: the blob
    /// (erofs) or the uncompressed tar (tar+gzip).
    pub fn address_size(&self) -> u64 {
        match self.kind {
            LayerKind::Erofs => self.size,
            LayerKind::TarGzip => self.tar_size.unwrap_or(0),
            LayerKind::Tar => self.size,
        }
    }

    /// The expected sha256 of chunk `i` (`[i * chunk_size, min(.., size))`).
    pub fn chunk_digest(&self, i: usize) -> Option<&str> {
        self.chunk_sha256.get(i).map(String::as_str)
    }

    /// An index from offset to file, for mapping a miss to its file.
    pub fn extent_index(&self) -> ExtentIndex {
        let mut v: Vec<(u64, u64, u32)> = self
            .files
            .extents
            .iter()
            .enumerate()
            .flat_map(|(i, ex)| ex.iter().map(move |r| (r.start, r.end, i as u32)))
            .collect();
        v.sort_unstable();
        // Running maximum of ends, so a lookup can stop early.
        let mut max_end = Vec::with_capacity(v.len());
        let mut m = 0;
        for e in &v {
            m = m.max(e.1);
            max_end.push(m);
        }
        ExtentIndex {
            extents: v,
            max_end,
        }
    }
}

/// Sorted extents of all files of a layer (see [`LayerIndex::extent_index`]).
#[derive(Clone, Debug)]
pub struct ExtentIndex {
    extents: Vec<(u64, u64, u32)>,
    max_end: Vec<u64>,
}

impl ExtentIndex {
    /// A file (its index in `files.paths`) with an extent holding `offset`,
    /// and that extent. Hard links and shared blocks may give several: the
    /// one starting last wins.
    pub fn file_at(&self, offset: u64) -> Option<(usize, Range<u64>)> {
        let mut i = self.extents.partition_point(|e| e.0 <= offset);
        while i > 0 {
            i -= 1;
            if self.max_end[i] <= offset {
                return None;
            }
            let (s, e, f) = self.extents[i];
            if offset < e {
                return Some((f as usize, s..e));
            }
        }
        None
    }
}

/// The index document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexDoc {
    pub schema_version: u32,
    pub media_type: String,
    pub layers: Vec<LayerIndex>,
    /// Merged metadata image of all layers (tar+gzip images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<BlobRef>,
}

impl IndexDoc {
    pub fn new(layers: Vec<LayerIndex>) -> Self {
        IndexDoc {
            schema_version: SCHEMA_VERSION,
            media_type: DOC_MEDIA_TYPE.to_string(),
            layers,
            merged: None,
        }
    }

    /// The entry for a layer digest.
    pub fn layer(&self, digest: &str) -> Option<&LayerIndex> {
        self.layers.iter().find(|l| l.digest == digest)
    }

    /// The document's JSON, after the same checks [`parse`] makes (with
    /// default limits), so we never publish what we would refuse.
    pub fn to_json(&self) -> Result<Vec<u8>, ArtifactError> {
        self.validate(&Limits::default())?;
        let bytes = serde_json::to_vec(self).map_err(|e| ArtifactError::Json(e.to_string()))?;
        if bytes.len() > Limits::default().max_doc_bytes {
            return Err(ArtifactError::TooLarge {
                size: bytes.len() as u64,
                max: Limits::default().max_doc_bytes as u64,
            });
        }
        Ok(bytes)
    }

    /// Checks everything [`parse`] checks after decoding.
    pub fn validate(&self, limits: &Limits) -> Result<(), ArtifactError> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(ArtifactError::Version(self.schema_version));
        }
        if self.media_type != DOC_MEDIA_TYPE {
            return Err(ArtifactError::MediaType(self.media_type.clone()));
        }
        if self.layers.is_empty() {
            return Err(invalid("layers", "no layers"));
        }
        limit("layers", "layers", self.layers.len(), limits.max_layers)?;
        let mut seen = HashSet::new();
        for (i, l) in self.layers.iter().enumerate() {
            let at = format!("layers[{i}]");
            validate_layer(&at, l, limits)?;
            if !seen.insert(l.digest.as_str()) {
                return Err(invalid(at, "layer digest listed twice"));
            }
        }
        if let Some(m) = &self.merged {
            validate_blob_ref("merged", m, limits)?;
        }
        Ok(())
    }
}

/// Parses and validates an index document.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<IndexDoc, ArtifactError> {
    if bytes.len() > limits.max_doc_bytes {
        return Err(ArtifactError::TooLarge {
            size: bytes.len() as u64,
            max: limits.max_doc_bytes as u64,
        });
    }
    let doc: IndexDoc =
        serde_json::from_slice(bytes).map_err(|e| ArtifactError::Json(e.to_string()))?;
    doc.validate(limits)?;
    Ok(doc)
}

fn validate_layer(at: &str, l: &LayerIndex, limits: &Limits) -> Result<(), ArtifactError> {
    check_digest(&format!("{at}.digest"), &l.digest)?;
    if l.size == 0 || l.size > limits.max_size {
        return Err(invalid(
            format!("{at}.size"),
            format!("size {} is 0 or above {}", l.size, limits.max_size),
        ));
    }
    match l.kind {
        LayerKind::Erofs => {
            let bs = l
                .block_size
                .ok_or_else(|| invalid(format!("{at}.blockSize"), "missing for an erofs layer"))?;
            if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                return Err(invalid(
                    format!("{at}.blockSize"),
                    format!("{bs} is not a power of two in 512..=65536"),
                ));
            }
            for (name, present) in [
                ("tarIndex", l.tar_index.is_some()),
                ("zinfo", l.zinfo.is_some()),
                ("tarSize", l.tar_size.is_some()),
                ("spanSha256", !l.span_sha256.is_empty()),
                ("diffId", l.diff_id.is_some()),
            ] {
                if present {
                    return Err(invalid(format!("{at}.{name}"), "only for tar+gzip layers"));
                }
            }
        }
        LayerKind::Tar => {
            let tar_index = l
                .tar_index
                .as_ref()
                .ok_or_else(|| invalid(format!("{at}.tarIndex"), "missing for a tar layer"))?;
            validate_blob_ref(&format!("{at}.tarIndex"), tar_index, limits)?;
            for (name, present) in [
                ("zinfo", l.zinfo.is_some()),
                ("spanSha256", !l.span_sha256.is_empty()),
                ("blockSize", l.block_size.is_some()),
                ("metadata", !l.metadata.is_empty()),
            ] {
                if present {
                    return Err(invalid(format!("{at}.{name}"), "not for an uncompressed tar layer"));
                }
            }
            if l.tar_size.is_some_and(|t| t != l.size) {
                return Err(invalid(format!("{at}.tarSize"), "an uncompressed tar layer is its own tar"));
            }
            // The blob is the tar: its digest is its diff_id.
            if l.diff_id.as_deref().is_some_and(|d| d != l.digest) {
                return Err(invalid(format!("{at}.diffId"), "an uncompressed tar layer's diff_id is its digest"));
            }
        }
        LayerKind::TarGzip => {
            let tar_index = l
                .tar_index
                .as_ref()
                .ok_or_else(|| invalid(format!("{at}.tarIndex"), "missing for a tar+gzip layer"))?;
            validate_blob_ref(&format!("{at}.tarIndex"), tar_index, limits)?;
            let zinfo = l
                .zinfo
                .as_ref()
                .ok_or_else(|| invalid(format!("{at}.zinfo"), "missing for a tar+gzip layer"))?;
            validate_blob_ref(&format!("{at}.zinfo"), zinfo, limits)?;
            let body = zinfo
                .size
                .checked_sub(ZINFO_HEADER)
                .filter(|b| b % ZINFO_CHECKPOINT == 0);
            let spans = body
                .map(|b| b / ZINFO_CHECKPOINT)
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    invalid(
                        format!("{at}.zinfo.size"),
                        format!("{} is no zinfo size", zinfo.size),
                    )
                })?;
            limit(
                &format!("{at}.spanSha256"),
                "span digests",
                l.span_sha256.len(),
                limits.max_spans,
            )?;
            if l.span_sha256.len() as u64 != spans {
                return Err(invalid(
                    format!("{at}.spanSha256"),
                    format!(
                        "{} digests for a zinfo of {spans} spans",
                        l.span_sha256.len()
                    ),
                ));
            }
            for (i, h) in l.span_sha256.iter().enumerate() {
                check_hex(&format!("{at}.spanSha256[{i}]"), h)?;
            }
            let tar_size = l
                .tar_size
                .ok_or_else(|| invalid(format!("{at}.tarSize"), "missing for a tar+gzip layer"))?;
            if tar_size == 0 || tar_size > limits.max_size {
                return Err(invalid(
                    format!("{at}.tarSize"),
                    format!("{tar_size} is 0 or above {}", limits.max_size),
                ));
            }
            let diff_id = l
                .diff_id
                .as_deref()
                .ok_or_else(|| invalid(format!("{at}.diffId"), "missing for a tar+gzip layer"))?;
            check_digest(&format!("{at}.diffId"), diff_id)?;
            if l.block_size.is_some() || !l.metadata.is_empty() {
                return Err(invalid(
                    format!("{at}.metadata"),
                    "blockSize/metadata are only for erofs layers",
                ));
            }
        }
    }
    limit(
        &format!("{at}.metadata"),
        "ranges",
        l.metadata.len(),
        limits.max_ranges,
    )?;
    check_sorted_ranges(&format!("{at}.metadata"), &l.metadata, l.size)?;

    let space = l.address_size();
    let f = &l.files;
    limit(
        &format!("{at}.files"),
        "files",
        f.paths.len(),
        limits.max_files,
    )?;
    if f.paths.len() != f.extents.len() {
        return Err(invalid(
            format!("{at}.files"),
            format!(
                "{} paths but {} extent lists",
                f.paths.len(),
                f.extents.len()
            ),
        ));
    }
    let total: usize = f.extents.iter().map(Vec::len).sum();
    limit(
        &format!("{at}.files.extents"),
        "extents",
        total,
        limits.max_extents,
    )?;
    let mut paths = HashSet::with_capacity(f.paths.len());
    for (i, (p, ex)) in f.paths.iter().zip(&f.extents).enumerate() {
        let pat = format!("{at}.files.paths[{i}]");
        check_path(&pat, p, limits)?;
        if !paths.insert(p.trim_start_matches('/')) {
            return Err(invalid(pat, "path listed twice"));
        }
        check_sorted_ranges(&format!("{at}.files.extents[{i}]"), ex, space)?;
    }

    match (l.chunk_size, l.chunk_sha256.is_empty()) {
        (None, true) => {}
        (None, false) => {
            return Err(invalid(
                format!("{at}.chunkSize"),
                "chunk digests without a chunk size",
            ))
        }
        (Some(cs), _) => {
            if !cs.is_power_of_two() || !(4096..=1 << 30).contains(&cs) {
                return Err(invalid(
                    format!("{at}.chunkSize"),
                    format!("{cs} is not a power of two in 4 KiB..=1 GiB"),
                ));
            }
            limit(
                &format!("{at}.chunkSha256"),
                "chunk digests",
                l.chunk_sha256.len(),
                limits.max_chunks,
            )?;
            let want = l.size.div_ceil(cs);
            if l.chunk_sha256.len() as u64 != want {
                return Err(invalid(
                    format!("{at}.chunkSha256"),
                    format!(
                        "{} digests where ceil(size / chunkSize) = {want}",
                        l.chunk_sha256.len()
                    ),
                ));
            }
            for (i, h) in l.chunk_sha256.iter().enumerate() {
                check_hex(&format!("{at}.chunkSha256[{i}]"), h)?;
            }
        }
    }

    limit(
        &format!("{at}.traces"),
        "traces",
        l.traces.len(),
        limits.max_traces,
    )?;
    for (name, ranges) in &l.traces {
        let tat = format!("{at}.traces[{name:?}]");
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(invalid(tat, "trace name is not 1-64 of [A-Za-z0-9._-]"));
        }
        limit(&tat, "ranges", ranges.len(), limits.max_ranges)?;
        // A trace keeps access order: only each range is checked.
        for (i, r) in ranges.iter().enumerate() {
            if r.start >= r.end || r.end > space {
                return Err(invalid(
                    format!("{tat}[{i}]"),
                    format!("range {}..{} is empty or past {space}", r.start, r.end),
                ));
            }
        }
    }
    Ok(())
}

fn validate_blob_ref(at: &str, b: &BlobRef, limits: &Limits) -> Result<(), ArtifactError> {
    check_digest(&format!("{at}.digest"), &b.digest)?;
    if b.size == 0 || b.size > limits.max_size {
        return Err(invalid(
            format!("{at}.size"),
            format!("size {} is 0 or above {}", b.size, limits.max_size),
        ));
    }
    let mt_ok = !b.media_type.is_empty()
        && b.media_type.len() <= 255
        && b.media_type.contains('/')
        && b.media_type.bytes().all(|c| c.is_ascii_graphic());
    if !mt_ok {
        return Err(invalid(format!("{at}.mediaType"), "not a media type"));
    }
    Ok(())
}

/// Sorted, disjoint (touching is fine), non-empty, inside `[0, bound)`.
fn check_sorted_ranges(at: &str, ranges: &[Range<u64>], bound: u64) -> Result<(), ArtifactError> {
    let mut prev_end = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        if r.start >= r.end {
            return Err(invalid(
                format!("{at}[{i}]"),
                format!("empty or inverted range {}..{}", r.start, r.end),
            ));
        }
        if i > 0 && r.start < prev_end {
            return Err(invalid(
                format!("{at}[{i}]"),
                "ranges not sorted and disjoint",
            ));
        }
        if r.end > bound {
            return Err(invalid(
                format!("{at}[{i}]"),
                format!("range {}..{} past the end ({bound})", r.start, r.end),
            ));
        }
        prev_end = r.end;
    }
    Ok(())
}

fn check_hex(at: &str, h: &str) -> Result<(), ArtifactError> {
    if h.len() == 64 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(invalid(at, "not 64 lowercase hex digits"))
    }
}

/// `sha256:<64 hex>` or `sha512:<128 hex>`, lowercase.
fn check_digest(at: &str, d: &str) -> Result<(), ArtifactError> {
    let ok = match d.split_once(':') {
        Some(("sha256", h)) => h.len() == 64,
        Some(("sha512", h)) => h.len() == 128,
        _ => false,
    } && d
        .bytes()
        .skip(7)
        .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            at,
            format!("{:?} is not a sha256:/sha512: digest", truncate(d)),
        ))
    }
}

/// A path inside the image: optional leading `/`, then components that are
/// not empty, `.` or `..`; no NUL.
fn check_path(at: &str, p: &str, limits: &Limits) -> Result<(), ArtifactError> {
    if p.len() > limits.max_path_bytes {
        return Err(invalid(
            at,
            format!("path longer than {} bytes", limits.max_path_bytes),
        ));
    }
    if p.contains('\0') {
        return Err(invalid(at, "path contains NUL"));
    }
    let rel = p.strip_prefix('/').unwrap_or(p);
    if rel.is_empty() {
        return Err(invalid(at, "empty path"));
    }
    for c in rel.split('/') {
        match c {
            "" => return Err(invalid(at, "empty path component (// or trailing /)")),
            "." | ".." => return Err(invalid(at, format!("path component {c:?}"))),
            _ => {}
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

// --- flat range encoding --------------------------------------------------

fn flatten(ranges: &[Range<u64>]) -> Vec<u64> {
    ranges.iter().flat_map(|r| [r.start, r.end]).collect()
}

fn unflatten<E: serde::de::Error>(flat: Vec<u64>) -> Result<Vec<Range<u64>>, E> {
    if !flat.len().is_multiple_of(2) {
        return Err(E::custom("a range list has an odd number of offsets"));
    }
    Ok(flat.chunks_exact(2).map(|p| p[0]..p[1]).collect())
}

fn ser_ranges<S: Serializer>(ranges: &[Range<u64>], s: S) -> Result<S::Ok, S::Error> {
    flatten(ranges).serialize(s)
}

fn de_ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Range<u64>>, D::Error> {
    unflatten(Vec::<u64>::deserialize(d)?)
}

fn ser_range_lists<S: Serializer>(lists: &[Vec<Range<u64>>], s: S) -> Result<S::Ok, S::Error> {
    lists
        .iter()
        .map(|l| flatten(l))
        .collect::<Vec<_>>()
        .serialize(s)
}

fn de_range_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<Range<u64>>>, D::Error> {
    Vec::<Vec<u64>>::deserialize(d)?
        .into_iter()
        .map(unflatten)
        .collect()
}

fn ser_traces<S: Serializer>(
    t: &BTreeMap<String, Vec<Range<u64>>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    t.iter()
        .map(|(k, v)| (k, flatten(v)))
        .collect::<BTreeMap<_, _>>()
        .serialize(s)
}

fn de_traces<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<Range<u64>>>, D::Error> {
    BTreeMap::<String, Vec<u64>>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| Ok((k, unflatten(v)?)))
        .collect()
}

#[cfg(test)]
#[allow(
    clippy::single_range_in_vec_init,
    clippy::type_complexity,
    clippy::reversed_empty_ranges
)]
mod tests {
    use super::*;

    fn hex64(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn erofs_layer() -> LayerIndex {
        LayerIndex {
            digest: format!("sha256:{}", hex64(0xab)),
            size: 3 << 20,
            kind: LayerKind::Erofs,
            block_size: Some(4096),
            metadata: vec![0..8192, 65536..69632],
            files: FileTable {
                paths: vec![
                    "usr/bin/python3".into(),
                    "/etc/passwd".into(),
                    "usr/lib/a.so".into(),
                ],
                extents: vec![
                    vec![8192..65536, 69632..1 << 20],
                    vec![(1 << 20)..(1 << 20) + 4096],
                    vec![],
                ],
            },
            chunk_size: Some(1 << 20),
            chunk_sha256: (0..3).map(hex64).collect(),
            traces: BTreeMap::from([("python".to_string(), vec![69632..73728, 8192..12288])]),
            tar_index: None,
            zinfo: None,
            tar_size: None,
            span_sha256: vec![],
            diff_id: None,
        }
    }

    fn tar_layer() -> LayerIndex {
        LayerIndex {
            digest: format!("sha256:{}", hex64(0xcd)),
            size: 10 << 20,
            kind: LayerKind::TarGzip,
            block_size: None,
            metadata: vec![],
            files: FileTable {
                paths: vec!["bin/sh".into()],
                extents: vec![vec![512..4096]],
            },
            chunk_size: None,
            chunk_sha256: vec![],
            traces: BTreeMap::new(),
            tar_index: Some(BlobRef {
                media_type: "application/vnd.erofs.layer.v1".into(),
                digest: format!("sha256:{}", hex64(1)),
                size: 65536,
            }),
            zinfo: Some(BlobRef {
                media_type: "application/vnd.erofs-fanotify.zinfo.v2".into(),
                digest: format!("sha256:{}", hex64(2)),
                size: 12 + 2 * 32785,
            }),
            tar_size: Some(20 << 20),
            span_sha256: vec![hex64(3), hex64(4)],
            diff_id: Some(format!("sha256:{}", hex64(5))),
        }
    }

    fn doc() -> IndexDoc {
        let mut d = IndexDoc::new(vec![erofs_layer(), tar_layer()]);
        d.merged = Some(BlobRef {
            media_type: "application/vnd.erofs".into(),
            digest: format!("sha256:{}", hex64(6)),
            size: 4096,
        });
        d
    }

    fn reject(d: &IndexDoc, needle: &str) {
        let bytes = serde_json::to_vec(d).unwrap();
        match parse(&bytes, &Limits::default()) {
            Ok(_) => panic!("accepted a document that should fail with {needle:?}"),
            Err(e) => assert!(
                e.to_string().contains(needle),
                "{e} does not mention {needle:?}"
            ),
        }
    }

    #[test]
    fn round_trips_compactly() {
        let d = doc();
        let json = d.to_json().unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains(r#""metadata":[0,8192,65536,69632]"#),
            "{text}"
        );
        assert!(
            text.contains(r#""extents":[[8192,65536,69632,1048576],[1048576,1052672],[]]"#),
            "{text}"
        );
        assert!(text.contains(r#""kind":"tar+gzip""#));
        let back = parse(&json, &Limits::default()).unwrap();
        assert_eq!(back, d);
        assert_eq!(
            back.layer(&d.layers[1].digest).unwrap().span_sha256.len(),
            2
        );
        assert!(back.layer("sha256:00").is_none());
    }

    #[test]
    fn extent_index_maps_offsets_to_files() {
        let l = erofs_layer();
        let idx = l.extent_index();
        assert_eq!(idx.file_at(8192), Some((0, 8192..65536)));
        assert_eq!(idx.file_at(70_000), Some((0, 69632..1 << 20)));
        assert_eq!(
            idx.file_at((1 << 20) + 5),
            Some((1, (1 << 20)..(1 << 20) + 4096))
        );
        assert_eq!(idx.file_at(65536), None);
        assert_eq!(idx.file_at(0), None);
        assert_eq!(idx.file_at(u64::MAX), None);
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(matches!(
            parse(b"{", &Limits::default()),
            Err(ArtifactError::Json(_))
        ));
        assert!(matches!(
            parse(b"[]", &Limits::default()),
            Err(ArtifactError::Json(_))
        ));
        let small = Limits {
            max_doc_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            parse(&doc().to_json().unwrap(), &small),
            Err(ArtifactError::TooLarge { .. })
        ));

        let mut d = doc();
        d.schema_version = 2;
        reject(&d, "schemaVersion 2");
        let mut d = doc();
        d.media_type = "application/json".into();
        reject(&d, "mediaType");
        let mut d = doc();
        d.layers.clear();
        reject(&d, "no layers");
        let mut d = doc();
        d.layers.push(d.layers[0].clone());
        reject(&d, "listed twice");

        let bad: &[(&str, fn(&mut LayerIndex))] = &[
            ("not a sha256", |l| l.digest = "sha256:ABC".into()),
            ("not a sha256", |l| l.digest = format!("md5:{}", hex64(1))),
            ("size 0", |l| l.size = 0),
            ("missing for an erofs layer", |l| l.block_size = None),
            ("not a power of two", |l| l.block_size = Some(3000)),
            ("empty or inverted", |l| l.metadata = vec![10..10]),
            ("empty or inverted", |l| l.metadata = vec![20..10]),
            ("not sorted and disjoint", |l| {
                l.metadata = vec![0..8192, 4096..9000]
            }),
            ("not sorted and disjoint", |l| {
                l.metadata = vec![65536..69632, 0..8192]
            }),
            ("past the end", |l| l.metadata = vec![0..(3 << 20) + 1]),
            ("past the end", |l| {
                l.files.extents[1] = vec![(3 << 20)..(4 << 20)]
            }),
            ("not sorted", |l| {
                l.files.extents[0] = vec![69632..80000, 8192..65536]
            }),
            ("3 paths but 2 extent lists", |l| {
                l.files.extents.pop();
            }),
            ("contains NUL", |l| l.files.paths[0] = "usr/bin\0x".into()),
            ("path component \"..\"", |l| {
                l.files.paths[0] = "usr/../../etc/shadow".into()
            }),
            ("path component \".\"", |l| {
                l.files.paths[0] = "./usr".into()
            }),
            ("empty path component", |l| {
                l.files.paths[0] = "usr//bin".into()
            }),
            ("empty path component", |l| {
                l.files.paths[0] = "//etc".into()
            }),
            ("empty path", |l| l.files.paths[0] = "/".into()),
            ("path listed twice", |l| {
                l.files.paths[1] = "/usr/bin/python3".into()
            }),
            ("longer than", |l| l.files.paths[0] = "a".repeat(5000)),
            ("ceil(size / chunkSize) = 3", |l| {
                l.chunk_sha256.pop();
            }),
            ("3 digests where ceil(size / chunkSize) = 2", |l| {
                l.chunk_size = Some(2 << 20)
            }),
            // A short last chunk still needs its digest.
            ("3 digests where ceil(size / chunkSize) = 4", |l| {
                l.size += 5
            }),
            ("not a power of two in 4 KiB", |l| l.chunk_size = Some(1000)),
            ("without a chunk size", |l| l.chunk_size = None),
            ("not 64 lowercase hex", |l| {
                l.chunk_sha256[1] = "A".repeat(64)
            }),
            ("not 64 lowercase hex", |l| l.chunk_sha256[1] = "ab".into()),
            ("trace name", |l| {
                l.traces.insert("bad name".into(), vec![0..1]);
            }),
            ("empty or past", |l| {
                l.traces.insert("t".into(), vec![(3 << 20)..(3 << 20) + 1]);
            }),
            ("only for tar+gzip", |l| {
                l.diff_id = Some(format!("sha256:{}", hex64(9)))
            }),
        ];
        for (needle, f) in bad {
            let mut d = doc();
            f(&mut d.layers[0]);
            reject(&d, needle);
        }
        let bad_tar: &[(&str, fn(&mut LayerIndex))] = &[
            ("tarIndex: missing", |l| l.tar_index = None),
            ("zinfo: missing", |l| l.zinfo = None),
            ("is no zinfo size", |l| {
                l.zinfo.as_mut().unwrap().size = 12 + 32784
            }),
            ("is no zinfo size", |l| l.zinfo.as_mut().unwrap().size = 12),
            ("1 digests for a zinfo of 2 spans", |l| {
                l.span_sha256.pop();
            }),
            ("not 64 lowercase hex", |l| {
                l.span_sha256[0] = "zz".repeat(32)
            }),
            ("tarSize: missing", |l| l.tar_size = None),
            ("diffId: missing", |l| l.diff_id = None),
            ("diffId", |l| l.diff_id = Some("sha256:xyz".into())),
            ("not a media type", |l| {
                l.zinfo.as_mut().unwrap().media_type = "zinfo".into()
            }),
            ("only for erofs layers", |l| l.metadata = vec![0..1]),
            // files of a tar layer live in the tar (20 MiB), not the blob (10 MiB).
            ("past the end", |l| {
                l.files.extents[0] = vec![(20 << 20)..(20 << 20) + 1]
            }),
        ];
        for (needle, f) in bad_tar {
            let mut d = doc();
            f(&mut d.layers[1]);
            reject(&d, needle);
        }
        // Tar files past the blob size but inside the tar are fine.
        let mut d = doc();
        d.layers[1].files.extents[0] = vec![(15 << 20)..(16 << 20)];
        parse(&serde_json::to_vec(&d).unwrap(), &Limits::default()).unwrap();

        let mut d = doc();
        d.merged.as_mut().unwrap().digest = "sha256:".into();
        reject(&d, "merged.digest");
        // An odd flat range list.
        let text = String::from_utf8(doc().to_json().unwrap())
            .unwrap()
            .replace("[0,8192,65536,69632]", "[0,8192,65536]");
        assert!(matches!(
            parse(text.as_bytes(), &Limits::default()),
            Err(ArtifactError::Json(_))
        ));
        // A wrong kind.
        let text = String::from_utf8(doc().to_json().unwrap())
            .unwrap()
            .replace("\"erofs\"", "\"squashfs\"");
        assert!(matches!(
            parse(text.as_bytes(), &Limits::default()),
            Err(ArtifactError::Json(_))
        ));
        // The builder side refuses to publish what parse would refuse.
        let mut d = doc();
        d.layers[0].metadata = vec![5..1];
        assert!(d.to_json().is_err());
    }

    #[test]
    fn counts_are_capped() {
        let tight = Limits {
            max_ranges: 1,
            max_files: 2,
            max_extents: 2,
            max_chunks: 2,
            max_traces: 0,
            max_layers: 1,
            ..Limits::default()
        };
        let bytes = doc().to_json().unwrap();
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(e, ArtifactError::Limit { what: "layers", .. }),
            "{e}"
        );
        let mut d = doc();
        d.layers.truncate(1);
        let bytes = serde_json::to_vec(&d).unwrap();
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(e, ArtifactError::Limit { what: "ranges", .. }),
            "{e}"
        );
        let tight = Limits {
            max_ranges: 10,
            ..tight
        };
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(e, ArtifactError::Limit { what: "files", .. }),
            "{e}"
        );
        let tight = Limits {
            max_files: 10,
            ..tight
        };
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(
                e,
                ArtifactError::Limit {
                    what: "extents",
                    ..
                }
            ),
            "{e}"
        );
        let tight = Limits {
            max_extents: 10,
            ..tight
        };
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(
                e,
                ArtifactError::Limit {
                    what: "chunk digests",
                    ..
                }
            ),
            "{e}"
        );
        let tight = Limits {
            max_chunks: 10,
            ..tight
        };
        let e = parse(&bytes, &tight).unwrap_err();
        assert!(
            matches!(e, ArtifactError::Limit { what: "traces", .. }),
            "{e}"
        );
        let tight = Limits {
            max_traces: 1,
            ..tight
        };
        parse(&bytes, &tight).unwrap();
    }

    #[test]
    fn uncompressed_tar_layers_carry_a_tar_index_and_nothing_of_gzip() {
        let mut plain = tar_layer();
        plain.kind = LayerKind::Tar;
        plain.zinfo = None;
        plain.span_sha256 = vec![];
        plain.tar_size = Some(plain.size);
        plain.diff_id = Some(plain.digest.clone());
        plain.files = FileTable::default();
        let d = IndexDoc::new(vec![plain.clone()]);
        let back = parse(&d.to_json().unwrap(), &Limits::default()).unwrap();
        assert_eq!(back.layers[0].kind, LayerKind::Tar);
        assert_eq!(back.layers[0].address_size(), plain.size);
        let bad = |f: fn(&mut LayerIndex), needle: &str| {
            let mut l = plain.clone();
            f(&mut l);
            reject(&IndexDoc::new(vec![l]), needle);
        };
        bad(|l| l.tar_index = None, "tarIndex");
        bad(|l| l.zinfo = tar_layer().zinfo, "zinfo");
        bad(|l| l.span_sha256 = vec![hex64(3)], "spanSha256");
        bad(|l| l.tar_size = Some(l.size + 1), "tarSize");
        bad(|l| l.diff_id = Some(format!("sha256:{}", hex64(9))), "diffId");
    }
}
