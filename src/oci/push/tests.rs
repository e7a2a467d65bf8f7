//! The write side against a small in-memory registry on 127.0.0.1 that
//! speaks the distribution protocol the way docker-registry 2.8 does
//! (upload sessions with Location and Range, Content-Range on PATCH,
//! `?digest=` on the closing PUT, cross-repository mounts), optionally with
//! the referrers API and `OCI-Subject`, and optionally behind Bearer tokens.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::oci::auth::Access;

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers.get(n).map(String::as_str)
    }
    fn q(&self, k: &str) -> Option<&str> {
        self.query.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn resp(status: u16) -> Resp {
    Resp { status, headers: Vec::new(), body: Vec::new() }
}

impl Resp {
    fn h(mut self, k: &str, v: impl Into<String>) -> Resp {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn b(mut self, body: impl Into<Vec<u8>>) -> Resp {
        self.body = body.into();
        self
    }
}

#[derive(Default)]
struct Config {
    referrers_api: bool,
    bearer: bool,
    /// Tokens never grant push.
    deny_push: bool,
    min_chunk: Option<u64>,
    /// PATCHes to answer 503 (without storing) before serving again.
    fail_patches: AtomicU32,
    /// Which PATCH (1-based) starts failing.
    fail_from_patch: u32,
}

#[derive(Default)]
struct State {
    /// (repo, digest) -> bytes
    blobs: HashMap<(String, String), Vec<u8>>,
    uploads: HashMap<String, Vec<u8>>,
    /// (repo, digest) -> (media type, bytes)
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    tags: HashMap<(String, String), String>,
    next: u64,
    tokens: Vec<Vec<String>>,
}

struct Fake {
    port: u16,
    state: Arc<Mutex<State>>,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Fake {
    fn start(config: Config) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let config = Arc::new(config);
        let patches = Arc::new(AtomicU64::new(0));
        let (s, l, c, p) = (state.clone(), log.clone(), config.clone(), patches.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, l, c, p) = (s.clone(), l.clone(), c.clone(), p.clone());
                std::thread::spawn(move || serve(conn, port, s, l, c, p));
            }
        });
        Fake { port, state, log }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn repo(&self, name: &str) -> Repository {
        self.repo_with(name, Access { push: true, mount_from: vec!["base".into()] })
    }

    fn repo_with(&self, name: &str, access: Access) -> Repository {
        let client = crate::http::build_client(&crate::http::ClientConfig::default()).unwrap();
        let host = format!("127.0.0.1:{}", self.port);
        let auth = Authenticator::new(&host, name, None).with_access(access);
        let ep = Endpoint::new(&self.base(), name, false, auth).unwrap();
        Repository::with_endpoint(client, ep, Reference::parse(&format!("{host}/{name}:latest")).unwrap())
    }

    fn methods(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|r| r.path != "/token").map(|r| r.method.clone()).collect()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    fn blob(&self, repo: &str, digest: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().blobs.get(&(repo.to_string(), digest.to_string())).cloned()
    }

    fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256_digest(data);
        self.state.lock().unwrap().blobs.insert((repo.into(), d.clone()), data.to_vec());
        d
    }

    fn manifest_by_tag(&self, repo: &str, tag: &str) -> Option<Vec<u8>> {
        let s = self.state.lock().unwrap();
        let d = s.tags.get(&(repo.to_string(), tag.to_string()))?;
        s.manifests.get(&(repo.to_string(), d.clone())).map(|(_, b)| b.clone())
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    }
    let url = reqwest::Url::parse(&format!("http://x{target}")).ok()?;
    let query = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    Some(Req { method, path: url.path().to_string(), query, headers, body })
}

