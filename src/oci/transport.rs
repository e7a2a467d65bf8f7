//! The registry side of HTTP: endpoints (the registry or a mirror) with
//! their own authorization, and requests that answer one challenge. The
//! plumbing (client, redirects, bodies) is the `http` leaf's.

use reqwest::header::{HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};

use crate::http::{self, origin, Answer};

use super::auth::{parse_challenge, Authenticator, Challenge};
use super::OciError;

/// One place that serves the repository: the registry or a mirror.
pub struct Endpoint {
    /// `scheme://host[:port]`
    pub base: Url,
    /// The repository's name on this endpoint (a mirror may add a prefix).
    pub repository: String,
    pub is_mirror: bool,
    pub auth: Authenticator,
}

impl Endpoint {
    pub fn new(base: &str, repository: &str, is_mirror: bool, auth: Authenticator) -> Result<Endpoint, OciError> {
        let base = Url::parse(base).map_err(|_| OciError::Config(format!("bad endpoint URL {:?}", shown_url(base))))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(OciError::Config(format!("bad endpoint URL {:?}", shown_url(base.as_str()))));
        }
        Ok(Endpoint { base, repository: repository.to_string(), is_mirror, auth })
    }

    /// `http://host:port` (mirrors say so), credential-free.
    pub fn shown(&self) -> String {
        let o = origin(&self.base);
        if self.is_mirror {
            format!("{o} (mirror)")
        } else {
            o
        }
    }

    pub fn host(&self) -> String {
        match (self.base.host_str(), self.base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "?".into(),
        }
    }

    pub fn url(&self, tail: &str) -> Result<Url, OciError> {
        self.base
            .join(&format!("/v2/{}/{tail}", self.repository))
            .map_err(|_| OciError::Config(format!("cannot form a URL for {}", self.repository)))
    }
}

/// GETs (or HEADs) `url` on `ep` with its authorization, answering one
/// challenge (a 401 renews the token and retries once), following redirects.
pub async fn authorized(
    client: &reqwest::Client,
    ep: &Endpoint,
    method: Method,
    url: Url,
    headers: HeaderMap,
) -> Result<Answer, OciError> {
    let mut attempt = 0;
    loop {
        let (auth, generation) = ep.auth.header(client).await?;
        let answer = http::follow(client, method.clone(), url.clone(), headers.clone(), auth.as_deref())
            .await
            .map_err(|e| match e {
                http::HttpError::Unreachable { endpoint, why } => {
                    OciError::Unreachable { endpoint, why: plain_http_hint(&url, why) }
                }
                other => other.into(),
            })?;
        if answer.response.status() != StatusCode::UNAUTHORIZED || answer.left_origin {
            return Ok(answer);
        }
        let challenge = answer
            .response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if attempt == 0 {
            attempt += 1;
            ep.auth.refresh(client, challenge.as_deref(), generation).await?;
            continue;
        }
        let scope_error = matches!(
            challenge.as_deref().and_then(parse_challenge),
            Some(Challenge::Bearer { error: Some(ref e), .. }) if e == "insufficient_scope"
        );
        return Err(if scope_error {
            OciError::InsufficientScope { registry: ep.host(), repository: ep.repository.clone() }
        } else if ep.auth.has_credentials() {
            OciError::AuthRefused { registry: ep.host() }
        } else {
            OciError::AuthRequired { registry: ep.host() }
        });
    }
}

fn shown_url(s: &str) -> String {
    Url::parse(s).map(|u| origin(&u)).unwrap_or_else(|_| "<unparsable>".into())
}

/// A TLS handshake answered in plain text (rustls: "corrupt message of type InvalidContentType"):
/// the registry most likely speaks http.
fn plain_http_hint(url: &Url, why: String) -> String {
    if url.scheme() == "https" && why.contains("InvalidContentType") {
        format!("{why} (a plain-http registry? then add the option oci.insecure)")
    } else {
        why
    }
}

/// The registry error code of a JSON error body (`{"errors":[{"code":…}]}`).
pub fn registry_error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("errors")?.get(0)?.get("code")?.as_str().map(|s| s.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hide_credentials_and_queries() {
        assert_eq!(shown_url("http://u:p@h/x?t=1"), "http://h");
    }

    #[test]
    fn plain_http_hint_only_for_tls_to_plain_http() {
        let https = Url::parse("https://reg:5000/v2/").unwrap();
        let why = "received corrupt message of type InvalidContentType".to_string();
        assert!(plain_http_hint(&https, why.clone()).ends_with("add the option oci.insecure)"));
        assert_eq!(plain_http_hint(&Url::parse("http://reg:5000/").unwrap(), why.clone()), why);
        assert_eq!(plain_http_hint(&https, "Connection refused".into()), "Connection refused");
    }

    #[test]
    fn error_codes() {
        assert_eq!(registry_error_code(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}"#).as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(registry_error_code(b"<html>"), None);
    }

    #[test]
    fn endpoints() {
        let ep = Endpoint::new("http://127.0.0.1:5001", "pfx/library/x", true, Authenticator::new("h", "r", None)).unwrap();
        assert_eq!(ep.url("blobs/sha256:00").unwrap().as_str(), "http://127.0.0.1:5001/v2/pfx/library/x/blobs/sha256:00");
        assert_eq!(ep.shown(), "http://127.0.0.1:5001 (mirror)");
        assert_eq!(ep.host(), "127.0.0.1:5001");
        assert!(Endpoint::new("ftp://h", "r", false, Authenticator::new("h", "r", None)).is_err());
    }
}
