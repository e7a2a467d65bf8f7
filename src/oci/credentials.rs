//! Registry credentials from the container tools' files.
//!
//! Looked up at mount time by the front end (the agent only ever sees the
//! resolved credentials, on its stdin). Files, first match wins:
//! `$REGISTRY_AUTH_FILE`, else the containers `auth.json` locations
//! (`$XDG_RUNTIME_DIR/containers/auth.json`, `/run/containers/0/auth.json`,
//! `~/.config/containers/auth.json`); then `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`. In each file: `credHelpers[registry]`, then an
//! `auths` entry (repository-scoped keys such as `host/org/repo` before the
//! bare host), then `credsStore`. Helpers run as `docker-credential-NAME get`
//! with the server on stdin.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::reference::DOCKER_HUB;

/// What a registry login gives: a user and password, or an OAuth2 identity
/// (refresh) token. Never printed: Debug is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credentials {
    Basic { username: String, password: String },
    IdentityToken { token: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::IdentityToken { .. } => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_CONFIG_BYTES: u64 = 4 << 20;

#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The files to consult, in order.
#[derive(Clone, Debug)]
pub struct CredentialFiles(pub Vec<PathBuf>);

impl CredentialFiles {
    /// The standard locations, from the environment.
    pub fn from_env() -> CredentialFiles {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = var("HOME");
        let mut files = Vec::new();
        if let Some(f) = var("REGISTRY_AUTH_FILE") {
            files.push(f);
        } else {
            if let Some(x) = var("XDG_RUNTIME_DIR") {
                files.push(x.join("containers/auth.json"));
            }
            files.push(PathBuf::from("/run/containers/0/auth.json"));
            if let Some(h) = &home {
                files.push(h.join(".config/containers/auth.json"));
            }
        }
        match (var("DOCKER_CONFIG"), &home) {
            (Some(d), _) => files.push(d.join("config.json")),
            (None, Some(h)) => files.push(h.join(".docker/config.json")),
            (None, None) => {}
        }
        CredentialFiles(files)
    }

    /// Credentials for `registry` (as in the reference, `docker.io` for Docker
    /// Hub) and `repository`. A file that exists but cannot be parsed is an
    /// error (silently mounting anonymously would hide the cause).
    pub fn lookup(&self, registry: &str, repository: &str) -> Result<Option<Credentials>, String> {
        for path in &self.0 {
            let Some(file) = read_auth_file(path)? else { continue };
            if let Some(c) = lookup_in(&file, registry, repository, path)? {
                tracing::debug!(file = %path.display(), registry, "using stored registry credentials");
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| format!("{} is not a valid auth file: {e}", path.display()))
}

/// `https://index.docker.io/v1/` -> `docker.io`; `https://h:5000/` -> `h:5000`;
/// `h/org/repo` stays (a repository-scoped key).
fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.trim_end_matches('/');
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    let (host, rest) = match k.split_once('/') {
        Some((h, r)) => (h, Some(r)),
        None => (k, None),
    };
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        h => h,
    };
    match rest {
        Some(r) => format!("{host}/{r}"),
        None => host.to_string(),
    }
}

fn lookup_in(file: &AuthFile, registry: &str, repository: &str, path: &Path) -> Result<Option<Credentials>, String> {
    let helper = file.cred_helpers.iter().find(|(k, _)| normalize_key(k) == registry).map(|(_, v)| v.as_str());
    if let Some(h) = helper {
        return run_helper(h, registry);
    }
    // Most specific key first: host/a/b/c, host/a/b, host/a, host.
    let mut candidates = Vec::new();
    let full = format!("{registry}/{repository}");
    let mut cur = full.as_str();
    loop {
        candidates.push(cur.to_string());
        match cur.rfind('/') {
            Some(i) => cur = &cur[..i],
            None => break,
        }
    }
    for want in &candidates {
        for (k, entry) in &file.auths {
            if normalize_key(k) != *want {
                continue;
            }
            if let Some(c) = entry_credentials(entry).map_err(|e| format!("{}: entry {k:?}: {e}", path.display()))? {
                return Ok(Some(c));
            }
        }
    }
    match file.creds_store.as_deref() {
        Some(store) if !store.is_empty() => run_helper(store, registry),
        _ => Ok(None),
    }
}

fn entry_credentials(e: &AuthEntry) -> Result<Option<Credentials>, String> {
    if let Some(t) = e.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::IdentityToken { token: t.to_string() }));
    }
    if let Some(a) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64_decode(a).ok_or("\"auth\" is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "\"auth\" is not UTF-8")?;
        let (u, p) = text.split_once(':').ok_or("\"auth\" is not user:password")?;
        return Ok(Some(Credentials::Basic { username: u.to_string(), password: p.to_string() }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credentials::Basic { username: u.clone(), password: p.clone() })),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `docker-credential-NAME get`. Not found -> None.
