//! Finding a blob's index artifact at mount time (front end side).
//!
//! The image manifest is the artifact's `subject`: the referrers API, or on
//! registries without it (Debian's docker-registry 2.8) the `sha256-<hex>`
//! referrers tag ([`Repository::referrers`] does both). Artifacts are tried
//! newest first (the tag index appends). Each one that does not parse, does
//! not describe this layer (digest, size, kind) or lists no metadata is
//! skipped with one warning: an artifact is never trusted unchecked, and a
//! bad one only costs the walk it would have saved. A good one gives the
//! agent a [`KnownRanges`] list.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use super::artifact::{self, LayerKind, Limits, ARTIFACT_TYPE, DOC_MEDIA_TYPE};
use super::{IndexMode, KnownChunks, KnownRanges};
use crate::agent::sources::SourceSpec;
use crate::oci::auth::Access;
use crate::oci::manifest::{self, Manifest, Platform};
use crate::oci::push::{ReferrersSource, Repository};
use crate::oci::{OciBlobSpec, OciError, Reference};

/// What a lookup found.
#[derive(Debug, Default)]
pub struct Lookup {
    pub known: Option<KnownRanges>,
    /// One line per artifact found but ignored.
    pub warnings: Vec<String>,
    /// Why nothing was used (when `known` is None).
    pub none_because: Option<String>,
    /// The named access traces of the layer in the artifact used.
    pub traces: Traces,
}

/// `-o trace=`: which of the artifact's traces is replayed as prefetch.
/// `None` (no option): the only one, if there is exactly one; `none`: no
/// trace; `NAME`: that one (a warning when the artifact lacks it).
pub fn pick_trace<'a>(traces: &'a Traces, choice: Option<&str>) -> Result<Option<PickedTrace<'a>>, String> {
    match choice {
        Some("none") => Ok(None),
        Some(name) => match traces.get_key_value(name) {
            Some((k, v)) => Ok(Some((k.as_str(), v.as_slice()))),
            None => {
                let names: Vec<&str> = traces.keys().map(String::as_str).collect();
                Err(format!("the index artifact has no trace {name:?} (it has: {})", if names.is_empty() { "none".into() } else { names.join(", ") }))
            }
        },
        None if traces.len() == 1 => Ok(traces.iter().next().map(|(k, v)| (k.as_str(), v.as_slice()))),
        None => Ok(None),
    }
}

/// The metadata ranges for layer `digest` of `size` bytes in an index
/// document, after every check.
pub fn ranges_from_doc(bytes: &[u8], digest: &str, size: u64) -> Result<Vec<Range<u64>>, String> {
    layer_from_doc(bytes, digest, size).map(|(metadata, _, _)| metadata)
}

type Traces = BTreeMap<String, Vec<Range<u64>>>;
/// A layer's metadata ranges, traces and chunk digests, from a document.
type LayerEntry = (Vec<Range<u64>>, Traces, Option<KnownChunks>);
/// A trace's name and ranges.
pub type PickedTrace<'a> = (&'a str, &'a [Range<u64>]);

/// The metadata ranges and traces of layer `digest` in a document (every range
/// inside the blob: checked by the parser).
fn layer_from_doc(bytes: &[u8], digest: &str, size: u64) -> Result<LayerEntry, String> {
    let doc = artifact::parse(bytes, &Limits::default()).map_err(|e| e.to_string())?;
    let layer = doc.layer(digest).ok_or_else(|| format!("it has no entry for layer {digest}"))?;
    if layer.kind != LayerKind::Erofs {
        return Err(format!("its entry for layer {digest} is not an EROFS layer"));
    }
    if layer.size != size {
        return Err(format!("it says layer {digest} has {} bytes, the blob has {size}", layer.size));
    }
    if layer.metadata.is_empty() {
        return Err(format!("its entry for layer {digest} lists no metadata ranges"));
    }
    // `parse` checked them sorted, disjoint, non-empty and inside `layer.size`, and one digest per chunk.
    let chunks = layer.chunk_size.filter(|_| !layer.chunk_sha256.is_empty()).map(|size| KnownChunks { size, sha256: layer.chunk_sha256.clone() });
    if let Some(c) = &chunks {
        crate::remote::verified::ChunkDigests::new(c.size, &c.sha256, size).map_err(|e| format!("its chunk digests for layer {digest}: {e}"))?;
    }
    Ok((layer.metadata.clone(), layer.traces.clone(), chunks))
}

