//! `erofs-fanotify prefetch MOUNTPOINT [--all | --trace FILE | --files FILE] [--rate SIZE] [--wait]`:
//! background prefetch for a live mount; with `--wait`, a progress bar on
//! the terminal until it is done.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;


use crate::agent::protocol::{Reply, Request, MountStatus};
use crate::mount::options::parse_size;

use super::client::AgentConn;
use super::CliError;

pub struct PrefetchArgs {
    pub mountpoint: PathBuf,
    pub all: bool,
    pub trace: Option<PathBuf>,
    pub files: Option<PathBuf>,
    pub rate: Option<String>,
    pub wait: bool,
}

pub fn run(args: PrefetchArgs) -> Result<(), CliError> {
    let state_dir = super::state_dir();
    let record = super::find_record(&state_dir, &args.mountpoint)?;
    let rate = match &args.rate {
        Some(r) => Some(parse_size(r).filter(|&n| n > 0).ok_or_else(|| CliError::new(format!("bad rate {r:?}")))?),
        None => None,
    };
    let mut opts = crate::mount::MountOptions { prefetch_all: args.all, ..Default::default() };
    opts.prefetch_trace = args.trace.clone();
    opts.prefetch_files = args.files.clone();
    let mut ranges = super::mount_cmd::read_prefetch_trace(&opts)?;
    let paths = super::mount_cmd::read_prefetch_files(&opts)?;
    ranges.extend(super::mount_cmd::extents_of(&args.mountpoint, &paths));
    if !args.all && ranges.is_empty() {
        return Err(CliError::new("nothing to prefetch: give --all, --trace FILE or --files FILE"));
    }
    let mut conn = AgentConn::connect(&record.control_socket, Duration::from_secs(10))
        .map_err(|e| CliError::new(format!("the agent is unreachable: {e}")))?;
    let missing = match conn.call(&Request::Prefetch { all: args.all, ranges, rate }) {
        Ok(Reply::Prefetching { bytes }) => bytes,
        Ok(other) => return Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => return Err(CliError::new(format!("the agent does not answer: {e}"))),
    };
    if !args.wait {
        println!("prefetching {missing} bytes in the background");
        return Ok(());
    }
    wait_with_progress(&mut conn, &args.mountpoint, missing)
}

fn stats(conn: &mut AgentConn) -> Result<MountStatus, CliError> {
    match conn.call(&Request::Stats) {
        Ok(Reply::Stats(s)) => Ok(*s),
        Ok(other) => Err(CliError::new(format!("unexpected agent reply {other:?}"))),
        Err(e) => Err(CliError::new(format!("the agent does not answer: {e}"))),
    }
}

fn wait_with_progress(conn: &mut AgentConn, mountpoint: &Path, missing: u64) -> Result<(), CliError> {
    let tty = std::io::stderr().is_terminal();
    let start = stats(conn)?.prefetched_bytes;
    // The prefetch task may not have started when the first poll comes.
    std::thread::sleep(Duration::from_millis(100));
    loop {
        let s = stats(conn)?;
        let done = s.prefetched_bytes.saturating_sub(start).min(missing);
        if tty {
            eprint!("\r{}", progress_line(done, missing));
            let _ = std::io::stderr().flush();
        }
        if !s.prefetch_active {
            if tty {
                eprintln!();
            }
            println!(
                "{}: {} of {} bytes present ({})",
                mountpoint.display(),
                s.populated_bytes,
                s.blob_size,
                s.state
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `[#########           ]  45%  12.3/27.1 MiB`
pub fn progress_line(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let frac = if total == 0 { 1.0 } else { done as f64 / total as f64 };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "[{}{}] {:3.0}%  {:.1}/{:.1} MiB",
        "#".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
        frac * 100.0,
        mib(done),
        mib(total)
    )
}

#[cfg(test)]
mod tests {
    use super::progress_line;

    #[test]
    fn progress_bar_fills() {
        assert!(progress_line(0, 100).starts_with("[          "));
        assert!(progress_line(100, 100).contains("100%"));
        assert!(progress_line(50, 100).contains(" 50%"));
        assert!(progress_line(5, 0).contains("100%"));
    }
}
