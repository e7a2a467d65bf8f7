//! Registry authentication against a real docker-registry on 127.0.0.1:
//! - htpasswd Basic auth (bcrypt file from `htpasswd -Bbn`), right and wrong password;
//! - token auth (`auth: token`) with the in-process token server (`common::token_server`): anonymous pull
//!   tokens, credentials checked by the token server, a token without pull access (insufficient scope),
//!   and tokens that expire while the mount lives — reads after the expiry still succeed;
//! - credentials from the container tools' files: `$DOCKER_CONFIG/config.json`, `$REGISTRY_AUTH_FILE`,
//!   the default `~/.docker/config.json` and `$XDG_RUNTIME_DIR/containers/auth.json`, and a
//!   `docker-credential-*` helper found on PATH (PATH set for the erofs-mount command only).
//!
//! Every mount runs with an isolated HOME/XDG dirs (`OciEnv`), so only the credentials a test provides
//! count. Passwords must not show up in the error line, the state records, status or the agent's command
//! line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::oci::{
    push_single, reference, tiny_image, OciEnv, TinyImage, AUTH_REFUSED, INSUFFICIENT_SCOPE,
};
use common::registry::{Registry, RegistryConfig};
use common::token_server::{base64_std, basic_auth, TokenPolicy, TokenServer};
use common::tree::assert_tree_identical;
use common::{oci_ready, Mounted, GONE_TIMEOUT};

const USER: &str = "alice";
const PASSWORD: &str = "wonder-Land-4711";
const WRONG_PASSWORD: &str = "not-the-password-0815";

/// A registry with `auth: htpasswd` (one bcrypt user) and the file it reads.
struct HtpasswdRegistry {
    registry: Registry,
    _dir: tempfile::TempDir,
}

fn htpasswd_registry(user: &str, password: &str) -> HtpasswdRegistry {
    let dir = tempfile::Builder::new()
        .prefix("erofs-htpasswd-")
        .tempdir()
        .expect("htpasswd dir");
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .unwrap_or_else(|e| panic!("cannot run htpasswd (apt-get install apache2-utils): {e}"));
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("htpasswd output");
    let file = dir.path().join("htpasswd");
    std::fs::write(&file, format!("{}\n", line.trim())).expect("write htpasswd");
    let registry = Registry::start_with(&RegistryConfig {
        extra_yaml: format!(
            "auth:\n  htpasswd:\n    realm: erofs-fanotify-tests\n    path: {}\n",
            file.display()
        ),
        access_log: false,
    });
    registry.set_push_auth(Some(basic_auth(user, password)));
    HtpasswdRegistry {
        registry,
        _dir: dir,
    }
}

/// A token server and a registry that trusts it; pushes to `repos` are allowed by a minted token.
fn token_registry(policy: TokenPolicy, repos: &[&str]) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(policy);
    let registry = Registry::start_with(&RegistryConfig {
        extra_yaml: tokens.registry_yaml(),
        access_log: false,
    });
    registry.set_push_auth(Some(tokens.push_auth(repos)));
    (tokens, registry)
}

fn credentials() -> [String; 2] {
    [
        format!("oci.username={USER}"),
        format!("oci.password={PASSWORD}"),
    ]
}

fn wrong_credentials() -> [String; 2] {
    [
        format!("oci.username={USER}"),
        format!("oci.password={WRONG_PASSWORD}"),
    ]
}

fn refs(opts: &[String]) -> Vec<&str> {
    opts.iter().map(String::as_str).collect()
}

/// The password must not be in any file of the state dir (records, logs), the status output or the
/// agent's command line.
fn assert_password_not_leaked(env: &OciEnv, m: &Mounted) {
    for record in env.records() {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        assert!(
            !text.contains(PASSWORD),
            "the password is in the state record {}",
            record.display()
        );
    }
    let status = Command::new(common::EROFS_FANOTIFY)
        .env(common::STATE_DIR_ENV, &env.state_dir)
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains(PASSWORD),
        "the password is in status"
    );
    let regular = |f: &PathBuf| f.symlink_metadata().is_ok_and(|m| m.is_file());
    for file in common::tree::list_files(&env.state_dir)
        .into_iter()
        .filter(regular)
    {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "the password is in {} (state dir)",
            file.display()
        );
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", m.agent_pid())).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(PASSWORD),
        "the password is on the agent's command line"
    );
}

