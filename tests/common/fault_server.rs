//! An in-process HTTP/1.1 server that serves one file at a registry-like blob path, with Range support and
//! faults that a test switches on at run time.
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
//!   half the body, then close normally (FIN).
//!
//! `stats()` counts requests, bytes of body sent, the ranges asked for and each fault injected.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
}

struct Shared {
    file: std::fs::File,
    size: u64,
    blob_path: String,
    digest: String,
    faults: Mutex<Faults>,
    faults_changed: Condvar,
    stats: Mutex<Stats>,
    shutdown: AtomicBool,
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
}

pub struct FaultServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

enum BodyFault {
    None,
    Reset,
    Short,
}

impl FaultServer {
    /// Serves `path` (its sha256 names the blob path) on 127.0.0.1 at a free port.
    pub fn serve(path: &Path) -> FaultServer {
        let digest = format!("sha256:{}", super::registry::sha256_file(path));
        let file =
            std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let size = file.metadata().expect("metadata").len();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            file,
            size,
            blob_path: format!("/v2/faults/blobs/{digest}"),
            digest,
            faults: Mutex::new(Faults::default()),
            faults_changed: Condvar::new(),
            stats: Mutex::new(Stats::default()),
            shutdown: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        });
        let acceptor_shared = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("fault-server".into())
            .spawn(move || accept_loop(listener, acceptor_shared))
            .expect("spawn fault server");
        FaultServer {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// The blob URL, shaped like a registry blob URL.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.shared.blob_path)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn digest(&self) -> &str {
        &self.shared.digest
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    pub fn fail_next(&self, n: u64) {
        self.faults().fail_next = n;
    }

    pub fn reset_next(&self, n: u64) {
        self.faults().reset_next = n;
    }

    pub fn short_body_next(&self, n: u64) {
        self.faults().short_next = n;
    }

    /// Holds every request from now on until `resume()`.
    pub fn stall(&self) {
        self.faults().stalled = true;
    }

    pub fn resume(&self) {
        self.faults().stalled = false;
        self.shared.faults_changed.notify_all();
    }

    /// Clears every pending fault and resumes.
    pub fn heal(&self) {
        {
            let mut faults = self.faults();
            faults.fail_next = 0;
            faults.reset_next = 0;
            faults.short_next = 0;
        }
        self.resume();
    }

    /// Requests being held by a stall right now.
    pub fn held_requests(&self) -> u64 {
        self.faults().held
    }

    /// Pending (not yet injected) counts of 500s, resets and short bodies.
    pub fn pending_faults(&self) -> (u64, u64, u64) {
        let f = self.faults();
        (f.fail_next, f.reset_next, f.short_next)
    }

    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.shared.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.faults_changed.notify_all();
        for (_, conn) in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
        // Wake the acceptor out of accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connections += 1;
        let conn_shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("fault-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &conn_shared, id);
                conn_shared
                    .connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
    }
}

struct Request {
    method: String,
    path: String,
    range: Option<String>,
    close: bool,
}

fn serve_connection(mut stream: TcpStream, shared: &Shared, id: u64) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut pending, shared) else {
            return;
        };
        {
            let mut stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.requests += 1;
            match request.method.as_str() {
                "GET" => stats.gets += 1,
                "HEAD" => stats.heads += 1,
                _ => {}
            }
        }
        let keep_alive = match respond(&mut stream, shared, &request, id) {
            Ok(Next::KeepAlive) => !request.close,
            Ok(Next::Close) | Err(_) => false,
            // Dropping the stream now sends the RST (SO_LINGER 0); a shutdown() would send a FIN first.
            Ok(Next::Abort) => return,
        };
        if !keep_alive || shared.shutdown.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Reads one request head (and discards any body). None on EOF, error or shutdown.
fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>, shared: &Shared) -> Option<Request> {
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(pending, b"\r\n\r\n") {
            break i;
        }
        if pending.len() > 64 * 1024 {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    pending.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let version = first.next().unwrap_or("HTTP/1.1");
    let mut range = None;
    let mut close = version == "HTTP/1.0";
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.to_string()),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "content-length" => content_length = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    // Discard a request body, if any.
    while pending.len() < content_length {
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    pending.drain(..content_length);
    Some(Request {
        method,
        path,
        range,
        close,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a single-range `Range` header against `size`: Some(Ok((start, end_inclusive))) for a satisfiable
/// range, Some(Err(())) for an unsatisfiable one, None when the header is to be ignored (serve 200).
pub fn parse_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    if start.is_empty() {
        let suffix: u64 = end.parse().ok()?;
        if suffix == 0 || size == 0 {
            return Some(Err(()));
        }
        return Some(Ok((size.saturating_sub(suffix), size - 1)));
    }
    let start: u64 = start.parse().ok()?;
    let end: u64 = if end.is_empty() {
        u64::MAX
    } else {
        end.parse().ok()?
    };
    if end < start {
        return None;
    }
    if start >= size {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(size - 1))))
}

/// What the connection does after a response.
enum Next {
    KeepAlive,
    Close,
    /// Drop the socket without shutdown (it was set up to reset).
    Abort,
}

/// Answers one request.
fn respond(
    stream: &mut TcpStream,
    shared: &Shared,
    request: &Request,
    id: u64,
) -> io::Result<Next> {
    if request.path == "/v2/" || request.path == "/v2" {
        write_simple(
            stream,
            200,
            "OK",
            b"{}",
            &[("Content-Type", "application/json")],
        )?;
        return Ok(Next::KeepAlive);
    }
    if request.path != shared.blob_path {
        write_simple(
            stream,
            404,
            "Not Found",
            b"{\"errors\":[{\"code\":\"BLOB_UNKNOWN\"}]}",
            &[],
        )?;
        return Ok(Next::KeepAlive);
    }
    if request.method != "GET" && request.method != "HEAD" {
        write_simple(stream, 405, "Method Not Allowed", b"", &[])?;
        return Ok(Next::KeepAlive);
    }
    let is_get = request.method == "GET";

    // What to serve, decided before any fault so that faults know whether a body exists.
    let (status, reason, start, len, content_range) = match request
        .range
        .as_deref()
        .and_then(|r| parse_range(r, shared.size))
    {
        Some(Ok((start, end))) => (
            206,
            "Partial Content",
            start,
            end - start + 1,
            Some(format!("bytes {start}-{end}/{}", shared.size)),
        ),
        Some(Err(())) => {
            write_simple(
                stream,
                416,
                "Range Not Satisfiable",
                b"",
                &[("Content-Range", &format!("bytes */{}", shared.size))],
            )?;
            return Ok(Next::KeepAlive);
        }
        None => (200, "OK", 0, shared.size, None),
    };
    if is_get {
        let mut stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.ranges.push((start, (start + len).saturating_sub(1)));
    }

    // Faults.
    let body_fault = {
        let mut faults = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        if faults.stalled {
            faults.held += 1;
            shared
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stalled += 1;
            while faults.stalled && !shared.shutdown.load(Ordering::SeqCst) {
                faults = shared
                    .faults_changed
                    .wait(faults)
                    .unwrap_or_else(|e| e.into_inner());
            }
            faults.held -= 1;
            if shared.shutdown.load(Ordering::SeqCst) {
                return Ok(Next::Close);
            }
        }
        if faults.fail_next > 0 {
            faults.fail_next -= 1;
            drop(faults);
            shared
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failed_500 += 1;
            write_simple(
                stream,
                500,
                "Internal Server Error",
                b"injected failure",
                &[],
            )?;
            return Ok(Next::KeepAlive);
        }
        if is_get && len > 0 && faults.reset_next > 0 {
            faults.reset_next -= 1;
            BodyFault::Reset
        } else if is_get && len > 0 && faults.short_next > 0 {
            faults.short_next -= 1;
            BodyFault::Short
        } else {
            BodyFault::None
        }
    };

    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {}\r\nETag: \"{}\"\r\n",
        shared.digest, shared.digest
    );
    if let Some(cr) = content_range {
        head.push_str(&format!("Content-Range: {cr}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !is_get {
        return Ok(Next::KeepAlive);
    }

    let send = match body_fault {
        BodyFault::None => len,
        BodyFault::Reset | BodyFault::Short => len / 2,
    };
    let result = send_file_range(stream, shared, start, send);
    match body_fault {
        BodyFault::None => {
            result?;
            Ok(Next::KeepAlive)
        }
        BodyFault::Reset => {
            shared
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resets += 1;
            let _ = stream.flush();
            reset_connection(stream, shared, id);
            Ok(Next::Abort)
        }
        BodyFault::Short => {
            shared
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .short_bodies += 1;
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Write);
            Ok(Next::Close)
        }
    }
}

fn send_file_range(
    stream: &mut TcpStream,
    shared: &Shared,
    start: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = start;
    let end = start + len;
    while offset < end {
        let want = ((end - offset) as usize).min(buf.len());
        let n = shared.file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        stream.write_all(&buf[..n])?;
        shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes_served += n as u64;
        offset += n as u64;
    }
    Ok(())
}

/// Closes the connection with an RST: SO_LINGER {on, 0} and the last descriptor closed.
fn reset_connection(stream: &mut TcpStream, shared: &Shared, id: u64) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // Our registered clone is another descriptor of the same socket: drop it, or the close below is no close.
    shared
        .connections
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    // The caller drops `stream` when serve_connection returns, which sends the RST.
}

fn write_simple(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    Ok(())
}
