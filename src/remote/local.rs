//! A local image file as a mount's source (`erofs-mount /abs/image.erofs MNT`): its bytes are
//! there from the start, read with `pread` on demand like any other segment, so a large image is
//! not copied whole and the metadata walk fills the cache file in one pass (for a bucket image,
//! whose file is all metadata, that is the whole file).
//!
//! The file is named by its identity as well as its path: device, inode, size, mtime and ctime,
//! taken by the front end. The agent refuses a file that is not that one any more, and every
//! read checks it again (one `fstat`), so an image rewritten in place is an error (EIO), never a
//! mix of two images; an image replaced by rename (as `build` does) keeps being read from the
//! file the agent opened. The cache entry is keyed by that identity: a new image gets a new entry.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FetchError, RangeSource};

/// One version of a local file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFileSpec {
    /// Canonical, absolute.
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    /// Seconds and nanoseconds (apart: the spec travels as JSON inside a tagged enum, which
    /// carries no i128).
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl LocalFileSpec {
    /// The regular file at `path` as it is now.
    pub fn of(path: &Path) -> Result<LocalFileSpec, String> {
        let canonical = std::fs::canonicalize(path).map_err(|e| format!("{}: {}", path.display(), io_reason(&e)))?;
        let file = File::open(&canonical).map_err(|e| format!("cannot open {}: {}", canonical.display(), io_reason(&e)))?;
        let m = file.metadata().map_err(|e| format!("cannot stat {}: {}", canonical.display(), io_reason(&e)))?;
        if !m.is_file() {
            return Err(format!("{} is not a regular file", canonical.display()));
        }
        Ok(Self::from_metadata(canonical, &m))
    }

    fn from_metadata(path: PathBuf, m: &std::fs::Metadata) -> LocalFileSpec {
        LocalFileSpec {
            path,
            size: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn same_file(&self, m: &std::fs::Metadata) -> bool {
        let now = Self::from_metadata(self.path.clone(), m);
        now == *self
    }

    pub fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// `file-<32 hex of sha256(path, dev, inode, size, mtime, ctime)>`.
    pub fn cache_key(&self) -> String {
        let mut h = Sha256::new();
        let path = self.path.as_os_str().as_encoded_bytes();
        h.update((path.len() as u64).to_le_bytes());
        h.update(path);
        for n in [self.dev, self.ino, self.size] {
            h.update(n.to_le_bytes());
        }
        for n in [self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1] {
            h.update(n.to_le_bytes());
        }
        format!("file-{}", &hex::encode(h.finalize())[..32])
    }
}

fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_lowercase()
}

pub struct LocalFileSource {
    spec: LocalFileSpec,
    file: Arc<File>,
}

impl LocalFileSource {
    /// Opens the file the spec names; one that changed since is refused.
    pub fn open(spec: &LocalFileSpec) -> Result<LocalFileSource, String> {
        let file = File::open(&spec.path).map_err(|e| format!("cannot open {}: {}", spec.path.display(), io_reason(&e)))?;
        let m = file.metadata().map_err(|e| format!("cannot stat {}: {}", spec.path.display(), io_reason(&e)))?;
        if !spec.same_file(&m) {
            return Err(format!("{} changed since the mount began", spec.path.display()));
        }
        Ok(LocalFileSource { spec: spec.clone(), file: Arc::new(file) })
    }
}

impl RangeSource for LocalFileSource {
    fn size(&self) -> u64 {
        self.spec.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        let file = Arc::clone(&self.file);
        let spec = self.spec.clone();
        Box::pin(async move {
            if range.start > range.end || range.end > spec.size {
                return Err(FetchError::Permanent(format!("range {range:?} outside the {}-byte file", spec.size)));
            }
            let len = usize::try_from(range.end - range.start).map_err(|_| FetchError::Permanent("range too large".into()))?;
            tokio::task::spawn_blocking(move || {
                let changed = || FetchError::Permanent(format!("{} changed while mounted", spec.path.display()));
                let m = file.metadata().map_err(|e| FetchError::Transient(format!("cannot stat {}: {e}", spec.path.display())))?;
                if !spec.same_file(&m) {
                    return Err(changed());
                }
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, range.start).map_err(|e| FetchError::Transient(format!("read failed: {e}")))?;
                // A write that raced the read shows in the times afterwards.
                match file.metadata() {
                    Ok(m) if spec.same_file(&m) => Ok(Bytes::from(buf)),
                    _ => Err(changed()),
                }
            })
            .await
            .map_err(|e| FetchError::Transient(format!("read task failed: {e}")))?
        })
    }

    fn describe(&self) -> String {
        self.spec.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_file_it_was_given_and_refuses_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"0123456789").unwrap();
        let spec = LocalFileSpec::of(&path).unwrap();
        assert!(spec.path.is_absolute());
        // It reaches the agent as JSON inside the source spec.
        let json = serde_json::to_string(&crate::agent::sources::SourceSpec::File(Box::new(spec.clone()))).unwrap();
        match serde_json::from_str::<crate::agent::sources::SourceSpec>(&json).unwrap() {
            crate::agent::sources::SourceSpec::File(back) => assert_eq!(*back, spec),
            _ => panic!("not a file spec: {json}"),
        }
        assert!(spec.cache_key().starts_with("file-") && spec.cache_key().len() == 37);
        erofs_fanotify_state::validate_cache_key(&spec.cache_key()).unwrap();
        let src = LocalFileSource::open(&spec).unwrap();
        assert_eq!(&src.fetch(2..5).await.unwrap()[..], b"234");
        assert!(src.fetch(5..11).await.is_err());
        // Rewritten in place (here longer, so the identity differs whatever the clock's grain):
        // every read is refused, and so is a new open.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(b"x", 10).unwrap();
        assert!(src.fetch(0..1).await.unwrap_err().to_string().contains("changed"));
        assert!(LocalFileSource::open(&spec).is_err());
        let again = LocalFileSpec::of(&path).unwrap();
        assert_ne!(again.cache_key(), spec.cache_key(), "a new version, a new cache entry");
        assert!(LocalFileSpec::of(dir.path()).unwrap_err().contains("not a regular file"));
        assert!(LocalFileSpec::of(&dir.path().join("none")).is_err());
    }
}
