//! The transmission phase: requests in, simple replies out, in order.
//!
//! Every request is checked before it reaches the [`Export`], in this order:
//!
//! 1. unknown command → `EINVAL` (the spec: "SHOULD return EINVAL if it receives an unknown
//!    command"). Such a request is assumed to carry no payload.
//! 2. a `WRITE` payload is read first, whatever happens next, so the stream stays in step. A
//!    write longer than the advertised maximum block size is read and thrown away and answered
//!    `EINVAL`, unless it is longer than [`MAX_PAYLOAD`] (64 MiB): then the connection is
//!    closed (the spec lets a server treat an over-long request as a denial of service).
//! 3. flags other than `FUA` (any command) and `NO_HOLE` (`WRITE_ZEROES` only) → `EINVAL`
//!    (the spec: "SHOULD return EINVAL if it receives an unknown command flag ... or a flag
//!    not explicitly documented as applicable to the given request").
//! 4. `WRITE`, `TRIM` or `WRITE_ZEROES` on a read-only export → `EPERM` (the spec: "SHOULD
//!    return EPERM if it receives a write or trim request on a read-only export").
//! 5. a `READ` longer than the maximum block size → `EINVAL`.
//! 6. `offset + length` overflowing 64 bits → `EINVAL` for every command; a range past the end
//!    of the export → `ENOSPC` for `WRITE` and `WRITE_ZEROES` (the spec: "SHOULD return
//!    ENOSPC if it receives a write request including one or more sectors beyond the size of
//!    the device") and `EINVAL` for `READ` and `TRIM`.
//!
//! Errors from the export are mapped by [`errno_for`]. `FLUSH` ignores its offset and length;
//! `FUA` on `TRIM` flushes after trimming; zero-length requests succeed without touching the
//! export. `DISC` gets no reply: the server flushes what it owes and closes.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};

use crate::export::Export;

use super::handshake::max_payload;
use super::protocol::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, REQUEST_LEN, REQUEST_MAGIC, Request, SimpleReply,
    errno_for,
};
use super::{
    ConnectionError, IoContext, MAX_PAYLOAD, WAITING_FOR_REQUEST, discard, read_exact_or_eof,
};

/// How a transmission phase ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    HangUp,
}

/// What happened on a connection, for the log line when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered (or, for `DISC`, received).
    pub requests: u64,
    /// Replies that carried an error.
    pub errors: u64,
    /// Bytes read by the client.
    pub bytes_read: u64,
    /// Bytes of write payload stored (write-zeroes and trim not counted).
    pub bytes_written: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} errors, {} bytes read, {} bytes written",
            self.requests, self.errors, self.bytes_read, self.bytes_written
        )
    }
}

/// Serves requests on one connection until the client disconnects.
///
/// `stats` is updated as requests complete, so it is meaningful even when an error ends the
/// connection.
pub fn serve<R: Read, W: Write>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    export: &dyn Export,
    stats: &mut Stats,
) -> Result<End, ConnectionError> {
    let mut session = Session {
        export,
        size: export.size(),
        read_only: export.read_only(),
        max_payload: max_payload(export),
        buf: Vec::new(),
        stats,
    };
    let mut header = [0u8; REQUEST_LEN];
    loop {
        // Waiting for the next request apart from reading it: a timeout here is an idle
        // client, one later a client stalled in the middle of a request.
        if !request_arrives(reader).context(WAITING_FOR_REQUEST)? {
            writer.flush().context("sending replies")?;
            return Ok(End::HangUp);
        }
        if !read_exact_or_eof(reader, &mut header).context("reading a request header")? {
            writer.flush().context("sending replies")?;
            return Ok(End::HangUp);
        }
        let request = Request::decode(&header);
        if request.magic != REQUEST_MAGIC {
            // Replies already owed are still sent.
            let _ = writer.flush();
            return Err(ConnectionError::RequestMagic(request.magic));
        }
        session.stats.requests += 1;
        if request.command == CMD_DISC {
            writer.flush().context("sending replies")?;
            return Ok(End::Disconnect);
        }
        session.handle(reader, writer, &request)?;
        // Coalesce replies while the client has more requests queued up: flush only when the
        // next request is not already complete in the buffer.
        if !next_request_buffered(reader.buffer()) {
            writer.flush().context("sending replies")?;
        }
    }
}

