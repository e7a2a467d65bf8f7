//! What went wrong with a request, in one sentence, and whether trying again
//! can help.

use reqwest::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The network or the server: worth retrying.
    #[error("{endpoint} unreachable: {why}")]
    Unreachable { endpoint: String, why: String },
    #[error("{0}")]
    Transient(String),
    /// The request or the answer is wrong: retrying cannot help.
    #[error("{0}")]
    Permanent(String),
}

impl HttpError {
    pub fn is_transient(&self) -> bool {
        !matches!(self, HttpError::Permanent(_))
    }
}

/// The innermost useful cause, e.g. "Connection refused (os error 111)".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        last = s.to_string();
        cur = s.source();
    }
    last
}

/// A failed `send()` to `endpoint` (credential-free).
pub fn send_error(e: &reqwest::Error, endpoint: &str) -> HttpError {
    if e.is_builder() {
        return HttpError::Permanent(format!("{endpoint}: {}", error_chain(e)));
    }
    let why = if e.is_timeout() { "request timed out".to_string() } else { error_chain(e) };
    HttpError::Unreachable { endpoint: endpoint.to_string(), why }
}

/// An unexpected status from `shown` (credential-free).
pub fn status_error(status: StatusCode, shown: &str) -> HttpError {
    let code = status.as_u16();
    match code {
        404 => HttpError::Permanent(format!("{shown}: not found (HTTP 404)")),
        401 | 403 => HttpError::Permanent(format!("{shown}: access denied (HTTP {code})")),
        416 => HttpError::Permanent(format!("{shown}: range not satisfiable (HTTP 416)")),
        408 | 429 | 500..=599 => HttpError::Transient(format!("{shown}: server error (HTTP {code})")),
        _ => HttpError::Permanent(format!("{shown}: unexpected HTTP status {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let cases = [(404, false, "not found"), (403, false, "access denied"), (416, false, "range"), (503, true, "server error"), (429, true, "server error"), (302, false, "unexpected")];
        for (code, transient, words) in cases {
            let e = status_error(StatusCode::from_u16(code).unwrap(), "http://h");
            assert_eq!(e.is_transient(), transient, "{code}");
            assert!(e.to_string().contains(words), "{code}: {e}");
        }
        let e = HttpError::Unreachable { endpoint: "http://h".into(), why: "refused".into() };
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "http://h unreachable: refused");
    }
}
