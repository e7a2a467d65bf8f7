//! Sharing layers between images on one host (issue 15 item 4): before a
//! layer's range is fetched from the network, it is taken from another cache
//! entry that holds the same blob — a single-blob entry of that digest, or a
//! merged entry whose recorded placement lists it.
//!
//! What another entry holds is its persisted presence bitmap, loaded once
//! when the mount starts (a bitmap is written only after the bytes it names
//! are durable, so a snapshot never claims too much), against an fd of that
//! entry's blob opened at the same time (a blob replaced later is another
//! inode: the fd keeps reading the one the bitmap describes). Reading it may
//! raise an event to that entry's agent when it is live; the range is
//! present there, so it is allowed at once.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use erofs_fanotify_state::{load_bitmap, BitmapIdentity, CacheDir, CacheEntry, LoadedBitmap};
use futures_util::future::BoxFuture;

use crate::cache::PresenceMap;
use crate::remote::{check_ranges, FetchError, LinkEstimate, MultiRange, Parts, RangeSource};

use super::merge::MergedRecord;

/// Bytes of another entry's cache file that hold a blob.
struct LocalCopy {
    file: Arc<File>,
    /// The blob's offset in that file.
    base: u64,
    present: PresenceMap,
    key: String,
}

/// A layer's source that reads what other entries hold before the network.
pub struct SharedSource {
    remote: Arc<dyn RangeSource>,
    copies: Vec<LocalCopy>,
    /// Bytes served from other entries.
    pub local_bytes: AtomicU64,
}

impl SharedSource {
    /// Wraps `remote` (the blob `digest`) with the copies other entries of
    /// `cache` than `own_key` hold; `remote` itself when there are none.
    pub fn wrap(remote: Arc<dyn RangeSource>, digest: &str, cache: &CacheDir, own_key: &str) -> Arc<dyn RangeSource> {
        let copies = find_copies(digest, remote.size(), cache, own_key);
        if copies.is_empty() {
            return remote;
        }
        tracing::info!(digest, entries = ?copies.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), "layer shared with other cache entries");
        Arc::new(SharedSource { remote, copies, local_bytes: AtomicU64::new(0) })
    }

    fn local(&self, range: &Range<u64>) -> Option<(Arc<File>, u64)> {
        self.copies.iter().find_map(|c| {
            let start = c.base.checked_add(range.start)?;
            let end = c.base.checked_add(range.end)?;
            c.present.contains(start..end).then(|| (Arc::clone(&c.file), start))
        })
    }
}

impl RangeSource for SharedSource {
    fn size(&self) -> u64 {
        self.remote.size()
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        Box::pin(async move {
            if let Some((file, at)) = self.local(&range) {
                let len = (range.end - range.start) as usize;
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, at).map(|_| buf)
                })
                .await;
                match read {
                    Ok(Ok(buf)) => {
                        self.local_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        return Ok(Bytes::from(buf));
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot read a shared layer's local copy; fetching"),
                    Err(e) => tracing::warn!(error = %e, "local copy read task failed; fetching"),
                }
            }
            self.remote.fetch(range).await
        })
    }

    /// The ranges no local copy holds go to the remote in one `fetch_many`; the others are read
    /// from the copies.
    fn fetch_many(&self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Parts, FetchError>> {
        Box::pin(async move {
            check_ranges(&ranges, self.size())?;
            let (local, remote): (Vec<usize>, Vec<usize>) = (0..ranges.len()).partition(|&i| self.local(&ranges[i]).is_some());
            let mut out: Vec<Option<Bytes>> = vec![None; ranges.len()];
            let mut requests = 0;
            if !remote.is_empty() {
                let parts = self.remote.fetch_many(remote.iter().map(|&i| ranges[i].clone()).collect()).await?;
                if parts.bytes.len() != remote.len() {
                    return Err(FetchError::Permanent(format!("the source returned {} parts for {}", parts.bytes.len(), remote.len())));
                }
                requests = parts.requests;
                for (&i, b) in remote.iter().zip(parts.bytes) {
                    out[i] = Some(b);
                }
            }
            for i in local {
                out[i] = Some(self.fetch(ranges[i].clone()).await?);
            }
            let bytes = out.into_iter().map(|b| b.ok_or_else(|| FetchError::Permanent("a range was not served".into()))).collect::<Result<_, _>>()?;
            Ok(Parts { bytes, requests })
        })
    }

    fn multi_range(&self) -> MultiRange {
        self.remote.multi_range()
    }

    fn link(&self) -> LinkEstimate {
        self.remote.link()
    }

    fn granule(&self, range: Range<u64>) -> Range<u64> {
        self.remote.granule(range)
    }

    fn verify_complete(&self) -> BoxFuture<'_, Result<Option<bool>, FetchError>> {
        self.remote.verify_complete()
    }

    fn describe(&self) -> String {
        self.remote.describe()
    }

    fn served_by(&self) -> Option<String> {
        self.remote.served_by()
    }
}

/// Entries (other than `own_key`) that place blob `digest` of `size` bytes, with their presence.
fn find_copies(digest: &str, size: u64, cache: &CacheDir, own_key: &str) -> Vec<LocalCopy> {
    let Ok(dir) = std::fs::read_dir(cache.root()) else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(key) = e.file_name().to_str().map(str::to_string) else { continue };
        if key == own_key {
            continue;
        }
        let Some(meta) = CacheEntry::peek(cache, &key) else { continue };
        let base = if meta.digest.as_deref() == Some(digest) && meta.blob_size == size {
            Some(0)
        } else {
            meta.layout
                .as_ref()
                .and_then(|v| serde_json::from_value::<MergedRecord>(v.clone()).ok())
                .and_then(|r| r.blobs.iter().find(|b| b.digest == digest && b.size == size).map(|b| b.base))
        };
        let Some(base) = base else { continue };
        let Ok(file) = File::open(e.path().join("blob")) else { continue };
        let Ok(st) = file.metadata() else { continue };
        if st.ino() != meta.blob_inode || st.len() < meta.blob_size {
            continue;
        }
        let identity = BitmapIdentity { blob_size: meta.blob_size, digest: meta.digest.clone(), inode: st.ino(), generation: meta.generation };
        let Ok(LoadedBitmap::Loaded(bits)) = load_bitmap(&e.path().join("bitmap"), &identity) else { continue };
        let Ok(present) = PresenceMap::from_roaring(meta.blob_size, bits) else { continue };
        if base.checked_add(size).is_none_or(|end| end > meta.blob_size) || present.populated_in(base..base + size) == 0 {
            continue;
        }
        out.push(LocalCopy { file: Arc::new(file), base, present, key });
    }
    out
}
