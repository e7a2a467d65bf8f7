//! HTTP plumbing shared by every remote (plain URLs, registries, object
//! stores) and by the front ends: one way to build a client, to read a body
//! with a cap, to name an error, to map a status, to follow a redirect, and
//! to show a URL without its secrets.
//!
//! A leaf: it depends on no other module of this crate, so `remote` (range
//! sources) and `oci` (registries) both build on it without knowing each
//! other.

mod body;
mod client;
mod error;
pub mod multipart;
mod redirect;
mod url;

pub use body::{read_capped, read_exact};
pub use client::{build_client, ClientConfig};
pub use error::{error_chain, send_error, status_error, HttpError};
pub use redirect::{follow, origin, Answer, MAX_REDIRECTS};
pub use url::redact_url;