fn known(artifact: String, ranges: &[Range<u64>], chunks: Option<KnownChunks>) -> KnownRanges {
    KnownRanges { artifact, ranges: ranges.iter().map(|r| [r.start, r.end]).collect(), chunks }
}

/// Looks for an index artifact of the image in `repo` whose layer `digest`
/// (`size` bytes) is being mounted. Registry failures are errors; bad
/// artifacts are warnings.
pub async fn in_registry(repo: &Repository, platform: &Platform, digest: &str, size: u64) -> Result<Lookup, OciError> {
    let image = repo.resolve_image(platform).await?;
    if !image.manifest.layers().iter().any(|l| l.digest().to_string() == digest) {
        // The tag moved since the layer was resolved: the artifact would be another image's.
        return Ok(Lookup { none_because: Some(format!("the image no longer has layer {digest}")), ..Lookup::default() });
    }
    let referrers = repo.referrers(&image.digest, Some(ARTIFACT_TYPE)).await?;
    let how = match referrers.source {
        ReferrersSource::Api => "referrers API",
        ReferrersSource::TagSchema => "referrers tag",
    };
    let mut out = Lookup::default();
    for d in referrers.manifests.iter().rev() {
        let artifact_digest = d.digest().to_string();
        match artifact_ranges(repo, &artifact_digest, digest, size).await {
            Ok((ranges, traces, chunks)) => {
                out.known = Some(known(format!("{artifact_digest} ({how})"), &ranges, chunks));
                out.traces = traces;
                return Ok(out);
            }
            Err(why) => out.warnings.push(format!("ignoring index artifact {artifact_digest} of {}: {why}", repo.reference())),
        }
    }
    out.none_because = Some(if referrers.manifests.is_empty() {
        format!("{} has no index artifact ({how})", repo.at_digest(&image.digest))
    } else {
        format!("none of the index artifacts of {} is usable", repo.at_digest(&image.digest))
    });
    Ok(out)
}

async fn artifact_ranges(repo: &Repository, artifact_digest: &str, digest: &str, size: u64) -> Result<LayerEntry, String> {
    let bytes = artifact_doc(repo, artifact_digest).await?;
    layer_from_doc(&bytes, digest, size)
}

/// The document of artifact `artifact_digest` (its type checked, its size capped).
async fn artifact_doc(repo: &Repository, artifact_digest: &str) -> Result<Vec<u8>, String> {
    let fetched = repo.get_manifest(artifact_digest).await.map_err(|e| e.to_string())?;
    let Manifest::Image(m) = fetched.manifest else { return Err("it is an index, not an artifact manifest".into()) };
    if m.artifact_type().as_ref().map(|t| t.to_string()).as_deref() != Some(ARTIFACT_TYPE) {
        return Err(format!("its artifactType is not {ARTIFACT_TYPE}"));
    }
    let doc = m
        .layers()
        .iter()
        .find(|l| l.media_type().to_string() == DOC_MEDIA_TYPE)
        .ok_or_else(|| format!("it has no {DOC_MEDIA_TYPE} layer"))?;
    let cap = Limits::default().max_doc_bytes;
    if doc.size() > cap as u64 {
        return Err(format!("its document of {} bytes exceeds the {cap}-byte limit", doc.size()));
    }
    repo.get_blob(doc.digest().as_ref(), cap).await.map_err(|e| e.to_string())
}

/// The size an index document gives layer `digest`.
fn size_in_file(path: &Path, digest: &str) -> Result<u64, String> {
    let bytes = read_doc_file(path)?;
    let doc = artifact::parse(&bytes, &Limits::default()).map_err(|e| format!("index_file {}: {e}", path.display()))?;
    doc.layer(digest).map(|l| l.size).ok_or_else(|| format!("index_file {}: it has no entry for layer {digest}", path.display()))
}

fn read_doc_file(path: &Path) -> Result<Vec<u8>, String> {
    let cap = Limits::default().max_doc_bytes as u64;
    let len = std::fs::metadata(path).map_err(|e| format!("cannot read index_file {}: {e}", path.display()))?.len();
    if len > cap {
        return Err(format!("index_file {} has {len} bytes, more than the {cap}-byte limit", path.display()));
    }
    std::fs::read(path).map_err(|e| format!("cannot read index_file {}: {e}", path.display()))
}

