//! Buckets as images (issue 17, item 3) on a real S3 API (moto, see `common::moto`):
//! `erofs-fanotify build --s3 ENDPOINT BUCKET[/PREFIX] OUT.erofs` lists a bucket and writes a
//! metadata-only image whose files read from their objects; the image mounts from a local path and
//! from the bucket itself (`s3://`). Every file equals its object; reading one file sends GETs for
//! that object only (counted in moto's request log); a changed or removed object gives EIO, never
//! other bytes.
//!
//! The first test runs against a moto that checks SigV4 signatures. moto 5 checks wrongly any
//! percent-encoded byte in a query value or key (see tests/s3_list.rs), so prefixes (`prefix=a%2F`)
//! and odd keys are tested on a moto that checks nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cmd::Outcome;
use common::moto::{self, isolate_aws, Moto};
use common::tree::assert_same_bytes;
use common::{Mounted, TestEnv, GONE_TIMEOUT};

fn s3_ready() -> bool {
    common::ready() && moto::require()
}

/// The body `put_generated` gives `key` (its bytes repeated to `size`).
fn body_of(key: &str, size: usize) -> Vec<u8> {
    key.as_bytes().iter().copied().cycle().take(size).collect()
}

struct BucketEnv {
    env: TestEnv,
    moto: Moto,
    aws_dir: PathBuf,
}

impl std::ops::Deref for BucketEnv {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl BucketEnv {
    fn new(name: &str, moto: Moto) -> BucketEnv {
        let env = TestEnv::new(name);
        let aws_dir = env.root.join("aws");
        std::fs::create_dir_all(&aws_dir).expect("aws dir");
        BucketEnv { env, moto, aws_dir }
    }

    /// No AWS setup of the host; the IAM user's keys in the environment.
    fn configure(&self, cmd: &mut Command) {
        isolate_aws(cmd, &self.aws_dir);
        cmd.env("AWS_ACCESS_KEY_ID", &self.moto.keys.access_key).env("AWS_SECRET_ACCESS_KEY", &self.moto.keys.secret_key);
    }

    /// `erofs-fanotify build --s3 MOTO SOURCE OUT -o s3.region=us-east-1,s3.urlstyle=path`
    fn build(&self, source: &str, out: &Path) -> Outcome {
        let mut cmd = self.command(common::EROFS_FANOTIFY);
        cmd.args(["build", "--s3", &self.moto.endpoint(), source])
            .arg(out)
            .args(["-o", "s3.region=us-east-1,s3.urlstyle=path"]);
        self.configure(&mut cmd);
        common::cmd::run(&mut cmd, common::COMMAND_TIMEOUT)
    }

    /// Mounts (panics on failure, printing the agents' logs: a startup failure is told there).
    fn mount(&self, source: &str, name: &str, extra: &[&str], more: impl FnOnce(&mut Command)) -> Mounted {
        let _logs = LogsOnPanic(self.state_dir.join("agents"));
        self.env.mount_with(source, name, extra, |cmd| {
            self.configure(cmd);
            more(cmd);
        })
    }

    /// GETs moto logged for `key` of `bucket` (path style; plain keys only: the log shows the
    /// encoded path).
    fn gets_of(&self, bucket: &str, key: &str) -> usize {
        self.moto.requests_matching(&format!("\"GET /{bucket}/{key} HTTP/1.1\"")).len()
    }

    /// GETs of objects of `bucket` (not listings: `GET /BUCKET/?list-type=2…`, not V1 `?marker`).
    fn object_gets(&self, bucket: &str) -> usize {
        self.moto.requests_matching(&format!("\"GET /{bucket}/")).iter().filter(|l| !l.contains(&format!("/{bucket}/?"))).count()
    }
}

/// Prints the agents' logs when dropped by a panic.
struct LogsOnPanic(PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in common::tree::list_files(&self.0).iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
                eprintln!("--- {} ---\n{}", log.display(), std::fs::read_to_string(log).unwrap_or_default());
            }
        }
    }
}

