//! HTTP plumbing shared by resolution (front end) and blob reads (agent):
//! one reqwest client (TLS against the system roots plus an optional CA
//! file, proxies from the environment, pooled connections), endpoints with
//! their own authorization, and redirects followed by hand so that `Range`
//! is kept and `Authorization` dropped when the redirect leaves the origin.

use crate::remote::http::error_chain;
use std::path::Path;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};

use super::auth::{parse_challenge, Authenticator, Challenge};
use super::OciError;

const MAX_REDIRECTS: usize = 5;

/// Builds the client. Redirects are not followed by reqwest (see module doc).
pub fn build_client(
    connect_timeout: Duration,
    request_timeout: Duration,
    ca_file: Option<&Path>,
) -> Result<reqwest::Client, OciError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .pool_max_idle_per_host(16)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("erofs-fanotify/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| OciError::Config(format!("cannot read the CA file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| OciError::Config(format!("{} holds no usable PEM certificate: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(OciError::Config(format!("{} holds no PEM certificate", path.display())));
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| OciError::Config(format!("cannot build the HTTP client: {}", error_chain(&e))))
}

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

/// The answer to an authorized request.
pub struct Answer {
    pub response: reqwest::Response,
    /// Where the answer came from (differs from the asked URL after redirects).
    pub final_url: Url,
    /// The answer came from another origin (the Authorization was dropped).
    pub left_origin: bool,
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
        let answer = follow(client, method.clone(), url.clone(), headers.clone(), auth.as_deref()).await?;
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

/// Sends and follows up to [`MAX_REDIRECTS`] redirects by hand: every header
/// (`Range`, `Accept`) is kept; `Authorization` only while on the origin.
pub async fn follow(
    client: &reqwest::Client,
    method: Method,
    url: Url,
    headers: HeaderMap,
    auth: Option<&str>,
) -> Result<Answer, OciError> {
    let start_origin = origin(&url);
    let mut url = url;
    let mut left_origin = false;
    for _ in 0..=MAX_REDIRECTS {
        let mut req = client.request(method.clone(), url.clone()).headers(headers.clone());
        if let (Some(a), false) = (auth, left_origin) {
            let mut v = HeaderValue::from_str(a).map_err(|_| OciError::Protocol("bad authorization value".into()))?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let response = req.send().await.map_err(|e| classify_send(&e, &url))?;
        let status = response.status();
        if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
            return Ok(Answer { response, final_url: url, left_origin });
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError::Protocol(format!("{}: redirect without a Location", origin(&url))))?;
        let next = url
            .join(location)
            .map_err(|_| OciError::Protocol(format!("{}: redirect to a bad Location", origin(&url))))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(OciError::Protocol(format!("{}: redirect to a non-HTTP URL", origin(&url))));
        }
        if url.scheme() == "https" && next.scheme() == "http" {
            return Err(OciError::Protocol(format!("{}: redirect from https to plain http refused", origin(&url))));
        }
        if origin(&next) != start_origin {
            left_origin = true;
        }
        tracing::debug!(from = %origin(&url), to = %origin(&next), "following a redirect");
        url = next;
    }
    Err(OciError::Protocol(format!("{start_origin}: more than {MAX_REDIRECTS} redirects")))
}

/// `scheme://host[:port]`: no user info, no path, no query (signed URLs carry tokens there).
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

fn shown_url(s: &str) -> String {
    Url::parse(s).map(|u| origin(&u)).unwrap_or_else(|_| "<unparsable>".into())
}

fn classify_send(e: &reqwest::Error, url: &Url) -> OciError {
    let endpoint = origin(url);
    if e.is_timeout() {
        OciError::Unreachable { endpoint, why: "request timed out".into() }
    } else if e.is_builder() {
        OciError::Protocol(format!("{endpoint}: {}", error_chain(e)))
    } else {
        OciError::Unreachable { endpoint, why: plain_http_hint(url, send_error_reason(e)) }
    }
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

/// The innermost cause, e.g. "Connection refused (os error 111)".
pub fn send_error_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "request timed out".into();
    }
    error_chain(e)
}


/// Reads a whole body of at most `cap` bytes.
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, OciError> {
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Err(OciError::Protocol(format!("response larger than {cap} bytes")));
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > cap {
                    return Err(OciError::Protocol(format!("response larger than {cap} bytes")));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(OciError::Transient(format!("response cut short: {}", error_chain(&e)))),
        }
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
    fn origins_hide_credentials_and_queries() {
        let u = Url::parse("https://user:pw@cdn.example:8443/blob?sig=secret").unwrap();
        assert_eq!(origin(&u), "https://cdn.example:8443");
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
