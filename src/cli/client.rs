//! Talking to an agent's control socket (synchronous; front ends are short-lived).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::agent::protocol::{Reply, Request};

pub struct AgentConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AgentConn {
    pub fn connect(socket: &Path, timeout: Duration) -> std::io::Result<AgentConn> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        Ok(AgentConn { reader: BufReader::new(stream), writer })
    }

    pub fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))
    }

    pub fn call(&mut self, req: &Request) -> std::io::Result<Reply> {
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "agent closed the connection"));
        }
        serde_json::from_str(answer.trim_end()).map_err(std::io::Error::other)
    }
}
