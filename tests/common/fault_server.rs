//! A registry-like blob server with faults a test switches on at run time: one file at a blob path, served
//! by the tests' one HTTP server (`http_server`) through a handler.
//!
//! Served: `GET`/`HEAD` of the blob path (`/v2/faults/blobs/sha256:<hex>`): 200 with the whole file, or
//! 206 + Content-Range for `Range: bytes=a-b` / `bytes=a-` / `bytes=-n`; a start at or past EOF gives 416
//! with `Content-Range: bytes */SIZE`. `GET /v2/` answers 200 `{}`; anything else 404. Keep-alive works.
//!
//! Faults (they apply to requests for the blob only, in this order):
//! - `stall()`: every request is read and then held without an answer until `resume()` (then answered
//!   normally, if the client is still there);
//! - `fail_next(n)`: the next n requests get `500`;
//! - `reset_next(n)`: the next n GETs with a non-empty body send the headers and half the body, then reset
//!   the connection (RST);
//! - `short_body_next(n)`: the next n GETs with a non-empty body send the headers (full Content-Length) and
//!   half the body, then close normally (FIN);
//! - `set_delay(d)`: every blob request is answered `d` late (a slow but working server);
//! - `lie(true)`: every GET with a non-empty body is answered as asked (206, right Content-Range and
//!   length) with wrong bytes (one byte in every 4 KiB flipped), until `lie(false)`.
//!
//! `stats()` counts requests, bytes of body sent, the ranges asked for and each fault injected.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::http_server::{BodyFault, HttpServer, Reply, Request};

pub use super::http_server::parse_range;

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Every request received (any path, any method).
    pub requests: u64,
    pub gets: u64,
    pub heads: u64,
    /// Byte ranges asked for by blob GETs (inclusive end, as sent); a GET without Range is (0, size-1).
    pub ranges: Vec<(u64, u64)>,
    /// Body bytes written to clients.
    pub bytes_served: u64,
    pub failed_500: u64,
    pub resets: u64,
    pub short_bodies: u64,
    /// Bodies sent with wrong bytes.
    pub lies: u64,
    /// Requests that were held by a stall.
    pub stalled: u64,
    pub connections: u64,
}

#[derive(Default)]
struct Faults {
    stalled: bool,
    /// Requests held right now.
    held: u64,
    fail_next: u64,
    reset_next: u64,
    short_next: u64,
    delay: std::time::Duration,
    lying: bool,
}

struct State {
    file: Arc<std::fs::File>,
    size: u64,
    blob_path: String,
    digest: String,
    faults: Mutex<Faults>,
    faults_changed: Condvar,
    stats: Mutex<Stats>,
    shutdown: AtomicBool,
}

