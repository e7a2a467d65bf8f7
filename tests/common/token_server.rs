//! A registry token server for the tests (the Docker token protocol that distribution's `auth: token`
//! expects), in process on 127.0.0.1.
//!
//! `GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...]` (also `POST /token` with the OAuth2
//! form fields) answers `{"token", "access_token", "expires_in"}`. A request with `Authorization: Basic`
//! must name a known user with the right password (else 401); without one it is anonymous. The policy
//! decides what a token grants: pull for anonymous requests when `anonymous_pull`, pull for known users,
//! never pull on `no_pull_repos` (the registry then refuses with `insufficient_scope`); push only for known
//! users and only with `users_may_push`.
//!
//! Tokens are JWTs signed RS256 with `openssl dgst -sha256 -sign` (no crypto crate needed). The signing key
//! has a self-signed certificate that is the registry's `rootcertbundle`; the JWT header carries it as a
//! one-element `x5c` chain, which distribution 2.8 verifies against the bundle
//! (registry/auth/token/token.go: `x5c` is tried first, then `jwk`, then `kid`).
//!
//! Expiry: distribution accepts a token until `exp + 60 s` (its clock-skew leeway). To make a token that
//! really stops working after `lifetime` (a few seconds, so a test can outlive it), the server writes
//! `exp = now + lifetime - 60 s` and reports `expires_in = lifetime` (or `reported_expires_in`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::http_server::{HttpServer, Logged, Reply, Request};

pub const ISSUER: &str = "erofs-fanotify-test-issuer";
pub const SERVICE: &str = "erofs-fanotify-test-registry";
/// distribution's `token.Leeway`.
const REGISTRY_LEEWAY_SECS: i64 = 60;

/// What tokens grant.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    /// Anonymous token requests get pull access.
    pub anonymous_pull: bool,
    /// (user, password) pairs accepted with Basic auth on the token request; they get pull access.
    pub users: Vec<(String, String)>,
    /// Repositories no token may pull from.
    pub no_pull_repos: Vec<String>,
    /// How long an issued token is accepted by the registry.
    pub lifetime: Duration,
    /// `expires_in` to report instead of `lifetime`: a longer value makes a client that refreshes tokens
    /// ahead of time meet the registry's 401 for an expired token anyway.
    pub reported_expires_in: Option<Duration>,
    /// Known users (Basic auth on the token request) also get push when they ask for it.
    pub users_may_push: bool,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            anonymous_pull: true,
            users: Vec::new(),
            no_pull_repos: Vec::new(),
            lifetime: Duration::from_secs(300),
            reported_expires_in: None,
            users_may_push: false,
        }
    }
}

struct Signer {
    key: PathBuf,
    cert_pem: PathBuf,
    /// base64 (standard) DER of the certificate, for `x5c`.
    cert_der_b64: String,
    next_id: AtomicU64,
}

pub struct TokenServer {
    server: HttpServer,
    signer: Arc<Signer>,
    policy: Arc<Mutex<TokenPolicy>>,
    issued: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(policy: TokenPolicy) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("erofs-token-server-")
            .tempdir()
            .expect("token server tempdir");
        let signer = Arc::new(Signer::generate(dir.path()));
        let policy = Arc::new(Mutex::new(policy));
        let issued = Arc::new(AtomicU64::new(0));
        let (h_signer, h_policy, h_issued) = (signer.clone(), policy.clone(), issued.clone());
        let server = HttpServer::start("token-server", move |request| {
            let policy = h_policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let reply = answer(request, &policy, &h_signer);
            if reply.status == 200 {
                h_issued.fetch_add(1, Ordering::SeqCst);
            }
            reply
        });
        TokenServer {
            server,
            signer,
            policy,
            issued,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("{}/token", self.server.base_url())
    }

    /// The `auth:` section for a registry that trusts this server (append via `RegistryConfig::extra_yaml`).
    pub fn registry_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.signer.cert_pem.display()
        )
    }

    /// A token granting `actions` on each repository, accepted for `lifetime` (for the harness's pushes).
    pub fn mint(&self, access: &[(&str, &[&str])], lifetime: Duration) -> String {
        let access: Vec<serde_json::Value> = access
            .iter()
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        self.signer.token("harness", access, lifetime)
    }

    /// `Bearer <token>` with pull and push on `repos`, valid for an hour.
    pub fn push_auth(&self, repos: &[&str]) -> String {
        let actions: &[&str] = &["pull", "push"];
        let access: Vec<(&str, &[&str])> = repos.iter().map(|r| (*r, actions)).collect();
        format!("Bearer {}", self.mint(&access, Duration::from_secs(3600)))
    }

    pub fn set_policy(&self, policy: TokenPolicy) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// Tokens handed out to clients so far (not counting `mint`).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    /// Every request the token endpoint saw.
    pub fn requests(&self) -> Vec<Logged> {
        self.server.requests()
    }
}