fn serve(conn: TcpStream, port: u16, state: Arc<Mutex<State>>, log: Arc<Mutex<Vec<Req>>>, config: Arc<Config>, patches: Arc<AtomicU64>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    while let Some(req) = read_request(&mut reader) {
        log.lock().unwrap().push(req.clone());
        let r = handle(&req, port, &state, &config, &patches);
        let mut head = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", r.status, r.body.len());
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() || (req.method != "HEAD" && out.write_all(&r.body).is_err()) {
            return;
        }
    }
}

fn err(status: u16, code: &str) -> Resp {
    resp(status).h("Content-Type", "application/json").b(format!(r#"{{"errors":[{{"code":"{code}","message":"fake says {code}"}}]}}"#))
}

fn handle(req: &Req, port: u16, state: &Mutex<State>, config: &Config, patches: &AtomicU64) -> Resp {
    if req.path == "/token" {
        let scopes: Vec<String> = req.query.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
        let granted = if config.deny_push { scopes.join("+").replace(",push", "") } else { scopes.join("+") };
        let token = format!("tok-{}", granted.replace([':', ','], "."));
        state.lock().unwrap().tokens.push(scopes);
        return resp(200).b(format!(r#"{{"token":"{token}","expires_in":300}}"#));
    }
    let Some(rest) = req.path.strip_prefix("/v2/") else { return resp(404) };
    let write = !matches!(req.method.as_str(), "GET" | "HEAD");
    if config.bearer {
        let auth = req.header("authorization").unwrap_or("");
        let ok = auth.starts_with("Bearer tok-") && (!write || auth.contains(".push"));
        if !ok {
            let repo = rest.split("/blobs/").next().unwrap_or("").split("/manifests/").next().unwrap_or("");
            let scope = if write { format!("repository:{repo}:pull,push") } else { format!("repository:{repo}:pull") };
            return err(401, "UNAUTHORIZED").h(
                "WWW-Authenticate",
                format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="{scope}""#),
            );
        }
    }
    let mut s = state.lock().unwrap();
    for (sep, kind) in [("/blobs/uploads/", "upload"), ("/blobs/", "blob"), ("/manifests/", "manifest"), ("/referrers/", "referrers")] {
        let Some((repo, tail)) = rest.split_once(sep) else { continue };
        let repo = repo.to_string();
        return match (kind, req.method.as_str()) {
            ("upload", "POST") => {
                if let (Some(d), Some(from)) = (req.q("mount"), req.q("from")) {
                    if let Some(b) = s.blobs.get(&(from.to_string(), d.to_string())).cloned() {
                        s.blobs.insert((repo.clone(), d.to_string()), b);
                        return resp(201).h("Location", format!("/v2/{repo}/blobs/{d}"));
                    }
                }
                s.next += 1;
                let id = format!("u{}", s.next);
                s.uploads.insert(id.clone(), Vec::new());
                let mut r = resp(202).h("Location", format!("/v2/{repo}/blobs/uploads/{id}?_state=s0")).h("Range", "0-0");
                if let Some(m) = config.min_chunk {
                    r = r.h("OCI-Chunk-Min-Length", m.to_string());
                }
                r
            }
            ("upload", "PATCH") => {
                let n = patches.fetch_add(1, Ordering::SeqCst) + 1;
                if n >= config.fail_from_patch as u64 && config.fail_from_patch > 0 && config.fail_patches.load(Ordering::SeqCst) > 0 {
                    config.fail_patches.fetch_sub(1, Ordering::SeqCst);
                    return err(503, "UNAVAILABLE");
                }
                let Some(up) = s.uploads.get_mut(tail) else { return err(404, "BLOB_UPLOAD_UNKNOWN") };
                let start: u64 = req.header("content-range").and_then(|r| r.split('-').next()).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
                if start != up.len() as u64 || req.header("content-length").is_none() {
                    return err(416, "BLOB_UPLOAD_INVALID");
                }
                up.extend_from_slice(&req.body);
                let end = up.len().saturating_sub(1);
                resp(202).h("Location", format!("/v2/{repo}/blobs/uploads/{tail}?_state=s{}", up.len())).h("Range", format!("0-{end}"))
            }
            ("upload", "GET") => {
                let Some(up) = s.uploads.get(tail) else { return err(404, "BLOB_UPLOAD_UNKNOWN") };
                let end = up.len().saturating_sub(1);
                resp(204).h("Location", format!("/v2/{repo}/blobs/uploads/{tail}?_state=g")).h("Range", format!("0-{end}"))
            }
            ("upload", "PUT") => {
                let Some(mut up) = s.uploads.remove(tail) else { return err(404, "BLOB_UPLOAD_UNKNOWN") };
                up.extend_from_slice(&req.body);
                let d = sha256_digest(&up);
                if req.q("digest") != Some(d.as_str()) {
                    return err(400, "DIGEST_INVALID");
                }
                s.blobs.insert((repo.clone(), d.clone()), up);
                resp(201).h("Docker-Content-Digest", d.clone()).h("Location", format!("/v2/{repo}/blobs/{d}"))
            }
            ("upload", "DELETE") => {
                s.uploads.remove(tail);
                resp(204)
            }
            ("blob", "GET" | "HEAD") => match s.blobs.get(&(repo, tail.to_string())) {
                Some(b) => resp(200).h("Docker-Content-Digest", tail).b(b.clone()),
                None => err(404, "BLOB_UNKNOWN"),
            },
            ("manifest", "PUT") => {
                let d = sha256_digest(&req.body);
                let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
                for blob in v["layers"].as_array().into_iter().flatten().chain(std::iter::once(&v["config"])) {
                    if let Some(bd) = blob["digest"].as_str() {
                        if !s.blobs.contains_key(&(repo.clone(), bd.to_string())) {
                            return err(400, "MANIFEST_BLOB_UNKNOWN");
                        }
                    }
                }
                let ct = req.header("content-type").unwrap_or("").to_string();
                s.manifests.insert((repo.clone(), d.clone()), (ct, req.body.clone()));
                if !tail.starts_with("sha256:") {
                    s.tags.insert((repo.clone(), tail.to_string()), d.clone());
                } else if tail != d {
                    return err(400, "DIGEST_INVALID");
                }
                let mut r = resp(201).h("Docker-Content-Digest", d.clone());
                if config.referrers_api {
                    if let Some(subject) = v["subject"]["digest"].as_str() {
                        r = r.h("OCI-Subject", subject);
                    }
                }
                r
            }
            ("manifest", "GET" | "HEAD") => {
                let d = if tail.starts_with("sha256:") { Some(tail.to_string()) } else { s.tags.get(&(repo.clone(), tail.to_string())).cloned() };
                match d.and_then(|d| s.manifests.get(&(repo, d)).cloned()) {
                    Some((ct, b)) => resp(200).h("Content-Type", ct).b(b),
                    None => err(404, "MANIFEST_UNKNOWN"),
                }
            }
            ("referrers", "GET") if config.referrers_api => {
                let mut manifests = Vec::new();
                let mut keys: Vec<_> = s.manifests.keys().filter(|(r, _)| *r == repo).cloned().collect();
                keys.sort();
                for k in keys {
                    let (_, b) = &s.manifests[&k];
                    let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
                    if v["subject"]["digest"].as_str() == Some(tail) {
                        let at = v["artifactType"].as_str().unwrap_or("").to_string();
                        if req.q("artifactType").is_some_and(|t| t != at) {
                            continue;
                        }
                        manifests.push(serde_json::json!({"mediaType": manifest::OCI_MANIFEST, "digest": k.1, "size": b.len(), "artifactType": at}));
                    }
                }
                let mut r = resp(200).h("Content-Type", manifest::OCI_INDEX);
                if req.q("artifactType").is_some() {
                    r = r.h("OCI-Filters-Applied", "artifactType");
                }
                r.b(serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": manifests})).unwrap())
            }
            _ => resp(404).b("404 page not found"),
        };
    }
    resp(404)
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
}

#[tokio::test]
async fn monolithic_upload_then_existing_blob_costs_one_head() {
    let fake = Fake::start(Config::default());
    let repo = fake.repo("r");
    let bytes = data(100_000, 1);
    let blob = Blob::from_bytes(bytes.clone());
    let pushed = repo.push_blob(&blob, &UploadOptions::default()).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Monolithic);
    assert_eq!(fake.methods(), ["HEAD", "POST", "PUT"]);
    assert_eq!(fake.blob("r", &blob.digest).unwrap(), bytes);
    assert_eq!(repo.requests(), 3);
    fake.clear_log();
    let again = repo.push_blob(&blob, &UploadOptions::default()).await.unwrap();
    assert_eq!(again.kind, UploadKind::Existed);
    assert_eq!(fake.methods(), ["HEAD"]);
    assert!(repo.blob_exists(&blob.digest).await.unwrap());
    assert!(!repo.blob_exists(&sha256_digest(b"nothing")).await.unwrap());
}

#[tokio::test]
async fn chunked_upload_streams_a_file_in_content_range_pieces() {
    let fake = Fake::start(Config::default());
    let repo = fake.repo("r");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let bytes = data((2 << 20) + (1 << 19) + 7, 2);
    std::fs::write(&path, &bytes).unwrap();
    let blob = Blob::from_file(&path).unwrap();
    assert_eq!((blob.digest.clone(), blob.size), (sha256_digest(&bytes), bytes.len() as u64));
    let pushed = repo.push_blob(&blob, &UploadOptions { chunk_size: 1 << 20, mount_from: None }).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Chunked { chunks: 3 });
    assert_eq!(fake.methods(), ["HEAD", "POST", "PATCH", "PATCH", "PATCH", "PUT"]);
    assert_eq!(fake.blob("r", &blob.digest).unwrap(), bytes);
    let log = fake.log.lock().unwrap().clone();
    let patches: Vec<_> = log.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches[0].header("content-range"), Some("0-1048575"));
    assert_eq!(patches[2].header("content-range"), Some(format!("2097152-{}", bytes.len() - 1).as_str()));
    assert_eq!(patches[2].header("content-length"), Some((bytes.len() - (2 << 20)).to_string().as_str()), "streamed with a Content-Length");
    assert_eq!(patches[1].q("_state"), Some("s1048576"), "each chunk goes to the Location the last answer gave");
    let put = log.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!((put.q("digest"), put.body.len()), (Some(blob.digest.as_str()), 0));
}

#[tokio::test]
async fn chunks_honour_the_registry_minimum_and_resume_after_a_failed_chunk() {
    let fake = Fake::start(Config { min_chunk: Some(2 << 20), ..Config::default() });
    let repo = fake.repo("r");
    let bytes = data((5 << 20) + 3, 3);
    let blob = Blob::from_bytes(bytes.clone());
    let pushed = repo.push_blob(&blob, &UploadOptions { chunk_size: 1 << 20, mount_from: None }).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Chunked { chunks: 3 }, "2 MiB chunks, as OCI-Chunk-Min-Length asks");
    assert_eq!(fake.blob("r", &blob.digest).unwrap(), bytes);

    let fake = Fake::start(Config { fail_from_patch: 2, fail_patches: AtomicU32::new(1), ..Config::default() });
    let repo = fake.repo("r");
    let pushed = repo.push_blob(&blob, &UploadOptions { chunk_size: 2 << 20, mount_from: None }).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Chunked { chunks: 3 });
    assert_eq!(fake.methods(), ["HEAD", "POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"], "the failed chunk is sent again after asking where the upload stands");
    assert_eq!(fake.blob("r", &blob.digest).unwrap(), bytes);
}

