//! Registry authentication: `WWW-Authenticate` challenges, Basic, and Bearer
//! tokens from the challenge's realm (anonymous, with a user and password,
//! or with an OAuth2 identity token).
//!
//! A mount lives for days and tokens for minutes: the [`Authenticator`] keeps
//! the current `Authorization` value with its expiry and a generation
//! number. A request that meets a 401 asks for a refresh naming the
//! generation it used, so many reads failing together cause one token
//! request, and the read is retried once with the new token.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use super::credentials::Credentials;
use super::OciError;

/// Docker's token spec: a token without `expires_in` lives 60 s.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Refresh this long before the stated expiry (clock skew, request time).
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum Challenge {
    Basic { realm: Option<String> },
    Bearer { realm: String, service: Option<String>, scope: Option<String>, error: Option<String> },
}

/// Parses a `WWW-Authenticate` value; the first Basic or Bearer challenge wins.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let mut rest = header.trim();
    while !rest.is_empty() {
        let (scheme, after) = match rest.find(|c: char| c.is_whitespace() || c == ',') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (params, remaining) = parse_params(after);
        rest = remaining.trim_start_matches([',', ' ']);
        let get = |k: &str| params.iter().find(|(pk, _)| pk.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic { realm: get("realm") });
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(Challenge::Bearer {
                realm: get("realm")?,
                service: get("service"),
                scope: get("scope"),
                error: get("error"),
            });
        }
        if scheme.is_empty() {
            break;
        }
    }
    None
}

/// `k=v, k="quoted \" v", …` up to the next scheme (a token without `=`).
fn parse_params(s: &str) -> (Vec<(String, String)>, &str) {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start_matches([',', ' ', '\t']);
        let Some(eq) = trimmed.find('=') else { return (out, trimmed) };
        let key = &trimmed[..eq];
        if key.is_empty() || key.contains([' ', ',', '"']) {
            return (out, trimmed);
        }
        let after = &trimmed[eq + 1..];
        if let Some(q) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n)
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            out.push((key.to_string(), val));
            rest = &q[end.min(q.len())..];
        } else {
            let end = after.find(',').unwrap_or(after.len());
            out.push((key.to_string(), after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
}

/// `application/x-www-form-urlencoded` encoding of `pairs`.
fn urlencode(pairs: &[(&str, String)]) -> String {
    let Ok(mut u) = reqwest::Url::parse("http://form.invalid/") else { return String::new() };
    u.query_pairs_mut().extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
    u.query().unwrap_or("").to_string()
}

pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The front end's authorization, handed to the agent so that its first
/// blob read does not repeat the challenge and token round trips.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuthHandoff {
    header: String,
    challenge: Option<Challenge>,
    /// Expiry as Unix milliseconds (wall clock: the config may be handed to a
    /// restarted worker much later); None: no known expiry.
    expires_unix_ms: Option<u64>,
}

impl std::fmt::Debug for AuthHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthHandoff(<redacted>)")
    }
}

struct AuthState {
    /// The `Authorization` value to send, if any.
    header: Option<String>,
    expires: Option<Instant>,
    generation: u64,
    /// The last Bearer challenge, to refresh before expiry without a 401.
    challenge: Option<Challenge>,
}

/// What a Bearer token is asked to grant beyond pulling the repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Push to the repository too (`repository:NAME:pull,push`).
    pub push: bool,
    /// Other repositories of the same registry to pull from (cross-repository blob mounts).
    pub mount_from: Vec<String>,
}

/// The scopes of a token request. Pulls ask for what the challenge names
/// when it is about this repository, else `repository:NAME:pull`. Pushes
/// always ask for `pull,push` on the repository (a HEAD's challenge names
/// `pull` only: taking it would cost a second 401 and token at the first
/// upload), keep any other scope of the challenge, and ask for pull on the
/// repositories blobs are mounted from.
pub fn token_scopes(repository: &str, access: &Access, challenge_scope: Option<&str>) -> Vec<String> {
    let pull = format!("repository:{repository}:pull");
    if !access.push && access.mount_from.is_empty() {
        return vec![challenge_scope.filter(|s| s.contains(repository)).unwrap_or(&pull).to_string()];
    }
    let own_prefix = format!("repository:{repository}:");
    let mut scopes = vec![if access.push { format!("{own_prefix}pull,push") } else { pull }];
    for s in challenge_scope.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        let covered = s
            .strip_prefix(&own_prefix)
            .is_some_and(|actions| actions.split(',').all(|a| a == "pull" || (a == "push" && access.push)));
        if !covered && !scopes.iter().any(|have| have == s) {
            scopes.push(s.to_string());
        }
    }
    for from in &access.mount_from {
        let s = format!("repository:{from}:pull");
        if from != repository && !scopes.contains(&s) {
            scopes.push(s);
        }
    }
    scopes
}

