//! Mirrors: where else a repository's blobs can be read.
//!
//! Two sources, in this order: `oci.mirror=URL` options (repeatable; the URL
//! may carry a path prefix, e.g. `https://mirror.example/dockerhub`), then
//! the host's containers configuration, `/etc/containers/registries.conf`
//! plus `/etc/containers/registries.conf.d/*.conf` (the file named by
//! `EROFS_FANOTIFY_REGISTRIES_CONF`, else `CONTAINERS_REGISTRIES_CONF`,
//! replaces them all). We read its v2 `[[registry]]` tables: `prefix` (or
//! `location`) matched against `registry/repository`, longest first
//! (`*.example.com` matches sub-domains), and their `[[registry.mirror]]`
//! `location`s; a mirror's location replaces the matched prefix, as the
//! containers tools do. `insecure = true` means plain http. Mirrors serve
//! blobs only, tried in order, with the registry itself as the fallback; a
//! P2P proxy (e.g. a Dragonfly daemon) is configured as a mirror.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::credentials::Credentials;

pub const REGISTRIES_CONF_ENV: &str = "EROFS_FANOTIFY_REGISTRIES_CONF";
const MAX_CONF_BYTES: u64 = 1 << 20;

/// A mirror of one repository, resolved by the front end.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSpec {
    /// `scheme://host[:port]`
    pub base: String,
    /// The repository's name on the mirror.
    pub repository: String,
    #[serde(default)]
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for MirrorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/v2/{}", self.base, self.repository)
    }
}

#[derive(Debug, Default, Deserialize)]
struct RegistriesConf {
    #[serde(default)]
    registry: Vec<RegistryTable>,
}

#[derive(Debug, Default, Deserialize, Clone)]
struct RegistryTable {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    mirror: Vec<MirrorTable>,
}

#[derive(Debug, Default, Deserialize, Clone)]
struct MirrorTable {
    location: String,
    #[serde(default)]
    insecure: bool,
}

/// A mirror found in the host configuration, before credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMirror {
    pub base: String,
    pub repository: String,
}

/// `oci.mirror=URL` for `registry/repository`: the URL's path is a prefix.
/// `http(s)://` is required unless `insecure` picks http for a bare host.
pub fn mirror_from_option(url: &str, repository: &str, insecure: bool) -> Result<(HostMirror, Option<Credentials>), String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("{}://{url}", if insecure { "http" } else { "https" })
    };
    let parsed = reqwest::Url::parse(&with_scheme).map_err(|_| format!("bad mirror URL {:?}", redact(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() || parsed.query().is_some() {
        return Err(format!("bad mirror URL {:?} (expected http(s)://host[:port][/prefix])", redact(url)));
    }
    let creds = if parsed.username().is_empty() {
        None
    } else {
        Some(Credentials::Basic {
            username: percent_decode(parsed.username()),
            password: percent_decode(parsed.password().unwrap_or("")),
        })
    };
    let base = parsed.origin().ascii_serialization();
    let prefix = parsed.path().trim_matches('/');
    let repository = if prefix.is_empty() { repository.to_string() } else { format!("{prefix}/{repository}") };
    Ok((HostMirror { base, repository }, creds))
}

fn redact(url: &str) -> String {
    reqwest::Url::parse(url).map(|u| u.origin().ascii_serialization()).unwrap_or_else(|_| "<unparsable>".into())
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// The configuration files to read, in order (later tables override earlier ones with the same prefix).
pub fn host_config_files() -> Vec<PathBuf> {
    for var in [REGISTRIES_CONF_ENV, "CONTAINERS_REGISTRIES_CONF"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return vec![PathBuf::from(p)];
        }
    }
    let mut files = vec![PathBuf::from("/etc/containers/registries.conf")];
    if let Ok(rd) = std::fs::read_dir("/etc/containers/registries.conf.d") {
        let mut dropins: Vec<PathBuf> =
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "conf")).collect();
        dropins.sort();
        files.extend(dropins);
    }
    files
}

/// Mirrors for `registry/repository` from the host configuration files.
pub fn host_mirrors(files: &[PathBuf], registry: &str, repository: &str) -> Result<Vec<HostMirror>, String> {
    let mut tables: Vec<RegistryTable> = Vec::new();
    for f in files {
        let Some(conf) = read_conf(f)? else { continue };
        for t in conf.registry {
            let key = table_prefix(&t);
            tables.retain(|old| table_prefix(old) != key);
            tables.push(t);
        }
    }
    Ok(mirrors_for(&tables, registry, repository))
}

fn read_conf(path: &Path) -> Result<Option<RegistriesConf>, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_CONF_BYTES).read_to_string(&mut text).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_conf(&text).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_conf(text: &str) -> Result<RegistriesConf, String> {
    toml::from_str(text).map_err(|e| format!("not a valid registries.conf: {}", e.message()))
}

fn table_prefix(t: &RegistryTable) -> String {
    t.prefix.clone().or_else(|| t.location.clone()).unwrap_or_default()
}

