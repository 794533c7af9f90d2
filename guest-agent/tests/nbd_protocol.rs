//! The NBD server against a raw TCP client written here: the protocol's edges, misbehaving
//! clients, several connections at once.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::export::ExportRegistry;
use guest_agent::export_file::FileExport;
use guest_agent::nbd::Server;
use guest_agent::nbd::protocol::*;

const SIZE: u64 = 4 << 20;
const MAX_REQUEST: u32 = 256 * 1024;

struct Fixture {
    server: Server,
    _files: Vec<tempfile::NamedTempFile>,
    registry: Arc<ExportRegistry>,
}

/// Exports "a" and "b" (writable, 4 MiB, 256 KiB max request) and "ro" (read-only).
fn fixture() -> Fixture {
    let registry = Arc::new(ExportRegistry::new());
    let mut files = Vec::new();
    for (name, read_only) in [("a", false), ("b", false), ("ro", true)] {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(SIZE).unwrap();
        let export = if read_only {
            FileExport::open_read_only(file.path(), name)
        } else {
            FileExport::open(file.path(), name)
        }
        .unwrap()
        .with_max_request(MAX_REQUEST);
        registry.insert(Arc::new(export));
        files.push(file);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::spawn(listener, Arc::clone(&registry)).unwrap();
    Fixture {
        server,
        _files: files,
        registry,
    }
}

/// A raw client connection.
struct Client {
    stream: TcpStream,
}

impl Client {
    /// Connects and reads the greeting; sends `client_flags`.
    fn handshake(addr: SocketAddr, client_flags: u32) -> Client {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; GREETING_LEN];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        stream.write_all(&client_flags.to_be_bytes()).unwrap();
        Client { stream }
    }

    fn new(addr: SocketAddr) -> Client {
        Self::handshake(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = OptionHeader::new(option, data.len() as u32)
            .encode()
            .to_vec();
        out.extend_from_slice(data);
        self.stream.write_all(&out).unwrap();
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut header).unwrap();
        let header = OptionReplyHeader::decode(&header);
        assert_eq!(header.magic, OPTION_REPLY_MAGIC);
        let mut data = vec![0; header.length as usize];
        self.stream.read_exact(&mut data).unwrap();
        (header.option, header.reply, data)
    }

    /// Replies up to and including the first that is not `NBD_REP_INFO`/`NBD_REP_SERVER`.
    fn option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let reply = self.option_reply();
            let last = reply.1 != REP_INFO && reply.1 != REP_SERVER;
            out.push(reply);
            if last {
                return out;
            }
        }
    }

    /// `NBD_OPT_GO` for `name`; panics unless it succeeds. Returns (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let data = InfoRequest {
            name: name.to_owned(),
            items: vec![],
        }
        .encode();
        self.option(OPT_GO, &data);
        let replies = self.option_replies();
        assert_eq!(replies.last().unwrap().1, REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap();
        let size = u64::from_be_bytes(export.2[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.2[10..12].try_into().unwrap());
        (size, flags)
    }

    fn connect(addr: SocketAddr, name: &str) -> Client {
        let mut client = Client::new(addr);
        client.go(name);
        client
    }

    fn send(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.stream
            .write_all(&Request::new(command, flags, cookie, offset, length).encode())
            .unwrap();
    }

    fn reply(&mut self) -> SimpleReply {
        let mut bytes = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut bytes).unwrap();
        let reply = SimpleReply::decode(&bytes);
        assert_eq!(reply.magic, SIMPLE_REPLY_MAGIC);
        reply
    }

    /// Sends a command without payload and returns its error value.
    fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.send(command, flags, 42, offset, length);
        let reply = self.reply();
        assert_eq!(reply.cookie, 42);
        reply.error
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(CMD_WRITE, flags, 7, offset, data.len() as u32);
        self.stream.write_all(data).unwrap();
        let reply = self.reply();
        assert_eq!(reply.cookie, 7);
        reply.error
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(CMD_READ, 0, 9, offset, len);
        let reply = self.reply();
        assert_eq!(reply.cookie, 9);
        if reply.error != 0 {
            return Err(reply.error);
        }
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).unwrap();
        Ok(data)
    }

    /// True once the server has closed the connection (reads end of stream or a reset).
    fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }

    fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, 0);
        assert!(self.closed_by_server());
    }
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn list_returns_every_export() {
    let f = fixture();
    let mut client = Client::new(f.server.local_addr());
    client.option(OPT_LIST, b"");
    let replies = client.option_replies();
    let names: Vec<String> = replies
        .iter()
        .filter(|r| r.1 == REP_SERVER)
        .map(|r| {
            let len = u32::from_be_bytes(r.2[..4].try_into().unwrap()) as usize;
            assert_eq!(len, r.2.len() - 4);
            String::from_utf8(r.2[4..].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["a", "b", "ro"]);
    assert_eq!(replies.last().unwrap().1, REP_ACK);
    // NBD_OPT_ABORT is acknowledged, then the server closes.
    client.option(OPT_ABORT, b"");
    assert_eq!(client.option_reply().1, REP_ACK);
    assert!(client.closed_by_server());
}

#[test]
fn info_then_go_then_io() {
    let f = fixture();
    let mut client = Client::new(f.server.local_addr());
    let data = InfoRequest {
        name: "b".to_owned(),
        items: vec![INFO_NAME, INFO_BLOCK_SIZE],
    }
    .encode();
    client.option(OPT_INFO, &data);
    let replies = client.option_replies();
    let infos: Vec<&[u8]> = replies
        .iter()
        .filter(|r| r.1 == REP_INFO)
        .map(|r| &r.2[..])
        .collect();
    assert_eq!(infos.len(), 3);
    let flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(infos[0], info_export(SIZE, flags));
    assert_eq!(infos[1], b"\0\x01b");
    assert_eq!(infos[2], info_block_size(1, 4096, MAX_REQUEST));
    assert_eq!(replies.last().unwrap().1, REP_ACK);

    // Still negotiating: GO for the same export.
    assert_eq!(client.go("b"), (SIZE, flags));
    assert_eq!(client.write(4096, b"hello", 0), 0);
    assert_eq!(client.read(4095, 7).unwrap(), b"\0hello\0");
    client.disconnect();
}

#[test]
fn go_for_an_unknown_export_keeps_negotiating() {
    let f = fixture();
    let mut client = Client::new(f.server.local_addr());
    let data = InfoRequest {
        name: "nope".to_owned(),
        items: vec![],
    }
    .encode();
    client.option(OPT_GO, &data);
    let (option, reply, message) = client.option_reply();
    assert_eq!((option, reply), (OPT_GO, REP_ERR_UNKNOWN));
    assert!(String::from_utf8(message).unwrap().contains("nope"));
    // Unsupported options are refused, negotiation goes on.
    client.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(client.option_reply().1, REP_ERR_UNSUP);
    client.option(OPT_STARTTLS, b"");
    assert_eq!(client.option_reply().1, REP_ERR_UNSUP);
    client.option(12345, b"whatever");
    assert_eq!(client.option_reply().1, REP_ERR_UNSUP);
    client.option(OPT_INFO, &[0, 0, 0, 200, 0, 0]);
    assert_eq!(client.option_reply().1, REP_ERR_INVALID);
    client.option(OPT_LIST, &vec![0; MAX_OPTION_DATA as usize + 1]);
    assert_eq!(client.option_reply().1, REP_ERR_TOO_BIG);
    // The empty name is the default export (the first inserted).
    assert_eq!(client.go(""), (SIZE, client_flags_rw()));
    assert_eq!(client.read(0, 1).unwrap(), [0]);
}

fn client_flags_rw() -> u16 {
    FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN
}

#[test]
fn export_name_option() {
    let f = fixture();
    // Without NO_ZEROES: size, flags, 124 zero bytes.
    let mut client = Client::handshake(f.server.local_addr(), FLAG_C_FIXED_NEWSTYLE);
    client.option(OPT_EXPORT_NAME, b"ro");
    let mut reply = [0xffu8; 134];
    client.stream.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
    assert_eq!(
        u16::from_be_bytes([reply[8], reply[9]]),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
    );
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(client.read(0, 4).unwrap(), [0; 4]);

    // With NO_ZEROES, the first reply byte follows at once.
    let mut client = Client::new(f.server.local_addr());
    client.option(OPT_EXPORT_NAME, b"a");
    let mut reply = [0u8; 10];
    client.stream.read_exact(&mut reply).unwrap();
    assert_eq!(client.command(CMD_FLUSH, 0, 0, 0), 0);

    // An unknown name cannot be refused: the server closes.
    let mut client = Client::new(f.server.local_addr());
    client.option(OPT_EXPORT_NAME, b"nope");
    assert!(client.closed_by_server());
}

#[test]
fn out_of_range_requests() {
    let f = fixture();
    let mut c = Client::connect(f.server.local_addr(), "a");
    // Reads and trims past the end: EINVAL; writes and write-zeroes past the end: ENOSPC.
    assert_eq!(c.read(SIZE - 1, 2), Err(EINVAL));
    assert_eq!(c.read(SIZE, 1), Err(EINVAL));
    assert_eq!(c.command(CMD_TRIM, 0, SIZE - 512, 1024), EINVAL);
    assert_eq!(c.write(SIZE - 2, b"abc", 0), ENOSPC);
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, SIZE, 1), ENOSPC);
    // offset + length overflows: EINVAL for everything.
    assert_eq!(c.read(u64::MAX, 2), Err(EINVAL));
    assert_eq!(c.write(u64::MAX - 1, b"abc", 0), EINVAL);
    assert_eq!(c.command(CMD_TRIM, 0, u64::MAX, 4096), EINVAL);
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, u64::MAX, 4096), EINVAL);
    // The last byte is fine.
    assert_eq!(c.write(SIZE - 1, b"z", CMD_FLAG_FUA), 0);
    assert_eq!(c.read(SIZE - 1, 1).unwrap(), b"z");
    // Zero-length requests at the end are fine too.
    assert_eq!(c.read(SIZE, 0).unwrap(), b"");
    c.disconnect();
}

