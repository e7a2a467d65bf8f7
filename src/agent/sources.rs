//! Which source serves a mount: the front end names it in a [`SourceSpec`]
//! (handed to the agent on its stdin: a spec may carry credentials, never
//! logged), and the agent's start-up opens it here — the one place that
//! knows every kind of source, as erofs-utils' `mount/main.c` picks among
//! `lib/remotes/*`. The event path only ever sees a `RangeSource`: the
//! [`SegmentedSource`] over the image's [`Layout`] (one segment for a single
//! blob, several for an image made of several sources).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::http::{redact_url, ClientConfig};
use crate::remote::{HttpSource, RangeSource, PROBE_LEN};
use crate::segments::{Layout, Segment, SegmentedSource};

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceSpec {
    /// A Range-capable http(s) URL of the blob.
    Url { url: String },
    /// A blob of an OCI image, already resolved to its digest and size.
    Oci(Box<crate::oci::OciBlobSpec>),
    /// One version (ETag) of an S3 object.
    S3(Box<crate::remote::s3::S3ObjectSpec>),
    /// An address space of several sources (DESIGN §7).
    Layout(Box<LayoutSpec>),
    /// The EROFS layers of an image, mounted as one filesystem: merged, or
    /// one multi-blob image (`agent::merge` decides, from their superblocks).
    Layers(Box<LayersSpec>),
    /// A local file, pinned by its sha256 (a tar index named by `oci.tarindex=`).
    LocalFile(LocalFileSpec),
    /// The uncompressed tar of a gzip layer, served through its zinfo (issue 16).
    GzipTar(Box<GzipTarSpec>),
    /// A local image file (one version of it).
    File(Box<crate::remote::local::LocalFileSpec>),
    /// A bucket image: the image, then each object it records at its flat address.
    BucketImage(Box<crate::bucket::BucketImageSpec>),
}

