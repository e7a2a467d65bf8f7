//! `fanotify::event::parse_batch` over arbitrary bytes read from the group fd.
#![no_main]
use erofs_fanotify::fanotify::event::parse_batch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let batch = parse_batch(data);
    // Every event came from its own 24-byte metadata header; at most one
    // malformed record ends the batch early.
    assert!(
        batch.events.len() * 24 <= data.len(),
        "more events than headers"
    );
    assert!(batch.events.len() + batch.malformed.len() <= data.len() / 24 + 1);
});