/// `index_file=PATH`: an index document copied locally.
pub fn from_file(path: &Path, digest: &str, size: u64) -> Result<(KnownRanges, Traces), String> {
    let bytes = read_doc_file(path)?;
    let (ranges, traces, chunks) = layer_from_doc(&bytes, digest, size).map_err(|why| format!("index_file {}: {why}", path.display()))?;
    Ok((known(format!("file {}", path.display()), &ranges, chunks), traces))
}

/// The lookup a new mount makes (blocking; front end). `Err` only with
/// `index=require`: the one line the mount fails with.
pub fn for_mount(source: &SourceSpec, mode: IndexMode, index_file: Option<&Path>, o: &crate::oci::OciOptions) -> Result<Lookup, String> {
    if mode == IndexMode::Off {
        return Ok(Lookup { none_because: Some("index=off".into()), ..Lookup::default() });
    }
    let found = match (source, index_file) {
        (_, Some(path)) => match source.digest() {
            None => Err(format!("index_file needs a source that names its digest, not {}", source.describe())),
            Some(digest) => {
                let size = match source {
                    SourceSpec::Oci(spec) => Ok(Some(spec.size)),
                    // A blob URL names no size: the document's (the agent's chunk check holds the
                    // blob to it; the walk checks every range anyway).
                    SourceSpec::Url { .. } => size_in_file(path, &digest).map(Some),
                    _ => Ok(None),
                };
                match size {
                    Ok(Some(size)) => from_file(path, &digest, size).map(|(k, traces)| Lookup { known: Some(k), traces, ..Lookup::default() }),
                    Ok(None) => Err(format!("index_file applies to image references and blob URLs, not {}", source.describe())),
                    Err(e) => Err(e),
                }
            }
        },
        (SourceSpec::Oci(spec), None) => from_registry_blocking(spec, o),
        (_, None) => Ok(Lookup { none_because: Some(format!("{} is not an image reference", source.describe())), ..Lookup::default() }),
    };
    match (found, mode) {
        (Ok(l), IndexMode::Require) if l.known.is_none() => {
            let why = l.none_because.clone().unwrap_or_else(|| "no index artifact".into());
            Err(match l.warnings.first() {
                Some(w) => format!("index=require: {why} ({w})"),
                None => format!("index=require: {why}"),
            })
        }
        (Ok(l), _) => Ok(l),
        (Err(e), IndexMode::Require) => Err(format!("index=require: {e}")),
        (Err(e), _) => {
            // An index_file the user named but that cannot be used is worth a warning.
            Ok(Lookup { warnings: if index_file.is_some() { vec![e.clone()] } else { vec![] }, none_because: Some(e), ..Lookup::default() })
        }
    }
}

fn from_registry_blocking(spec: &OciBlobSpec, o: &crate::oci::OciOptions) -> Result<Lookup, String> {
    let (repo, platform, rt) = connect_blocking(&spec.reference, o)?;
    rt.block_on(in_registry(&repo, &platform, &spec.digest, spec.size))
        .map_err(|e| format!("cannot look up the index artifact of {}: {e}", spec.reference))
}

/// The repository of `reference` (pull access), the platform `o` picks, and a runtime to use them from
/// the front end.
fn connect_blocking(reference: &str, o: &crate::oci::OciOptions) -> Result<(Repository, Platform, tokio::runtime::Runtime), String> {
    let reference = Reference::parse(reference).map_err(|e| e.to_string())?;
    let platform = match &o.platform {
        Some(p) => manifest::parse_platform(p).map_err(|e| format!("oci.platform: {e}"))?,
        None => manifest::host_platform(),
    };
    let repo = Repository::connect(&reference, o, Access::default()).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    Ok((repo, platform, rt))
}

/// A tar layer's index files from an artifact (untrusted: the caller checks
/// the index's placement and merges it before anything is mounted).
#[derive(Debug)]
pub struct TarLayerFiles {
    pub digest: String,
    pub size: u64,
    pub gzip: bool,
    pub diff_id: String,
    pub tar_size: u64,
    pub span_sha256: Option<Vec<String>>,
    pub index: Vec<u8>,
    pub zinfo: Option<Vec<u8>>,
}

