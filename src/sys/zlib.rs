//! A safe inflate stream over `libz-rs-sys` (zlib-rs, pure Rust, the zlib C
//! API).
//!
//! The gzip random-access code needs what `flate2` does not offer:
//! `inflatePrime` (resume mid-byte), `inflateSetDictionary` on a raw stream,
//! `Z_BLOCK` (stop at deflate block ends) and the `data_type` bits that say
//! where a block ended. The C API is pointer-based, so it lives here, the one
//! place with `unsafe`. Every call hands zlib the caller's slices for that
//! call only; no pointer into caller memory outlives a call.

use std::ffi::c_int;
use std::fmt;

use libz_rs_sys as z;

/// `windowBits` for a raw deflate stream (no header or trailer).
pub const RAW: c_int = -15;
/// `windowBits` for a gzip stream (header and trailer checked).
pub const GZIP: c_int = 15 + 16;
/// `windowBits` for automatic zlib or gzip detection (what gzran.c uses).
pub const AUTO: c_int = 15 + 32;

/// How far one [`Inflate::inflate`] call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// `Z_NO_FLUSH`: as far as input and output allow.
    None,
    /// `Z_BLOCK`: also stop after each deflate block (and after the header).
    Block,
}

/// How an `inflate` call ended (errors are [`ZlibError`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Progress made, the stream goes on.
    Ok,
    /// The end of the (gzip, zlib or raw deflate) stream was reached.
    StreamEnd,
    /// No progress possible: more input or more output space is needed.
    NoProgress,
}

/// The result of one `inflate` call.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub status: Status,
    /// Bytes of `input` consumed.
    pub consumed: usize,
    /// Bytes written to the start of `output`.
    pub produced: usize,
    /// zlib's `data_type`: unused bits in the last input byte (0..=7), +64
    /// while in the last block, +128 right after a block end or the header.
    pub data_type: c_int,
}

/// A zlib error, with zlib's message when it gave one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZlibError {
    pub code: c_int,
    pub message: String,
}

impl fmt::Display for ZlibError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.code {
            z::Z_DATA_ERROR => "corrupt deflate data",
            z::Z_NEED_DICT => "stream needs a preset dictionary",
            z::Z_MEM_ERROR => "out of memory",
            z::Z_STREAM_ERROR => "inconsistent stream state",
            z::Z_VERSION_ERROR => "zlib version mismatch",
            _ => "zlib error",
        };
        if self.message.is_empty() {
            write!(f, "{what} (zlib code {})", self.code)
        } else {
            write!(f, "{what}: {}", self.message)
        }
    }
}

impl std::error::Error for ZlibError {}

/// An inflate stream. The `z_stream` is boxed: zlib keeps a pointer back to
/// it in its state, so it must not move after init.
pub struct Inflate {
    strm: Box<z::z_stream>,
}

// SAFETY (for the Send impl): the stream owns its state exclusively, holds no
// pointer to caller memory between calls (see `inflate`), and zlib-rs
// allocates with the Rust allocator; nothing in it is tied to a thread.
unsafe impl Send for Inflate {}

impl Inflate {
    /// `inflateInit2(window_bits)`: [`RAW`], [`GZIP`] or [`AUTO`].
    pub fn new(window_bits: c_int) -> Result<Self, ZlibError> {
        let mut strm = Box::<z::z_stream>::default();
        let size = c_int::try_from(std::mem::size_of::<z::z_stream>()).unwrap_or(c_int::MAX);
        // SAFETY: `strm` is a valid, default-initialised z_stream (null
        // zalloc/zfree select the Rust allocator); the version string is a
        // static NUL-terminated C string from the same library.
        let ret = unsafe { z::inflateInit2_(&mut *strm, window_bits, z::zlibVersion(), size) };
        if ret != z::Z_OK {
            return Err(ZlibError {
                code: ret,
                message: String::new(),
            });
        }
        Ok(Inflate { strm })
    }

    /// `inflateReset2`: start a new stream (e.g. the next gzip member),
    /// possibly with other window bits.
    pub fn reset(&mut self, window_bits: c_int) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by `new` and is not moved.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        self.check(ret)
    }

    /// `inflatePrime`: inserts the low `bits` bits of `value` into the input.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by `new`.
        let ret =
            unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), c_int::from(value)) };
        self.check(ret)
    }

    /// `inflateSetDictionary`: the preceding window of a raw stream.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), ZlibError> {
        let len = u32::try_from(dict.len()).map_err(|_| ZlibError {
            code: z::Z_STREAM_ERROR,
            message: "dictionary too large".into(),
        })?;
        // SAFETY: `dict` is a valid slice of `len` bytes for the duration of
        // the call; zlib copies it into its own window.
        let ret = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        self.check(ret)
    }

    /// One `inflate` call over `input` into `output` (each capped at 4 GiB
    /// per call; the caller loops on `consumed`/`produced`).
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: Flush,
    ) -> Result<Step, ZlibError> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        // zlib-rs refuses a null `next_out`; an empty slice still has a
        // dangling, non-null pointer, which is fine for zero bytes.
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        let flush = match flush {
            Flush::None => z::Z_NO_FLUSH,
            Flush::Block => z::Z_BLOCK,
        };
        // SAFETY: next_in/avail_in and next_out/avail_out describe the
        // caller's live slices (`in_len <= input.len()`,
        // `out_len <= output.len()`) for this call only; the pointers are
        // cleared below before the borrows end.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let status = match ret {
            z::Z_OK => Status::Ok,
            z::Z_STREAM_END => Status::StreamEnd,
            z::Z_BUF_ERROR => Status::NoProgress,
            _ => return Err(self.error(ret)),
        };
        Ok(Step {
            status,
            consumed,
            produced,
            data_type: self.strm.data_type,
        })
    }

    fn check(&self, ret: c_int) -> Result<(), ZlibError> {
        if ret == z::Z_OK {
            Ok(())
        } else {
            Err(self.error(ret))
        }
    }

    fn error(&self, code: c_int) -> ZlibError {
        let message = if self.strm.msg.is_null() {
            String::new()
        } else {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        };
        ZlibError { code, message }
    }
}

impl Drop for Inflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is ended once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_stream_of_stored_block_inflates() {
        // A final stored block holding "hello".
        let raw = [0x01, 0x05, 0x00, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o'];
        let mut inf = Inflate::new(RAW).unwrap();
        let mut out = [0u8; 16];
        let step = inf.inflate(&raw, &mut out, Flush::None).unwrap();
        assert_eq!(step.status, Status::StreamEnd);
        assert_eq!(&out[..step.produced], b"hello");
        assert_eq!(step.consumed, raw.len());
    }

    #[test]
    fn corrupt_data_is_an_error() {
        // Block type 3 is invalid.
        let mut inf = Inflate::new(RAW).unwrap();
        let mut out = [0u8; 16];
        let err = inf
            .inflate(&[0x07, 0, 0, 0], &mut out, Flush::None)
            .unwrap_err();
        assert_eq!(err.code, z::Z_DATA_ERROR);
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn no_input_is_no_progress() {
        let mut inf = Inflate::new(GZIP).unwrap();
        let mut out = [0u8; 4];
        let step = inf.inflate(&[], &mut out, Flush::None).unwrap();
        assert_eq!(step.status, Status::NoProgress);
    }
}
