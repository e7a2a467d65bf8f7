//! The front end's side: is the mount's source a bucket image, and how are its objects reached?
//!
//! * A local path (`/abs/OUT.erofs`, `./OUT.erofs`): the file, pinned by its identity
//!   ([`LocalFileSpec`]); its record is read from the file.
//! * An S3 object (`s3://BUCKET/KEY`, or `BUCKET/KEY` with `s3.endpoint`): after the usual HEAD,
//!   the object's first 4 KiB (one GET) tell whether it is a bucket image: `build --s3` puts the
//!   root inode and its record there. An image whose record is not in that block is mounted as
//!   the plain image it then is.
//!
//! For a bucket image, the objects are reached at the endpoints `-o s3.endpoint=` names (all of
//! them, in order), else the ones the image records; region, URL style and signature likewise
//! (`-o` first, then the record). Credentials come from the same sources as for any S3 mount,
//! for the objects' bucket. One HEAD of the first object checks endpoint, bucket and credentials
//! now, so a refusal is one line at mount time; the credentials reach the agent inside the spec,
//! on its stdin.

use std::path::Path;

use crate::agent::sources::SourceSpec;
use crate::http::ClientConfig as HttpConfig;
use crate::remote::local::{LocalFileSource, LocalFileSpec};
use crate::remote::s3::{AwsEnvironment, BucketAccess, S3ObjectSpec, S3Options};
use crate::remote::{RangeSource, PROBE_LEN};

use super::read::{self, ImageBytes};
use super::record::{Locator, Table};
use super::{BucketImageSpec, BucketObjectsSpec};