#[tokio::test]
async fn cross_repository_mount_and_its_fallback() {
    let fake = Fake::start(Config::default());
    let bytes = data(5000, 4);
    let digest = fake.put_blob("base", &bytes);
    let repo = fake.repo("r");
    let blob = Blob::from_bytes(bytes.clone());
    let pushed = repo.push_blob(&blob, &UploadOptions { mount_from: Some("base".into()), ..UploadOptions::default() }).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Mounted);
    assert_eq!(fake.methods(), ["HEAD", "POST"]);
    assert_eq!(fake.blob("r", &digest).unwrap(), bytes);
    // Not in the other repository: the mount request starts an upload, which is used.
    let other = Blob::from_bytes(data(5000, 5));
    fake.clear_log();
    let pushed = repo.push_blob(&other, &UploadOptions { mount_from: Some("base".into()), ..UploadOptions::default() }).await.unwrap();
    assert_eq!(pushed.kind, UploadKind::Monolithic);
    assert_eq!(fake.methods(), ["HEAD", "POST", "PUT"]);
    assert!(!repo.mount_blob(&sha256_digest(b"absent"), "base").await.unwrap());
}

fn platform(os: &str, arch: &str) -> Platform {
    manifest::parse_platform(&format!("{os}/{arch}")).unwrap()
}