/// Does `prefix` match `name` (= `registry/repository`)? Returns the matched length for ranking.
fn prefix_match(prefix: &str, name: &str, registry: &str) -> Option<usize> {
    if let Some(suffix) = prefix.strip_prefix("*.") {
        let host = registry.split(':').next().unwrap_or(registry);
        return host.ends_with(&format!(".{suffix}")).then_some(prefix.len());
    }
    let p = prefix.trim_end_matches('/');
    (!p.is_empty() && (name == p || name.starts_with(&format!("{p}/")))).then_some(p.len())
}

fn mirrors_for(tables: &[RegistryTable], registry: &str, repository: &str) -> Vec<HostMirror> {
    let name = format!("{registry}/{repository}");
    let best = tables
        .iter()
        .filter_map(|t| prefix_match(&table_prefix(t), &name, registry).map(|n| (n, t)))
        .max_by_key(|(n, _)| *n);
    let Some((_, table)) = best else { return Vec::new() };
    let prefix = table_prefix(table);
    // What follows the matched prefix (wildcards match the whole registry).
    let rest = if prefix.starts_with("*.") { format!("/{repository}") } else { name[prefix.trim_end_matches('/').len()..].to_string() };
    table
        .mirror
        .iter()
        .filter_map(|m| {
            let loc = m.location.trim().trim_end_matches('/');
            let full = format!("{loc}{rest}");
            let (host, repo) = full.split_once('/')?;
            if host.is_empty() || repo.is_empty() {
                return None;
            }
            let scheme = if m.insecure { "http" } else { "https" };
            Some(HostMirror { base: format!("{scheme}://{host}"), repository: repo.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "mirror.example/dockerhub"
[[registry.mirror]]
location = "127.0.0.1:5001"
insecure = true

[[registry]]
location = "127.0.0.1:5000"
[[registry.mirror]]
location = "127.0.0.1:5002"
insecure = true

[[registry]]
prefix = "127.0.0.1:5000/special"
location = "127.0.0.1:5000/special"
mirror = [{ location = "m2.example/sp" }]

[[registry]]
prefix = "*.corp.example"
location = "unused"
[[registry.mirror]]
location = "cache.corp.example"
"#;

    fn m(base: &str, repo: &str) -> HostMirror {
        HostMirror { base: base.into(), repository: repo.into() }
    }

    #[test]
    fn registries_conf_mirrors() {
        let conf = parse_conf(CONF).unwrap();
        assert_eq!(
            mirrors_for(&conf.registry, "docker.io", "library/busybox"),
            vec![m("https://mirror.example", "dockerhub/library/busybox"), m("http://127.0.0.1:5001", "library/busybox")]
        );
        assert_eq!(mirrors_for(&conf.registry, "127.0.0.1:5000", "erofs/img"), vec![m("http://127.0.0.1:5002", "erofs/img")]);
        assert_eq!(mirrors_for(&conf.registry, "127.0.0.1:5000", "special/x"), vec![m("https://m2.example", "sp/x")], "longest prefix wins");
        assert_eq!(mirrors_for(&conf.registry, "127.0.0.1:5000", "specialx"), vec![m("http://127.0.0.1:5002", "specialx")]);
        assert_eq!(mirrors_for(&conf.registry, "r.corp.example", "a/b"), vec![m("https://cache.corp.example", "a/b")]);
        assert!(mirrors_for(&conf.registry, "quay.io", "x").is_empty());
        assert!(parse_conf("[[registry]\n").is_err());
    }

    #[test]
    fn files_and_dropins_override() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.conf");
        let b = dir.path().join("b.conf");
        std::fs::write(&a, CONF).unwrap();
        std::fs::write(&b, "[[registry]]\nlocation = \"127.0.0.1:5000\"\nmirror = [{location = \"127.0.0.1:6000\", insecure = true}]\n").unwrap();
        let got = host_mirrors(&[a, b, dir.path().join("missing.conf")], "127.0.0.1:5000", "erofs/img").unwrap();
        assert_eq!(got, vec![m("http://127.0.0.1:6000", "erofs/img")]);
    }

    #[test]
    fn mirror_options() {
        let (h, c) = mirror_from_option("http://127.0.0.1:5001", "erofs/img", false).unwrap();
        assert_eq!((h, c), (m("http://127.0.0.1:5001", "erofs/img"), None));
        let (h, c) = mirror_from_option("https://u:p%40ss@mirror.example/pfx/", "library/x", false).unwrap();
        assert_eq!(h, m("https://mirror.example", "pfx/library/x"));
        assert_eq!(c, Some(Credentials::Basic { username: "u".into(), password: "p@ss".into() }));
        assert_eq!(mirror_from_option("127.0.0.1:5001", "r", true).unwrap().0.base, "http://127.0.0.1:5001");
        assert_eq!(mirror_from_option("mirror.example", "r", false).unwrap().0.base, "https://mirror.example");
        let e = mirror_from_option("ftp://u:secret@h/x", "r", false).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(mirror_from_option("http://h/x?q=1", "r", false).is_err());
    }
}
