//! Protocol tests against small in-process HTTP servers on 127.0.0.1 (no
//! registry binary, no root): token renewal mid-life, redirects to another
//! origin, mirror fallback, Content-Range checks, and resolution errors.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::*;
use crate::remote::FetchError;

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn resp(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Resp {
    Resp { status, headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), body: body.into() }
}

type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

struct Mock {
    port: u16,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Mock {
    fn start(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let l2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (h, l) = (handler.clone(), l2.clone());
                std::thread::spawn(move || serve_conn(conn, h, l));
            }
        });
        Mock { port, log }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, f: impl Fn(&Req) -> bool) -> usize {
        self.requests().iter().filter(|r| f(r)).count()
    }
}

fn serve_conn(conn: TcpStream, handler: Handler, log: Arc<Mutex<Vec<Req>>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req = Req { method, path, headers };
        log.lock().unwrap().push(req.clone());
        let r = handler(&req);
        let mut head = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", r.status, r.body.len());
        for (k, v) in &r.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&r.body).is_err() {
            return;
        }
    }
}

fn blob_data() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A 206 for the request's Range over `data` (total as given, to fake a wrong size).
fn ranged(req: &Req, data: &[u8], total: usize) -> Resp {
    let r = req.header("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-'));
    let Some((a, b)) = r else { return resp(200, &[], data.to_vec()) };
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    let cr = format!("bytes {a}-{b}/{total}");
    resp(206, &[("Content-Range", &cr)], data[a..=b].to_vec())
}

fn spec(endpoint: &str, data: &[u8], creds: Option<Credentials>, mirrors: Vec<MirrorSpec>) -> OciBlobSpec {
    OciBlobSpec {
        reference: "127.0.0.1/r:v1".into(),
        registry: endpoint.trim_start_matches("http://").into(),
        endpoint: endpoint.into(),
        repository: "r".into(),
        digest: digest_of(data),
        size: data.len() as u64,
        media_type: manifest::EROFS_MEDIA_TYPES[0].into(),
        insecure: true,
        ca_file: None,
        mirrors,
        credentials: creds,
        auth_handoff: None,
    }
}

fn http() -> crate::http::ClientConfig {
    crate::http::ClientConfig::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_renewed_when_it_expires_mid_life() {
    let data = blob_data();
    let issued = Arc::new(AtomicU32::new(0));
    let valid = Arc::new(Mutex::new(String::new()));
    let (i2, v2, d2) = (issued.clone(), valid.clone(), data.clone());
    let server = Mock::start(move |req| {
        let host = req.header("host").unwrap_or("").to_string();
        if req.path.starts_with("/token") {
            if req.header("authorization") != Some("Basic dTpw") || !req.path.contains("scope=repository%3Ar%3Apull") {
                return resp(401, &[], "");
            }
            let n = i2.fetch_add(1, Ordering::SeqCst) + 1;
            let tok = format!("tok{n}");
            *v2.lock().unwrap() = tok.clone();
            return resp(200, &[], format!(r#"{{"token":"{tok}","expires_in":3600}}"#));
        }
        let want = format!("Bearer {}", v2.lock().unwrap());
        if req.header("authorization") != Some(want.as_str()) {
            let ch = format!(r#"Bearer realm="http://{host}/token",service="mock",scope="repository:r:pull""#);
            return resp(401, &[("WWW-Authenticate", &ch)], r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
        }
        ranged(req, &d2, d2.len())
    });
    let creds = Credentials::Basic { username: "u".into(), password: "p".into() };
    let (src, probe) = open_blob(&spec(&server.base(), &data, Some(creds), vec![]), &http()).await.unwrap();
    assert_eq!(&probe[..], &data[..4096]);
    assert_eq!(&src.fetch(100..200).await.unwrap()[..], &data[100..200]);
    assert_eq!(issued.load(Ordering::SeqCst), 1);
    // The token expires (the server forgets it): the next reads still succeed, with one new token.
    *valid.lock().unwrap() = "expired".into();
    let reads = (0..4).map(|i| src.fetch(5000 + i * 100..5100 + i * 100));
    for (i, r) in futures_util::future::join_all(reads).await.into_iter().enumerate() {
        let start = 5000 + i * 100;
        assert_eq!(&r.unwrap()[..], &data[start..start + 100]);
    }
    assert_eq!(issued.load(Ordering::SeqCst), 2, "concurrent 401s share one renewal");
    assert!(!src.describe().contains("dTpw"));
    assert_eq!(src.served_by().as_deref(), Some(server.base().as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_keep_range_drop_authorization_and_are_cached() {
    let data = blob_data();
    let sig = Arc::new(AtomicU32::new(0));
    let (s2, d2) = (sig.clone(), data.clone());
    let cdn = Mock::start(move |req| {
        let current = format!("sig={}", s2.load(Ordering::SeqCst));
        if req.header("authorization").is_some() || !req.path.ends_with(&current) || req.header("range").is_none() {
            return resp(403, &[], "");
        }
        ranged(req, &d2, d2.len())
    });
    let cdn_base = cdn.base();
    let s3 = sig.clone();
    let registry = Mock::start(move |req| {
        if req.header("authorization") != Some("Basic dTpw") {
            return resp(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "");
        }
        let n = s3.fetch_add(1, Ordering::SeqCst) + 1;
        let loc = format!("{cdn_base}/cdn/blob?sig={n}");
        resp(307, &[("Location", &loc)], "")
    });
    let creds = Credentials::Basic { username: "u".into(), password: "p".into() };
    let (src, probe) = open_blob(&spec(&registry.base(), &data, Some(creds), vec![]), &http()).await.unwrap();
    assert_eq!(&probe[..], &data[..4096]);
    for i in 0..3u64 {
        let r = 4096 + i * 1000..5096 + i * 1000;
        assert_eq!(&src.fetch(r.clone()).await.unwrap()[..], &data[r.start as usize..r.end as usize]);
    }
    assert_eq!(registry.count(|r| r.method == "GET" && r.path.contains("/blobs/")), 2, "one 401, one redirect; then the cached target");
    assert_eq!(cdn.count(|_| true), 4);
    assert!(src.served_by().unwrap().contains(&cdn.base()), "{:?}", src.served_by());
    // The signed URL expires: the cached target fails, the registry gives a new one.
    sig.fetch_add(1, Ordering::SeqCst);
    assert_eq!(&src.fetch(0..10).await.unwrap()[..], &data[0..10]);
    assert_eq!(registry.count(|r| r.path.contains("/blobs/")), 3);
    assert_eq!(cdn.count(|r| r.header("authorization").is_some()), 0);
}

fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_in_order_and_fall_back_to_the_registry() {
    let data = blob_data();
    let d1 = data.clone();
    let upstream = Mock::start(move |req| ranged(req, &d1, d1.len()));
    let d2 = data.clone();
    let mirror = Mock::start(move |req| {
        if !req.path.starts_with("/v2/pfx/r/blobs/") {
            return resp(404, &[], "");
        }
        ranged(req, &d2, d2.len())
    });
    let d3 = data.clone();
    let lying = Mock::start(move |req| ranged(req, &d3, d3.len() + 1));
    let down = MirrorSpec { base: format!("http://127.0.0.1:{}", closed_port()), repository: "r".into(), credentials: None };
    let good = MirrorSpec { base: mirror.base(), repository: "pfx/r".into(), credentials: None };
    let bad_size = MirrorSpec { base: lying.base(), repository: "r".into(), credentials: None };

    let (src, _) = open_blob(&spec(&upstream.base(), &data, None, vec![down.clone(), good]), &http()).await.unwrap();
    assert_eq!(&src.fetch(10..20).await.unwrap()[..], &data[10..20]);
    assert!(src.served_by().unwrap().contains(&mirror.base()));
    assert_eq!(upstream.count(|_| true), 0, "a working mirror spares the registry");

    let (src, _) = open_blob(&spec(&upstream.base(), &data, None, vec![down, bad_size]), &http()).await.unwrap();
    assert_eq!(&src.fetch(10..20).await.unwrap()[..], &data[10..20]);
    assert_eq!(src.served_by().as_deref(), Some(upstream.base().as_str()));
    assert_eq!(lying.count(|_| true), 1, "a failed mirror is skipped for a while");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sizes_and_missing_blobs_are_permanent_errors() {
    let data = blob_data();
    let d1 = data.clone();
    let lying = Mock::start(move |req| ranged(req, &d1, d1.len() + 1));
    let err = open_blob(&spec(&lying.base(), &data, None, vec![]), &http()).await.err().unwrap();
    assert!(err.to_string().contains("size"), "{err}");
    let gone = Mock::start(|_| resp(404, &[], r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#));
    let err = open_blob(&spec(&gone.base(), &data, None, vec![]), &http()).await.err().unwrap();
    assert!(err.to_string().contains("not found"), "{err}");
    let flaky = Mock::start(|_| resp(503, &[], ""));
    let s = open_blob(&spec(&flaky.base(), &data, None, vec![]), &http()).await;
    assert!(s.is_err());
    let unreachable = format!("http://127.0.0.1:{}", closed_port());
    let e = open_blob(&spec(&unreachable, &data, None, vec![]), &http()).await.err().unwrap();
    assert!(e.to_string().contains("unreachable"), "{e}");
    let _ = FetchError::Transient(String::new());
}

/// A registry serving one index (amd64 + arm64), each manifest with the given layers.
fn registry_with_index(layers: Vec<(String, u64, &'static str)>) -> (Mock, String) {
    let layer_json: Vec<String> = layers
        .iter()
        .map(|(d, s, mt)| format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{s}}}"#))
        .collect();
    let amd = format!(r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{}]}}"#, manifest::OCI_MANIFEST, layer_json.join(","));
    let arm = format!(r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{}]}}"#, manifest::OCI_MANIFEST, layer_json[..1].join(","));
    let (da, dr) = (digest_of(amd.as_bytes()), digest_of(arm.as_bytes()));
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{m}","digest":"{da}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"{m}","digest":"{dr}","size":{},"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
        manifest::OCI_INDEX,
        amd.len(),
        arm.len(),
        m = manifest::OCI_MANIFEST
    );
    let dr2 = dr.clone();
    let server = Mock::start(move |req| {
        if !req.header("accept").is_some_and(|a| a.contains(manifest::OCI_INDEX) && a.contains(manifest::DOCKER_MANIFEST)) {
            return resp(404, &[], r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#);
        }
        match req.path.as_str() {
            "/v2/r/manifests/v1" => resp(200, &[("Content-Type", manifest::OCI_INDEX)], index.clone()),
            p if p == format!("/v2/r/manifests/{da}") => resp(200, &[], amd.clone()),
            p if p == format!("/v2/r/manifests/{dr2}") => resp(200, &[], arm.clone()),
            p if p.starts_with("/v2/r/") => resp(404, &[], r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
            _ => resp(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#),
        }
    });
    (server, dr)
}

fn resolve(server_base: &str, reference: &str, platform: &str, choice: LayerChoice, creds: Option<Credentials>) -> Result<manifest::Descriptor, OciError> {
    resolve_all(server_base, reference, platform, choice, creds).map(|mut v| {
        assert_eq!(v.len(), 1, "one layer");
        v.remove(0)
    })
}

fn resolve_all(server_base: &str, reference: &str, platform: &str, choice: LayerChoice, creds: Option<Credentials>) -> Result<Vec<manifest::Descriptor>, OciError> {
    let r = Reference::parse(reference).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = crate::http::build_client(&crate::http::ClientConfig { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(5), ca_file: None }).unwrap();
    let ep = Endpoint::new(server_base, &r.repository, false, Authenticator::new(&r.registry, &r.repository, creds)).unwrap();
    rt.block_on(resolve_layer(&client, &ep, &r, &manifest::parse_platform(platform).unwrap(), &choice))
}

#[test]
fn resolution_through_an_index_with_clear_errors() {
    let erofs = manifest::EROFS_MEDIA_TYPES[0];
    let layers = vec![
        (digest_of(b"a"), 4096, erofs),
        (digest_of(b"b"), 8192, "application/vnd.erofs.layer.v1"),
        (digest_of(b"c"), 100, "application/vnd.oci.image.layer.v1.tar+gzip"),
    ];
    let (server, arm_digest) = registry_with_index(layers.clone());
    let host = format!("127.0.0.1:{}", server.port);
    let base = server.base();
    let reference = format!("{host}/r:v1");
    let arm = resolve(&base, &reference, "linux/arm64", LayerChoice::Only, None).unwrap();
    assert_eq!(arm.digest().to_string(), layers[0].0);
    let pinned = format!("{host}/r@{arm_digest}");
    assert_eq!(resolve(&base, &pinned, "linux/amd64", LayerChoice::Only, None).unwrap().digest().to_string(), layers[0].0, "a pinned manifest");
    let amd = resolve(&base, &reference, "linux/amd64", LayerChoice::Index(1), None).unwrap();
    assert_eq!((amd.digest().to_string(), amd.size()), (layers[1].0.clone(), 8192));
    // No choice and several layers: all of them, in manifest order (the
    // agent decides from their superblocks how they make one filesystem).
    let all = resolve_all(&base, &reference, "linux/amd64", LayerChoice::Only, None).unwrap();
    assert_eq!(all.iter().map(|l| l.digest().to_string()).collect::<Vec<_>>(), layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>());
    let e = resolve(&base, &reference, "linux/amd64", LayerChoice::Index(2), None).unwrap_err();
    assert!(matches!(e, OciError::NotErofs { .. }), "{e}");
    assert_eq!(resolve(&base, &reference, "linux/amd64", LayerChoice::Digest(layers[2].0.clone()), None).unwrap().size(), 100);
    let e = resolve(&base, &reference, "linux/s390x", LayerChoice::Only, None).unwrap_err().to_string();
    assert!(e.contains("linux/s390x") && e.contains("linux/amd64, linux/arm64/v8"), "{e}");
    let e = resolve(&base, &format!("{host}/r:nope"), "linux/amd64", LayerChoice::Only, None).unwrap_err().to_string();
    assert_eq!(e, format!("tag \"nope\" of image {host}/r not found"));
    let e = resolve(&base, &format!("{host}/other:v1"), "linux/amd64", LayerChoice::Only, None).unwrap_err().to_string();
    assert_eq!(e, format!("image {host}/other not found"));
    let e = resolve(&base, &format!("{host}/r@{}", digest_of(b"zz")), "linux/amd64", LayerChoice::Only, None).unwrap_err();
    assert!(matches!(e, OciError::ImageNotFound(_)), "{e}");
}

#[test]
fn auth_errors_are_one_clear_sentence() {
    // Basic auth: wrong password.
    let basic = Mock::start(|req| {
        if req.header("authorization") == Some("Basic dTpw") {
            return resp(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#);
        }
        resp(401, &[("WWW-Authenticate", r#"Basic realm="r""#)], "")
    });
    let host = format!("127.0.0.1:{}", basic.port);
    let wrong = Credentials::Basic { username: "u".into(), password: "wrong-secret".into() };
    let e = resolve(&basic.base(), &format!("{host}/r:v1"), "linux/amd64", LayerChoice::Only, Some(wrong)).unwrap_err().to_string();
    assert_eq!(e, format!("authentication to {host} refused"));
    let e = resolve(&basic.base(), &format!("{host}/r:v1"), "linux/amd64", LayerChoice::Only, None).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{host} requires authentication")), "{e}");

    // Token auth: a token without pull scope.
    let scoped = Mock::start(|req| {
        let host = req.header("host").unwrap_or("").to_string();
        if req.path.starts_with("/token") {
            return resp(200, &[], r#"{"token":"t"}"#);
        }
        let ch = format!(r#"Bearer realm="http://{host}/token",service="s",scope="repository:r:pull",error="insufficient_scope""#);
        resp(401, &[("WWW-Authenticate", &ch)], "")
    });
    let host = format!("127.0.0.1:{}", scoped.port);
    let e = resolve(&scoped.base(), &format!("{host}/r:v1"), "linux/amd64", LayerChoice::Only, None).unwrap_err();
    assert!(matches!(e, OciError::InsufficientScope { .. }), "{e}");
    // The token server refuses the credentials.
    let refusing = Mock::start(|req| {
        let host = req.header("host").unwrap_or("").to_string();
        if req.path.starts_with("/token") {
            return resp(401, &[], "");
        }
        let ch = format!(r#"Bearer realm="http://{host}/token",service="s""#);
        resp(401, &[("WWW-Authenticate", &ch)], "")
    });
    let host = format!("127.0.0.1:{}", refusing.port);
    let c = Credentials::Basic { username: "u".into(), password: "p".into() };
    let e = resolve(&refusing.base(), &format!("{host}/r:v1"), "linux/amd64", LayerChoice::Only, Some(c)).unwrap_err().to_string();
    assert_eq!(e, format!("authentication to {host} refused"));
    let e = resolve(&format!("http://127.0.0.1:{}", closed_port()), "127.0.0.1:1/r:v1", "linux/amd64", LayerChoice::Only, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("registry http://127.0.0.1:") && e.contains("unreachable"), "{e}");
}

#[test]
fn spec_never_shows_credentials() {
    let data = blob_data();
    let mut s = spec("http://h:1", &data, Some(Credentials::Basic { username: "u".into(), password: "hunter2".into() }), vec![]);
    s.mirrors.push(MirrorSpec { base: "http://m".into(), repository: "r".into(), credentials: Some(Credentials::IdentityToken { token: "idtok".into() }) });
    for text in [s.describe(), format!("{s:?}"), format!("{:?}", crate::agent::sources::SourceSpec::Oci(Box::new(s.clone())))] {
        assert!(!text.contains("hunter2") && !text.contains("idtok"), "{text}");
    }
    // It does travel to the agent (on its stdin).
    let json = serde_json::to_string(&s).unwrap();
    let back: OciBlobSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn the_front_ends_token_is_handed_to_the_agent() {
    let data = blob_data();
    let layer = digest_of(&data);
    let image = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{{"mediaType":"application/vnd.erofs","digest":"{layer}","size":{}}}]}}"#,
        manifest::OCI_MANIFEST,
        data.len()
    );
    let issued = Arc::new(AtomicU32::new(0));
    let (i2, d2) = (issued.clone(), data.clone());
    let server = Mock::start(move |req| {
        let host = req.header("host").unwrap_or("").to_string();
        if req.path.starts_with("/token") {
            i2.fetch_add(1, Ordering::SeqCst);
            return resp(200, &[], r#"{"token":"good","expires_in":300}"#);
        }
        if req.header("authorization") != Some("Bearer good") {
            let ch = format!(r#"Bearer realm="http://{host}/token",service="s",scope="repository:r:pull""#);
            return resp(401, &[("WWW-Authenticate", &ch)], "");
        }
        if req.path.contains("/manifests/") {
            return resp(200, &[("Content-Type", manifest::OCI_MANIFEST)], image.clone());
        }
        ranged(req, &d2, d2.len())
    });
    let r = Reference::parse(&format!("127.0.0.1:{}/r:v1", server.port)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = crate::http::build_client(&crate::http::ClientConfig { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(5), ca_file: None }).unwrap();
    let ep = Endpoint::new(&server.base(), "r", false, Authenticator::new(&r.registry, "r", None)).unwrap();
    let d = rt.block_on(resolve_layer(&client, &ep, &r, &manifest::host_platform(), &LayerChoice::Only)).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].digest().to_string(), layer);
    let mut s = spec(&server.base(), &data, None, vec![]);
    s.auth_handoff = ep.auth.export();
    assert!(s.auth_handoff.is_some());
    assert!(!format!("{s:?}").contains("good"));
    let s: OciBlobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    let (_src, probe) = rt.block_on(open_blob(&s, &http())).unwrap();
    assert_eq!(&probe[..], &data[..4096]);
    assert_eq!(issued.load(Ordering::SeqCst), 1, "the agent reused the token");
    assert_eq!(server.count(|r| r.path.contains("/blobs/")), 1, "no 401 round trip for the first blob read");
}
