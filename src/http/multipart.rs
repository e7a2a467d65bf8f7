//! Multi-range requests: the `Range` header and the `206 multipart/byteranges`
//! body (RFC 9110 §14.6, appendix of RFC 2046 for the delimiters).
//!
//! The body is untrusted. The parser knows what it asked for, so it does not
//! search for boundaries inside part data: each part's length comes from its
//! `Content-Range`, which must name exactly the asked ranges (one, or several
//! consecutive ones a server coalesced into one part, RFC 9110 allows that)
//! and the blob's total size. Every asked range must be covered exactly
//! once; anything else is a typed error, on which the caller falls back to
//! single-range requests.
//!
//! Accepted framing: an optional CRLF before the first delimiter (nginx sends
//! one), `--boundary` with optional trailing spaces/tabs, part headers up to
//! [`MAX_PART_HEADER_BYTES`], CRLF, the data, CRLF, the next delimiter, and
//! after the close delimiter `--boundary--` at most one CRLF. Bare LF line
//! ends are accepted in headers (RFC 9112 §2.2 tolerance).

use std::ops::Range;

/// Bytes of headers one part may carry (Go's `http.ServeContent` sends ~80).
pub const MAX_PART_HEADER_BYTES: usize = 4096;
/// Header lines one part may carry.
pub const MAX_PART_HEADERS: usize = 32;
/// RFC 2046: a boundary is 1 to 70 characters.
const MAX_BOUNDARY: usize = 70;

/// Which check a multipart body failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MultipartError {
    #[error("the asked ranges are not sorted, disjoint and non-empty")]
    BadRequestRanges,
    #[error("Content-Type {0:?} is not multipart/byteranges")]
    NotMultipart(String),
    #[error("multipart Content-Type has no usable boundary: {0}")]
    BadBoundary(String),
    #[error("no multipart delimiter with the announced boundary at body offset {offset}")]
    WrongBoundary { offset: usize },
    #[error(
        "bytes after the multipart close delimiter or before the first one (at offset {offset})"
    )]
    ExtraBytes { offset: usize },
    #[error("part {part}: headers longer than {MAX_PART_HEADER_BYTES} bytes or {MAX_PART_HEADERS} lines")]
    HeadersTooLong { part: usize },
    #[error("part {part}: malformed header line")]
    BadHeader { part: usize },
    #[error("part {part}: no Content-Range header")]
    MissingContentRange { part: usize },
    #[error("part {part}: malformed Content-Range {value:?}")]
    BadContentRange { part: usize, value: String },
    #[error("part {part}: Content-Range total {got} is not the blob size {want}")]
    TotalMismatch { part: usize, got: String, want: u64 },
    #[error(
        "part {part}: range {start}..{end} is not one asked range or a run of consecutive ones"
    )]
    UnaskedRange { part: usize, start: u64, end: u64 },
    #[error("parts overlap: asked range {start}..{end} arrived twice")]
    Overlap { start: u64, end: u64 },
    #[error("more parts than the {asked} ranges asked")]
    TooManyParts { asked: usize },
    #[error("part {part}: body ends inside its data or delimiter (truncated)")]
    Truncated { part: usize },
    #[error("asked range {start}..{end} is in no part")]
    Missing { start: u64, end: u64 },
    #[error("a single-range 206 without a usable Content-Range: {0}")]
    BadSingleRange(String),
}

/// One asked range and its bytes (borrowed from the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    pub range: Range<u64>,
    pub data: &'a [u8],
}

/// `bytes=a-b,c-d` for half-open ranges (`b = end - 1`); empty ranges are
/// left out.
pub fn range_header(ranges: &[Range<u64>]) -> String {
    let mut s = String::from("bytes=");
    let mut first = true;
    for r in ranges.iter().filter(|r| r.start < r.end) {
        if !first {
            s.push(',');
        }
        first = false;
        s.push_str(&format!("{}-{}", r.start, r.end - 1));
    }
    s
}