/// A bucket of a few hundred plain keys in nested prefixes, of sizes around block boundaries, a
/// large object, an empty one and a directory marker: (key, size) of every object with a file.
fn fill_plain_bucket(moto: &Moto, bucket: &str) -> Vec<(String, usize)> {
    moto.create_bucket(bucket);
    let sizes = [1usize, 100, 4095, 4096, 4097, 20_000, 70_001];
    let mut all = Vec::new();
    for (n, &size) in sizes.iter().enumerate() {
        let keys: Vec<String> = (0..45).map(|i| format!("set{}/sub{}/f{n}-{i}.txt", i % 4, i % 3)).collect();
        moto.put_generated(bucket, &keys, size);
        all.extend(keys.into_iter().map(|k| (k, size)));
    }
    let large = (6 << 20) + 123;
    moto.put_generated(bucket, &["large/blob.bin".to_string()], large);
    all.push(("large/blob.bin".into(), large));
    moto.put_generated(bucket, &["top-empty".to_string()], 0);
    all.push(("top-empty".into(), 0));
    moto.put_generated(bucket, &["only-a-marker/".to_string()], 0);
    all.sort();
    all
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn a_bucket_builds_into_an_image_whose_files_read_from_their_own_objects() {
    if !s3_ready() {
        return;
    }
    const BUCKET: &str = "data";
    let s = BucketEnv::new("bucket-image", Moto::start());
    let objects = fill_plain_bucket(&s.moto, BUCKET);
    let image = s.root.join("data.erofs");
    let built = s.build(BUCKET, &image);
    built.assert_success();
    eprintln!("build --s3: {}", built.stdout_str().trim());
    assert!(built.stdout_str().contains(&format!("{} files", objects.len())), "{}", built.stdout_str());
    let secret = s.moto.keys.secret_key.as_str();
    let image_bytes = std::fs::read(&image).expect("the image");
    assert!(!image_bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in the image");
    let image_size = image_bytes.len() as u64;
    assert!(image_size < 1 << 20, "a metadata-only image of {} objects is {image_size} bytes", objects.len());
    let gets_after_build = s.object_gets(BUCKET);
    assert_eq!(gets_after_build, 0, "build read object bytes");

    // Mount from the local path: the image's bytes are there, no object is read yet.
    let m = s.mount(image.to_str().expect("utf-8 path"), "mnt", &[], |_| {});
    let status = m.status();
    let fetched_at_mount = status.fetched_bytes;
    let with_data = objects.iter().filter(|(_, size)| *size > 0).count();
    assert_eq!(status.segments.len(), 1 + with_data, "the image and one segment per object: {:?}", &status.segments[..3]);
    assert_eq!(status.segments[0].start, 0);
    assert_eq!(status.segments[0].present_bytes, image_size, "the image file is present from the start");
    assert!(status.segments[1..].iter().all(|seg| seg.present_bytes == 0), "objects fetched at mount");
    assert!(status.segments.iter().any(|seg| seg.label == format!("s3://{BUCKET}/large/blob.bin")));
    assert_eq!(s.object_gets(BUCKET), gets_after_build, "the mount read objects");

    // The tree: every object a file of its size, the marker an empty directory.
    assert!(m.path("only-a-marker").is_dir());
    assert_eq!(std::fs::read_dir(m.path("only-a-marker")).expect("marker dir").count(), 0);
    for (key, size) in &objects {
        let md = std::fs::metadata(m.path(key)).unwrap_or_else(|e| panic!("stat {key}: {e}"));
        assert_eq!(md.len(), *size as u64, "{key}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(md.permissions().mode() & 0o7777, 0o644, "{key}");
    }
    assert_eq!(s.object_gets(BUCKET), gets_after_build, "stat read objects");

    // One file: GETs for its object only, and only its bytes.
    let one = "set1/sub1/f5-13.txt";
    assert!(objects.contains(&(one.to_string(), 20_000)));
    let before = m.status().fetched_bytes;
    let got = std::fs::read(m.path(one)).expect("read one file");
    assert_same_bytes(&body_of(one, 20_000), &got, one);
    let gets = s.object_gets(BUCKET) - gets_after_build;
    assert!(gets >= 1 && gets == s.gets_of(BUCKET, one), "reading {one} sent {gets} GETs, {} of them for it", s.gets_of(BUCKET, one));
    let status = m.status();
    // The object's bytes and the zeros to the end of its last block (the unit the cache file fills).
    assert_eq!(status.fetched_bytes - before, 20_000u64.next_multiple_of(4096), "fetched for {one}");
    let present: Vec<&str> = status.segments[1..].iter().filter(|g| g.present_bytes > 0).map(|g| g.label.as_str()).collect();
    assert_eq!(present, vec![format!("s3://{BUCKET}/{one}")]);

    // Everything else: each object's GETs, then bytes equal.
    let mut most_gets = 0;
    for (key, size) in objects.iter().filter(|(k, _)| k != one) {
        let gets_before = s.object_gets(BUCKET);
        let got = std::fs::read(m.path(key)).unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert_same_bytes(&body_of(key, *size), &got, key);
        let own = s.gets_of(BUCKET, key);
        assert_eq!(s.object_gets(BUCKET) - gets_before, own, "reading {key} asked other objects");
        assert_eq!(own > 0, *size > 0, "{key}: {own} GETs");
        most_gets = most_gets.max(own);
    }
    let status = m.status();
    assert_eq!(status.fetch_errors, 0, "fetch errors");
    let referenced: u64 = objects.iter().map(|(_, size)| *size as u64).sum();
    let in_blocks: u64 = objects.iter().map(|(_, size)| (*size as u64).next_multiple_of(4096)).sum();
    eprintln!(
        "bucket image: {} files ({with_data} objects, {referenced} bytes) read through {} GETs, at most {most_gets} for one object; fetched {} bytes in all",
        objects.len(),
        s.object_gets(BUCKET) - gets_after_build,
        status.fetched_bytes
    );
    assert_eq!(status.fetched_bytes - fetched_at_mount, in_blocks, "every object's blocks fetched once");
    // The cache counts whole blocks: an object's last block is present with the zeros after it.
    let partial: Vec<_> = status.segments[1..].iter().filter(|g| g.present_bytes != g.size.next_multiple_of(4096)).collect();
    assert!(partial.is_empty(), "segments not wholly present: {partial:?}");
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // The image uploaded into the bucket mounts by s3:// (the endpoint from AWS_ENDPOINT_URL).
    s.moto.put_file(BUCKET, "images/data.erofs", &image);
    let endpoint = s.moto.endpoint();
    let m = s.mount(&format!("s3://{BUCKET}/images/data.erofs"), "mnt", &[], |cmd| {
        cmd.env("AWS_ENDPOINT_URL", &endpoint);
    });
    assert_eq!(m.status().segments.len(), 1 + with_data);
    let key = "large/blob.bin";
    let got = std::fs::read(m.path(key)).expect("read through the uploaded image");
    assert_same_bytes(&body_of(key, (6 << 20) + 123), &got, key);

    // Changed (same size, other bytes) and removed objects: EIO, never the new bytes.
    let changed = "set2/sub0/f3-6.txt";
    assert!(objects.contains(&(changed.to_string(), 4096)));
    let new_body = vec![b'X'; 4096];
    use base64::Engine as _;
    s.moto.s3(&[serde_json::json!({
        "op": "put_bytes", "bucket": BUCKET, "key": changed,
        "data": base64::engine::general_purpose::STANDARD.encode(&new_body),
    })]);
    let err = std::fs::read(m.path(changed)).expect_err("a changed object was read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{changed}: {err}");
    let removed = "set3/sub0/f6-3.txt";
    assert!(objects.iter().any(|(k, _)| k == removed));
    s.moto.s3(&[serde_json::json!({"op": "delete", "bucket": BUCKET, "key": removed})]);
    let err = std::fs::read(m.path(removed)).expect_err("a removed object was read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{removed}: {err}");
    let status = m.status();
    assert!(status.fetch_errors >= 2, "{} fetch errors", status.fetch_errors);
    // Other files still read.
    let fine = "set0/sub0/f0-0.txt";
    assert_same_bytes(&body_of(fine, 1), &std::fs::read(m.path(fine)).expect("an unchanged object"), fine);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // The mount checks the first object: changed since the build, it says so in one warning line.
    s.moto.put_generated(BUCKET, &["large/blob.bin".to_string()], 10);
    let mountpoint = s.mountpoint("mnt");
    let outcome = s.env.try_mount_with(image.to_str().expect("utf-8 path"), &mountpoint, &[], |cmd| s.configure(cmd));
    outcome.assert_success();
    let warnings = outcome.stderr_lines();
    assert!(
        warnings.len() == 1 && warnings[0].contains("s3://data/large/blob.bin changed since the image was built"),
        "{warnings:?}"
    );
    s.umount(&[mountpoint.to_str().expect("utf-8 path")]).assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel + moto"]
fn prefixes_and_keys_that_are_no_paths_follow_the_rule() {
    if !s3_ready() {
        return;
    }
    const BUCKET: &str = "odd";
    let s = BucketEnv::new("bucket-odd", Moto::start_without_auth());
    s.moto.create_bucket(BUCKET);
    let kept = ["p/ü/日本語.txt", "p/with space/a b", "p/100%/x%20y", "p/plus+sign", "p/both/inside", "p/deep/a/b/c/d"];
    let skipped = ["p/a//b", "p/../x", "p/both"];
    let outside = ["q/not-listed", "p-sibling"];
    let all: Vec<String> = kept.iter().chain(&skipped).chain(&outside).map(|k| k.to_string()).collect();
    s.moto.put_generated(BUCKET, &all, 5000);

    let image = s.root.join("odd.erofs");
    let built = s.build(&format!("{BUCKET}/p"), &image);
    built.assert_success();
    let stderr = built.stderr.clone();
    eprintln!("build --s3: {}{stderr}", built.stdout_str());
    for key in skipped {
        assert!(stderr.contains(&format!("skipping key {key:?}")), "no warning for {key:?}: {stderr}");
    }
    assert!(stderr.contains("the directory is kept"), "{stderr}");
    assert!(built.stdout_str().contains(&format!("{} files", kept.len())), "{}", built.stdout_str());

    let m = s.mount(image.to_str().expect("utf-8 path"), "mnt", &[], |_| {});
    for key in kept {
        let rel = key.strip_prefix("p/").expect("under p/");
        let got = std::fs::read(m.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
        assert_same_bytes(&body_of(key, 5000), &got, rel);
    }
    assert!(m.path("both").is_dir(), "the prefix wins over the file");
    assert!(!m.path("a").exists() && !m.path("x").exists() && !m.path("q").exists());
    let mut names: Vec<String> =
        std::fs::read_dir(&m.mountpoint).expect("root").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["100%", "both", "deep", "plus+sign", "with space", "ü"]);
    assert_eq!(m.status().fetch_errors, 0);
    m.unmount().assert_success();
    s.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}

#[test]
#[ignore = "needs root + kernel"]
fn a_plain_local_image_file_mounts_and_a_rewritten_one_gives_eio() {
    if !common::ready() {
        return;
    }
    let fx = common::fixtures::small();
    let env = TestEnv::new("local-image");
    // A copy: the test rewrites it.
    let image = env.root.join("small.erofs");
    std::fs::copy(&fx.lz4.path, &image).expect("copy the fixture");
    let source = image.to_str().expect("utf-8 path").to_string();

    // Rewritten in place while mounted: data not read yet gives EIO, never the new bytes.
    let m = env.mount(&source, "mnt", &[]);
    let status = m.status();
    assert_eq!(status.source, source);
    assert_eq!(status.blob_size, fx.lz4.size);
    assert_eq!(status.segments.len(), 1);
    let file = std::fs::OpenOptions::new().write(true).open(&image).expect("open the image for writing");
    use std::os::unix::fs::FileExt;
    file.write_all_at(b"x", fx.lz4.size).expect("append a byte");
    drop(file);
    let err = std::fs::read(m.path("big/random-3m")).expect_err("a read of the rewritten image succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "big/random-3m: {err}");
    assert!(m.status().fetch_errors > 0);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);

    // The new version is a new cache entry, read whole from the file.
    let m = env.mount(&source, "mnt", &[]);
    assert_eq!(m.status().blob_size, fx.lz4.size + 1);
    common::tree::assert_tree_identical(&fx.tree, &m.mountpoint);
    assert_eq!(m.status().fetch_errors, 0);
    m.unmount().assert_success();
    env.assert_nothing_left_within(GONE_TIMEOUT, &[]);
}