fn answer(request: &Request, policy: &TokenPolicy, signer: &Signer) -> Reply {
    if request.path() != "/token" || !(request.method == "GET" || request.method == "POST") {
        return Reply::new(404);
    }
    // GET: query parameters. POST (OAuth2): form body, with username/password fields.
    let mut params = request.query();
    if request.method == "POST" {
        let form = Request {
            method: String::new(),
            target: format!("/?{}", String::from_utf8_lossy(&request.body)),
            headers: Vec::new(),
            body: Vec::new(),
        };
        params.extend(form.query());
    }
    let param = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    if let Some(service) = param("service") {
        if service != SERVICE {
            return Reply::json(
                400,
                &json!({"errors": [{"code": "UNSUPPORTED", "message": format!("unknown service {service}")}]}),
            );
        }
    }
    let basic = request
        .header("authorization")
        .and_then(|h| {
            h.strip_prefix("Basic ")
                .or_else(|| h.strip_prefix("basic "))
        })
        .and_then(|b| base64_decode(b.trim()))
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let form_credentials = match (param("username"), param("password")) {
        (Some(u), Some(p)) => Some((u, p)),
        _ => None,
    };
    let credentials = basic.or(form_credentials);
    let subject = match &credentials {
        Some((user, password)) => {
            if !policy.users.iter().any(|(u, p)| u == user && p == password) {
                return Reply::json(
                    401,
                    &json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication failed"}]}),
                )
                .header("WWW-Authenticate", "Basic realm=\"token\"");
            }
            user.clone()
        }
        None => String::new(),
    };
    let may_pull = |repo: &str| {
        !policy.no_pull_repos.iter().any(|r| r == repo)
            && (credentials.is_some() || policy.anonymous_pull)
    };
    let mut access = Vec::new();
    for (key, scope) in &params {
        if key != "scope" {
            continue;
        }
        // A scope parameter may hold several space-separated scopes.
        for scope in scope.split(' ').filter(|s| !s.is_empty()) {
            let Some((rest, actions)) = scope.rsplit_once(':') else {
                continue;
            };
            let Some((kind, name)) = rest.split_once(':') else {
                continue;
            };
            if kind != "repository" {
                continue;
            }
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| {
                    (*a == "pull" && may_pull(name))
                        || (*a == "push" && policy.users_may_push && credentials.is_some())
                })
                .collect();
            access.push(json!({"type": "repository", "name": name, "actions": granted}));
        }
    }
    let token = signer.token(&subject, access, policy.lifetime);
    Reply::json(
        200,
        &json!({
            "token": token,
            "access_token": token,
            "expires_in": policy.reported_expires_in.unwrap_or(policy.lifetime).as_secs().max(1),
        }),
    )
}

impl Signer {
    fn generate(dir: &Path) -> Signer {
        let key = dir.join("key.pem");
        let cert_pem = dir.join("cert.pem");
        let cert_der = dir.join("cert.der");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            path_str(&key),
            "-out",
            path_str(&cert_pem),
            "-days",
            "2",
            "-subj",
            "/CN=erofs-fanotify test token issuer",
        ]);
        openssl(&[
            "x509",
            "-in",
            path_str(&cert_pem),
            "-outform",
            "DER",
            "-out",
            path_str(&cert_der),
        ]);
        let der = std::fs::read(&cert_der).expect("read cert.der");
        Signer {
            key,
            cert_pem,
            cert_der_b64: base64_std(&der),
            next_id: AtomicU64::new(1),
        }
    }

    fn token(&self, subject: &str, access: Vec<serde_json::Value>, lifetime: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]});
        let claims = json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + lifetime.as_secs() as i64 - REGISTRY_LEEWAY_SECS,
            "nbf": now - 1,
            "iat": now,
            "jti": format!("test-{}-{}", std::process::id(), self.next_id.fetch_add(1, Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64_url(&serde_json::to_vec(&header).expect("json")),
            base64_url(&serde_json::to_vec(&claims).expect("json"))
        );
        let signature = sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", base64_url(&signature))
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (JWS "RS256").
fn sign(key: &Path, data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign", path_str(key)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl dgst");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write to openssl");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(
        out.status.success(),
        "openssl dgst -sign failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const STD_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding (HTTP Basic, docker config `auth`, x5c).
pub fn base64_std(data: &[u8]) -> String {
    encode(data, STD_ALPHABET, true)
}

/// URL-safe base64 without padding (JWS).
pub fn base64_url(data: &[u8]) -> String {
    let mut alphabet = *STD_ALPHABET;
    alphabet[62] = b'-';
    alphabet[63] = b'_';
    encode(data, &alphabet, false)
}

/// Decodes standard or URL-safe base64 (padding optional); None on bad input.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        bits = ((bits << 6) | u32::from(v)) & 0xFFFF;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    Some(out)
}

/// `Basic base64(user:password)`
pub fn basic_auth(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64_std(format!("{user}:{password}").as_bytes())
    )
}