/// The layers of an image, in manifest order.
#[derive(Clone, Serialize, Deserialize)]
pub struct LayersSpec {
    /// What the image is, credential-free (its reference).
    pub name: String,
    /// One source per layer; each names its blob digest.
    pub layers: Vec<SourceSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalFileSpec {
    pub path: std::path::PathBuf,
    /// `sha256:<hex>` of the file when the front end read it: the agent
    /// refuses a file that changed since (the cache key is made of it).
    pub sha256: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct GzipTarSpec {
    /// The compressed layer blob.
    pub blob: SourceSpec,
    pub zinfo: LocalFileSpec,
    /// Size of the uncompressed tar; `None`: measured from the last span.
    #[serde(default)]
    pub tar_size: Option<u64>,
    /// Per-span digests from an index artifact (`gzip::span_digest`).
    #[serde(default)]
    pub span_sha256: Option<Vec<String>>,
}

/// Where each region of an image's flat address space comes from.
#[derive(Clone, Serialize, Deserialize)]
pub struct LayoutSpec {
    /// What the image is, credential-free (e.g. its reference).
    pub name: String,
    /// Bytes of the address space (the cache file's size).
    pub size: u64,
    pub segments: Vec<SegmentSpec>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct SegmentSpec {
    pub start: u64,
    pub len: u64,
    #[serde(default)]
    pub source_offset: u64,
    pub source: SourceSpec,
    /// `sha256:<hex>` of the source's whole bytes when the source does not name it (an
    /// uncompressed tar: its diff_id); checked against the cache file at completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
            SourceSpec::Layout(l) => l.name.clone(),
            SourceSpec::Layers(l) => l.name.clone(),
            SourceSpec::LocalFile(f) => format!("file {}", f.path.display()),
            SourceSpec::GzipTar(g) => format!("the tar of {}", g.blob.label()),
            SourceSpec::File(f) => f.describe(),
            SourceSpec::BucketImage(b) => b.describe(),
        }
    }

    /// The blob digest, when the source names one.
    pub fn digest(&self) -> Option<String> {
        match self {
            SourceSpec::Url { url } => digest_from_url(url),
            SourceSpec::Oci(spec) => Some(spec.digest.clone()),
            SourceSpec::S3(_)
            | SourceSpec::Layout(_)
            | SourceSpec::Layers(_)
            | SourceSpec::LocalFile(_)
            | SourceSpec::GzipTar(_)
            | SourceSpec::File(_)
            | SourceSpec::BucketImage(_) => None,
        }
    }

    /// `sha256:<hex>` of every byte of the source, when known: a blob's digest, a pinned local file's.
    fn whole_sha256(&self) -> Option<String> {
        match self {
            SourceSpec::LocalFile(f) => Some(f.sha256.clone()),
            other => other.digest(),
        }
    }

    /// The label of this source as a segment: its digest, else its description.
    fn label(&self) -> String {
        self.digest().unwrap_or_else(|| self.describe())
    }

    /// The cache entry key: the digest when known, else a hash of the URL.
    pub fn cache_key(&self) -> Result<String, String> {
        match (self.digest(), self) {
            (Some(d), _) => erofs_fanotify_state::cache_key_for_digest(&d).map_err(|e| e.to_string()),
            (None, SourceSpec::Url { url }) => Ok(erofs_fanotify_state::cache_key_for_url(url)),
            (None, SourceSpec::Oci(_)) => Err("an OCI source without a digest".into()),
            (None, SourceSpec::S3(spec)) => Ok(spec.cache_key()),
            (None, SourceSpec::LocalFile(f)) => Ok(format!("file-{}", short_hex(&f.sha256))),
            (None, SourceSpec::GzipTar(g)) => {
                // The blob and the zinfo that decodes it name the tar.
                let mut h = Sha256::new();
                h.update(g.blob.cache_key()?.as_bytes());
                h.update(b"\0");
                h.update(g.zinfo.sha256.as_bytes());
                Ok(format!("gztar-{}", &hex::encode(h.finalize())[..32]))
            }
            (None, SourceSpec::File(f)) => Ok(f.cache_key()),
            (None, SourceSpec::BucketImage(b)) => b.cache_key(),
            (None, SourceSpec::Layout(l)) => {
                // The placement and the keys of the parts name the address space.
                let mut h = Sha256::new();
                h.update(l.size.to_le_bytes());
                for s in &l.segments {
                    h.update(s.start.to_le_bytes());
                    h.update(s.len.to_le_bytes());
                    h.update(s.source_offset.to_le_bytes());
                    let key = s.source.cache_key()?;
                    h.update((key.len() as u64).to_le_bytes());
                    h.update(key.as_bytes());
                }
                Ok(format!("layout-{}", &hex::encode(h.finalize())[..32]))
            }
            (None, SourceSpec::Layers(l)) => {
                // The ordered layer digests name the merged metadata (and
                // the version of the merge that wrote it).
                let mut h = Sha256::new();
                h.update(b"erofs-fanotify merge v1\0");
                for s in &l.layers {
                    let d = s.digest().ok_or_else(|| format!("{}: a layer without a digest", l.name))?;
                    h.update(d.as_bytes());
                    h.update(b"\0");
                }
                Ok(format!("merged-{}", &hex::encode(h.finalize())[..32]))
            }
        }
    }
}

/// An opened source: the flat address space's source (segmented), its
/// layout, and its first bytes (enough for the EROFS superblock).
pub struct OpenedSource {
    pub source: Arc<dyn RangeSource>,
    pub layout: Layout,
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

/// Opens the source of a spec and puts it in its layout. The probe is the
/// one its first segment's source read when it opened (no second request).
pub async fn open_source(spec: &SourceSpec, http: &ClientConfig) -> Result<OpenedSource, OpenError> {
    let (layout, first_probe) = match spec {
        SourceSpec::Layers(l) => return Err(OpenError(format!("{}: internal: layers are opened by the merge", l.name), Transience::Permanent)),
        SourceSpec::Layout(l) => {
            let mut segments = Vec::with_capacity(l.segments.len());
            let mut first_probe = None;
            for s in &l.segments {
                let (source, probe) = open_one(&s.source, http).await?;
                if s.start == 0 && s.source_offset == 0 {
                    first_probe = Some(probe.slice(..probe.len().min(s.len as usize)));
                }
                let sha256 = s.sha256.clone().or_else(|| s.source.whole_sha256());
                segments.push(Segment { label: s.source.label(), start: s.start, len: s.len, source_offset: s.source_offset, source, sha256 });
            }
            (Layout::new(segments, l.size).map_err(|e| OpenError(format!("{}: {e}", l.name), Transience::Permanent))?, first_probe)
        }
        SourceSpec::BucketImage(b) => {
            let (image, probe) = open_one(&b.image, http).await?;
            let layout = crate::bucket::open::layout(b, image, &probe, b.image.label(), http).await.map_err(|e| OpenError(e, Transience::Permanent))?;
            (layout, Some(probe))
        }
        single => {
            let (source, probe) = open_one(single, http).await?;
            (Layout::single(single.label(), source), Some(probe))
        }
    };
    let source = Arc::new(SegmentedSource::new(layout.clone()));
    let want = PROBE_LEN.min(source.size()) as usize;
    let probe = match first_probe {
        Some(p) if p.len() >= want => p.slice(..want),
        _ => source.fetch(0..want as u64).await.map_err(|e| OpenError(e.to_string(), Transience::Permanent))?,
    };
    Ok(OpenedSource { source, layout, probe })
}

/// A source and its first bytes.
pub type OpenedOne = (Arc<dyn RangeSource>, Bytes);

/// Opens one source (not a layout: layouts do not nest) and reads its first bytes.
pub fn open_one<'a>(spec: &'a SourceSpec, http: &'a ClientConfig) -> BoxFuture<'a, Result<OpenedOne, OpenError>> {
    Box::pin(async move {
        match spec {
            SourceSpec::Url { url } => {
                let (source, probe) = HttpSource::open(url, http).await.map_err(|e| {
                    let transient = matches!(&e, crate::remote::http::OpenError::Fetch(f) if f.is_transient());
                    OpenError(e.to_string(), transience(transient))
                })?;
                Ok((Arc::new(source) as Arc<dyn RangeSource>, probe))
            }
            SourceSpec::Oci(blob) => {
                crate::oci::open_blob(blob, http).await.map_err(|e| OpenError(e.to_string(), transience(e.is_transient())))
            }
            SourceSpec::S3(object) => {
                crate::remote::s3::open_object(object, http).await.map_err(|e| OpenError(e.to_string(), Transience::Permanent))
            }
            SourceSpec::File(f) => {
                let source = crate::remote::local::LocalFileSource::open(f).map_err(|e| OpenError(e, Transience::Permanent))?;
                let probe = source.fetch(0..PROBE_LEN.min(source.size())).await.map_err(|e| OpenError(e.to_string(), Transience::Permanent))?;
                Ok((Arc::new(source) as Arc<dyn RangeSource>, probe))
            }
            SourceSpec::Layout(l) => Err(OpenError(format!("{}: a layout inside a layout", l.name), Transience::Permanent)),
            SourceSpec::Layers(l) => Err(OpenError(format!("{}: layers inside a layout", l.name), Transience::Permanent)),
            SourceSpec::LocalFile(f) => {
                let source = open_local_file(f).await?;
                let want = PROBE_LEN.min(source.size());
                let probe = source.fetch(0..want).await.map_err(|e| OpenError(format!("{}: {e}", f.path.display()), Transience::Permanent))?;
                Ok((Arc::new(source) as Arc<dyn RangeSource>, probe))
            }
            SourceSpec::GzipTar(g) => open_gzip_tar(g, http).await,
            SourceSpec::BucketImage(b) => Err(OpenError(format!("{}: a bucket image inside a layout", b.describe()), Transience::Permanent)),
        }
    })
}

fn short_hex(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(32)]
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads a local file whole, capped: index files and zinfos are metadata.
fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, OpenError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| OpenError(format!("cannot open {}: {e}", path.display()), Transience::Permanent))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| OpenError(format!("cannot read {}: {e}", path.display()), Transience::Permanent))?;
    if bytes.len() as u64 > cap {
        return Err(OpenError(format!("{} is larger than {cap} bytes", path.display()), Transience::Permanent));
    }
    Ok(bytes)
}

