//! S3 credentials, the AWS way, resolved by the front end at mount time.
//!
//! Order (first that applies wins): `s3.passwd_file=` (s3fs `AK:SK` / `BUCKET:AK:SK` lines, refused
//! when group or others may read it); `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+
//! `AWS_SESSION_TOKEN`); the profile (`s3.profile=`, else `AWS_PROFILE`, else `default`) of the
//! shared files, `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/credentials`, sections `[NAME]`) over
//! `AWS_CONFIG_FILE` (else `~/.aws/config`, sections `[profile NAME]` and `[default]`); else
//! anonymous requests. The region: `s3.region=`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's
//! `region`. The agent receives the result inside its source spec on stdin and never reads the
//! environment; [`CredentialOrigin`] tells it which file to re-read after a 403.
//!
//! Parsing is pure ([`parse_ini`], [`parse_passwd`], [`resolve`] over an [`AwsEnvironment`]).
//! Nothing here ever formats a secret: errors name files, profiles and line numbers only.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::{S3Options, UrlStyle};

const MAX_SHARED_FILE_BYTES: u64 = 1 << 20;
const MAX_PASSWD_FILE_BYTES: u64 = 64 << 10;

/// An access key pair, with a session token for temporary credentials. Debug is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Credentials(<redacted>{})", if self.session_token.is_some() { ", session" } else { "" })
    }
}

/// Where the credentials came from: named in errors, re-read by the agent after a 403.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialOrigin {
    Anonymous,
    Environment,
    SharedFiles { profile: String, credentials_file: PathBuf, config_file: PathBuf },
    PasswdFile { path: PathBuf },
}

impl CredentialOrigin {
    /// A phrase for error sentences, e.g. `from the environment (AWS_ACCESS_KEY_ID)`.
    pub fn describe(&self) -> String {
        match self {
            CredentialOrigin::Anonymous => "(no credentials found: the request was anonymous)".into(),
            CredentialOrigin::Environment => "from the environment (AWS_ACCESS_KEY_ID)".into(),
            CredentialOrigin::SharedFiles { profile, credentials_file, config_file } => format!(
                "of AWS profile {profile:?} ({} / {})",
                credentials_file.display(),
                config_file.display()
            ),
            CredentialOrigin::PasswdFile { path } => format!("from s3.passwd_file {}", path.display()),
        }
    }

    /// Files can change under a running mount; the environment cannot (the agent has none).
    pub fn is_file_based(&self) -> bool {
        matches!(self, CredentialOrigin::SharedFiles { .. } | CredentialOrigin::PasswdFile { .. })
    }

    /// Reads the credentials again from a file-based origin; `Ok(None)` for the others.
    pub fn reread(&self, bucket: &str) -> Result<Option<S3Credentials>, String> {
        match self {
            CredentialOrigin::PasswdFile { path } => read_passwd_file(path, bucket).map(Some),
            CredentialOrigin::SharedFiles { profile, credentials_file, config_file } => {
                let profile = load_profile(credentials_file, config_file, profile)?;
                Ok(profile.and_then(|p| p.credentials().ok().flatten()))
            }
            CredentialOrigin::Anonymous | CredentialOrigin::Environment => Ok(None),
        }
    }
}

