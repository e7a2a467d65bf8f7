//! Where an object lives: `s3://BUCKET/KEY` or erofs-utils' `BUCKET/KEY`, endpoints, and the
//! request URLs (path or virtual-host style, keys percent-encoded the way S3 signs them). Pure.

use reqwest::Url;

use serde::{Deserialize, Serialize};

/// How a bucket is named in a request URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UrlStyle {
    /// `https://ENDPOINT/BUCKET/KEY`
    Path,
    /// `https://BUCKET.ENDPOINT/KEY`
    VirtualHost,
}


/// S3 keys are at most 1024 bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectLocation {
    pub bucket: String,
    pub key: String,
}

impl ObjectLocation {
    /// `s3://BUCKET/KEY` (the key taken verbatim: no percent-decoding, as the AWS CLI does).
    pub fn parse_s3_url(text: &str) -> Result<ObjectLocation, String> {
        let rest = text
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{text:?} is not an s3://BUCKET/KEY URL"))?;
        Self::parse_bucket_key(rest).map_err(|e| format!("{text:?}: {e}"))
    }

    /// `BUCKET/KEY`, the source of erofs-utils' `-o s3.endpoint=...` form.
    pub fn parse_bucket_key(text: &str) -> Result<ObjectLocation, String> {
        let (bucket, key) = text.split_once('/').ok_or("expected BUCKET/KEY (the object's key is missing)")?;
        check_bucket(bucket)?;
        check_key(key)?;
        Ok(ObjectLocation { bucket: bucket.to_string(), key: key.to_string() })
    }

    /// `s3://BUCKET/KEY`, for logs, records and status.
    pub fn display(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// S3's bucket rules, loosened for older stores (uppercase and `_` allowed): 3-255 of `[A-Za-z0-9._-]`.
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok = (3..=255).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !bucket.starts_with(['.', '-'])
        && !bucket.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!("{bucket:?} is not a bucket name"))
    }
}

pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the object's key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("the object's key is longer than {MAX_KEY_LEN} bytes"));
    }
    if key.chars().any(|c| c == '\0') {
        return Err("the object's key contains a NUL byte".into());
    }
    Ok(())
}

/// An `s3.endpoint` value as a base URL: `https://` is assumed without a scheme (as erofs-utils does);
/// no user info (credentials go in the AWS files or `s3.passwd_file`), no query.
pub fn parse_endpoint(text: &str) -> Result<Url, String> {
    let with_scheme = if text.contains("://") { text.to_string() } else { format!("https://{text}") };
    let mut url = Url::parse(&with_scheme).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the endpoint URL (use the AWS files or s3.passwd_file)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the endpoint URL takes no query".into());
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// AWS's regional endpoint.
pub fn aws_endpoint(region: &str) -> String {
    format!("https://s3.{region}.amazonaws.com")
}

/// Virtual-host style needs the bucket as a DNS label of the endpoint's host: not for IP addresses
/// or `localhost`, nor for bucket names that are no DNS name (or, over https, contain a dot, which
/// the store's wildcard certificate does not cover).
pub fn effective_url_style(asked: Option<UrlStyle>, endpoint: &Url, bucket: &str) -> UrlStyle {
    if let Some(style) = asked {
        return style;
    }
    let host_is_name = matches!(endpoint.host(), Some(url::Host::Domain(d)) if d != "localhost");
    let dns_bucket = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !(endpoint.scheme() == "https" && bucket.contains('.'));
    if host_is_name && dns_bucket {
        UrlStyle::VirtualHost
    } else {
        UrlStyle::Path
    }
}

/// S3's UriEncode: every byte but `A-Za-z0-9-._~` (and `/` when `keep_slash`) as `%XX`.
pub fn uri_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decoding for keys a listing returns with `encoding-type=url` (`+` stays `+`: S3 encodes
/// spaces as `%20`). Invalid UTF-8 after decoding is an error.
pub fn uri_decode(text: &str) -> Result<String, String> {
    let bytes = percent_encoding::percent_decode_str(text).collect::<Vec<u8>>();
    String::from_utf8(bytes).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

/// The URL of `key` in `bucket` (or of the bucket itself, `key` empty), query pairs already
/// unencoded. Also returns SigV2's canonical resource path (`/BUCKET/KEY`).
pub fn request_url(
    endpoint: &Url,
    style: UrlStyle,
    bucket: &str,
    key: &str,
    query: &[(&str, &str)],
) -> Result<(Url, String), String> {
    let encoded_key = uri_encode(key, true);
    let mut url = endpoint.clone();
    let base = endpoint.path(); // ends with '/'
    match style {
        UrlStyle::Path => url.set_path(&format!("{base}{bucket}/{encoded_key}")),
        UrlStyle::VirtualHost => {
            let host = endpoint.host_str().ok_or("the endpoint has no host")?;
            url.set_host(Some(&format!("{bucket}.{host}"))).map_err(|e| format!("bad host for bucket {bucket}: {e}"))?;
            url.set_path(&format!("{base}{encoded_key}"));
        }
    }
    // URLs resolve `.` and `..` segments (also as `%2E`), so such a key cannot be named in one.
    if !url.path().ends_with(&encoded_key) || (style == UrlStyle::Path && !url.path().ends_with(&format!("{bucket}/{encoded_key}"))) {
        return Err(format!("the key {key:?} has a \".\" or \"..\" path segment, which an HTTP request URL cannot carry"));
    }
    if !query.is_empty() {
        let q: Vec<String> = query.iter().map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false))).collect();
        url.set_query(Some(&q.join("&")));
    }
    Ok((url, format!("/{bucket}/{encoded_key}")))
}

