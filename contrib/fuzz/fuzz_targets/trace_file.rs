//! `agent::trace::parse_trace` (trace files come from users and artifacts).
#![no_main]
use erofs_fanotify::agent::trace::{format_trace, parse_trace};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok((digest, ranges)) = parse_trace(&text) {
        for r in &ranges {
            assert!(r.start < r.end);
        }
        // What we write, we read back the same.
        if digest
            .as_deref()
            .is_none_or(|d| !d.contains(['\n', '\r']) && d.trim() == d && !d.is_empty())
        {
            let again = parse_trace(&format_trace(digest.as_deref(), 0, &ranges))
                .expect("own output parses");
            assert_eq!(again.1, ranges);
        }
    }
});
