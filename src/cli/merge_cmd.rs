//! `erofs-fanotify merge REF --output FILE [-o OPTIONS]`: writes the merged
//! metadata image a mount of the multi-layer image REF would use (DESIGN §7,
//! "merged layers"), for inspection. The file is the first segment of the
//! mount's address space: its files point at flat blocks of the layers'
//! blobs placed after it, so it is read with `dump.erofs`-style tools for
//! its tree, not mounted on its own.

use std::io::Write;
use std::path::PathBuf;

use crate::agent::sources::{LayersSpec, SourceSpec};
use crate::http::ClientConfig;
use crate::mount::options::MountOptions;
use crate::remote::RetryPolicy;

use super::CliError;

pub struct MergeArgs {
    pub reference: String,
    pub output: PathBuf,
    /// Mount options (`oci.*`, `fetch_unit=`), comma-separated.
    pub options: Vec<String>,
}

pub fn run(args: MergeArgs) -> Result<(), CliError> {
    let opts = MountOptions::parse(&args.options.join(",")).map_err(|e| CliError::new(e.to_string()))?;
    let layers = match crate::oci::resolve_image(&args.reference, &opts.oci).map_err(|e| CliError::new(e.to_string()))? {
        crate::oci::ResolvedImage::Blob(b) => {
            return Err(CliError::new(format!("{} is one layer ({}): nothing to merge", args.reference, b.digest)))
        }
        crate::oci::ResolvedImage::Layers(layers) => layers,
    };
    let spec = LayersSpec {
        name: layers.first().map(|l| l.reference.clone()).unwrap_or_else(|| args.reference.clone()),
        layers: layers.into_iter().map(|l| SourceSpec::Oci(Box::new(l))).collect(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::new(format!("cannot start the async runtime: {e}")))?;
    let opened = rt
        .block_on(crate::agent::merge::open_layers(&spec, &ClientConfig::default(), &RetryPolicy::default(), opts.fetch_unit, None, None))
        .map_err(|e| CliError::new(e.to_string()))?;
    let (Some(image), Some(stats)) = (opened.head.filter(|_| opened.merged_len.is_some()), opened.stats) else {
        return Err(CliError::new(format!(
            "{} is one filesystem of several blobs (flatdev): it mounts as it is, nothing to merge",
            args.reference
        )));
    };
    let dir = args.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| CliError::new(format!("cannot create a file in {}: {e}", dir.display())))?;
    tmp.write_all(&image)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| CliError::new(format!("cannot write {}: {e}", args.output.display())))?;
    tmp.persist(&args.output).map_err(|e| CliError::new(format!("cannot write {}: {}", args.output.display(), e.error)))?;
    println!(
        "{}: {} layers merged into {} bytes of metadata ({} entries, {} whiteouts, {} opaque directories, {} replaced, {} lz4 files); the address space is {} bytes; metadata walk: {} requests",
        args.output.display(),
        stats.layers,
        image.len(),
        stats.entries,
        stats.whiteouts,
        stats.opaque_dirs,
        stats.replaced,
        stats.compressed_files,
        opened.layout.size(),
        opened.walk_requests
    );
    for s in opened.layout.segments() {
        println!("  {:>12} +{:<12} {}", s.start, s.len, s.label);
    }
    Ok(())
}
