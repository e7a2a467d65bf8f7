//! S3 failures, each one sentence for `erofs-mount`'s one line, and the mapping of S3's XML error
//! bodies (`<Error><Code>…`) to them. Codes are shown, never the store's free-text message unless
//! the code is unknown (and then cleaned and shortened: it is untrusted text).

use super::credentials::CredentialOrigin;

#[derive(Debug, Clone, thiserror::Error)]
pub enum S3Error {
    #[error("{0}")]
    Config(String),
    #[error("cannot read the S3 credentials: {0}")]
    Credentials(String),
    #[error("S3 endpoint {endpoint} rejected the request signature: the secret access key {origin} is wrong (SignatureDoesNotMatch)")]
    SignatureMismatch { endpoint: String, origin: String },
    #[error("S3 endpoint {endpoint} does not know the access key {origin} (InvalidAccessKeyId)")]
    UnknownAccessKey { endpoint: String, origin: String },
    #[error("the S3 credentials {origin} have expired ({code} from {endpoint}); renew them")]
    Expired { endpoint: String, origin: String, code: String },
    #[error("S3 endpoint {endpoint} refused the session token {origin} ({code})")]
    InvalidToken { endpoint: String, origin: String, code: String },
    #[error("S3 endpoint {endpoint} denied access to {object} with the credentials {origin} ({code})")]
    AccessDenied { endpoint: String, object: String, origin: String, code: String },
    #[error("bucket {bucket:?} does not exist at S3 endpoint {endpoint} (NoSuchBucket)")]
    NoSuchBucket { endpoint: String, bucket: String },
    #[error("object {object} not found at S3 endpoint {endpoint} (NoSuchKey)")]
    NoSuchKey { endpoint: String, object: String },
    #[error("bucket {bucket:?} is in region {actual}, not {asked}: give -o s3.region={actual}")]
    WrongRegion { bucket: String, actual: String, asked: String },
    #[error("the clock of this host and of S3 endpoint {endpoint} differ too much (RequestTimeTooSkewed): fix the time")]
    ClockSkew { endpoint: String },
    #[error("object {object} changed at S3 endpoint {endpoint} since it was mounted ({what}); remount to see the new version")]
    Changed { endpoint: String, object: String, what: String },
    #[error("S3 endpoint {endpoint} unreachable: {why}")]
    Unreachable { endpoint: String, why: String },
    /// A broken answer (wrong range, missing headers, bad XML): not worth retrying.
    #[error("S3 endpoint {endpoint}: {what}")]
    Protocol { endpoint: String, what: String },
    /// A failure worth retrying (timeout, cut body, 5xx, throttling).
    #[error("S3 endpoint {endpoint}: {what}")]
    Transient { endpoint: String, what: String },
    #[error("S3 endpoint {endpoint} answered HTTP {status} for {object}{detail}")]
    Status { endpoint: String, object: String, status: u16, detail: String },
}

impl S3Error {
    pub fn is_transient(&self) -> bool {
        matches!(self, S3Error::Unreachable { .. } | S3Error::Transient { .. })
    }

    /// Refused credentials: worth one retry after re-reading a credential file.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            S3Error::SignatureMismatch { .. }
                | S3Error::UnknownAccessKey { .. }
                | S3Error::Expired { .. }
                | S3Error::InvalidToken { .. }
                | S3Error::AccessDenied { .. }
        )
    }

    /// How much the error says about the object itself (for choosing which of several endpoints'
    /// errors to report): a store's definite answer beats "unreachable".
    pub(crate) fn weight(&self) -> u8 {
        match self {
            S3Error::Unreachable { .. } => 0,
            S3Error::Transient { .. } => 1,
            _ => 2,
        }
    }
}

/// The fields of an S3 error body that matter here.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    pub region: Option<String>,
}

/// Parses `<Error><Code>…</Code><Message>…</Message>[<Region>…]</Error>`; `None` when the body is
/// not such a document.
pub fn parse_error_body(body: &[u8]) -> Option<ErrorBody> {
    let text = std::str::from_utf8(body).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "Error" {
        return None;
    }
    let child = |name: &str| {
        root.children()
            .find(|n| n.is_element() && n.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
    };
    Some(ErrorBody { code: child("Code")?, message: child("Message").unwrap_or_default(), region: child("Region") })
}

/// What the mapping needs to word its sentence.
pub struct ErrorContext<'a> {
    pub endpoint: &'a str,
    pub bucket: &'a str,
    /// `s3://BUCKET/KEY`, or `bucket B` for bucket requests.
    pub object: &'a str,
    pub origin: &'a CredentialOrigin,
    pub region: &'a str,
}

