//! One layer's entry of an index document, made from a local copy of its
//! blob: the metadata ranges a walk finds (what must be local before a
//! mount), a sha256 per [`CHUNK_SIZE`] chunk, and named access traces.
//!
//! The blob is downloaded once ([`download_blob`]), hashed as it lands
//! (whole-blob digest checked, chunk digests in the same pass), then walked
//! from the file with no network.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::artifact::{LayerIndex, LayerKind};
use crate::erofs::{self, MetaReader, WalkError, WalkLimits};
use crate::oci::push::Repository;

/// Chunk size of `chunkSha256`. A mount checks every fetch against them, widened to whole chunks:
/// 64 KiB (the fetch unit's divisor, the merge gap's size) keeps that widening cheap for scattered
/// metadata, for 0.1 % of the blob in digests.
pub const CHUNK_SIZE: u64 = 64 << 10;

/// Reads an image from a local file (every byte is there: prefetch is a no-op).
pub struct FileMetaReader {
    pub file: File,
    pub size: u64,
}

impl MetaReader for FileMetaReader {
    fn prefetch(&mut self, _ranges: &[Range<u64>]) -> Result<(), WalkError> {
        Ok(())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| WalkError::Corrupt(format!("read at {offset} past the end of the image")))?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| WalkError::Io(format!("cannot read {offset}..{end} of the image: {e}")))
    }
}

/// Hashes a stream in [`CHUNK_SIZE`] chunks and as a whole.
#[derive(Default)]
pub struct ChunkHasher {
    whole: Sha256,
    chunk: Sha256,
    in_chunk: u64,
    total: u64,
    chunks: Vec<String>,
}

impl ChunkHasher {
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.total += data.len() as u64;
        while !data.is_empty() {
            let room = (CHUNK_SIZE - self.in_chunk) as usize;
            let n = room.min(data.len());
            self.chunk.update(&data[..n]);
            self.in_chunk += n as u64;
            data = &data[n..];
            if self.in_chunk == CHUNK_SIZE {
                self.chunks.push(hex::encode(std::mem::take(&mut self.chunk).finalize()));
                self.in_chunk = 0;
            }
        }
    }

    /// `(sha256:<hex> of everything, hex digest per chunk, bytes)`.
    pub fn finish(mut self) -> (String, Vec<String>, u64) {
        if self.in_chunk > 0 {
            self.chunks.push(hex::encode(self.chunk.finalize()));
        }
        (format!("sha256:{}", hex::encode(self.whole.finalize())), self.chunks, self.total)
    }
}

/// Downloads blob `digest` of `size` bytes into `out`; returns its chunk
/// digests. The size and digest are checked.
pub async fn download_blob(repo: &Repository, digest: &str, size: u64, out: &mut File) -> Result<Vec<String>, String> {
    let mut resp = repo.open_blob(digest, 0).await.map_err(|e| e.to_string())?;
    let mut hasher = ChunkHasher::default();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("the download of {digest} was cut: {}", crate::http::error_chain(&e)))? {
        if hasher.total + chunk.len() as u64 > size {
            return Err(format!("blob {digest} is larger than the {size} bytes its descriptor says"));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).map_err(|e| format!("cannot write the local copy of {digest}: {e}"))?;
    }
    let (got, chunks, total) = hasher.finish();
    if total != size {
        return Err(format!("blob {digest} has {total} bytes, its descriptor says {size}"));
    }
    if got != digest {
        return Err(format!("blob {digest} does not match its digest (got {got})"));
    }
    Ok(chunks)
}

/// The entry of an EROFS layer whose blob is the file at `path`.
pub fn erofs_layer_index(
    path: &Path,
    digest: &str,
    size: u64,
    chunk_sha256: Vec<String>,
    traces: BTreeMap<String, Vec<Range<u64>>>,
) -> Result<(LayerIndex, erofs::ImageMap), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut reader = FileMetaReader { file, size };
    let map = erofs::walk(&mut reader, size, &WalkLimits::default()).map_err(|e| format!("layer {digest}: {e}"))?;
    for (name, ranges) in &traces {
        if let Some(r) = ranges.iter().find(|r| r.end > size) {
            return Err(format!("trace {name:?} reaches {}, past the end of layer {digest} ({size} bytes)", r.end));
        }
    }
    let layer = LayerIndex {
        digest: digest.to_string(),
        size,
        kind: LayerKind::Erofs,
        block_size: Some(map.block_size),
        metadata: map.required.clone(),
        files: Default::default(),
        chunk_size: Some(CHUNK_SIZE),
        chunk_sha256,
        traces,
        tar_index: None,
        zinfo: None,
        tar_size: None,
        span_sha256: Vec::new(),
        diff_id: None,
    };
    Ok((layer, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hashes_cover_every_byte_once() {
        let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 5)).map(|i| (i % 251) as u8).collect();
        let mut h = ChunkHasher::default();
        for piece in data.chunks(300_001) {
            h.update(piece);
        }
        let (whole, chunks, total) = h.finish();
        assert_eq!(total, data.len() as u64);
        assert_eq!(whole, crate::oci::push::sha256_digest(&data));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2], hex::encode(Sha256::digest(&data[2 * CHUNK_SIZE as usize..])));
        assert_eq!(chunks[0], hex::encode(Sha256::digest(&data[..CHUNK_SIZE as usize])));
        let (_, none, _) = ChunkHasher::default().finish();
        assert!(none.is_empty());
    }
}