/// The boundary of a `multipart/byteranges` Content-Type (quoted or not).
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let mut params = content_type.split(';');
    let media = params.next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("multipart/byteranges") {
        return Err(MultipartError::NotMultipart(content_type.to_string()));
    }
    let rest =
        content_type[content_type.find(';').map_or(content_type.len(), |i| i + 1)..].trim_start();
    let mut found = None;
    let mut s = rest;
    while !s.is_empty() {
        let eq = s
            .find('=')
            .ok_or_else(|| MultipartError::BadBoundary("parameter without '='".into()))?;
        let name = s[..eq].trim();
        let mut value = String::new();
        let after = &s[eq + 1..];
        let consumed;
        if let Some(q) = after.strip_prefix('"') {
            // quoted-string with backslash escapes
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, e)) => value.push(e),
                        None => break,
                    },
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end
                .ok_or_else(|| MultipartError::BadBoundary("unterminated quoted string".into()))?;
            consumed = 1 + end + 1;
        } else {
            let end = after.find(';').unwrap_or(after.len());
            value = after[..end].trim().to_string();
            consumed = end;
        }
        if name.eq_ignore_ascii_case("boundary") {
            if found.is_some() {
                return Err(MultipartError::BadBoundary(
                    "two boundary parameters".into(),
                ));
            }
            found = Some(value);
        }
        let tail = after[consumed..].trim_start();
        s = match tail.strip_prefix(';') {
            Some(t) => t.trim_start(),
            None if tail.is_empty() => "",
            None => return Err(MultipartError::BadBoundary("junk after a parameter".into())),
        };
    }
    let b = found.ok_or_else(|| MultipartError::BadBoundary("no boundary parameter".into()))?;
    if b.is_empty()
        || b.len() > MAX_BOUNDARY
        || !b.bytes().all(|c| (0x20..0x7f).contains(&c))
        || b.ends_with(' ')
    {
        return Err(MultipartError::BadBoundary(format!(
            "boundary of {} bytes is not 1-70 printable characters",
            b.len()
        )));
    }
    Ok(b)
}

fn check_asked(asked: &[Range<u64>]) -> Result<(), MultipartError> {
    let ok =
        asked.iter().all(|r| r.start < r.end) && asked.windows(2).all(|w| w[0].end <= w[1].start);
    if ok && !asked.is_empty() {
        Ok(())
    } else {
        Err(MultipartError::BadRequestRanges)
    }
}

/// Parses `bytes a-b/total`; returns the half-open range.
fn parse_content_range(part: usize, value: &str, total: u64) -> Result<Range<u64>, MultipartError> {
    let bad = || MultipartError::BadContentRange {
        part,
        value: value.to_string(),
    };
    let v = value.trim();
    let unit_end = v.find([' ', '\t']).ok_or_else(bad)?;
    if !v[..unit_end].eq_ignore_ascii_case("bytes") {
        return Err(bad());
    }
    let spec = v[unit_end..].trim_start();
    let (range, tot) = spec.split_once('/').ok_or_else(bad)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return Err(bad());
    }
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if !digits(tot) || tot.parse::<u64>().ok() != Some(total) {
        return Err(MultipartError::TotalMismatch {
            part,
            got: tot.to_string(),
            want: total,
        });
    }
    if a > b || b >= total {
        return Err(bad());
    }
    Ok(a..b + 1)
}

/// Finds the run of consecutive asked ranges `i..=j` with
/// `asked[i].start == r.start` and `asked[j].end == r.end`.
fn match_asked(asked: &[Range<u64>], r: &Range<u64>) -> Option<Range<usize>> {
    let i = asked.binary_search_by_key(&r.start, |a| a.start).ok()?;
    let j = asked.binary_search_by_key(&r.end, |a| a.end).ok()?;
    (i <= j).then_some(i..j + 1)
}

/// Slices one part's data into its asked ranges.
fn slice_into<'a>(
    asked: &[Range<u64>],
    run: Range<usize>,
    part_start: u64,
    data: &'a [u8],
    out: &mut [Option<&'a [u8]>],
) -> Result<(), MultipartError> {
    for k in run {
        let r = &asked[k];
        if out[k].is_some() {
            return Err(MultipartError::Overlap {
                start: r.start,
                end: r.end,
            });
        }
        // r lies inside [part_start, part_start + data.len()) by construction.
        let a = (r.start - part_start) as usize;
        let b = (r.end - part_start) as usize;
        out[k] = Some(&data[a..b]);
    }
    Ok(())
}

