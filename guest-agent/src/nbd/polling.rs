//! A socket reader that polls briefly before it blocks.
//!
//! A client at queue depth 1 sends its next request a few microseconds after it read the
//! last reply. A server thread that blocked in `recv` meanwhile must be woken for it, and
//! on a virtual machine whose idle vCPUs halt, a cross-CPU wakeup costs more than the
//! request itself. Trying the socket without blocking for a short while first (the
//! userspace form of the kernel's busy polling) keeps such a thread on its CPU and answers
//! the next request without a wakeup. The poll ends as soon as data arrives, and the
//! thread blocks as before once the budget is spent: an idle client costs one budget per
//! idle period, not more.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};

/// Reads a TCP stream, polling up to `budget` before each blocking read.
#[derive(Debug)]
pub struct PollingReader {
    stream: Arc<TcpStream>,
    budget: Duration,
}

impl PollingReader {
    /// `budget` zero: a plain blocking reader. The stream may be shared (its writer and
    /// reader halves are the same socket).
    pub fn new(stream: Arc<TcpStream>, budget: Duration) -> Self {
        Self { stream, budget }
    }
}

impl Read for PollingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.budget.is_zero() && !buf.is_empty() {
            let started = Instant::now();
            loop {
                match recv(self.stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) => return Ok(n),
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(errno) => return Err(errno.into()),
                }
                if started.elapsed() >= self.budget {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        (&*self.stream).read(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    fn pair(budget: Duration) -> (PollingReader, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (PollingReader::new(Arc::new(server), budget), client)
    }

    #[test]
    fn data_sent_during_the_poll_is_read() {
        let (mut reader, mut client) = pair(Duration::from_secs(5));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"request").unwrap();
            client
        });
        let mut buf = [0u8; 16];
        let started = Instant::now();
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"request");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "polled past the data"
        );
        drop(sender.join().unwrap());
    }

    #[test]
    fn after_the_budget_it_blocks_until_data_comes() {
        let (mut reader, mut client) = pair(Duration::from_micros(50));
        let sender = std::thread::spawn(move || {
            // Well past the budget: the reader must be blocked, not failing with EAGAIN.
            std::thread::sleep(Duration::from_millis(100));
            client.write_all(b"late").unwrap();
            client
        });
        let mut buf = [0u8; 16];
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"late");
        drop(sender.join().unwrap());
    }

    #[test]
    fn a_closed_peer_reads_as_end_of_file_with_and_without_polling() {
        for budget in [Duration::ZERO, Duration::from_millis(10)] {
            let (mut reader, client) = pair(budget);
            drop(client);
            let mut buf = [0u8; 16];
            assert_eq!(reader.read(&mut buf).unwrap(), 0, "budget {budget:?}");
        }
    }
}