/// The authorization of one endpoint (registry or mirror) for one repository.
pub struct Authenticator {
    /// `host[:port]`, for messages.
    host: String,
    repository: String,
    credentials: Option<Credentials>,
    access: Access,
    state: Mutex<AuthState>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Authenticator {
    pub fn new(host: &str, repository: &str, credentials: Option<Credentials>) -> Authenticator {
        Authenticator {
            host: host.to_string(),
            repository: repository.to_string(),
            credentials,
            access: Access::default(),
            state: Mutex::new(AuthState { header: None, expires: None, generation: 0, challenge: None }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Asks tokens for `access` (push, mounts) besides pulling.
    pub fn with_access(mut self, access: Access) -> Authenticator {
        self.access = access;
        self
    }

    /// The current authorization, if any, for another process.
    pub fn export(&self) -> Option<AuthHandoff> {
        let s = self.state.lock();
        let header = s.header.clone()?;
        let expires_unix_ms = s.expires.map(|e| {
            let left = e.saturating_duration_since(Instant::now());
            let at = std::time::SystemTime::now() + left;
            at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        Some(AuthHandoff { header, challenge: s.challenge.clone(), expires_unix_ms })
    }

    /// Starts from a handed-over authorization (it is renewed as usual).
    pub fn import(&self, h: &AuthHandoff) {
        let mut s = self.state.lock();
        s.header = Some(h.header.clone());
        s.challenge = h.challenge.clone();
        s.expires = h.expires_unix_ms.map(|ms| {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
            let left = at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO);
            Instant::now() + left.min(Duration::from_secs(365 * 86_400))
        });
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    fn snapshot(&self) -> (Option<String>, Option<Instant>, u64, bool) {
        let s = self.state.lock();
        (s.header.clone(), s.expires, s.generation, s.challenge.is_some())
    }

    /// The `Authorization` value to send and its generation. A Bearer token
    /// about to expire is renewed first, saving the 401 round trip.
    pub async fn header(&self, client: &reqwest::Client) -> Result<(Option<String>, u64), OciError> {
        let (header, expires, generation, has_challenge) = self.snapshot();
        if has_challenge && expires.is_some_and(|e| Instant::now() + EXPIRY_MARGIN >= e) {
            self.refresh(client, None, generation).await?;
            let (header, _, generation, _) = self.snapshot();
            return Ok((header, generation));
        }
        Ok((header, generation))
    }

    /// Answers a challenge (or renews from the last one when `challenge` is
    /// None). `seen` is the generation the failed request used: when another
    /// request refreshed meanwhile, nothing is done.
    pub async fn refresh(&self, client: &reqwest::Client, challenge: Option<&str>, seen: u64) -> Result<(), OciError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let stored = {
            let s = self.state.lock();
            if s.generation != seen {
                return Ok(());
            }
            s.challenge.clone()
        };
        let parsed = match challenge {
            Some(text) => parse_challenge(text)
                .ok_or_else(|| OciError::Protocol(format!("{}: unsupported authentication challenge", self.host)))?,
            None => stored.ok_or_else(|| OciError::Protocol(format!("{}: no challenge to renew the token", self.host)))?,
        };
        let (header, expires, keep) = match &parsed {
            Challenge::Basic { .. } => match &self.credentials {
                Some(Credentials::Basic { username, password }) => {
                    (Some(format!("Basic {}", base64_encode(format!("{username}:{password}").as_bytes()))), None, None)
                }
                _ => return Err(OciError::AuthRequired { registry: self.host.clone() }),
            },
            Challenge::Bearer { realm, service, scope, .. } => {
                let (token, lifetime) = self.fetch_token(client, realm, service.as_deref(), scope.as_deref()).await?;
                (Some(format!("Bearer {token}")), Some(Instant::now() + lifetime), Some(parsed.clone()))
            }
        };
        let mut s = self.state.lock();
        s.header = header;
        s.expires = expires;
        s.challenge = keep;
        s.generation += 1;
        tracing::debug!(host = %self.host, generation = s.generation, "registry authorization renewed");
        Ok(())
    }

    async fn fetch_token(
        &self,
        client: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        challenge_scope: Option<&str>,
    ) -> Result<(String, Duration), OciError> {
        let realm_url = reqwest::Url::parse(realm)
            .map_err(|_| OciError::Protocol(format!("{}: bad token realm in the challenge", self.host)))?;
        if !matches!(realm_url.scheme(), "http" | "https") {
            return Err(OciError::Protocol(format!("{}: bad token realm in the challenge", self.host)));
        }
        let scopes = token_scopes(&self.repository, &self.access, challenge_scope);
        let realm_host = realm_url.host_str().unwrap_or("?").to_string();
        let request = match &self.credentials {
            Some(Credentials::IdentityToken { token }) => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_string()),
                    ("refresh_token", token.clone()),
                    ("client_id", "erofs-fanotify".to_string()),
                    // OAuth2: one space-separated list.
                    ("scope", scopes.join(" ")),
                ];
                if let Some(s) = service {
                    form.push(("service", s.to_string()));
                }
                client
                    .post(realm_url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(urlencode(&form))
            }
            creds => {
                let mut url = realm_url;
                {
                    let mut q = url.query_pairs_mut();
                    // Docker's token protocol: one parameter per scope.
                    for scope in &scopes {
                        q.append_pair("scope", scope);
                    }
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    if let Some(Credentials::Basic { username, .. }) = creds {
                        q.append_pair("account", username);
                    }
                }
                let mut r = client.get(url);
                if let Some(Credentials::Basic { username, password }) = creds {
                    r = r.basic_auth(username, Some(password));
                }
                r
            }
        };
        let resp = request
            .send()
            .await
            .map_err(|e| OciError::from(crate::http::send_error(&e, &format!("token server {realm_host}"))))?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            401 | 403 if self.credentials.is_some() => return Err(OciError::AuthRefused { registry: self.host.clone() }),
            401 | 403 => return Err(OciError::AuthRequired { registry: self.host.clone() }),
            500..=599 | 408 | 429 => {
                return Err(OciError::Server { endpoint: format!("token server {realm_host}"), status })
            }
            _ => return Err(OciError::Protocol(format!("token server {realm_host} answered HTTP {status}"))),
        }
        let body = crate::http::read_capped(resp, MAX_TOKEN_RESPONSE).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| OciError::Protocol(format!("token server {realm_host} sent a malformed token")))?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| OciError::Protocol(format!("token server {realm_host} sent no token")))?;
        if !token.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(OciError::Protocol(format!("token server {realm_host} sent a malformed token")));
        }
        let lifetime = parsed.expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Ok((token, lifetime.min(Duration::from_secs(365 * 86400))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
                error: None,
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic { realm: Some("Registry Realm".into()) }));
        assert_eq!(parse_challenge("basic"), Some(Challenge::Basic { realm: None }));
        let c = parse_challenge(
            r#"Bearer realm="http://t/x",service="s",scope="repository:r:pull",error="insufficient_scope",error_description="a \"q\" b""#,
        );
        assert!(matches!(c, Some(Challenge::Bearer { error: Some(ref e), .. }) if e == "insufficient_scope"));
        // Unquoted values, an unknown scheme first.
        assert_eq!(
            parse_challenge(r#"Negotiate, Bearer realm=http://t/x, service=s"#),
            Some(Challenge::Bearer { realm: "http://t/x".into(), service: Some("s".into()), scope: None, error: None })
        );
        assert_eq!(parse_challenge("Bearer service=s"), None, "a Bearer challenge needs a realm");
        assert_eq!(parse_challenge(""), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), Some(Challenge::Bearer { realm: "unterminated".into(), service: None, scope: None, error: None }));
    }

    #[test]
    fn token_scopes_for_pulls_and_pushes() {
        let pull = Access::default();
        // Pulls: exactly what they always asked for.
        assert_eq!(token_scopes("a/b", &pull, Some("repository:a/b:pull")), ["repository:a/b:pull"]);
        assert_eq!(token_scopes("a/b", &pull, Some("repository:other:pull")), ["repository:a/b:pull"]);
        assert_eq!(token_scopes("a/b", &pull, None), ["repository:a/b:pull"]);
        let push = Access { push: true, mount_from: vec![] };
        // A HEAD's pull challenge still gets a push token.
        assert_eq!(token_scopes("a/b", &push, Some("repository:a/b:pull")), ["repository:a/b:pull,push"]);
        assert_eq!(token_scopes("a/b", &push, Some("repository:a/b:pull,push")), ["repository:a/b:pull,push"]);
        assert_eq!(token_scopes("a/b", &push, None), ["repository:a/b:pull,push"]);
        // Anything else the registry asks for is kept.
        assert_eq!(
            token_scopes("a/b", &push, Some("repository:a/b:delete registry:catalog:*")),
            ["repository:a/b:pull,push", "repository:a/b:delete", "registry:catalog:*"]
        );
        let mount = Access { push: true, mount_from: vec!["base/img".into(), "a/b".into(), "base/img".into()] };
        assert_eq!(
            token_scopes("a/b", &mount, Some("repository:base/img:pull")),
            ["repository:a/b:pull,push", "repository:base/img:pull"]
        );
    }

    #[test]
    fn base64_roundtrip() {
        for s in ["", "a", "ab", "abc", "user:pass", "ü:ß"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(super::super::credentials::base64_decode(&e).unwrap(), s.as_bytes());
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[tokio::test]
    async fn basic_challenge_needs_credentials() {
        let client = reqwest::Client::new();
        let anon = Authenticator::new("r", "x", None);
        assert!(matches!(anon.refresh(&client, Some("Basic realm=x"), 0).await, Err(OciError::AuthRequired { .. })));
        let a = Authenticator::new("r", "x", Some(Credentials::Basic { username: "u".into(), password: "p".into() }));
        a.refresh(&client, Some("Basic realm=x"), 0).await.unwrap();
        let (h, generation) = a.header(&client).await.unwrap();
        assert_eq!(h.as_deref(), Some("Basic dTpw"));
        assert_eq!(generation, 1);
        // A stale generation does nothing.
        a.refresh(&client, Some("Bearer realm=\"http://127.0.0.1:9/\""), 0).await.unwrap();
        assert_eq!(a.header(&client).await.unwrap().1, 1);
    }
}