/// Largest tar index or zinfo read (a zinfo of 2^16 spans is 2 GiB; an
/// index of millions of inodes a few hundred MiB).
const MAX_LOCAL_FILE: u64 = 1 << 30;

async fn open_local_file(f: &LocalFileSpec) -> Result<crate::remote::FileSource, OpenError> {
    let path = f.path.clone();
    let want = f.sha256.clone();
    tokio::task::spawn_blocking(move || {
        let source = crate::remote::FileSource::open(&path).map_err(|e| OpenError(format!("cannot open {}: {e}", path.display()), Transience::Permanent))?;
        let bytes = read_capped(&path, MAX_LOCAL_FILE)?;
        if sha256_of(&bytes) != want || bytes.len() as u64 != source.size() {
            return Err(OpenError(format!("{} changed since the mount began", path.display()), Transience::Permanent));
        }
        Ok(source)
    })
    .await
    .map_err(|e| OpenError(format!("reading a local file failed: {e}"), Transience::Permanent))?
}

/// The blob, its zinfo checked and the tar's size (measured when not
/// given): the uncompressed tar as a source.
async fn open_gzip_tar(g: &GzipTarSpec, http: &ClientConfig) -> Result<(Arc<dyn RangeSource>, Bytes), OpenError> {
    use crate::gzip::Zinfo;
    use crate::segments::gzip::{GzipSpanConfig, GzipSpans};
    let (blob, _) = open_one(&g.blob, http).await?;
    let path = g.zinfo.path.clone();
    let want = g.zinfo.sha256.clone();
    let zinfo = tokio::task::spawn_blocking(move || {
        let bytes = read_capped(&path, MAX_LOCAL_FILE)?;
        if sha256_of(&bytes) != want {
            return Err(OpenError(format!("{} changed since the mount began", path.display()), Transience::Permanent));
        }
        Zinfo::parse(bytes).map_err(|e| OpenError(format!("{} is not a zinfo: {e}", path.display()), Transience::Permanent))
    })
    .await
    .map_err(|e| OpenError(format!("reading the zinfo failed: {e}"), Transience::Permanent))??;
    let label = g.blob.label();
    let tar_size = match g.tar_size {
        Some(n) => n,
        None => GzipSpans::measure_tar_size(blob.as_ref(), &zinfo, &label).await.map_err(|e| OpenError(e.to_string(), Transience::Permanent))?,
    };
    let mut cfg = GzipSpanConfig::new(label, tar_size);
    cfg.span_sha256 = g.span_sha256.clone();
    cfg.blob_digest = g.blob.digest();
    let spans = GzipSpans::new(blob, zinfo, cfg).map_err(|e| OpenError(e.to_string(), Transience::Permanent))?;
    Ok((Arc::new(spans) as Arc<dyn RangeSource>, Bytes::new()))
}

