//! Multi-range answers for the test HTTP server (`http_server`): a blob served with single ranges as a blob
//! store does, and multi-range requests answered as the chosen [`MultiMode`] says — right (`206
//! multipart/byteranges` as Go's `http.ServeContent` frames it), or each way a server gets it wrong.

use std::ops::Range;
use std::sync::Arc;

use super::http_server::{parse_range, serve_bytes, HttpServer, Reply, Request};

/// How a multi-range request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiMode {
    /// `206 multipart/byteranges`, one part per range.
    Multipart,
    /// `206` with one `Content-Range` spanning all ranges (RFC 9110 lets a server coalesce).
    OneSpan,
    /// `200` with the whole blob (Go's answer when the ranges sum past the file; S3's always).
    Whole,
    /// `416 Range Not Satisfiable`.
    NotSatisfiable,
    /// `400 Bad Request`.
    BadRequest,
    /// A multipart body whose delimiters are not the announced boundary.
    WrongBoundary,
    /// A multipart body that sends the first range twice (overlapping parts).
    Overlapping,
}

/// The ranges of a `Range: bytes=a-b,c-d` header (inclusive ends made half-open); None if not multi-range.
pub fn parse_multi(header: &str, size: u64) -> Option<Vec<Range<u64>>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if !spec.contains(',') {
        return None;
    }
    spec.split(',')
        .map(|one| match parse_range(&format!("bytes={}", one.trim()), size) {
            Some(Ok((s, e))) => Some(s..e + 1),
            _ => None,
        })
        .collect()
}

const BOUNDARY: &str = "3d6b6a416f9b5";

/// Go's framing: `--B\r\nContent-Range..\r\nContent-Type..\r\n\r\n<data>\r\n` per part, then `--B--\r\n`.
pub fn multipart_body(data: &[u8], parts: &[Range<u64>], boundary: &str) -> Vec<u8> {
    let size = data.len();
    let mut out = Vec::new();
    for (i, r) in parts.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Range: bytes {}-{}/{size}\r\nContent-Type: application/octet-stream\r\n\r\n",
                r.start,
                r.end - 1
            )
            .as_bytes(),
        );
        out.extend_from_slice(&data[r.start as usize..r.end as usize]);
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Answers `request` for `data`: single ranges as a blob store, multi-range ones as `mode` says.
pub fn answer(request: &Request, data: &[u8], mode: MultiMode) -> Reply {
    let size = data.len() as u64;
    let Some(ranges) = request.header("range").and_then(|h| parse_multi(h, size)) else {
        return serve_bytes(request, data, "application/octet-stream");
    };
    let ct = format!("multipart/byteranges; boundary={BOUNDARY}");
    match mode {
        MultiMode::Multipart => Reply::new(206).header("Content-Type", ct).body(multipart_body(data, &ranges, BOUNDARY)),
        MultiMode::OneSpan => {
            let (s, e) = (ranges[0].start, ranges[ranges.len() - 1].end);
            Reply::new(206)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("bytes {s}-{}/{size}", e - 1))
                .body(data[s as usize..e as usize].to_vec())
        }
        MultiMode::Whole => Reply::new(200).header("Content-Type", "application/octet-stream").body(data.to_vec()),
        MultiMode::NotSatisfiable => Reply::new(416).header("Content-Range", format!("bytes */{size}")),
        MultiMode::BadRequest => Reply::new(400),
        MultiMode::WrongBoundary => {
            Reply::new(206).header("Content-Type", ct).body(multipart_body(data, &ranges, "not-the-boundary"))
        }
        MultiMode::Overlapping => {
            let mut twice = vec![ranges[0].clone()];
            twice.extend(ranges.iter().cloned());
            Reply::new(206).header("Content-Type", ct).body(multipart_body(data, &twice, BOUNDARY))
        }
    }
}

/// A server for `data` answering multi-range requests as `mode` says.
pub fn serve(data: Vec<u8>, mode: MultiMode) -> HttpServer {
    let data = Arc::new(data);
    HttpServer::start("multipart", move |req| answer(req, &data, mode))
}
