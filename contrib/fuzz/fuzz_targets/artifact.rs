//! `index::artifact::parse` over an untrusted index document; what parses
//! must serialize and parse back to the same document.
#![no_main]
use erofs_fanotify::index::artifact::{parse, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(doc) = parse(data, &limits) else {
        return;
    };
    let json = doc.to_json().expect("a parsed document serializes");
    let again = parse(&json, &limits).expect("own output parses");
    assert_eq!(again, doc);
    for l in &doc.layers {
        let idx = l.extent_index();
        for (i, (_, ex)) in l.files.iter().enumerate() {
            for r in ex {
                let (f, got) = idx
                    .file_at(r.start)
                    .expect("an extent start maps to a file");
                assert!(got.contains(&r.start));
                let _ = (i, f);
            }
        }
    }
});