fn mount_compare_unmount(env: &OciEnv, reference: &str, extra: &[&str], img: &TinyImage) {
    mount_compare_unmount_with(env, reference, extra, img, |_| {});
}

fn mount_compare_unmount_with(
    env: &OciEnv,
    reference: &str,
    extra: &[&str],
    img: &TinyImage,
    configure: impl FnOnce(&mut Command),
) {
    let m = env.mount_with(reference, "mnt", extra, configure);
    assert_tree_identical(&img.tree, &m.mountpoint);
    assert_password_not_leaked(env, &m);
    assert_eq!(m.status().fetch_errors, 0);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn htpasswd_basic_auth_right_and_wrong_password() {
    if !oci_ready() {
        return;
    }
    let htpasswd = htpasswd_registry(USER, PASSWORD);
    let registry = &htpasswd.registry;
    let img = tiny_image("basic-auth");
    push_single(registry, "test/private", "v1", &img.image.path);
    let env = OciEnv::new("oci-basic");
    let by_tag = reference(&registry.host(), "test/private", "v1");

    mount_compare_unmount(&env, &by_tag, &refs(&credentials()), &img);

    let line = env.assert_mount_fails(&by_tag, &refs(&wrong_credentials()), AUTH_REFUSED);
    assert!(
        !line.contains(WRONG_PASSWORD),
        "the error line shows the password: {line:?}"
    );
    env.assert_mount_fails(&by_tag, &[], AUTH_REFUSED);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn token_auth_anonymous_pull() {
    if !oci_ready() {
        return;
    }
    let (tokens, registry) = token_registry(TokenPolicy::default(), &["test/public"]);
    let img = tiny_image("token-anonymous");
    push_single(&registry, "test/public", "v1", &img.image.path);
    let env = OciEnv::new("oci-token-anon");
    mount_compare_unmount(
        &env,
        &reference(&registry.host(), "test/public", "v1"),
        &[],
        &img,
    );
    let requests = tokens.requests();
    assert!(tokens.issued() >= 1, "no token was issued: {requests:?}");
    assert!(
        requests.iter().all(|r| r.authorization.is_none()),
        "an anonymous pull sent credentials to the token server: {requests:?}"
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn token_auth_credentials_checked_by_the_token_server() {
    if !oci_ready() {
        return;
    }
    let policy = TokenPolicy {
        anonymous_pull: false,
        users: vec![(USER.into(), PASSWORD.into())],
        ..TokenPolicy::default()
    };
    let (tokens, registry) = token_registry(policy, &["test/members"]);
    let img = tiny_image("token-credentials");
    push_single(&registry, "test/members", "v1", &img.image.path);
    let env = OciEnv::new("oci-token-creds");
    let by_tag = reference(&registry.host(), "test/members", "v1");

    mount_compare_unmount(&env, &by_tag, &refs(&credentials()), &img);
    let requests = tokens.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.status == 200 && r.authorization.is_some()),
        "no token was fetched with credentials: {requests:?}"
    );

    let line = env.assert_mount_fails(&by_tag, &refs(&wrong_credentials()), AUTH_REFUSED);
    assert!(
        !line.contains(WRONG_PASSWORD),
        "the error line shows the password: {line:?}"
    );
    // Anonymous: the token server hands out a token without pull access.
    let mut keywords = AUTH_REFUSED.to_vec();
    keywords.extend_from_slice(INSUFFICIENT_SCOPE);
    env.assert_mount_fails(&by_tag, &[], &keywords);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn token_without_pull_access_is_insufficient_scope() {
    if !oci_ready() {
        return;
    }
    let policy = TokenPolicy {
        anonymous_pull: true,
        users: vec![(USER.into(), PASSWORD.into())],
        no_pull_repos: vec!["test/secret".into()],
        ..TokenPolicy::default()
    };
    let (_tokens, registry) = token_registry(policy, &["test/secret"]);
    let img = tiny_image("token-scope");
    push_single(&registry, "test/secret", "v1", &img.image.path);
    let env = OciEnv::new("oci-token-scope");
    let by_tag = reference(&registry.host(), "test/secret", "v1");
    env.assert_mount_fails(&by_tag, &refs(&credentials()), INSUFFICIENT_SCOPE);
    env.assert_mount_fails(&by_tag, &[], INSUFFICIENT_SCOPE);
}

/// Tokens live 3 s; the test reads a file, waits past the expiry, then reads everything. With credentials
/// the token server claims `expires_in: 300`, so only the registry's 401 tells the agent the token is gone;
/// anonymous tokens report their real 3 s (a client may renew ahead of time or on the 401).
fn token_expires_during_mount(with_credentials: bool) {
    let lifetime = Duration::from_secs(3);
    let policy = TokenPolicy {
        anonymous_pull: !with_credentials,
        users: vec![(USER.into(), PASSWORD.into())],
        lifetime,
        reported_expires_in: with_credentials.then_some(Duration::from_secs(300)),
        ..TokenPolicy::default()
    };
    let (tokens, registry) = token_registry(policy, &["test/expiring"]);
    let img = tiny_image("token-expiry");
    push_single(&registry, "test/expiring", "v1", &img.image.path);
    let env = OciEnv::new(if with_credentials {
        "oci-expiry-creds"
    } else {
        "oci-expiry-anon"
    });
    let creds = credentials();
    let extra = if with_credentials {
        refs(&creds)
    } else {
        Vec::new()
    };
    let m = env.mount(
        &reference(&registry.host(), "test/expiring", "v1"),
        "mnt",
        &extra,
    );
    let label = std::fs::read_to_string(m.path("label.txt")).expect("read label.txt");
    assert_eq!(label, "token-expiry\n");
    let issued_before = tokens.issued();
    std::thread::sleep(lifetime + Duration::from_millis(1500));
    // Every data block not read yet needs a fetch now, with an expired token in hand.
    assert_tree_identical(&img.tree, &m.mountpoint);
    let status = m.status();
    assert!(
        tokens.issued() > issued_before,
        "no new token after the old one expired, yet reads succeeded? {status:?} {:?}",
        tokens.requests()
    );
    eprintln!(
        "tokens issued: {} (before expiry {issued_before}); {status:?}",
        tokens.issued()
    );
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn anonymous_token_expires_during_mount_reads_still_succeed() {
    if !oci_ready() {
        return;
    }
    token_expires_during_mount(false);
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn credentialed_token_expires_during_mount_reads_still_succeed() {
    if !oci_ready() {
        return;
    }
    token_expires_during_mount(true);
}

/// `{"auths": {"HOST": {"auth": base64(user:password)}}}`
fn auths_json(host: &str, user: &str, password: &str) -> String {
    serde_json::json!({
        "auths": {host: {"auth": base64_std(format!("{user}:{password}").as_bytes())}}
    })
    .to_string()
}

fn write_file(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn credentials_from_docker_config_and_registry_auth_file() {
    if !oci_ready() {
        return;
    }
    // config.json against htpasswd (Basic on every request), auth.json against the token server.
    let htpasswd = htpasswd_registry(USER, PASSWORD);
    let basic_img = tiny_image("docker-config-json");
    push_single(&htpasswd.registry, "test/cfg", "v1", &basic_img.image.path);
    let policy = TokenPolicy {
        anonymous_pull: false,
        users: vec![(USER.into(), PASSWORD.into())],
        ..TokenPolicy::default()
    };
    let (tokens, token_registry) = token_registry(policy, &["test/authfile"]);
    let token_img = tiny_image("registry-auth-file");
    push_single(
        &token_registry,
        "test/authfile",
        "v1",
        &token_img.image.path,
    );
    let env = OciEnv::new("oci-cred-files");

    let docker_config = env.root.join("docker-config");
    write_file(
        &docker_config.join("config.json"),
        &auths_json(&htpasswd.registry.host(), USER, PASSWORD),
    );
    let by_tag = reference(&htpasswd.registry.host(), "test/cfg", "v1");
    mount_compare_unmount_with(&env, &by_tag, &[], &basic_img, |cmd| {
        cmd.env("DOCKER_CONFIG", &docker_config);
    });
    // The same file with a wrong password is refused.
    let wrong_config = env.root.join("docker-config-wrong");
    write_file(
        &wrong_config.join("config.json"),
        &auths_json(&htpasswd.registry.host(), USER, WRONG_PASSWORD),
    );
    env.assert_mount_fails_with(&by_tag, &[], AUTH_REFUSED, |cmd| {
        cmd.env("DOCKER_CONFIG", &wrong_config);
    });

    let auth_file = env.root.join("containers-auth.json");
    write_file(
        &auth_file,
        &auths_json(&token_registry.host(), USER, PASSWORD),
    );
    let by_tag = reference(&token_registry.host(), "test/authfile", "v1");
    mount_compare_unmount_with(&env, &by_tag, &[], &token_img, |cmd| {
        cmd.env("REGISTRY_AUTH_FILE", &auth_file);
    });
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.status == 200 && r.authorization.is_some()),
        "the auth.json credentials never reached the token server: {:?}",
        tokens.requests()
    );
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn credentials_from_default_locations() {
    if !oci_ready() {
        return;
    }
    let htpasswd = htpasswd_registry(USER, PASSWORD);
    let img = tiny_image("default-cred-locations");
    push_single(&htpasswd.registry, "test/defaults", "v1", &img.image.path);
    let by_tag = reference(&htpasswd.registry.host(), "test/defaults", "v1");

    // ~/.docker/config.json
    let env = OciEnv::new("oci-cred-home");
    write_file(
        &env.home.join(".docker/config.json"),
        &auths_json(&htpasswd.registry.host(), USER, PASSWORD),
    );
    mount_compare_unmount(&env, &by_tag, &[], &img);
    drop(env);

    // $XDG_RUNTIME_DIR/containers/auth.json
    let env = OciEnv::new("oci-cred-xdg");
    write_file(
        &env.home.join("run/containers/auth.json"),
        &auths_json(&htpasswd.registry.host(), USER, PASSWORD),
    );
    mount_compare_unmount(&env, &by_tag, &[], &img);
}

/// Writes `docker-credential-NAME` into `dir`: answers `get` for `host` with the test user, logs calls.
fn credential_helper(dir: &Path, name: &str, host: &str, password: &str) -> PathBuf {
    let log = dir.join(format!("{name}.calls"));
    let script = format!(
        r#"#!/bin/sh
# Test credential helper (docker-credential-helpers protocol): `get` reads the server on stdin.
read -r server
echo "$1 $server" >> '{log}'
case "$1" in
get) ;;
*) exit 1 ;;
esac
case "$server" in
*{host}*) printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"{password}"}}\n' "$server" ;;
*) echo "credentials not found in native keychain"; exit 1 ;;
esac
"#,
        log = log.display()
    );
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).expect("write helper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod helper");
    log
}

