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

pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, Platform};

/// Manifests and indexes are the `oci-spec` types: Docker schema 2 parses
/// too (its media types become `MediaType::Other`), digests are validated
/// on the way in.
#[derive(Debug, PartialEq)]
pub enum Manifest {
    Image(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// The fields that decide what a body is, read before the full parse.
#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
}

/// Parses a manifest or an index. The kind comes from the body's
/// `mediaType`, else the Content-Type, else the fields present.
pub fn parse_manifest(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, String> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!("manifest of {} bytes is too large", body.len()));
    }
    let raw: Kind = serde_json::from_slice(body).map_err(|e| format!("malformed manifest: {e}"))?;
    let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let kind = raw.media_type.clone().filter(|m| !m.is_empty()).or(ct).unwrap_or_default();
    let is_index = match kind.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        _ => raw.manifests.is_some() && raw.layers.is_none(),
    };
    if is_index {
        if raw.manifests.is_none() {
            return Err("index without \"manifests\"".into());
        }
        let index: ImageIndex = serde_json::from_slice(body).map_err(|e| format!("malformed index: {}", truncate(&e.to_string())))?;
        Ok(Manifest::Index(Box::new(index)))
    } else {
        if raw.layers.is_none() {
            return Err(match kind.as_str() {
                "" => "not an image manifest (no \"layers\"; schema 1 manifests are not supported)".to_string(),
                k => format!("unsupported manifest type {:?}", truncate(k)),
            });
        }
        let image: ImageManifest =
            serde_json::from_slice(body).map_err(|e| format!("malformed manifest: {}", truncate(&e.to_string())))?;
        Ok(Manifest::Image(Box::new(image)))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

/// `os/arch[/variant]` of a platform.
pub fn platform_name(p: &Platform) -> String {
    match p.variant().as_deref() {
        Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os(), p.architecture()),
        _ => format!("{}/{}", p.os(), p.architecture()),
    }
}

fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
    let mut p = Platform::default();
    p.set_os(os.into());
    p.set_architecture(arch.into());
    p.set_variant(variant.map(str::to_string));
    p
}

/// `OS/ARCH[/VARIANT]`.
pub fn parse_platform(text: &str) -> Result<Platform, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    match parts.as_slice() {
        [os, arch] if ok(os) && ok(arch) => Ok(platform(os, arch, None)),
        [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(platform(os, arch, Some(v))),
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
    platform(std::env::consts::OS, arch, variant)
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
        d.platform().as_ref().is_some_and(|p| p.os() == wanted.os() && p.architecture() == wanted.architecture())
    };
    let want_variant = normal_variant(&wanted.architecture().to_string(), wanted.variant().as_deref());
    let exact = manifests.iter().filter(same_arch).find(|d| {
        let p = d.platform().as_ref().map(|p| normal_variant(&p.architecture().to_string(), p.variant().as_deref()));
        p.as_deref() == Some(want_variant.as_str())
    });
    if let Some(d) = exact {
        return Ok(d);
    }
    if wanted.variant().is_none() {
        if let Some(d) = manifests.iter().find(same_arch) {
            return Ok(d);
        }
    }
    let mut available: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform().as_ref())
        .filter(|p| p.os().to_string() != "unknown")
        .map(platform_name)
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
            layers.iter().find(|l| &l.digest().to_string() == d).ok_or_else(|| LayerError::NotALayer { digest: d.clone() })?
        }
        LayerChoice::Index(i) => layers
            .get(*i as usize)
            .ok_or(LayerError::IndexOutOfRange { index: *i, count: layers.len() })?,
        LayerChoice::Only if layers.len() == 1 => &layers[0],
        LayerChoice::Only => return Err(LayerError::Ambiguous { listing: list_layers(layers) }),
    };
    if layer.size() == 0 {
        return Err(LayerError::BadSize { digest: layer.digest().to_string() });
    }
    let media_type = layer.media_type().to_string();
    if !matches!(choice, LayerChoice::Digest(_)) && !EROFS_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(LayerError::NotErofs { digest: layer.digest().to_string(), media_type });
    }
    Ok(layer)
}

