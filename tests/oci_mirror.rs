//! Where blob data comes from: mirrors (`oci.mirror=URL`, tried in order, falling back to the upstream) and
//! blob redirects (registries send blob GETs to a CDN).
//!
//! - A mirror that is down (closed port) or broken (answers 500) → data from the upstream registry.
//! - A working mirror: a second docker-registry configured as a pull-through cache of the first
//!   (`proxy: remoteurl:`) → data from the mirror: `status` names it in `served_by`, the mirror's access
//!   log shows the range GETs, and the upstream sees no blob GET during the mount. The mirror is warmed
//!   first (manifest and a full blob GET through it): distribution's proxy answers a range request for a
//!   blob it has not stored yet with 200 and the whole body, and ranges only once the blob is local.
//! - A blob redirect: an in-process proxy in front of an htpasswd registry answers blob GETs with 307 to a
//!   "CDN" server on another port that serves ranges and rejects any request carrying `Authorization`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http::{self, Body};
use common::http_server::{forward, serve_bytes, HttpServer, Reply};
use common::oci::{push_single, reference, served_by, tiny_image, OciEnv, OCI_MANIFEST};
use common::registry::{closed_port, Registry, RegistryConfig};
use common::token_server::basic_auth;
use common::tree::assert_tree_identical;
use common::wait::wait_until;
use common::{oci_ready, GONE_TIMEOUT};

fn mentions(endpoints: &[String], host: &str) -> bool {
    endpoints.iter().any(|e| e.contains(host))
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn mirror_down_or_broken_falls_back_to_upstream() {
    if !oci_ready() {
        return;
    }
    let registry = Registry::start();
    let img = tiny_image("mirror-fallback");
    push_single(&registry, "test/img", "v1", &img.image.path);
    let broken = HttpServer::start("broken-mirror", |_| {
        Reply::new(500).body(b"mirror is broken".to_vec())
    });
    let env = OciEnv::new("oci-mirror-down");
    let by_tag = reference(&registry.host(), "test/img", "v1");

    let down = format!("oci.mirror=http://127.0.0.1:{}", closed_port());
    let broken_opt = format!("oci.mirror={}", broken.base_url());
    for mirrors in [
        vec![down.as_str()],
        vec![broken_opt.as_str(), down.as_str()],
    ] {
        let m = env.mount(&by_tag, "mnt", &mirrors);
        assert_tree_identical(&img.tree, &m.mountpoint);
        let status = m.status();
        let endpoints = served_by(&status);
        assert!(
            mentions(&endpoints, &registry.host()),
            "served_by {endpoints:?} does not name the upstream {}",
            registry.base_url()
        );
        assert!(
            !mentions(&endpoints, &broken.host()),
            "served_by {endpoints:?} names the broken mirror"
        );
        m.unmount().assert_success();
        env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    }
}

/// Blob GETs (any status) in a registry's access log.
fn blob_gets(registry: &Registry) -> Vec<(String, String, u16)> {
    registry
        .access_log()
        .into_iter()
        .filter(|(method, path, _)| method == "GET" && path.contains("/blobs/"))
        .collect()
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn pull_through_mirror_serves_the_data() {
    if !oci_ready() {
        return;
    }
    let upstream = Registry::start_with(&RegistryConfig {
        extra_yaml: String::new(),
        access_log: true,
    });
    let img = tiny_image("pull-through");
    push_single(&upstream, "test/img", "v1", &img.image.path);
    let mirror = Registry::start_with(&RegistryConfig {
        extra_yaml: format!("proxy:\n  remoteurl: {}\n", upstream.base_url()),
        access_log: true,
    });

    // Warm the mirror: the manifest by tag, then the whole blob once; wait until it serves ranges itself.
    let manifest = http::request(
        "GET",
        &format!("{}/v2/test/img/manifests/v1", mirror.base_url()),
        &[("Accept", OCI_MANIFEST)],
        Body::Empty,
    )
    .expect("manifest through the mirror");
    assert_eq!(
        manifest.status,
        200,
        "manifest via mirror: {manifest:?}\n{}",
        mirror.log()
    );
    let blob_url = mirror.blob_url("test/img", &img.image.digest);
    let full = http::get(&blob_url).expect("blob through the mirror");
    assert_eq!(full.status, 200, "blob via mirror: {}", mirror.log());
    assert_eq!(full.body.len() as u64, img.image.size);
    wait_until(
        Duration::from_secs(20),
        "the mirror stored the blob",
        || http::get_range(&blob_url, 0, 4095).is_ok_and(|r| r.status == 206),
    );

    let upstream_blob_gets = blob_gets(&upstream).len();
    let mirror_log_start = mirror.access_log().len();
    let env = OciEnv::new("oci-mirror-pull-through");
    let by_tag = reference(&upstream.host(), "test/img", "v1");
    let mirror_opt = format!("oci.mirror={}", mirror.base_url());
    let m = env.mount(&by_tag, "mnt", &[&mirror_opt]);
    assert_tree_identical(&img.tree, &m.mountpoint);
    let mirror_ranges: Vec<_> = mirror.access_log()[mirror_log_start..]
        .iter()
        .filter(|(method, path, status)| {
            method == "GET" && path.contains("/blobs/") && *status == 206
        })
        .cloned()
        .collect();
    assert!(
        !mirror_ranges.is_empty(),
        "the mirror served no range GET: {:?}",
        &mirror.access_log()[mirror_log_start..]
    );
    let upstream_after = blob_gets(&upstream);
    assert_eq!(
        upstream_after.len(),
        upstream_blob_gets,
        "blob GETs reached the upstream although the mirror works: {:?}",
        &upstream_after[upstream_blob_gets..]
    );
    let status = m.status();
    let endpoints = served_by(&status);
    assert!(
        mentions(&endpoints, &mirror.host()),
        "served_by {endpoints:?} does not name the mirror {}",
        mirror.base_url()
    );
    assert!(
        !mentions(&endpoints, &upstream.host()),
        "served_by {endpoints:?} names the upstream although the mirror works"
    );
    eprintln!(
        "mirror served {} range GETs; {status:?}",
        mirror_ranges.len()
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

/// Prints the servers' request logs when the test fails (dropped while panicking).
struct LogOnPanic<'a>(&'a [(&'a str, &'a HttpServer)]);

impl Drop for LogOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, server) in self.0 {
                eprintln!("--- {name} ({}) requests ---", server.base_url());
                for r in server.requests() {
                    eprintln!("{r:?}");
                }
            }
        }
    }
}

