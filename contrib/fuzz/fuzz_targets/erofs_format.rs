//! The EROFS on-disk parsers one by one: superblock, inode header, directory
//! block, xattr entry, chunk index, compression index (full and compact).
#![no_main]
use erofs_fanotify::erofs::format::{
    for_each_dirent, xattr_entry_size, ChunkLayout, IndexBytes, InodeHeader, Superblock,
    ZIndexLayout, ZMapHeader,
};
use erofs_fanotify::erofs::WalkError;
use libfuzzer_sys::fuzz_target;

struct Bytes<'a>(&'a [u8]);

impl IndexBytes for Bytes<'_> {
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], WalkError> {
        let start = usize::try_from(pos).map_err(|_| WalkError::Io("offset".into()))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| WalkError::Io("len".into()))?;
        self.0
            .get(start..end)
            .ok_or_else(|| WalkError::Io("past the end".into()))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (sel, rest) = (data[0], &data[1..]);
    match sel % 4 {
        0 => {
            if let Ok(sb) = Superblock::parse(rest) {
                let _ = sb.verify_checksum(rest);
                let _ = sb.inode_offset(u64::from_le_bytes(
                    rest.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 8]),
                ));
                let _ = sb.device_table();
                let _ = sb.shared_xattr_offset(u32::MAX);
            }
        }
        1 => {
            let _ = for_each_dirent(rest, |d| {
                let _ = d.is_dot_or_dotdot();
                Ok(())
            });
            let _ = xattr_entry_size(rest);
        }
        _ => {
            // An inode header, then its chunk or compression index from the
            // rest of the bytes (the header is at offset 0 of `rest`).
            let blkszbits = 9 + (data[0] >> 2) % 8;
            let Ok(h) = InodeHeader::parse(1, 0, rest) else {
                return;
            };
            let _ = (
                h.inode_size(),
                h.xattr_size(),
                h.body_end(),
                h.flat_startblk(),
                h.blocks(blkszbits),
            );
            if let Ok(c) = ChunkLayout::new(&h, blkszbits) {
                let _ = (c.chunk_size(), c.index_bytes());
                for e in rest.chunks(8).take(64) {
                    let _ = c.decode(e, 0xffff);
                }
            }
            let Some(zpos) = h.body_end() else { return };
            let zh_at = zpos.saturating_sub(8) as usize;
            let Some(zh) = rest.get(zh_at..).and_then(ZMapHeader::parse) else {
                return;
            };
            if let Ok(z) = ZIndexLayout::new(&h, zh_at as u64, &zh, blkszbits) {
                // The walker bounds index bytes; so do we, by cluster count.
                if z.nlclusters > 4096 {
                    return;
                }
                let mut src = Bytes(rest);
                let _ = z.tail_head(&mut src);
                let mut out = Vec::new();
                let _ = z.pclusters(&mut src, None, &mut out);
            }
        }
    }
});