#[tokio::test]
async fn manifests_by_tag_and_digest_and_resolution_through_an_index() {
    let fake = Fake::start(Config::default());
    let repo = fake.repo("r");
    let layer = Blob::from_bytes(data(9000, 6));
    repo.push_blob(&layer, &UploadOptions::default()).await.unwrap();
    let config = erofs_config(&platform("linux", "arm64"), std::slice::from_ref(&layer.digest)).unwrap();
    let config_blob = Blob::from_bytes(config.clone());
    repo.push_blob(&config_blob, &UploadOptions::default()).await.unwrap();
    let m = erofs_image_manifest((&config_blob.digest, config_blob.size), &[(layer.digest.clone(), layer.size)]).unwrap();
    let bytes = to_json(&m).unwrap();
    let by_tag = repo.put_manifest("v1", manifest::OCI_MANIFEST, &bytes).await.unwrap();
    assert_eq!(by_tag.digest, sha256_digest(&bytes));
    assert_eq!(fake.manifest_by_tag("r", "v1").unwrap(), bytes);
    let req = fake.log.lock().unwrap().iter().rfind(|r| r.method == "PUT").cloned().unwrap();
    assert_eq!(req.header("content-type"), Some(manifest::OCI_MANIFEST));
    let by_digest = repo.put_manifest(&by_tag.digest, manifest::OCI_MANIFEST, &bytes).await.unwrap();
    assert_eq!(by_digest.digest, by_tag.digest);
    let e = repo.put_manifest(&sha256_digest(b"other"), manifest::OCI_MANIFEST, &bytes).await.unwrap_err();
    assert!(e.to_string().contains("not sha256:"), "{e}");
    // A manifest over a blob the registry lacks: the registry's reason in the sentence.
    let bad = erofs_image_manifest((&config_blob.digest, config_blob.size), &[(sha256_digest(b"missing"), 7)]).unwrap();
    let e = repo.put_manifest("v2", manifest::OCI_MANIFEST, &to_json(&bad).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("HTTP 400 MANIFEST_BLOB_UNKNOWN"), "{e}");

    // An index with two platforms -> the arm64 manifest, and its config.
    let mut amd = descriptor(manifest::OCI_MANIFEST, &by_tag.digest, by_tag.size).unwrap();
    amd.set_platform(Some(platform("linux", "amd64")));
    let mut arm = amd.clone();
    arm.set_platform(Some(platform("linux", "arm64")));
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": [amd, arm]});
    repo.put_manifest("multi", manifest::OCI_INDEX, &to_json(&index).unwrap()).await.unwrap();
    let multi = fake.repo_with("r", Access::default());
    let multi = Repository::with_endpoint(multi.client.clone(), multi.endpoint, Reference::parse(&format!("127.0.0.1:{}/r:multi", fake.port)).unwrap());
    let resolved = multi.resolve_image(&platform("linux", "arm64")).await.unwrap();
    assert_eq!(resolved.digest, by_tag.digest);
    assert_eq!(resolved.platform.as_ref().map(manifest::platform_name).as_deref(), Some("linux/arm64"));
    assert_eq!(resolved.media_type, manifest::OCI_MANIFEST);
    let got = multi.get_blob(resolved.manifest.config().digest().as_ref(), MAX_CONFIG_BYTES).await.unwrap();
    assert_eq!(got, config);
    let e = multi.resolve_image(&platform("linux", "s390x")).await.unwrap_err();
    assert!(e.to_string().contains("available: linux/amd64, linux/arm64"), "{e}");
    // A blob that does not match its digest.
    fake.state.lock().unwrap().blobs.insert(("r".into(), config_blob.digest.clone()), b"tampered".to_vec());
    let e = multi.get_blob(&config_blob.digest, MAX_CONFIG_BYTES).await.unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    let e = multi.get_blob(&layer.digest, 100).await.unwrap_err();
    assert!(e.to_string().contains("larger than 100"), "{e}");
}