#[test]
fn oversized_requests() {
    let f = fixture();
    let mut c = Client::connect(f.server.local_addr(), "a");
    assert_eq!(c.read(0, MAX_REQUEST + 1), Err(EINVAL));
    assert_eq!(c.read(0, MAX_REQUEST).unwrap().len(), MAX_REQUEST as usize);
    // An oversized write is read and thrown away: the next request is understood.
    let big = vec![0x5a; MAX_REQUEST as usize + 4096];
    assert_eq!(c.write(0, &big, 0), EINVAL);
    assert_eq!(c.read(0, 8).unwrap(), [0; 8], "nothing of it was written");
    assert_eq!(c.write(0, b"after", 0), 0);
    assert_eq!(c.read(0, 5).unwrap(), b"after");
    // Trim and write-zeroes are not bounded by the maximum block size.
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, 2 << 20), 0);
    assert_eq!(c.read(0, 5).unwrap(), [0; 5]);
    // A write longer than anything the server accepts closes the connection.
    c.send(CMD_WRITE, 0, 1, 0, 100 << 20);
    assert!(c.closed_by_server());
}

#[test]
fn unknown_commands_and_flags() {
    let f = fixture();
    let mut c = Client::connect(f.server.local_addr(), "a");
    assert_eq!(c.command(CMD_CACHE, 0, 0, 4096), EINVAL);
    assert_eq!(c.command(CMD_BLOCK_STATUS, 0, 0, 4096), EINVAL);
    assert_eq!(c.command(200, 0, 0, 0), EINVAL);
    assert_eq!(c.command(CMD_FLUSH, 0x4000, 0, 0), EINVAL);
    assert_eq!(c.command(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 4096), EINVAL);
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096),
        EINVAL
    );
    c.send(CMD_READ, CMD_FLAG_DF, 3, 0, 16);
    assert_eq!(c.reply().error, EINVAL, "a refused read carries no data");
    assert_eq!(c.write(0, b"data", CMD_FLAG_REQ_ONE), EINVAL);
    // FUA is accepted on any command; NO_HOLE on write-zeroes.
    assert_eq!(c.command(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), 0);
    assert_eq!(c.command(CMD_TRIM, CMD_FLAG_FUA, 0, 4096), 0);
    assert_eq!(
        c.command(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 4096),
        0
    );
    assert_eq!(
        c.read(0, 4).unwrap(),
        [0; 4],
        "the refused write wrote nothing"
    );
    c.disconnect();
}

