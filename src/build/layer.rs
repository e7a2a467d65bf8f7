//! One pass over an OCI layer (tar or tar+gzip): its EROFS tar index, its
//! zinfo (gzip), its digests, and its sizes — what `build --tar-index` and
//! `index build/push` need, without keeping the tar.
//!
//! The gzip stream is inflated once, by the zinfo builder (which records
//! checkpoints as it goes, byte-compatibly with erofs-utils' gzran); the
//! uncompressed tar flows from it into the tar reader. A [`StreamObserver`]
//! sees the compressed bytes as they are read (e.g. to spool them for span
//! digests) — the seam of `build::input`.
//!
//! The index is laid out as erofs-utils' `mount.erofs -o oci.tarindex=`
//! expects: the backing file is `[index file | tar]`, the tar at the index
//! file's size, and the device slot's `uniaddr` is that size in 512-byte
//! blocks. Our index file is padded with zeros to a multiple of 4 KiB, so
//! the tar starts on a page (a cache block) of the flat address space.

use std::io::{self, BufRead, BufReader, Read, Seek, Write};

use sha2::{Digest, Sha256};

use super::input::StreamObserver;
use super::tar::{tree_from_tar, DataMode, TarStats};
use super::BuildError;
use crate::erofs::writer::{self, Device, NoFiles, WriterOptions};
use crate::gzip::{BuilderOptions, BuiltZinfo, ZinfoBuilder, DEFAULT_SPAN_SIZE};

/// The tar starts at a multiple of this in the flat address space.
pub const TAR_ALIGN: u64 = 4096;

/// Options of [`index_layer`].
#[derive(Clone, Debug)]
pub struct LayerOptions {
    /// zinfo checkpoint distance (uncompressed bytes).
    pub span_size: u64,
    /// The image UUID; `None`: derived from the metadata (reproducible).
    pub uuid: Option<[u8; 16]>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            span_size: DEFAULT_SPAN_SIZE,
            uuid: None,
        }
    }
}

/// What [`index_layer`] found and wrote.
#[derive(Debug)]
pub struct IndexedLayer {
    /// The input was gzip (and `zinfo` is set).
    pub gzip: bool,
    pub zinfo: Option<BuiltZinfo>,
    /// `sha256:` of the input as read (the layer blob's digest).
    pub blob_digest: String,
    pub blob_size: u64,
    /// `sha256:` of the uncompressed tar (the layer's diff_id).
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    /// The device slot: the tar's 512-byte blocks and its first block in
    /// the flat space (= the index file's size / 512).
    pub device_blocks: u32,
    pub uniaddr: u32,
    /// Bytes of the index file (a multiple of [`TAR_ALIGN`]).
    pub index_size: u64,
    pub inodes: u64,
    pub stats: TarStats,
}

/// Hashes and counts what passes, and shows it to an observer.
struct Watch<R> {
    inner: R,
    hash: Sha256,
    count: u64,
    observer: Option<Box<dyn StreamObserver>>,
    compressed_side: bool,
}

impl<R: Read> Read for Watch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hash.update(&buf[..n]);
            self.count += n as u64;
            if let Some(o) = &mut self.observer {
                if self.compressed_side {
                    o.compressed(&buf[..n]);
                } else {
                    o.decompressed(&buf[..n]);
                }
            }
        }
        Ok(n)
    }
}

