//! URLs fit to be shown.

/// A form of `url` fit for logs, records and `status`: no userinfo, and the
/// query (which may hold a token or a signature) replaced by `?REDACTED`.
/// The fragment is dropped.
pub fn redact_url(url: &str) -> String {
    let mut s = erofs_fanotify_state::strip_url_userinfo(url);
    if let Some(hash) = s.find('#') {
        s.truncate(hash);
    }
    if let Some(q) = s.find('?') {
        s.truncate(q);
        s.push_str("?REDACTED");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact() {
        assert_eq!(redact_url("https://u:p@h/a?sig=1#f"), "https://h/a?REDACTED");
        assert_eq!(redact_url("https://h/a"), "https://h/a");
    }
}
