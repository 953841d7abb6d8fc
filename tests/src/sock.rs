//! The registration socket from the client side, and the agent's memory:
//! shared by the registry and faults suites.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// One connection to the registration socket, speaking the protocol.
pub struct SockClient {
    pub stream: UnixStream,
    pub reader: BufReader<UnixStream>,
}

impl SockClient {
    pub fn connect(socket: &Path, timeout: Duration) -> std::io::Result<SockClient> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(SockClient { stream, reader })
    }

    /// Sends one request line and reads one reply line.
    pub fn call_raw(&mut self, line: &str) -> std::io::Result<Value> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\n")?;
        self.read_reply()
    }

    pub fn read_reply(&mut self) -> std::io::Result<Value> {
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply)?;
        if n == 0 || !reply.ends_with('\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed; got {reply:?}"),
            ));
        }
        serde_json::from_str(&reply).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("reply is not JSON ({e}): {reply:?}"))
        })
    }
}

/// One request on a new connection; panics with context on any failure.
pub fn sock_request(socket: &Path, req: &Value) -> Value {
    let mut c = SockClient::connect(socket, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    c.call_raw(&req.to_string()).unwrap_or_else(|e| panic!("request {req} on {}: {e}", socket.display()))
}