#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn credentials_from_a_credential_helper_on_path() {
    if !oci_ready() {
        return;
    }
    let htpasswd = htpasswd_registry(USER, PASSWORD);
    let img = tiny_image("credential-helper");
    push_single(&htpasswd.registry, "test/helper", "v1", &img.image.path);
    let env = OciEnv::new("oci-cred-helper");
    let host = htpasswd.registry.host();
    let by_tag = reference(&host, "test/helper", "v1");

    let bin = env.root.join("helper-bin");
    std::fs::create_dir_all(&bin).expect("helper bin dir");
    let calls = credential_helper(&bin, "erofstest", &host, PASSWORD);
    let docker_config = env.root.join("docker-config");
    write_file(
        &docker_config.join("config.json"),
        &serde_json::json!({"credHelpers": {host.clone(): "erofstest"}}).to_string(),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    mount_compare_unmount_with(&env, &by_tag, &[], &img, |cmd| {
        cmd.env("DOCKER_CONFIG", &docker_config).env("PATH", &path);
    });
    let log = std::fs::read_to_string(&calls).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.starts_with("get ") && l.contains(&host)),
        "the credential helper was not asked for {host}: {log:?}"
    );

    // A helper that hands out a wrong password: refused, clearly.
    let bin_wrong = env.root.join("helper-bin-wrong");
    std::fs::create_dir_all(&bin_wrong).expect("helper bin dir");
    credential_helper(&bin_wrong, "erofstest", &host, WRONG_PASSWORD);
    let path_wrong = format!(
        "{}:{}",
        bin_wrong.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    env.assert_mount_fails_with(&by_tag, &[], AUTH_REFUSED, |cmd| {
        cmd.env("DOCKER_CONFIG", &docker_config)
            .env("PATH", &path_wrong);
    });
}

