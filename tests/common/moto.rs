//! A private moto S3 server (PyPI `moto[server]`) on 127.0.0.1, one per test, stopped by pid on drop.
//!
//! `Moto::start()` checks signatures: it runs with `INITIAL_NO_AUTH_ACTION_COUNT` equal to the number of
//! setup requests (create an IAM user with an allow-all policy and its access key, a role and a session
//! for it), so every request after the setup is authenticated — and `start()` proves it by sending a
//! wrong secret and insisting on `SignatureDoesNotMatch`. `Moto::start_without_auth()` checks nothing
//! (moto answers SigV2 and presigned requests with 500 when checking is on).
//!
//! Objects and buckets are written with boto3 (it comes with moto), a second, independent client:
//! `python3 <helper> ENDPOINT AK SK` reading JSON commands on stdin.
//!
//! Prerequisite: `moto::require()` (python3 with moto.server and boto3) follows `prereq`'s rule: under
//! `CI=true` a missing piece panics, otherwise the test prints SKIPPED and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::prereq::in_ci;
use super::registry::free_port;

/// The setup requests `start()` sends before authentication starts (see `HELPER`'s `setup`).
const SETUP_REQUESTS: u32 = 6;

/// Runs boto3 for the tests. `setup` sends exactly SETUP_REQUESTS counted requests, then proves that
/// a wrong secret is refused. Other commands read JSON lines on stdin and answer one JSON line each.
const HELPER: &str = r#"
import base64, json, sys
import boto3, botocore
from botocore.config import Config

endpoint, ak, sk = sys.argv[1], sys.argv[2], sys.argv[3]
token = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
ALLOW = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
TRUST = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]})

def client(service, ak=ak, sk=sk, token=token):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=ak, aws_secret_access_key=sk, aws_session_token=token,
                        config=Config(retries={"max_attempts": 1, "mode": "standard"},
                                      s3={"addressing_style": "path"}))

def code(err):
    return err.response.get("Error", {}).get("Code", "")

if ak == "setup":
    iam = client("iam")
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=ALLOW)
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    iam.create_role(RoleName="reader", AssumeRolePolicyDocument=TRUST)
    iam.put_role_policy(RoleName="reader", PolicyName="all", PolicyDocument=ALLOW)
    session = client("sts").assume_role(RoleArn="arn:aws:iam::123456789012:role/reader",
                                        RoleSessionName="tests", DurationSeconds=3600)["Credentials"]
    out = {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"],
           "session_access_key": session["AccessKeyId"], "session_secret_key": session["SecretAccessKey"],
           "session_token": session["SessionToken"]}
    if sys.argv[4] == "check":
        try:
            client("s3", key["AccessKeyId"], "wrong-secret", None).list_buckets()
            out["wrong_secret"] = "accepted"
        except botocore.exceptions.ClientError as e:
            out["wrong_secret"] = code(e)
    print(json.dumps(out), flush=True)
    sys.exit(0)

