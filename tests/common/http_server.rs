//! The one in-process HTTP/1.1 server of the tests, whose answers come from a closure: the token server, the
//! redirecting proxy in front of a registry, the "CDN" that serves redirected blobs, and the fault server
//! (`fault_server`) are all handlers of it.
//!
//! One thread per connection, keep-alive, request bodies read by Content-Length, responses always with
//! Content-Length (HEAD: the length of the body the GET would send, no body). A reply's body is bytes or a
//! range of a file (streamed). Body faults: a reply can send half its body and then reset the connection
//! (RST) or close it early (FIN); a handler that blocks holds its request (a stall). Every request is
//! logged (method, target, selected headers, status, body bytes written) for the tests to inspect.
//! Dropping the server closes every connection and joins the acceptor.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as the handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query as sent (`/v2/x/blobs/sha256:..?a=b`).
    pub target: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Query parameters, form-decoded, in order (repeated keys kept).
    pub fn query(&self) -> Vec<(String, String)> {
        let Some((_, query)) = self.target.split_once('?') else {
            return Vec::new();
        };
        let Ok(url) = reqwest::Url::parse(&format!("http://query.invalid/?{query}")) else {
            return Vec::new();
        };
        url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }
}

/// What goes wrong with a reply's body on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Send the headers (full Content-Length) and half the body, then reset the connection (RST).
    Reset,
    /// Send the headers (full Content-Length) and half the body, then close normally (FIN).
    Short,
}

/// The handler's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Instead of `body`: `len` bytes of a file from `offset`, streamed.
    pub file_body: Option<(Arc<std::fs::File>, u64, u64)>,
    pub fault: Option<BodyFault>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: Vec::new(), file_body: None, fault: None }
    }

    /// `len` bytes of `file` from `offset` as the body.
    pub fn file(mut self, file: Arc<std::fs::File>, offset: u64, len: u64) -> Reply {
        self.file_body = Some((file, offset, len));
        self
    }

    pub fn fault(mut self, fault: Option<BodyFault>) -> Reply {
        self.fault = fault;
        self
    }

    fn body_len(&self) -> u64 {
        self.file_body.as_ref().map_or(self.body.len() as u64, |(_, _, len)| *len)
    }

    pub fn json(status: u16, body: &serde_json::Value) -> Reply {
        Reply::new(status)
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(body).expect("json"))
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Reply {
        self.body = body;
        self
    }
}

/// What the server logged about one request.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub target: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes written to the client.
    pub bytes_sent: u64,
}

pub type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

struct Shared {
    handler: Box<Handler>,
    log: Mutex<Vec<Logged>>,
    shutdown: AtomicBool,
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
}

pub struct HttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `handler` on 127.0.0.1 at a free port.
    pub fn start(
        name: &str,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test http server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            log: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        });
        let acceptor_shared = shared.clone();
        let name = name.to_string();
        let acceptor = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || accept_loop(listener, acceptor_shared, &name))
            .expect("spawn test http server");
        HttpServer {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.next_connection.load(Ordering::SeqCst)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
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

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, name: &str) {
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
        let conn_shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("{name}-{id}"))
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

fn serve_connection(mut stream: TcpStream, shared: &Shared, id: u64) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    loop {
        let Some((request, close)) = read_request(&mut stream, &mut pending, shared) else {
            return;
        };
        // A panicking handler must not take the connection thread down silently: answer 500.
        let reply =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (shared.handler)(&request)))
                .unwrap_or_else(|_| Reply::new(500).body(b"handler panicked".to_vec()));
        let mut sent = 0u64;
        let written = write_reply(&mut stream, &request, &reply, &mut sent);
        shared.log.lock().unwrap_or_else(|e| e.into_inner()).push(Logged {
            method: request.method.clone(),
            target: request.target.clone(),
            authorization: request.header("authorization").map(str::to_string),
            range: request.header("range").map(str::to_string),
            status: reply.status,
            bytes_sent: sent,
        });
        match (&written, reply.fault) {
            (Ok(()), Some(BodyFault::Reset)) if request.method != "HEAD" => {
                let _ = stream.flush();
                // SO_LINGER {on, 0}, then close the last descriptors of the socket: an RST.
                let _ = nix::sys::socket::setsockopt(
                    &stream,
                    nix::sys::socket::sockopt::Linger,
                    &libc::linger { l_onoff: 1, l_linger: 0 },
                );
                shared.connections.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                return;
            }
            (Ok(()), Some(BodyFault::Short)) if request.method != "HEAD" => {
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            _ => {}
        }
        if written.is_err() || close || shared.shutdown.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Reads one request (head and Content-Length body). None on EOF, error or shutdown.
fn read_request(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    shared: &Shared,
) -> Option<(Request, bool)> {
    let mut buf = [0u8; 16384];
    let mut fill = |pending: &mut Vec<u8>| -> Option<()> {
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    return Some(());
                }
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
    };
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if pending.len() > 64 * 1024 {
            return None;
        }
        fill(pending)?;
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    pending.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let version = first.next().unwrap_or("HTTP/1.1");
    let mut close = version == "HTTP/1.0";
    let mut headers = Vec::new();
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        match name.as_str() {
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "content-length" => content_length = value.parse().unwrap_or(0),
            _ => {}
        }
        headers.push((name, value));
    }
    if content_length > 256 * 1024 * 1024 {
        return None;
    }
    while pending.len() < content_length {
        fill(pending)?;
    }
    let body: Vec<u8> = pending.drain(..content_length).collect();
    Some((
        Request {
            method,
            target,
            headers,
            body,
        },
        close,
    ))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Status",
    }
}