/// A source naming a local file: an absolute path, or one starting with `./` or `../` (image
/// references and `BUCKET/KEY` never do).
pub fn is_local_path(source: &str) -> bool {
    source.starts_with('/') || source.starts_with("./") || source.starts_with("../")
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// A local image file: a plain file source, or a bucket image.
pub fn resolve_local(source: &str, s3: &S3Options, env: &AwsEnvironment) -> Result<SourceSpec, String> {
    let file = LocalFileSpec::of(Path::new(source)).map_err(|e| format!("image file {e}"))?;
    let shown = file.describe();
    runtime()?.block_on(async {
        let src = LocalFileSource::open(&file)?;
        let probe = src.fetch(0..PROBE_LEN.min(src.size())).await.map_err(|e| format!("cannot read {shown}: {e}"))?;
        let img = ImageBytes { source: &src, probe: &probe, probe_only: false };
        let (sb, locator) = read::locate(&img).await.map_err(|e| format!("{shown} is not a mountable EROFS image: {e}"))?;
        let image = SourceSpec::File(Box::new(file.clone()));
        let Some(locator) = locator else {
            if s3.is_set() {
                return Err(format!("s3.* options apply to S3 sources and bucket images; {shown} is a plain EROFS image"));
            }
            return Ok(image);
        };
        let table = read::read_table(&img, &sb, &locator).await.map_err(|e| format!("{shown}: {e}"))?;
        bucket_spec(image, &locator, &table, s3, env).await
    })
}

/// An S3 object already resolved (HEAD): a bucket image when its first block carries the record.
pub fn detect_in_s3(spec: S3ObjectSpec, s3: &S3Options, env: &AwsEnvironment) -> Result<SourceSpec, String> {
    let shown = spec.describe();
    runtime()?.block_on(async {
        let (src, probe) = crate::remote::s3::open_object(&spec, &HttpConfig::default()).await.map_err(|e| e.to_string())?;
        let quick = ImageBytes { source: src.as_ref(), probe: &probe, probe_only: true };
        let (sb, locator) = match read::locate(&quick).await {
            Ok((sb, Some(l))) => (sb, l),
            // Not ours (or not EROFS at all: the agent says so in its own words).
            Ok((_, None)) | Err(_) => return Ok(SourceSpec::S3(Box::new(spec))),
        };
        let img = ImageBytes { source: src.as_ref(), probe: &probe, probe_only: false };
        let table = read::read_table(&img, &sb, &locator).await.map_err(|e| format!("{shown}: {e}"))?;
        bucket_spec(SourceSpec::S3(Box::new(spec)), &locator, &table, s3, env).await
    })
}

/// The objects' access: `-o` first, then what the image records.
pub fn objects_options(table: &Table, s3: &S3Options) -> S3Options {
    let h = &table.header;
    S3Options {
        endpoints: if s3.endpoints.is_empty() { h.endpoints.clone() } else { s3.endpoints.clone() },
        region: s3.region.clone().or_else(|| Some(h.region.clone())),
        url_style: s3.url_style.or(h.url_style),
        sig: s3.sig.or(Some(h.sig)),
        passwd_file: s3.passwd_file.clone(),
        profile: s3.profile.clone(),
    }
}

async fn bucket_spec(image: SourceSpec, locator: &Locator, table: &Table, s3: &S3Options, env: &AwsEnvironment) -> Result<SourceSpec, String> {
    let h = &table.header;
    let access = BucketAccess::new(&h.bucket, &objects_options(table, s3), env).map_err(|e| e.to_string())?;
    if let Some(first) = table.entries.first() {
        let info = access.client.head_object(&first.key).await.map_err(|e| e.to_string())?;
        if info.etag != first.etag || info.size != first.size {
            eprintln!(
                "erofs-mount: warning: s3://{}/{} changed since the image was built (ETag {} then, {} now): reading its file gives EIO",
                h.bucket, first.key, first.etag, info.etag
            );
        }
    }
    Ok(SourceSpec::BucketImage(Box::new(BucketImageSpec {
        image: Box::new(image),
        table_sha256: hex::encode(locator.table_sha256),
        objects: BucketObjectsSpec {
            bucket: h.bucket.clone(),
            prefix: h.prefix.clone(),
            endpoints: access.endpoints,
            region: access.region,
            url_style: access.url_style,
            sig: access.sig,
            credentials: access.credentials,
            credential_origin: access.origin,
        },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::record::BucketHeader;
    use crate::remote::s3::{SigVersion, UrlStyle};

    #[test]
    fn local_paths_are_told_from_references_and_bucket_keys() {
        for local in ["/abs/x.erofs", "./x.erofs", "../x.erofs"] {
            assert!(is_local_path(local), "{local}");
        }
        for other in ["docker.io/library/x:1", "bucket/key.erofs", "x.erofs", "s3://b/k", "http://h/x"] {
            assert!(!is_local_path(other), "{other}");
        }
    }

    #[test]
    fn mount_options_come_before_the_record() {
        let table = Table {
            header: BucketHeader {
                bucket: "bkt".into(),
                prefix: String::new(),
                endpoints: vec!["http://a:1".into(), "http://b:2".into()],
                region: "eu-west-1".into(),
                url_style: Some(UrlStyle::Path),
                sig: SigVersion::V2,
            },
            entries: vec![],
        };
        let recorded = objects_options(&table, &S3Options::default());
        assert_eq!(recorded.endpoints, table.header.endpoints);
        assert_eq!(recorded.region.as_deref(), Some("eu-west-1"));
        assert_eq!(recorded.url_style, Some(UrlStyle::Path));
        assert_eq!(recorded.sig, Some(SigVersion::V2));
        let given = S3Options {
            endpoints: vec!["http://c:3".into()],
            region: Some("us-east-2".into()),
            sig: Some(SigVersion::V4),
            ..Default::default()
        };
        let o = objects_options(&table, &given);
        assert_eq!(o.endpoints, vec!["http://c:3".to_string()]);
        assert_eq!(o.region.as_deref(), Some("us-east-2"));
        assert_eq!(o.url_style, Some(UrlStyle::Path), "not given: recorded");
        assert_eq!(o.sig, Some(SigVersion::V4));
    }
}
