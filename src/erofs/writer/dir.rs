//! Directory contents: entries (with `.` and `..`) sorted by name bytes —
//! the order the kernel's binary search over blocks, then within a block,
//! expects (`erofs_namei`) — and packed greedily into blocks.

use super::ondisk::{encode_dirent, DIRENT_SIZE};

/// One entry before nids are known: the name and what it points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<T> {
    pub name: Vec<u8>,
    pub target: T,
    pub file_type: u8,
}

/// The entries of one directory split into blocks.
#[derive(Clone, Debug)]
pub struct DirLayout<T> {
    pub entries: Vec<Entry<T>>,
    /// Per block: the range of `entries` it holds and the bytes it uses.
    pub blocks: Vec<(std::ops::Range<usize>, usize)>,
}

impl<T: Clone> DirLayout<T> {
    /// `entries` must not contain `.`/`..`; they are added here.
    pub fn new(dot: Entry<T>, dotdot: Entry<T>, mut entries: Vec<Entry<T>>, block_size: usize) -> Self {
        entries.push(dot);
        entries.push(dotdot);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut blocks = Vec::new();
        let mut start = 0;
        let mut used = 0;
        for (i, e) in entries.iter().enumerate() {
            let need = DIRENT_SIZE + e.name.len();
            if used + need > block_size {
                blocks.push((start..i, used));
                start = i;
                used = 0;
            }
            used += need;
        }
        blocks.push((start..entries.len(), used));
        DirLayout { entries, blocks }
    }

    /// `i_size`: full blocks plus the used bytes of the last one.
    pub fn size(&self, block_size: usize) -> u64 {
        let n = self.blocks.len();
        ((n - 1) * block_size + self.blocks[n - 1].1) as u64
    }

    /// Encodes block `i` (exactly its used bytes) with `nid_of` resolving
    /// targets.
    pub fn encode_block(&self, i: usize, nid_of: impl Fn(&T) -> u64) -> Vec<u8> {
        let (range, used) = self.blocks[i].clone();
        let mut out = vec![0u8; used];
        let count = range.len();
        let mut nameoff = count * DIRENT_SIZE;
        for (slot, e) in self.entries[range].iter().enumerate() {
            encode_dirent(
                nid_of(&e.target),
                nameoff as u16,
                e.file_type,
                &mut out[slot * DIRENT_SIZE..(slot + 1) * DIRENT_SIZE],
            );
            out[nameoff..nameoff + e.name.len()].copy_from_slice(&e.name);
            nameoff += e.name.len();
        }
        out
    }
}
