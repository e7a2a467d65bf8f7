//! S3 sources on a real S3 API: moto (PyPI) on 127.0.0.1, checking SigV4 signatures (see
//! `common::moto`). EROFS images (mkfs.erofs) uploaded as objects are mounted lazily by `s3://` and by
//! erofs-utils' `-o s3.endpoint=` form; credentials come from each source; refusals are one line each
//! and leave nothing behind; secrets appear nowhere the agent writes or exposes; a dead first endpoint
//! fails over; a changed object is never served stale.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::Outcome;
use common::fixtures;
use common::moto::{self, isolate_aws, write_passwd_file, Moto};
use common::oci::{assert_one_line_failure, tiny_image};
use common::registry::closed_port;
use common::tree::{assert_same_bytes, assert_tree_identical, list_files};
use common::{Mounted, TestEnv, GONE_TIMEOUT};

const BUCKET: &str = "images";

fn s3_ready() -> bool {
    common::ready() && moto::require()
}

/// A test's environment: its state/cache dirs, a moto server with a bucket, an AWS dir for files.
struct S3Env {
    env: TestEnv,
    moto: Moto,
    aws_dir: PathBuf,
}

impl std::ops::Deref for S3Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl S3Env {
    fn new(name: &str) -> S3Env {
        Self::with(name, Moto::start())
    }

    fn with(name: &str, moto: Moto) -> S3Env {
        let env = TestEnv::new(name);
        let aws_dir = env.root.join("aws");
        std::fs::create_dir_all(&aws_dir).expect("aws dir");
        moto.create_bucket(BUCKET);
        S3Env { env, moto, aws_dir }
    }

    /// The IAM user's keys in the environment, moto as `AWS_ENDPOINT_URL`.
    fn env_keys<'a>(&'a self) -> impl Fn(&mut Command) + 'a {
        move |cmd: &mut Command| {
            cmd.env("AWS_ACCESS_KEY_ID", &self.moto.keys.access_key)
                .env("AWS_SECRET_ACCESS_KEY", &self.moto.keys.secret_key)
                .env("AWS_ENDPOINT_URL", self.moto.endpoint());
        }
    }

    fn try_mount(&self, source: &str, mountpoint: &Path, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Outcome {
        self.env.try_mount_with(source, mountpoint, extra, |cmd| {
            isolate_aws(cmd, &self.aws_dir);
            configure(cmd);
        })
    }

    fn mount(&self, source: &str, name: &str, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Mounted {
        self.env.mount_with(source, name, extra, |cmd| {
            isolate_aws(cmd, &self.aws_dir);
            configure(cmd);
        })
    }

    /// The mount fails with one line naming one of `keywords`, and leaves nothing behind.
    fn assert_mount_fails(&self, source: &str, extra: &[&str], keywords: &[&str], configure: impl FnOnce(&mut Command)) -> String {
        let mountpoint = self.mountpoint("failing");
        let cache_before = self.cache_files();
        let outcome = self.try_mount(source, &mountpoint, extra, configure);
        let line = assert_one_line_failure(&outcome, keywords);
        eprintln!("{source} {extra:?} failed as expected in {:.1?}: {line}", outcome.elapsed);
        assert!(!common::env::is_mounted(&mountpoint), "mounted after a failed mount");
        self.assert_nothing_left(&[]);
        let new: Vec<PathBuf> = self.cache_files().into_iter().filter(|f| !cache_before.contains(f)).collect();
        assert!(new.is_empty(), "a failed mount left cache files: {new:?}");
        line
    }

    fn passwd_file(&self, name: &str, line: &str, mode: u32) -> PathBuf {
        let path = self.aws_dir.join(name);
        write_passwd_file(&path, line, mode);
        path
    }

    fn s3_url(key: &str) -> String {
        format!("s3://{BUCKET}/{key}")
    }
}

/// No file under `dir` contains any of `secrets`.
fn assert_no_secret_in_files(dir: &Path, secrets: &[&str]) {
    let files = list_files(dir);
    assert!(!files.is_empty(), "nothing under {} to check", dir.display());
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        for s in secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "a secret is written in {}",
                f.display()
            );
        }
    }
}

