//! Request signatures. SigV4 in the `Authorization` header with `x-amz-content-sha256:
//! UNSIGNED-PAYLOAD`, by AWS's own `aws-sigv4` (S3 settings: keys encoded once, paths not
//! normalised); SigV2 (HMAC-SHA1 over S3's string to sign) for old stores. Session tokens go in
//! `x-amz-security-token` (signed in both). Pure given the time: tested on AWS's published examples.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};

use super::credentials::S3Credentials;

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the S3 request: {0}")]
pub struct SignError(String);

/// The headers SigV4 adds (`x-amz-date`, `x-amz-content-sha256`, `x-amz-security-token`,
/// `authorization`) for a request whose other signed headers are `headers` (lowercase names).
/// S3 reads are signed with `SignableBody::UnsignedPayload`.
pub fn sign_v4(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    creds: &S3Credentials,
    region: &str,
    time: SystemTime,
    body: SignableBody<'_>,
) -> Result<Vec<(String, String)>, SignError> {
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        creds.secret_access_key.clone(),
        creds.session_token.clone(),
        None,
        "erofs-fanotify",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError(e.to_string()))?
        .into();
    let request = SignableRequest::new(method, url, headers.iter().copied(), body).map_err(|e| SignError(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params).map_err(|e| SignError(e.to_string()))?.into_parts();
    Ok(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// The headers SigV2 adds (`date`, `x-amz-security-token`, `authorization`). `resource` is the
/// canonical resource, `/BUCKET/KEY` as encoded on the wire (`/BUCKET/` for a listing).
pub fn sign_v2(
    method: &str,
    resource: &str,
    headers: &[(&str, &str)],
    creds: &S3Credentials,
    time: SystemTime,
) -> Vec<(String, String)> {
    let date = aws_smithy_types::DateTime::from(time)
        .fmt(aws_smithy_types::date_time::Format::HttpDate)
        .unwrap_or_default();
    let mut amz: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-amz-"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Some(token) = &creds.session_token {
        amz.push(("x-amz-security-token".into(), token.clone()));
    }
    amz.sort();
    let to_sign = string_to_sign_v2(method, "", "", &date, &amz, resource);
    let signature = hmac_sha1_base64(&creds.secret_access_key, &to_sign);
    let mut out = vec![("date".to_string(), date)];
    if let Some(token) = &creds.session_token {
        out.push(("x-amz-security-token".into(), token.clone()));
    }
    out.push(("authorization".into(), format!("AWS {}:{signature}", creds.access_key_id)));
    out
}

/// S3's SigV2 StringToSign; `amz_headers` lowercase, sorted, one value each.
pub fn string_to_sign_v2(
    method: &str,
    content_md5: &str,
    content_type: &str,
    date: &str,
    amz_headers: &[(String, String)],
    resource: &str,
) -> String {
    let mut s = format!("{method}\n{content_md5}\n{content_type}\n{date}\n");
    for (k, v) in amz_headers {
        s.push_str(&format!("{k}:{v}\n"));
    }
    s.push_str(resource);
    s
}

fn hmac_sha1_base64(key: &str, data: &str) -> String {
    let mut mac = match <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm cannot be reached.
        Err(_) => return String::new(),
    };
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// The key pair of AWS's S3 signing examples.
    fn example() -> S3Credentials {
        S3Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name} in {h:?}"))
    }

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// 2013-05-24T00:00:00Z, the examples' date.
    fn example_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_369_353_600)
    }

    #[test]
    fn sigv4_matches_the_s3_get_object_example() {
        // "Example: GET Object" of the S3 API reference (sig-v4-header-based-auth).
        let h = sign_v4(
            "GET",
            "https://examplebucket.s3.amazonaws.com/test.txt",
            &[("range", "bytes=0-9")],
            &example(),
            "us-east-1",
            example_time(),
            SignableBody::Precomputed(EMPTY_SHA256.into()),
        )
        .unwrap();
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        assert_eq!(header(&h, "x-amz-date"), "20130524T000000Z");
        assert_eq!(header(&h, "x-amz-content-sha256"), EMPTY_SHA256);
    }

    #[test]
    fn sigv4_matches_the_s3_list_objects_example() {
        // "Example: GET Bucket (List Objects)": a query string, sorted and encoded.
        let h = sign_v4(
            "GET",
            "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J",
            &[],
            &example(),
            "us-east-1",
            example_time(),
            SignableBody::Precomputed(EMPTY_SHA256.into()),
        )
        .unwrap();
        assert!(
            header(&h, "authorization").ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
            "{h:?}"
        );
    }

    #[test]
    fn sigv4_unsigned_payload_and_session_token() {
        let mut creds = example();
        creds.session_token = Some("TOKEN/+=".into());
        let h = sign_v4("GET", "http://127.0.0.1:9000/bkt/a%20b", &[], &creds, "us-east-1", example_time(), SignableBody::UnsignedPayload).unwrap();
        assert_eq!(header(&h, "x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
        assert_eq!(header(&h, "x-amz-security-token"), "TOKEN/+=");
        assert!(header(&h, "authorization").contains("x-amz-security-token"), "{h:?}");
    }

    #[test]
    fn sigv2_matches_the_s3_example() {
        // "Authenticating Requests (AWS Signature Version 2)", Example Object GET.
        let to_sign = string_to_sign_v2("GET", "", "", "Tue, 27 Mar 2007 19:36:42 +0000", &[], "/awsexamplebucket1/photos/puppy.jpg");
        assert_eq!(hmac_sha1_base64(&example().secret_access_key, &to_sign), "qgk2+6Sv9/oM7G3qLEjTH1a1l1g=");
    }

    #[test]
    fn sigv2_headers() {
        let mut creds = example();
        creds.session_token = Some("tok".into());
        let h = sign_v2("GET", "/bkt/key", &[("range", "bytes=0-9"), ("X-Amz-Meta-A", " v ")], &creds, example_time());
        assert_eq!(header(&h, "date"), "Fri, 24 May 2013 00:00:00 GMT");
        assert_eq!(header(&h, "x-amz-security-token"), "tok");
        let to_sign = string_to_sign_v2(
            "GET",
            "",
            "",
            "Fri, 24 May 2013 00:00:00 GMT",
            &[("x-amz-meta-a".into(), "v".into()), ("x-amz-security-token".into(), "tok".into())],
            "/bkt/key",
        );
        assert_eq!(header(&h, "authorization"), format!("AWS AKIAIOSFODNN7EXAMPLE:{}", hmac_sha1_base64(&creds.secret_access_key, &to_sign)));
    }
}
