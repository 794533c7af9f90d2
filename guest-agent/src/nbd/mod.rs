//! The NBD server: serves the exports of an [`ExportRegistry`](crate::export::ExportRegistry)
//! over TCP.
//!
//! What it speaks (see `doc/proto.md` of the NBD project):
//!
//! * fixed newstyle negotiation only, with `NBD_FLAG_NO_ZEROES`; options
//!   `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO` and `NBD_OPT_GO`
//!   (always answered with `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`, and `NBD_INFO_NAME`
//!   when asked). Everything else, structured replies and TLS included, gets
//!   `NBD_REP_ERR_UNSUP`;
//! * simple replies only; commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM` and
//!   `WRITE_ZEROES` with the flags `FUA` and `NO_HOLE`. Exports advertise
//!   `NBD_FLAG_CAN_MULTI_CONN`: an [`Export`](crate::export::Export) must make a write visible
//!   to every connection once it is acknowledged.
//!
//! Each connection gets its own thread ([`server`]); within a connection requests are
//! executed and answered in order, by one reader and one writer, and replies are flushed to
//! the socket only when no further request is already buffered, so a client that pipelines
//! gets its replies in batches. See [`transmission`] for the error values chosen.
//!
//! A connection that breaks the protocol is closed; others are not affected.

pub mod handshake;
pub mod polling;
pub mod protocol;
pub mod server;
pub mod throttled_log;
pub mod transmission;

use std::io;

pub use server::{ConnectionCounters, Server, ServerConfig};

use protocol::OptionDataError;

/// Largest payload of one request this server ever handles, whatever an export says: the
/// maximum block size advertised is `min(export.max_request(), MAX_PAYLOAD)`. A write longer
/// than the advertised maximum but not longer than this is read, thrown away and answered with
/// `EINVAL`; a longer one closes the connection (the spec lets a server treat it as a denial
/// of service rather than read that much).
pub const MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

/// Why a connection was closed by the server (or found closed by the client).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Reading from or writing to the client failed (including the client going away).
    #[error("{context}")]
    Io {
        /// What the server was doing.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The client's flags lack `NBD_FLAG_C_FIXED_NEWSTYLE` or carry unknown bits.
    #[error(
        "the client sent flags {0:#x}: fixed newstyle is required and only the fixed-newstyle and no-zeroes bits are known"
    )]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("the client sent option magic {0:#018x} instead of IHAVEOPT")]
    OptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot be refused
    /// otherwise).
    #[error("the client chose export {0:?} with NBD_OPT_EXPORT_NAME, which is not served here")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` chose an export this connection may not use now (it cannot be
    /// refused otherwise).
    #[error("the client chose export {name:?} with NBD_OPT_EXPORT_NAME and was refused: {reason}")]
    Refused { name: String, reason: String },
    /// The client sent no request for the configured idle timeout.
    #[error("the client sent no request for {} s", .0.as_secs())]
    Idle(std::time::Duration),
    /// `NBD_OPT_EXPORT_NAME` carried a name that is too long or not a valid string.
    #[error("the client sent an unusable name with NBD_OPT_EXPORT_NAME")]
    ExportName(#[source] OptionDataError),
    /// A request did not start with the request magic: the stream is out of sync.
    #[error("the client sent request magic {0:#010x}: the stream is out of sync")]
    RequestMagic(u32),
    /// A write announced more payload than the server will ever read.
    #[error(
        "the client sent a write of {len} bytes, more than the {limit} bytes this server ever accepts"
    )]
    WriteTooLarge {
        /// The announced length.
        len: u32,
        /// [`MAX_PAYLOAD`].
        limit: u32,
    },
}

impl ConnectionError {
    /// True when a read timed out (the socket's receive timeout expired).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    /// True when the timeout expired before the first byte of a request: the client was
    /// idle (not slow in the middle of a request).
    pub fn is_idle(&self) -> bool {
        matches!(self, Self::Io { context, .. } if *context == WAITING_FOR_REQUEST)
            && self.is_timeout()
    }

    /// True when the client simply went away (end of stream, reset, broken pipe): worth a
    /// debug line, not a warning.
    pub fn is_hang_up(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// What a transmission connection does between requests (see [`ConnectionError::is_idle`]).
pub(crate) const WAITING_FOR_REQUEST: &str = "waiting for a request";

/// Adds what the server was doing to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, context: &'static str) -> Result<T, ConnectionError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: &'static str) -> Result<T, ConnectionError> {
        self.map_err(|source| ConnectionError::Io { context, source })
    }
}

/// Fills `buf`, or returns `Ok(false)` if the stream ends before its first byte (a clean
/// hang-up between messages). Ending part-way is `UnexpectedEof`.
pub(crate) fn read_exact_or_eof(reader: &mut impl io::Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and throws away exactly `len` bytes.
pub(crate) fn discard<R: io::Read>(reader: &mut R, len: u64) -> io::Result<()> {
    let mut limited = io::Read::take(&mut *reader, len);
    let copied = io::copy(&mut limited, &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_exact_or_eof_distinguishes_clean_and_torn_ends() {
        let mut buf = [0u8; 4];
        assert!(!read_exact_or_eof(&mut &b""[..], &mut buf).unwrap());
        let err = read_exact_or_eof(&mut &b"ab"[..], &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_exact_or_eof(&mut &b"abcdef"[..], &mut buf).unwrap());
        assert_eq!(&buf, b"abcd");
    }

    #[test]
    fn discard_consumes_exactly() {
        let mut input = &b"0123456789"[..];
        discard(&mut input, 4).unwrap();
        assert_eq!(input, b"456789");
        let err = discard(&mut input, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn hang_up_classification() {
        let gone = ConnectionError::Io {
            context: "x",
            source: io::ErrorKind::UnexpectedEof.into(),
        };
        assert!(gone.is_hang_up());
        assert!(!ConnectionError::RequestMagic(0).is_hang_up());
    }
}