/// The files of a one-layer tar index mount and what is known about the tar.
#[derive(Clone, Debug)]
pub struct TarIndexFiles {
    pub index: std::path::PathBuf,
    /// Gzip layers: the zinfo (without it the layer blob is the tar itself).
    pub zinfo: Option<std::path::PathBuf>,
    /// The uncompressed tar's size when known (else measured by the agent).
    pub tar_size: Option<u64>,
    pub span_sha256: Option<Vec<String>>,
    /// The uncompressed tar's sha256 (the layer's diff_id), checked at completion when known.
    pub diff_id: Option<String>,
}

/// The address space of a one-layer tar index mount (`-o oci.tarindex=,oci.zinfo=`):
/// `[index | tar]`, the index from its local file, the tar from the layer
/// (through its zinfo when the layer is gzip). Front end side: reads the
/// index to place the tar, and pins both files by digest.
pub fn tar_index_layout(name: &str, layer: SourceSpec, files: &TarIndexFiles) -> Result<SourceSpec, String> {
    let index = &files.index;
    let index_bytes = read_capped(index, MAX_LOCAL_FILE).map_err(|e| e.0)?;
    let placed = crate::segments::tar_index::placement(&index_bytes).map_err(|e| format!("{}: {e}", index.display()))?;
    let index_spec = LocalFileSpec { path: index.to_path_buf(), sha256: sha256_of(&index_bytes) };
    let tar = tar_source(layer, files)?;
    let tar_len = whole_tar_len(placed.tar_len, files.tar_size, None);
    Ok(SourceSpec::Layout(Box::new(LayoutSpec {
        name: name.to_string(),
        size: placed.size().max(placed.tar_start + tar_len),
        segments: vec![
            SegmentSpec { start: 0, len: placed.index_len, source_offset: 0, source: SourceSpec::LocalFile(index_spec), sha256: None },
            SegmentSpec { start: placed.tar_start, len: tar_len, source_offset: 0, source: tar, sha256: files.diff_id.clone() },
        ],
    })))
}

/// The bytes of a tar its segment holds: the whole tar when its size is known and fits before
/// `room` (the next segment), so the diff_id check at completion hashes the cache file alone; else
/// what the index refers to (`indexed`: its records end before the tar's trailing zero records,
/// which the check then fetches).
fn whole_tar_len(indexed: u64, tar_size: Option<u64>, room: Option<u64>) -> u64 {
    match tar_size {
        Some(n) if n >= indexed && room.is_none_or(|r| n <= r) => n,
        _ => indexed,
    }
}