#[test]
fn read_only_export_refuses_writes() {
    let f = fixture();
    let mut c = Client::new(f.server.local_addr());
    let (_, flags) = c.go("ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(c.write(0, b"nope", 0), EPERM);
    assert_eq!(c.command(CMD_TRIM, 0, 0, 4096), EPERM);
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, 4096), EPERM);
    assert_eq!(c.command(CMD_FLUSH, 0, 0, 0), 0);
    assert_eq!(c.read(0, 4).unwrap(), [0; 4]);
    c.disconnect();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let f = fixture();
    let addr = f.server.local_addr();
    let mut good = Client::connect(addr, "a");
    assert_eq!(good.write(0, b"good", 0), 0);
    let mut bad = Client::connect(addr, "a");
    let mut request = Request {
        magic: 0x1234_5678,
        flags: 0,
        command: CMD_FLUSH,
        cookie: 1,
        offset: 0,
        length: 0,
    }
    .encode();
    bad.stream.write_all(&request).unwrap();
    assert!(bad.closed_by_server());
    // Same with a request whose magic is right but arrives after garbage.
    let mut bad = Client::connect(addr, "a");
    request[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bad.stream.write_all(b"xx").unwrap();
    bad.stream.write_all(&request).unwrap();
    assert!(bad.closed_by_server());
    assert_eq!(good.read(0, 4).unwrap(), b"good");
    let mut fresh = Client::connect(addr, "a");
    assert_eq!(fresh.read(0, 4).unwrap(), b"good");
}

