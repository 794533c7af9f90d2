//! Process mode: the node's coordinator socket, a Unix stream socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Channel, ChannelError, MAX_LINE};

/// A connection to the socket at `path`, made on first use.
#[derive(Debug)]
pub struct UnixChannel {
    path: PathBuf,
    stream: Option<BufReader<UnixStream>>,
}

impl UnixChannel {
    pub fn new(path: PathBuf) -> Self {
        Self { path, stream: None }
    }

    fn stream(&mut self) -> Result<&mut BufReader<UnixStream>, ChannelError> {
        if self.stream.is_none() {
            let stream = UnixStream::connect(&self.path).map_err(|source| ChannelError::Open {
                what: self.path.display().to_string(),
                source,
            })?;
            self.stream = Some(BufReader::new(stream));
        }
        self.stream.as_mut().ok_or(ChannelError::Closed)
    }
}

/// What is left until `deadline`; an error once it has passed (a zero timeout would mean
/// "none" to the socket).
fn remaining(deadline: Instant) -> Result<Duration, ChannelError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ChannelError::Timeout)
    } else {
        Ok(left)
    }
}

fn io_error(error: std::io::Error) -> ChannelError {
    match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ChannelError::Timeout,
        _ => ChannelError::Io(error),
    }
}

impl Channel for UnixChannel {
    fn send_line(&mut self, line: &str, deadline: Instant) -> Result<(), ChannelError> {
        let left = remaining(deadline)?;
        let stream = self.stream()?.get_mut();
        stream
            .set_write_timeout(Some(left))
            .map_err(ChannelError::Io)?;
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        stream.write_all(&bytes).map_err(io_error)
    }

    fn read_line(&mut self, deadline: Instant) -> Result<String, ChannelError> {
        let left = remaining(deadline)?;
        let reader = self.stream()?;
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(ChannelError::Io)?;
        let mut line = String::new();
        // One more byte than allowed tells a line too long from one just long enough.
        let read = reader
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(io_error)?;
        if read == 0 {
            return Err(ChannelError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(if read > MAX_LINE {
                ChannelError::TooLong
            } else {
                ChannelError::Closed
            });
        }
        line.pop();
        Ok(line)
    }

    fn reset(&mut self) {
        self.stream = None;
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// Lines go both ways; a server that closes is an error, and the next call connects
    /// again.
    #[test]
    fn lines_go_both_ways_and_a_closed_server_is_reconnected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coord-a.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for reply in ["{\"one\":1}", ""] {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if !reply.is_empty() {
                    let mut stream = reader.into_inner();
                    stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
                }
                // The connection closes here.
            }
        });
        let mut channel = UnixChannel::new(path);
        let deadline = || Instant::now() + Duration::from_secs(5);
        channel.send_line("{}", deadline()).unwrap();
        assert_eq!(channel.read_line(deadline()).unwrap(), "{\"one\":1}");
        assert!(matches!(
            channel.read_line(deadline()),
            Err(ChannelError::Closed)
        ));
        channel.reset();
        channel.send_line("{}", deadline()).unwrap();
        assert!(matches!(
            channel.read_line(deadline()),
            Err(ChannelError::Closed)
        ));
        server.join().unwrap();
        channel.reset();
        assert!(matches!(
            channel.send_line("{}", deadline()),
            Err(ChannelError::Open { .. })
        ));
    }

    /// A server that says nothing: the read ends at the deadline.
    #[test]
    fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coord-a.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let mut channel = UnixChannel::new(path);
        channel
            .send_line("{}", Instant::now() + Duration::from_secs(1))
            .unwrap();
        let started = Instant::now();
        assert!(matches!(
            channel.read_line(Instant::now() + Duration::from_millis(100)),
            Err(ChannelError::Timeout)
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
