//! The client side of the project's control sockets: one JSON request line, one JSON
//! answer line, over a Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Sends `request` to the socket at `path` and reads the answer; `peer` names the server
/// in the error a malformed answer gets.
pub fn call<Request: Serialize, Answer: DeserializeOwned>(
    path: &Path,
    request: &Request,
    timeout: Duration,
    peer: &str,
) -> std::io::Result<Answer> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(answer.trim()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed answer from {peer}: {e}"),
        )
    })
}
