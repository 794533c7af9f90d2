//! The monitor without hostd, over real regions and disks and a coordinator in memory:
//! node b (this node) and node a, whose agent died with two writes in its log.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm::control::Owner;
use shm::node::ack_status;
use shm::{
    Access, BackPressure, Claim, Command, CommandKind, ControlRegion, ControlWriter, EjectReason,
    Entry, Mapping, NodeRegion, ReplayStatus,
};
use wire::agent::IdentityPorts;
use wire::coordinator::{
    CoordinatorState, IdentityOwner, LostReason, MemberRecord, NodeAnswer, NodeRequest,
};

use super::WithoutHostd;
use crate::coordinator::CoordinatorClient;
use crate::coordinator::double::FakeCoordinator;
use crate::export::{Export, ExportRegistry};
use crate::failover::replay::ReplayBook;
use crate::failover::{FailoverMonitor, Identity};
use crate::nbd::ServerConfig;
use crate::nvram::flusher::{Flusher, FlusherConfig, Release};
use crate::nvram::volume::{Disk, Volume};
use crate::nvram::{Nvram, Ownership};
use crate::service_ip::double::Recorded;

const DISK: usize = 64 << 10;
const A: u32 = 0;
const B: u32 = 1;
/// hostd's thresholds in these tests: absent, and a peer dead, after 50 ms of stillness.
const THRESHOLD_MS: u64 = 50;

/// What the coordinator in memory answers a claim with.
type ClaimAnswer = Box<dyn FnMut(u64) -> Option<NodeAnswer> + Send>;

/// The coordinator's state at the start: both members, each the other's taker, each
/// owning its identity.
fn members() -> CoordinatorState {
    CoordinatorState {
        generation: 0,
        nodes: vec![
            MemberRecord {
                node: A,
                member: true,
                since: 0,
                takers: vec![B],
            },
            MemberRecord {
                node: B,
                member: true,
                since: 0,
                takers: vec![A],
            },
        ],
        owners: vec![
            IdentityOwner {
                identity: A,
                node: Some(A),
                generation: 0,
            },
            IdentityOwner {
                identity: B,
                node: Some(B),
                generation: 0,
            },
        ],
    }
}

fn won(number: u64) -> Option<NodeAnswer> {
    Some(NodeAnswer::Won {
        number,
        generation: 1,
        identities: vec![A],
        preempted: vec!["a".into()],
        not_preempted: vec![],
    })
}

struct Pair {
    dir: tempfile::TempDir,
    monitor: FailoverMonitor,
    coordinator: FakeCoordinator,
    /// What the coordinator says its state is.
    state: Arc<Mutex<CoordinatorState>>,
    control: ControlWriter,
    /// a's region, as a's (dead) agent left it: the test may still publish in it.
    a_writer: shm::NodeWriter,
    addresses: Recorded,
    started: Instant,
    _flusher: Flusher,
}

fn region(dir: &Path, id: u32, name: &str) -> NodeRegion {
    let path = dir.join(format!("{name}.region"));
    NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), id, name).unwrap()
}

