//! `erofs-fanotify trace MOUNTPOINT [--start | --output FILE] [--reset] [--stop]`:
//! the byte ranges readers of this mount's image asked for while a trace was
//! recorded (`--start`, or `-o record_trace` from the mount on), in the
//! format that `-o prefetch_trace=FILE` replays on a later mount.

use std::path::{Path, PathBuf};
use std::time::Duration;


use crate::agent::protocol::{Reply, Request};
use crate::agent::trace::format_trace;

use super::client::AgentConn;
use super::CliError;

pub fn run(mountpoint: &Path, output: Option<PathBuf>, reset: bool, recording_wanted: Option<bool>) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let record = super::find_record(&state_dir, mountpoint)?;
    let mut conn = AgentConn::connect(&record.control_socket, Duration::from_secs(10))
        .map_err(|e| CliError::new(format!("the agent of {} is unreachable: {e}", mountpoint.display())))?;
    let (digest, blob_size, ranges, recording) = match conn.call(&Request::Trace { reset, record: recording_wanted }) {
        Ok(Reply::Trace { digest, blob_size, ranges, recording }) => (digest, blob_size, ranges, recording),
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    if recording_wanted == Some(true) {
        eprintln!("erofs-fanotify: recording a trace of {}; `erofs-fanotify trace {} -o FILE` saves it", mountpoint.display(), mountpoint.display());
        return Ok(());
    }
    if ranges.is_empty() && !recording && recording_wanted.is_none() {
        eprintln!("erofs-fanotify: no trace is being recorded for {}: start one with --start (or mount with -o record_trace)", mountpoint.display());
    }
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
