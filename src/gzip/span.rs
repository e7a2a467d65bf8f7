//! Random access: inflate one zinfo span from its compressed bytes.

use super::zinfo::Zinfo;
use super::GzipError;
use crate::sys::zlib::{Flush, Inflate, Status, GZIP, RAW};

/// Largest span output [`inflate_span`] produces (a span is the span size
/// plus at most one deflate block; 256 MiB leaves room for odd encoders).
pub const MAX_SPAN_OUTPUT: u64 = 256 << 20;

/// Deflate cannot expand one input byte into more than 1032 output bytes
/// (a 258-byte match per 2 bits), so a span claiming more is forged; checked
/// before allocating.
const MAX_RATIO: u64 = 1032;

/// gzip trailer: CRC-32 and ISIZE.
const TRAILER: usize = 8;

/// Inflates span `k` of `zinfo`.
///
/// `compressed` holds exactly the bytes of
/// [`Zinfo::span_input_range(k, blob_size)`](Zinfo::span_input_range);
/// `total_out` is the uncompressed stream's size (from the builder or the
/// index artifact). Returns exactly the bytes of
/// [`Zinfo::span_output_range(k, total_out)`](Zinfo::span_output_range).
///
/// Member boundaries inside the span are followed (raw inflate to the first
/// member's end, skip its trailer, then gzip members with their CRCs
/// checked). For the last span, the stream must also end cleanly: the final
/// member's trailer present, any further members empty, no byte left over.
/// Every failure is an error, never zeros.
pub fn inflate_span(
    zinfo: &Zinfo,
    k: usize,
    compressed: &[u8],
    total_out: u64,
) -> Result<Vec<u8>, GzipError> {
    let out = zinfo.span_output_range(k, total_out)?;
    let expected = out.end - out.start;
    if expected > MAX_SPAN_OUTPUT {
        return Err(GzipError::SpanTooLarge {
            span: k,
            bytes: expected,
        });
    }
    // `compressed.len() * 1032`, plus one block's worth of slack for tiny
    // inputs (a header-only span is still a few bytes).
    let possible = (compressed.len() as u64).saturating_mul(MAX_RATIO);
    if expected > possible {
        return Err(GzipError::ShortInput { span: k });
    }
    let mut buf = vec![0u8; expected as usize];
    inflate_span_into(zinfo, k, compressed, total_out, &mut buf)?;
    Ok(buf)
}

/// [`inflate_span`] into a caller's buffer, which must be exactly the
/// span's output length.
pub fn inflate_span_into(
    zinfo: &Zinfo,
    k: usize,
    compressed: &[u8],
    total_out: u64,
    out: &mut [u8],
) -> Result<(), GzipError> {
    let range = zinfo.span_output_range(k, total_out)?;
    if range.end - range.start != out.len() as u64 {
        return Err(GzipError::OutputLength {
            span: k,
            expected: range.end - range.start,
            got: out.len() as u64,
        });
    }
    let last = k + 1 == zinfo.span_count();
    if out.is_empty() && !last {
        return Ok(());
    }
    let zerr = |e| GzipError::SpanData { span: k, source: e };
    let (mut inf, mut input) = start_span(zinfo, k, compressed)?;

    let mut raw = true;
    // True right after a member's end (trailer skipped or checked), until
    // the next member's bytes are consumed.
    let mut member_done = false;
    let mut produced = 0usize;
    let mut stalls = 0u32;
    // Phase 1: fill `out` exactly.
    while produced < out.len() {
        let step = inf
            .inflate(input, &mut out[produced..], Flush::None)
            .map_err(zerr)?;
        input = &input[step.consumed..];
        produced += step.produced;
        match step.status {
            Status::StreamEnd => {
                if produced == out.len() && !last {
                    return Ok(());
                }
                end_member(&mut inf, &mut input, &mut raw, k)?;
                member_done = true;
                if input.is_empty() {
                    break;
                }
            }
            _ if step.consumed == 0 && step.produced == 0 => stalled(input, &mut stalls, k)?,
            _ => {
                member_done = false;
                stalls = 0;
            }
        }
    }
    if produced != out.len() {
        return Err(GzipError::OutputLength {
            span: k,
            expected: out.len() as u64,
            got: produced as u64,
        });
    }
    if !last {
        return Ok(());
    }
    // Phase 2 (last span): the stream must end here, with nothing left.
    let mut scratch = [0u8; 64];
    stalls = 0;
    loop {
        if member_done && input.is_empty() {
            return Ok(());
        }
        let step = inf
            .inflate(input, &mut scratch, Flush::None)
            .map_err(zerr)?;
        input = &input[step.consumed..];
        if step.produced > 0 {
            return Err(GzipError::OutputLength {
                span: k,
                expected: out.len() as u64,
                got: out.len() as u64 + step.produced as u64,
            });
        }
        match step.status {
            Status::StreamEnd => {
                end_member(&mut inf, &mut input, &mut raw, k)?;
                member_done = true;
            }
            _ if step.consumed == 0 => stalled(input, &mut stalls, k)?,
            _ => {
                member_done = false;
                stalls = 0;
            }
        }
    }
}

