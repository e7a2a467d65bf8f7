//! Cache keys: the names of cache entries and agent files.
//!
//! A key names one blob: `sha256-<hex>` for a content-addressed blob, `url-<hash>-<size>` for a
//! plain URL. Keys become path components, so they are validated (no '/', no "..", no leading
//! '.') everywhere they are used, and they never carry credentials: a URL's userinfo is
//! stripped before it is hashed.

use sha2::{Digest, Sha256};

use crate::StateError;

/// Longest key we accept; real keys are at most 71 bytes (`sha256-` + 64).
const MAX_KEY_LEN: usize = 128;

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits (the OCI form).
pub fn validate_digest(digest: &str) -> Result<(), StateError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(StateError::InvalidDigest(digest.to_owned())),
    }
}

/// `sha256:<hex>` -> `sha256-<hex>`.
pub fn cache_key_for_digest(digest: &str) -> Result<String, StateError> {
    validate_digest(digest)?;
    Ok(digest.replacen(':', "-", 1))
}

/// `url-<first 32 hex digits of sha256(url without userinfo)>`; a blob whose size changed
/// behind the same URL is caught by the cache entry (its size must match).
///
/// The query string is kept in the hash: two URLs differing only in their query may name
/// different objects. (A pre-signed URL whose signature changes therefore gets a new entry.)
pub fn cache_key_for_url(url: &str) -> String {
    let clean = strip_url_userinfo(url);
    let hash = hex::encode(Sha256::digest(clean.as_bytes()));
    format!("url-{}", &hash[..32])
}

/// Removes `user[:password]@` from the authority of `scheme://authority/...`. Text without
/// `://` is returned unchanged.
pub fn strip_url_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let auth_start = scheme_end + 3;
    let rest = &url[auth_start..];
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_len];
    match authority.rfind('@') {
        Some(at) => format!("{}{}", &url[..auth_start], &url[auth_start + at + 1..]),
        None => url.to_owned(),
    }
}

/// Checks that `key` is a single, harmless path component: `[A-Za-z0-9._-]`, not empty, not
/// starting with '.', no "..", at most 128 bytes.
pub fn validate_cache_key(key: &str) -> Result<(), StateError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && !key.starts_with('.')
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidKey(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digest_keys() {
        let key = cache_key_for_digest(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(key, format!("sha256-{HEX}"));
        validate_cache_key(&key).unwrap();
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", &HEX[1..]),
            format!("sha256:{HEX}0"),
            format!("sha256:{}", HEX.to_uppercase()),
            format!("sha512:{HEX}"),
            format!("sha256:../{}", &HEX[3..]),
            HEX.to_string(),
        ] {
            assert!(cache_key_for_digest(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_keys_ignore_credentials() {
        let a = cache_key_for_url("https://user:secret@example.com/x.erofs");
        let b = cache_key_for_url("https://example.com/x.erofs");
        let c = cache_key_for_url("https://example.com/y.erofs");
        assert_eq!(a, b);
        assert_ne!(b, c);
        assert!(!a.contains("secret"));
        assert!(a.starts_with("url-"));
        assert_eq!(a.len(), 4 + 32);
        validate_cache_key(&a).unwrap();
    }

    #[test]
    fn strip_userinfo_cases() {
        assert_eq!(
            strip_url_userinfo("http://u:p@h:5000/a@b"),
            "http://h:5000/a@b"
        );
        assert_eq!(strip_url_userinfo("http://h/a?x=u@v"), "http://h/a?x=u@v");
        assert_eq!(strip_url_userinfo("https://a@b@h"), "https://h");
        assert_eq!(strip_url_userinfo("no-scheme@h"), "no-scheme@h");
        assert_eq!(strip_url_userinfo("http://h"), "http://h");
    }

    #[test]
    fn key_validation() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a..b",
            "a b",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(validate_cache_key(bad).is_err(), "{bad:?}");
        }
        for good in ["sha256-abc", "url-0f-12", "A_b.c"] {
            validate_cache_key(good).unwrap();
        }
    }
}
