//! The `s3.*` mount options (erofs-utils' `mount.erofs` names), the S3 source's own options type.
//! `mount::options` hands every `s3.*` key to [`S3Options::set`]. Pure: unit-tested without a store.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::location::UrlStyle;

/// Request signature: SigV4 (the default here), or SigV2 for old stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigVersion {
    V2,
    V4,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `s3.endpoint=URL`, repeatable: tried in order (the later ones are mirrors of the first).
    pub endpoints: Vec<String>,
    /// `s3.region=R` (SigV4's signing region).
    pub region: Option<String>,
    /// `s3.urlstyle=path|vhost`; unset: vhost, except path for IP-address and `localhost` endpoints.
    pub url_style: Option<UrlStyle>,
    /// `s3.sig=2|4`; unset: 4. (erofs-utils defaults to 2; AWS has refused SigV2 since 2020.)
    pub sig: Option<SigVersion>,
    /// `s3.passwd_file=PATH`: s3fs-style `AK:SK` or `BUCKET:AK:SK` lines.
    pub passwd_file: Option<PathBuf>,
    /// `s3.profile=NAME`: the AWS shared-files profile (else `AWS_PROFILE`, else `default`).
    pub profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3OptionError {
    #[error("unknown mount option {0:?}")]
    Unknown(String),
    #[error("mount option {0} needs a value")]
    MissingValue(String),
    #[error("bad value {value:?} for mount option {key}: {why}")]
    BadValue { key: String, value: String, why: String },
}

impl S3Options {
    /// True when any `s3.*` option was given.
    pub fn is_set(&self) -> bool {
        *self != S3Options::default()
    }

    /// Applies one `s3.KEY[=VALUE]` option.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), S3OptionError> {
        let need = || match value {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(S3OptionError::MissingValue(key.to_string())),
        };
        let bad = |value: &str, why: &str| S3OptionError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        match key {
            "s3.endpoint" => {
                let v = need()?;
                // Checked now so a bad one fails before anything is set up.
                super::location::parse_endpoint(&v).map_err(|why| bad(&v, &why))?;
                self.endpoints.push(v);
            }
            "s3.region" => {
                let v = need()?;
                if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || v.len() > 64 {
                    return Err(bad(&v, "expected a region code like eu-west-1"));
                }
                self.region = Some(v);
            }
            "s3.urlstyle" => {
                let v = need()?;
                self.url_style = Some(match v.as_str() {
                    "path" => UrlStyle::Path,
                    "vhost" | "virtual" => UrlStyle::VirtualHost,
                    _ => return Err(bad(&v, "expected path or vhost")),
                });
            }
            "s3.sig" => {
                let v = need()?;
                self.sig = Some(match v.as_str() {
                    "2" => SigVersion::V2,
                    "4" => SigVersion::V4,
                    _ => return Err(bad(&v, "expected 2 or 4")),
                });
            }
            "s3.passwd_file" => {
                let v = need()?;
                if !v.starts_with('/') {
                    return Err(bad(&v, "must be an absolute path"));
                }
                self.passwd_file = Some(PathBuf::from(v));
            }
            "s3.profile" => {
                let v = need()?;
                if v.chars().any(|c| c.is_control() || c == ']') {
                    return Err(bad(&v, "not a profile name"));
                }
                self.profile = Some(v);
            }
            _ => return Err(S3OptionError::Unknown(key.to_string())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(items: &[(&str, Option<&str>)]) -> Result<S3Options, S3OptionError> {
        let mut o = S3Options::default();
        for (k, v) in items {
            o.set(k, *v)?;
        }
        Ok(o)
    }

    #[test]
    fn erofs_utils_options() {
        let o = parse(&[
            ("s3.endpoint", Some("http://127.0.0.1:9000")),
            ("s3.endpoint", Some("s3.example.com")),
            ("s3.region", Some("eu-west-1")),
            ("s3.urlstyle", Some("path")),
            ("s3.sig", Some("2")),
            ("s3.passwd_file", Some("/etc/passwd-s3fs")),
        ])
        .unwrap();
        assert_eq!(o.endpoints, vec!["http://127.0.0.1:9000", "s3.example.com"]);
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert_eq!(o.url_style, Some(UrlStyle::Path));
        assert_eq!(o.sig, Some(SigVersion::V2));
        assert_eq!(o.passwd_file, Some(PathBuf::from("/etc/passwd-s3fs")));
        assert!(o.is_set());
        assert!(!S3Options::default().is_set());
    }

    #[test]
    fn bad_values_are_refused() {
        for (k, v) in [
            ("s3.sig", "3"),
            ("s3.urlstyle", "dns"),
            ("s3.region", "eu west"),
            ("s3.passwd_file", "rel/path"),
            ("s3.endpoint", "ftp://x"),
            ("s3.endpoint", "http://ak:sk@host"),
        ] {
            assert!(matches!(parse(&[(k, Some(v))]), Err(S3OptionError::BadValue { .. })), "{k}={v}");
        }
        assert_eq!(parse(&[("s3.region", None)]), Err(S3OptionError::MissingValue("s3.region".into())));
        assert_eq!(parse(&[("s3.bogus", Some("1"))]), Err(S3OptionError::Unknown("s3.bogus".into())));
    }
}