fn run_helper(name: &str, registry: &str) -> Result<Option<Credentials>, String> {
    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')) {
        return Err(format!("bad credential helper name {name:?}"));
    }
    let program = format!("docker-credential-{name}");
    // Docker Hub's credentials are stored under its legacy URL.
    let server = if registry == DOCKER_HUB { "https://index.docker.io/v1/".to_string() } else { registry.to_string() };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the credential helper {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    // Read on a thread so a hung helper is bounded by the timeout below.
    let mut stdout = child.stdout.take().ok_or("no helper stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() < HELPER_TIMEOUT => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the credential helper {program} did not answer within {HELPER_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("credential helper {program}: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        // The helper protocol's "not found" is a non-zero exit with that text.
        return Ok(None);
    }
    let answer: HelperAnswer =
        serde_json::from_slice(&out).map_err(|_| format!("the credential helper {program} gave a malformed answer"))?;
    if answer.secret.is_empty() {
        return Ok(None);
    }
    if answer.username == "<token>" {
        return Ok(Some(Credentials::IdentityToken { token: answer.secret }));
    }
    Ok(Some(Credentials::Basic { username: answer.username, password: answer.secret }))
}

/// Base64 as credential files write it: the standard alphabet (or the URL-safe
/// one), padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine;
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let text = s.trim();
    GeneralPurpose::new(&base64::alphabet::STANDARD, cfg)
        .decode(text)
        .or_else(|_| GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg).decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials::Basic { username: u.into(), password: p.into() })
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn keys_normalise() {
        assert_eq!(normalize_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_key("http://127.0.0.1:5000/"), "127.0.0.1:5000");
        assert_eq!(normalize_key("quay.io/org/repo"), "quay.io/org/repo");
        assert_eq!(normalize_key("registry-1.docker.io"), "docker.io");
    }

    #[test]
    fn files_in_order_and_scoped_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("auth.json");
        let b = dir.path().join("config.json");
        std::fs::write(
            &a,
            r#"{"auths":{"r.example/org/special":{"auth":"c3BlY2lhbDpzMQ=="},"other.example":{"username":"o","password":"p"}}}"#,
        )
        .unwrap();
        std::fs::write(&b, r#"{"auths":{"https://r.example":{"auth":"Z2VuZXJhbDpzMg=="},"https://index.docker.io/v1/":{"identitytoken":"tok"}}}"#).unwrap();
        let files = CredentialFiles(vec![dir.path().join("missing.json"), a, b]);
        assert_eq!(files.lookup("r.example", "org/special").unwrap(), basic("special", "s1"));
        assert_eq!(files.lookup("r.example", "org/other").unwrap(), basic("general", "s2"));
        assert_eq!(files.lookup("other.example", "x").unwrap(), basic("o", "p"));
        assert_eq!(files.lookup("docker.io", "library/x").unwrap(), Some(Credentials::IdentityToken { token: "tok".into() }));
        assert_eq!(files.lookup("nowhere.example", "x").unwrap(), None);
    }

    #[test]
    fn broken_files_are_errors_and_debug_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("auth.json");
        std::fs::write(&a, "{not json").unwrap();
        assert!(CredentialFiles(vec![a.clone()]).lookup("r", "x").is_err());
        std::fs::write(&a, r#"{"auths":{"r.example":{"auth":"!!"}}}"#).unwrap();
        assert!(CredentialFiles(vec![a]).lookup("r.example", "x").is_err());
        let c = basic("user", "hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn missing_helper_is_an_error_and_bad_names_refused() {
        assert!(run_helper("../evil", "r").is_err());
        assert!(run_helper("surely-not-installed-xyz", "r").is_err());
    }
}
