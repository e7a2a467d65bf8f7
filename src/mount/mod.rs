//! Mount front end pieces: option parsing (pure) lives here; the syscalls
//! live in `crate::sys::mount`.

pub mod options;

pub use options::{MountOptions, OptionError};
pub mod mountinfo;