/// The process environment's AWS settings, captured once so that [`resolve`] stays pure.
#[derive(Clone, Debug, Default)]
pub struct AwsEnvironment {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub profile: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

/// The environment variables that carry secrets; the agent's environment is cleared of them.
pub const SECRET_ENV_VARS: &[&str] =
    &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"];

impl AwsEnvironment {
    pub fn from_env() -> AwsEnvironment {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        AwsEnvironment {
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN").or_else(|| var("AWS_SECURITY_TOKEN")),
            profile: var("AWS_PROFILE").or_else(|| var("AWS_DEFAULT_PROFILE")),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint_url: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            credentials_file: var("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from),
            config_file: var("AWS_CONFIG_FILE").map(PathBuf::from),
            home: var("HOME").map(PathBuf::from),
        }
    }

    fn shared_files(&self) -> (PathBuf, PathBuf) {
        let home = self.home.clone().unwrap_or_else(|| PathBuf::from("/root"));
        (
            self.credentials_file.clone().unwrap_or_else(|| home.join(".aws/credentials")),
            self.config_file.clone().unwrap_or_else(|| home.join(".aws/config")),
        )
    }
}

/// What [`resolve`] found.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub credentials: Option<S3Credentials>,
    pub origin: CredentialOrigin,
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / the profile's `endpoint_url`.
    pub endpoint_url: Option<String>,
    /// The profile's `s3 = \n addressing_style = path|virtual`.
    pub url_style: Option<UrlStyle>,
}

pub fn resolve(env: &AwsEnvironment, opts: &S3Options, bucket: &str) -> Result<Resolved, String> {
    let explicit_profile = opts.profile.clone().or_else(|| env.profile.clone());
    let profile_name = explicit_profile.clone().unwrap_or_else(|| "default".to_string());
    let (credentials_file, config_file) = env.shared_files();
    let profile = load_profile(&credentials_file, &config_file, &profile_name)?;
    if profile.is_none() && explicit_profile.is_some() {
        return Err(format!(
            "AWS profile {profile_name:?} is in neither {} nor {} (the config file names it [profile {profile_name}])",
            credentials_file.display(),
            config_file.display()
        ));
    }
    let region = opts.region.clone().or_else(|| env.region.clone()).or_else(|| profile.as_ref().and_then(|p| p.get("region")));
    let endpoint_url = env.endpoint_url.clone().or_else(|| profile.as_ref().and_then(|p| p.get("endpoint_url")));
    let url_style = match profile.as_ref().and_then(|p| p.get("s3.addressing_style")).as_deref() {
        Some("path") => Some(UrlStyle::Path),
        Some("virtual") => Some(UrlStyle::VirtualHost),
        _ => None,
    };
    let found = |credentials, origin| Resolved { credentials, origin, region: region.clone(), endpoint_url: endpoint_url.clone(), url_style };

    if let Some(path) = &opts.passwd_file {
        let creds = read_passwd_file(path, bucket)?;
        return Ok(found(Some(creds), CredentialOrigin::PasswdFile { path: path.clone() }));
    }
    match (&env.access_key_id, &env.secret_access_key) {
        (Some(ak), Some(sk)) => {
            let creds = S3Credentials { access_key_id: ak.clone(), secret_access_key: sk.clone(), session_token: env.session_token.clone() };
            return Ok(found(Some(creds), CredentialOrigin::Environment));
        }
        (Some(_), None) => return Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into()),
        (None, Some(_)) => return Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into()),
        (None, None) => {}
    }
    if let Some(p) = &profile {
        if let Some(creds) = p.credentials().map_err(|e| format!("AWS profile {profile_name:?}: {e}"))? {
            let origin = CredentialOrigin::SharedFiles { profile: profile_name, credentials_file, config_file };
            return Ok(found(Some(creds), origin));
        }
    }
    Ok(found(None, CredentialOrigin::Anonymous))
}

/// One profile's settings, the credentials file's over the config file's.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Lowercased keys; nested ones as `parent.key`.
    pub settings: Vec<(String, String)>,
}

impl Profile {
    pub fn get(&self, key: &str) -> Option<String> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
    }

    fn credentials(&self) -> Result<Option<S3Credentials>, String> {
        match (self.get("aws_access_key_id"), self.get("aws_secret_access_key")) {
            (Some(ak), Some(sk)) => Ok(Some(S3Credentials {
                access_key_id: ak,
                secret_access_key: sk,
                session_token: self.get("aws_session_token").or_else(|| self.get("aws_security_token")),
            })),
            (Some(_), None) => Err("aws_access_key_id without aws_secret_access_key".into()),
            (None, Some(_)) => Err("aws_secret_access_key without aws_access_key_id".into()),
            (None, None) => {
                for key in ["role_arn", "credential_process", "sso_session", "sso_start_url", "web_identity_token_file"] {
                    if self.get(key).is_some() {
                        return Err(format!(
                            "uses {key}, which erofs-fanotify does not support; export temporary keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) instead"
                        ));
                    }
                }
                Ok(None)
            }
        }
    }
}