#[tokio::test]
async fn bearer_tokens_for_a_push_ask_for_pull_and_push_once() {
    let fake = Fake::start(Config { bearer: true, ..Config::default() });
    let repo = fake.repo_with("team/app", Access { push: true, mount_from: vec![] });
    let blob = Blob::from_bytes(data(3000, 7));
    repo.push_blob(&blob, &UploadOptions::default()).await.unwrap();
    let tokens = fake.state.lock().unwrap().tokens.clone();
    assert_eq!(tokens, vec![vec!["repository:team/app:pull,push".to_string()]], "one token, asked with push at the first challenge");
}

#[tokio::test]
async fn a_refused_push_is_one_sentence_after_one_renewal() {
    let fake = Fake::start(Config { bearer: true, deny_push: true, ..Config::default() });
    let repo = fake.repo_with("team/app", Access { push: true, mount_from: vec![] });
    let e = repo.push_blob(&Blob::from_bytes(data(10, 8)), &UploadOptions::default()).await.unwrap_err();
    assert!(matches!(e, OciError::AuthRequired { .. }), "anonymous: say how to authenticate: {e}");
    assert_eq!(fake.methods(), ["HEAD", "HEAD", "POST", "POST"], "one renewal per request, no loop");
}

async fn push_subject(repo: &Repository) -> Descriptor {
    repo.push_blob(&Blob::from_bytes(EMPTY_JSON), &UploadOptions::default()).await.unwrap();
    let m = image_manifest(empty_config_descriptor().unwrap(), vec![], &BTreeMap::new()).unwrap();
    let bytes = to_json(&m).unwrap();
    let p = repo.put_manifest("img", manifest::OCI_MANIFEST, &bytes).await.unwrap();
    descriptor(manifest::OCI_MANIFEST, &p.digest, p.size).unwrap()
}