fn write_reply(stream: &mut TcpStream, request: &Request, reply: &Reply, sent: &mut u64) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    let mut has_length = false;
    for (k, v) in &reply.headers {
        if k.eq_ignore_ascii_case("content-length") {
            has_length = true;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body_len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if request.method == "HEAD" {
        return stream.flush();
    }
    let len = reply.body_len();
    let send = if reply.fault.is_some() { len / 2 } else { len };
    match &reply.file_body {
        None => {
            stream.write_all(&reply.body[..send as usize])?;
            *sent += send;
        }
        Some((file, offset, _)) => {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut at, end) = (*offset, offset + send);
            while at < end {
                let want = ((end - at) as usize).min(buf.len());
                let n = file.read_at(&mut buf[..want], at)?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
                }
                stream.write_all(&buf[..n])?;
                *sent += n as u64;
                at += n as u64;
            }
        }
    }
    stream.flush()
}

/// Forwards `request` to `upstream` (`http://127.0.0.1:PORT`) and turns the answer into a `Reply`
/// (hop-by-hop headers dropped; the body re-sent with its own Content-Length).
pub fn forward(upstream: &str, request: &Request) -> Reply {
    let url = format!("{upstream}{}", request.target);
    let keep = [
        "authorization",
        "accept",
        "range",
        "content-type",
        "user-agent",
    ];
    let headers: Vec<(&str, &str)> = request
        .headers
        .iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let body = if request.body.is_empty() {
        super::http::Body::Empty
    } else {
        super::http::Body::Bytes(&request.body)
    };
    match super::http::request(&request.method, &url, &headers, body) {
        Ok(response) => {
            let mut reply = Reply::new(response.status);
            for (k, v) in &response.headers {
                if ["transfer-encoding", "connection", "keep-alive"].contains(&k.as_str()) {
                    continue;
                }
                // HEAD and 416 answers carry no body here: keep the upstream's Content-Length for HEAD
                // (the size a client reads), drop it otherwise so ours matches what we send.
                if k == "content-length" && request.method != "HEAD" {
                    continue;
                }
                reply.headers.push((k.clone(), v.clone()));
            }
            reply.body = response.body;
            reply
        }
        Err(e) => Reply::new(502).body(format!("upstream {upstream}: {e}").into_bytes()),
    }
}

/// Serves `data` for a GET/HEAD with an optional single `Range` (200, 206 or 416), like a blob store.
pub fn serve_bytes(request: &Request, data: &[u8], content_type: &str) -> Reply {
    let size = data.len() as u64;
    let range = request
        .header("range")
        .and_then(|r| parse_range(r, size));
    match range {
        None => Reply::new(200)
            .header("Content-Type", content_type)
            .header("Accept-Ranges", "bytes")
            .body(data.to_vec()),
        Some(Ok((start, end))) => Reply::new(206)
            .header("Content-Type", content_type)
            .header("Accept-Ranges", "bytes")
            .header("Content-Range", format!("bytes {start}-{end}/{size}"))
            .body(data[start as usize..=end as usize].to_vec()),
        Some(Err(())) => Reply::new(416).header("Content-Range", format!("bytes */{size}")),
    }
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
    let end: u64 = if end.is_empty() { u64::MAX } else { end.parse().ok()? };
    if end < start {
        return None;
    }
    if start >= size {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(size - 1))))
}
