//! Image references: `[registry[:port]/]repo[:tag][@sha256:HEX]`.
//!
//! Normalised the way docker and the containers tools do it: no registry
//! (the first component has no `.` or `:` and is not `localhost`) means
//! `docker.io`, whose single-component repositories live under `library/`;
//! no tag and no digest means `latest`. Pure: unit-tested.

use std::fmt;

/// Where Docker Hub's registry API actually lives.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as named (Docker Hub as `docker.io`).
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`
    pub digest: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {reference:?}: {why}")]
pub struct ReferenceError {
    pub reference: String,
    pub why: String,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let err = |why: &str| ReferenceError { reference: text.to_string(), why: why.to_string() };
        if text.is_empty() || text.len() > 4096 {
            return Err(err("empty or too long"));
        }
        let (name_tag, digest) = match text.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d).map_err(|w| err(&w))?)),
            None => (text, None),
        };
        // The tag is after the last ':' that follows the last '/' (a ':' before
        // it is a registry port).
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
            None => (name_tag, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(err("bad tag (letters, digits, '_', '.', '-'; at most 128)"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first.to_string(), rest.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if !valid_registry(&registry) {
            return Err(err("bad registry host"));
        }
        if !valid_repository(&repository) {
            return Err(err("bad repository name (lowercase letters, digits, separators '.', '_', '-', '/')"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The host the registry API is served from.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest when given (it pins the
    /// content), else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// `registry/repository` (for messages).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `sha256:<64 lowercase hex>`; also accepts the bare hex (as erofs-utils' `oci.blob=` does).
pub fn parse_digest(text: &str) -> Result<String, String> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(format!("sha256:{hex}"))
    } else if text.contains(':') && !text.starts_with("sha256:") {
        Err(format!("unsupported digest algorithm in {text:?} (only sha256)"))
    } else {
        Err(format!("bad digest {text:?} (expected sha256:<64 hex digits>)"))
    }
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_registry(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if let Some(p) = port {
        if p.parse::<u16>().is_err() {
            return false;
        }
    }
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'[' | b']'))
}

/// Path components of lowercase alphanumerics joined by single separators.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|comp| {
            let b = comp.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_defaults() {
        let x = r("busybox");
        assert_eq!((x.registry.as_str(), x.repository.as_str(), x.tag.as_deref()), ("docker.io", "library/busybox", Some("latest")));
        assert_eq!(x.api_host(), "registry-1.docker.io");
        let x = r("user/app:1.2");
        assert_eq!((x.registry.as_str(), x.repository.as_str(), x.tag.as_deref()), ("docker.io", "user/app", Some("1.2")));
        assert_eq!(r("index.docker.io/foo").repository, "library/foo");
        assert_eq!(r("docker.io/library/foo:x").to_string(), "docker.io/library/foo:x");
    }

    #[test]
    fn registries_ports_and_tags() {
        let x = r("127.0.0.1:5000/erofs/img:v1");
        assert_eq!((x.registry.as_str(), x.repository.as_str(), x.tag.as_deref()), ("127.0.0.1:5000", "erofs/img", Some("v1")));
        assert_eq!(x.api_host(), "127.0.0.1:5000");
        let x = r("localhost/img");
        assert_eq!((x.registry.as_str(), x.tag.as_deref()), ("localhost", Some("latest")));
        let x = r("localhost:5000/a/b/c");
        assert_eq!((x.registry.as_str(), x.repository.as_str()), ("localhost:5000", "a/b/c"));
        let x = r("quay.io/org/img");
        assert_eq!(x.manifest_ref(), "latest");
    }

    #[test]
    fn digests() {
        let hex = "ab".repeat(32);
        let x = r(&format!("r.example:443/img@sha256:{hex}"));
        assert_eq!(x.tag, None);
        assert_eq!(x.digest.as_deref(), Some(format!("sha256:{hex}").as_str()));
        assert_eq!(x.manifest_ref(), format!("sha256:{hex}"));
        let x = r(&format!("r.example/img:v2@sha256:{hex}"));
        assert_eq!(x.tag.as_deref(), Some("v2"));
        assert_eq!(x.manifest_ref(), format!("sha256:{hex}"), "the digest wins over the tag");
        assert!(Reference::parse("img@sha256:abc").is_err());
        assert!(Reference::parse(&format!("img@sha512:{hex}")).is_err());
        assert_eq!(parse_digest(&hex).unwrap(), format!("sha256:{hex}"));
        assert!(parse_digest(&hex.to_uppercase()).is_err());
    }

    #[test]
    fn rejects_bad_references() {
        for bad in ["", "UPPER/case", "r.example/", "r.example//x", "img:", "img:-x", "r.example:99999/x", "a/b c", "img:t@"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Reference::parse(&"a".repeat(5000)).is_err());
    }
}