impl Pair {
    fn start(claim: ClaimAnswer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            std::fs::write(dir.path().join(format!("{name}.img")), vec![0u8; DISK]).unwrap();
        }
        let control = ControlRegion::format(
            Mapping::create_file(&dir.path().join("control"), 1 << 20).unwrap(),
            &["a", "b"],
            &["a", "b"],
        )
        .unwrap();
        let mut control_writer = control.writer().unwrap();
        control_writer.beat(THRESHOLD_MS, THRESHOLD_MS);
        let a = region(dir.path(), A, "a");
        let own = region(dir.path(), B, "b");
        let mut a_writer = a.writer(1).unwrap();
        for (block, byte) in [(0u64, 1u8), (1, 2)] {
            let data = [byte; 4096];
            let entry = Entry::Write {
                export: A,
                offset: block * 4096,
                data: &data,
            };
            a_writer
                .appender
                .append(&entry, BackPressure::default())
                .unwrap();
        }
        let a_seen = NodeRegion::open(
            Mapping::open(&dir.path().join("a.region"), Access::ReadOnly).unwrap(),
        )
        .unwrap();
        let writer = own.writer(2).unwrap();
        let ownership = Ownership {
            control: control.clone(),
            node: B,
            regions: vec![own.clone(), a_seen.clone()],
        };
        let nvram = Nvram::with_ownership(
            own.clone(),
            writer.appender,
            BackPressure::default(),
            Some(ownership),
        );
        let registry = Arc::new(ExportRegistry::new());
        let mut identities = BTreeMap::new();
        for (id, name) in [(A, "a"), (B, "b")] {
            let disk = Disk::open(&dir.path().join(format!("{name}.img"))).unwrap();
            let export = nvram.add_volume(Volume::with_access(id, name, disk, id == B));
            if id == B {
                registry.insert(Arc::clone(&export) as Arc<dyn Export>);
            }
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
        let coordinator = FakeCoordinator::default();
        let state = Arc::new(Mutex::new(members()));
        let told = Arc::clone(&state);
        let mut claim = claim;
        coordinator.answer_with(move |request| match request {
            NodeRequest::State => Some(NodeAnswer::State {
                state: told.lock().unwrap().clone(),
            }),
            NodeRequest::Claim { number, .. } => claim(*number),
        });
        let started = Instant::now();
        let addresses = Recorded::default();
        let monitor = FailoverMonitor {
            node_id: B,
            control,
            peers: [(A, a_seen)].into(),
            nvram,
            registry,
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
            addresses: Box::new(addresses.clone()),
            stopped: writer.stopped,
            negotiation: None,
            without_hostd: Some(WithoutHostd::new(
                CoordinatorClient::new(coordinator.channel(), 10),
                IdentityPorts::default(),
                writer.claims,
                false,
                started,
            )),
        };
        Self {
            dir,
            monitor,
            coordinator,
            state,
            control: control_writer,
            a_writer,
            addresses,
            started,
            _flusher: flusher,
        }
    }

    /// A round of the monitor `ms` after it started.
    fn round_at(&mut self, ms: u64) {
        self.monitor
            .act_without_hostd(self.started + Duration::from_millis(ms));
    }

    fn claims_asked(&self) -> Vec<u64> {
        self.coordinator
            .requests()
            .iter()
            .filter_map(|r| match r {
                NodeRequest::Claim { victim, number } => {
                    assert_eq!(*victim, A);
                    Some(*number)
                }
                NodeRequest::State => None,
            })
            .collect()
    }

    /// Blocks 0, 1 and 2 of `identity`, as its clients read them.
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

    fn serves(&self, identity: u32) -> bool {
        let export = &self.monitor.identities[&identity].export;
        export.volume().writable() && self.monitor.registry.get(&export.volume().name).is_some()
    }

    fn owner(&self, identity: u32) -> Option<Owner> {
        self.monitor.owner(identity)
    }
}