fn collect<'a>(
    asked: &[Range<u64>],
    got: Vec<Option<&'a [u8]>>,
) -> Result<Vec<Part<'a>>, MultipartError> {
    asked
        .iter()
        .zip(got)
        .map(|(r, d)| match d {
            Some(data) => Ok(Part {
                range: r.clone(),
                data,
            }),
            None => Err(MultipartError::Missing {
                start: r.start,
                end: r.end,
            }),
        })
        .collect()
}

/// Parses a `206 multipart/byteranges` body. `asked` are the ranges of the
/// request (sorted, disjoint, non-empty), `total` the blob's size. Returns
/// one [`Part`] per asked range, in asked order.
pub fn parse_byteranges<'a>(
    content_type: &str,
    body: &'a [u8],
    asked: &[Range<u64>],
    total: u64,
) -> Result<Vec<Part<'a>>, MultipartError> {
    check_asked(asked)?;
    let b = boundary(content_type)?;
    let mut delim = Vec::with_capacity(b.len() + 2);
    delim.extend_from_slice(b"--");
    delim.extend_from_slice(b.as_bytes());

    let mut got: Vec<Option<&'a [u8]>> = vec![None; asked.len()];
    let mut pos = 0usize;
    if body.starts_with(b"\r\n") {
        pos = 2;
    }
    if !body[pos..].starts_with(&delim) {
        return Err(
            if body[pos..]
                .windows(delim.len())
                .any(|w| w == delim.as_slice())
            {
                MultipartError::ExtraBytes { offset: pos }
            } else {
                MultipartError::WrongBoundary { offset: pos }
            },
        );
    }
    pos += delim.len();
    let mut part = 0usize;
    loop {
        // After a delimiter: `--` closes, else optional LWSP and a line end.
        if body[pos..].starts_with(b"--") {
            pos += 2;
            let rest = &body[pos..];
            if rest.is_empty() || rest == b"\r\n" || rest == b"\n" {
                break;
            }
            return Err(MultipartError::ExtraBytes { offset: pos });
        }
        while matches!(body.get(pos), Some(b' ') | Some(b'\t')) {
            pos += 1;
        }
        pos = line_end(body, pos).ok_or(if pos >= body.len() {
            MultipartError::Truncated { part }
        } else {
            MultipartError::WrongBoundary { offset: pos }
        })?;
        if part >= asked.len() {
            return Err(MultipartError::TooManyParts { asked: asked.len() });
        }
        // Part headers.
        let header_start = pos;
        let mut content_range = None;
        let mut lines = 0usize;
        loop {
            let nl = match body[pos..].iter().position(|&c| c == b'\n') {
                Some(i) => pos + i,
                None if body.len() - header_start > MAX_PART_HEADER_BYTES => {
                    return Err(MultipartError::HeadersTooLong { part })
                }
                None => return Err(MultipartError::Truncated { part }),
            };
            if nl + 1 - header_start > MAX_PART_HEADER_BYTES {
                return Err(MultipartError::HeadersTooLong { part });
            }
            let line = &body[pos..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            pos = nl + 1;
            if line.is_empty() {
                break;
            }
            lines += 1;
            if lines > MAX_PART_HEADERS {
                return Err(MultipartError::HeadersTooLong { part });
            }
            let line = std::str::from_utf8(line).map_err(|_| MultipartError::BadHeader { part })?;
            if line.starts_with([' ', '\t']) {
                // Obsolete line folding: refused (RFC 9112 §5.2).
                return Err(MultipartError::BadHeader { part });
            }
            let (name, value) = line
                .split_once(':')
                .ok_or(MultipartError::BadHeader { part })?;
            if name.is_empty() || name.contains([' ', '\t']) {
                return Err(MultipartError::BadHeader { part });
            }
            if name.eq_ignore_ascii_case("content-range") {
                if content_range.is_some() {
                    return Err(MultipartError::BadHeader { part });
                }
                content_range = Some(parse_content_range(part, value, total)?);
            }
        }
        let r = content_range.ok_or(MultipartError::MissingContentRange { part })?;
        let run = match_asked(asked, &r).ok_or(MultipartError::UnaskedRange {
            part,
            start: r.start,
            end: r.end,
        })?;
        let len =
            usize::try_from(r.end - r.start).map_err(|_| MultipartError::Truncated { part })?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or(MultipartError::Truncated { part })?;
        slice_into(asked, run, r.start, &body[pos..end], &mut got)?;
        pos = end;
        // CRLF then the next delimiter.
        let after = &body[pos..];
        let crlf = if after.starts_with(b"\r\n") {
            2
        } else if after.starts_with(b"\n") {
            1
        } else if after.len() < 2 {
            return Err(MultipartError::Truncated { part });
        } else {
            return Err(MultipartError::WrongBoundary { offset: pos });
        };
        pos += crlf;
        if !body[pos..].starts_with(&delim) {
            return Err(if delim.starts_with(&body[pos..]) {
                MultipartError::Truncated { part }
            } else {
                MultipartError::WrongBoundary { offset: pos }
            });
        }
        pos += delim.len();
        part += 1;
    }
    collect(asked, got)
}

