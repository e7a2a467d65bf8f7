//! `erofs-fanotify trace MOUNTPOINT [--output FILE] [--reset]`: the byte
//! ranges readers of this mount's image asked for, in the format that
//! `-o prefetch_trace=FILE` replays on a later mount.

use std::path::{Path, PathBuf};
use std::time::Duration;


use crate::agent::protocol::{Reply, Request};
use crate::agent::trace::format_trace;

use super::client::AgentConn;
use super::CliError;

pub fn run(mountpoint: &Path, output: Option<PathBuf>, reset: bool) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let record = super::find_record(&state_dir, mountpoint)?;
    let mut conn = AgentConn::connect(&record.control_socket, Duration::from_secs(10))
        .map_err(|e| CliError::new(format!("the agent of {} is unreachable: {e}", mountpoint.display())))?;
    let (digest, blob_size, ranges) = match conn.call(&Request::Trace { reset }) {
        Ok(Reply::Trace { digest, blob_size, ranges }) => (digest, blob_size, ranges),
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    let ranges: Vec<std::ops::Range<u64>> = ranges.into_iter().map(|[a, b]| a..b).collect();
    let text = format_trace(digest.as_deref(), blob_size, &ranges);
    match output {
        Some(path) => std::fs::write(&path, text)
            .map_err(|e| CliError::new(format!("cannot write {}: {e}", path.display()))),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
