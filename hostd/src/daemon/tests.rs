//! The takeover state machine over the fake backend: real regions and a real control
//! region in a temporary directory, fake agents that beat and answer commands.

use std::time::{Duration, Instant};

use shm::CommandKind;
use wire::control::{NodeState, Response};
use wire::events::Event;
use wire::state_dir::StateDir;

use super::backend::fake::{Answer, Call, FakeBackend, FakeCoordinator, FakeHandle, FakeStorage};
use super::cluster::Cluster;
use super::fencing::{self, FenceError};
use super::moves::{self, Moves};
use super::prepare;
use super::topology::NodeId;
use crate::config::{Backend, Config};

const A: usize = 0;
const B: usize = 1;

struct Harness {
    cluster: Cluster,
    moves: Moves,
    fake: FakeHandle,
    state: StateDir,
    /// The storage's coordinator, when it keeps one.
    coordinator: Option<FakeCoordinator>,
    _dir: tempfile::TempDir,
}

fn node(index: usize) -> NodeId {
    NodeId::from_index(index)
}

impl Harness {
    /// A launched pair whose agents beat every 2 ms, judged down after 150 ms of silence.
    fn pair() -> Self {
        Self::pair_with(|_| {})
    }

    /// A pair whose fake agents are set up by `before` before launch.
    fn pair_with(before: impl FnOnce(&FakeHandle)) -> Self {
        Self::pair_configured(before, |_| {})
    }

    /// A pair whose configuration is changed by `configure` and whose fake agents are set
    /// up by `before`, before launch.
    fn pair_configured(
        before: impl FnOnce(&FakeHandle),
        configure: impl FnOnce(&mut Config),
    ) -> Self {
        Self::launch(before, configure, false)
    }

    /// A pair whose disks a (fake) storage daemon serves with reservations.
    fn pair_with_storage() -> Self {
        Self::launch(|_| {}, |_| {}, true)
    }

    /// A pair whose (fake) storage daemon keeps a coordinator as well.
    fn pair_with_coordinator() -> (Self, FakeCoordinator) {
        let coordinator = FakeCoordinator::new(&[vec![B as u32], vec![A as u32]]);
        let h = Self::launch_with(|_| {}, |_| {}, true, Some(coordinator.clone()));
        (h, coordinator)
    }

    fn launch(
        before: impl FnOnce(&FakeHandle),
        configure: impl FnOnce(&mut Config),
        storage: bool,
    ) -> Self {
        Self::launch_with(before, configure, storage, None)
    }

    fn launch_with(
        before: impl FnOnce(&FakeHandle),
        configure: impl FnOnce(&mut Config),
        storage: bool,
        coordinator: Option<FakeCoordinator>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let mut config = Config {
            backend: Backend::Process,
            ..Config::default()
        };
        config.regions.node_mib = 1;
        config.disks.size_mib = 1;
        config.heartbeat.interval_ms = 10;
        config.heartbeat.timeout_ms = 150;
        configure(&mut config);
        // Tests run in parallel, and the launch checks that each node's port is free: each
        // harness gets ports of its own, not the defaults every other harness has too.
        for node in &mut config.nodes {
            node.nbd_port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|listener| listener.local_addr())
                .unwrap()
                .port();
        }
        let (files, control) = prepare::prepare(&config, &state, None).unwrap();
        let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        let (backend, fake) = FakeBackend::new(&names, &control);
        before(&fake);
        let storage = storage.then(|| {
            let storage = FakeStorage::new(&fake, &names);
            let storage = match &coordinator {
                Some(coordinator) => storage.with_coordinator(coordinator),
                None => storage,
            };
            Box::new(storage) as Box<dyn crate::storage::Storage>
        });
        let cluster = Cluster::new(&config, &state, &files, &control, Box::new(backend))
            .unwrap()
            .with_storage(storage)
            .launch()
            .unwrap();
        Harness {
            cluster,
            moves: Moves::default(),
            fake,
            state,
            coordinator,
            _dir: dir,
        }
    }

    /// Runs the main loop's tick until `done` holds; fails after `timeout`.
    fn run_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.cluster) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; calls {:#?}",
                self.fake.calls()
            );
            self.moves.tick(&mut self.cluster);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Runs the loop for `time` and checks `invariant` at every tick.
    fn run_for(&mut self, time: Duration, invariant: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + time;
        while Instant::now() < deadline {
            self.moves.tick(&mut self.cluster);
            assert!(invariant(&self.cluster), "calls {:#?}", self.fake.calls());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn up(&mut self) {
        self.run_until("every node up", Duration::from_secs(5), |c| {
            c.topology()
                .nodes()
                .all(|n| c.node(n).state() == NodeState::Up)
        });
    }

    fn crash(&mut self, index: usize) {
        let name = self.cluster.topology().name(node(index)).to_owned();
        super::inject::inject(&mut self.cluster, &name, wire::control::KillSignal::Kill).unwrap();
    }

    fn owner(&self, identity: usize) -> Option<usize> {
        self.cluster
            .owner_of(node(identity).home_identity())
            .map(NodeId::index)
    }

    fn events(&self) -> Vec<Event> {
        let text = std::fs::read_to_string(self.state.event_log()).unwrap_or_default();
        let (lines, bad) = wire::events::parse_log(&text);
        assert!(bad.is_empty(), "{bad:?}");
        lines.into_iter().map(|line| line.event).collect()
    }
}

fn position(calls: &[Call], wanted: impl Fn(&Call) -> bool) -> usize {
    calls
        .iter()
        .position(wanted)
        .unwrap_or_else(|| panic!("no such call in {calls:#?}"))
}

/// A crashed node is killed and reaped while the epoch is still the old one; only then
/// does its identity get a new epoch and owner, and the taker its command.
#[test]
fn the_fence_comes_before_the_epoch_bump() {
    let mut h = Harness::pair();
    h.up();
    assert_eq!(h.cluster.epoch(), 0);
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let calls = h.fake.calls();
    let fence = position(&calls, |c| matches!(c, Call::Fence { node: A, .. }));
    assert_eq!(
        calls[fence],
        Call::Fence { node: A, epoch: 0 },
        "fenced only after the epoch moved on"
    );
    let takeover = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                node: B,
                kind: CommandKind::TakeOver,
                ..
            }
        )
    });
    assert!(fence < takeover, "{calls:#?}");
    assert_eq!(
        calls[takeover],
        Call::Command {
            node: B,
            kind: CommandKind::TakeOver,
            identity: A as u64,
            epoch: 1
        }
    );
    assert_eq!(h.cluster.epoch(), 1);
    assert_eq!(h.cluster.node(node(A)).state(), NodeState::Fenced);
    // The address follows, last.
    let forward = position(&calls, |c| matches!(c, Call::Forward { node: B, .. }));
    assert!(takeover < forward);
}

