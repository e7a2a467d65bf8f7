//! gzip random access: zinfo checkpoints (erofs-utils `gzran.c`, SOCI
//! `gzip_zinfo` v2), a streaming builder, and span inflation.
//!
//! A tar+gzip layer becomes a lazily readable tar through a zinfo: every
//! ~4 MiB of uncompressed output (and at every gzip member start), a
//! checkpoint records where the deflate stream can be resumed and the 32 KiB
//! of history it needs. To read uncompressed bytes, fetch the compressed
//! bytes of the spans that hold them ([`Zinfo::span_input_range`]) and
//! inflate each span whole ([`inflate_span`]).
//!
//! - [`zinfo`]: the file format, parsing (untrusted) and span arithmetic.
//! - [`builder`]: [`ZinfoBuilder`], a `Read` adapter over a gzip stream that
//!   yields the uncompressed bytes and records checkpoints byte-compatibly
//!   with erofs-utils.
//! - [`span`] inflates one span: [`inflate_span`].

pub mod builder;
pub mod span;
pub mod zinfo;

#[cfg(test)]
mod tests;

pub use builder::{build_zinfo, BuilderOptions, BuiltZinfo, ZinfoBuilder};
pub use span::{inflate_span, inflate_span_into, span_digests, MAX_SPAN_OUTPUT};
pub use zinfo::{Checkpoint, Zinfo, CHECKPOINT_SIZE, DEFAULT_SPAN_SIZE, HEADER_SIZE, WINDOW_SIZE};

use crate::sys::zlib::ZlibError;

/// A zinfo file that fails its checks, or a span asked for that it lacks.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ZinfoError {
    #[error("zinfo too short: {0} bytes (the header alone is 12)")]
    TooShort(usize),
    #[error("zinfo of {len} bytes does not hold the {count} checkpoints its header counts")]
    SizeMismatch { len: u64, count: u64 },
    #[error("zinfo version 1 (first checkpoint implied) is not supported")]
    Version1,
    #[error("zinfo has no checkpoints")]
    Empty,
    #[error("zinfo span size {0} is not in 1..=2^32-1")]
    BadSpanSize(u64),
    #[error("zinfo has more than {0} checkpoints")]
    TooManyCheckpoints(u64),
    #[error("zinfo checkpoint {index}: {what}")]
    BadCheckpoint { index: usize, what: &'static str },
    #[error("zinfo checkpoint {index} resumes at compressed byte {in_offset}, past the {blob_size}-byte blob")]
    PastBlob {
        index: usize,
        in_offset: u64,
        blob_size: u64,
    },
    #[error("zinfo span {index} reaches uncompressed byte {out_offset}, past the {total_out}-byte stream")]
    PastStream {
        index: usize,
        out_offset: u64,
        total_out: u64,
    },
    #[error("zinfo span {span} does not exist ({spans} spans)")]
    NoSuchSpan { span: usize, spans: usize },
}

/// Building a zinfo or inflating a span failed.
#[derive(thiserror::Error, Debug)]
pub enum GzipError {
    #[error("reading the gzip stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a gzip stream: {0}")]
    NotGzip(String),
    #[error("corrupt gzip stream near compressed byte {at_in}: {source}")]
    Zlib { at_in: u64, source: ZlibError },
    #[error("gzip stream ends inside a member (truncated)")]
    Truncated,
    #[error("more than {0} zinfo checkpoints (raise max_checkpoints)")]
    TooManyCheckpoints(u64),
    #[error("bad zinfo builder options: {0}")]
    BadOptions(String),
    #[error(transparent)]
    Zinfo(#[from] ZinfoError),
    #[error("span {span}: corrupt compressed data: {source}")]
    SpanData { span: usize, source: ZlibError },
    #[error("span {span}: compressed input ends before the span does")]
    ShortInput { span: usize },
    #[error("span {span}: {got} uncompressed bytes where the zinfo says {expected}")]
    OutputLength {
        span: usize,
        expected: u64,
        got: u64,
    },
    #[error("span {span}: {bytes} uncompressed bytes is more than one span may hold")]
    SpanTooLarge { span: usize, bytes: u64 },
    #[error("{0}")]
    Failed(String),
}

impl From<ZlibError> for GzipError {
    fn from(e: ZlibError) -> Self {
        GzipError::Zlib {
            at_in: 0,
            source: e,
        }
    }
}
