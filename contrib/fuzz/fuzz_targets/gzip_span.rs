//! `gzip::inflate_span` with an untrusted zinfo and untrusted compressed
//! bytes. The zinfo is made from a compact header (windows are filled with
//! one byte each) so the fuzzer reaches the inflate instead of the size check.
//!
//! Input: n (1..=4), then per checkpoint `le16 in, le24 out, u8 bits, u8 fill`,
//! then `le32 total_out, u8 k`, then the compressed blob.
#![no_main]
use erofs_fanotify::gzip::{inflate_span, Zinfo, WINDOW_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let n = 1 + (n as usize % 4);
    let mut zinfo = Vec::new();
    zinfo.extend_from_slice(&(n as u32).to_le_bytes());
    zinfo.extend_from_slice(&(4u64 << 20).to_le_bytes());
    for _ in 0..n {
        if rest.len() < 7 {
            return;
        }
        let (c, r) = rest.split_at(7);
        rest = r;
        let inp = u64::from(u16::from_le_bytes([c[0], c[1]]));
        let out = u64::from(c[2]) | u64::from(c[3]) << 8 | u64::from(c[4]) << 16;
        zinfo.extend_from_slice(&inp.to_le_bytes());
        zinfo.extend_from_slice(&out.to_le_bytes());
        zinfo.push(c[5]);
        zinfo.extend(std::iter::repeat_n(c[6], WINDOW_SIZE));
    }
    if rest.len() < 5 {
        return;
    }
    let total_out =
        u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]])) % (16 << 20);
    let k = rest[4] as usize % n;
    let blob = &rest[5..];
    let Ok(z) = Zinfo::parse(zinfo) else { return };
    let Ok(input) = z.span_input_range(k, blob.len() as u64) else {
        return;
    };
    let Ok(output) = z.span_output_range(k, total_out) else {
        return;
    };
    if let Ok(bytes) = inflate_span(
        &z,
        k,
        &blob[input.start as usize..input.end as usize],
        total_out,
    ) {
        assert_eq!(
            bytes.len() as u64,
            output.end - output.start,
            "span output length"
        );
    }
});