fn proc_file_has(pid: i32, file: &str, needle: &str) -> bool {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_else(|e| panic!("read /proc/{pid}/{file}: {e}"));
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn read_and_compare(m: &Mounted, tree: &Path, rel: &str) {
    let got = std::fs::read(m.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
    assert_same_bytes(&std::fs::read(tree.join(rel)).expect("source file"), &got, rel);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn s3_url_cold_mount_is_byte_identical_and_keeps_secrets() {
    if !s3_ready() {
        return;
    }
    let fx = fixtures::small();
    let s = S3Env::new("s3-url");
    s.moto.put_file(BUCKET, "small/lz4.erofs", &fx.lz4.path);
    let source = S3Env::s3_url("small/lz4.erofs");
    // Endpoint from AWS_ENDPOINT_URL, keys from the environment.
    let m = s.mount(&source, "mnt", &[], s.env_keys());
    let status = m.status();
    assert_eq!(status.source, source);
    assert_eq!(status.blob_size, fx.lz4.size);
    assert!(status.fetched_bytes < fx.lz4.size, "the mount fetched the whole object: {status:?}");
    assert_tree_identical(&fx.tree, &m.mountpoint);
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    assert!(status.populated_bytes >= fx.lz4.size / 10 * 9, "{status:?}");

    // The secret never leaves the agent's memory.
    let secret = s.moto.keys.secret_key.as_str();
    assert_no_secret_in_files(&s.state_dir, &[secret]);
    assert_no_secret_in_files(&s.cache_dir, &[secret]);
    let agents = s.agents();
    assert!(!agents.is_empty(), "no agent process found");
    assert!(agents.contains(&status.agent_pid), "agent {} not among {agents:?}", status.agent_pid);
    for pid in agents {
        for file in ["cmdline", "environ"] {
            assert!(!proc_file_has(pid, file, secret), "the secret is in /proc/{pid}/{file}");
            assert!(!proc_file_has(pid, file, "AWS_SECRET_ACCESS_KEY"), "AWS_SECRET_ACCESS_KEY in /proc/{pid}/{file}");
        }
    }
    let status_json = common::cmd::run(s.command(common::EROFS_FANOTIFY).args(["status", "--json"]), common::COMMAND_TIMEOUT);
    assert!(!status_json.stdout_str().contains(secret), "the secret is in status --json");
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn erofs_utils_option_form_mounts_with_a_passwd_file() {
    if !s3_ready() {
        return;
    }
    let fx = fixtures::small();
    let s = S3Env::new("s3-opts");
    s.moto.put_file(BUCKET, "small/plain.erofs", &fx.plain.path);
    let passwd = s.passwd_file("passwd-s3fs", &format!("{BUCKET}:{}:{}", s.moto.keys.access_key, s.moto.keys.secret_key), 0o600);
    let opts = format!(
        "s3.endpoint={},s3.region=us-east-1,s3.urlstyle=path,s3.sig=4,s3.passwd_file={}",
        s.moto.endpoint(),
        passwd.display()
    );
    let m = s.mount(&format!("{BUCKET}/small/plain.erofs"), "mnt", &[&opts], |_| {});
    assert_eq!(m.status().source, S3Env::s3_url("small/plain.erofs"));
    assert_tree_identical(&fx.tree, &m.mountpoint);
    assert_no_secret_in_files(&s.state_dir, &[&s.moto.keys.secret_key]);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn reading_three_small_files_fetches_little_with_a_shared_credentials_profile() {
    if !s3_ready() {
        return;
    }
    // The large fixture, as for the registry (in the small one the mount's metadata reads already
    // cover small files), built by our writer: its metadata is one range, so the mount makes a few
    // requests, not hundreds — moto copies the whole object for every ranged GET (~150 ms a request
    // at 128 MB, far more on a loaded machine).
    let fx = fixtures::large();
    let s = S3Env::new("s3-lazy");
    let image = s.root.join("large-lazy.erofs");
    common::cmd::run(
        Command::new(common::EROFS_FANOTIFY).arg("build").arg(&fx.tree).arg(&image),
        common::COMMAND_TIMEOUT,
    )
    .assert_success();
    let image_size = std::fs::metadata(&image).expect("built image").len();
    s.moto.put_file(BUCKET, "large.erofs", &image);
    std::fs::write(
        s.aws_dir.join("credentials"),
        format!(
            "[default]\naws_access_key_id = AKIANOTTHISONE\naws_secret_access_key = wrong\n\n[tester]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s.moto.keys.access_key, s.moto.keys.secret_key
        ),
    )
    .unwrap();
    std::fs::write(
        s.aws_dir.join("config"),
        format!("[profile tester]\nregion = us-east-1\nendpoint_url = {}\ns3 =\n  addressing_style = path\n", s.moto.endpoint()),
    )
    .unwrap();
    let m = s.mount(&S3Env::s3_url("large.erofs"), "mnt", &[], |cmd| {
        cmd.env("AWS_PROFILE", "tester");
    });
    let after_mount = m.status().fetched_bytes;
    for file in fx.small_files(3) {
        read_and_compare(&m, &fx.tree, &file.rel.to_string_lossy());
    }
    let status = m.status();
    eprintln!(
        "s3 lazy: fetched {after_mount} bytes at mount, {} after three small files, object {} bytes ({:.1} %), {} requests",
        status.fetched_bytes,
        image_size,
        status.fetched_bytes as f64 * 100.0 / image_size as f64,
        status.fetch_requests
    );
    assert!(status.fetched_bytes > after_mount, "reading cold files fetched nothing: {status:?}");
    assert!(
        status.fetched_bytes < image_size * 3 / 10,
        "three small files fetched {} of {} bytes (>= 30 %)",
        status.fetched_bytes,
        image_size
    );
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn session_tokens_are_sent_and_checked() {
    if !s3_ready() {
        return;
    }
    let tiny = tiny_image("s3-session");
    let s = S3Env::new("s3-session");
    s.moto.put_file(BUCKET, "tiny.erofs", &tiny.image.path);
    let keys = s.moto.keys.clone();
    let session = |token: String| {
        let (ak, sk, endpoint) = (keys.session_access_key.clone(), keys.session_secret_key.clone(), s.moto.endpoint());
        move |cmd: &mut Command| {
            cmd.env("AWS_ACCESS_KEY_ID", &ak)
                .env("AWS_SECRET_ACCESS_KEY", &sk)
                .env("AWS_SESSION_TOKEN", &token)
                .env("AWS_ENDPOINT_URL", &endpoint);
        }
    };
    s.assert_mount_fails(&S3Env::s3_url("tiny.erofs"), &[], &["session token"], session("not-the-token".into()));
    let m = s.mount(&S3Env::s3_url("tiny.erofs"), "mnt", &[], session(keys.session_token.clone()));
    read_and_compare(&m, &tiny.tree, "random-300k");
    let token = keys.session_token.as_str();
    assert_no_secret_in_files(&s.state_dir, &[token, &keys.session_secret_key]);
    for pid in s.agents() {
        assert!(!proc_file_has(pid, "environ", token), "the session token is in /proc/{pid}/environ");
    }
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn refusals_are_one_clear_line_and_leave_nothing() {
    if !s3_ready() {
        return;
    }
    let tiny = tiny_image("s3-refusals");
    let s = S3Env::new("s3-refusals");
    s.moto.put_file(BUCKET, "tiny.erofs", &tiny.image.path);
    let endpoint = s.moto.endpoint();
    let keys = |ak: &str, sk: &str, endpoint: &str| {
        let (ak, sk, endpoint) = (ak.to_string(), sk.to_string(), endpoint.to_string());
        move |cmd: &mut Command| {
            cmd.env("AWS_ACCESS_KEY_ID", &ak).env("AWS_SECRET_ACCESS_KEY", &sk).env("AWS_ENDPOINT_URL", &endpoint);
        }
    };
    let ak = s.moto.keys.access_key.clone();
    let sk = s.moto.keys.secret_key.clone();
    let line = s.assert_mount_fails(&S3Env::s3_url("tiny.erofs"), &[], &["SignatureDoesNotMatch"], keys(&ak, "wrong-secret", &endpoint));
    assert!(line.contains("secret access key") && line.contains("AWS_ACCESS_KEY_ID"), "{line}");
    assert!(!line.contains("wrong-secret"), "the error shows the secret: {line}");
    s.assert_mount_fails(&S3Env::s3_url("tiny.erofs"), &[], &["InvalidAccessKeyId"], keys("AKIAUNKNOWNKEY000000", &sk, &endpoint));
    s.assert_mount_fails("s3://no-such-bucket/tiny.erofs", &[], &["NoSuchBucket"], keys(&ak, &sk, &endpoint));
    s.assert_mount_fails(&S3Env::s3_url("no/such.erofs"), &[], &["NoSuchKey"], keys(&ak, &sk, &endpoint));
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let line = s.assert_mount_fails(&S3Env::s3_url("tiny.erofs"), &[], &["unreachable"], keys(&ak, &sk, &dead));
    assert!(line.contains(&dead), "{line}");
    // A passwd file that group or others may read is refused before any request.
    let open = s.passwd_file("open-passwd", &format!("{ak}:{sk}"), 0o644);
    let line = s.assert_mount_fails(
        &format!("{BUCKET}/tiny.erofs"),
        &[&format!("s3.endpoint={endpoint},s3.passwd_file={}", open.display())],
        &["chmod 600"],
        |_| {},
    );
    assert!(line.contains("group or others"), "{line}");
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn a_dead_first_endpoint_fails_over_to_the_second() {
    if !s3_ready() {
        return;
    }
    let tiny = tiny_image("s3-failover");
    let s = S3Env::new("s3-failover");
    s.moto.put_file(BUCKET, "tiny.erofs", &tiny.image.path);
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let passwd = s.passwd_file("passwd", &format!("{}:{}", s.moto.keys.access_key, s.moto.keys.secret_key), 0o600);
    let opts = format!("s3.endpoint={dead},s3.endpoint={},s3.passwd_file={}", s.moto.endpoint(), passwd.display());
    let m = s.mount(&format!("{BUCKET}/tiny.erofs"), "mnt", &[&opts], |_| {});
    read_and_compare(&m, &tiny.tree, "random-300k");
    read_and_compare(&m, &tiny.tree, "text-200k");
    let status = m.status();
    let served = common::oci::served_by(&status);
    assert!(served.iter().any(|e| e == &s.moto.endpoint()), "served by {served:?}, not {}", s.moto.endpoint());
    assert_eq!(status.fetch_errors, 0, "{status:?}");
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn a_changed_object_is_never_served_stale() {
    if !s3_ready() {
        return;
    }
    let v1 = fixtures::small();
    let v2 = tiny_image("s3-version-two");
    let s = S3Env::new("s3-changed");
    s.moto.put_file(BUCKET, "img.erofs", &v1.plain.path);
    let source = S3Env::s3_url("img.erofs");
    let m = s.mount(&source, "mnt", &[], s.env_keys());
    let first = &v1.small_files(1)[0];
    read_and_compare(&m, &v1.tree, &first.rel.to_string_lossy());
    // Re-upload other bytes under the same key while mounted: data not fetched yet must not come from
    // the new object (EIO), and what was read stays the old version's.
    s.moto.put_file(BUCKET, "img.erofs", &v2.image.path);
    let err = std::fs::read(m.path("big/random-3m")).expect_err("a read of the changed object succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "expected EIO, got {err}");
    assert!(m.status().fetch_errors > 0);
    read_and_compare(&m, &v1.tree, &first.rel.to_string_lossy());
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
    // A remount sees the new version (a new cache entry: the old one is not reused).
    let m = s.mount(&source, "mnt", &[], s.env_keys());
    assert_eq!(m.status().blob_size, v2.image.size);
    assert_tree_identical(&v2.tree, &m.mountpoint);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn refused_credentials_are_re_read_from_their_file_once() {
    if !s3_ready() {
        return;
    }
    let fx = fixtures::small();
    let s = S3Env::new("s3-reread");
    s.moto.put_file(BUCKET, "small.erofs", &fx.plain.path);
    let (ak1, sk1) = s.moto.new_access_key();
    let passwd = s.passwd_file("passwd", &format!("{ak1}:{sk1}"), 0o600);
    let opts = format!("s3.endpoint={},s3.passwd_file={}", s.moto.endpoint(), passwd.display());
    let m = s.mount(&format!("{BUCKET}/small.erofs"), "mnt", &[&opts], |_| {});
    // Rotate the key (IAM allows two per user, the setup key is one): the old one is gone, the file
    // names the new one.
    s.moto.delete_access_key(&ak1);
    let (ak2, sk2) = s.moto.new_access_key();
    write_passwd_file(&passwd, &format!("{ak2}:{sk2}"), 0o600);
    // Small reads far apart, so that no read-ahead fetches the second one's bytes with the first.
    let file = std::fs::File::open(m.path("big/random-3m")).expect("open");
    let source = fx.read_source("big/random-3m");
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).expect("read with the re-read key");
    assert_same_bytes(&source[..4096], &buf, "big/random-3m at 0");
    assert_eq!(m.status().fetch_errors, 0, "the re-read credentials did not serve the read");
    let logs: String = list_files(&s.state_dir.join("agents"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(logs.contains("retrying with the re-read ones"), "the agent log does not tell of the re-read:\n{logs}");
    assert!(!logs.contains(&sk2) && !logs.contains(&sk1), "a secret is in the agent log");
    // Gone without a replacement: the one retry fails too, and readers get EIO.
    s.moto.delete_access_key(&ak2);
    let far = 5 << 19;
    let err = file.read_exact_at(&mut buf, far).expect_err("read with a deleted key succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "expected EIO, got {err}");
    drop(file);
    assert!(m.status().fetch_errors > 0);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn sigv2_mounts_from_a_store_without_auth_checks() {
    if !s3_ready() {
        return;
    }
    // moto answers SigV2 with 500 when it checks auth, so this store checks nothing: the test shows that
    // SigV2 requests are well-formed for a real S3 front end (the signature itself is unit-tested on AWS's
    // published example).
    let tiny = tiny_image("s3-sigv2");
    let s = S3Env::with("s3-sigv2", Moto::start_without_auth());
    s.moto.put_file(BUCKET, "tiny.erofs", &tiny.image.path);
    let passwd = s.passwd_file("passwd", &format!("{}:{}", s.moto.keys.access_key, s.moto.keys.secret_key), 0o600);
    let opts = format!("s3.endpoint={},s3.sig=2,s3.urlstyle=path,s3.passwd_file={}", s.moto.endpoint(), passwd.display());
    let m = s.mount(&format!("{BUCKET}/tiny.erofs"), "mnt", &[&opts], |_| {});
    assert_tree_identical(&tiny.tree, &m.mountpoint);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}