/// `0: sha256:… (application/vnd.erofs, 1234 bytes); 1: …`
pub fn list_layers(layers: &[Descriptor]) -> String {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{i}: {} ({}, {} bytes)", l.digest(), l.media_type(), l.size()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Largest image config read (configs are a few KiB; history can make them larger).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// `rootfs.diff_ids` of an image config: the sha256 of each layer's
/// uncompressed tar, in layer order. Untrusted JSON: every entry must be a
/// `sha256:` digest.
pub fn parse_diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("the image config is not JSON: {e}"))?;
    let ids = v
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(|d| d.as_array())
        .ok_or("the image config has no rootfs.diff_ids")?;
    ids.iter()
        .map(|d| {
            let d = d.as_str().ok_or("a diff_id that is not a string")?;
            let hex = d.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            hex.map(|_| d.to_string()).ok_or_else(|| format!("diff_id {d:?} is not a sha256 digest"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn desc(mt: &str, n: u8, size: u64) -> Descriptor {
        Descriptor::new(mt.into(), size, d(n).parse::<oci_spec::image::Digest>().unwrap())
    }

    fn layer(n: u8, mt: &str) -> Descriptor {
        desc(mt, n, 100 + n as u64)
    }

    #[test]
    fn parses_image_and_index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.erofs","digest":"{}","size":4096}}]}}"#,
            d(1),
            d(2)
        );
        let Manifest::Image(m) = parse_manifest(None, body.as_bytes()).unwrap() else { panic!("not an image") };
        assert_eq!(m.layers(), &vec![desc("application/vnd.erofs", 2, 4096)]);
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            d(3)
        );
        let m = parse_manifest(Some("application/vnd.oci.image.index.v1+json; charset=utf-8"), idx.as_bytes()).unwrap();
        assert!(matches!(m, Manifest::Index(ref i) if i.manifests().len() == 1));
        // Kind from the fields when nothing names it.
        assert!(matches!(parse_manifest(None, idx.as_bytes()).unwrap(), Manifest::Index(_)));
        // Docker schema 2, with its own media types.
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":40}}]}}"#,
            d(4),
            d(5)
        );
        let Manifest::Image(m) = parse_manifest(None, docker.as_bytes()).unwrap() else { panic!("not an image") };
        assert_eq!(m.layers()[0].media_type().to_string(), "application/vnd.docker.image.rootfs.diff.tar.gzip");
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(parse_manifest(None, b"not json").is_err());
        assert!(parse_manifest(None, br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(parse_manifest(None, br#"{"layers":[{"digest":"sha256:xyz","size":1}]}"#).is_err());
        assert!(parse_manifest(None, br#"{"layers":[{"digest":"sha256:00","size":-1}]}"#).is_err());
        let no_config = format!(r#"{{"schemaVersion":2,"layers":[{{"mediaType":"x","digest":"{}","size":1}}]}}"#, d(1));
        assert!(parse_manifest(None, no_config.as_bytes()).is_err(), "a manifest needs its config");
        assert!(parse_manifest(None, &vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
        assert!(parse_manifest(Some(OCI_INDEX), br#"{"layers":[]}"#).is_err());
    }

    fn plat(os: &str, arch: &str, v: Option<&str>, n: u8) -> Descriptor {
        let mut desc = desc(OCI_MANIFEST, n, 1);
        desc.set_platform(Some(platform(os, arch, v)));
        desc
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
        let pick = |s: &str| select_platform(&idx, &parse_platform(s).unwrap()).map(|d| d.digest().to_string());
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
        assert_eq!(host_platform().os().to_string(), "linux");
    }

    #[test]
    fn layer_selection() {
        let one = vec![layer(1, "application/vnd.erofs")];
        assert_eq!(select_layer(&one, &LayerChoice::Only).unwrap().digest().to_string(), d(1));
        let three = vec![layer(1, "application/vnd.erofs"), layer(2, "application/vnd.erofs.layer.v1"), layer(3, "application/octet-stream")];
        match select_layer(&three, &LayerChoice::Only) {
            Err(LayerError::Ambiguous { listing }) => {
                assert!(listing.contains("0: sha256:0101") && listing.contains("2: sha256:0303"), "{listing}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(select_layer(&three, &LayerChoice::Index(1)).unwrap().digest().to_string(), d(2));
        assert!(matches!(select_layer(&three, &LayerChoice::Index(2)), Err(LayerError::NotErofs { .. })));
        assert_eq!(select_layer(&three, &LayerChoice::Digest(d(3))).unwrap().digest().to_string(), d(3), "by digest any type");
        assert!(matches!(select_layer(&three, &LayerChoice::Index(3)), Err(LayerError::IndexOutOfRange { index: 3, count: 3 })));
        assert!(matches!(select_layer(&three, &LayerChoice::Digest(d(9))), Err(LayerError::NotALayer { .. })));
        assert!(matches!(select_layer(&[], &LayerChoice::Only), Err(LayerError::NoLayers)));
        let empty = vec![desc("application/vnd.erofs", 1, 0)];
        assert!(matches!(select_layer(&empty, &LayerChoice::Only), Err(LayerError::BadSize { .. })));
    }

    #[test]
    fn diff_ids_come_from_rootfs_and_must_be_digests() {
        let hex = "ab".repeat(32);
        let good = format!(r#"{{"rootfs":{{"type":"layers","diff_ids":["sha256:{hex}","sha256:{hex}"]}}}}"#);
        assert_eq!(parse_diff_ids(good.as_bytes()).unwrap(), vec![format!("sha256:{hex}"); 2]);
        assert!(parse_diff_ids(b"{}").unwrap_err().contains("rootfs"));
        assert!(parse_diff_ids(b"not json").is_err());
        assert!(parse_diff_ids(br#"{"rootfs":{"diff_ids":["sha256:abc"]}}"#).unwrap_err().contains("not a sha256"));
        assert!(parse_diff_ids(br#"{"rootfs":{"diff_ids":[7]}}"#).is_err());
        let upper = format!(r#"{{"rootfs":{{"diff_ids":["sha256:{}"]}}}}"#, "AB".repeat(32));
        assert!(parse_diff_ids(upper.as_bytes()).is_err());
    }
}
