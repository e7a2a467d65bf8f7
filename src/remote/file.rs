//! A local file as a remote: used by tests and for `file://` sources.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{FetchError, RangeSource};

pub struct FileSource {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> std::io::Result<FileSource> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileSource { path: path.to_path_buf(), file: Arc::new(file), size })
    }
}

impl RangeSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
        let file = self.file.clone();
        let size = self.size;
        Box::pin(async move {
            if range.end > size || range.start > range.end {
                return Err(FetchError::Permanent(format!("range {range:?} outside blob of {size} bytes")));
            }
            let len = usize::try_from(range.end - range.start)
                .map_err(|_| FetchError::Permanent("range too large".into()))?;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, range.start)
                    .map(|_| Bytes::from(buf))
                    .map_err(|e| FetchError::Transient(format!("read failed: {e}")))
            })
            .await
            .map_err(|e| FetchError::Transient(format!("read task failed: {e}")))?
        })
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}
