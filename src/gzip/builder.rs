//! The streaming zinfo builder: inflates a gzip stream once, hands the
//! uncompressed bytes on, and records checkpoints exactly as erofs-utils'
//! `erofs_gzran_builder_read` does, so the zinfo is byte-identical to theirs
//! for the same input and span size.
//!
//! What "exactly" takes (from gzran.c):
//! - inflate with `windowBits = 47` (gzip or zlib, auto) and `Z_BLOCK`, input
//!   read 16 KiB at a time, output into one 32 KiB buffer that each
//!   `builder_read` call refills from its start;
//! - a checkpoint where inflate stopped right after a block end or a header
//!   (`data_type & 128`), not inside the last block (`!(data_type & 64)`),
//!   and either at a member start or more than `span` bytes after the
//!   previous checkpoint;
//! - its window is that 32 KiB buffer rotated at the write position, which
//!   holds stale bytes of the previous call after a member end (and zeros
//!   before any output): copied as is;
//! - at a member end, inflate is reset and the call returns what it has.
//!
//! Where we are stricter than gzran.c (it treats a short read as the end):
//! a stream that ends inside a member, trailing bytes that are no gzip member,
//! and an empty input are errors.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use super::zinfo::{Checkpoint, Zinfo, DEFAULT_SPAN_SIZE, MAX_SPAN_SIZE, WINDOW_SIZE};
use super::GzipError;
use crate::sys::zlib::{Flush, Inflate, Status, AUTO};

/// gzran.c's input buffer (`src[1 << 14]`).
const INPUT_CHUNK: usize = 1 << 14;

/// Options of a [`ZinfoBuilder`].
#[derive(Clone, Debug)]
pub struct BuilderOptions {
    /// Distance in uncompressed bytes between checkpoints (more than this
    /// many bytes after the previous one, at the next block end).
    pub span_size: u64,
    /// Most checkpoints kept (each costs 32 KiB of memory and of zinfo).
    /// gzran.c records one per gzip member: an eStargz layer has one member
    /// per file.
    pub max_checkpoints: usize,
    /// Compute sha256 of the compressed input (the blob digest) and of the
    /// uncompressed output (the layer's diff_id).
    pub digests: bool,
}

impl Default for BuilderOptions {
    fn default() -> Self {
        BuilderOptions {
            span_size: DEFAULT_SPAN_SIZE,
            max_checkpoints: 32768,
            digests: true,
        }
    }
}

/// What [`ZinfoBuilder::finish`] returns.
#[derive(Debug)]
pub struct BuiltZinfo {
    pub zinfo: Zinfo,
    /// Size of the compressed stream read.
    pub total_in: u64,
    /// Size of the uncompressed stream: pass it to `span_output_range` and
    /// `inflate_span` (the zinfo format does not record it).
    pub total_out: u64,
    /// gzip members seen.
    pub members: u64,
    /// `sha256:<hex>` of the compressed bytes, when `digests` was set.
    pub blob_digest: Option<String>,
    /// `sha256:<hex>` of the uncompressed bytes (the diff_id), when set.
    pub diff_id: Option<String>,
}

/// Reads a gzip stream from `R`, yields its uncompressed bytes through
/// [`Read`], and records zinfo checkpoints as it goes. Call
/// [`finish`](Self::finish) at the end (it inflates whatever the consumer did
/// not read, so the zinfo always covers the whole stream).
///
/// A data error surfaces from `read` as `io::ErrorKind::InvalidData` with a
/// [`GzipError`] inside, and again from `finish`.
pub struct ZinfoBuilder<R> {
    source: R,
    opts: BuilderOptions,
    inflate: Inflate,
    input: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    /// gzran's `gb->window`: the output buffer of the current call.
    window: Box<[u8]>,
    /// What gzran's buffer holds with C zlib: each call's reported output
    /// over the older contents. Its checkpoint windows take the bytes past
    /// the write position from earlier calls, and zlib-rs may scribble past
    /// what it reports written (C zlib does not), so they come from here.
    stable: Box<[u8]>,
    /// Bytes of `window` produced by the last call and not yet handed out.
    out_pos: usize,
    out_len: usize,
    total_in: u64,
    total_out: u64,
    points: Vec<Checkpoint>,
    windows: Vec<Box<[u8]>>,
    initial: bool,
    /// Input consumed since the last member end (or the start).
    mid_member: bool,
    members: u64,
    eof: bool,
    failed: Option<String>,
    in_hash: Option<Sha256>,
    out_hash: Option<Sha256>,
}

impl<R: Read> ZinfoBuilder<R> {
    pub fn new(source: R, opts: BuilderOptions) -> Result<Self, GzipError> {
        if opts.span_size == 0 || opts.span_size > MAX_SPAN_SIZE {
            return Err(GzipError::BadOptions(format!(
                "span size {} outside 1..=2^32-1",
                opts.span_size
            )));
        }
        if opts.max_checkpoints == 0 {
            return Err(GzipError::BadOptions("max_checkpoints is 0".into()));
        }
        let digests = opts.digests;
        Ok(ZinfoBuilder {
            source,
            opts,
            inflate: Inflate::new(AUTO)?,
            input: vec![0u8; INPUT_CHUNK].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            window: vec![0u8; WINDOW_SIZE].into_boxed_slice(),
            stable: vec![0u8; WINDOW_SIZE].into_boxed_slice(),
            out_pos: 0,
            out_len: 0,
            total_in: 0,
            total_out: 0,
            points: Vec::new(),
            windows: Vec::new(),
            initial: true,
            mid_member: false,
            members: 0,
            eof: false,
            failed: None,
            in_hash: digests.then(Sha256::new),
            out_hash: digests.then(Sha256::new),
        })
    }

