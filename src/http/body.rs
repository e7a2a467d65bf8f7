//! Reading bodies with caps: an untrusted server decides how many bytes it
//! sends, never how many we hold.

use bytes::{Bytes, BytesMut};

use super::error::{error_chain, HttpError};

/// Reads exactly `want` bytes. A longer body (or a Content-Length saying so)
/// is a permanent error and is not read further; a shorter one is transient.
pub async fn read_exact(mut resp: reqwest::Response, want: u64) -> Result<Bytes, HttpError> {
    if let Some(len) = resp.content_length() {
        if len != want {
            return Err(HttpError::Permanent(format!("Content-Length {len}, expected {want}")));
        }
    }
    let cap = usize::try_from(want).map_err(|_| HttpError::Permanent("range too large".into()))?;
    let mut buf = BytesMut::with_capacity(cap);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > cap {
                    return Err(HttpError::Permanent(format!("body longer than the {want} bytes asked")));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(HttpError::Transient(format!(
                    "body read failed after {} of {want} bytes: {}",
                    buf.len(),
                    error_chain(&e)
                )))
            }
        }
    }
    if buf.len() != cap {
        return Err(HttpError::Transient(format!("short body: {} of {want} bytes", buf.len())));
    }
    Ok(buf.freeze())
}

/// Reads a whole body of at most `cap` bytes.
pub async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, HttpError> {
    if resp.content_length().is_some_and(|l| l > cap as u64) {
        return Err(HttpError::Permanent(format!("response larger than {cap} bytes")));
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > cap {
                    return Err(HttpError::Permanent(format!("response larger than {cap} bytes")));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(HttpError::Transient(format!("response cut short: {}", error_chain(&e)))),
        }
    }
}
