//! `erofs-fanotify index push [-o OPTS] REF [--trace [NAME=]FILE]...`: walks
//! each EROFS layer of an image once and pushes an index artifact (DESIGN
//! §8) whose `subject` is the image manifest: per layer, the metadata
//! ranges (what a mount must make local), a sha256 per 64 KiB chunk (a mount checks every fetch against them), and the
//! named access traces given. Ranges, never bytes. The artifact is found
//! through the referrers API, or the `sha256-<hex>` referrers tag on
//! registries without it (kept up to date when several artifacts exist).
//! Prints the artifact manifest's digest.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::ops::Range;
use std::path::PathBuf;

use crate::index::artifact::{IndexDoc, ARTIFACT_TYPE, DOC_MEDIA_TYPE};
use crate::index::build;
use crate::oci::auth::Access;
use crate::oci::manifest;
use crate::oci::push::{self, Artifact, Blob, ReferrersSource, Repository, UploadOptions};
use crate::oci::Reference;

use super::push_cmd;
use super::CliError;

pub struct IndexPushArgs {
    pub reference: String,
    pub options: Vec<String>,
    /// `[NAME=]FILE` traces from `erofs-fanotify trace`.
    pub traces: Vec<String>,
    /// Where the blob copies go while walking (default $TMPDIR, else /var/tmp).
    pub tmpdir: Option<PathBuf>,
    /// `--zinfo-span SIZE` (ordinary images).
    pub zinfo_span: Option<String>,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

/// A `--trace` argument: `NAME=FILE` or `FILE` (named `default`).
pub(crate) fn trace_arg(arg: &str) -> (String, PathBuf) {
    match arg.split_once('=') {
        Some((name, file)) if !name.is_empty() && !name.contains('/') => (name.to_string(), PathBuf::from(file)),
        _ => ("default".to_string(), PathBuf::from(arg)),
    }
}

struct Trace {
    name: String,
    file: PathBuf,
    digest: Option<String>,
    ranges: Vec<Range<u64>>,
}

fn read_traces(args: &[String]) -> Result<Vec<Trace>, CliError> {
    let mut out: Vec<Trace> = Vec::new();
    for arg in args {
        let (name, file) = trace_arg(arg);
        let text = std::fs::read_to_string(&file).map_err(|e| err(format!("cannot read trace {}: {e}", file.display())))?;
        let (digest, ranges) =
            crate::agent::trace::parse_trace(&text).map_err(|e| err(format!("{} is not a trace: {e}", file.display())))?;
        if ranges.is_empty() {
            return Err(err(format!("trace {} holds no ranges", file.display())));
        }
        out.push(Trace { name, file, digest, ranges });
    }
    Ok(out)
}

pub fn push(args: IndexPushArgs) -> Result<(), CliError> {
    let o = push_cmd::oci_options(&args.options)?;
    let platform = push_cmd::platform(None, &o)?;
    let reference = Reference::parse(&args.reference).map_err(err)?;
    let traces = read_traces(&args.traces)?;
    let span = super::build_cmd::parse_zinfo_span(args.zinfo_span.as_deref())?;
    let temp_base = args
        .tmpdir
        .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let rt = push_cmd::runtime()?;
    let repo = Repository::connect(&reference, &o, Access { push: true, mount_from: vec![] }).map_err(err)?;
    let image = rt.block_on(repo.resolve_image(&platform)).map_err(err)?;
    let layers: Vec<(String, u64)> = image
        .manifest
        .layers()
        .iter()
        .filter(|l| manifest::EROFS_MEDIA_TYPES.contains(&l.media_type().to_string().as_str()))
        .map(|l| (l.digest().to_string(), l.size()))
        .collect();
    if layers.is_empty() {
        let all_tar = !image.manifest.layers().is_empty()
            && image.manifest.layers().iter().all(|l| super::tar_index_mount::is_tar_layer(l.media_type().as_ref()));
        if !all_tar {
            return Err(err(format!("image {reference} has no EROFS layers to index, and not only tar layers")));
        }
        if !traces.is_empty() {
            return Err(err("--trace applies to EROFS layers; an ordinary image's index carries no traces yet"));
        }
        return push_tar_image(&rt, &repo, &image, &args.reference, &o, &temp_base, &layer_options(span));
    }
    if span.is_some() {
        return Err(err("--zinfo-span applies to ordinary images (tar+gzip layers); EROFS layers have no zinfo"));
    }

    // Each trace belongs to the layer its `# digest` line names, or to the only layer.
    let mut per_layer: BTreeMap<String, BTreeMap<String, Vec<Range<u64>>>> = BTreeMap::new();
    for t in traces {
        let digest = match (&t.digest, layers.len()) {
            (Some(d), _) => {
                if !layers.iter().any(|(l, _)| l == d) {
                    return Err(err(format!("trace {} is of blob {d}, which is not an EROFS layer of {reference}", t.file.display())));
                }
                d.clone()
            }
            (None, 1) => layers[0].0.clone(),
            (None, _) => {
                return Err(err(format!("trace {} names no digest, and {reference} has several EROFS layers", t.file.display())))
            }
        };
        if per_layer.entry(digest).or_default().insert(t.name.clone(), t.ranges).is_some() {
            return Err(err(format!("two traces are named {:?}", t.name)));
        }
    }

    let temp = tempfile::Builder::new()
        .prefix("erofs-fanotify-index-")
        .tempdir_in(&temp_base)
        .map_err(|e| err(format!("cannot create a temp dir in {}: {e}", temp_base.display())))?;
    let mut entries = Vec::new();
    for (i, (digest, size)) in layers.iter().enumerate() {
        let path = temp.path().join(format!("layer-{i}"));
        let mut file = std::fs::File::create_new(&path).map_err(|e| err(format!("cannot create {}: {e}", path.display())))?;
        let chunks = rt.block_on(build::download_blob(&repo, digest, *size, &mut file)).map_err(err)?;
        drop(file);
        let traces = per_layer.remove(digest).unwrap_or_default();
        let (entry, map) = build::erofs_layer_index(&path, digest, *size, chunks, traces).map_err(err)?;
        tracing::info!(%digest, ranges = map.required.len(), bytes = map.required_bytes(), inodes = map.inodes, "layer indexed");
        let _ = std::fs::remove_file(&path);
        entries.push(entry);
    }
    drop(temp);
    let (pushed, doc_blob) = push_doc(&rt, &repo, &image, IndexDoc::new(entries), Vec::new())?;
    let how = match pushed.indexed_by {
        ReferrersSource::Api => "the registry indexes referrers",
        ReferrersSource::TagSchema => "referrers tag updated",
    };
    tracing::info!(image = %image.digest, artifact = %pushed.manifest.digest, bytes = doc_blob.size, how, requests = repo.requests(), "index pushed");
    if std::io::stderr().is_terminal() {
        eprintln!("pushed index {} for {} ({} bytes, {how})", pushed.manifest.digest, repo.at_digest(&image.digest), doc_blob.size);
    }
    println!("{}", pushed.manifest.digest);
    Ok(())
}

/// Pushes the document and the artifact (its layers: the document, then `blobs`, pushed already)
/// referring to `image`.
fn push_doc(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    image: &push::ResolvedImage,
    doc: IndexDoc,
    blobs: Vec<oci_spec::image::Descriptor>,
) -> Result<(push::PushedArtifact, Blob), CliError> {
    let doc = doc.to_json().map_err(|e| err(format!("cannot write the index document: {e}")))?;
    let doc_blob = Blob::from_bytes(doc);
    let pushed = rt
        .block_on(async {
            repo.push_blob(&doc_blob, &UploadOptions::default()).await?;
            let subject = push::descriptor(&image.media_type, &image.digest, image.bytes.len() as u64)?;
            let mut layers = vec![doc_blob.descriptor(DOC_MEDIA_TYPE)?];
            layers.extend(blobs);
            let artifact = Artifact { artifact_type: ARTIFACT_TYPE.to_string(), subject, layers, annotations: BTreeMap::new() };
            repo.push_artifact(&artifact).await
        })
        .map_err(err)?;
    Ok((pushed, doc_blob))
}

/// `index push` of an ordinary image: each tar layer indexed once (blob digest and diff_id checked),
/// its tar index and zinfo pushed as blobs, and a document naming them per layer (DESIGN §8's
/// tar+gzip entries, and `tar` for uncompressed layers) as the artifact. The merged metadata is not
/// pushed: a mount merges the layers' indexes itself (milliseconds), one blob fewer to trust.
fn push_tar_image(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    image: &push::ResolvedImage,
    reference: &str,
    o: &crate::oci::OciOptions,
    temp_base: &std::path::Path,
    layer_opts: &crate::build::layer::LayerOptions,
) -> Result<(), CliError> {
    use crate::build::layer_store;
    use crate::index::artifact::{BlobRef, LayerIndex, LayerKind, TAR_INDEX_MEDIA_TYPE, ZINFO_MEDIA_TYPE};
    let temp = tempfile::Builder::new()
        .prefix("erofs-fanotify-index-")
        .tempdir_in(temp_base)
        .map_err(|e| err(format!("cannot create a temp dir in {}: {e}", temp_base.display())))?;
    // Pinned to the manifest resolved here (a tag may move meanwhile).
    let pinned = format!("{}@{}", reference.split('@').next().unwrap_or(reference), image.digest);
    let pinned = if Reference::parse(&pinned).is_ok() { pinned } else { reference.to_string() };
    super::tar_index_mount::build_image_index(&pinned, o, temp.path(), layer_opts)?;
    let mut entries = Vec::new();
    let mut blobs = Vec::new();
    for l in image.manifest.layers() {
        let digest = l.digest().to_string();
        let stored = layer_store::load(temp.path(), &digest).ok_or_else(|| err(format!("layer {digest} was not indexed")))?;
        let mut push_file = |path: &std::path::Path, media_type: &str| -> Result<BlobRef, CliError> {
            let blob = Blob::from_file(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            rt.block_on(repo.push_blob(&blob, &UploadOptions::default())).map_err(err)?;
            blobs.push(blob.descriptor(media_type).map_err(err)?);
            Ok(BlobRef { media_type: media_type.to_string(), digest: blob.digest.clone(), size: blob.size })
        };
        let tar_index = push_file(&stored.index, TAR_INDEX_MEDIA_TYPE)?;
        let zinfo = stored.zinfo.as_deref().map(|z| push_file(z, ZINFO_MEDIA_TYPE)).transpose()?;
        entries.push(LayerIndex {
            digest: digest.clone(),
            size: l.size(),
            kind: if stored.meta.gzip { LayerKind::TarGzip } else { LayerKind::Tar },
            block_size: None,
            metadata: Vec::new(),
            files: Default::default(),
            chunk_size: None,
            chunk_sha256: Vec::new(),
            traces: BTreeMap::new(),
            tar_index: Some(tar_index),
            zinfo,
            tar_size: Some(stored.meta.tar_size),
            span_sha256: stored.meta.span_sha256.clone().unwrap_or_default(),
            diff_id: Some(stored.meta.diff_id.clone()),
        });
        tracing::info!(%digest, tar_size = stored.meta.tar_size, gzip = stored.meta.gzip, "layer indexed");
    }
    drop(temp);
    let (pushed, _) = push_doc(rt, repo, image, IndexDoc::new(entries), blobs)?;
    tracing::info!(image = %image.digest, artifact = %pushed.manifest.digest, requests = repo.requests(), "tar index pushed");
    if std::io::stderr().is_terminal() {
        eprintln!("pushed the tar index {} for {}", pushed.manifest.digest, repo.at_digest(&image.digest));
    }
    println!("{}", pushed.manifest.digest);
    Ok(())
}

/// How tar layers are indexed: the zinfo span given, else the default (4 MiB).
fn layer_options(span: Option<u64>) -> crate::build::layer::LayerOptions {
    let mut opts = crate::build::layer::LayerOptions::default();
    if let Some(n) = span {
        opts.span_size = n;
    }
    opts
}

/// `erofs-fanotify index build REF --output DIR` (ordinary images): prints the merged index's path.
pub fn build_tar_image(reference: &str, options: &[String], output: &std::path::Path, zinfo_span: Option<&str>) -> Result<(), CliError> {
    let o = push_cmd::oci_options(options)?;
    let span = super::build_cmd::parse_zinfo_span(zinfo_span)?;
    let started = std::time::Instant::now();
    let built = super::tar_index_mount::build_image_index(reference, &o, output, &layer_options(span))?;
    tracing::info!(
        layers = built.layers,
        indexed = built.indexed,
        merged_bytes = built.merged_len,
        seconds = started.elapsed().as_secs_f64(),
        "image indexed"
    );
    if std::io::stderr().is_terminal() {
        eprintln!(
            "indexed {reference}: {} layer(s) ({} new), merged metadata {} bytes; mount with -o oci.tarindex={}",
            built.layers,
            built.indexed,
            built.merged_len,
            output.display()
        );
    }
    println!("{}", built.merged.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_arguments() {
        assert_eq!(trace_arg("python=/tmp/t"), ("python".into(), PathBuf::from("/tmp/t")));
        assert_eq!(trace_arg("/tmp/t"), ("default".into(), PathBuf::from("/tmp/t")));
        assert_eq!(trace_arg("/tmp/a=b"), ("default".into(), PathBuf::from("/tmp/a=b")));
    }
}