/// What a tar artifact lookup found.
#[derive(Debug, Default)]
pub struct TarLookup {
    /// The artifact's digest (and how it was found) and every layer's files, in order.
    pub found: Option<(String, Vec<TarLayerFiles>)>,
    pub warnings: Vec<String>,
    pub none_because: Option<String>,
}

/// Largest tar index or zinfo blob fetched from an artifact.
const MAX_TAR_INDEX_BLOB: u64 = 256 << 20;

/// Looks for an index artifact of the image whose tar `layers` (digest,
/// size, in manifest order) are being mounted, and fetches each layer's tar
/// index and zinfo from it (each checked against its digest).
pub async fn tar_layers_in_registry(repo: &Repository, platform: &Platform, layers: &[(String, u64)]) -> Result<TarLookup, OciError> {
    let image = repo.resolve_image(platform).await?;
    let now: Vec<String> = image.manifest.layers().iter().map(|l| l.digest().to_string()).collect();
    if now.len() != layers.len() || now.iter().zip(layers).any(|(a, (b, _))| a != b) {
        return Ok(TarLookup { none_because: Some("the image changed since its layers were resolved".into()), ..TarLookup::default() });
    }
    let referrers = repo.referrers(&image.digest, Some(ARTIFACT_TYPE)).await?;
    let how = match referrers.source {
        ReferrersSource::Api => "referrers API",
        ReferrersSource::TagSchema => "referrers tag",
    };
    let mut out = TarLookup::default();
    for d in referrers.manifests.iter().rev() {
        let artifact_digest = d.digest().to_string();
        match tar_artifact_files(repo, &artifact_digest, layers).await {
            Ok(files) => {
                out.found = Some((format!("{artifact_digest} ({how})"), files));
                return Ok(out);
            }
            Err(why) => out.warnings.push(format!("ignoring index artifact {artifact_digest} of {}: {why}", repo.reference())),
        }
    }
    out.none_because = Some(if referrers.manifests.is_empty() {
        format!("{} has no index artifact ({how})", repo.at_digest(&image.digest))
    } else {
        format!("none of the index artifacts of {} indexes its tar layers", repo.at_digest(&image.digest))
    });
    Ok(out)
}

async fn tar_artifact_files(repo: &Repository, artifact_digest: &str, layers: &[(String, u64)]) -> Result<Vec<TarLayerFiles>, String> {
    let bytes = artifact_doc(repo, artifact_digest).await?;
    let doc = artifact::parse(&bytes, &Limits::default()).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(layers.len());
    for (digest, size) in layers {
        let l = doc.layer(digest).ok_or_else(|| format!("it has no entry for layer {digest}"))?;
        if l.size != *size {
            return Err(format!("it says layer {digest} has {} bytes, the blob has {size}", l.size));
        }
        let gzip = match l.kind {
            LayerKind::TarGzip => true,
            LayerKind::Tar => false,
            LayerKind::Erofs => return Err(format!("its entry for layer {digest} is an EROFS layer")),
        };
        // `parse` checked: tarIndex present, zinfo and spans for gzip, a diffId and tarSize for gzip.
        let get = |b: &artifact::BlobRef| {
            let b = b.clone();
            async move {
                if b.size > MAX_TAR_INDEX_BLOB {
                    return Err(format!("its blob {} of {} bytes exceeds the {MAX_TAR_INDEX_BLOB}-byte limit", b.digest, b.size));
                }
                let bytes = repo.get_blob(&b.digest, b.size as usize).await.map_err(|e| e.to_string())?;
                if bytes.len() as u64 != b.size {
                    return Err(format!("its blob {} has {} bytes, not {}", b.digest, bytes.len(), b.size));
                }
                Ok(bytes)
            }
        };
        let index_ref = l.tar_index.as_ref().ok_or_else(|| format!("its entry for layer {digest} names no tar index"))?;
        let index = get(index_ref).await?;
        let zinfo = match (&l.zinfo, gzip) {
            (Some(z), true) => Some(get(z).await?),
            (None, false) => None,
            _ => return Err(format!("its entry for layer {digest} has a zinfo that does not fit its kind")),
        };
        out.push(TarLayerFiles {
            digest: digest.clone(),
            size: *size,
            gzip,
            diff_id: l.diff_id.clone().unwrap_or_else(|| digest.clone()),
            tar_size: l.tar_size.unwrap_or(*size),
            span_sha256: gzip.then(|| l.span_sha256.clone()),
            index,
            zinfo,
        });
    }
    Ok(out)
}

