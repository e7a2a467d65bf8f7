//! A private instance of Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.
//!
//! `Registry::start()` gives a test its own registry (storage in a tempdir, stopped by pid on drop).
//! `shared()` is one registry per test binary, started from a keeper thread that lives as long as the
//! process: the registry gets PR_SET_PDEATHSIG=SIGKILL, which fires when the *thread* that spawned it ends,
//! so the keeper thread makes it die with the test binary and not with the first test.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::http::{self, Body};
use super::prereq::REGISTRY_BIN;

pub struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    /// Some for per-test registries: the tempdir holding storage, config and log, removed on drop.
    _tempdir: Option<tempfile::TempDir>,
    log: PathBuf,
    /// `Authorization` header value sent with pushes (a registry started with an `auth:` section).
    push_auth: Mutex<Option<String>>,
}

/// What `Registry::start_with` adds to the default configuration.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Top-level YAML sections appended verbatim to the config (e.g. `auth:` or `proxy:`), two-space indents.
    pub extra_yaml: String,
    /// Log every request (Apache combined format: method, path, status) to the registry log, for tests that
    /// count what reached this registry (`access_log()`).
    pub access_log: bool,
}

/// A blob in a registry.
#[derive(Debug, Clone)]
pub struct Blob {
    pub url: String,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
}

impl Blob {
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

impl Registry {
    /// Starts a registry owned by the calling test; it stops when dropped.
    pub fn start() -> Registry {
        Self::start_with(&RegistryConfig::default())
    }

    /// Starts a registry owned by the calling test with extra configuration (auth, pull-through proxy, ...).
    /// It must still answer `GET /v2/` (200 or 401) to count as up.
    pub fn start_with(config: &RegistryConfig) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("erofs-registry-")
            .tempdir()
            .expect("registry tempdir");
        let root = dir.path().to_path_buf();
        let mut registry = Self::start_configured(&root, config);
        registry._tempdir = Some(dir);
        registry
    }

    fn start_in(root: &Path) -> Registry {
        Self::start_configured(root, &RegistryConfig::default())
    }

