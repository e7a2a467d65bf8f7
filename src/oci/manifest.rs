//! Manifest resolution, pure: index -> platform -> image manifest -> layer.
//!
//! Manifests are untrusted JSON: parsed with size caps, fields validated
//! (digests, sizes), and every choice that can fail explains itself with
//! the alternatives (platforms available, layers present).

use serde::Deserialize;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Sent on every manifest GET: without the OCI types a registry may answer
/// 404 for an OCI manifest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// EROFS layer media types: the image-spec one and containerd's.
pub const EROFS_MEDIA_TYPES: [&str; 2] = ["application/vnd.erofs", "application/vnd.erofs.layer.v1"];

/// Manifests larger than this are refused (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// An index nested in an index is followed at most this deep.
pub const MAX_INDEX_DEPTH: usize = 2;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match self.variant.as_deref() {
            Some(v) if !v.is_empty() => write!(f, "/{v}"),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Manifest {
    Image { layers: Vec<Descriptor> },
    Index { manifests: Vec<Descriptor> },
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest or an index. The kind comes from the body's
/// `mediaType`, else the Content-Type, else the fields present.
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, String> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!("manifest of {} bytes is too large", body.len()));
    }
    let raw: RawManifest = serde_json::from_slice(body).map_err(|e| format!("malformed manifest: {e}"))?;
    let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let kind = raw.media_type.clone().filter(|m| !m.is_empty()).or(ct).unwrap_or_default();
    let is_index = match kind.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => raw.manifests.is_some() && raw.layers.is_none(),
    };
    let check = |ds: &[Descriptor]| -> Result<(), String> {
        for d in ds {
            super::reference::parse_digest(&d.digest)
                .map_err(|_| format!("manifest lists a bad digest {:?}", truncate(&d.digest)))?;
        }
        Ok(())
    };
    if is_index {
        let manifests = raw.manifests.ok_or("index without \"manifests\"")?;
        check(&manifests)?;
        Ok(Manifest::Index { manifests })
    } else {
        let layers = raw.layers.ok_or_else(|| match kind.as_str() {
            "" => "not an image manifest (no \"layers\"; schema 1 manifests are not supported)".to_string(),
            k => format!("unsupported manifest type {:?}", truncate(k)),
        })?;
        check(&layers)?;
        Ok(Manifest::Image { layers })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `OS/ARCH[/VARIANT]`.
pub fn parse_platform(text: &str) -> Result<Platform, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    match parts.as_slice() {
        [os, arch] if ok(os) && ok(arch) => Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None }),
        [os, arch, v] if ok(os) && ok(arch) && ok(v) => {
            Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: Some(v.to_string()) })
        }
        _ => Err(format!("bad platform {text:?} (expected OS/ARCH[/VARIANT], e.g. linux/arm64)")),
    }
}

/// This machine's platform in OCI terms.
pub fn host_platform() -> Platform {
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "x86" => ("386", None),
        "aarch64" => ("arm64", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    };
    Platform { os: std::env::consts::OS.to_string(), architecture: arch.to_string(), variant: variant.map(str::to_string) }
}

/// The default variant of an architecture, as containerd normalises it.
fn normal_variant(arch: &str, variant: Option<&str>) -> String {
    match (arch, variant.unwrap_or("")) {
        ("arm64", "") | ("arm64", "v8") => "v8".into(),
        ("arm", "") => "v7".into(),
        (_, v) => v.to_string(),
    }
}

/// Picks the manifest of `wanted` from an index. Without a variant asked,
/// the architecture's default variant is preferred, then the first entry.
pub fn select_platform<'a>(manifests: &'a [Descriptor], wanted: &Platform) -> Result<&'a Descriptor, String> {
    let same_arch = |d: &&Descriptor| {
        d.platform.as_ref().is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture)
    };
    let want_variant = normal_variant(&wanted.architecture, wanted.variant.as_deref());
    let exact = manifests.iter().filter(same_arch).find(|d| {
        let p = d.platform.as_ref().map(|p| normal_variant(&p.architecture, p.variant.as_deref()));
        p.as_deref() == Some(want_variant.as_str())
    });
    if let Some(d) = exact {
        return Ok(d);
    }
    if wanted.variant.is_none() {
        if let Some(d) = manifests.iter().find(same_arch) {
            return Ok(d);
        }
    }
    let mut available: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| p.to_string())
        .collect();
    available.dedup();
    Err(if available.is_empty() { "none".to_string() } else { available.join(", ") })
}

/// Which layer the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerChoice {
    /// `oci.blob=DIGEST`: any media type is accepted.
    Digest(String),
    /// `oci.layer=N`, 0-based in manifest order (as erofs-utils' mount.erofs).
    Index(u32),
    /// Nothing asked: the image must have exactly one layer.
    Only,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LayerError {
    NoLayers,
    NotALayer { digest: String },
    IndexOutOfRange { index: u32, count: usize },
    Ambiguous { listing: String },
    NotErofs { digest: String, media_type: String },
    BadSize { digest: String },
}