/// Waits until the client's next request has begun to arrive (`false`: it hung up).
fn request_arrives<R: Read>(reader: &mut BufReader<R>) -> std::io::Result<bool> {
    loop {
        match reader.fill_buf() {
            Ok(buffered) => return Ok(!buffered.is_empty()),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

struct Session<'a> {
    export: &'a dyn Export,
    size: u64,
    read_only: bool,
    max_payload: u32,
    /// Reused for every payload; grows to the largest request seen (at most `max_payload`).
    buf: Vec<u8>,
    stats: &'a mut Stats,
}

impl Session<'_> {
    fn handle<R: Read, W: Write>(
        &mut self,
        reader: &mut BufReader<R>,
        writer: &mut W,
        request: &Request,
    ) -> Result<(), ConnectionError> {
        let error = match request.command {
            CMD_READ => return self.read(writer, request),
            CMD_WRITE => self.write(reader, request)?,
            CMD_FLUSH => self.flush(request),
            CMD_TRIM => self.trim(request),
            CMD_WRITE_ZEROES => self.write_zeroes(request),
            other => {
                log::debug!("nbd: unknown command {other}");
                EINVAL
            }
        };
        self.reply(writer, error, request.cookie)
    }

    fn reply<W: Write>(
        &mut self,
        writer: &mut W,
        error: u32,
        cookie: u64,
    ) -> Result<(), ConnectionError> {
        if error != 0 {
            self.stats.errors += 1;
        }
        writer
            .write_all(&SimpleReply::new(error, cookie).encode())
            .context("sending a reply")
    }

    fn read<W: Write>(&mut self, writer: &mut W, request: &Request) -> Result<(), ConnectionError> {
        let checked = check_flags(request, CMD_FLAG_FUA)
            .and_then(|()| self.check_read_length(request))
            .and_then(|()| self.check_range(request, EINVAL));
        if let Err(error) = checked {
            return self.reply(writer, error, request.cookie);
        }
        let len = request.length as usize;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let data = &mut self.buf[..len];
        if len > 0 {
            if let Err(error) = self.export.read(request.offset, data) {
                let error = self.failed("read", request, &error);
                return self.reply(writer, error, request.cookie);
            }
        }
        writer
            .write_all(&SimpleReply::new(0, request.cookie).encode())
            .context("sending a reply")?;
        writer.write_all(data).context("sending read data")?;
        self.stats.bytes_read += len as u64;
        Ok(())
    }

    /// Reads the payload, then checks and executes; returns the error value.
    fn write<R: Read>(
        &mut self,
        reader: &mut BufReader<R>,
        request: &Request,
    ) -> Result<u32, ConnectionError> {
        if request.length > self.max_payload {
            if request.length > MAX_PAYLOAD {
                return Err(ConnectionError::WriteTooLarge {
                    len: request.length,
                    limit: MAX_PAYLOAD,
                });
            }
            discard(reader, u64::from(request.length)).context("skipping an oversized write")?;
            return Ok(EINVAL);
        }
        let len = request.length as usize;
        // The payload is usually in the read buffer already: use it there rather than copy
        // it out first (one copy less per write).
        let buffered = reader.buffer().len() >= len;
        let mut buf = std::mem::take(&mut self.buf);
        if !buffered {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            reader
                .read_exact(&mut buf[..len])
                .context("reading a write's payload")?;
        }
        let data = if buffered {
            &reader.buffer()[..len]
        } else {
            &buf[..len]
        };
        let error = self.write_payload(request, data);
        if buffered {
            reader.consume(len);
        }
        self.buf = buf;
        Ok(error)
    }

    /// Checks and executes a write whose payload was read; returns the error value.
    fn write_payload(&mut self, request: &Request, data: &[u8]) -> u32 {
        if let Err(error) = self.check_change(request, CMD_FLAG_FUA, ENOSPC) {
            return error;
        }
        if data.is_empty() {
            return 0;
        }
        let fua = request.flags & CMD_FLAG_FUA != 0;
        match self.export.write(request.offset, data, fua) {
            Ok(()) => {
                self.stats.bytes_written += data.len() as u64;
                0
            }
            Err(error) => self.failed("write", request, &error),
        }
    }

    fn flush(&mut self, request: &Request) -> u32 {
        if let Err(error) = check_flags(request, CMD_FLAG_FUA) {
            return error;
        }
        match self.export.flush() {
            Ok(()) => 0,
            Err(error) => self.failed("flush", request, &error),
        }
    }

    fn trim(&mut self, request: &Request) -> u32 {
        if let Err(error) = self.check_change(request, CMD_FLAG_FUA, EINVAL) {
            return error;
        }
        if request.length == 0 {
            return 0;
        }
        let result = self
            .export
            .trim(request.offset, u64::from(request.length))
            .and_then(|()| {
                if request.flags & CMD_FLAG_FUA != 0 {
                    self.export.flush()
                } else {
                    Ok(())
                }
            });
        match result {
            Ok(()) => 0,
            Err(error) => self.failed("trim", request, &error),
        }
    }

    fn write_zeroes(&mut self, request: &Request) -> u32 {
        if let Err(error) = self.check_change(request, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, ENOSPC) {
            return error;
        }
        if request.length == 0 {
            return 0;
        }
        let fua = request.flags & CMD_FLAG_FUA != 0;
        let may_trim = request.flags & CMD_FLAG_NO_HOLE == 0;
        match self
            .export
            .write_zeroes(request.offset, u64::from(request.length), fua, may_trim)
        {
            Ok(()) => 0,
            Err(error) => self.failed("write-zeroes", request, &error),
        }
    }

    /// `EINVAL` if a read asks for more than the maximum block size.
    fn check_read_length(&self, request: &Request) -> Result<(), u32> {
        if request.length > self.max_payload {
            Err(EINVAL)
        } else {
            Ok(())
        }
    }

    /// The checks every command that changes data passes, in the order the errors take
    /// precedence: flags (`EINVAL`), read-only (`EPERM`), range (`beyond_end` past the end).
    fn check_change(
        &self,
        request: &Request,
        allowed_flags: u16,
        beyond_end: u32,
    ) -> Result<(), u32> {
        check_flags(request, allowed_flags)?;
        self.check_writable()?;
        self.check_range(request, beyond_end)
    }

    fn check_writable(&self) -> Result<(), u32> {
        if self.read_only { Err(EPERM) } else { Ok(()) }
    }

    /// `EINVAL` if `offset + length` overflows; `beyond_end` if it passes the export's end.
    fn check_range(&self, request: &Request, beyond_end: u32) -> Result<(), u32> {
        match request.offset.checked_add(u64::from(request.length)) {
            None => Err(EINVAL),
            Some(end) if end > self.size => Err(beyond_end),
            Some(_) => Ok(()),
        }
    }

    fn failed(&self, what: &str, request: &Request, error: &std::io::Error) -> u32 {
        log::warn!(
            "nbd: export {}: {what} of {} bytes at {} failed: {error}",
            self.export.name(),
            request.length,
            request.offset
        );
        errno_for(error)
    }
}

/// True if `buffered` holds a whole request (header, and payload for a write): it can be
/// executed without waiting for the client, so replies owed can wait for it.
fn next_request_buffered(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<REQUEST_LEN>() else {
        return false;
    };
    let request = Request::decode(header);
    request.command != CMD_WRITE || buffered.len() - REQUEST_LEN >= request.length as usize
}

/// `EINVAL` unless every flag set is in `allowed`.
fn check_flags(request: &Request, allowed: u16) -> Result<(), u32> {
    if request.flags & !allowed != 0 {
        log::debug!(
            "nbd: command {} with flags {:#x} refused",
            request.command,
            request.flags
        );
        Err(EINVAL)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Cursor};
    use std::sync::Mutex;

    use super::*;
    use crate::nbd::protocol::{CMD_CACHE, CMD_FLAG_DF, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};

    /// An in-memory export that records calls.
    #[derive(Debug)]
    struct Mem {
        data: Mutex<Vec<u8>>,
        read_only: bool,
        calls: Mutex<Vec<String>>,
        fail: Option<io::ErrorKind>,
    }

    impl Mem {
        fn new(size: usize) -> Self {
            Self {
                data: Mutex::new(vec![0; size]),
                read_only: false,
                calls: Mutex::new(Vec::new()),
                fail: None,
            }
        }
        fn log(&self, call: String) -> io::Result<()> {
            self.calls.lock().unwrap().push(call);
            match self.fail {
                Some(kind) => Err(kind.into()),
                None => Ok(()),
            }
        }
    }

    impl Export for Mem {
        fn name(&self) -> &str {
            "mem"
        }
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn max_request(&self) -> u32 {
            4096
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.log(format!("read {offset} {}", buf.len()))?;
            let data = self.data.lock().unwrap();
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
            self.log(format!("write {offset} {} {fua}", buf.len()))?;
            let mut data = self.data.lock().unwrap();
            data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()> {
            self.log(format!("zero {offset} {len} {fua} {may_trim}"))
        }
        fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
            self.log(format!("trim {offset} {len}"))
        }
        fn flush(&self) -> io::Result<()> {
            self.log("flush".to_owned())
        }
    }

    fn req(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        Request::new(command, flags, cookie, offset, length)
            .encode()
            .to_vec()
    }

    /// A reply as (error, cookie, data).
    type Reply = (u32, u64, Vec<u8>);

    /// Runs a client byte stream; returns the outcome and the replies as (error, cookie, data).
    fn run(
        export: &Mem,
        client: &[u8],
        read_lens: &[usize],
    ) -> (Result<End, ConnectionError>, Vec<Reply>) {
        let mut reader = BufReader::new(Cursor::new(client.to_vec()));
        let mut out = Vec::new();
        let mut stats = Stats::default();
        let result = serve(&mut reader, &mut out, export, &mut stats);
        let mut replies = Vec::new();
        let mut bytes = &out[..];
        let mut read_lens = read_lens.iter();
        while !bytes.is_empty() {
            let reply = SimpleReply::decode(bytes[..SIMPLE_REPLY_LEN].try_into().unwrap());
            assert_eq!(reply.magic, SIMPLE_REPLY_MAGIC);
            bytes = &bytes[SIMPLE_REPLY_LEN..];
            let mut data = Vec::new();
            if reply.error == 0 && reply.cookie & 0x8000_0000 != 0 {
                // Cookies with bit 31 mark reads in these tests.
                let len = *read_lens.next().unwrap();
                data = bytes[..len].to_vec();
                bytes = &bytes[len..];
            }
            replies.push((reply.error, reply.cookie, data));
        }
        (result, replies)
    }

    const READ: u64 = 0x8000_0000;

    #[test]
    fn write_read_flush_disc() {
        let export = Mem::new(8192);
        let mut client = req(CMD_WRITE, CMD_FLAG_FUA, 1, 100, 4);
        client.extend_from_slice(b"abcd");
        client.extend(req(CMD_READ, 0, READ | 2, 98, 8));
        client.extend(req(CMD_FLUSH, 0, 3, 0, 0));
        client.extend(req(CMD_DISC, 0, 4, 0, 0));
        client.extend(req(CMD_FLUSH, 0, 5, 0, 0)); // after DISC: never read
        let (result, replies) = run(&export, &client, &[8]);
        assert_eq!(result.unwrap(), End::Disconnect);
        assert_eq!(
            replies,
            vec![
                (0, 1, vec![]),
                (0, READ | 2, b"\0\0abcd\0\0".to_vec()),
                (0, 3, vec![]),
            ]
        );
        assert_eq!(
            *export.calls.lock().unwrap(),
            ["write 100 4 true", "read 98 8", "flush"]
        );
    }

    #[test]
    fn range_checks() {
        let export = Mem::new(8192);
        let mut client = Vec::new();
        client.extend(req(CMD_READ, 0, READ | 1, 8190, 4)); // past the end
        client.extend(req(CMD_READ, 0, READ | 2, u64::MAX, 2)); // overflow
        client.extend(req(CMD_READ, 0, READ | 3, 0, 4097)); // longer than max_request
        client.extend(req(CMD_WRITE, 0, 4, 8190, 4));
        client.extend_from_slice(b"wxyz");
        client.extend(req(CMD_WRITE, 0, 5, u64::MAX - 1, 4));
        client.extend_from_slice(b"wxyz");
        client.extend(req(CMD_TRIM, 0, 6, 8000, 1000));
        client.extend(req(CMD_WRITE_ZEROES, 0, 7, 8000, 1000));
        client.extend(req(CMD_WRITE_ZEROES, 0, 8, u64::MAX, 1));
        client.extend(req(CMD_READ, 0, READ | 9, 8192, 0)); // empty read at the end: fine
        client.extend(req(CMD_READ, 0, READ | 10, 8188, 4)); // last bytes: fine
        let (result, replies) = run(&export, &client, &[0, 4]);
        assert_eq!(result.unwrap(), End::HangUp);
        let errors: Vec<_> = replies.iter().map(|r| (r.1 & 0xff, r.0)).collect();
        assert_eq!(
            errors,
            vec![
                (1, EINVAL),
                (2, EINVAL),
                (3, EINVAL),
                (4, ENOSPC),
                (5, EINVAL),
                (6, EINVAL),
                (7, ENOSPC),
                (8, EINVAL),
                (9, 0),
                (10, 0),
            ]
        );
        assert_eq!(*export.calls.lock().unwrap(), ["read 8188 4"]);
    }

    #[test]
    fn oversized_write_is_skipped_then_stream_continues() {
        let export = Mem::new(1 << 20);
        let mut client = req(CMD_WRITE, 0, 1, 0, 10_000);
        client.extend(vec![0xee; 10_000]);
        client.extend(req(CMD_WRITE, 0, 2, 0, 1));
        client.push(7);
        let (result, replies) = run(&export, &client, &[]);
        assert_eq!(result.unwrap(), End::HangUp);
        assert_eq!(replies, vec![(EINVAL, 1, vec![]), (0, 2, vec![])]);
        assert_eq!(export.data.lock().unwrap()[0], 7);
    }

    #[test]
    fn absurd_write_closes() {
        let export = Mem::new(1 << 20);
        let client = req(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1);
        let (result, replies) = run(&export, &client, &[]);
        assert!(matches!(result, Err(ConnectionError::WriteTooLarge { .. })));
        assert!(replies.is_empty());
    }

    #[test]
    fn flags_and_commands() {
        let export = Mem::new(8192);
        let mut client = Vec::new();
        client.extend(req(CMD_READ, CMD_FLAG_DF, READ | 1, 0, 1));
        client.extend(req(CMD_READ, CMD_FLAG_NO_HOLE, READ | 2, 0, 1));
        client.extend(req(CMD_READ, CMD_FLAG_FUA, READ | 3, 0, 1)); // FUA is valid anywhere
        client.extend(req(CMD_WRITE, 0x8000, 4, 0, 2));
        client.extend_from_slice(b"zz");
        client.extend(req(CMD_CACHE, 0, 5, 0, 512));
        client.extend(req(77, 0, 6, 0, 0));
        client.extend(req(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            7,
            0,
            512,
        ));
        client.extend(req(CMD_WRITE_ZEROES, 0, 8, 512, 512));
        client.extend(req(CMD_TRIM, CMD_FLAG_FUA, 9, 1024, 512));
        client.extend(req(CMD_TRIM, CMD_FLAG_NO_HOLE, 10, 1024, 512));
        client.extend(req(CMD_FLUSH, 0x10, 11, 0, 0));
        let (result, replies) = run(&export, &client, &[1]);
        assert_eq!(result.unwrap(), End::HangUp);
        let errors: Vec<_> = replies.iter().map(|r| (r.1 & 0xff, r.0)).collect();
        assert_eq!(
            errors,
            vec![
                (1, EINVAL),
                (2, EINVAL),
                (3, 0),
                (4, EINVAL),
                (5, EINVAL),
                (6, EINVAL),
                (7, 0),
                (8, 0),
                (9, 0),
                (10, EINVAL),
                (11, EINVAL),
            ]
        );
        assert_eq!(
            *export.calls.lock().unwrap(),
            [
                "read 0 1",
                "zero 0 512 true false",
                "zero 512 512 false true",
                "trim 1024 512",
                "flush"
            ]
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut export = Mem::new(8192);
        export.read_only = true;
        let mut client = req(CMD_WRITE, 0, 1, 0, 3);
        client.extend_from_slice(b"abc");
        client.extend(req(CMD_TRIM, 0, 2, 0, 512));
        client.extend(req(CMD_WRITE_ZEROES, 0, 3, 0, 512));
        client.extend(req(CMD_FLUSH, 0, 4, 0, 0));
        let (_, replies) = run(&export, &client, &[]);
        let errors: Vec<_> = replies.iter().map(|r| r.0).collect();
        assert_eq!(errors, [EPERM, EPERM, EPERM, 0]);
    }

    #[test]
    fn export_errors_are_mapped() {
        for (kind, errno) in [
            (io::ErrorKind::InvalidInput, EINVAL),
            (io::ErrorKind::PermissionDenied, EPERM),
            (io::ErrorKind::StorageFull, ENOSPC),
            (io::ErrorKind::Other, 5),
        ] {
            let mut export = Mem::new(8192);
            export.fail = Some(kind);
            let mut client = req(CMD_READ, 0, READ | 1, 0, 16);
            client.extend(req(CMD_WRITE, 0, 2, 0, 1));
            client.push(1);
            client.extend(req(CMD_FLUSH, 0, 3, 0, 0));
            let (result, replies) = run(&export, &client, &[]);
            assert_eq!(result.unwrap(), End::HangUp);
            // A failed read sends no data.
            let errors: Vec<_> = replies.iter().map(|r| (r.0, r.2.len())).collect();
            assert_eq!(errors, [(errno, 0), (errno, 0), (errno, 0)], "{kind:?}");
        }
    }

    #[test]
    fn complete_requests_are_recognised() {
        let flush = req(CMD_FLUSH, 0, 1, 0, 0);
        assert!(!next_request_buffered(&flush[..REQUEST_LEN - 1]));
        assert!(next_request_buffered(&flush));
        let mut write = req(CMD_WRITE, 0, 1, 0, 3);
        assert!(!next_request_buffered(&write));
        write.extend_from_slice(b"ab");
        assert!(!next_request_buffered(&write));
        write.push(b'c');
        assert!(next_request_buffered(&write));
    }

    #[test]
    fn bad_magic_and_torn_requests() {
        let export = Mem::new(8192);
        let mut client = req(CMD_FLUSH, 0, 1, 0, 0);
        let mut bad = req(CMD_FLUSH, 0, 2, 0, 0);
        bad[0] = 0;
        client.extend(bad);
        let (result, replies) = run(&export, &client, &[]);
        assert!(matches!(result, Err(ConnectionError::RequestMagic(_))));
        assert_eq!(replies, vec![(0, 1, vec![])], "owed replies still sent");

        let client = req(CMD_FLUSH, 0, 1, 0, 0)[..20].to_vec();
        let err = run(&export, &client, &[]).0.unwrap_err();
        assert!(err.is_hang_up());

        let mut client = req(CMD_WRITE, 0, 1, 0, 100);
        client.extend_from_slice(&[1; 50]);
        let err = run(&export, &client, &[]).0.unwrap_err();
        assert!(err.is_hang_up());
        assert!(export.calls.lock().unwrap().iter().all(|c| c == "flush"));
    }
}