/// While the only node that could take over is still booting, nothing moves; the wait is
/// reported once, and the takeover happens as soon as the node is up.
#[test]
fn no_takeover_while_the_partner_boots() {
    let mut h = Harness::pair_with(|fake| fake.set(B, |b| b.beats = false));
    h.run_until("a up", Duration::from_secs(5), |c| {
        c.node(node(A)).state() == NodeState::Up
    });
    assert_eq!(h.cluster.node(node(B)).state(), NodeState::Booting);
    h.crash(A);
    h.run_until("a fenced", Duration::from_secs(5), |c| {
        c.node(node(A)).state() == NodeState::Fenced
    });
    h.run_for(Duration::from_millis(300), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(A)) && c.epoch() == 0
    });
    assert!(
        !h.fake.calls().iter().any(|c| matches!(
            c,
            Call::Command {
                kind: CommandKind::TakeOver,
                ..
            }
        )),
        "a takeover was commanded to a booting node"
    );
    let waits = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::MoveFailed { error, .. } if error.contains("the takeover waits until")))
        .count();
    assert_eq!(waits, 1, "the wait is reported once");

    h.fake.set(B, |b| b.beats = true);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
}

/// A planned takeover whose release fails leaves everything as it was: the old owner
/// keeps the identity and gets its address back, the epoch does not move.
#[test]
fn a_failed_release_rolls_back() {
    let mut h = Harness::pair();
    h.up();
    h.fake.set(A, |a| a.answer = Answer::Fail);
    let error = moves::planned_takeover(&mut h.cluster, "a", None).unwrap_err();
    assert!(
        wire::error_chain::one_line(&error).contains("failed command"),
        "{error}"
    );
    assert_eq!(h.owner(A), Some(A));
    assert_eq!(h.cluster.epoch(), 0);
    let calls = h.fake.calls();
    let port = h.cluster.port(node(A).home_identity());
    let unforward = position(&calls, |c| *c == Call::Unforward { node: A, port });
    let restored = position(&calls, |c| *c == Call::Forward { node: A, port });
    assert!(unforward < restored, "{calls:#?}");
    // The old owner may have stopped serving before its release failed: it is told to
    // serve again (no replay, same epoch), and nobody else is.
    let again = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                node: A,
                kind: CommandKind::TakeOver,
                epoch: 0,
                ..
            }
        )
    });
    assert!(unforward < again && again < restored, "{calls:#?}");
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            Call::Command {
                node: B,
                kind: CommandKind::TakeOver,
                ..
            }
        )),
        "{calls:#?}"
    );

    // It works once the release does.
    h.fake.set(A, |a| a.answer = Answer::Ok);
    let report = moves::planned_takeover(&mut h.cluster, "a", None).unwrap();
    assert_eq!((report.from.as_str(), report.to.as_str()), ("a", "b"));
    assert_eq!(h.owner(A), Some(B));
    assert_eq!(h.cluster.epoch(), 1);
}

/// The holder refuses a negotiated takeover: nothing moves, no release is asked for, and
/// the error gives the holder's reason; once it agrees, the takeover goes on and says so.
#[test]
fn a_holder_that_refuses_the_negotiation_keeps_its_identity() {
    let mut h = Harness::pair();
    h.up();
    h.fake
        .set(B, |b| b.holder_refuses = Some(shm::Refusal::DiskFailing));
    let error = moves::planned_takeover(&mut h.cluster, "a", None).unwrap_err();
    let text = wire::error_chain::one_line(&error);
    assert!(
        text.contains(
            "a refuses to give its identity up, asked by b over the interconnect: its disk refused"
        ) && text.contains("hostd fence a"),
        "{text}"
    );
    assert_eq!(h.owner(A), Some(A));
    assert_eq!(h.cluster.epoch(), 0);
    let calls = h.fake.calls();
    let asked = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                node: B,
                kind: CommandKind::Negotiate,
                ..
            }
        )
    });
    assert!(asked < calls.len());
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            Call::Command {
                kind: CommandKind::Release,
                ..
            } | Call::Unforward { .. }
        )),
        "{calls:#?}"
    );
    h.fake.set(B, |b| b.holder_refuses = None);
    let report = moves::planned_takeover(&mut h.cluster, "a", None).unwrap();
    assert!(
        report.reason.contains("agreed by a over the interconnect"),
        "{}",
        report.reason
    );
    assert_eq!(h.owner(A), Some(B));
}

