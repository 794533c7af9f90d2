//! The test NBD client and the acknowledged-writes checker (tests/common), against a real
//! NBD server: nbdkit's memory plugin (and its file plugin, to survive a server restart).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use campaign::nbd_client::{NbdClient, reply_errno};
use common::ack_checker::{
    AckedWriter, BLOCK, History, Op, Outcome, WriterOptions, decode_block, encode_block,
};
use common::{free_port, tool};

const SIZE: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// An nbdkit server on 127.0.0.1, killed on drop.
struct Nbdkit {
    child: Child,
    addr: SocketAddr,
}

impl Nbdkit {
    /// nbdkit with `plugin` (plugin name and its arguments) on `port`; returns once it
    /// completes an NBD handshake.
    fn start_on(port: u16, plugin: &[&str]) -> Nbdkit {
        let port_arg = port.to_string();
        let child = Command::new("nbdkit")
            .args([
                "--exit-with-parent",
                "-f",
                "-p",
                &port_arg,
                "-i",
                "127.0.0.1",
            ])
            .args(plugin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Nbdkit {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NbdClient::connect(server.addr, "", TIMEOUT) {
                Ok(client) => {
                    client.disconnect();
                    return server;
                }
                Err(e) if Instant::now() > deadline => panic!("nbdkit {plugin:?} not up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn memory() -> Option<Nbdkit> {
        tool("nbdkit").then(|| Nbdkit::start_on(free_port(), &["memory", "64M"]))
    }

    fn client(&self) -> NbdClient {
        NbdClient::connect(self.addr, "", TIMEOUT).unwrap()
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reader(client: &mut NbdClient) -> impl FnMut(u64) -> Vec<u8> + '_ {
    |offset| client.read(offset, BLOCK as u32).unwrap()
}

/// A writer with `slots` slots at `base`, run for `run_for`.
fn write_for(server: &Nbdkit, base: u64, slots: u64, run_for: Duration) -> History {
    let writer = AckedWriter::start(server.addr, "", 7, base, slots);
    std::thread::sleep(run_for);
    let history = writer.stop();
    assert!(history.gave_up.is_none(), "{:?}", history.gave_up);
    assert!(
        history.acked_count() > 2 * slots as usize,
        "too few writes: {}",
        history.ops.len()
    );
    history
}

#[test]
fn client_round_trip() {
    let Some(server) = Nbdkit::memory() else {
        return;
    };
    let mut client = server.client();
    assert_eq!(client.size(), SIZE);

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    client.write(12_288 + 512, &data, false).unwrap();
    client.write(1 << 20, &data[..4096], true).unwrap();
    client.flush().unwrap();
    assert_eq!(client.read(12_288 + 512, 8192).unwrap(), data);
    assert_eq!(client.read(1 << 20, 4096).unwrap(), data[..4096]);
    assert_eq!(client.read(12_288, 512).unwrap(), vec![0; 512]);

    // An error reply is an error naming the errno; the connection stays usable.
    let e = client.read(SIZE - 512, 4096).unwrap_err();
    assert!(reply_errno(&e).is_some_and(|errno| errno != 0), "{e}");
    assert!(e.to_string().contains("errno"), "{e}");
    let e = client.write(SIZE, &data[..512], false).unwrap_err();
    assert!(reply_errno(&e).is_some(), "{e}");
    assert_eq!(client.read(12_288 + 512, 8192).unwrap(), data);
    client.disconnect();

    // A second connection sees the data.
    let mut other = server.client();
    assert_eq!(other.read(1 << 20, 4096).unwrap(), data[..4096]);
    other.disconnect();
}

#[test]
fn block_encoding_round_trips_and_catches_damage() {
    let block = encode_block(3, 99, 8192);
    let header = decode_block(&block).unwrap();
    assert_eq!((header.writer_id, header.seq, header.offset), (3, 99, 8192));
    assert_ne!(encode_block(3, 100, 8192)[100..200], block[100..200]);
    for at in [0, 5, 30, 2000, BLOCK - 1] {
        let mut bad = block.clone();
        bad[at] ^= 0x10;
        assert!(decode_block(&bad).is_err(), "flip at {at} not caught");
    }
    assert_eq!(decode_block(&vec![0; BLOCK]).unwrap_err(), "all zeroes");
}

#[test]
fn acked_writer_history_verifies() {
    let Some(server) = Nbdkit::memory() else {
        return;
    };
    let history = write_for(&server, 1 << 20, 32, Duration::from_millis(300));
    let report = history.verify(reader(&mut server.client())).unwrap();
    eprintln!("{report:?}, max gap {:?}", history.max_gap());
    assert_eq!(report.slots_checked, 32);
    assert_eq!((report.failed, report.unknown), (0, 0));
    assert_eq!(report.acked, history.ops.len());
    assert!(history.max_gap() < Duration::from_secs(1));
}

#[test]
fn verify_catches_a_corrupted_slot() {
    let Some(server) = Nbdkit::memory() else {
        return;
    };
    let base = 4 << 20;
    let history = write_for(&server, base, 16, Duration::from_millis(300));
    let mut client = server.client();
    history.verify(reader(&mut client)).unwrap();

    let mut garbage = encode_block(7, 1, base + 5 * 4096);
    garbage[1000] ^= 1;
    client.write(base + 5 * 4096, &garbage, false).unwrap();
    let err = history.verify(reader(&mut client)).unwrap_err();
    eprintln!("{err}");
    assert!(err.contains("slot 5 (offset"), "{err}");
    assert!(err.contains("garbage"), "{err}");
    assert!(err.contains("1 bad slot"), "{err}");
}

#[test]
fn verify_catches_an_older_version() {
    let Some(server) = Nbdkit::memory() else {
        return;
    };
    let base = 8 << 20;
    let history = write_for(&server, base, 16, Duration::from_millis(300));
    let mut client = server.client();
    history.verify(reader(&mut client)).unwrap();

    // Slot 9's second-newest acknowledged write goes back over its newest.
    let acked: Vec<&Op> = history
        .ops
        .iter()
        .filter(|op| op.seq % 16 == 9 && op.outcome == Outcome::Acked)
        .collect();
    let (older, latest) = (acked[acked.len() - 2], acked[acked.len() - 1]);
    client
        .write(
            older.offset,
            &encode_block(7, older.seq, older.offset),
            false,
        )
        .unwrap();
    let err = history.verify(reader(&mut client)).unwrap_err();
    eprintln!("{err}");
    assert!(err.contains("slot 9 (offset"), "{err}");
    assert!(
        err.contains(&format!("expected acked seq {}", latest.seq)),
        "{err}"
    );
    assert!(err.contains(&format!("seq: {}", older.seq)), "{err}");
}

/// Verify's rules on a hand-made history: a newer unknown-outcome write may have landed;
/// an older one, a refused one, or a foreign one may not; a never-acked slot may be zeroes.
#[test]
fn verify_rules_for_unknown_and_failed_writes() {
    let now = Instant::now();
    let op = |seq: u64, outcome| Op {
        seq,
        offset: seq % 4 * 4096,
        outcome,
        invoked: now,
        completed: (outcome != Outcome::Unknown).then_some(now),
        error: None,
    };
    use Outcome::{Acked, Failed, Unknown};
    let history = History {
        writer_id: 1,
        base: 0,
        slots: 4,
        started: now,
        // Slot 0: 0 acked, 4 unknown. Slot 1: 1 unknown, 5 acked, 9 failed.
        // Slot 2: 2 failed, 6 unknown (never acked). Slot 3: 3 acked, 7 acked.
        ops: vec![
            op(0, Acked),
            op(1, Unknown),
            op(2, Failed),
            op(3, Acked),
            op(4, Unknown),
            op(5, Acked),
            op(6, Unknown),
            op(7, Acked),
            op(9, Failed),
        ],
        gave_up: None,
    };
    let check = |contents: &[(u64, Vec<u8>)]| {
        let disk: HashMap<u64, Vec<u8>> = contents.iter().cloned().collect();
        history.verify(|offset| disk[&offset].clone())
    };
    let block = |seq: u64| (seq % 4 * 4096, encode_block(1, seq, seq % 4 * 4096));
    let zero = |slot: u64| (slot * 4096, vec![0u8; BLOCK]);

    let report = check(&[block(0), block(5), zero(2), block(7)]).unwrap();
    assert_eq!((report.acked, report.unknown, report.failed), (4, 3, 2));
    assert_eq!(
        (report.slots_checked, report.slots_with_unknown_landed),
        (4, 0)
    );
    let report = check(&[block(4), block(5), block(6), block(7)]).unwrap();
    assert_eq!(report.slots_with_unknown_landed, 2);

    let bad = [
        (vec![block(0), block(1), zero(2), block(7)], "slot 1 "),
        (vec![block(0), block(9), zero(2), block(7)], "slot 1 "),
        (vec![block(0), block(5), block(2), block(7)], "slot 2 "),
        (vec![block(0), block(5), zero(2), block(3)], "slot 3 "),
        (vec![zero(0), block(5), zero(2), block(7)], "slot 0 "),
        (
            vec![(0, encode_block(2, 0, 0)), block(5), zero(2), block(7)],
            "slot 0 ",
        ),
        (
            vec![(0, encode_block(1, 4, 4096)), block(5), zero(2), block(7)],
            "slot 0 ",
        ),
    ];
    for (contents, slot) in bad {
        let err = check(&contents).unwrap_err();
        assert!(
            err.contains(slot) && err.contains("1 bad slot"),
            "{slot}: {err}"
        );
    }
}

/// Writes past the end of the export get error replies: recorded as Failed, not Unknown,
/// and the writer carries on over the same connection.
#[test]
fn error_replies_are_failed_outcomes() {
    let Some(server) = Nbdkit::memory() else {
        return;
    };
    let writer = AckedWriter::start(server.addr, "", 2, SIZE - 2 * 4096, 4);
    std::thread::sleep(Duration::from_millis(200));
    let history = writer.stop();
    for op in &history.ops {
        let expected = if op.offset < SIZE {
            Outcome::Acked
        } else {
            Outcome::Failed
        };
        assert_eq!(op.outcome, expected, "{op:?}");
    }
    let failed = history
        .ops
        .iter()
        .find(|op| op.outcome == Outcome::Failed)
        .unwrap();
    assert!(
        failed.error.as_deref().unwrap().contains("errno"),
        "{failed:?}"
    );
    assert!(history.acked_count() >= 2);
}

/// The server dies mid-stream and comes back on the same port (nbdkit's file plugin keeps
/// the data): the write in flight is Unknown, the writer reconnects and carries on, and
/// every acknowledged write is still there.
#[test]
fn writer_reconnects_after_server_restart() {
    if !tool("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let disk = disk.to_str().unwrap().to_owned();
    let port = free_port();
    let file_plugin = ["file", disk.as_str()];
    let server = Nbdkit::start_on(port, &file_plugin);
    let options = WriterOptions {
        give_up: Duration::from_secs(10),
        ..WriterOptions::default()
    };
    let writer = AckedWriter::start_with(server.addr, "", 3, 0, 64, options);

    std::thread::sleep(Duration::from_millis(200));
    let before = writer.acked();
    drop(server);
    std::thread::sleep(Duration::from_millis(300));
    let server = Nbdkit::start_on(port, &file_plugin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer.acked() < before + 200 {
        assert!(Instant::now() < deadline, "the writer did not resume");
        assert!(!writer.finished(), "the writer gave up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let history = writer.stop();
    let report = history.verify(reader(&mut server.client())).unwrap();
    eprintln!("{report:?}, max gap {:?}", history.max_gap());
    assert!(report.unknown >= 1, "{report:?}");
    assert_eq!(report.failed, 0);
    assert!(
        history.max_gap() >= Duration::from_millis(300),
        "{:?}",
        history.max_gap()
    );
}
