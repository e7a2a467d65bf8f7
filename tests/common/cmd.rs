//! Running a command with a deadline and capturing its output.
//!
//! The binaries under test start daemons. A daemon that keeps the caller's stdout/stderr open makes every
//! `$(erofs-mount ...)` and every runtime hook that reads the output hang, so `run` treats "the command
//! exited but its pipes stayed open" as a failure instead of waiting forever.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a finished command did.
#[derive(Debug)]
pub struct Outcome {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Panics (with everything useful) unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }

    pub fn describe(&self) -> String {
        format!(
            "`{}` -> {} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            self.elapsed,
            String::from_utf8_lossy(&self.stdout).trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `cmd` (stdin from /dev/null) and waits up to `timeout`; on timeout the child is killed by pid and
/// the test panics. Also panics when the child exited but something it spawned still holds its stdio.
pub fn run(cmd: &mut Command, timeout: Duration) -> Outcome {
    let command = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {command}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = start + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let err = stderr
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default();
                panic!(
                    "`{command}` did not finish within {timeout:?}; killed. stderr so far:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    let elapsed = start.elapsed();
    let pipe_grace = Duration::from_secs(5);
    let stdout = stdout.recv_timeout(pipe_grace).unwrap_or_else(|_| {
        panic!("`{command}` exited ({status}) but its stdout stayed open: a process it started (the agent?) kept the caller's stdout")
    });
    let stderr = stderr.recv_timeout(pipe_grace).unwrap_or_else(|_| {
        panic!("`{command}` exited ({status}) but its stderr stayed open: a process it started (the agent?) kept the caller's stderr")
    });
    Outcome {
        command,
        status,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Sends `signal` to `pid` (errors ignored: the process may be gone already).
pub fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}