/// The taker refuses a planned takeover after the old owner released the identity: the old
/// owner serves it again (owner, command, address) instead of nobody.
#[test]
fn a_failed_planned_takeover_gives_the_identity_back() {
    let mut h = Harness::pair();
    h.up();
    h.fake.set(B, |b| b.answer = Answer::Fail);
    let error = moves::planned_takeover(&mut h.cluster, "a", None).unwrap_err();
    assert!(
        wire::error_chain::one_line(&error).contains("failed command"),
        "{error}"
    );
    assert_eq!(h.owner(A), Some(A));
    assert_eq!(h.cluster.epoch(), 2, "taken at 1, given back at 2");
    let calls = h.fake.calls();
    let port = h.cluster.port(node(A).home_identity());
    let unforward = position(&calls, |c| *c == Call::Unforward { node: A, port });
    let taken_back = position(&calls, |c| {
        *c == Call::Command {
            node: A,
            kind: CommandKind::TakeOver,
            identity: 0,
            epoch: 2,
        }
    });
    let restored = position(&calls, |c| *c == Call::Forward { node: A, port });
    assert!(
        unforward < taken_back && taken_back < restored,
        "{calls:#?}"
    );
}

/// Both nodes die one after the other. Nothing is handed to a dead node: the identities
/// wait for a live one, and since none is left, hostd restarts one by itself, which then
/// takes everything over by replaying the last holder's log.
#[test]
fn a_double_failure_is_recovered_by_a_restart() {
    let mut h = Harness::pair();
    h.up();
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    h.crash(B);
    h.run_until("a holds both", Duration::from_secs(10), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(A))
            && c.owner_of(node(B).home_identity()) == Some(node(A))
    });
    let calls = h.fake.calls();
    // Every takeover went to a node that was alive: b before its death, a after its
    // restart.
    let b_fenced = position(&calls, |c| matches!(c, Call::Fence { node: B, .. }));
    let a_restarted = calls
        .iter()
        .rposition(|c| matches!(c, Call::Spawn { node: A, .. }))
        .unwrap();
    assert!(b_fenced < a_restarted, "{calls:#?}");
    for (index, call) in calls.iter().enumerate() {
        if let Call::Command {
            node: taker,
            kind: CommandKind::TakeOver,
            ..
        } = call
        {
            assert!(
                (*taker == B && index < b_fenced) || (*taker == A && index > a_restarted),
                "a takeover commanded to a dead node: {calls:#?}"
            );
        }
    }
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::NodeRestarted { node, attempt: 1, .. } if node == "a"
    )));
}

/// A node that keeps dying is restarted only within the budget, with growing pauses; then
/// hostd says so and stops, and `hostd giveback` is still the way out.
#[test]
fn restarts_stop_at_the_limit_and_giveback_still_works() {
    let mut h = Harness::pair_configured(|_| {}, |config| config.recovery.restart_backoff_ms = 20);
    h.up();
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    // From now on a dies as soon as it starts.
    h.fake.set(A, |a| a.dies_at_start = true);
    h.crash(B);
    h.run_until("restarts exhausted", Duration::from_secs(30), |c| {
        let text = std::fs::read_to_string(c.state_dir().event_log()).unwrap_or_default();
        text.contains("restarts_exhausted")
    });
    let restarts = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::NodeRestarted { .. }))
        .count();
    assert_eq!(restarts, 5, "the default restart_limit");
    h.run_for(Duration::from_millis(300), |c| {
        c.node(node(A)).state() == NodeState::Fenced
    });
    h.fake.set(A, |a| a.dies_at_start = false);
    let (reply, answer) = crossbeam_channel::bounded(1);
    h.moves.start_giveback(&mut h.cluster, "a", Some(reply));
    let response = loop {
        if let Ok(response) = answer.try_recv() {
            break response;
        }
        h.moves.tick(&mut h.cluster);
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(matches!(response, Response::Moved(_)), "{response:?}");
    assert_eq!(h.owner(A), Some(A));
}

/// The holder dies as it is asked to release the identity during a giveback: the giveback
/// still ends with the node serving its identity (its log replayed from the dead holder's),
/// and says so, instead of reporting a failure while the cluster recovers on its own.
#[test]
fn a_giveback_whose_holder_dies_while_releasing_replays_and_succeeds() {
    let mut h = Harness::pair();
    h.up();
    moves::planned_takeover(&mut h.cluster, "a", None).unwrap();
    assert_eq!(h.owner(A), Some(B));
    h.fake.set(B, |b| b.answer = Answer::Die);
    let (reply, answer) = crossbeam_channel::bounded(1);
    h.moves.start_giveback(&mut h.cluster, "a", Some(reply));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let response = loop {
        if let Ok(response) = answer.try_recv() {
            break response;
        }
        assert!(std::time::Instant::now() < deadline, "no answer");
        h.moves.tick(&mut h.cluster);
        std::thread::sleep(Duration::from_millis(2));
    };
    let Response::Moved(report) = response else {
        panic!("the giveback failed: {response:?}");
    };
    assert!(!report.planned, "a replay from the dead holder: {report:?}");
    assert!(
        report.reason.contains("b died while releasing"),
        "{report:?}"
    );
    assert_eq!(h.owner(A), Some(A));
    assert!(h.cluster.node(node(B)).fenced);
}