    /// Uncompressed bytes produced so far (handed out or buffered).
    pub fn total_out(&self) -> u64 {
        self.total_out
    }

    /// Compressed bytes consumed so far.
    pub fn total_in(&self) -> u64 {
        self.total_in
    }

    /// Inflates the rest of the stream and returns the zinfo.
    pub fn finish(mut self) -> Result<BuiltZinfo, GzipError> {
        while !self.eof {
            self.out_pos = self.out_len;
            self.fill()?;
        }
        if let Some(msg) = self.failed.take() {
            return Err(GzipError::Failed(msg));
        }
        let hex_digest =
            |h: Option<Sha256>| h.map(|h| format!("sha256:{}", hex::encode(h.finalize())));
        Ok(BuiltZinfo {
            zinfo: Zinfo::from_parts(self.opts.span_size, self.points, &self.windows)?,
            total_in: self.total_in,
            total_out: self.total_out,
            members: self.members,
            blob_digest: hex_digest(self.in_hash),
            diff_id: hex_digest(self.out_hash),
        })
    }

    /// One `erofs_gzran_builder_read` call: refills `window` from its start
    /// until it is full, a member ends, or the input ends.
    fn fill(&mut self) -> Result<(), GzipError> {
        if let Some(msg) = &self.failed {
            return Err(GzipError::Failed(msg.clone()));
        }
        match self.fill_inner() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.failed = Some(e.to_string());
                self.eof = true;
                Err(e)
            }
        }
    }

    fn fill_inner(&mut self) -> Result<(), GzipError> {
        let mut written = 0usize;
        self.out_pos = 0;
        self.out_len = 0;
        let mut stalls = 0u32;
        while written < WINDOW_SIZE {
            if self.in_pos == self.in_len {
                let n = read_full(&mut self.source, &mut self.input)?;
                if n == 0 {
                    self.eof = true;
                    if self.mid_member {
                        return Err(GzipError::Truncated);
                    }
                    if self.members == 0 {
                        return Err(GzipError::NotGzip("empty input".into()));
                    }
                    break;
                }
                if let Some(h) = &mut self.in_hash {
                    h.update(&self.input[..n]);
                }
                self.in_pos = 0;
                self.in_len = n;
            }
            let step = self
                .inflate
                .inflate(
                    &self.input[self.in_pos..self.in_len],
                    &mut self.window[written..],
                    Flush::Block,
                )
                .map_err(|e| {
                    if self.members == 0 && self.total_out == 0 {
                        GzipError::NotGzip(e.to_string())
                    } else {
                        GzipError::Zlib {
                            at_in: self.total_in,
                            source: e,
                        }
                    }
                })?;
            self.in_pos += step.consumed;
            written += step.produced;
            self.total_in += step.consumed as u64;
            self.total_out += step.produced as u64;
            if step.consumed > 0 {
                self.mid_member = true;
            }
            if step.consumed == 0 && step.produced == 0 && step.status != Status::StreamEnd {
                // zlib always progresses with input and output space, except
                // once at a block boundary; more than that is a bug.
                stalls += 1;
                if stalls > 2 {
                    return Err(GzipError::Failed("inflate made no progress".into()));
                }
            } else {
                stalls = 0;
            }
            if step.status == Status::StreamEnd {
                self.inflate.reset(AUTO)?;
                self.initial = true;
                self.mid_member = false;
                self.members += 1;
                if written > 0 {
                    break;
                }
                continue;
            }
            let last = self.points.last().map_or(0, |p| p.out_offset);
            if step.data_type & 128 != 0
                && step.data_type & 64 == 0
                && (self.initial || self.total_out - last > self.opts.span_size)
            {
                if self.points.len() >= self.opts.max_checkpoints {
                    return Err(GzipError::TooManyCheckpoints(
                        self.opts.max_checkpoints as u64,
                    ));
                }
                let mut w = vec![0u8; WINDOW_SIZE].into_boxed_slice();
                let left = WINDOW_SIZE - written;
                w[..left].copy_from_slice(&self.stable[written..]);
                w[left..].copy_from_slice(&self.window[..written]);
                self.points.push(Checkpoint {
                    in_offset: self.total_in,
                    out_offset: self.total_out,
                    bits: (step.data_type & 7) as u8,
                });
                self.windows.push(w);
                self.initial = false;
            }
        }
        self.stable[..written].copy_from_slice(&self.window[..written]);
        if let Some(h) = &mut self.out_hash {
            h.update(&self.window[..written]);
        }
        self.out_len = written;
        Ok(())
    }
}

impl<R: Read> Read for ZinfoBuilder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_pos == self.out_len {
            if self.eof {
                return match &self.failed {
                    Some(msg) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        GzipError::Failed(msg.clone()),
                    )),
                    None => Ok(0),
                };
            }
            self.fill().map_err(|e| match e {
                GzipError::Io(e) => e,
                e => io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
        }
        let n = buf.len().min(self.out_len - self.out_pos);
        buf[..n].copy_from_slice(&self.window[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

/// Reads until `buf` is full or the source ends (gzran.c reads whole 16 KiB
/// chunks); retries on `Interrupted`.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, GzipError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(GzipError::Io(e)),
        }
    }
    Ok(n)
}

/// Builds the zinfo of a whole gzip stream, discarding the output.
pub fn build_zinfo<R: Read>(source: R, opts: BuilderOptions) -> Result<BuiltZinfo, GzipError> {
    ZinfoBuilder::new(source, opts)?.finish()
}