s3 = client("s3")
iam = client("iam")
for line in sys.stdin:
    op = json.loads(line)
    kind = op["op"]
    try:
        if kind == "mkbucket":
            s3.create_bucket(Bucket=op["bucket"])
        elif kind == "versioning":
            s3.put_bucket_versioning(Bucket=op["bucket"], VersioningConfiguration={"Status": "Enabled"})
        elif kind == "put_file":
            with open(op["path"], "rb") as f:
                s3.put_object(Bucket=op["bucket"], Key=op["key"], Body=f.read())
        elif kind == "put_bytes":
            s3.put_object(Bucket=op["bucket"], Key=op["key"], Body=base64.b64decode(op["data"]))
        elif kind == "put_generated":
            # Many small objects: each one's body is its key, repeated to `size` bytes.
            for k in op["keys"]:
                body = (k.encode() * (op["size"] // max(1, len(k.encode())) + 1))[:op["size"]]
                s3.put_object(Bucket=op["bucket"], Key=k, Body=body)
        elif kind == "delete":
            s3.delete_object(Bucket=op["bucket"], Key=op["key"])
        elif kind == "new_key":
            key = iam.create_access_key(UserName="tester")["AccessKey"]
            print(json.dumps({"ok": True, "access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}), flush=True)
            continue
        elif kind == "delete_key":
            iam.delete_access_key(UserName="tester", AccessKeyId=op["access_key"])
        else:
            raise ValueError("unknown op " + kind)
        print(json.dumps({"ok": True}), flush=True)
    except botocore.exceptions.ClientError as e:
        print(json.dumps({"ok": False, "code": code(e), "error": str(e)}), flush=True)
"#;

/// Keys of the IAM user and of an assumed-role session (checked server only).
#[derive(Debug, Clone, Default)]
pub struct Keys {
    pub access_key: String,
    pub secret_key: String,
    pub session_access_key: String,
    pub session_secret_key: String,
    pub session_token: String,
}

pub struct Moto {
    child: Child,
    stopped: bool,
    port: u16,
    dir: tempfile::TempDir,
    helper: PathBuf,
    /// Empty for a server that checks nothing (any key works).
    pub keys: Keys,
    pub auth: bool,
}

/// True when python3 with moto's server and boto3 is there. Otherwise prints why and returns false, or
/// panics under `CI=true` (as `prereq::require` does).
pub fn require() -> bool {
    match probe() {
        Ok(()) => true,
        Err(reason) if in_ci() => panic!("a prerequisite is missing and CI=true forbids skipping: {reason}"),
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            false
        }
    }
}

fn probe() -> Result<(), String> {
    static PROBED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBED
        .get_or_init(|| {
            let out = Command::new("python3")
                .args(["-c", "import moto.server, boto3, flask"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("python3 not found ({e}); moto needs it"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err("python3 cannot import moto.server/boto3 (pip install 'moto[server]')".into())
            }
        })
        .clone()
}

impl Moto {
    /// A server that checks every request's signature after the setup (see module docs).
    pub fn start() -> Moto {
        let mut moto = Self::spawn(true);
        let out = moto.run_helper(&["setup", "setup", "check"], "");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("moto setup answered {out:?}: {e}"));
        let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("moto setup gave no {k}: {out}")).to_string();
        assert_eq!(
            field("wrong_secret"),
            "SignatureDoesNotMatch",
            "moto did not check signatures after {SETUP_REQUESTS} setup requests"
        );
        moto.keys = Keys {
            access_key: field("access_key"),
            secret_key: field("secret_key"),
            session_access_key: field("session_access_key"),
            session_secret_key: field("session_secret_key"),
            session_token: field("session_token"),
        };
        moto
    }

    /// A server that checks nothing (for SigV2, which moto cannot check).
    pub fn start_without_auth() -> Moto {
        let mut moto = Self::spawn(false);
        moto.keys = Keys {
            access_key: "AKIAANYTHING".into(),
            secret_key: "any-secret".into(),
            ..Default::default()
        };
        moto
    }

    fn spawn(auth: bool) -> Moto {
        let mut dir = tempfile::Builder::new().prefix("erofs-moto-").tempdir().expect("moto tempdir");
        let helper = dir.path().join("helper.py");
        std::fs::write(&helper, HELPER).expect("write moto helper");
        let log = dir.path().join("moto.log");
        let mut last = String::new();
        // The free port may be taken between the probe and moto's bind: retry on a new one.
        for _ in 0..5 {
            let port = free_port();
            let log_file = std::fs::File::create(&log).expect("moto log");
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log"))
                .stderr(log_file);
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("AWS_") {
                    cmd.env_remove(k);
                }
            }
            if auth {
                cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_REQUESTS.to_string());
            }
            // SAFETY: prctl is async-signal-safe; the closure touches no allocator or lock.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start moto: {e}"));
            let mut moto = Moto { child, stopped: false, port, dir, helper: helper.clone(), keys: Keys::default(), auth };
            match moto.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return moto,
                Err(e) => {
                    last = format!("{e}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                    moto.stop();
                    dir = moto.into_dir();
                }
            }
        }
        panic!("moto did not come up: {last}");
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        // Moves the tempdir out; Drop then only stops the (already stopped) child.
        let placeholder = tempfile::Builder::new().prefix("erofs-moto-gone-").tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("moto exited at start ({status})"));
            }
            // The moto API is never counted as an action and needs no signature.
            match super::http::get(&format!("{}/moto-api/data.json", self.endpoint())) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => return Err(format!("moto-api answered {}", r.status)),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("moto not answering after {timeout:?}: {e}")),
            }
        }
    }

    /// Kills our child by its pid, once (a reaped pid may belong to someone else by now).
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        super::cmd::signal(self.child.id() as i32, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's log (werkzeug's request lines: method, path and query, status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Request lines `"METHOD PATH HTTP/1.1" STATUS` logged so far that contain `needle`.
    pub fn requests_matching(&self, needle: &str) -> Vec<String> {
        self.log().lines().filter(|l| l.contains("HTTP/1.1\"") && l.contains(needle)).map(str::to_string).collect()
    }

    fn run_helper(&self, args: &[&str], stdin: &str) -> String {
        let mut cmd = Command::new("python3");
        cmd.arg(&self.helper).arg(self.endpoint()).args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run the moto helper: {e}"));
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("write helper input");
        }
        let out = child.wait_with_output().expect("moto helper output");
        assert!(
            out.status.success(),
            "moto helper {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs helper commands as the IAM user; returns one answer per command. Panics on a refused one.
    pub fn s3(&self, commands: &[serde_json::Value]) -> Vec<serde_json::Value> {
        let input: String = commands.iter().map(|c| format!("{c}\n")).collect();
        let out = self.run_helper(&[&self.keys.access_key, &self.keys.secret_key], &input);
        let answers: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("helper answered {l:?}: {e}"))).collect();
        assert_eq!(answers.len(), commands.len(), "helper answers: {out}");
        for (c, a) in commands.iter().zip(&answers) {
            assert_eq!(a["ok"], serde_json::Value::Bool(true), "{c} failed: {a}");
        }
        answers
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.s3(&[serde_json::json!({"op": "mkbucket", "bucket": bucket})]);
    }

    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        self.s3(&[serde_json::json!({"op": "put_file", "bucket": bucket, "key": key, "path": path})]);
    }

    /// Many objects whose body is their key repeated to `size` bytes (one boto3 process).
    pub fn put_generated(&self, bucket: &str, keys: &[String], size: usize) {
        self.s3(&[serde_json::json!({"op": "put_generated", "bucket": bucket, "keys": keys, "size": size})]);
    }

    /// A second access key for the IAM user: (access key, secret).
    pub fn new_access_key(&self) -> (String, String) {
        let a = self.s3(&[serde_json::json!({"op": "new_key"})]);
        (a[0]["access_key"].as_str().expect("access key").to_string(), a[0]["secret_key"].as_str().expect("secret").to_string())
    }

    pub fn delete_access_key(&self, access_key: &str) {
        self.s3(&[serde_json::json!({"op": "delete_key", "access_key": access_key})]);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes every `AWS_*` variable from `cmd` and points the shared files at `dir` (which need not
/// exist), so the host's own AWS setup never leaks into a test.
pub fn isolate_aws(cmd: &mut Command, dir: &Path) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_SHARED_CREDENTIALS_FILE", dir.join("credentials"))
        .env("AWS_CONFIG_FILE", dir.join("config"));
}

/// The `s3fs` password file `AK:SK` at `path` with `mode`.
pub fn write_passwd_file(path: &Path, line: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{line}\n")).expect("write passwd file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod passwd file");
}
