//! A chained takeover in a cluster of three: b took a's identity over and died before its
//! replay of a's log had finished; c takes over from b.

use std::path::Path;

use shm::control::Owner;
use shm::{Access, BackPressure, Entry, Mapping, NodeWriter, Replay, ReplayStatus};

use super::tests::region;
use super::*;
use crate::export::Export;
use crate::nvram::flusher::{Flusher, FlusherConfig, Release};
use crate::nvram::volume::Disk;

const DISK: usize = 64 << 10;
const A: u32 = 0;
const B: u32 = 1;
const C: u32 = 2;

fn write(writer: &mut NodeWriter, export: u32, block: u64, byte: u8) {
    let data = [byte; 4096];
    let entry = Entry::Write {
        export,
        offset: block * 4096,
        data: &data,
    };
    writer
        .appender
        .append(&entry, BackPressure::default())
        .unwrap();
}

fn read_only(dir: &Path, name: &str) -> NodeRegion {
    let path = dir.join(format!("{name}.region"));
    NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap()
}

/// Node c's monitor, with a and b dead: a's log holds 1s for blocks 0 and 1 of export a;
/// b took a over at epoch 1, marked its replay of a's log started, and logged 2s for
/// blocks 1 and 2 of export a and 3s for block 0 of export b; then it died. hostd has
/// given identity a to c at epoch 2.
struct Chain {
    dir: tempfile::TempDir,
    monitor: FailoverMonitor,
    control: shm::ControlWriter,
    _flusher: Flusher,
}