/// Credential-free text naming an endpoint (scheme, host, port, path).
pub fn shown(endpoint: &Url) -> String {
    let s = endpoint.as_str();
    s.strip_suffix('/').unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        let l = ObjectLocation::parse_s3_url("s3://my-bucket/images/a b%.erofs").unwrap();
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.key, "images/a b%.erofs");
        assert_eq!(l.display(), "s3://my-bucket/images/a b%.erofs");
        let l = ObjectLocation::parse_bucket_key("bkt/k/ü").unwrap();
        assert_eq!((l.bucket.as_str(), l.key.as_str()), ("bkt", "k/ü"));
        for bad in ["s3://bucket", "s3://bucket/", "s3://b/x", "s3://../x", "s3://bu cket/x", "http://b/x"] {
            assert!(ObjectLocation::parse_s3_url(bad).is_err(), "{bad}");
        }
        assert!(ObjectLocation::parse_bucket_key(&format!("bkt/{}", "k".repeat(1025))).is_err());
    }

    #[test]
    fn endpoints_normalise() {
        assert_eq!(parse_endpoint("s3.example.com").unwrap().as_str(), "https://s3.example.com/");
        assert_eq!(parse_endpoint("http://127.0.0.1:9000").unwrap().as_str(), "http://127.0.0.1:9000/");
        assert_eq!(parse_endpoint("http://h/prefix").unwrap().as_str(), "http://h/prefix/");
        assert!(parse_endpoint("http://h/?x=1").is_err());
        assert!(parse_endpoint("http://user:pw@h/").is_err());
        assert!(parse_endpoint("file:///x").is_err());
        assert_eq!(aws_endpoint("eu-west-1"), "https://s3.eu-west-1.amazonaws.com");
    }

    #[test]
    fn url_styles() {
        let aws = parse_endpoint("https://s3.eu-west-1.amazonaws.com").unwrap();
        let local = parse_endpoint("http://127.0.0.1:9000").unwrap();
        let lh = parse_endpoint("http://localhost:9000").unwrap();
        assert_eq!(effective_url_style(None, &aws, "bkt"), UrlStyle::VirtualHost);
        assert_eq!(effective_url_style(None, &aws, "a.b"), UrlStyle::Path);
        assert_eq!(effective_url_style(None, &aws, "Upper"), UrlStyle::Path);
        assert_eq!(effective_url_style(None, &local, "bkt"), UrlStyle::Path);
        assert_eq!(effective_url_style(None, &lh, "bkt"), UrlStyle::Path);
        assert_eq!(effective_url_style(Some(UrlStyle::VirtualHost), &local, "bkt"), UrlStyle::VirtualHost);

        let (u, res) = request_url(&aws, UrlStyle::VirtualHost, "bkt", "dir/a b+c%.txt", &[]).unwrap();
        assert_eq!(u.as_str(), "https://bkt.s3.eu-west-1.amazonaws.com/dir/a%20b%2Bc%25.txt");
        assert_eq!(res, "/bkt/dir/a%20b%2Bc%25.txt");
        let (u, _) = request_url(&local, UrlStyle::Path, "bkt", "ü/x", &[("versionId", "a+b/c")]).unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:9000/bkt/%C3%BC/x?versionId=a%2Bb%2Fc");
        for dotted in ["../x", "a/./b", "a/..", "."] {
            assert!(request_url(&local, UrlStyle::Path, "bkt", dotted, &[]).unwrap_err().contains("path segment"), "{dotted}");
            assert!(request_url(&aws, UrlStyle::VirtualHost, "bkt", dotted, &[]).is_err(), "{dotted}");
        }
        let (u, _) = request_url(&local, UrlStyle::Path, "bkt", "a//b/..c/.d", &[]).unwrap();
        assert_eq!(u.path(), "/bkt/a//b/..c/.d");
        let prefixed = parse_endpoint("http://h:1/s3").unwrap();
        let (u, _) = request_url(&prefixed, UrlStyle::Path, "bkt", "", &[("list-type", "2")]).unwrap();
        assert_eq!(u.as_str(), "http://h:1/s3/bkt/?list-type=2");
    }

    #[test]
    fn encoding_round_trips() {
        assert_eq!(uri_encode("a b/c~_.-!*'()", true), "a%20b/c~_.-%21%2A%27%28%29");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(uri_decode("a%20b%2B+%C3%BC").unwrap(), "a b++ü");
        assert!(uri_decode("%FF").is_err());
    }
}