/// A node restarted while its partner holds its identity does not take its address at
/// start; the giveback releases the identity from the partner first, then hands it over.
#[test]
fn a_node_restarted_while_its_partner_holds_its_identity_waits_for_the_giveback() {
    let mut h = Harness::pair();
    h.up();
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let (reply, answer) = crossbeam_channel::bounded(1);
    h.moves.start_giveback(&mut h.cluster, "a", Some(reply));
    let response = loop {
        if let Ok(response) = answer.try_recv() {
            break response;
        }
        h.moves.tick(&mut h.cluster);
        std::thread::sleep(Duration::from_millis(2));
    };
    let Response::Moved(report) = response else {
        panic!("giveback failed: {response:?}");
    };
    assert_eq!((report.from.as_str(), report.to.as_str()), ("b", "a"));
    assert!(report.timeline_ms.restarted.is_some());
    assert_eq!(h.owner(A), Some(A));
    assert_eq!(h.cluster.epoch(), 2);
    let calls = h.fake.calls();
    let port = h.cluster.port(node(A).home_identity());
    let spawns: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::Spawn { node: A, .. }))
        .collect();
    assert_eq!(
        spawns.last(),
        Some(&&Call::Spawn {
            node: A,
            ports: vec![]
        }),
        "the restarted node must not serve its address while b holds it"
    );
    let release = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                node: B,
                kind: CommandKind::Release,
                ..
            }
        )
    });
    let takeover = calls
        .iter()
        .rposition(|c| {
            matches!(
                c,
                Call::Command {
                    node: A,
                    kind: CommandKind::TakeOver,
                    ..
                }
            )
        })
        .unwrap();
    let forward = calls
        .iter()
        .rposition(|c| *c == Call::Forward { node: A, port })
        .unwrap();
    assert!(release < takeover && takeover < forward, "{calls:#?}");
}

/// Requests about nodes that do not exist, or moves that make no sense, are refused with
/// words, and change nothing.
#[test]
fn senseless_requests_are_refused() {
    let mut h = Harness::pair();
    h.up();
    let no_node = moves::planned_takeover(&mut h.cluster, "z", None).unwrap_err();
    assert!(no_node.to_string().contains("no node is called"));
    let (reply, answer) = crossbeam_channel::bounded(1);
    h.moves.start_giveback(&mut h.cluster, "a", Some(reply));
    let Ok(Response::Error { message }) = answer.try_recv() else {
        panic!("a giveback of an identity at home was not refused");
    };
    assert!(
        message.contains("holds its own identity already"),
        "{message}"
    );
    assert_eq!(h.cluster.epoch(), 0);
}

/// Finding 15: a restarted node's new console does not replace the crashed boot's: that
/// one is kept as `NAME.previous.log`.
#[test]
fn a_restart_keeps_the_previous_console() {
    let mut h = Harness::pair();
    h.up();
    let console = h.state.console_log("a");
    std::fs::write(&console, "the kernel's last words\n").unwrap();
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let (reply, answer) = crossbeam_channel::bounded(1);
    h.moves.start_giveback(&mut h.cluster, "a", Some(reply));
    while answer.try_recv().is_err() {
        h.moves.tick(&mut h.cluster);
        std::thread::sleep(Duration::from_millis(2));
    }
    let previous = std::fs::read_to_string(h.state.root().join("consoles/a.previous.log")).unwrap();
    assert_eq!(previous, "the kernel's last words\n");
}

/// A taker that dies before it acknowledges a takeover never said it replayed the old
/// owner's log: the identity goes back to its fenced owner at a new epoch (so no one
/// serves it unreplayed), and the next taker replays that log.
#[test]
fn a_taker_that_dies_before_acknowledging_gives_the_identity_back() {
    let mut h = Harness::pair();
    h.up();
    h.fake.set(B, |b| b.answer = Answer::Die);
    h.crash(A);
    h.run_until("b dies on the takeover", Duration::from_secs(5), |c| {
        let text = std::fs::read_to_string(c.state_dir().event_log()).unwrap_or_default();
        text.contains("its takeover failed")
    });
    h.fake.set(B, |b| b.answer = Answer::Ok);
    // The failed claim was taken back at the next epoch: the first takeover of a was at
    // epoch 1, and a's owner was a again (epoch 2) before anything else moved.
    let calls = h.fake.calls();
    let first = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                kind: CommandKind::TakeOver,
                identity: 0,
                ..
            }
        )
    });
    assert!(
        matches!(
            calls[first],
            Call::Command {
                node: B,
                epoch: 1,
                ..
            }
        ),
        "{calls:#?}"
    );
    h.run_until("a live node holds a", Duration::from_secs(10), |c| {
        c.owner_of(node(A).home_identity())
            .is_some_and(|owner| c.node(owner).state() == NodeState::Up)
    });
    let takeovers_of_a: Vec<Call> = h
        .fake
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::Command {
                    kind: CommandKind::TakeOver,
                    identity: 0,
                    ..
                }
            )
        })
        .collect();
    assert!(takeovers_of_a.len() >= 2, "{takeovers_of_a:#?}");
    assert!(
        matches!(takeovers_of_a.last(), Some(Call::Command { epoch, .. }) if *epoch >= 3),
        "the next takeover came after the claim was taken back: {takeovers_of_a:#?}"
    );
}

/// Finding 16: once both agents are up, status calls a takeover of either possible (the
/// taker has the node's region), and names who serves an identity whose owner is fenced.
#[test]
fn status_is_right_about_takeovers_and_serving() {
    let mut h = Harness::pair();
    h.up();
    h.run_until(
        "both partners have the other's region",
        Duration::from_secs(5),
        |c| c.status().nodes.iter().all(|n| n.takeover_possible),
    );
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let status = h.cluster.status();
    let a = &status.nodes[A];
    assert_eq!(a.served_by.as_deref(), Some("b"));
    assert_eq!(a.served_by_state, Some(NodeState::Up));
    let b = &status.nodes[B];
    assert!(!b.takeover_possible, "{}", b.takeover_reason);
}