async fn push_ranges_artifact(repo: &Repository, subject: &Descriptor, artifact_type: &str, payload: &[u8]) -> PushedArtifact {
    let layer = Blob::from_bytes(payload.to_vec());
    repo.push_blob(&layer, &UploadOptions::default()).await.unwrap();
    let annotations = BTreeMap::from([("org.example.kind".to_string(), "ranges".to_string()), ("org.example.version".to_string(), "1".to_string())]);
    repo.push_artifact(&Artifact {
        artifact_type: artifact_type.into(),
        subject: subject.clone(),
        layers: vec![layer.descriptor("application/vnd.example.ranges.v1+json").unwrap()],
        annotations,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn referrers_through_the_tag_schema_when_the_api_is_missing() {
    let fake = Fake::start(Config::default());
    let repo = fake.repo("r");
    let subject = push_subject(&repo).await;
    let tag = referrers_tag(subject.digest().as_ref()).unwrap();
    let none = repo.referrers(subject.digest().as_ref(), None).await.unwrap();
    assert_eq!(none, Referrers { manifests: vec![], source: ReferrersSource::TagSchema });

    let a = push_ranges_artifact(&repo, &subject, "application/vnd.example.a", b"[1,2]").await;
    assert_eq!(a.indexed_by, ReferrersSource::TagSchema);
    let b = push_ranges_artifact(&repo, &subject, "application/vnd.example.b", b"[3,4]").await;
    // The same artifact again: replaced in place, not listed twice.
    let a2 = push_ranges_artifact(&repo, &subject, "application/vnd.example.a", b"[1,2]").await;
    assert_eq!(a2.descriptor, a.descriptor, "the same content gives the same manifest digest");
    let index: serde_json::Value = serde_json::from_slice(&fake.manifest_by_tag("r", &tag).unwrap()).unwrap();
    assert_eq!(index["mediaType"], manifest::OCI_INDEX);
    let listed: Vec<&str> = index["manifests"].as_array().unwrap().iter().map(|d| d["digest"].as_str().unwrap()).collect();
    assert_eq!(listed, [a.manifest.digest.as_str(), b.manifest.digest.as_str()]);
    assert_eq!(index["manifests"][1]["artifactType"], "application/vnd.example.b");
    assert_eq!(index["manifests"][1]["annotations"]["org.example.kind"], "ranges");

    let all = repo.referrers(subject.digest().as_ref(), None).await.unwrap();
    assert_eq!((all.manifests.len(), all.source), (2, ReferrersSource::TagSchema));
    let only_b = repo.referrers(subject.digest().as_ref(), Some("application/vnd.example.b")).await.unwrap();
    assert_eq!(only_b.manifests, vec![b.descriptor.clone()]);
    // The artifact manifest itself: artifactType, subject, empty config.
    let m: serde_json::Value = serde_json::from_slice(&repo.get_manifest(&b.manifest.digest).await.unwrap().bytes).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.example.b");
    assert_eq!(m["subject"]["digest"], subject.digest().to_string());
    assert_eq!(m["config"]["mediaType"], OCI_EMPTY_MEDIA_TYPE);
    assert_eq!(m["config"]["digest"], sha256_digest(b"{}"));

    repo.remove_referrer(subject.digest().as_ref(), &a.manifest.digest).await.unwrap();
    let left = repo.referrers(subject.digest().as_ref(), None).await.unwrap();
    assert_eq!(left.manifests, vec![b.descriptor]);
}

#[tokio::test]
async fn referrers_through_the_api_when_the_registry_has_it() {
    let fake = Fake::start(Config { referrers_api: true, ..Config::default() });
    let repo = fake.repo("r");
    let subject = push_subject(&repo).await;
    let a = push_ranges_artifact(&repo, &subject, "application/vnd.example.a", b"[1]").await;
    assert_eq!(a.indexed_by, ReferrersSource::Api, "OCI-Subject answered: no tag written");
    assert!(fake.manifest_by_tag("r", &referrers_tag(subject.digest().as_ref()).unwrap()).is_none());
    push_ranges_artifact(&repo, &subject, "application/vnd.example.b", b"[2]").await;
    let got = repo.referrers(subject.digest().as_ref(), Some("application/vnd.example.a")).await.unwrap();
    assert_eq!(got.source, ReferrersSource::Api);
    assert_eq!(got.manifests.len(), 1);
    assert_eq!(got.manifests[0].digest().to_string(), a.manifest.digest);
}

#[test]
fn pure_manifest_and_config_construction() {
    assert_eq!(referrers_tag(&format!("sha256:{}", "ab".repeat(32))).unwrap(), format!("sha256-{}", "ab".repeat(32)));
    assert!(referrers_tag("sha512:00").is_err());
    let p = platform("linux", "amd64");
    let d = format!("sha256:{}", "01".repeat(32));
    let config = erofs_config(&p, std::slice::from_ref(&d)).unwrap();
    assert_eq!(
        String::from_utf8(config.clone()).unwrap(),
        format!(r#"{{"architecture":"amd64","config":{{}},"os":"linux","rootfs":{{"diff_ids":["{d}"],"type":"layers"}}}}"#)
    );
    assert_eq!(erofs_config(&p, std::slice::from_ref(&d)).unwrap(), config, "deterministic");
    let arm = manifest::parse_platform("linux/arm/v7").unwrap();
    assert!(String::from_utf8(erofs_config(&arm, &[]).unwrap()).unwrap().contains(r#""variant":"v7""#));
    let cd = sha256_digest(&config);
    let m = erofs_image_manifest((&cd, config.len() as u64), &[(d.clone(), 4096)]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&to_json(&m).unwrap()).unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], manifest::OCI_MANIFEST);
    assert_eq!(v["config"]["mediaType"], OCI_CONFIG_MEDIA_TYPE);
    assert_eq!(v["layers"][0]["mediaType"], "application/vnd.erofs");
    assert_eq!(v["layers"][0]["size"], 4096);
    // What the mount side reads back from it.
    let Manifest::Image(parsed) = manifest::parse_manifest(None, &to_json(&m).unwrap()).unwrap() else { panic!() };
    assert_eq!(manifest::select_layer(parsed.layers(), &manifest::LayerChoice::Only).unwrap().digest().to_string(), d);
    assert!(erofs_image_manifest(("sha256:zz", 1), &[]).is_err());

    let subject = descriptor(manifest::OCI_MANIFEST, &d, 10).unwrap();
    let am = artifact_manifest("application/vnd.example.x", subject.clone(), vec![], &BTreeMap::new()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&to_json(&am).unwrap()).unwrap();
    assert_eq!(v["layers"][0]["mediaType"], OCI_EMPTY_MEDIA_TYPE, "no layers: the empty descriptor");
    assert!(artifact_manifest("nonsense", subject, vec![], &BTreeMap::new()).is_err());

    let e1 = descriptor(manifest::OCI_MANIFEST, &format!("sha256:{}", "02".repeat(32)), 5).unwrap();
    let mut e2 = descriptor(manifest::OCI_MANIFEST, &format!("sha256:{}", "03".repeat(32)), 6).unwrap();
    let idx = merge_referrer(Some(merge_referrer(None, e1.clone())), e2.clone());
    assert_eq!(idx.manifests(), &vec![e1.clone(), e2.clone()]);
    e2.set_artifact_type(Some(MediaType::from("application/vnd.example.y")));
    let idx = merge_referrer(Some(idx), e2.clone());
    assert_eq!(idx.manifests(), &vec![e1.clone(), e2.clone()], "replaced in place");
    assert_eq!(filter_referrers(idx.manifests(), Some("application/vnd.example.y")), vec![e2.clone()]);
    assert_eq!(filter_referrers(idx.manifests(), None).len(), 2);
    let idx = remove_referrer(Some(idx), e1.digest().as_ref());
    assert_eq!(idx.manifests(), &vec![e2]);
    let v: serde_json::Value = serde_json::from_slice(&to_json(&idx).unwrap()).unwrap();
    assert_eq!((v["schemaVersion"].as_u64(), v["mediaType"].as_str()), (Some(2), Some(manifest::OCI_INDEX)));

    assert_eq!(parse_upload_range("0-1048575"), Some(1 << 20));
    assert_eq!(parse_upload_range("bytes=0-9"), Some(10));
    assert_eq!(parse_upload_range("0-0"), Some(0));
    assert_eq!(parse_upload_range("5-9"), None);
}
