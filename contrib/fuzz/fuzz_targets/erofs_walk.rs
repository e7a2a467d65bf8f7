//! `erofs::walk` over an in-memory image (the blob is untrusted).
#![no_main]
use std::ops::Range;

use erofs_fanotify::erofs::{walk, MetaReader, WalkError, WalkLimits};
use libfuzzer_sys::fuzz_target;

struct Slice<'a> {
    image: &'a [u8],
    prefetched: Vec<Range<u64>>,
}

impl MetaReader for Slice<'_> {
    fn prefetch(&mut self, ranges: &[Range<u64>]) -> Result<(), WalkError> {
        for r in ranges {
            assert!(
                r.start < r.end && r.end <= self.image.len() as u64,
                "prefetch outside the image: {r:?}"
            );
        }
        self.prefetched.extend_from_slice(ranges);
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let end = offset + buf.len() as u64;
        assert!(
            self.prefetched
                .iter()
                .any(|r| r.start <= offset && end <= r.end)
                || buf.is_empty()
                || covered(&self.prefetched, offset, end),
            "read {offset}..{end} not prefetched"
        );
        let src = self
            .image
            .get(offset as usize..end as usize)
            .ok_or_else(|| WalkError::Io("past the image".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// `offset..end` covered by the union of `ranges`.
fn covered(ranges: &[Range<u64>], mut offset: u64, end: u64) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        if r.start <= offset && offset < r.end {
            offset = r.end;
            if offset >= end {
                return true;
            }
        }
    }
    offset >= end
}

fuzz_target!(|data: &[u8]| {
    let limits = WalkLimits {
        max_inodes: 10_000,
        max_depth: 64,
        max_dir_size: 1 << 20,
        max_index_bytes: 1 << 20,
        max_shared_xattrs: 10_000,
        max_meta_bytes: 64 << 20,
    };
    let mut r = Slice {
        image: data,
        prefetched: Vec::new(),
    };
    if let Ok(map) = walk(&mut r, data.len() as u64, &limits) {
        let size = data.len() as u64;
        for list in [&map.required, &map.data_extents] {
            for w in list.windows(2) {
                assert!(w[0].end <= w[1].start, "unsorted ranges {w:?}");
            }
            for x in list.iter() {
                assert!(
                    x.start < x.end && x.end <= size,
                    "range {x:?} outside {size}"
                );
            }
        }
    }
});
