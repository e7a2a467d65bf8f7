//! Redirects followed by hand: every header (`Range`, `Accept`) is kept,
//! `Authorization` only while on the origin, https never downgrades.
//! Registries send blobs to a CDN this way; a CDN must not see our token.

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION};
use reqwest::{Method, StatusCode, Url};

use super::error::{send_error, HttpError};

pub const MAX_REDIRECTS: usize = 5;

/// The answer to a request whose redirects were followed.
pub struct Answer {
    pub response: reqwest::Response,
    /// Where the answer came from (differs from the asked URL after redirects).
    pub final_url: Url,
    /// The answer came from another origin (the Authorization was dropped).
    pub left_origin: bool,
}

/// Sends and follows up to [`MAX_REDIRECTS`] redirects.
pub async fn follow(
    client: &reqwest::Client,
    method: Method,
    url: Url,
    headers: HeaderMap,
    auth: Option<&str>,
) -> Result<Answer, HttpError> {
    let start_origin = origin(&url);
    let mut url = url;
    let mut left_origin = false;
    for _ in 0..=MAX_REDIRECTS {
        let mut req = client.request(method.clone(), url.clone()).headers(headers.clone());
        if let (Some(a), false) = (auth, left_origin) {
            let mut v = HeaderValue::from_str(a).map_err(|_| HttpError::Permanent("bad authorization value".into()))?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let response = req.send().await.map_err(|e| send_error(&e, &origin(&url)))?;
        let status = response.status();
        if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
            return Ok(Answer { response, final_url: url, left_origin });
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| HttpError::Permanent(format!("{}: redirect without a Location", origin(&url))))?;
        let next = url
            .join(location)
            .map_err(|_| HttpError::Permanent(format!("{}: redirect to a bad Location", origin(&url))))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(HttpError::Permanent(format!("{}: redirect to a non-HTTP URL", origin(&url))));
        }
        if url.scheme() == "https" && next.scheme() == "http" {
            return Err(HttpError::Permanent(format!("{}: redirect from https to plain http refused", origin(&url))));
        }
        if origin(&next) != start_origin {
            left_origin = true;
        }
        tracing::debug!(from = %origin(&url), to = %origin(&next), "following a redirect");
        url = next;
    }
    Err(HttpError::Permanent(format!("{start_origin}: more than {MAX_REDIRECTS} redirects")))
}

/// `scheme://host[:port]`: no user info, no path, no query (signed URLs carry tokens there).
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_hide_credentials_and_queries() {
        let u = Url::parse("https://user:pw@cdn.example:8443/blob?sig=secret").unwrap();
        assert_eq!(origin(&u), "https://cdn.example:8443");
    }
}