#[test]
fn malformed_handshakes_close_only_that_connection() {
    let f = fixture();
    let addr = f.server.local_addr();
    let mut good = Client::connect(addr, "a");

    // Client flags without FIXED_NEWSTYLE, or with unknown bits.
    for flags in [0, FLAG_C_NO_ZEROES, FLAG_C_FIXED_NEWSTYLE | 0x100] {
        let mut c = Client::handshake(addr, flags);
        assert!(c.closed_by_server(), "flags {flags:#x}");
    }
    // Bad option magic.
    let mut c = Client::new(addr);
    c.stream.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert!(c.closed_by_server());
    // Truncated option: half a header, then the client stops sending.
    let mut c = Client::new(addr);
    c.stream.write_all(b"IHAVEOPT\0\0").unwrap();
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_by_server());
    // Truncated option data.
    let mut c = Client::new(addr);
    c.stream
        .write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x20\0\0\0")
        .unwrap();
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed_by_server());
    // A client that goes away during the greeting.
    drop(TcpStream::connect(addr).unwrap());
    // An export name longer than any string may be.
    let mut c = Client::new(addr);
    c.option(OPT_EXPORT_NAME, &[b'x'; 5000]);
    assert!(c.closed_by_server());

    assert_eq!(good.command(CMD_FLUSH, 0, 0, 0), 0);
    let mut fresh = Client::connect(addr, "b");
    assert_eq!(fresh.command(CMD_FLUSH, 0, 0, 0), 0);
    wait_until("the broken connections to be gone", || {
        f.server.connection_count() == 2
    });
}