/// The profile `name` from both shared files; `None` when neither has it.
pub fn load_profile(credentials_file: &Path, config_file: &Path, name: &str) -> Result<Option<Profile>, String> {
    let creds_text = read_optional(credentials_file)?;
    let config_text = read_optional(config_file)?;
    let creds = match &creds_text {
        Some(t) => parse_ini(t).map_err(|e| format!("{}: {e}", credentials_file.display()))?,
        None => Vec::new(),
    };
    let config = match &config_text {
        Some(t) => parse_ini(t).map_err(|e| format!("{}: {e}", config_file.display()))?,
        None => Vec::new(),
    };
    Ok(select_profile(&creds, &config, name))
}

/// Section rules: the credentials file names a profile `[NAME]`; the config file `[profile NAME]`,
/// or `[default]` (`[profile default]` also counts, and wins). A bare `[NAME]` in the config file
/// is not a profile (as in the AWS CLI).
pub fn select_profile(creds: &[IniSection], config: &[IniSection], name: &str) -> Option<Profile> {
    let from_config = config
        .iter()
        .filter(|s| config_section_profile(&s.name).as_deref() == Some(name))
        .max_by_key(|s| s.name.starts_with("profile")); // `[profile default]` over `[default]`
    let from_creds = creds.iter().find(|s| s.name == name);
    if from_config.is_none() && from_creds.is_none() {
        return None;
    }
    let mut settings: Vec<(String, String)> = from_creds.map(|s| s.entries.clone()).unwrap_or_default();
    if let Some(c) = from_config {
        for (k, v) in &c.entries {
            if !settings.iter().any(|(sk, _)| sk == k) {
                settings.push((k.clone(), v.clone()));
            }
        }
    }
    Some(Profile { settings })
}

fn config_section_profile(section: &str) -> Option<String> {
    if section == "default" {
        return Some("default".into());
    }
    let mut words = section.splitn(2, char::is_whitespace);
    match (words.next(), words.next()) {
        (Some("profile"), Some(rest)) if !rest.trim().is_empty() => Some(rest.trim().to_string()),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IniSection {
    pub name: String,
    /// Lowercased keys in file order; sub-properties (indented under `key =`) as `key.sub`.
    pub entries: Vec<(String, String)>,
}

/// The AWS dialect of INI: `[section]`, `key = value`, `#`/`;` comment lines, indented
/// sub-properties under a key with an empty value, indented continuation lines otherwise.
pub fn parse_ini(text: &str) -> Result<Vec<IniSection>, String> {
    let mut sections: Vec<IniSection> = Vec::new();
    // The key an indented line belongs to, and whether it opened a nested block.
    let mut parent: Option<(String, bool)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let indented = raw.starts_with([' ', '\t']);
        if trimmed.starts_with('[') {
            let name = trimmed
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .ok_or_else(|| format!("line {line_no}: a section header must end with ']'"))?;
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.push(IniSection { name, entries: Vec::new() });
            parent = None;
            continue;
        }
        let section = sections.last_mut().ok_or_else(|| format!("line {line_no}: a setting before any [section]"))?;
        if indented {
            if let Some((key, nested)) = &parent {
                if *nested {
                    let (k, v) = trimmed.split_once('=').ok_or_else(|| format!("line {line_no}: expected key = value"))?;
                    section.entries.push((format!("{key}.{}", k.trim().to_ascii_lowercase()), v.trim().to_string()));
                } else if let Some(last) = section.entries.last_mut() {
                    last.1.push('\n');
                    last.1.push_str(trimmed);
                }
                continue;
            }
        }
        let (k, v) = trimmed.split_once('=').ok_or_else(|| format!("line {line_no}: expected key = value"))?;
        let key = k.trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(format!("line {line_no}: a setting without a name"));
        }
        let value = v.trim().to_string();
        parent = Some((key.clone(), value.is_empty()));
        section.entries.push((key, value));
    }
    Ok(sections)
}

/// s3fs's password file: `ACCESS_KEY:SECRET` (any bucket) or `BUCKET:ACCESS_KEY:SECRET` lines,
/// `#` comments. A line for `bucket` wins over a default one.
pub fn parse_passwd(text: &str, bucket: &str) -> Result<S3Credentials, String> {
    let mut default = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        let pair = |ak: &str, sk: &str| -> Result<S3Credentials, String> {
            if ak.is_empty() || sk.is_empty() {
                return Err(format!("line {}: an empty access key or secret", n + 1));
            }
            Ok(S3Credentials { access_key_id: ak.to_string(), secret_access_key: sk.to_string(), session_token: None })
        };
        match fields.as_slice() {
            [b, ak, sk] if *b == bucket => return pair(ak, sk),
            [_, _, _] => {}
            [ak, sk] => {
                if default.is_none() {
                    default = Some(pair(ak, sk)?);
                }
            }
            // The line holds a secret: never quote it.
            _ => return Err(format!("line {}: expected ACCESS_KEY:SECRET or BUCKET:ACCESS_KEY:SECRET", n + 1)),
        }
    }
    default.ok_or_else(|| format!("no line for bucket {bucket:?} and no default ACCESS_KEY:SECRET line"))
}

