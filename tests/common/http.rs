//! A tiny blocking HTTP/1.1 client for loopback use by the harness (pushing to the registry, self-testing
//! the fault server). One connection per request (`Connection: close`); plain http only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Streamed from the file, Content-Length from its size.
    File(&'a Path),
}

/// Splits `http://host:port/path?query` into (`host:port`, `/path?query`).
pub fn split_url(url: &str) -> io::Result<(String, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an http:// URL: {url}"),
        )
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

pub fn get(url: &str) -> io::Result<Response> {
    request("GET", url, &[], Body::Empty)
}

pub fn head(url: &str) -> io::Result<Response> {
    request("HEAD", url, &[], Body::Empty)
}

/// GET with `Range: bytes=start-end` (end inclusive).
pub fn get_range(url: &str, start: u64, end_inclusive: u64) -> io::Result<Response> {
    let range = format!("bytes={start}-{end_inclusive}");
    request("GET", url, &[("Range", &range)], Body::Empty)
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> io::Result<Response> {
    request_with_timeout(method, url, headers, body, Duration::from_secs(60))
}

pub fn request_with_timeout(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Body,
    timeout: Duration,
) -> io::Result<Response> {
    let (host, path) = split_url(url)?;
    let addr = host.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot resolve {host}"),
        )
    })?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let (length, mut file) = match &body {
        Body::Empty => (0, None),
        Body::Bytes(b) => (b.len() as u64, None),
        Body::File(p) => {
            let f = std::fs::File::open(p)?;
            (f.metadata()?.len(), Some(f))
        }
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: erofs-fanotify-tests\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !matches!(body, Body::Empty) || method == "PUT" || method == "POST" {
        head.push_str(&format!("Content-Length: {length}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    match (&body, file.as_mut()) {
        (Body::Bytes(b), _) => stream.write_all(b)?,
        (Body::File(_), Some(f)) => {
            io::copy(f, &mut stream)?;
        }
        _ => {}
    }
    stream.flush()?;
    read_response(BufReader::new(stream), method == "HEAD")
}

fn read_response(mut reader: BufReader<TcpStream>, is_head: bool) -> io::Result<Response> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in response headers",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    // 416 from docker-registry carries a bogus Content-Length: never read that body.
    if is_head || status == 204 || status == 304 || status == 416 || (100..200).contains(&status) {
        return Ok(response);
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        response.body = read_chunked(&mut reader)?;
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad Content-Length {len:?}"),
            )
        })?;
        let mut body = vec![0; len];
        let mut got = 0;
        while got < len {
            let n = reader.read(&mut body[got..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended after {got} of {len} bytes"),
                ));
            }
            got += n;
        }
        response.body = body;
    } else {
        reader.read_to_end(&mut response.body)?;
    }
    Ok(response)
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(
            |_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            },
        )?;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?;
    }
}