#[test]
fn clients_vanishing_mid_request_harm_nobody() {
    let f = fixture();
    let addr = f.server.local_addr();
    let mut writer = Client::connect(addr, "a");
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(writer.write(65536, &pattern, CMD_FLAG_FUA), 0);

    // Half a request header, then gone.
    let mut c = Client::connect(addr, "a");
    c.stream.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(c);
    // A write header and half its payload over the same range, then gone.
    let mut c = Client::connect(addr, "a");
    c.send(CMD_WRITE, 0, 1, 65536, 65536);
    c.stream.write_all(&[0xff; 30000]).unwrap();
    drop(c);
    // A read whose reply is never read (the socket is reset).
    let mut c = Client::connect(addr, "a");
    c.send(CMD_READ, 0, 1, 0, MAX_REQUEST);
    drop(c);

    wait_until("the vanished clients to be noticed", || {
        f.server.connection_count() == 1
    });
    assert_eq!(writer.read(65536, 65536).unwrap(), pattern);
    let mut other = Client::connect(addr, "a");
    assert_eq!(other.read(65536, 65536).unwrap(), pattern);
    other.disconnect();
    writer.disconnect();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let f = fixture();
    let mut c = Client::connect(f.server.local_addr(), "a");
    let mut batch = Vec::new();
    for i in 0..64u64 {
        batch.extend(Request::new(CMD_WRITE, 0, 1000 + i, i * 4096, 4096).encode());
        batch.extend(vec![i as u8; 4096]);
        batch.extend(Request::new(CMD_READ, 0, 2000 + i, i * 4096, 4096).encode());
    }
    c.stream.write_all(&batch).unwrap();
    for i in 0..64u64 {
        let reply = c.reply();
        assert_eq!((reply.error, reply.cookie), (0, 1000 + i));
        let reply = c.reply();
        assert_eq!((reply.error, reply.cookie), (0, 2000 + i));
        let mut data = vec![0; 4096];
        c.stream.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == i as u8));
    }
    c.disconnect();
}

#[test]
fn connections_share_one_view() {
    let f = fixture();
    let addr = f.server.local_addr();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, "b");
                for round in 0..50u64 {
                    let offset = (t * 50 + round) * 4096;
                    let data = vec![(t * 50 + round) as u8; 4096];
                    assert_eq!(c.write(offset, &data, 0), 0);
                    assert_eq!(c.read(offset, 4096).unwrap(), data);
                }
                c.disconnect();
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // Every write is visible on a new connection.
    let mut c = Client::connect(addr, "b");
    for block in 0..400u64 {
        assert_eq!(
            c.read(block * 4096, 4096).unwrap(),
            vec![block as u8; 4096],
            "block {block}"
        );
    }
}

#[test]
fn disconnect_export_and_shutdown() {
    let f = fixture();
    let addr = f.server.local_addr();
    let mut a = Client::connect(addr, "a");
    let mut b = Client::connect(addr, "b");
    let _negotiating = Client::new(addr);
    wait_until("three connections", || f.server.connection_count() == 3);

    // Withdraw export "a": its clients are cut off, others go on.
    f.registry.remove("a");
    assert_eq!(f.server.disconnect_export("a"), 1);
    assert!(a.closed_by_server());
    assert_eq!(b.command(CMD_FLUSH, 0, 0, 0), 0);

    f.server.shutdown();
    assert!(b.closed_by_server());
    assert!(TcpStream::connect(addr).is_err(), "no longer listening");
}

