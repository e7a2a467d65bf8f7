//! `erofs-fanotify build --s3 ENDPOINT BUCKET[/PREFIX] OUT.erofs [-o s3.*]`: an image of a bucket
//! (see `crate::bucket`). The listing is ListObjectsV2 with continuation tokens, ListObjects v1
//! with markers for stores that refuse v2; credentials and options are those of S3 mounts
//! (`-o s3.region=R,s3.urlstyle=path,s3.passwd_file=F,s3.profile=P,s3.sig=2|4`, more
//! `s3.endpoint=` for mirrors after ENDPOINT). No object's bytes are read.
//!
//! The image is written to a temp file beside OUT and renamed into place on success; on any
//! failure nothing is left behind.

use std::path::PathBuf;
use std::time::Instant;

use crate::bucket::build::{skipped_line, write_bucket_image, BuildOptions};
use crate::bucket::keys::plan_tree;
use crate::bucket::record::{self, BucketHeader};
use crate::remote::s3::{AwsEnvironment, BucketAccess, ListQuery, ListVersion, Listing, S3Client, S3Error, S3Options};

use super::CliError;

pub struct BucketBuildArgs {
    pub endpoint: String,
    /// `BUCKET[/PREFIX]` (or `s3://BUCKET[/PREFIX]`).
    pub source: String,
    pub out: PathBuf,
    /// `-o` values: comma-separated `s3.*` options.
    pub options: Vec<String>,
    /// A UUID derived from the content (the same listing gives the same bytes).
    pub reproducible: bool,
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string())
}

/// `BUCKET[/PREFIX]` to the bucket and the prefix as a directory (empty, or ending in `/`).
pub fn split_source(source: &str) -> Result<(String, String), String> {
    let rest = source.strip_prefix("s3://").unwrap_or(source);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    crate::remote::s3::location::check_bucket(bucket)?;
    let mut prefix = prefix.to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    if prefix.len() > crate::remote::s3::location::MAX_KEY_LEN {
        return Err("the prefix is longer than a key may be".into());
    }
    Ok((bucket.to_string(), prefix))
}

/// ENDPOINT first, then the `-o s3.*` options.
pub fn parse_options(endpoint: &str, options: &[String]) -> Result<S3Options, String> {
    let mut opts = S3Options::default();
    opts.set("s3.endpoint", Some(endpoint)).map_err(|e| e.to_string())?;
    for item in options.iter().flat_map(|o| o.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if !key.starts_with("s3.") {
            return Err(format!("build --s3 takes only s3.* options, not {key:?}"));
        }
        opts.set(key, value).map_err(|e| e.to_string())?;
    }
    Ok(opts)
}

/// The whole listing: v2, or v1 when the store refuses v2 (an HTTP error or an answer that is
/// no listing; refused credentials and a missing bucket are not retried).
async fn list(client: &S3Client, prefix: &str) -> Result<Listing, S3Error> {
    let query = ListQuery { prefix: prefix.to_string(), delimiter: None, page_size: None };
    let max = 2 * record::MAX_OBJECTS;
    match client.list_all(ListVersion::V2, &query, max).await {
        Err(e @ (S3Error::Status { .. } | S3Error::Protocol { .. })) if !e.to_string().contains("more than") => {
            eprintln!("erofs-fanotify: ListObjectsV2 failed ({e}); listing with v1 markers");
            client.list_all(ListVersion::V1, &query, max).await
        }
        other => other,
    }
}

/// `"etag"`: listings and GETs of some stores differ in the quotes only.
fn quoted(etag: &str) -> String {
    let t = etag.trim();
    if t.starts_with('"') || t.starts_with("W/") {
        t.to_string()
    } else {
        format!("\"{t}\"")
    }
}

pub fn run(args: BucketBuildArgs) -> Result<(), CliError> {
    let started = Instant::now();
    let (bucket, prefix) = split_source(&args.source).map_err(|e| err(format!("build --s3: {e}")))?;
    let opts = parse_options(&args.endpoint, &args.options).map_err(err)?;
    let access = BucketAccess::new(&bucket, &opts, &AwsEnvironment::from_env()).map_err(err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the async runtime: {e}")))?;
    let mut listing = runtime.block_on(list(&access.client, &prefix)).map_err(err)?;
    for o in listing.objects.iter_mut().filter(|o| o.size > 0) {
        o.etag = match o.etag.as_deref().filter(|e| !e.trim().is_empty()) {
            Some(e) => Some(quoted(e)),
            // A store that lists no ETag: ask for it (the mount reads with If-Match).
            None => Some(runtime.block_on(access.client.head_object(&o.key)).map_err(err)?.etag),
        };
    }
    let planned = plan_tree(&prefix, &listing.objects);
    for s in &planned.skipped {
        eprintln!("erofs-fanotify: warning: {}", skipped_line(s));
    }
    let header = BucketHeader {
        bucket: bucket.clone(),
        prefix: prefix.clone(),
        endpoints: access.endpoints.clone(),
        region: access.region.clone(),
        url_style: access.url_style,
        sig: access.sig,
    };

    let out_dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_name = args.out.file_name().ok_or_else(|| err(format!("{} is not a file name", args.out.display())))?.to_string_lossy().into_owned();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{out_name}."))
        .suffix(".tmp")
        .tempfile_in(&out_dir)
        .map_err(|e| err(format!("cannot create a file in {}: {e}", out_dir.display())))?;
    let uuid = if args.reproducible { None } else { Some(super::build_cmd::random_uuid()?) };
    let report = write_bucket_image(tmp.as_file_mut(), &header, &listing.objects, &planned, &BuildOptions { uuid })
        .map_err(|e| err(format!("{}: {e}", args.out.display())))?;
    tmp.as_file().sync_all().map_err(|e| err(format!("cannot write {}: {e}", args.out.display())))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    tmp.persist(&args.out).map_err(|e| err(format!("cannot rename the image to {}: {}", args.out.display(), e.error)))?;
    tracing::info!("bucket image: {report:?}");
    println!(
        "{}: {} files in {} directories from {} ({} objects, {} bytes referenced); image {} bytes (metadata {}, object table {}); address space {} bytes; {} keys skipped; {} listing pages, {} requests; {:.2} s",
        args.out.display(),
        report.files,
        report.directories,
        header.describe(),
        report.objects,
        report.object_bytes,
        report.image_bytes,
        report.metadata_bytes,
        report.table_bytes,
        report.address_space,
        planned.skipped.len(),
        listing.pages,
        access.client.requests(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_split_into_bucket_and_directory_prefix() {
        assert_eq!(split_source("bkt").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(split_source("bkt/").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(split_source("bkt/a/b").unwrap(), ("bkt".into(), "a/b/".into()));
        assert_eq!(split_source("s3://bkt/a/").unwrap(), ("bkt".into(), "a/".into()));
        assert!(split_source("x").is_err());
    }

    #[test]
    fn options_are_the_s3_ones() {
        let o = parse_options("http://127.0.0.1:1", &["s3.region=eu-west-1,s3.urlstyle=path".into(), "s3.endpoint=http://m:2".into()]).unwrap();
        assert_eq!(o.endpoints, vec!["http://127.0.0.1:1".to_string(), "http://m:2".into()]);
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert!(parse_options("http://h", &["cache_dir=/x".into()]).is_err());
        assert!(parse_options("ftp://h", &[]).is_err());
    }

    #[test]
    fn etags_are_quoted() {
        assert_eq!(quoted("abc"), "\"abc\"");
        assert_eq!(quoted("\"abc\""), "\"abc\"");
        assert_eq!(quoted("W/\"x\""), "W/\"x\"");
    }
}