    fn start_configured(root: &Path, extra: &RegistryConfig) -> Registry {
        let storage = root.join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage dir");
        let log = root.join("registry.log");
        let mut last_error = String::new();
        // The free port is found by binding :0 and releasing it; another process may grab it in between,
        // so a registry that dies at start is retried on a new port.
        for _ in 0..5 {
            let port = free_port();
            let config = root.join("config.yml");
            std::fs::write(&config, config_yaml(&storage, port, extra))
                .expect("write registry config");
            let log_file = std::fs::File::create(&log).expect("registry log");
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("dup log fd"))
                .stderr(log_file);
            // SAFETY: prctl is async-signal-safe; the closure touches no allocator or lock.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {REGISTRY_BIN}: {e}"));
            let mut registry = Registry {
                child,
                port,
                storage: storage.clone(),
                _tempdir: None,
                log: log.clone(),
                push_auth: Mutex::new(None),
            };
            match registry.wait_ready(Duration::from_secs(20)) {
                Ok(()) => return registry,
                Err(e) => {
                    last_error = format!(
                        "{e}; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    registry.stop();
                }
            }
        }
        panic!("docker-registry did not come up: {last_error}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("registry exited at start ({status})"));
            }
            match http::get(&format!("{}/v2/", self.base_url())) {
                // 401: a registry with an auth section is up and challenging.
                Ok(r) if r.status == 200 || r.status == 401 => return Ok(()),
                Ok(r) => return Err(format!("/v2/ answered {}", r.status)),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(format!("/v2/ not answering after {timeout:?}: {e}")),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT` (for image references)
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Access log lines (`RegistryConfig::access_log`) as (method, path, status), in order.
    pub fn access_log(&self) -> Vec<(String, String, u16)> {
        self.log()
            .lines()
            .filter_map(|line| {
                // 127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 206 1234 "" "agent"
                let mut quoted = line.split('"');
                quoted.next()?;
                let request = quoted.next()?;
                let status = quoted.next()?.split_whitespace().next()?.parse().ok()?;
                let mut parts = request.split_whitespace();
                let method = parts.next()?.to_string();
                let path = parts.next()?.to_string();
                Some((method, path, status))
            })
            .collect()
    }

    /// Sets the `Authorization` header value sent with pushes (None: anonymous).
    pub fn set_push_auth(&self, header: Option<String>) {
        *self.push_auth.lock().unwrap_or_else(|e| e.into_inner()) = header;
    }

    fn auth_headers(&self) -> Vec<(&'static str, String)> {
        match &*self.push_auth.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(h) => vec![("Authorization", h.clone())],
            None => Vec::new(),
        }
    }

    /// The storage root (for tests that look at what a pull-through cache stored).
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.base_url())
    }

    /// Pushes `data` as a blob of `repo` (monolithic upload); returns `sha256:<hex>`.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        self.upload(repo, &digest, Body::Bytes(data));
        digest
    }

    /// Pushes a file as a blob, streaming it; returns `sha256:<hex>`.
    pub fn push_blob_file(&self, repo: &str, path: &Path) -> String {
        let digest = format!("sha256:{}", sha256_file(path));
        self.upload(repo, &digest, Body::File(path));
        digest
    }

    fn upload(&self, repo: &str, digest: &str, body: Body) {
        let url = self.blob_url(repo, digest);
        let auth = self.auth_headers();
        let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if http::request("HEAD", &url, &auth, Body::Empty)
            .map(|r| r.status == 200)
            .unwrap_or(false)
        {
            return;
        }
        let start = http::request(
            "POST",
            &format!("{}/v2/{repo}/blobs/uploads/", self.base_url()),
            &auth,
            Body::Empty,
        )
        .expect("POST blob upload");
        assert_eq!(
            start.status,
            202,
            "starting an upload: {start:?}\n{}",
            self.log()
        );
        let location = start
            .header("location")
            .expect("upload Location")
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base_url())
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{separator}digest={digest}");
        let mut headers = auth.clone();
        headers.push(("Content-Type", "application/octet-stream"));
        let done = http::request("PUT", &put_url, &headers, body).expect("PUT blob upload");
        assert_eq!(
            done.status,
            201,
            "finishing an upload of {digest}: {done:?}\n{}",
            self.log()
        );
    }

    /// Puts a manifest (or index) under `repo:tag`; returns its digest.
    pub fn push_manifest(&self, repo: &str, tag: &str, json: &[u8], media_type: &str) -> String {
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.base_url());
        let auth = self.auth_headers();
        let mut headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.push(("Content-Type", media_type));
        let response =
            http::request("PUT", &url, &headers, Body::Bytes(json)).expect("PUT manifest");
        assert_eq!(
            response.status,
            201,
            "pushing manifest {repo}:{tag}: {} {}\n{}",
            response.status,
            String::from_utf8_lossy(&response.body),
            self.log()
        );
        response
            .header("docker-content-digest")
            .map(str::to_string)
            .unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(json))))
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(storage: &Path, port: u16, extra: &RegistryConfig) -> String {
    format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
        !extra.access_log,
        storage.display(),
        extra.extra_yaml
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    free_port()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sha256_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut HashWriter(&mut hasher)).expect("hash file");
    hex::encode(hasher.finalize())
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The registry shared by all tests of this binary. Its storage lives under CARGO_TARGET_TMPDIR and is
/// removed at the next start (stale ones of dead test processes too).
pub fn shared() -> &'static Registry {
    static SHARED: OnceLock<Registry> = OnceLock::new();
    SHARED.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("registries");
        std::fs::create_dir_all(&base).expect("registries dir");
        remove_stale_registry_dirs(&base);
        let root = base.join(format!("pid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("shared registry dir");
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("registry-keeper".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(|| Registry::start_in(&root));
                let failed = result.is_err();
                let _ = tx.send(result);
                if failed {
                    return;
                }
                // Parked for the life of the process: the registry's parent-death signal is tied to this thread.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn registry keeper");
        match rx.recv().expect("registry keeper") {
            Ok(registry) => registry,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn remove_stale_registry_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("pid-")
            .and_then(|p| p.parse::<i32>().ok())
        {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Pushes `image` to the shared registry (once per process) as a blob of repo `test/images`.
pub fn shared_blob(image: &Path) -> Blob {
    static PUSHED: OnceLock<Mutex<HashMap<PathBuf, Blob>>> = OnceLock::new();
    let pushed = PUSHED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pushed = pushed.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(blob) = pushed.get(image) {
        return blob.clone();
    }
    let registry = shared();
    let digest = registry.push_blob_file("test/images", image);
    let size = std::fs::metadata(image).expect("image metadata").len();
    let blob = Blob {
        url: registry.blob_url("test/images", &digest),
        digest,
        size,
    };
    pushed.insert(image.to_path_buf(), blob.clone());
    blob
}

/// Pushes arbitrary bytes to the shared registry.
pub fn shared_blob_bytes(repo: &str, data: &[u8]) -> Blob {
    let registry = shared();
    let digest = registry.push_blob(repo, data);
    Blob {
        url: registry.blob_url(repo, &digest),
        digest,
        size: data.len() as u64,
    }
}
