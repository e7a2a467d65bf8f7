//! Multi-range requests of the HTTP and registry sources: one request for many ranges where the server
//! answers `206 multipart/byteranges`, and the fallback to single ranges — remembered — on each way a server
//! declines or gets it wrong (200 with the whole blob, 416, 400, a wrong boundary, overlapping parts).
//! Requests are counted at the server. The registry tests use Debian's docker-registry (Go's ServeContent).

mod common;

use std::ops::Range;
use std::sync::Arc;

use common::http_server::{self, HttpServer};
use common::multipart_server::{self, MultiMode};
use common::wait::wait_until;
use erofs_fanotify::http::ClientConfig;
use erofs_fanotify::remote::{HttpSource, MultiRange, RangeSource};

fn blob(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// Ten scattered ranges of a 1 MiB blob.
fn asked() -> Vec<Range<u64>> {
    (0..10u64).map(|i| i * 100_000 + 7..i * 100_000 + 7 + 1000 + i * 10).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn open(rt: &tokio::runtime::Runtime, url: &str) -> HttpSource {
    rt.block_on(HttpSource::open(url, &ClientConfig::default())).map(|(s, _)| s).expect("open")
}

/// The server logs a request after its answer is sent: waits until `n` are logged.
fn logged(server: &HttpServer, n: usize) -> usize {
    wait_until(std::time::Duration::from_secs(10), &format!("{n} requests logged"), || server.requests().len() >= n);
    server.requests().len()
}

/// Multi-range requests logged (waits for the first one: the log follows the answer).
fn multi_requests(server: &HttpServer) -> usize {
    let count = || server.requests().iter().filter(|r| r.range.as_deref().is_some_and(|h| h.contains(','))).count();
    wait_until(std::time::Duration::from_secs(10), "a multi-range request logged", || count() >= 1);
    count()
}

fn check_bytes(data: &[u8], asked: &[Range<u64>], got: &[bytes::Bytes]) {
    assert_eq!(got.len(), asked.len());
    for (r, b) in asked.iter().zip(got) {
        assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "bytes of {r:?}");
    }
}

#[test]
fn a_multipart_server_answers_many_ranges_in_one_request() {
    let data = blob(1 << 20);
    for mode in [MultiMode::Multipart, MultiMode::OneSpan] {
        let server = multipart_server::serve(data.clone(), mode);
        let rt = rt();
        let src = open(&rt, &format!("{}/blob", server.base_url()));
        assert_eq!(src.multi_range(), MultiRange::Unknown);
        assert_eq!(logged(&server, 1), 1, "the probe");
        let parts = rt.block_on(src.fetch_many(asked())).expect("fetch_many");
        check_bytes(&data, &asked(), &parts.bytes);
        assert_eq!(parts.requests, 1, "{mode:?}");
        assert_eq!(logged(&server, 2), 2, "{mode:?}: one request at the server");
        assert_eq!(src.multi_range(), MultiRange::Supported, "{mode:?}");
        // Still one request the second time.
        let parts = rt.block_on(src.fetch_many(asked()[2..6].to_vec())).unwrap();
        check_bytes(&data, &asked()[2..6], &parts.bytes);
        assert_eq!(logged(&server, 3), 3);
    }
}

#[test]
fn every_kind_of_refusal_falls_back_to_single_ranges_and_is_remembered() {
    let data = blob(1 << 20);
    for mode in [MultiMode::Whole, MultiMode::NotSatisfiable, MultiMode::BadRequest, MultiMode::WrongBoundary, MultiMode::Overlapping] {
        let server = multipart_server::serve(data.clone(), mode);
        let rt = rt();
        let src = open(&rt, &format!("{}/blob", server.base_url()));
        let parts = rt.block_on(src.fetch_many(asked())).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        check_bytes(&data, &asked(), &parts.bytes);
        assert_eq!(src.multi_range(), MultiRange::Unsupported, "{mode:?}");
        assert_eq!(multi_requests(&server), 1, "{mode:?}: the probe");
        assert!(parts.requests >= 2, "{mode:?}: the probe and single ranges");
        // Remembered: the next call sends no multi-range request.
        let parts = rt.block_on(src.fetch_many(asked())).unwrap();
        check_bytes(&data, &asked(), &parts.bytes);
        assert_eq!(multi_requests(&server), 1, "{mode:?}: no second probe");
        let singles = server.requests().iter().filter(|r| r.range.as_deref().is_some_and(|h| !h.contains(','))).count();
        assert!(singles >= 2, "{mode:?}: {singles} single-range requests");
    }
}

#[test]
fn the_fallback_merges_close_ranges_into_few_requests() {
    // Ranges 7 bytes apart: the fallback fetches them in one single-range request, not ten.
    let data = blob(1 << 20);
    let server = multipart_server::serve(data.clone(), MultiMode::Whole);
    let rt = rt();
    let src = open(&rt, &format!("{}/blob", server.base_url()));
    let close: Vec<Range<u64>> = (0..10u64).map(|i| 4096 + i * 107..4096 + i * 107 + 100).collect();
    let parts = rt.block_on(src.fetch_many(close.clone())).unwrap();
    check_bytes(&data, &close, &parts.bytes);
    assert_eq!(parts.requests, 2, "the probe and one merged range");
}

#[test]
fn a_200_answer_to_a_multi_range_request_is_not_read() {
    // 64 MiB answered with 200: the source drops the connection instead of reading the blob.
    let data = Arc::new(blob(64 << 20));
    let d = Arc::clone(&data);
    let server = HttpServer::start("whole", move |req| multipart_server::answer(req, &d, MultiMode::Whole));
    let rt = rt();
    let src = open(&rt, &format!("{}/blob", server.base_url()));
    let asked = vec![0..10, 32 << 20..(32 << 20) + 10];
    let parts = rt.block_on(src.fetch_many(asked.clone())).unwrap();
    check_bytes(&data, &asked, &parts.bytes);
    wait_until(std::time::Duration::from_secs(10), "the server logged the 200", || {
        server.requests().iter().any(|r| r.status == 200)
    });
    let sent = server.requests().iter().find(|r| r.status == 200).map(|r| r.bytes_sent).unwrap();
    assert!(sent < data.len() as u64, "the whole blob ({sent} bytes) was sent and read");
}

#[test]
fn bad_ranges_are_refused_before_any_request() {
    let data = blob(1 << 16);
    let server = HttpServer::start("plain", move |req| http_server::serve_bytes(req, &data, "application/octet-stream"));
    let rt = rt();
    let src = open(&rt, &format!("{}/blob", server.base_url()));
    let before = logged(&server, 1);
    for bad in [vec![10..20, 15..30], vec![20..30, 0..10], std::iter::once(5..5).collect(), std::iter::once(0..(1 << 17)).collect()] {
        assert!(rt.block_on(src.fetch_many(bad.clone())).is_err(), "{bad:?}");
    }
    assert_eq!(server.requests().len(), before);
}

#[test]
#[ignore = "needs docker-registry"]
fn the_registry_answers_multi_range_requests_in_one_request() {
    if !common::require(&[common::Need::Registry]) {
        return;
    }
    let data = blob(3 << 20);
    let reg = common::registry::Registry::start_with(&common::registry::RegistryConfig { access_log: true, ..Default::default() });
    let digest = reg.push_blob("multi/blob", &data);
    let url = reg.blob_url("multi/blob", &digest);
    let rt = rt();
    let src = open(&rt, &url);
    let before = reg.access_log().len();
    let asked: Vec<Range<u64>> = (0..50u64).map(|i| i * 60_000 + 11..i * 60_000 + 11 + 3000).collect();
    let parts = rt.block_on(src.fetch_many(asked.clone())).expect("fetch_many");
    check_bytes(&data, &asked, &parts.bytes);
    assert_eq!(parts.requests, 1);
    assert_eq!(src.multi_range(), MultiRange::Supported);
    wait_until(std::time::Duration::from_secs(5), "the registry logged the request", || reg.access_log().len() > before);
    assert_eq!(reg.access_log().len() - before, 1, "{:?}", reg.access_log());
}