/// A node whose process is stopped (SIGSTOP) is Down at once, long before its heartbeat
/// could time out, and the reason says so.
#[test]
fn a_stopped_node_is_taken_over_without_waiting_for_its_heartbeat() {
    let mut h = Harness::pair_configured(
        |_| {},
        |config| {
            config.heartbeat.timeout_ms = 20_000;
            config.heartbeat.min_timeout_ms = Some(10_000);
        },
    );
    h.up();
    let name = h.cluster.topology().name(node(A)).to_owned();
    let started = Instant::now();
    super::inject::inject(&mut h.cluster, &name, wire::control::KillSignal::Stop).unwrap();
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let reason = h
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::NodeState {
                node, to, detail, ..
            } if node == "a" && to == NodeState::Down => Some(detail),
            _ => None,
        })
        .unwrap();
    assert!(reason.contains("is stopped"), "{reason}");
}

/// A node that stops beating while its process runs is Down at the phi detector's floor,
/// not at the (here much longer) timeout.
#[test]
fn a_silent_node_is_down_at_the_floor_not_the_timeout() {
    let mut h = Harness::pair_configured(
        |_| {},
        |config| {
            config.heartbeat.timeout_ms = 20_000;
            config.heartbeat.min_timeout_ms = Some(300);
        },
    );
    h.up();
    // Enough beats for the detector to know the node.
    h.run_for(Duration::from_millis(300), |_| true);
    h.fake.set(A, |a| a.beats = false);
    let started = Instant::now();
    h.run_until("b holds a", Duration::from_secs(10), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let reason = h.cluster.node(node(A)).health_reason();
    assert!(reason.contains("past what its intervals allow"), "{reason}");
}

const C: usize = 2;

impl Harness {
    /// Three nodes a, b and c, each taken over by the others in ring order unless
    /// `configure` says otherwise.
    fn three(configure: impl FnOnce(&mut Config)) -> Self {
        Self::pair_configured(
            |_| {},
            |config| {
                config.nodes.push(crate::config::NodeConfig {
                    name: "c".into(),
                    nbd_port: 10811,
                    kernel_args: String::new(),
                    takeover_by: None,
                    address: None,
                    service_ip: None,
                });
                configure(config);
            },
        )
    }
}

/// `hostd takeover a --to c` moves a's identity to c, skipping b; without `--to` the
/// first node of a's list that is up takes it.
#[test]
fn a_planned_takeover_goes_to_the_chosen_node_or_the_first_up() {
    let mut h = Harness::three(|_| {});
    h.up();
    let report = moves::planned_takeover(&mut h.cluster, "a", Some("c")).unwrap();
    assert_eq!((report.from.as_str(), report.to.as_str()), ("a", "c"));
    assert!(report.reason.contains("--to c"), "{}", report.reason);
    assert_eq!(h.owner(A), Some(C));
    assert_eq!(h.owner(B), Some(B));

    // b dies: its identity goes to c (b's list is c, a); a's takeover skips dead b.
    let mut h = Harness::three(|_| {});
    h.up();
    h.crash(B);
    h.run_until("c holds b", Duration::from_secs(5), |c| {
        c.owner_of(node(B).home_identity()) == Some(node(C))
    });
    let report = moves::planned_takeover(&mut h.cluster, "a", None).unwrap();
    assert_eq!((report.from.as_str(), report.to.as_str()), ("a", "c"));
    assert_eq!(h.owner(A), Some(C));
}

/// a's first taker b fails the takeover: b is passed over for a while and the next node of
/// a's list, c, takes a over, instead of b being asked again on every tick.
#[test]
fn a_taker_that_fails_is_passed_over_for_the_next() {
    let mut h = Harness::three(|_| {});
    h.up();
    h.fake.set(B, |b| b.answer = Answer::Fail);
    h.crash(A);
    h.run_until("c holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(C))
    });
    let asked_b = h
        .fake
        .calls()
        .iter()
        .filter(|c| {
            matches!(
                c,
                Call::Command {
                    node: B,
                    kind: CommandKind::TakeOver,
                    ..
                }
            )
        })
        .count();
    assert_eq!(asked_b, 1, "b was asked once");
}

/// A chosen taker must be another node of the cluster, in the node's list, and up.
#[test]
fn a_planned_takeover_to_a_node_that_may_not_take_it_is_refused() {
    let mut h = Harness::three(|config| config.nodes[0].takeover_by = Some(vec!["b".into()]));
    h.up();
    let refused = |h: &mut Harness, to: Option<&str>| {
        let error = moves::planned_takeover(&mut h.cluster, "a", to).unwrap_err();
        wire::error_chain::one_line(&error)
    };
    for (to, expected) in [
        (
            Some("c"),
            "c may not take over a's identity (takeover_by for a is [b])",
        ),
        (Some("a"), "a cannot take over its own identity"),
        (Some("z"), "no node is called \"z\""),
    ] {
        let message = refused(&mut h, to);
        assert!(message.contains(expected), "{to:?}: {message}");
    }
    h.crash(B);
    h.run_until("c holds b", Duration::from_secs(5), |c| {
        c.owner_of(node(B).home_identity()) == Some(node(C))
    });
    let message = refused(&mut h, Some("b"));
    assert!(
        message.contains("node b is fenced: a planned takeover needs the taker up"),
        "{message}"
    );
    let message = refused(&mut h, None);
    assert!(
        message.contains(
            "no node that may take over a's identity is up (takeover_by for a is [b]: b is fenced)"
        ),
        "{message}"
    );
    assert_eq!(h.owner(A), Some(A));
    assert_eq!(h.cluster.epoch(), 1, "only b's takeover moved the epoch");
}

