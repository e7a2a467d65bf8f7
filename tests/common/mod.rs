//! Harness shared by the integration tests (each `tests/*.rs` file is its own crate and says `mod common;`).
//!
//! The tests run the real binaries against real mounts, so they need root, `mkfs.erofs`, Debian's
//! `docker-registry` and a kernel with fanotify pre-content events. `prereq::ready()` checks all of it:
//! a missing piece skips the test with a printed reason, except when `CI=true`, where it panics — a CI run
//! must never pass by skipping.
//!
//! Pieces:
//! - `prereq`: the prerequisite checks above.
//! - `registry::Registry`: a private `docker-registry serve` on 127.0.0.1 (push blobs/manifests, blob URLs);
//!   `registry::shared_blob()` pushes an image once per test binary to one shared registry.
//! - `fault_server::FaultServer`: an in-process HTTP/1.1 Range server with switchable faults
//!   (500s, resets mid-body, short bodies, stalls) and request/byte counters.
//! - `fixtures`: deterministic source trees (seeded PRNG) and their EROFS images (plain and lz4), built once
//!   and cached under `CARGO_TARGET_TMPDIR/fixtures/` keyed by a hash of the generator source, the tree
//!   spec and the mkfs.erofs version — reruns reuse them, any change to the generator rebuilds them.
//! - `env::TestEnv`: a private state dir, cache dir and mountpoints under /var/tmp (ext4) per test, torn down
//!   on drop together with anything the test left mounted or running; `env::Mounted` unmounts on drop.
//! - `tree`: `assert_tree_identical` (bytes, symlink targets, modes, owners, user.* xattrs) and mmap reads.
//! - `cmd`: running a command with a timeout, and insisting that spawned daemons do not hold its stdio.
//! - `http`: a tiny blocking HTTP/1.1 client for loopback use (the registry and the fault server).
//! - `http_server`: a tiny in-process HTTP/1.1 server driven by a closure (token server, redirecting proxy,
//!   a "CDN" for redirected blobs), with a request log.
//! - `token_server`: the Docker registry token protocol (JWTs signed with openssl) for `auth: token`.
//! - `oci`: small distinct EROFS images, pushing manifests and indexes, `OciEnv` (mounts with
//!   `oci.insecure` and an isolated credential environment), error assertions.
#![allow(dead_code)]

pub mod cmd;
pub mod env;
pub mod erofs_tree;
pub mod fault_server;
pub mod fixtures;
pub mod http;
pub mod http_server;
pub mod moto;
pub mod multipart_server;
pub mod oci;
pub mod prereq;
pub mod readers;
pub mod registry;
pub mod token_server;
pub mod tree;
pub mod wait;

use std::time::Duration;

#[allow(unused_imports)]
pub use env::{MountStatus, Mounted, TestEnv};
#[allow(unused_imports)]
pub use prereq::{oci_ready, ready, require, Need};

/// The binaries under test (built by cargo for integration tests).
pub const EROFS_MOUNT: &str = env!("CARGO_BIN_EXE_erofs-mount");
pub const EROFS_UMOUNT: &str = env!("CARGO_BIN_EXE_erofs-umount");
pub const EROFS_FANOTIFY: &str = env!("CARGO_BIN_EXE_erofs-fanotify");

/// Overrides the state root (/run/erofs-fanotify); every test uses its own.
pub const STATE_DIR_ENV: &str = "EROFS_FANOTIFY_STATE_DIR";

/// How long an agent may take to notice that its mount went away, exit and remove its record.
/// The contract says "a few seconds"; the margin is for a loaded 2-core CI machine.
pub const GONE_TIMEOUT: Duration = Duration::from_secs(6);

/// Upper bound for any single command of the binaries under test (a mount of a 100+ MiB image included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub const MIB: u64 = 1024 * 1024;

/// The end of the metadata run `erofs-fanotify build` prints (`... metadata N bytes in one range [0, END) ...`).
pub fn built_metadata_end(build_output: &str) -> u64 {
    build_output
        .split("one range [0, ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no metadata range in the build's output {build_output:?}"))
}