/// The uncompressed tar of a layer as a source: the blob itself, or the
/// blob through its zinfo (pinned by digest).
fn tar_source(layer: SourceSpec, files: &TarIndexFiles) -> Result<SourceSpec, String> {
    Ok(match &files.zinfo {
        Some(z) => {
            let bytes = read_capped(z, MAX_LOCAL_FILE).map_err(|e| e.0)?;
            let sha256 = sha256_of(&bytes);
            crate::gzip::Zinfo::parse(bytes).map_err(|e| format!("{} is not a zinfo: {e}", z.display()))?;
            SourceSpec::GzipTar(Box::new(GzipTarSpec {
                blob: layer,
                zinfo: LocalFileSpec { path: z.to_path_buf(), sha256 },
                tar_size: files.tar_size,
                span_sha256: files.span_sha256.clone(),
            }))
        }
        None => layer,
    })
}

/// One layer of a whole tar image: its blob, its index files, and where the
/// merge put its tar.
pub struct TarImageLayer {
    pub blob: SourceSpec,
    pub files: TarIndexFiles,
    /// `[base, len)` of its tar in the address space.
    pub base: u64,
    pub len: u64,
}

/// The address space of a whole image of tar layers (issue 16):
/// `[merged metadata | tar 0 | tar 1 | …]`, the merged metadata from its
/// local file (pinned by digest), each tar from its layer.
pub fn tar_image_layout(name: &str, merged: &std::path::Path, size: u64, layers: Vec<TarImageLayer>) -> Result<SourceSpec, String> {
    let image = read_capped(merged, MAX_LOCAL_FILE).map_err(|e| e.0)?;
    let mut segments = vec![SegmentSpec {
        start: 0,
        len: image.len() as u64,
        source_offset: 0,
        source: SourceSpec::LocalFile(LocalFileSpec { path: merged.to_path_buf(), sha256: sha256_of(&image) }),
        sha256: None,
    }];
    let mut end = image.len() as u64;
    let mut size = size;
    let bases: Vec<u64> = layers.iter().map(|l| l.base).skip(1).collect();
    for (i, l) in layers.into_iter().enumerate() {
        if l.base < end || l.base.checked_add(l.len).is_none_or(|e| e > size) {
            return Err(format!("{name}: the tars of the merged image overlap or lie past its {size} bytes"));
        }
        let room = bases.get(i).map(|next| next.saturating_sub(l.base));
        let len = whole_tar_len(l.len, l.files.tar_size, room);
        end = l.base + len;
        size = size.max(end);
        let tar = tar_source(l.blob, &l.files)?;
        let sha256 = l.files.diff_id.clone();
        segments.push(SegmentSpec { start: l.base, len, source_offset: 0, source: tar, sha256 });
    }
    Ok(SourceSpec::Layout(Box::new(LayoutSpec { name: name.to_string(), size, segments })))
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
    fn a_tar_segment_holds_the_whole_tar_when_it_fits() {
        assert_eq!(whole_tar_len(51_200, Some(61_440), None), 61_440, "the trailing records too");
        assert_eq!(whole_tar_len(51_200, Some(61_440), Some(4 << 20)), 61_440);
        assert_eq!(whole_tar_len(51_200, Some(61_440), Some(60_000)), 51_200, "no room before the next tar");
        assert_eq!(whole_tar_len(51_200, None, None), 51_200, "size unknown");
        assert_eq!(whole_tar_len(51_200, Some(40_000), None), 51_200, "a size below what the index refers to is not trusted");
    }

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
    fn layers_are_keyed_by_their_ordered_digests() {
        let url = |n: u8| SourceSpec::Url { url: format!("http://r/v2/x/blobs/sha256:{}", format!("{n:02x}").repeat(32)) };
        let spec = |order: &[u8]| SourceSpec::Layers(Box::new(LayersSpec { name: "r/x:1".into(), layers: order.iter().map(|&n| url(n)).collect() }));
        let a = spec(&[1, 2, 3]).cache_key().unwrap();
        assert!(a.starts_with("merged-") && erofs_fanotify_state::validate_cache_key(&a).is_ok(), "{a}");
        assert_eq!(a, spec(&[1, 2, 3]).cache_key().unwrap());
        assert_ne!(a, spec(&[2, 1, 3]).cache_key().unwrap());
        let no_digest = SourceSpec::Layers(Box::new(LayersSpec { name: "n".into(), layers: vec![SourceSpec::Url { url: "http://r/a".into() }] }));
        assert!(no_digest.cache_key().is_err());
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