/// Maps an error answer (status, parsed body, `x-amz-bucket-region`) to one sentence.
pub fn classify(status: u16, body: Option<&ErrorBody>, bucket_region: Option<&str>, ctx: &ErrorContext<'_>) -> S3Error {
    let endpoint = ctx.endpoint.to_string();
    let origin = ctx.origin.describe();
    let object = ctx.object.to_string();
    let wrong_region = |actual: &str| S3Error::WrongRegion {
        bucket: ctx.bucket.to_string(),
        actual: actual.to_string(),
        asked: ctx.region.to_string(),
    };
    if let Some(actual) = bucket_region.or(body.and_then(|b| b.region.as_deref())) {
        if !actual.is_empty() && actual != ctx.region && is_region(actual) {
            return wrong_region(actual);
        }
    }
    let code = body.map(|b| b.code.as_str()).unwrap_or("");
    match code {
        "SignatureDoesNotMatch" => return S3Error::SignatureMismatch { endpoint, origin },
        "InvalidAccessKeyId" => return S3Error::UnknownAccessKey { endpoint, origin },
        "ExpiredToken" | "TokenRefreshRequired" | "RequestExpired" => {
            return S3Error::Expired { endpoint, origin, code: code.to_string() }
        }
        "InvalidToken" => return S3Error::InvalidToken { endpoint, origin, code: code.to_string() },
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => {
            return S3Error::AccessDenied { endpoint, object, origin, code: code.to_string() }
        }
        "NoSuchBucket" => return S3Error::NoSuchBucket { endpoint, bucket: ctx.bucket.to_string() },
        "NoSuchKey" => return S3Error::NoSuchKey { endpoint, object },
        "RequestTimeTooSkewed" => return S3Error::ClockSkew { endpoint },
        "PreconditionFailed" => {
            return S3Error::Changed { endpoint, object, what: "its ETag is not the mounted one".into() }
        }
        "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" => {
            return S3Error::Transient { endpoint, what: format!("{code} (HTTP {status}), retrying") }
        }
        _ => {}
    }
    match status {
        403 => S3Error::AccessDenied { endpoint, object, origin, code: format!("HTTP 403{}", detail(body)) },
        404 => S3Error::NoSuchKey { endpoint, object },
        408 | 429 | 500..=599 => S3Error::Transient { endpoint, what: format!("server error (HTTP {status}{})", detail(body)) },
        _ => S3Error::Status { endpoint, object, status, detail: detail(body) },
    }
}

fn is_region(s: &str) -> bool {
    s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `: Code: message`, cleaned: printable ASCII only, at most 160 characters.
fn detail(body: Option<&ErrorBody>) -> String {
    let Some(b) = body else { return String::new() };
    let clean = |s: &str, max: usize| -> String {
        s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(max).collect()
    };
    let code = clean(&b.code, 64);
    let message = clean(&b.message, 160);
    match (code.is_empty(), message.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!(", {code}"),
        (false, false) => format!(", {code}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(origin: &CredentialOrigin) -> ErrorContext<'_> {
        ErrorContext { endpoint: "http://h:1", bucket: "bkt", object: "s3://bkt/k", origin, region: "us-east-1" }
    }

    fn body(code: &str) -> ErrorBody {
        ErrorBody { code: code.into(), message: "m".into(), region: None }
    }

    #[test]
    fn error_bodies_parse() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>k</Key></Error>"#;
        let b = parse_error_body(xml).unwrap();
        assert_eq!(b.code, "NoSuchKey");
        assert_eq!(b.message, "The specified key does not exist.");
        assert!(parse_error_body(b"<html/>").is_none());
        assert!(parse_error_body(b"not xml").is_none());
        assert!(parse_error_body(b"<Error><Message>x</Message></Error>").is_none());
    }

    #[test]
    fn one_sentence_each() {
        let env = CredentialOrigin::Environment;
        let c = ctx(&env);
        let cases: &[(u16, Option<ErrorBody>, &str)] = &[
            (403, Some(body("SignatureDoesNotMatch")), "secret access key from the environment (AWS_ACCESS_KEY_ID) is wrong"),
            (403, Some(body("InvalidAccessKeyId")), "does not know the access key"),
            (400, Some(body("ExpiredToken")), "have expired"),
            (403, Some(body("AccessDenied")), "denied access to s3://bkt/k"),
            (404, Some(body("NoSuchBucket")), "bucket \"bkt\" does not exist"),
            (404, Some(body("NoSuchKey")), "object s3://bkt/k not found"),
            (404, None, "not found"),
            (412, Some(body("PreconditionFailed")), "changed"),
            (403, None, "HTTP 403"),
            (418, Some(ErrorBody { code: "Teapot\u{7}".into(), message: "short and \u{1b}[31mstout".into(), region: None }), "HTTP 418"),
        ];
        for (status, b, want) in cases {
            let e = classify(*status, b.as_ref(), None, &c).to_string();
            assert!(e.contains(want), "{status} {b:?}: {e}");
            assert!(!e.contains('\u{1b}') && !e.contains('\u{7}'), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(classify(503, Some(&body("SlowDown")), None, &c).is_transient());
        assert!(classify(403, Some(&body("SignatureDoesNotMatch")), None, &c).is_auth());
        assert!(!classify(404, Some(&body("NoSuchKey")), None, &c).is_auth());
    }

    #[test]
    fn wrong_region_names_the_right_one() {
        let anon = CredentialOrigin::Anonymous;
        let e = classify(301, None, Some("eu-central-1"), &ctx(&anon)).to_string();
        assert_eq!(e, "bucket \"bkt\" is in region eu-central-1, not us-east-1: give -o s3.region=eu-central-1");
        let mut b = body("AuthorizationHeaderMalformed");
        b.region = Some("ap-east-1".into());
        assert!(classify(400, Some(&b), None, &ctx(&anon)).to_string().contains("s3.region=ap-east-1"));
        // The same region is no hint.
        assert!(matches!(classify(400, None, Some("us-east-1"), &ctx(&anon)), S3Error::Status { .. }));
    }
}