/// `pos` just past a CRLF or LF at `pos`, if there is one.
fn line_end(body: &[u8], pos: usize) -> Option<usize> {
    if body[pos..].starts_with(b"\r\n") {
        Some(pos + 2)
    } else if body[pos..].starts_with(b"\n") {
        Some(pos + 1)
    } else {
        None
    }
}

/// Parses any `206` answer to a request for `asked`: a multipart body, or a
/// single-part one (a server that coalesced every asked range into one, or
/// was asked for one) whose `Content-Range` header must cover the asked
/// ranges exactly.
pub fn parse_partial_response<'a>(
    content_type: Option<&str>,
    content_range: Option<&str>,
    body: &'a [u8],
    asked: &[Range<u64>],
    total: u64,
) -> Result<Vec<Part<'a>>, MultipartError> {
    check_asked(asked)?;
    if let Some(ct) = content_type {
        let media = ct.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("multipart/byteranges") {
            return parse_byteranges(ct, body, asked, total);
        }
    }
    let cr = content_range
        .ok_or_else(|| MultipartError::BadSingleRange("no Content-Range header".into()))?;
    let r = parse_content_range(0, cr, total)?;
    let run = match_asked(asked, &r).ok_or(MultipartError::UnaskedRange {
        part: 0,
        start: r.start,
        end: r.end,
    })?;
    if run.len() != asked.len() {
        let missing = &asked[if run.start > 0 { 0 } else { run.end }];
        return Err(MultipartError::Missing {
            start: missing.start,
            end: missing.end,
        });
    }
    if body.len() as u64 != r.end - r.start {
        return Err(MultipartError::BadSingleRange(format!(
            "body of {} bytes for a {}-byte Content-Range",
            body.len(),
            r.end - r.start
        )));
    }
    let mut got = vec![None; asked.len()];
    slice_into(asked, run, r.start, body, &mut got)?;
    collect(asked, got)
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const B: &str = "XyZ";
    const CT: &str = "multipart/byteranges; boundary=XyZ";

    fn blob(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Go's `http.ServeContent` framing for parts `(start, end)` of `data`.
    fn body(data: &[u8], parts: &[(u64, u64)], total: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &(a, e)) in parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(
                format!("--{B}\r\nContent-Range: bytes {a}-{}/{total}\r\nContent-Type: application/octet-stream\r\n\r\n", e - 1)
                    .as_bytes(),
            );
            out.extend_from_slice(&data[a as usize..e as usize]);
        }
        out.extend_from_slice(format!("\r\n--{B}--\r\n").as_bytes());
        out
    }

    #[test]
    fn range_header_is_inclusive() {
        assert_eq!(
            range_header(&[0..10, 100..200, 4096..8192]),
            "bytes=0-9,100-199,4096-8191"
        );
        assert_eq!(range_header(&[5..6, 7..7]), "bytes=5-5");
    }

    #[test]
    fn boundary_quoted_or_not() {
        assert_eq!(
            boundary("multipart/byteranges; boundary=abc").unwrap(),
            "abc"
        );
        assert_eq!(
            boundary("Multipart/ByteRanges;charset=x; BOUNDARY=\"a b\\\"c\"").unwrap(),
            "a b\"c"
        );
        assert_eq!(
            boundary("multipart/byteranges;boundary=abc ; x=y").unwrap(),
            "abc"
        );
        assert!(matches!(
            boundary("application/octet-stream"),
            Err(MultipartError::NotMultipart(_))
        ));
        assert!(matches!(
            boundary("multipart/byteranges"),
            Err(MultipartError::BadBoundary(_))
        ));
        assert!(matches!(
            boundary("multipart/byteranges; boundary=\"abc"),
            Err(MultipartError::BadBoundary(_))
        ));
        assert!(matches!(
            boundary("multipart/byteranges; boundary="),
            Err(MultipartError::BadBoundary(_))
        ));
        let long = format!("multipart/byteranges; boundary={}", "a".repeat(71));
        assert!(matches!(
            boundary(&long),
            Err(MultipartError::BadBoundary(_))
        ));
        assert!(matches!(
            boundary("multipart/byteranges; boundary=a; boundary=b"),
            Err(MultipartError::BadBoundary(_))
        ));
    }

    #[test]
    fn parses_registry_capture() {
        // Captured from Debian's docker-registry 2.8 (Go http.ServeContent):
        // `curl -H 'Range: bytes=0-9,100-199,4096-8191'` of a 10000-byte blob.
        let ct = include_str!("testdata/registry-3-ranges.content-type");
        let body = include_bytes!("testdata/registry-3-ranges.body");
        let blob = include_bytes!("testdata/registry-blob.bin");
        let asked = [0..10, 100..200, 4096..8192];
        let parts = parse_byteranges(ct, body, &asked, blob.len() as u64).unwrap();
        assert_eq!(parts.len(), 3);
        for (p, r) in parts.iter().zip(&asked) {
            assert_eq!(&p.range, r);
            assert_eq!(p.data, &blob[r.start as usize..r.end as usize]);
        }
        // The same body checked against other asks fails, each with its reason.
        assert!(matches!(
            parse_byteranges(ct, body, &[0..10, 100..200], 10000),
            Err(MultipartError::TooManyParts { asked: 2 })
        ));
        assert!(matches!(
            parse_byteranges(ct, body, &[0..10, 100..200, 4096..8192, 9000..9001], 10000),
            Err(MultipartError::Missing {
                start: 9000,
                end: 9001
            })
        ));
        assert!(matches!(
            parse_byteranges(ct, body, &asked, 10001),
            Err(MultipartError::TotalMismatch { .. })
        ));
        let wrong = "multipart/byteranges; boundary=0362c21a44ea40bef7104bac4253512a25e99ccef90a61e1aad1121f884b";
        assert!(matches!(
            parse_byteranges(wrong, body, &asked, 10000),
            Err(MultipartError::WrongBoundary { offset: 0 })
        ));
        // Cut anywhere, the body is truncated, never accepted short.
        for cut in [
            body.len() - 1,
            body.len() - 10,
            body.len() - 80,
            4000,
            200,
            70,
            3,
        ] {
            let r = parse_byteranges(ct, &body[..cut], &asked, 10000);
            assert!(r.is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn go_framing_round_trips_and_parts_may_come_in_any_order() {
        let data = blob(5000);
        let asked = [10..20, 30..40, 4000..4999];
        let b = body(&data, &[(10, 20), (30, 40), (4000, 4999)], 5000);
        let parts = parse_byteranges(CT, &b, &asked, 5000).unwrap();
        assert_eq!(parts[2].data, &data[4000..4999]);
        let b = body(&data, &[(4000, 4999), (10, 20), (30, 40)], 5000);
        let parts = parse_byteranges(CT, &b, &asked, 5000).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.range.clone()).collect::<Vec<_>>(),
            asked
        );
        assert_eq!(parts[0].data, &data[10..20]);
    }

    #[test]
    fn coalesced_part_is_sliced() {
        let data = blob(5000);
        let asked = [10..20, 20..30, 40..50, 100..110];
        // One part for the first three (adjacent, and a 10-byte gap), one for the last.
        let b = body(&data, &[(10, 50), (100, 110)], 5000);
        let parts = parse_byteranges(CT, &b, &asked, 5000).unwrap();
        for (p, r) in parts.iter().zip(&asked) {
            assert_eq!(p.data, &data[r.start as usize..r.end as usize]);
        }
        // A part that does not end on an asked range's end is refused.
        let b = body(&data, &[(10, 45), (100, 110)], 5000);
        assert!(matches!(
            parse_byteranges(CT, &b, &asked, 5000),
            Err(MultipartError::UnaskedRange { part: 0, .. })
        ));
    }

    #[test]
    fn overlapping_or_unasked_parts_are_refused() {
        let data = blob(5000);
        let asked = [10..20, 30..40];
        let b = body(&data, &[(10, 20), (10, 20)], 5000);
        assert!(matches!(
            parse_byteranges(CT, &b, &asked, 5000),
            Err(MultipartError::Overlap { start: 10, end: 20 })
        ));
        let b = body(&data, &[(10, 40), (30, 40)], 5000);
        assert!(matches!(
            parse_byteranges(CT, &b, &asked, 5000),
            Err(MultipartError::Overlap { start: 30, end: 40 })
        ));
        let b = body(&data, &[(10, 20), (31, 40)], 5000);
        assert!(matches!(
            parse_byteranges(CT, &b, &asked, 5000),
            Err(MultipartError::UnaskedRange { part: 1, .. })
        ));
        let b = body(&data, &[(10, 20), (30, 40), (30, 40)], 5000);
        assert!(matches!(
            parse_byteranges(CT, &b, &asked, 5000),
            Err(MultipartError::TooManyParts { asked: 2 })
        ));
    }

    #[test]
    fn framing_errors() {
        let data = blob(5000);
        let asked = [10..20, 30..40];
        let good = body(&data, &[(10, 20), (30, 40)], 5000);
        // Extra bytes after the close delimiter, or a preamble.
        let mut extra = good.clone();
        extra.extend_from_slice(b"junk");
        assert!(matches!(
            parse_byteranges(CT, &extra, &asked, 5000),
            Err(MultipartError::ExtraBytes { .. })
        ));
        let mut pre = b"preamble\r\n".to_vec();
        pre.extend_from_slice(&good);
        assert!(matches!(
            parse_byteranges(CT, &pre, &asked, 5000),
            Err(MultipartError::ExtraBytes { .. })
        ));
        // A leading CRLF (nginx) and LF-only close are fine.
        let mut nginx = b"\r\n".to_vec();
        nginx.extend_from_slice(&good[..good.len() - 2]);
        assert_eq!(parse_byteranges(CT, &nginx, &asked, 5000).unwrap().len(), 2);
        // Data longer than its Content-Range says: the next delimiter is not where it must be.
        let mut longer = body(&data, &[(10, 20), (30, 40)], 5000);
        let at = longer.windows(4).position(|w| w == b"\r\n--").unwrap();
        longer.insert(at, b'!');
        assert!(matches!(
            parse_byteranges(CT, &longer, &asked, 5000),
            Err(MultipartError::WrongBoundary { .. })
        ));
        // No close delimiter at all.
        let open = &good[..good.len() - 9];
        assert!(matches!(
            parse_byteranges(CT, open, &asked, 5000),
            Err(MultipartError::Truncated { .. })
        ));
        // Missing and malformed Content-Range.
        let no_cr = format!("--{B}\r\nContent-Type: x\r\n\r\n0123456789\r\n--{B}--\r\n");
        assert!(matches!(
            parse_byteranges(CT, no_cr.as_bytes(), &[0..10], 5000),
            Err(MultipartError::MissingContentRange { part: 0 })
        ));
        for cr in [
            "bytes 9-0/5000",
            "bytes 0-9",
            "items 0-9/5000",
            "bytes -9/5000",
            "bytes 0-5000/5000",
            "bytes 0-9/*",
            "bytes 0-9/5000/1",
            "bytes 0x-9/5000",
        ] {
            let b = format!("--{B}\r\nContent-Range: {cr}\r\n\r\n0123456789\r\n--{B}--\r\n");
            let e = parse_byteranges(CT, b.as_bytes(), &[0..10], 5000).unwrap_err();
            assert!(
                matches!(
                    e,
                    MultipartError::BadContentRange { .. } | MultipartError::TotalMismatch { .. }
                ),
                "{cr}: {e}"
            );
        }
        // Two Content-Range headers, folded and nameless lines.
        for h in [
            "Content-Range: bytes 0-9/5000\r\nContent-Range: bytes 0-9/5000",
            "X: a\r\n folded",
            ": v",
            "no colon",
        ] {
            let b = format!("--{B}\r\n{h}\r\n\r\n0123456789\r\n--{B}--\r\n");
            assert!(
                matches!(
                    parse_byteranges(CT, b.as_bytes(), &[0..10], 5000),
                    Err(MultipartError::BadHeader { part: 0 })
                ),
                "{h}"
            );
        }
        // Headers over the cap, by size and by count.
        let big = format!(
            "--{B}\r\nX-Pad: {}\r\nContent-Range: bytes 0-9/5000\r\n\r\n0123456789\r\n--{B}--\r\n",
            "p".repeat(5000)
        );
        assert!(matches!(
            parse_byteranges(CT, big.as_bytes(), &[0..10], 5000),
            Err(MultipartError::HeadersTooLong { part: 0 })
        ));
        let many = format!(
            "--{B}\r\n{}Content-Range: bytes 0-9/5000\r\n\r\n0123456789\r\n--{B}--\r\n",
            "A: b\r\n".repeat(40)
        );
        assert!(matches!(
            parse_byteranges(CT, many.as_bytes(), &[0..10], 5000),
            Err(MultipartError::HeadersTooLong { part: 0 })
        ));
        // Unsorted or empty asks are the caller's bug, reported as such.
        assert!(matches!(
            parse_byteranges(CT, &good, &[30..40, 10..20], 5000),
            Err(MultipartError::BadRequestRanges)
        ));
        assert!(matches!(
            parse_byteranges(CT, &good, &[], 5000),
            Err(MultipartError::BadRequestRanges)
        ));
        assert!(matches!(
            parse_byteranges(CT, &good, &[10..10], 5000),
            Err(MultipartError::BadRequestRanges)
        ));
        // A huge Content-Range never allocates or reads past the body.
        let huge = format!(
            "--{B}\r\nContent-Range: bytes 0-18446744073709551613/18446744073709551615\r\n\r\nabc"
        );
        assert!(matches!(
            parse_byteranges(CT, huge.as_bytes(), &[0..u64::MAX - 1], u64::MAX),
            Err(MultipartError::Truncated { part: 0 })
        ));
    }

    #[test]
    fn single_range_answers() {
        let data = blob(5000);
        let asked = [10..20, 25..30];
        // A server that merged both into one plain 206.
        let parts = parse_partial_response(
            Some("application/octet-stream"),
            Some("bytes 10-29/5000"),
            &data[10..30],
            &asked,
            5000,
        )
        .unwrap();
        assert_eq!(parts[1].data, &data[25..30]);
        assert!(matches!(
            parse_partial_response(None, Some("bytes 10-19/5000"), &data[10..20], &asked, 5000),
            Err(MultipartError::Missing { start: 25, end: 30 })
        ));
        assert!(matches!(
            parse_partial_response(None, Some("bytes 10-29/5000"), &data[10..29], &asked, 5000),
            Err(MultipartError::BadSingleRange(_))
        ));
        assert!(matches!(
            parse_partial_response(None, None, &data[10..30], &asked, 5000),
            Err(MultipartError::BadSingleRange(_))
        ));
        // A multipart Content-Type goes to the multipart parser.
        let b = body(&data, &[(10, 20), (25, 30)], 5000);
        assert_eq!(
            parse_partial_response(Some(CT), None, &b, &asked, 5000)
                .unwrap()
                .len(),
            2
        );
    }
}
