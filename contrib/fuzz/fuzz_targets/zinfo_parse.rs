//! `gzip::Zinfo::parse` and the span arithmetic over an untrusted zinfo.
#![no_main]
use erofs_fanotify::gzip::Zinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(z) = Zinfo::parse(data.to_vec()) else {
        return;
    };
    assert_eq!(z.as_bytes(), data);
    let last = z
        .checkpoints()
        .last()
        .copied()
        .expect("a parsed zinfo has a checkpoint");
    for (blob, total) in [
        (last.in_offset.saturating_add(8), last.out_offset),
        (u64::MAX, u64::MAX),
        (1, 1),
    ] {
        let bounded = z.check_bounds(blob, total).is_ok();
        let mut covered = 0u64;
        for k in 0..z.span_count() {
            let input = z.span_input_range(k, blob);
            let output = z.span_output_range(k, total);
            if bounded {
                let input = input.expect("bounded zinfo has every input range");
                assert!(input.start < input.end && input.end <= blob);
                let output = output.expect("bounded zinfo has every output range");
                assert_eq!(output.start, covered, "spans tile the output");
                covered = output.end;
            }
        }
        if bounded {
            assert_eq!(covered, total);
            for off in [0, total / 3, total / 2, total.saturating_sub(1)] {
                if let Some(k) = z.span_for_offset(off, total) {
                    assert!(z.span_output_range(k, total).unwrap().contains(&off));
                }
            }
        }
    }
});