/// Status names, per identity, who would take it over next: the first node of its
/// holder's list that is not dead.
#[test]
fn status_names_the_next_taker_of_each_identity() {
    let mut h = Harness::three(|_| {});
    h.up();
    h.run_until(
        "every taker has its node's region",
        Duration::from_secs(5),
        |c| c.status().nodes.iter().all(|n| n.takeover_possible),
    );
    let status = h.cluster.status();
    let next: Vec<&str> = status.nodes.iter().map(|n| n.next_taker.as_str()).collect();
    assert_eq!(next, ["b", "c", "a"]);
    assert_eq!(
        status.nodes[A].takeover_reason,
        "taker b is up and reads its region"
    );

    h.crash(B);
    h.run_until("c holds b", Duration::from_secs(5), |c| {
        c.owner_of(node(B).home_identity()) == Some(node(C))
    });
    let status = h.cluster.status();
    // a's list is b, c: b is dead. b's identity is with c, whose list is a, b.
    let next: Vec<&str> = status.nodes.iter().map(|n| n.next_taker.as_str()).collect();
    assert_eq!(next, ["c", "a", "a"]);
    let b = &status.nodes[B];
    assert!(!b.takeover_possible);
    assert_eq!(
        b.takeover_reason,
        "b does not hold its identity now (c does)"
    );
}

fn takeover_to(node: usize) -> impl Fn(&Call) -> bool {
    move |c| matches!(c, Call::Command { node: n, kind: CommandKind::TakeOver, .. } if *n == node)
}

/// With a storage daemon, every start registers the node's keys first, and a crashed
/// node's keys are preempted before it is killed, both before the taker's command.
#[test]
fn a_fence_preempts_the_keys_before_the_kill() {
    let mut h = Harness::pair_with_storage();
    h.up();
    let calls = h.fake.calls();
    for n in [A, B] {
        let register = position(&calls, |c| *c == Call::Register { node: n });
        let spawn = position(
            &calls,
            |c| matches!(c, Call::Spawn { node, .. } if *node == n),
        );
        assert!(register < spawn, "{calls:#?}");
    }
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let calls = h.fake.calls();
    let preempt = position(&calls, |c| *c == Call::Preempt { node: A });
    let fence = position(&calls, |c| matches!(c, Call::Fence { node: A, .. }));
    let takeover = position(&calls, takeover_to(B));
    assert!(preempt < fence && fence < takeover, "{calls:#?}");
    let events = h.events();
    let preempted = events
        .iter()
        .position(|e| matches!(e, Event::DiskPreempted { node, .. } if node == "a"))
        .unwrap();
    let serving = events
        .iter()
        .position(|e| matches!(e, Event::ServingStarted { identity, node, .. } if identity == "a" && node == "b"))
        .unwrap();
    assert!(preempted < serving, "{events:#?}");
}

/// `hostd fence a --keep-running`: a's keys go, its process stays, its identity moves; a
/// second fence is refused; `unfence` stops the stale process before registering it
/// again; a giveback brings it back.
#[test]
fn a_fence_at_the_storage_keeps_the_node_running_and_moves_its_identity() {
    let mut h = Harness::pair_with_storage();
    h.up();
    let message = fencing::fence(&mut h.cluster, "a", true).unwrap();
    assert!(message.contains("keeps running"), "{message}");
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let calls = h.fake.calls();
    let preempt = position(&calls, |c| *c == Call::Preempt { node: A });
    assert!(preempt < position(&calls, takeover_to(B)), "{calls:#?}");
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Fence { node: A, .. }))
    );
    assert!(h.cluster.node(node(A)).kept_running);
    assert_eq!(h.cluster.node(node(A)).state(), NodeState::Fenced);
    assert!(
        h.cluster.pid(node(A)).is_some(),
        "its process keeps running"
    );
    assert!(matches!(
        fencing::fence(&mut h.cluster, "a", false),
        Err(FenceError::AlreadyFenced(_))
    ));

    let seen = h.fake.calls().len();
    fencing::unfence(&mut h.cluster, "a").unwrap();
    let after = h.fake.calls().split_off(seen);
    let kill = position(&after, |c| matches!(c, Call::Fence { node: A, .. }));
    let register = position(&after, |c| *c == Call::Register { node: A });
    assert!(kill < register, "{after:#?}");
    assert!(!h.cluster.node(node(A)).kept_running);

    h.moves.start_giveback(&mut h.cluster, "a", None);
    h.run_until("a holds a again", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(A))
    });
}

/// Without a storage daemon there is nothing to preempt: only the kill fences.
#[test]
fn without_a_storage_daemon_only_a_kill_fences() {
    let mut h = Harness::pair();
    h.up();
    assert!(matches!(
        fencing::fence(&mut h.cluster, "a", true),
        Err(FenceError::Storage { .. })
    ));
    assert!(matches!(
        fencing::fence(&mut h.cluster, "zz", false),
        Err(FenceError::NoSuchNode(_))
    ));
    fencing::fence(&mut h.cluster, "a", false).unwrap();
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    assert!(
        !h.fake
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Preempt { .. }))
    );
}

