//! Opening a tar stream: a file or stdin, gzip sniffed by its magic, with an
//! observer seam for whoever also needs the stream (the zinfo builder reads
//! the compressed bytes; anything may watch the uncompressed tar).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::{show, BuildError};

/// Sees the bytes of a tar stream as they are read, in order, exactly once.
pub trait StreamObserver: Send {
    /// Bytes of the (gzip) input as read from the source.
    fn compressed(&mut self, _bytes: &[u8]) {}
    /// Bytes of the uncompressed tar stream.
    fn decompressed(&mut self, _bytes: &[u8]) {}
}

/// A tar stream ready to be read.
pub struct TarInput {
    pub reader: Box<dyn Read + Send>,
    pub gzip: bool,
    /// The file itself when it is an uncompressed regular file: file data
    /// can then be referenced in place instead of copied.
    pub seekable_path: Option<PathBuf>,
}

struct Tee<R> {
    inner: R,
    observer: std::sync::Arc<std::sync::Mutex<Box<dyn StreamObserver>>>,
    compressed_side: bool,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            if let Ok(mut o) = self.observer.lock() {
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

/// Opens `src` (`-` = stdin) as a tar stream, decompressing gzip (detected
/// by its magic, not the name; multi-member streams are read whole).
pub fn open_tar(src: &Path, observer: Option<Box<dyn StreamObserver>>) -> Result<TarInput, BuildError> {
    let (raw, path): (Box<dyn Read + Send>, Option<PathBuf>) = if src == Path::new("-") {
        (Box::new(io::stdin()), None)
    } else {
        let f = File::open(src).map_err(|e| BuildError::io(format!("cannot open {}", show(src)), e))?;
        let regular = f.metadata().map(|m| m.is_file()).unwrap_or(false);
        (Box::new(f), regular.then(|| src.to_path_buf()))
    };
    let mut buffered = BufReader::with_capacity(1 << 16, raw);
    let head = buffered
        .fill_buf()
        .map_err(|e| BuildError::io(format!("cannot read {}", show(src)), e))?;
    let gzip = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    let observer = observer.map(|o| std::sync::Arc::new(std::sync::Mutex::new(o)));
    let reader: Box<dyn Read + Send> = if gzip {
        let compressed: Box<dyn Read + Send> = match &observer {
            Some(o) => Box::new(Tee { inner: buffered, observer: o.clone(), compressed_side: true }),
            None => Box::new(buffered),
        };
        let dec = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, compressed));
        match &observer {
            Some(o) => Box::new(Tee { inner: dec, observer: o.clone(), compressed_side: false }),
            None => Box::new(dec),
        }
    } else {
        match &observer {
            Some(o) => Box::new(Tee { inner: buffered, observer: o.clone(), compressed_side: false }),
            None => Box::new(buffered),
        }
    };
    Ok(TarInput {
        reader,
        gzip,
        seekable_path: if gzip { None } else { path },
    })
}