#[test]
fn silent_clients_are_dropped_during_negotiation_only() {
    let f = fixture();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = guest_agent::nbd::ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let server =
        guest_agent::nbd::Server::spawn_with(listener, Arc::clone(&f.registry), config).unwrap();
    let addr = server.local_addr();
    // Greeted, then silent: closed after the timeout.
    let mut silent = Client::new(addr);
    let started = Instant::now();
    assert!(silent.closed_by_server());
    assert!(started.elapsed() >= Duration::from_millis(150));
    // In transmission, idling is fine.
    let mut idle = Client::connect(addr, "a");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(idle.command(CMD_FLUSH, 0, 0, 0), 0);
    idle.disconnect();
}

/// A server with `config`'s limits over the fixture's exports.
fn server_with(f: &Fixture, config: guest_agent::nbd::ServerConfig) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Server::spawn_with(listener, Arc::clone(&f.registry), config).unwrap()
}

#[test]
fn negotiation_has_a_deadline_even_for_a_client_that_keeps_talking() {
    let f = fixture();
    let server = server_with(
        &f,
        guest_agent::nbd::ServerConfig {
            handshake_timeout: Some(Duration::from_millis(1500)),
            ..Default::default()
        },
    );
    // One option every 300 ms: no single read waits long, but the whole takes too long.
    let mut chatty = Client::new(server.local_addr());
    let started = Instant::now();
    let closed = loop {
        chatty.option(OPT_LIST, b"");
        let alive = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            chatty.option_replies();
        }));
        if alive.is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        closed >= Duration::from_millis(1400),
        "closed after {closed:?}"
    );
}

#[test]
fn export_and_negotiation_limits_refuse_and_count() {
    let f = fixture();
    let server = server_with(
        &f,
        guest_agent::nbd::ServerConfig {
            max_connections_per_export: 2,
            max_negotiating: 1,
            ..Default::default()
        },
    );
    let addr = server.local_addr();
    let mut first = Client::connect(addr, "a");
    let _second = Client::connect(addr, "a");
    // A third GO for "a" is refused with the reason; the connection may choose again.
    let mut third = Client::new(addr);
    let mut go = Vec::new();
    go.extend_from_slice(&1u32.to_be_bytes());
    go.extend_from_slice(b"a");
    go.extend_from_slice(&0u16.to_be_bytes());
    third.option(OPT_GO, &go);
    let (option, reply, data) = third.option_reply();
    assert_eq!((option, reply), (OPT_GO, REP_ERR_POLICY));
    assert!(String::from_utf8_lossy(&data).contains("its limit"));
    // The same connection goes on to another export.
    third.go("b");
    // A connection over the negotiating limit is closed as it is accepted.
    let _negotiating = Client::new(addr);
    let mut over = TcpStream::connect(addr).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    assert!(matches!(over.read(&mut byte), Ok(0) | Err(_)), "not closed");
    wait_until("the refusals counted", || server.counters().refused() == 2);
    assert_eq!(first.command(CMD_FLUSH, 0, 0, 0), 0);
}

#[test]
fn only_a_client_silent_between_requests_is_idle() {
    let f = fixture();
    let server = server_with(
        &f,
        guest_agent::nbd::ServerConfig {
            idle_timeout: Some(Duration::from_millis(400)),
            ..Default::default()
        },
    );
    let addr = server.local_addr();
    let mut idle = Client::connect(addr, "a");
    // Half a request, then silence: a stalled client, closed but not counted as idle.
    let mut stalled = Client::connect(addr, "b");
    stalled
        .stream
        .write_all(&REQUEST_MAGIC.to_be_bytes())
        .unwrap();
    assert!(idle.closed_by_server());
    assert!(stalled.closed_by_server());
    wait_until("one idle close counted", || {
        server.counters().idle_closed() == 1
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.counters().idle_closed(), 1);
    // A client that keeps asking is never idle.
    let mut busy = Client::connect(addr, "a");
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(busy.command(CMD_FLUSH, 0, 0, 0), 0);
    }
}
