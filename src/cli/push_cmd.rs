//! `erofs-fanotify push OUT.erofs REF [--platform P] [-o oci.*]`: uploads an
//! EROFS image as a one-layer OCI image — the blob (monolithic, or chunked
//! above the chunk size), a minimal OCI config (platform, `rootfs.diff_ids` =
//! the blob's digest, nothing dated: the same image gives the same config) and
//! an OCI manifest whose layer is `application/vnd.erofs` — by tag (`REF:tag`,
//! `latest` when none) or by digest (`REF@sha256:...`, which must be the
//! manifest's). Prints the manifest digest. Credentials, CA file and
//! `oci.insecure` work as for mounting.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use crate::oci::auth::Access;
use crate::oci::manifest::{self, Platform};
use crate::oci::push::{self, Blob, Repository, UploadKind, UploadOptions};
use crate::oci::{OciError, OciOptions, Reference};

use super::CliError;

pub struct PushArgs {
    pub image: PathBuf,
    pub reference: String,
    /// `OS/ARCH[/VARIANT]` for the config (default: this machine's).
    pub platform: Option<String>,
    /// `-o` lists of `oci.*` options.
    pub options: Vec<String>,
    /// Monolithic up to this size, chunked above (e.g. `64M`).
    pub chunk_size: Option<String>,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

/// The `oci.*` options of `-o` lists (anything else is refused: these are
/// not mounts).
pub(crate) fn oci_options(lists: &[String]) -> Result<OciOptions, CliError> {
    let joined = lists.join(",");
    for item in joined.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let key = item.split_once('=').map_or(item, |(k, _)| k);
        if !key.starts_with("oci.") {
            return Err(err(format!("option {key:?} does not apply here (only oci.* options do)")));
        }
        if matches!(key, "oci.blob" | "oci.layer") {
            return Err(err(format!("option {key} does not apply here")));
        }
    }
    let parsed = crate::mount::options::MountOptions::parse(&joined).map_err(err)?;
    Ok(parsed.oci)
}

pub(crate) fn chunk_size(text: Option<&str>) -> Result<u64, CliError> {
    match text {
        None => Ok(push::DEFAULT_CHUNK_SIZE),
        Some(t) => crate::mount::options::parse_size(t)
            .filter(|&n| n >= 4096)
            .ok_or_else(|| err(format!("bad chunk size {t:?} (a size like 64M, at least 4K)"))),
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the async runtime: {e}")))
}

pub(crate) fn platform(text: Option<&str>, o: &OciOptions) -> Result<Platform, CliError> {
    match text.or(o.platform.as_deref()) {
        Some(p) => manifest::parse_platform(p).map_err(err),
        None => Ok(manifest::host_platform()),
    }
}

/// Refuses a file that is not an EROFS image before anything is sent.
fn check_erofs(path: &Path) -> Result<(), CliError> {
    let mut first = vec![0u8; 4096];
    let mut f = std::fs::File::open(path).map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    let mut n = 0;
    while n < first.len() {
        match f.read(&mut first[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
        }
    }
    crate::erofs::probe_superblock(&first[..n]).map_err(|e| err(format!("{} is not an EROFS image ({e})", path.display())))?;
    Ok(())
}

/// What a push of one image did.
pub struct PushedImage {
    pub manifest_digest: String,
    pub layer: push::PushedBlob,
    pub requests: u64,
}

/// Pushes the layer `blob`, a config made by [`push::erofs_config`] and the
/// manifest to `reference` on `repo`. A digest in `reference` is checked
/// against the manifest before anything is sent.
pub(crate) async fn push_erofs_image(
    repo: &Repository,
    reference: &Reference,
    blob: &Blob,
    platform: &Platform,
    upload: &UploadOptions,
) -> Result<PushedImage, OciError> {
    let config = Blob::from_bytes(push::erofs_config(platform, std::slice::from_ref(&blob.digest))?);
    let m = push::erofs_image_manifest((&config.digest, config.size), &[(blob.digest.clone(), blob.size)])?;
    let bytes = push::to_json(&m)?;
    let digest = push::sha256_digest(&bytes);
    if let Some(want) = reference.digest.as_ref().filter(|w| **w != digest) {
        return Err(OciError::Config(format!("{reference} names digest {want}, but the manifest is {digest}")));
    }
    let layer = repo.push_blob(blob, upload).await?;
    repo.push_blob(&config, upload).await?;
    let manifest_digest = repo.put_manifest_at(reference, manifest::OCI_MANIFEST, &bytes).await?;
    Ok(PushedImage { manifest_digest, layer, requests: repo.requests() })
}

pub fn run(args: PushArgs) -> Result<(), CliError> {
    let o = oci_options(&args.options)?;
    let platform = platform(args.platform.as_deref(), &o)?;
    let chunk = chunk_size(args.chunk_size.as_deref())?;
    let reference = Reference::parse(&args.reference).map_err(err)?;
    check_erofs(&args.image)?;
    let blob = Blob::from_file(&args.image).map_err(|e| err(format!("cannot read {}: {e}", args.image.display())))?;
    let rt = runtime()?;
    let repo = Repository::connect(&reference, &o, Access { push: true, mount_from: vec![] }).map_err(err)?;
    let upload = UploadOptions { chunk_size: chunk, mount_from: None };
    let pushed = rt.block_on(push_erofs_image(&repo, &reference, &blob, &platform, &upload)).map_err(err)?;
    let how = match pushed.layer.kind {
        UploadKind::Existed => "already there".to_string(),
        UploadKind::Mounted => "mounted".to_string(),
        UploadKind::Monolithic => "uploaded in one request".to_string(),
        UploadKind::Chunked { chunks } => format!("uploaded in {chunks} chunks"),
    };
    tracing::info!(reference = %reference, digest = %pushed.manifest_digest, layer = %blob.digest, how, requests = pushed.requests, "pushed");
    if std::io::stderr().is_terminal() {
        eprintln!("pushed {} ({} bytes, {how}; {} requests)", repo.at_digest(&pushed.manifest_digest), blob.size, pushed.requests);
    }
    println!("{}", pushed.manifest_digest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_oci_options_apply() {
        let o = oci_options(&["oci.insecure,oci.username=u".into(), "oci.password=p".into()]).unwrap();
        assert!(o.insecure);
        assert_eq!((o.username.as_deref(), o.password.as_deref()), (Some("u"), Some("p")));
        assert!(oci_options(&["cache_dir=/x".into()]).unwrap_err().0.contains("only oci.*"));
        assert!(oci_options(&["oci.layer=1".into()]).is_err());
        assert!(oci_options(&["oci.bogus".into()]).is_err());
        assert_eq!(chunk_size(Some("1M")).unwrap(), 1 << 20);
        assert!(chunk_size(Some("12")).is_err());
        assert_eq!(platform(None, &OciOptions { platform: Some("linux/arm64".into()), ..OciOptions::default() }).unwrap().architecture().to_string(), "arm64");
    }
}