const REDIRECT_USER: &str = "cdn-user";
const REDIRECT_PASSWORD: &str = "cdn-Pass-2718";

/// An htpasswd registry with an image, a CDN and a redirecting proxy in front of the registry.
struct RedirectSetup {
    proxy: HttpServer,
    cdn: HttpServer,
    upstream: Registry,
    img: common::oci::TinyImage,
    _dir: tempfile::TempDir,
}

fn redirect_setup() -> RedirectSetup {
    let dir = tempfile::Builder::new()
        .prefix("erofs-htpasswd-")
        .tempdir()
        .expect("htpasswd dir");
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", REDIRECT_USER, REDIRECT_PASSWORD])
        .output()
        .unwrap_or_else(|e| panic!("cannot run htpasswd (apt-get install apache2-utils): {e}"));
    assert!(out.status.success());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("{}\n", String::from_utf8_lossy(&out.stdout).trim()),
    )
    .expect("write htpasswd");
    let upstream = Registry::start_with(&RegistryConfig {
        extra_yaml: format!(
            "auth:\n  htpasswd:\n    realm: erofs-fanotify-tests\n    path: {}\n",
            htpasswd.display()
        ),
        access_log: false,
    });
    upstream.set_push_auth(Some(basic_auth(REDIRECT_USER, REDIRECT_PASSWORD)));
    let img = tiny_image("redirect");
    push_single(&upstream, "test/redirect", "v1", &img.image.path);

    // The CDN: blobs by digest, ranges, and a hard refusal of anything carrying credentials.
    let blobs: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::new(Mutex::new(HashMap::new()));
    blobs.lock().unwrap().insert(
        img.image.digest.clone(),
        std::fs::read(&img.image.path).expect("read image"),
    );
    let cdn = HttpServer::start("cdn", move |request| {
        if request.header("authorization").is_some() {
            return Reply::new(400).body(b"credentials must not be sent to the CDN".to_vec());
        }
        let Some(digest) = request.path().strip_prefix("/cdn/") else {
            return Reply::new(404);
        };
        match blobs.lock().unwrap().get(digest) {
            Some(data) => serve_bytes(request, data, "application/octet-stream"),
            None => Reply::new(404),
        }
    });

    // The proxy: the registry API, except that an authorized blob GET is redirected to the CDN.
    let upstream_url = upstream.base_url();
    let cdn_url = cdn.base_url();
    let proxy = HttpServer::start("redirecting-proxy", move |request| {
        let path = request.path().to_string();
        if request.method == "GET" && path.starts_with("/v2/") && path.contains("/blobs/sha256:") {
            let mut head = request.clone();
            head.method = "HEAD".into();
            head.headers.retain(|(k, _)| k != "range");
            let mut check = forward(&upstream_url, &head);
            if check.status != 200 {
                // The HEAD's Content-Length describes a body this GET answer does not have.
                check.headers.retain(|(k, _)| k != "content-length");
                return check;
            }
            let digest = path.rsplit('/').next().unwrap_or_default();
            return Reply::new(307).header(
                "Location",
                format!("{cdn_url}/cdn/{digest}?expires=4102444800&sig=test"),
            );
        }
        forward(&upstream_url, request)
    });
    RedirectSetup {
        proxy,
        cdn,
        upstream,
        img,
        _dir: dir,
    }
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn blob_redirect_to_a_cdn_keeps_range_and_drops_authorization() {
    if !oci_ready() {
        return;
    }
    let RedirectSetup {
        proxy, cdn, img, ..
    } = &redirect_setup();
    let _diagnostics = LogOnPanic(&[("proxy", proxy), ("cdn", cdn)]);
    let env = OciEnv::new("oci-redirect");
    let by_tag = reference(&proxy.host(), "test/redirect", "v1");
    let creds = [
        format!("oci.username={REDIRECT_USER}"),
        format!("oci.password={REDIRECT_PASSWORD}"),
    ];
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    let m = env.mount(&by_tag, "mnt", &creds);
    assert_tree_identical(&img.tree, &m.mountpoint);
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "{status:?}");

    let cdn_requests = cdn.requests();
    let with_auth: Vec<_> = cdn_requests
        .iter()
        .filter(|r| r.authorization.is_some())
        .collect();
    assert!(
        with_auth.is_empty(),
        "Authorization was sent to the CDN: {with_auth:?}"
    );
    let ranged: Vec<_> = cdn_requests
        .iter()
        .filter(|r| r.method == "GET" && r.range.is_some() && r.status == 206)
        .collect();
    assert!(
        !ranged.is_empty(),
        "the CDN served no range GET: {cdn_requests:?}"
    );
    assert!(
        cdn_requests
            .iter()
            .all(|r| r.method != "GET" || r.range.is_some()),
        "a GET reached the CDN without its Range header: {cdn_requests:?}"
    );
    let redirects = proxy.requests().iter().filter(|r| r.status == 307).count();
    assert!(
        redirects >= 1,
        "the proxy never redirected: {:?}",
        proxy.requests()
    );
    eprintln!(
        "{redirects} redirects, {} CDN range GETs, {} CDN requests in all; {status:?}",
        ranged.len(),
        cdn_requests.len()
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

/// The harness itself: the proxy redirects an authorized blob GET, challenges an anonymous one, and the
/// CDN serves ranges but refuses credentials; the pull-through mirror works as configured.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn harness_redirecting_proxy_and_cdn() {
    if !oci_ready() {
        return;
    }
    let setup = redirect_setup();
    let blob = format!(
        "{}/v2/test/redirect/blobs/{}",
        setup.proxy.base_url(),
        setup.img.image.digest
    );
    let anonymous = http::get(&blob).unwrap();
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(anonymous
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Basic")));
    let auth = basic_auth(REDIRECT_USER, REDIRECT_PASSWORD);
    let redirect = http::request("GET", &blob, &[("Authorization", &auth)], Body::Empty).unwrap();
    assert_eq!(redirect.status, 307, "{redirect:?}");
    let location = redirect.header("location").unwrap().to_string();
    assert!(location.starts_with(&setup.cdn.base_url()), "{location}");
    let ranged = http::get_range(&location, 4096, 8191).unwrap();
    assert_eq!(ranged.status, 206);
    let image = std::fs::read(&setup.img.image.path).unwrap();
    assert_eq!(ranged.body, image[4096..8192]);
    let refused = http::request(
        "GET",
        &location,
        &[("Authorization", &auth), ("Range", "bytes=0-1")],
        Body::Empty,
    )
    .unwrap();
    assert_eq!(refused.status, 400);
    let head = http::request("HEAD", &blob, &[("Authorization", &auth)], Body::Empty).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(image.len().to_string().as_str())
    );
    let _ = &setup.upstream;
}