/// A node fenced at the storage whose agent never says it stopped serving (hung inside)
/// is killed before its identity's taker replays its log: the log is then final.
#[test]
fn a_kept_running_node_that_does_not_confirm_is_killed_before_the_takeover() {
    let mut h = Harness::pair_with_storage();
    h.up();
    h.fake.set(A, |a| a.beats = false);
    fencing::fence(&mut h.cluster, "a", true).unwrap();
    h.run_until("b holds a", Duration::from_secs(15), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let calls = h.fake.calls();
    let kill = position(&calls, |c| matches!(c, Call::Fence { node: A, .. }));
    assert!(kill < position(&calls, takeover_to(B)), "{calls:#?}");
    assert!(!h.cluster.node(node(A)).kept_running);
}

// --- Without hostd: the coordinator ----------------------------------------------------

/// hostd's presence as the agents read it in the control region.
fn presence(h: &Harness) -> shm::HostdPresence {
    let mapping = shm::Mapping::open(&h.state.control_region(), shm::Access::ReadOnly).unwrap();
    shm::ControlRegion::open(mapping).unwrap().hostd().unwrap()
}

/// With a coordinator that answers and agents that listen on their ports themselves, hostd
/// gives the agents the thresholds to act on while it is away; every move is an `Assign`
/// at the coordinator first, at hostd's new epoch.
#[test]
fn hostd_beats_with_the_thresholds_and_every_move_is_assigned_first() {
    let (mut h, coordinator) = Harness::pair_with_coordinator();
    h.up();
    let first = presence(&h);
    assert_eq!(first.absent_after_ms, 1500);
    assert_eq!(
        first.peer_dead_after_ms, 150,
        "the heartbeat's floor, the timeout here"
    );
    h.run_for(Duration::from_millis(20), |_| true);
    assert!(presence(&h).counter > first.counter, "it beats every tick");
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    let calls = h.fake.calls();
    let assign = position(&calls, |c| {
        *c == Call::Assign {
            identity: A as u32,
            node: Some(B as u32),
            generation: 1,
            stale: false,
        }
    });
    assert!(assign < position(&calls, takeover_to(B)), "{calls:#?}");
    let state = coordinator.state();
    assert_eq!(state.generation, h.cluster.epoch());
    assert_eq!(state.owner(A as u32).and_then(|o| o.node), Some(B as u32));
    assert_eq!(h.cluster.status().coordinator_generation, Some(1));
    // Stopping the cluster tells the agents not to take each other over meanwhile.
    h.cluster.shut_down(false);
    let stopped = presence(&h);
    assert_eq!(
        (stopped.absent_after_ms, stopped.peer_dead_after_ms),
        (0, 0)
    );
}

/// Without a coordinator (or in user mode) the agents wait for hostd: thresholds 0.
#[test]
fn without_a_coordinator_the_agents_never_act_alone() {
    let mut h = Harness::pair_with_storage();
    h.up();
    let presence = presence(&h);
    assert!(presence.counter > 0);
    assert!(!presence.allows_moves_without_hostd(), "{presence:?}");
    assert_eq!(h.cluster.status().coordinator_generation, None);
}

/// b claimed a at the coordinator while hostd looked away; hostd, not aware yet, moves b's
/// identity to a: the coordinator refuses the stale move, hostd adopts the claim instead
/// (a's identity is b's at the claim's generation), b serves its own identity again, and
/// the move fails saying why. a, no member now, is then fenced and restarted as a standby.
#[test]
fn a_move_whose_assign_is_stale_adopts_the_claim_instead() {
    let (mut h, coordinator) = Harness::pair_with_coordinator();
    h.up();
    let generation = coordinator.claim(B as u32, A as u32);
    assert_eq!(generation, 1);
    let error = moves::planned_takeover(&mut h.cluster, "b", None).unwrap_err();
    let message = wire::error_chain::one_line(&error);
    assert!(
        message.contains("another node claimed while hostd was away: adopted generation 1"),
        "{message}"
    );
    assert_eq!(h.owner(A), Some(B), "the claim is adopted");
    assert_eq!(h.owner(B), Some(B), "the refused move is undone");
    assert_eq!(h.cluster.epoch(), 1);
    let calls = h.fake.calls();
    let stale = position(&calls, |c| {
        *c == Call::Assign {
            identity: B as u32,
            node: Some(A as u32),
            generation: 1,
            stale: true,
        }
    });
    // a never got b's identity; b, which had released it, serves it again.
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            Call::Command {
                node: A,
                kind: CommandKind::TakeOver,
                identity: 1,
                ..
            }
        )),
        "{calls:#?}"
    );
    let released = position(&calls, |c| {
        matches!(
            c,
            Call::Command {
                node: B,
                kind: CommandKind::Release,
                ..
            }
        )
    });
    let served_again = calls
        .iter()
        .rposition(|c| {
            matches!(
                c,
                Call::Command {
                    node: B,
                    kind: CommandKind::TakeOver,
                    identity: 1,
                    ..
                }
            )
        })
        .unwrap();
    assert!(released < stale && stale < served_again, "{calls:#?}");
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::ClaimAdopted { node, by, from, generation: 1, published: false }
            if node == "a" && by == "b" && from == "a"
    )));
    let fake = h.fake.clone();
    h.run_until("a restarted as a standby", Duration::from_secs(5), |c| {
        c.node(node(A)).state() == NodeState::Up && fake.calls().contains(&Call::Rejoin { node: A })
    });
    assert_eq!(h.owner(A), Some(B), "a waits for its giveback");
}