impl Chain {
    fn start(b_finished_replaying_a: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(format!("{name}.img")), vec![0u8; DISK]).unwrap();
        }
        let names = ["a", "b", "c"];
        let control = ControlRegion::format(
            Mapping::create_file(&dir.path().join("control"), 1 << 20).unwrap(),
            &names,
            &names,
        )
        .unwrap();
        let a = region(dir.path(), A, "a");
        let b = region(dir.path(), B, "b");
        let own = region(dir.path(), C, "c");
        let mut a_writer = a.writer(1).unwrap();
        write(&mut a_writer, A, 0, 1);
        write(&mut a_writer, A, 1, 1);
        let mut b_writer = b.writer(2).unwrap();
        let mark = Replay {
            epoch: 1,
            status: ReplayStatus::Replaying,
            first_seq: 1,
            last_seq: 2,
        };
        b_writer.replays.publish(A, mark);
        write(&mut b_writer, A, 1, 2);
        write(&mut b_writer, A, 2, 2);
        write(&mut b_writer, B, 0, 3);
        if b_finished_replaying_a {
            // b's replay wrote a's records to a's disk and said so.
            let mut disk = std::fs::read(dir.path().join("a.img")).unwrap();
            disk[..2 * 4096].fill(1);
            std::fs::write(dir.path().join("a.img"), disk).unwrap();
            b_writer.replays.publish(
                A,
                Replay {
                    status: ReplayStatus::Replayed,
                    ..mark
                },
            );
        }
        drop((a_writer, b_writer));

        let mut control_writer = control.writer().unwrap();
        control_writer.set_epoch(2);
        for (identity, epoch) in [(A, 2), (B, 0)] {
            let node = if identity == A { C } else { B };
            control_writer
                .set_owner(
                    identity as usize,
                    Owner {
                        node: Some(node),
                        epoch,
                    },
                )
                .unwrap();
        }
        let writer = own.writer(3).unwrap();
        let nvram = Nvram::new(own.clone(), writer.appender, BackPressure::default());
        let mut identities = BTreeMap::new();
        for (id, name) in [(A, "a"), (B, "b"), (C, "c")] {
            let disk = Disk::open(&dir.path().join(format!("{name}.img"))).unwrap();
            let export = nvram.add_volume(Volume::with_access(id, name, disk, id == C));
            identities.insert(id, Identity::new(export));
        }
        let flusher = Flusher::spawn(
            Arc::clone(&nvram),
            writer.flushed,
            writer.synced,
            FlusherConfig {
                release: Release::Written,
                ..FlusherConfig::default()
            },
        )
        .unwrap();
        let monitor = FailoverMonitor {
            node_id: C,
            control,
            peers: [
                (A, read_only(dir.path(), "a")),
                (B, read_only(dir.path(), "b")),
            ]
            .into(),
            nvram,
            registry: Arc::new(ExportRegistry::new()),
            server: None,
            identities,
            ack: writer.ack,
            handled: 0,
            listen_ip: None,
            server_config: ServerConfig::default(),
            replays: ReplayBook::new(writer.replays),
            quarantine: None,
            pending_replay: None,
            pending_cache_drop: None,
            addresses: Box::new(crate::service_ip::NoServiceAddresses),
            stopped: writer.stopped,
            negotiation: None,
            without_hostd: None,
        };
        Self {
            dir,
            monitor,
            control: control_writer,
            _flusher: flusher,
        }
    }

    /// hostd's command: take `identity` over at `epoch`, replaying b's log.
    fn take_over_from_b(&mut self, identity: u32, epoch: u64) -> Ack {
        self.control.set_epoch(epoch);
        self.control
            .set_owner(
                identity as usize,
                Owner {
                    node: Some(C),
                    epoch,
                },
            )
            .unwrap();
        let command = Command {
            seq: epoch,
            kind: CommandKind::TakeOver,
            identity: u64::from(identity),
            epoch,
            argument: TakeOverArgument {
                replay_from: Some(B),
                port: 0,
            }
            .to_word(),
        };
        let ack = self.monitor.handle(&command);
        if let Some(job) = self.monitor.pending_replay.take() {
            job.start();
        }
        ack
    }

    /// The first three blocks of `identity`, as its clients read them.
    fn blocks(&self, identity: u32) -> Vec<u8> {
        let export = &self.monitor.identities[&identity].export;
        (0..3)
            .map(|block| {
                let mut buf = [0u8; 4096];
                export.read(block * 4096, &mut buf).unwrap();
                buf[0]
            })
            .collect()
    }

    fn disk_blocks(&self, name: &str) -> Vec<u8> {
        let disk = std::fs::read(self.dir.path().join(format!("{name}.img"))).unwrap();
        (0..3).map(|block| disk[block * 4096]).collect()
    }

    fn wait_for_replay_of_b(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mark = self.monitor.nvram.region().replay_of(B);
            if mark.is_some_and(|r| r.status == ReplayStatus::Replayed) {
                return;
            }
            assert!(Instant::now() < deadline, "c's replay of b's log: {mark:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// a's records go to a's disk first, b's on top: block 0 keeps a's 1, blocks 1 and 2 get
/// b's 2s. Without the older log, block 0 would read 0: a write a acknowledged, lost.
#[test]
fn the_dead_takers_unfinished_replay_is_applied_first() {
    let mut chain = Chain::start(false);
    let ack = chain.take_over_from_b(A, 2);
    assert_eq!(ack.status, ack_status::OK);
    assert_eq!(
        chain.blocks(A),
        [1, 2, 2],
        "served at once, b's records on top"
    );
    assert_eq!(
        chain.disk_blocks("a")[0],
        1,
        "a's log was applied before serving"
    );
    // c says it replayed a's log, at this takeover's epoch: a, restarted, may forget it.
    let mark = chain.monitor.nvram.region().replay_of(A).unwrap();
    assert_eq!((mark.status, mark.epoch), (ReplayStatus::Replayed, 2));
    assert_eq!((mark.first_seq, mark.last_seq), (1, 2));

    // b's own identity next: b's records for it, nothing of a's log.
    let ack = chain.take_over_from_b(B, 3);
    assert_eq!(ack.status, ack_status::OK);
    assert_eq!(chain.blocks(B), [3, 0, 0]);
    chain.wait_for_replay_of_b();
    assert_eq!(chain.disk_blocks("a"), [1, 2, 2]);
    assert_eq!(chain.disk_blocks("b"), [3, 0, 0]);
    assert_eq!(chain.blocks(A), [1, 2, 2]);
}

/// b had finished replaying a's log and said so: a's log is not applied again (it would
/// be harmless here, but over newer data it would not be), and c says nothing of it.
#[test]
fn a_finished_replay_is_not_applied_again() {
    let mut chain = Chain::start(true);
    let ack = chain.take_over_from_b(A, 2);
    assert_eq!(ack.status, ack_status::OK);
    assert_eq!(chain.blocks(A), [1, 2, 2]);
    assert!(
        chain
            .monitor
            .nvram
            .region()
            .replay_of(A)
            .is_none_or(|r| r.status == ReplayStatus::None),
        "c replayed nothing of a's log"
    );
    chain.wait_for_replay_of_b();
    assert_eq!(chain.disk_blocks("a"), [1, 2, 2]);
}