/// The harness itself (independent of the code under test): docker-registry accepts the token server's
/// JWTs, refuses them after their lifetime, answers `insufficient_scope` without pull access, and the
/// htpasswd registry checks Basic credentials.
#[test]
#[ignore = "needs root + kernel (fanotify pre-content, EROFS) + mkfs.erofs + docker-registry + htpasswd + openssl"]
fn harness_token_server_and_htpasswd_work_with_docker_registry() {
    if !oci_ready() {
        return;
    }
    use common::http::{self, Body};
    let policy = TokenPolicy {
        anonymous_pull: true,
        users: vec![(USER.into(), PASSWORD.into())],
        no_pull_repos: vec!["test/secret".into()],
        lifetime: Duration::from_secs(2),
        reported_expires_in: None,
        users_may_push: false,
    };
    let (tokens, registry) = token_registry(policy, &["test/open", "test/secret"]);
    let img = tiny_image("harness-token");
    push_single(&registry, "test/open", "v1", &img.image.path);
    push_single(&registry, "test/secret", "v1", &img.image.path);
    let manifest_url = |repo: &str| format!("{}/v2/{repo}/manifests/v1", registry.base_url());
    let accept = ("Accept", common::oci::OCI_MANIFEST);

    let challenge =
        http::request("GET", &manifest_url("test/open"), &[accept], Body::Empty).unwrap();
    assert_eq!(challenge.status, 401);
    let www = challenge
        .header("www-authenticate")
        .unwrap_or_default()
        .to_string();
    assert!(
        www.starts_with("Bearer ") && www.contains(&tokens.realm()),
        "{www}"
    );

    let token_for = |repo: &str, auth: Option<String>| -> (u16, String) {
        let url = format!(
            "{}?service={}&scope=repository:{repo}:pull",
            tokens.realm(),
            common::token_server::SERVICE
        );
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = http::request("GET", &url, &headers, Body::Empty).unwrap();
        let token = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string))
            .unwrap_or_default();
        (r.status, token)
    };
    let get_with = |repo: &str, token: &str| {
        let bearer = format!("Bearer {token}");
        http::request(
            "GET",
            &manifest_url(repo),
            &[accept, ("Authorization", &bearer)],
            Body::Empty,
        )
        .unwrap()
    };

    let (status, token) = token_for("test/open", None);
    assert_eq!(status, 200);
    let ok = get_with("test/open", &token);
    assert_eq!(ok.status, 200, "{}", registry.log());
    let (status, _) = token_for("test/open", Some(basic_auth(USER, WRONG_PASSWORD)));
    assert_eq!(status, 401);
    let (status, token) = token_for("test/secret", Some(basic_auth(USER, PASSWORD)));
    assert_eq!(status, 200);
    let denied = get_with("test/secret", &token);
    assert_eq!(denied.status, 401);
    assert!(
        denied
            .header("www-authenticate")
            .unwrap_or_default()
            .contains("insufficient_scope"),
        "{denied:?}"
    );
    let (_, token) = token_for("test/open", None);
    std::thread::sleep(Duration::from_millis(3200));
    let expired = get_with("test/open", &token);
    assert_eq!(
        expired.status, 401,
        "a token past its lifetime was accepted"
    );

    let htpasswd = htpasswd_registry(USER, PASSWORD);
    push_single(&htpasswd.registry, "test/basic", "v1", &img.image.path);
    let url = format!(
        "{}/v2/test/basic/manifests/v1",
        htpasswd.registry.base_url()
    );
    let right = basic_auth(USER, PASSWORD);
    let wrong = basic_auth(USER, WRONG_PASSWORD);
    let r = http::request(
        "GET",
        &url,
        &[accept, ("Authorization", &right)],
        Body::Empty,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let r = http::request(
        "GET",
        &url,
        &[accept, ("Authorization", &wrong)],
        Body::Empty,
    )
    .unwrap();
    assert_eq!(r.status, 401);
}