/// While hostd's counter moves, the coordinator is not even asked; once it has stood
/// still past the threshold and a is dead, b claims a, publishes its claim, and serves
/// a's identity with a's acknowledged writes, replayed onto a's disk in the background.
#[test]
fn a_won_claim_serves_the_victims_identity_with_its_records() {
    let mut pair = Pair::start(Box::new(won));
    for ms in [10, 100, 200] {
        pair.control.beat(THRESHOLD_MS, THRESHOLD_MS);
        pair.round_at(ms);
    }
    assert!(pair.coordinator.requests().is_empty(), "hostd is present");
    assert!(!pair.serves(A));

    pair.round_at(260);
    assert_eq!(pair.claims_asked(), [10]);
    assert_eq!(
        pair.monitor.nvram.region().claim(A),
        Some(Claim {
            generation: 1,
            victim: A
        })
    );
    assert_eq!(
        pair.owner(A),
        Some(Owner {
            node: Some(B),
            epoch: 1
        }),
        "the claim is the newest word"
    );
    assert!(pair.serves(A));
    assert!(pair.serves(B), "b's own identity is still served");
    assert_eq!(pair.addresses.take(), ["hold a"]);
    assert_eq!(pair.blocks(A), [1, 2, 0], "a's acknowledged writes");
    pair.monitor.identities[&A]
        .export
        .write(8192, &[3; 4096], false)
        .unwrap();
    assert_eq!(pair.blocks(A), [1, 2, 3]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair
        .monitor
        .nvram
        .region()
        .replay_of(A)
        .is_none_or(|r| r.status != ReplayStatus::Replayed)
        || pair.disk_blocks("a") != [1, 2, 3]
    {
        assert!(Instant::now() < deadline, "the replay and the flush");
        std::thread::sleep(Duration::from_millis(5));
    }
    // a owns nothing any more: no second claim, however long it stays dead.
    for ms in [300, 2000, 9000] {
        pair.round_at(ms);
    }
    assert_eq!(pair.claims_asked(), [10]);
}

/// The coordinator says b is no member (a claimed it first): b stops serving everything,
/// drops its address, says so in its region, and claims nothing more.
#[test]
fn a_claim_lost_as_no_member_ejects_the_node() {
    let mut pair = Pair::start(Box::new(|number| {
        let mut state = members();
        state.generation = 3;
        state.nodes[B as usize].member = false;
        Some(NodeAnswer::Lost {
            number,
            reason: LostReason::NotMember,
            state,
        })
    }));
    pair.round_at(100);
    assert_eq!(pair.claims_asked(), [10]);
    assert!(!pair.serves(A) && !pair.serves(B));
    assert_eq!(pair.addresses.take(), ["drop b"]);
    let ejected = pair.monitor.nvram.region().ejected().unwrap();
    assert_eq!(
        (ejected.generation, ejected.reason),
        (3, EjectReason::NotMember)
    );
    let refused = pair.monitor.identities[&B]
        .export
        .write(0, &[9; 4096], false)
        .unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    // A standby for the rest of its life: no more claims, and no takeover from hostd.
    for ms in [2000, 9000] {
        pair.round_at(ms);
    }
    assert_eq!(pair.claims_asked(), [10]);
    let command = Command {
        seq: 1,
        kind: CommandKind::TakeOver,
        identity: u64::from(B),
        epoch: 0,
        argument: 0,
    };
    assert_eq!(pair.monitor.handle(&command).status, ack_status::FAILED);
    assert!(!pair.serves(B));
}

/// The coordinator's state already says b is no member: b ejects itself without claiming.
#[test]
fn a_node_the_coordinator_says_is_no_member_ejects_itself() {
    let mut pair = Pair::start(Box::new(won));
    {
        let mut state = pair.state.lock().unwrap();
        state.generation = 2;
        state.nodes[B as usize].member = false;
    }
    pair.round_at(100);
    assert!(pair.claims_asked().is_empty());
    assert!(!pair.serves(B));
    let ejected = pair.monitor.nvram.region().ejected().unwrap();
    assert_eq!(
        (ejected.generation, ejected.reason),
        (2, EjectReason::NotMember)
    );
}

/// The answers to a claim are lost twice: the claim is asked again a second later with
/// the same number, and its answer (the coordinator's stored one) is acted on.
#[test]
fn a_claim_without_answer_is_asked_again_with_its_number() {
    let mut lost = 0;
    let mut pair = Pair::start(Box::new(move |number| {
        lost += 1;
        if lost <= 2 { None } else { won(number) }
    }));
    pair.round_at(100);
    assert_eq!(pair.claims_asked(), [10, 10], "two attempts, no answer");
    assert!(!pair.serves(A));
    pair.round_at(600);
    assert_eq!(
        pair.claims_asked(),
        [10, 10],
        "asked again only after a second"
    );
    pair.round_at(1200);
    assert_eq!(pair.claims_asked(), [10, 10, 10]);
    assert!(pair.serves(A));
    assert_eq!(pair.blocks(A), [1, 2, 0]);
}

/// a, which b took for dead, was only stopped, and claimed b first: b finds a's claim of
/// b's identity in a's region, stops serving it and ejects itself.
#[test]
fn a_peers_claim_fences_this_node_and_it_ejects_itself() {
    let mut pair = Pair::start(Box::new(won));
    // b is not a's taker here: it does not claim a.
    pair.state.lock().unwrap().nodes[A as usize].takers = vec![];
    pair.round_at(100);
    assert!(pair.claims_asked().is_empty());
    assert!(pair.serves(B));
    pair.a_writer.claims.publish(
        B,
        Claim {
            generation: 4,
            victim: B,
        },
    );
    pair.monitor.fence_lost_identities();
    assert!(!pair.serves(B));
    assert_eq!(pair.addresses.take(), ["drop b"]);
    let stopped = pair.monitor.nvram.region().stopped_serving().unwrap();
    assert_eq!((stopped.identity, stopped.epoch), (B, 4));
    let ejected = pair.monitor.nvram.region().ejected().unwrap();
    assert_eq!(
        (ejected.generation, ejected.reason),
        (4, EjectReason::Claimed)
    );
}
