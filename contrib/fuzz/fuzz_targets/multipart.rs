//! `http::multipart::parse_partial_response` over an untrusted body.
//!
//! Input: `CONTENT-TYPE\nSTART-END,START-END,.../TOTAL\nBODY` (half-open ranges).
#![no_main]
use std::ops::Range;

use erofs_fanotify::http::multipart::{parse_byteranges, parse_partial_response, range_header};
use libfuzzer_sys::fuzz_target;

fn asked(line: &str) -> Option<(Vec<Range<u64>>, u64)> {
    let (list, total) = line.split_once('/')?;
    let total = total.trim().parse().ok()?;
    let mut v = Vec::new();
    for r in list.split(',').take(64) {
        let (a, b) = r.split_once('-')?;
        v.push(a.trim().parse().ok()?..b.trim().parse().ok()?);
    }
    Some((v, total))
}

fuzz_target!(|data: &[u8]| {
    let mut it = data.splitn(3, |&c| c == b'\n');
    let (Some(ct), Some(ranges), Some(body)) = (it.next(), it.next(), it.next()) else {
        return;
    };
    let (Ok(ct), Ok(ranges)) = (std::str::from_utf8(ct), std::str::from_utf8(ranges)) else {
        return;
    };
    let Some((asked, total)) = asked(ranges) else {
        return;
    };
    let _ = range_header(&asked);
    if let Ok(parts) = parse_byteranges(ct, body, &asked, total) {
        assert_eq!(parts.len(), asked.len());
        for (p, r) in parts.iter().zip(&asked) {
            assert_eq!(&p.range, r);
            assert_eq!(p.data.len() as u64, r.end - r.start);
        }
    }
    let _ = parse_partial_response(Some(ct), Some(ct), body, &asked, total);
});