pub struct FaultServer {
    state: Arc<State>,
    // Dropped before stalled handlers are released (see Drop), so a held request is never answered.
    server: Option<HttpServer>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultServer {
    /// Serves `path` (its sha256 names the blob path) on 127.0.0.1 at a free port.
    pub fn serve(path: &Path) -> FaultServer {
        let digest = format!("sha256:{}", super::registry::sha256_file(path));
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let size = file.metadata().expect("metadata").len();
        let state = Arc::new(State {
            file: Arc::new(file),
            size,
            blob_path: format!("/v2/faults/blobs/{digest}"),
            digest,
            faults: Mutex::new(Faults::default()),
            faults_changed: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            shutdown: AtomicBool::new(false),
        });
        let handler_state = Arc::clone(&state);
        let server = HttpServer::start("fault-server", move |req| handler_state.answer(req));
        FaultServer { state, server: Some(server) }
    }

    fn server(&self) -> &HttpServer {
        self.server.as_ref().expect("server runs until drop")
    }

    /// The blob URL, shaped like a registry blob URL.
    pub fn url(&self) -> String {
        format!("{}{}", self.server().base_url(), self.state.blob_path)
    }

    pub fn base_url(&self) -> String {
        self.server().base_url()
    }

    pub fn digest(&self) -> &str {
        &self.state.digest
    }

    pub fn size(&self) -> u64 {
        self.state.size
    }

    pub fn fail_next(&self, n: u64) {
        lock(&self.state.faults).fail_next = n;
    }

    pub fn reset_next(&self, n: u64) {
        lock(&self.state.faults).reset_next = n;
    }

    pub fn short_body_next(&self, n: u64) {
        lock(&self.state.faults).short_next = n;
    }

    /// Answers every blob request `delay` late from now on (zero: on time).
    pub fn set_delay(&self, delay: std::time::Duration) {
        lock(&self.state.faults).delay = delay;
    }

    /// From now on every blob body is wrong (see the module doc), or right again.
    pub fn lie(&self, on: bool) {
        lock(&self.state.faults).lying = on;
    }

    /// Holds every request from now on until `resume()`.
    pub fn stall(&self) {
        lock(&self.state.faults).stalled = true;
    }

    pub fn resume(&self) {
        lock(&self.state.faults).stalled = false;
        self.state.faults_changed.notify_all();
    }

    /// Clears every pending fault and resumes.
    pub fn heal(&self) {
        {
            let mut faults = lock(&self.state.faults);
            faults.fail_next = 0;
            faults.reset_next = 0;
            faults.short_next = 0;
        }
        self.resume();
    }

    /// Requests being held by a stall right now.
    pub fn held_requests(&self) -> u64 {
        lock(&self.state.faults).held
    }

    /// Pending (not yet injected) counts of 500s, resets and short bodies.
    pub fn pending_faults(&self) -> (u64, u64, u64) {
        let f = lock(&self.state.faults);
        (f.fail_next, f.reset_next, f.short_next)
    }

    pub fn stats(&self) -> Stats {
        let mut stats = lock(&self.state.stats).clone();
        let blob = self.state.blob_path.as_str();
        stats.bytes_served = self
            .server()
            .requests()
            .iter()
            .filter(|r| r.target.split('?').next() == Some(blob))
            .map(|r| r.bytes_sent)
            .sum();
        stats.connections = self.server().connections_accepted();
        stats
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        // The server closes every connection first; only then are stalled handlers woken, so the
        // 503 they return meets a closed socket and a held client sees its connection end, never an answer.
        drop(self.server.take());
        let _faults = lock(&self.state.faults);
        self.state.shutdown.store(true, Ordering::SeqCst);
        self.state.faults_changed.notify_all();
    }
}

impl State {
    fn answer(&self, request: &Request) -> Reply {
        {
            let mut stats = lock(&self.stats);
            stats.requests += 1;
            match request.method.as_str() {
                "GET" => stats.gets += 1,
                "HEAD" => stats.heads += 1,
                _ => {}
            }
        }
        let path = request.path();
        if path == "/v2/" || path == "/v2" {
            return Reply::json(200, &serde_json::json!({}));
        }
        if path != self.blob_path {
            return Reply::new(404).body(b"{\"errors\":[{\"code\":\"BLOB_UNKNOWN\"}]}".to_vec());
        }
        if request.method != "GET" && request.method != "HEAD" {
            return Reply::new(405);
        }
        let is_get = request.method == "GET";
        // What to serve, decided before any fault so that faults know whether a body exists.
        let (status, start, len) = match request.header("range").and_then(|r| parse_range(r, self.size)) {
            Some(Ok((start, end))) => (206, start, end - start + 1),
            Some(Err(())) => return Reply::new(416).header("Content-Range", format!("bytes */{}", self.size)),
            None => (200, 0, self.size),
        };
        if is_get {
            lock(&self.stats).ranges.push((start, (start + len).saturating_sub(1)));
        }
        let delay = lock(&self.faults).delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let fault = {
            let mut faults = lock(&self.faults);
            if faults.stalled {
                faults.held += 1;
                lock(&self.stats).stalled += 1;
                while faults.stalled && !self.shutdown.load(Ordering::SeqCst) {
                    faults = self.faults_changed.wait(faults).unwrap_or_else(|e| e.into_inner());
                }
                faults.held -= 1;
                if self.shutdown.load(Ordering::SeqCst) {
                    return Reply::new(503);
                }
            }
            if faults.fail_next > 0 {
                faults.fail_next -= 1;
                drop(faults);
                lock(&self.stats).failed_500 += 1;
                return Reply::new(500).body(b"injected failure".to_vec());
            }
            if is_get && len > 0 && faults.reset_next > 0 {
                faults.reset_next -= 1;
                lock(&self.stats).resets += 1;
                Some(BodyFault::Reset)
            } else if is_get && len > 0 && faults.short_next > 0 {
                faults.short_next -= 1;
                lock(&self.stats).short_bodies += 1;
                Some(BodyFault::Short)
            } else {
                None
            }
        };
        let lying = is_get && len > 0 && fault.is_none() && lock(&self.faults).lying;
        if lying {
            use std::os::unix::fs::FileExt;
            let mut body = vec![0u8; len as usize];
            if self.file.read_exact_at(&mut body, start).is_err() {
                return Reply::new(500);
            }
            for b in body.iter_mut().step_by(4096) {
                *b ^= 0x5a;
            }
            lock(&self.stats).lies += 1;
            let mut reply = Reply::new(status)
                .header("Accept-Ranges", "bytes")
                .header("Content-Type", "application/octet-stream")
                .body(body);
            if status == 206 {
                reply = reply.header("Content-Range", format!("bytes {start}-{}/{}", start + len - 1, self.size));
            }
            return reply;
        }
        let mut reply = Reply::new(status)
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream")
            .header("Docker-Content-Digest", self.digest.clone())
            .header("ETag", format!("\"{}\"", self.digest))
            .file(Arc::clone(&self.file), start, len)
            .fault(fault);
        if status == 206 {
            reply = reply.header("Content-Range", format!("bytes {start}-{}/{}", start + len - 1, self.size));
        }
        reply
    }
}