/// Picks the layer and checks its media type.
pub fn select_layer<'a>(layers: &'a [Descriptor], choice: &LayerChoice) -> Result<&'a Descriptor, LayerError> {
    if layers.is_empty() {
        return Err(LayerError::NoLayers);
    }
    let layer = match choice {
        LayerChoice::Digest(d) => {
            layers.iter().find(|l| &l.digest == d).ok_or_else(|| LayerError::NotALayer { digest: d.clone() })?
        }
        LayerChoice::Index(i) => layers
            .get(*i as usize)
            .ok_or(LayerError::IndexOutOfRange { index: *i, count: layers.len() })?,
        LayerChoice::Only if layers.len() == 1 => &layers[0],
        LayerChoice::Only => return Err(LayerError::Ambiguous { listing: list_layers(layers) }),
    };
    if layer.size == 0 {
        return Err(LayerError::BadSize { digest: layer.digest.clone() });
    }
    if !matches!(choice, LayerChoice::Digest(_)) && !EROFS_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
        return Err(LayerError::NotErofs { digest: layer.digest.clone(), media_type: layer.media_type.clone() });
    }
    Ok(layer)
}

/// `0: sha256:… (application/vnd.erofs, 1234 bytes); 1: …`
pub fn list_layers(layers: &[Descriptor]) -> String {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{i}: {} ({}, {} bytes)", l.digest, if l.media_type.is_empty() { "?" } else { &l.media_type }, l.size))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn layer(n: u8, mt: &str) -> Descriptor {
        Descriptor { media_type: mt.into(), digest: d(n), size: 100 + n as u64, platform: None }
    }

    #[test]
    fn parses_image_and_index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.erofs","digest":"{}","size":4096}}]}}"#,
            d(1),
            d(2)
        );
        let m = parse_manifest(None, body.as_bytes()).unwrap();
        assert_eq!(m, Manifest::Image { layers: vec![Descriptor { media_type: "application/vnd.erofs".into(), digest: d(2), size: 4096, platform: None }] });
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d(3)
        );
        let m = parse_manifest(Some("application/vnd.oci.image.index.v1+json; charset=utf-8"), idx.as_bytes()).unwrap();
        assert!(matches!(m, Manifest::Index { ref manifests } if manifests.len() == 1));
        // Kind from the fields when nothing names it.
        assert!(matches!(parse_manifest(None, idx.as_bytes()).unwrap(), Manifest::Index { .. }));
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(parse_manifest(None, b"not json").is_err());
        assert!(parse_manifest(None, br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(parse_manifest(None, br#"{"layers":[{"digest":"sha256:xyz","size":1}]}"#).is_err());
        assert!(parse_manifest(None, br#"{"layers":[{"digest":"sha256:00","size":-1}]}"#).is_err());
        assert!(parse_manifest(None, &vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
        assert!(parse_manifest(Some(OCI_INDEX), br#"{"layers":[]}"#).is_err());
    }

    fn plat(os: &str, arch: &str, v: Option<&str>, n: u8) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d(n),
            size: 1,
            platform: Some(Platform { os: os.into(), architecture: arch.into(), variant: v.map(Into::into) }),
        }
    }

    #[test]
    fn platform_selection() {
        let idx = vec![
            plat("linux", "amd64", None, 1),
            plat("linux", "arm", Some("v6"), 2),
            plat("linux", "arm", Some("v7"), 3),
            plat("linux", "arm64", Some("v8"), 4),
            plat("unknown", "unknown", None, 5),
        ];
        let pick = |s: &str| select_platform(&idx, &parse_platform(s).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64").unwrap(), d(1));
        assert_eq!(pick("linux/arm64").unwrap(), d(4));
        assert_eq!(pick("linux/arm64/v8").unwrap(), d(4));
        assert_eq!(pick("linux/arm").unwrap(), d(3), "arm defaults to v7");
        assert_eq!(pick("linux/arm/v6").unwrap(), d(2));
        let err = pick("linux/s390x").unwrap_err();
        assert_eq!(err, "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8");
        assert!(pick("linux/arm/v5").is_err());
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux/amd64/v2/x").is_err());
        assert!(parse_platform("linux//x").is_err());
        assert_eq!(host_platform().os, "linux");
    }

    #[test]
    fn layer_selection() {
        let one = vec![layer(1, "application/vnd.erofs")];
        assert_eq!(select_layer(&one, &LayerChoice::Only).unwrap().digest, d(1));
        let three = vec![layer(1, "application/vnd.erofs"), layer(2, "application/vnd.erofs.layer.v1"), layer(3, "application/octet-stream")];
        match select_layer(&three, &LayerChoice::Only) {
            Err(LayerError::Ambiguous { listing }) => {
                assert!(listing.contains("0: sha256:0101") && listing.contains("2: sha256:0303"), "{listing}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(select_layer(&three, &LayerChoice::Index(1)).unwrap().digest, d(2));
        assert!(matches!(select_layer(&three, &LayerChoice::Index(2)), Err(LayerError::NotErofs { .. })));
        assert_eq!(select_layer(&three, &LayerChoice::Digest(d(3))).unwrap().digest, d(3), "by digest any type");
        assert!(matches!(select_layer(&three, &LayerChoice::Index(3)), Err(LayerError::IndexOutOfRange { index: 3, count: 3 })));
        assert!(matches!(select_layer(&three, &LayerChoice::Digest(d(9))), Err(LayerError::NotALayer { .. })));
        assert!(matches!(select_layer(&[], &LayerChoice::Only), Err(LayerError::NoLayers)));
        let empty = vec![Descriptor { size: 0, ..layer(1, "application/vnd.erofs") }];
        assert!(matches!(select_layer(&empty, &LayerChoice::Only), Err(LayerError::BadSize { .. })));
    }
}