/// hostd finds a claim at its next look at the coordinator: it writes the control region
/// to match (owner and epoch), fences the claimed node, which is no member, has it rejoin
/// and restarts it once as a standby (without its address: b holds it). A giveback then
/// returns a's identity at the next generation.
#[test]
fn adoption_writes_the_control_region_and_restarts_a_non_member_as_a_standby() {
    let (mut h, coordinator) = Harness::pair_with_coordinator();
    h.up();
    let seen = h.fake.calls().len();
    let generation = coordinator.claim(B as u32, A as u32);
    h.run_until("a's identity adopted by b", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    assert_eq!(h.cluster.epoch(), generation);
    h.run_until("a restarted as a standby", Duration::from_secs(5), |c| {
        !c.node(node(A)).fenced && c.node(node(A)).state() == NodeState::Up
    });
    let calls = h.fake.calls().split_off(seen);
    let preempt = position(&calls, |c| *c == Call::Preempt { node: A });
    let fence = position(&calls, |c| matches!(c, Call::Fence { node: A, .. }));
    let rejoin = position(&calls, |c| *c == Call::Rejoin { node: A });
    let spawn = position(&calls, |c| matches!(c, Call::Spawn { node: A, .. }));
    assert!(
        preempt < fence && fence < rejoin && rejoin < spawn,
        "{calls:#?}"
    );
    assert_eq!(
        calls[spawn],
        Call::Spawn {
            node: A,
            ports: vec![]
        },
        "b holds a's address"
    );
    assert!(coordinator.state().node(A as u32).unwrap().member);
    assert_eq!(h.owner(A), Some(B));
    let events = h.events();
    let adopted = events
        .iter()
        .position(|e| matches!(e, Event::ClaimAdopted { node, by, .. } if node == "a" && by == "b"))
        .unwrap();
    let lost = events
        .iter()
        .position(|e| matches!(e, Event::MembershipLost { node, by: Some(by), generation: 1 } if node == "a" && by == "b"))
        .unwrap();
    let restarted = events
        .iter()
        .position(|e| matches!(e, Event::NodeRestarted { node, reason, .. } if node == "a" && reason.contains("standby")))
        .unwrap();
    assert!(adopted < lost && lost < restarted, "{events:#?}");
    // Once: a member again, it is not fenced again.
    h.run_for(Duration::from_millis(1500), |c| !c.node(node(A)).fenced);
    let spawns = h
        .fake
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Spawn { node: A, .. }))
        .count();
    assert_eq!(spawns, 2, "the launch and one restart");
    let status = h.cluster.status();
    assert!(status.non_members.is_empty(), "{:?}", status.non_members);
    assert_eq!(status.coordinator_generation, Some(1));

    h.moves.start_giveback(&mut h.cluster, "a", None);
    h.run_until("a holds a again", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(A))
    });
    assert_eq!(h.cluster.epoch(), 2);
    assert_eq!(coordinator.state().generation, 2);
}

/// A coordinator behind the control region (its state lost, or a state directory from
/// before it) is seeded from it: hostd's owners at hostd's epoch.
#[test]
fn a_control_region_ahead_of_the_coordinator_seeds_it() {
    let (mut h, coordinator) = Harness::pair_with_coordinator();
    h.up();
    h.crash(A);
    h.run_until("b holds a", Duration::from_secs(5), |c| {
        c.owner_of(node(A).home_identity()) == Some(node(B))
    });
    assert_eq!(coordinator.state().generation, 1);
    coordinator.set_state(FakeCoordinator::new(&[vec![B as u32], vec![A as u32]]).state());
    h.run_until("the coordinator seeded", Duration::from_secs(5), |_| {
        coordinator.state().generation == 1
    });
    assert!(h.fake.calls().contains(&Call::Sync { generation: 1 }));
    let state = coordinator.state();
    assert_eq!(
        state.owner(A as u32).map(|o| (o.node, o.generation)),
        Some((Some(B as u32), 1))
    );
    assert_eq!(
        state.owner(B as u32).map(|o| (o.node, o.generation)),
        Some((Some(B as u32), 0))
    );
    assert_eq!(h.owner(A), Some(B));
    assert_eq!(h.cluster.epoch(), 1);
    assert!(h.coordinator.is_some());
}

/// A running node whose agent ejected itself (it serves nothing until restarted) is shown
/// in status, then fenced at hostd's next look (what it owned moves to a taker, as after
/// any fence) and restarted as a standby.
#[test]
fn a_node_that_ejected_itself_is_restarted_as_a_standby() {
    let (mut h, _coordinator) = Harness::pair_with_coordinator();
    h.up();
    let seen = h.fake.calls().len();
    h.fake
        .set(A, |a| a.ejects = Some(shm::EjectReason::Claimed));
    let deadline = Instant::now() + Duration::from_secs(5);
    let ejected = loop {
        let status = h.cluster.status();
        if let Some(ejected) = status.nodes[A].ejected.clone() {
            break ejected;
        }
        assert!(Instant::now() < deadline, "no ejection in {status:?}");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(
        ejected.starts_with("ejected itself at generation 0"),
        "{ejected}"
    );
    h.fake.set(A, |a| a.ejects = None);
    let fake = h.fake.clone();
    h.run_until("a restarted", Duration::from_secs(5), |c| {
        let spawned = fake.calls()[seen..]
            .iter()
            .any(|c| matches!(c, Call::Spawn { node: A, .. }));
        spawned && c.node(node(A)).state() == NodeState::Up
    });
    let calls = h.fake.calls().split_off(seen);
    let fence = position(&calls, |c| matches!(c, Call::Fence { node: A, .. }));
    let spawn = position(&calls, |c| matches!(c, Call::Spawn { node: A, .. }));
    assert!(fence < spawn, "{calls:#?}");
    assert!(
        !calls.contains(&Call::Rejoin { node: A }),
        "a member needs no rejoin"
    );
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::NodeRestarted { node, reason, .. } if node == "a" && reason.contains("ejected itself")
    )));
    // What it owned moved on, as after any fence: it served nothing.
    assert_eq!(h.owner(A), Some(B));
    assert_eq!(h.cluster.status().nodes[A].ejected, None, "a new life");
}