/// Reads and parses `s3.passwd_file`: a regular file that neither group nor others may access.
pub fn read_passwd_file(path: &Path, bucket: &str) -> Result<S3Credentials, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open s3.passwd_file {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat s3.passwd_file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("s3.passwd_file {shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "s3.passwd_file {shown} is accessible by group or others (mode {mode:04o}); make it private: chmod 600 {shown}"
        ));
    }
    if meta.len() > MAX_PASSWD_FILE_BYTES {
        return Err(format!("s3.passwd_file {shown} is larger than {MAX_PASSWD_FILE_BYTES} bytes"));
    }
    let mut text = String::new();
    file.take(MAX_PASSWD_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read s3.passwd_file {shown}: {e}"))?;
    parse_passwd(&text, bucket).map_err(|e| format!("s3.passwd_file {shown}: {e}"))
}

fn read_optional(path: &Path) -> Result<Option<String>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_SHARED_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(ak: &str, sk: &str, token: Option<&str>) -> S3Credentials {
        S3Credentials { access_key_id: ak.into(), secret_access_key: sk.into(), session_token: token.map(Into::into) }
    }

    #[test]
    fn ini_dialect() {
        let text = "# comment\n[default]\nregion = eu-west-1\ns3 =\n  addressing_style = path\n  max_concurrent_requests=4\n\
                    ; other comment\n[profile  dev]\nAWS_Access_Key_Id=AK\nlong = a\n  b\n";
        let s = parse_ini(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "default");
        assert_eq!(
            s[0].entries,
            vec![
                ("region".to_string(), "eu-west-1".to_string()),
                ("s3".to_string(), String::new()),
                ("s3.addressing_style".to_string(), "path".to_string()),
                ("s3.max_concurrent_requests".to_string(), "4".to_string()),
            ]
        );
        assert_eq!(s[1].name, "profile dev");
        assert_eq!(s[1].entries[0], ("aws_access_key_id".to_string(), "AK".to_string()));
        assert_eq!(s[1].entries[1], ("long".to_string(), "a\nb".to_string()));
        assert!(parse_ini("key = v\n").is_err());
        assert!(parse_ini("[open\n").is_err());
        assert!(parse_ini("[s]\njunk\n").is_err());
    }

    #[test]
    fn profile_section_rules() {
        let creds_file = parse_ini("[default]\naws_access_key_id=CD\naws_secret_access_key=cd\n[dev]\naws_access_key_id=C1\naws_secret_access_key=c1\n[profile x]\naws_access_key_id=WRONG\naws_secret_access_key=w\n").unwrap();
        let config = parse_ini("[default]\nregion=r-default\n[profile dev]\nregion=r-dev\naws_access_key_id=IGNORED\n[bare]\nregion=r-bare\n[profile only]\naws_access_key_id=O\naws_secret_access_key=o\naws_session_token=t\n").unwrap();
        let dev = select_profile(&creds_file, &config, "dev").unwrap();
        assert_eq!(dev.get("region").as_deref(), Some("r-dev"));
        assert_eq!(dev.credentials().unwrap(), Some(creds("C1", "c1", None)));
        let only = select_profile(&creds_file, &config, "only").unwrap();
        assert_eq!(only.credentials().unwrap(), Some(creds("O", "o", Some("t"))));
        // `[bare]` in the config file and `[profile x]` in the credentials file are not profiles.
        assert!(select_profile(&creds_file, &config, "bare").is_none());
        assert!(select_profile(&creds_file, &config, "x").is_none());
        let d = select_profile(&creds_file, &config, "default").unwrap();
        assert_eq!(d.get("region").as_deref(), Some("r-default"));
        let both = parse_ini("[default]\nregion=plain\n[profile default]\nregion=prefixed\n").unwrap();
        assert_eq!(select_profile(&[], &both, "default").unwrap().get("region").as_deref(), Some("prefixed"));
        let role = parse_ini("[profile r]\nrole_arn=arn:aws:iam::1:role/x\n").unwrap();
        assert!(select_profile(&[], &role, "r").unwrap().credentials().unwrap_err().contains("role_arn"));
    }

    #[test]
    fn passwd_lines() {
        let text = "# s3fs\nother-bucket:OA:os\nDA:ds\nmy-bucket:MA:ms\n";
        assert_eq!(parse_passwd(text, "my-bucket").unwrap(), creds("MA", "ms", None));
        assert_eq!(parse_passwd(text, "third").unwrap(), creds("DA", "ds", None));
        assert!(parse_passwd("other:OA:os\n", "mine").is_err());
        let err = parse_passwd("AK:SECRETVALUE:x:y\n", "b").unwrap_err();
        assert!(!err.contains("SECRETVALUE"), "{err}");
        assert!(parse_passwd(":sk\n", "b").is_err());
    }

    fn env_with_files(dir: &Path) -> AwsEnvironment {
        AwsEnvironment {
            credentials_file: Some(dir.join("credentials")),
            config_file: Some(dir.join("config")),
            ..Default::default()
        }
    }

    #[test]
    fn resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("credentials"), "[default]\naws_access_key_id=FA\naws_secret_access_key=fs\n").unwrap();
        std::fs::write(dir.path().join("config"), "[default]\nregion=eu-north-1\n[profile p]\naws_access_key_id=PA\naws_secret_access_key=ps\nregion=ap-south-1\n").unwrap();
        let mut env = env_with_files(dir.path());
        let opts = S3Options::default();

        let r = resolve(&env, &opts, "b").unwrap();
        assert_eq!(r.credentials, Some(creds("FA", "fs", None)));
        assert_eq!(r.region.as_deref(), Some("eu-north-1"));
        assert!(matches!(r.origin, CredentialOrigin::SharedFiles { ref profile, .. } if profile == "default"));

        env.profile = Some("p".into());
        let r = resolve(&env, &opts, "b").unwrap();
        assert_eq!(r.credentials, Some(creds("PA", "ps", None)));
        assert_eq!(r.region.as_deref(), Some("ap-south-1"));
        assert_eq!(r.origin.reread("b").unwrap(), Some(creds("PA", "ps", None)));

        env.access_key_id = Some("EA".into());
        env.secret_access_key = Some("es".into());
        env.session_token = Some("et".into());
        env.region = Some("us-west-2".into());
        let r = resolve(&env, &opts, "b").unwrap();
        assert_eq!(r.credentials, Some(creds("EA", "es", Some("et"))));
        assert_eq!(r.origin, CredentialOrigin::Environment);
        assert_eq!(r.region.as_deref(), Some("us-west-2"));
        assert_eq!(r.origin.reread("b").unwrap(), None);

        env.profile = Some("missing".into());
        assert!(resolve(&env, &opts, "b").unwrap_err().contains("missing"));

        let anon = resolve(&env_with_files(&dir.path().join("nothing")), &opts, "b").unwrap();
        assert_eq!(anon.origin, CredentialOrigin::Anonymous);
        assert!(anon.credentials.is_none());

        let half = AwsEnvironment { access_key_id: Some("A".into()), ..env_with_files(dir.path()) };
        assert!(resolve(&half, &opts, "b").is_err());
    }

    #[test]
    fn passwd_file_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "AK:SK\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_passwd_file(&path, "b").unwrap_err();
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(read_passwd_file(&path, "b").is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_passwd_file(&path, "b").unwrap(), creds("AK", "SK", None));
        // The explicit option wins over the environment.
        let env = AwsEnvironment { access_key_id: Some("EA".into()), secret_access_key: Some("es".into()), ..Default::default() };
        let opts = S3Options { passwd_file: Some(path.clone()), ..Default::default() };
        let r = resolve(&env, &opts, "b").unwrap();
        assert_eq!(r.credentials, Some(creds("AK", "SK", None)));
        assert_eq!(r.origin, CredentialOrigin::PasswdFile { path });
        assert!(!format!("{:?}", r.credentials).contains("SK"));
    }
}
