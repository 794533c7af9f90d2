//! A small blocking NBD client, used by the fault campaign's workload and by tests: fixed
//! newstyle handshake, `NBD_OPT_GO`, simple replies, one request in flight at a time. Names follow the NBD specification
//! (`doc/proto.md` in the NetworkBlockDevice/nbd repository). Everything is big-endian.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use wire::nbd::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPT_GO,
    OPTION_REPLY_MAGIC, REP_ACK, REP_FLAG_ERROR, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
/// Transmission flags (from `NBD_INFO_EXPORT`).
pub use wire::nbd::{FLAG_SEND_FLUSH, FLAG_SEND_FUA};

/// Longest option reply payload we accept.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// The server answered a transmission request with a non-zero error (an errno value).
/// Wrapped in an `io::Error`; see [`reply_errno`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdReplyError {
    pub command: &'static str,
    pub errno: u32,
}

impl fmt::Display for NbdReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NBD {} failed: server error errno {}",
            self.command, self.errno
        )
    }
}

impl std::error::Error for NbdReplyError {}

/// The errno of an error *reply* (the server answered), or None for any other error
/// (connection cut, timeout, protocol violation: the outcome of the request is unknown).
pub fn reply_errno(error: &io::Error) -> Option<u32> {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<NbdReplyError>())
        .map(|e| e.errno)
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn read_array<const N: usize>(stream: &mut impl Read) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    read_array(s).map(u16::from_be_bytes)
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    read_array(s).map(u32::from_be_bytes)
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    read_array(s).map(u64::from_be_bytes)
}

/// One connection to one export, in transmission phase. `S` is the connection: a
/// `TcpStream` but for tests and fuzzing ([`NbdClient::negotiate`]).
#[derive(Debug)]
pub struct NbdClient<S = TcpStream> {
    stream: S,
    size: u64,
    transmission_flags: u16,
    next_cookie: u64,
    /// Set after an I/O or protocol error: the stream is out of step, refuse further use.
    broken: bool,
}

impl NbdClient {
    /// Connects, negotiates `export` with `NBD_OPT_GO`, and enters transmission. `timeout`
    /// bounds the connect and every later read and write on the socket.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        NbdClient::negotiate(stream, export, &addr.to_string())
    }

    /// The connection's own address and the server's.
    pub fn addresses(&self) -> io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.stream.local_addr()?, self.stream.peer_addr()?))
    }

    /// Sends `NBD_CMD_DISC` (which has no reply) and closes the connection; errors are ignored.
    pub fn disconnect(mut self) {
        if !self.broken {
            let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl<S: Read + Write> NbdClient<S> {
    /// Negotiates `export` with `NBD_OPT_GO` on a fresh connection to the server `addr`
    /// (named in errors only) and enters transmission.
    pub fn negotiate(mut stream: S, export: &str, addr: &str) -> io::Result<Self> {
        let (magic, opt_magic) = (read_u64(&mut stream)?, read_u64(&mut stream)?);
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(protocol_error(format!(
                "{addr}: not a newstyle NBD server (magic {magic:#x}, {opt_magic:#x})"
            )));
        }
        let server_flags = read_u16(&mut stream)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol_error(format!(
                "{addr}: server does not speak fixed newstyle (flags {server_flags:#x})"
            )));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO: name length, name, no information requests (NBD_INFO_EXPORT comes anyway).
        let name_len = u32::try_from(export.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "export name too long"))?;
        let mut option = Vec::with_capacity(16 + 6 + export.len());
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(name_len + 6).to_be_bytes());
        option.extend_from_slice(&name_len.to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option)?;

        let mut export_info = None;
        loop {
            let magic = read_u64(&mut stream)?;
            let opt = read_u32(&mut stream)?;
            let reply = read_u32(&mut stream)?;
            let len = read_u32(&mut stream)?;
            if magic != OPTION_REPLY_MAGIC || opt != OPT_GO || len > MAX_OPTION_REPLY {
                return Err(protocol_error(format!(
                    "export {export:?}: bad option reply (magic {magic:#x}, option {opt}, length {len})"
                )));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data)?;
            match reply {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    if data.len() != 12 {
                        return Err(protocol_error(format!(
                            "export {export:?}: NBD_INFO_EXPORT of length {}",
                            data.len()
                        )));
                    }
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&data[2..10]);
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export_info = Some((u64::from_be_bytes(size), flags));
                }
                REP_INFO => {} // Other information (name, description, block sizes): not needed.
                r if r & REP_FLAG_ERROR != 0 => {
                    return Err(io::Error::other(format!(
                        "NBD_OPT_GO for export {export:?} refused: error {} ({:#x}){}{}",
                        r & !REP_FLAG_ERROR,
                        r,
                        if data.is_empty() { "" } else { ": " },
                        String::from_utf8_lossy(&data)
                    )));
                }
                r => {
                    return Err(protocol_error(format!(
                        "export {export:?}: unexpected option reply type {r:#x}"
                    )));
                }
            }
        }
        let (size, transmission_flags) = export_info.ok_or_else(|| {
            protocol_error(format!(
                "export {export:?}: NBD_REP_ACK without NBD_INFO_EXPORT"
            ))
        })?;
        Ok(NbdClient {
            stream,
            size,
            transmission_flags,
            next_cookie: 1,
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.request("read", CMD_READ, 0, offset, len, &[])?;
        let mut data = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut data)
            .inspect_err(|_| self.broken = true)?;
        Ok(data)
    }

    /// Writes `data`; with `fua`, the server makes it durable before replying.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write too large"))?;
        if fua && self.transmission_flags & FLAG_SEND_FUA == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "server does not offer FUA",
            ));
        }
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request("write", CMD_WRITE, flags, offset, len, data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.transmission_flags & FLAG_SEND_FLUSH == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "server does not offer flush",
            ));
        }
        self.request("flush", CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Sends a request and reads its simple reply header (a read's data is left to the caller).
    fn request(
        &mut self,
        command: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "NBD connection unusable after an earlier I/O or protocol error",
            ));
        }
        // Any failure below but an error reply leaves the stream out of step.
        self.broken = true;
        let cookie = self.send(kind, flags, offset, len, payload)?;
        let magic = read_u32(&mut self.stream)?;
        let errno = read_u32(&mut self.stream)?;
        let reply_cookie = read_u64(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol_error(format!(
                "NBD {command}: bad reply magic {magic:#x}"
            )));
        }
        if reply_cookie != cookie {
            return Err(protocol_error(format!(
                "NBD {command}: reply cookie {reply_cookie:#x}, expected {cookie:#x}"
            )));
        }
        self.broken = false;
        if errno != 0 {
            return Err(io::Error::other(NbdReplyError { command, errno }));
        }
        Ok(())
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut buf = Vec::with_capacity(28 + payload.len());
        buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&cookie.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf)?;
        Ok(cookie)
    }
}
