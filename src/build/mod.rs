//! Turning sources into EROFS writer trees: a directory walker
//! ([`dir::tree_from_dir`]) and an OCI-layer tar reader
//! ([`tar::tree_from_tar`]), plus the file access the writer needs
//! ([`LocalFiles`]). This is the I/O side; the format is `crate::erofs::writer`.

pub mod convert;
pub mod dir;
pub mod input;
pub mod layer;
pub mod layer_store;
pub mod tar;

use std::io;
use std::path::Path;

use crate::erofs::writer::{FileReader, ReadAt, WriteError};

#[derive(thiserror::Error, Debug)]
pub enum BuildError {
    #[error("{0}")]
    Source(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl BuildError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        BuildError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Opens source files by path for the writer.
#[derive(Default)]
pub struct LocalFiles;

impl FileReader for LocalFiles {
    fn open(&self, path: &Path) -> io::Result<Box<dyn ReadAt + '_>> {
        Ok(Box::new(std::fs::File::open(path)?))
    }
}

/// Shown paths in messages.
pub(crate) fn show(p: &Path) -> String {
    p.display().to_string()
}

/// `a/b` joined under a display root, for messages.
pub(crate) fn rel_display(rel: &[u8]) -> String {
    if rel.is_empty() {
        "/".into()
    } else {
        format!("/{}", String::from_utf8_lossy(rel))
    }
}
