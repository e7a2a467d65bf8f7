//! erofs-fanotify: lazy EROFS mounts backed by fanotify pre-content events.
//!
//! Boundaries: pure logic (`ranges`, `fanotify::event`, `erofs`, `mount::options`,
//! `cache::bitmap`) is kept apart from syscalls (`sys`) and I/O (`remote`, `agent`),
//! so most of it is unit-tested without root.
//!
//! `unsafe` lives in `sys` only (each block with a `// SAFETY:` line); the
//! rest of the crate cannot use it.
#![deny(unsafe_code)]

pub mod agent;
pub mod build;
pub mod cache;
pub mod cli;
pub mod erofs;
pub mod fanotify;
pub mod gzip;
pub mod http;
pub mod index;
pub mod mount;
pub mod oci;
pub mod ranges;
pub mod remote;
#[allow(unsafe_code)]
pub mod sys;