/// [`tar_layers_in_registry`] from the front end (blocking).
pub fn tar_layers_for_mount(reference: &str, o: &crate::oci::OciOptions, layers: &[(String, u64)]) -> Result<TarLookup, String> {
    let (repo, platform, rt) = connect_blocking(reference, o)?;
    rt.block_on(tar_layers_in_registry(&repo, &platform, layers)).map_err(|e| format!("cannot look up the index artifact of {reference}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::artifact::{IndexDoc, LayerIndex};

    fn doc(digest: &str, size: u64, metadata: Vec<Range<u64>>) -> Vec<u8> {
        let layer = LayerIndex {
            digest: digest.into(),
            size,
            kind: LayerKind::Erofs,
            block_size: Some(4096),
            metadata,
            files: Default::default(),
            chunk_size: None,
            chunk_sha256: vec![],
            traces: Default::default(),
            tar_index: None,
            zinfo: None,
            tar_size: None,
            span_sha256: vec![],
            diff_id: None,
        };
        IndexDoc::new(vec![layer]).to_json().unwrap()
    }

    #[test]
    fn only_a_matching_layer_entry_is_used() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let other = format!("sha256:{}", "cd".repeat(32));
        let good = doc(&d, 1 << 20, vec![0..8192, 65536..69632]);
        assert_eq!(ranges_from_doc(&good, &d, 1 << 20).unwrap(), vec![0..8192, 65536..69632]);
        assert!(ranges_from_doc(&good, &other, 1 << 20).unwrap_err().contains("no entry"));
        assert!(ranges_from_doc(&good, &d, 2 << 20).unwrap_err().contains("bytes"));
        assert!(ranges_from_doc(&good[..good.len() - 3], &d, 1 << 20).is_err(), "truncated");
        assert!(ranges_from_doc(b"garbage", &d, 1 << 20).is_err());
        // Past the blob: refused by the parser.
        let past = String::from_utf8(good.clone()).unwrap().replace("69632", "9999999");
        assert!(ranges_from_doc(past.as_bytes(), &d, 1 << 20).is_err());
        let empty = doc(&d, 1 << 20, vec![]);
        assert!(ranges_from_doc(&empty, &d, 1 << 20).unwrap_err().contains("no metadata"));
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn trace_choice() {
        let mut t = BTreeMap::new();
        t.insert("python".to_string(), vec![0..4096]);
        assert_eq!(pick_trace(&t, None).unwrap().map(|(n, _)| n), Some("python"), "the only one by default");
        assert_eq!(pick_trace(&t, Some("none")).unwrap(), None);
        assert!(pick_trace(&t, Some("java")).unwrap_err().contains("it has: python"));
        t.insert("java".to_string(), vec![4096..8192]);
        assert_eq!(pick_trace(&t, None).unwrap(), None, "several: none unless named");
        assert_eq!(pick_trace(&t, Some("java")).unwrap().map(|(_, r)| r.to_vec()), Some(vec![4096..8192]));
        assert_eq!(pick_trace(&BTreeMap::new(), None).unwrap(), None);
    }

    #[test]
    fn modes() {
        let url = SourceSpec::Url { url: "http://127.0.0.1:1/x.erofs".into() };
        let o = crate::oci::OciOptions::default();
        let off = for_mount(&url, IndexMode::Off, None, &o).unwrap();
        assert!(off.known.is_none() && off.warnings.is_empty());
        let auto = for_mount(&url, IndexMode::Auto, None, &o).unwrap();
        assert!(auto.known.is_none());
        let e = for_mount(&url, IndexMode::Require, None, &o).unwrap_err();
        assert!(e.starts_with("index=require: ") && e.contains("not an image reference"), "{e}");
        assert_eq!(IndexMode::parse("require"), Some(IndexMode::Require));
        assert_eq!(IndexMode::parse("on"), None);
    }
}