fn hex_digest(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Reads a layer (`raw`: the blob's bytes, gzip detected by its magic),
/// writes its tar index to `index_out` (from its current position 0), and
/// returns what the artifact and the mount need.
pub fn index_layer<W: Write + Seek>(
    raw: impl Read,
    index_out: &mut W,
    observer: Option<Box<dyn StreamObserver>>,
    opts: &LayerOptions,
) -> Result<IndexedLayer, BuildError> {
    let mut buffered = BufReader::with_capacity(1 << 16, raw);
    let head = buffered
        .fill_buf()
        .map_err(|e| BuildError::io("cannot read the layer", e))?;
    if head.is_empty() {
        return Err(BuildError::Source("the layer is empty".into()));
    }
    let gzip = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    let mut watch = Watch {
        inner: buffered,
        hash: Sha256::new(),
        count: 0,
        observer,
        compressed_side: gzip,
    };
    let (tree, stats, zinfo, diff_id) = if gzip {
        let bopts = BuilderOptions {
            span_size: opts.span_size,
            digests: true,
            ..BuilderOptions::default()
        };
        let mut builder = ZinfoBuilder::new(&mut watch, bopts)
            .map_err(|e| BuildError::Source(e.to_string()))?;
        let (tree, stats) = tree_from_tar(&mut builder, DataMode::Index { block_bits: 9 })?;
        let built = builder
            .finish()
            .map_err(|e| BuildError::Source(format!("the gzip stream: {e}")))?;
        if built.total_out != stats.stream_len {
            return Err(BuildError::Source(format!(
                "the gzip stream holds {} bytes but the tar reader read {}",
                built.total_out, stats.stream_len
            )));
        }
        let diff_id = built
            .diff_id
            .clone()
            .ok_or_else(|| BuildError::Source("the zinfo builder computed no diff_id".into()))?;
        (tree, stats, Some(built), diff_id)
    } else {
        let (tree, stats) = tree_from_tar(&mut watch, DataMode::Index { block_bits: 9 })?;
        let diff_id = hex_digest(watch.hash.clone());
        (tree, stats, None, diff_id)
    };
    let blob_size = watch.count;
    let blob_digest = hex_digest(watch.hash);
    if stats.stream_len == 0 {
        return Err(BuildError::Source("the layer holds an empty tar".into()));
    }

    let device_blocks = u32::try_from(stats.device_blocks())
        .map_err(|_| BuildError::Source("the tar is larger than 2^32 512-byte blocks".into()))?;
    let mut wopts = WriterOptions {
        block_bits: 9,
        metadata_only: true,
        derive_uuid: opts.uuid.is_none(),
        uuid: opts.uuid.unwrap_or([0; 16]),
        devices: vec![Device {
            tag: [0; 64],
            blocks: device_blocks,
            uniaddr: 0,
        }],
        ..WriterOptions::default()
    };
    // The index's size does not depend on uniaddr: plan once to learn it.
    let first = writer::plan(&tree, &wopts, &NoFiles)?;
    let index_size = first.summary().image_size.next_multiple_of(TAR_ALIGN);
    drop(first);
    wopts.devices[0].uniaddr = u32::try_from(index_size / 512)
        .map_err(|_| BuildError::Source("the tar index is larger than 2^32 blocks".into()))?;
    let plan = writer::plan(&tree, &wopts, &NoFiles)?;
    let summary = plan.write(index_out, &NoFiles)?;
    // Zero padding up to the tar's first block.
    let pad = index_size - summary.image_size;
    index_out
        .seek(io::SeekFrom::Start(summary.image_size))
        .and_then(|_| io::copy(&mut io::repeat(0).take(pad), index_out))
        .and_then(|_| index_out.flush())
        .map_err(|e| BuildError::io("cannot write the tar index", e))?;
    Ok(IndexedLayer {
        gzip,
        tar_size: stats.stream_len,
        zinfo,
        blob_digest,
        blob_size,
        diff_id,
        device_blocks,
        uniaddr: wopts.devices[0].uniaddr,
        index_size,
        inodes: summary.inodes,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn header(path: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    fn layer_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        b.append(&header("big", 3 << 20), &data[..]).unwrap();
        b.append(&header("small", 5), &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn gzip_layer_indexes_in_one_pass() {
        let tar = layer_tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let mut out = Cursor::new(Vec::new());
        let opts = LayerOptions { span_size: 1 << 20, uuid: None };
        let l = index_layer(&gz[..], &mut out, None, &opts).unwrap();
        assert!(l.gzip);
        assert_eq!(l.tar_size, tar.len() as u64);
        assert_eq!(l.blob_size, gz.len() as u64);
        assert_eq!(l.blob_digest, format!("sha256:{}", hex::encode(Sha256::digest(&gz))));
        assert_eq!(l.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        let z = l.zinfo.as_ref().unwrap();
        assert!(z.zinfo.span_count() >= 2, "{} spans", z.zinfo.span_count());
        assert_eq!(z.total_out, tar.len() as u64);
        assert_eq!(out.get_ref().len() as u64, l.index_size);
        assert_eq!(l.index_size % TAR_ALIGN, 0);
        assert_eq!(u64::from(l.uniaddr) * 512, l.index_size);
        assert!(u64::from(l.device_blocks) * 512 <= l.tar_size);
        let sb = crate::erofs::probe_superblock(&out.get_ref()[..4096]).unwrap();
        assert_eq!((sb.blkszbits, sb.extra_devices), (9, 1));
        // Reproducible: the same layer gives the same index.
        let mut again = Cursor::new(Vec::new());
        index_layer(&gz[..], &mut again, None, &opts).unwrap();
        assert_eq!(again.get_ref(), out.get_ref());
    }

    #[test]
    fn plain_tar_layer_and_observer() {
        struct Count(std::sync::Arc<std::sync::atomic::AtomicU64>);
        impl StreamObserver for Count {
            fn decompressed(&mut self, b: &[u8]) {
                self.0.fetch_add(b.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let tar = layer_tar();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut out = Cursor::new(Vec::new());
        let l = index_layer(&tar[..], &mut out, Some(Box::new(Count(seen.clone()))), &LayerOptions::default()).unwrap();
        assert!(!l.gzip && l.zinfo.is_none());
        assert_eq!(l.diff_id, l.blob_digest);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), tar.len() as u64);
    }

    #[test]
    fn bad_layers_are_errors() {
        let mut out = Cursor::new(Vec::new());
        assert!(index_layer(&b""[..], &mut out, None, &LayerOptions::default()).is_err());
        let tar = layer_tar();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let e = index_layer(&gz[..gz.len() - 20], &mut out, None, &LayerOptions::default()).unwrap_err();
        assert!(e.to_string().contains("truncated") || e.to_string().contains("corrupt"), "{e}");
    }
}
