//! The streaming zinfo builder over an untrusted gzip stream, checked
//! against itself: every span inflated from its compressed range must equal
//! the builder's own output for that range.
#![no_main]
use std::io::Read;

use erofs_fanotify::gzip::{inflate_span, BuilderOptions, ZinfoBuilder};
use libfuzzer_sys::fuzz_target;

/// Bounds a decompression bomb (deflate expands at most ~1032x).
const MAX_OUT: u64 = 8 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&span, gz)) = data.split_first() else {
        return;
    };
    let opts = BuilderOptions {
        span_size: 64 + u64::from(span) * 64,
        max_checkpoints: 256,
        digests: false,
    };
    let Ok(mut b) = ZinfoBuilder::new(gz, opts) else {
        return;
    };
    let mut out = Vec::new();
    if (&mut b).take(MAX_OUT + 1).read_to_end(&mut out).is_err() || out.len() as u64 > MAX_OUT {
        return;
    }
    let Ok(built) = b.finish() else { return };
    assert_eq!(built.total_out, out.len() as u64);
    assert_eq!(built.total_in, gz.len() as u64);
    let z = &built.zinfo;
    z.check_bounds(gz.len() as u64, built.total_out)
        .expect("own zinfo in bounds");
    for k in 0..z.span_count() {
        let input = z.span_input_range(k, gz.len() as u64).expect("input range");
        let output = z
            .span_output_range(k, built.total_out)
            .expect("output range");
        let bytes = inflate_span(
            z,
            k,
            &gz[input.start as usize..input.end as usize],
            built.total_out,
        )
        .unwrap_or_else(|e| panic!("span {k} of a stream the builder accepted: {e}"));
        assert!(
            bytes == out[output.start as usize..output.end as usize],
            "span {k} differs from the stream"
        );
    }
});