/// The last span inflated to the stream's end, its length not known
/// beforehand: a zinfo does not record the uncompressed size, so a mount
/// with only erofs-utils' files learns the tar's size from this (`out` of
/// the last checkpoint plus the length returned). The stream must end with
/// the input (no trailing bytes), as [`inflate_span`] checks for the last
/// span; more than `cap` bytes of output is an error.
pub fn inflate_last_span(zinfo: &Zinfo, compressed: &[u8], cap: u64) -> Result<Vec<u8>, GzipError> {
    let k = zinfo.span_count().checked_sub(1).ok_or(super::ZinfoError::Empty)?;
    let zerr = |e| GzipError::SpanData { span: k, source: e };
    let (mut inf, mut input) = start_span(zinfo, k, compressed)?;
    let mut raw = true;
    let mut member_done = false;
    let mut stalls = 0u32;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        if member_done && input.is_empty() {
            return Ok(out);
        }
        let step = inf.inflate(input, &mut chunk, Flush::None).map_err(zerr)?;
        input = &input[step.consumed..];
        let total = out.len() as u64 + step.produced as u64;
        if total > cap {
            return Err(GzipError::SpanTooLarge { span: k, bytes: total });
        }
        out.extend_from_slice(&chunk[..step.produced]);
        match step.status {
            Status::StreamEnd => {
                end_member(&mut inf, &mut input, &mut raw, k)?;
                member_done = true;
            }
            _ if step.consumed == 0 && step.produced == 0 => {
                if input.is_empty() {
                    return Err(GzipError::ShortInput { span: k });
                }
                stalls += 1;
                if stalls > 2 {
                    return Err(GzipError::Failed("inflate made no progress".into()));
                }
            }
            _ => {
                member_done = false;
                stalls = 0;
            }
        }
    }
}

/// After a member's deflate stream ended: skip the raw member's trailer (a
/// gzip-mode inflate consumed and checked its own) and start the next member
/// in gzip mode.
fn end_member(
    inf: &mut Inflate,
    input: &mut &[u8],
    raw: &mut bool,
    k: usize,
) -> Result<(), GzipError> {
    if *raw {
        if input.len() < TRAILER {
            return Err(GzipError::ShortInput { span: k });
        }
        *input = &input[TRAILER..];
        *raw = false;
    }
    inf.reset(GZIP)
        .map_err(|e| GzipError::SpanData { span: k, source: e })
}

/// The digest of span `k` (lowercase hex), what the index artifact's
/// `spanSha256` holds: sha256 of the span's checkpoint record (`in`, `out`,
/// `bits` and the 32 KiB window, as stored in the zinfo) followed by its
/// compressed input ([`Zinfo::span_input_range`]). Everything the span's
/// output depends on is covered, so a window changed after the digests were
/// made is noticed when the span is read, not only when the layer's diff_id
/// is checked.
pub fn span_digest(zinfo: &Zinfo, k: usize, compressed: &[u8]) -> Result<String, GzipError> {
    use sha2::{Digest, Sha256};
    let record = zinfo.checkpoint_record(k).ok_or(super::ZinfoError::NoSuchSpan {
        span: k,
        spans: zinfo.span_count(),
    })?;
    let mut h = Sha256::new();
    h.update(record);
    h.update(compressed);
    Ok(hex::encode(h.finalize()))
}

/// [`span_digest`] of every span, reading the blob span by span
/// (consecutive spans share a byte or two, hence the seeks).
pub fn span_digests<R: std::io::Read + std::io::Seek>(
    zinfo: &Zinfo,
    blob: &mut R,
    blob_size: u64,
) -> Result<Vec<String>, GzipError> {
    use sha2::{Digest, Sha256};
    use std::io::SeekFrom;
    let mut out = Vec::with_capacity(zinfo.span_count());
    let mut buf = vec![0u8; 1 << 16];
    for k in 0..zinfo.span_count() {
        let r = zinfo.span_input_range(k, blob_size)?;
        blob.seek(SeekFrom::Start(r.start))?;
        let mut h = Sha256::new();
        h.update(zinfo.checkpoint_record(k).unwrap_or_default());
        let mut left = r.end - r.start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            blob.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        out.push(hex::encode(h.finalize()));
    }
    Ok(out)
}
/// An inflate step that moved nothing: the span's input ran out (short), or
/// inflate is stuck.
fn stalled(input: &[u8], stalls: &mut u32, k: usize) -> Result<(), GzipError> {
    if input.is_empty() {
        return Err(GzipError::ShortInput { span: k });
    }
    *stalls += 1;
    if *stalls > 2 {
        return Err(GzipError::Failed("inflate made no progress".into()));
    }
    Ok(())
}

/// A raw inflate positioned at checkpoint `k` (primed with its bits, its
/// window as dictionary) and the input left after the primed byte.
fn start_span<'a>(zinfo: &Zinfo, k: usize, compressed: &'a [u8]) -> Result<(Inflate, &'a [u8]), GzipError> {
    let cp = *zinfo
        .checkpoint(k)
        .ok_or(GzipError::Failed("checkpoint vanished".into()))?;
    let window = zinfo
        .window(k)
        .ok_or(GzipError::Failed("window vanished".into()))?;
    let zerr = |e| GzipError::SpanData { span: k, source: e };
    let mut inf = Inflate::new(RAW).map_err(zerr)?;
    let mut input = compressed;
    if cp.bits > 0 {
        let Some((&first, rest)) = input.split_first() else {
            return Err(GzipError::ShortInput { span: k });
        };
        inf.prime(cp.bits, first >> (8 - cp.bits)).map_err(zerr)?;
        input = rest;
    }
    inf.set_dictionary(window).map_err(zerr)?;
    Ok((inf, input))
}
