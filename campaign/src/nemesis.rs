//! The nemesis: one fault per cycle, chosen from a seed, then recovery (giveback or restart)
//! so the next cycle starts from a healthy cluster (every node up, serving its own identity).
//!
//! The whole schedule is drawn before the run starts, so a seed names one schedule: a
//! failing seed replays the same faults in the same order on the same nodes.
//!
//! The campaign's cluster uses hostd's default takeover order: the nodes that may take over
//! a node's identity are the other nodes in ring order after it (a → b → c → a). In a pair
//! the taker is simply the other node.
//!
//! The faults made while hostd is away are in [`away`].

mod away;

pub use away::Fence;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use wire::control::{ClusterStatus, NodeState};

use crate::hostd::{Hostd, HostdError, summary};
use crate::regions::RegionsError;
use crate::rng::Rng;
use crate::torn_tail;
use crate::workload::IdentityAcks;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL the node's QEMU.
    Kill,
    /// SIGSTOP the node's QEMU, SIGCONT it later (shorter or longer than the heartbeat
    /// timeout).
    Stop,
    /// Panic the guest kernel (NMI).
    Panic,
    /// Kill only the guest agent inside the guest.
    AgentKill,
    /// SIGKILL hostd and start it again: it must adopt the running cluster.
    HostdRestart,
    /// Freeze the node, leave a record half written past its log head (as if the agent
    /// died mid-append), then SIGKILL it.
    TornTail,
    /// SIGKILL the node, then the node holding its identity (its first taker): at once
    /// (before any takeover), or after the takeover. In a pair no live node is left and
    /// hostd must restart one; in a larger cluster the next candidate takes both over.
    DoubleKill,
    /// SIGKILL the node, wait until hostd reports its identity taken over, then SIGKILL the
    /// taker: every identity the taker held (its own and the one it just took) must move to
    /// the next candidate. Needs 3 nodes or more.
    KillTaker,
    /// SIGKILL two unrelated nodes (neither holds the other's identity) in quick
    /// succession: each identity moves to a live taker. Needs 3 nodes or more.
    KillTwo,
    /// SIGKILL the storage daemon: hostd starts it again, QEMU reconnects, the guests'
    /// disk I/O resumes, and no identity moves. Needs QEMU guests (the process backend
    /// has no storage daemon).
    BlkdRestart,
    /// Cut one of the node's interconnect links, or every one (`hostd link NODE LINK
    /// down`), restore them after a while: a dead link is no dead node, so no identity
    /// moves.
    LinkDown,
    /// SIGKILL hostd, then the node: its first taker claims and serves its identity without
    /// hostd; hostd started again adopts the claim.
    HostdDownKill,
    /// SIGKILL hostd, SIGSTOP the node past the agents' detection time: its first taker
    /// claims and serves its identity; SIGCONT the node, which must eject itself (its
    /// writes after waking fail); hostd started again fences and restarts it.
    Zombie,
    /// SIGKILL hostd, SIGSTOP the node and the next one in the ring past detection, SIGCONT
    /// both together: at most one wins (a third node, if any, takes both over), every loser
    /// ejects itself; hostd started again adopts the outcome.
    BothStop,
    /// Cut every interconnect link of the node and SIGKILL hostd, for longer than
    /// detection: both nodes live, so nobody may take over; hostd started again, links
    /// restored.
    LinksDown,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Panic,
        FaultKind::AgentKill,
        FaultKind::HostdRestart,
        FaultKind::TornTail,
        FaultKind::DoubleKill,
        FaultKind::KillTaker,
        FaultKind::KillTwo,
        FaultKind::BlkdRestart,
        FaultKind::LinkDown,
        FaultKind::HostdDownKill,
        FaultKind::Zombie,
        FaultKind::BothStop,
        FaultKind::LinksDown,
    ];

    /// The name used in the history and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Panic => "panic",
            FaultKind::AgentKill => "agent_kill",
            FaultKind::HostdRestart => "hostd_restart",
            FaultKind::TornTail => "torn_tail",
            FaultKind::DoubleKill => "double_kill",
            FaultKind::KillTaker => "kill_taker",
            FaultKind::KillTwo => "kill_two",
            FaultKind::BlkdRestart => "blkd_restart",
            FaultKind::LinkDown => "link_down",
            FaultKind::HostdDownKill => "hostd_down_kill",
            FaultKind::Zombie => "zombie",
            FaultKind::BothStop => "both_stop",
            FaultKind::LinksDown => "links_down",
        }
    }

    /// The fewest nodes the fault can run on: the double faults that leave a live node
    /// need a third one.
    pub fn min_nodes(self) -> usize {
        match self {
            FaultKind::KillTaker | FaultKind::KillTwo => 3,
            _ => 2,
        }
    }

    /// The kinds of `kinds` that can run on a cluster of `nodes`, in the same order.
    pub fn fitting(kinds: &[FaultKind], nodes: usize) -> Vec<FaultKind> {
        kinds
            .iter()
            .copied()
            .filter(|kind| kind.min_nodes() <= nodes)
            .collect()
    }

    /// Whether the fault needs real QEMU guests (a kernel to panic, a storage daemon).
    pub fn needs_vm(self) -> bool {
        matches!(self, FaultKind::Panic | FaultKind::BlkdRestart)
    }

    /// Whether the fault tests the agents taking over from each other while hostd is away,
    /// which they do only where they can move an address themselves: in bridge mode or with
    /// the process backend (in user networking only hostd can move a port).
    pub fn needs_failover_without_hostd(self) -> bool {
        matches!(
            self,
            FaultKind::HostdDownKill
                | FaultKind::Zombie
                | FaultKind::BothStop
                | FaultKind::LinksDown
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == text.replace('-', "_"))
            .ok_or_else(|| {
                format!(
                    "unknown fault kind {text:?}; the kinds are {}",
                    FaultKind::ALL.map(FaultKind::name).join(", ")
                )
            })
    }
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFault {
    pub cycle: u64,
    pub kind: FaultKind,
    /// The node it hits.
    pub node: String,
    /// How long the node stays stopped (`stop`) or hostd stays dead (`hostd_restart`); how
    /// long after the takeover the taker dies (`double_kill`, `kill_taker`); how long after
    /// the first node the second dies (`kill_two`), or after hostd the node
    /// (`hostd_down_kill`); how long past the agents' detection time the nodes stay stopped
    /// (`zombie`, `both_stop`) or the links cut (`links_down`).
    pub pause_ms: u64,
    /// `torn_tail`: whether the record past the head is complete (crc right, head never
    /// published) rather than cut short.
    pub complete_record: bool,
    /// How long the writers run before the fault.
    pub warmup_ms: u64,
    /// `kill_two`: the second node it kills; `both_stop`: the second node it stops (the
    /// next one in the ring).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second: Option<String>,
    /// `link_down`, `links_down`: the links it cuts (every link of the default interconnect
    /// when it cuts them all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<u16>,
}

/// The links of the campaign's cluster: hostd's default interconnect, two network links
/// and the mailbox.
pub const LINKS: u16 = 3;

/// Draws `cycles` faults from `seed` for a cluster of `nodes` (in configuration order).
/// Kinds come in shuffled rounds of all of `kinds`, so a short campaign still has each kind
/// a few times. Kinds that need more nodes than there are ([`FaultKind::min_nodes`]) are
/// left out; the generator is drawn from exactly as before the double faults existed for
/// the other kinds, so a pair's schedule for a seed has not changed.
pub fn schedule(
    seed: u64,
    cycles: u64,
    kinds: &[FaultKind],
    nodes: &[String],
) -> Vec<PlannedFault> {
    let kinds = FaultKind::fitting(kinds, nodes.len());
    let mut rng = Rng::new(seed, 1);
    let mut round: Vec<FaultKind> = Vec::new();
    (0..cycles)
        .map(|cycle| {
            if round.is_empty() {
                round = kinds.to_vec();
                // Fisher-Yates.
                for i in (1..round.len()).rev() {
                    round.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let kind = round.pop().unwrap_or(FaultKind::Kill);
            let index = rng.below(nodes.len() as u64) as usize;
            let node = nodes[index].clone();
            let pause_ms = match kind {
                // Half below the heartbeat timeout (3 s), half well past it.
                FaultKind::Stop if rng.percent(50) => rng.between(300, 2000),
                FaultKind::Stop => rng.between(4000, 6000),
                FaultKind::HostdRestart => rng.between(100, 2000),
                // 0: both at once; else the taker dies this long after the takeover.
                FaultKind::DoubleKill if rng.percent(50) => 0,
                FaultKind::DoubleKill => rng.between(100, 2000),
                // 0 ms: the taker dies the moment it serves (its replay still running).
                FaultKind::KillTaker => rng.between(0, 2000),
                // Quick succession: the second dies before or just after the first's
                // takeover.
                FaultKind::KillTwo => rng.between(0, 300),
                // 0: the node dies with hostd; up to 2 s: before or after the agents take
                // hostd for absent.
                FaultKind::HostdDownKill => rng.between(0, 2000),
                // Past the agents' detection time, which only the running cluster knows.
                FaultKind::Zombie | FaultKind::BothStop | FaultKind::LinksDown => {
                    rng.between(500, 3000)
                }
                _ => 0,
            };
            // Drawn only for the kind (never in a pair), so the other kinds' draws stay.
            let second = match kind {
                FaultKind::KillTwo => Some(unrelated(&mut rng, nodes, index)),
                // The next in the ring: the node's first taker (no draw).
                FaultKind::BothStop => Some(nodes[(index + 1) % nodes.len()].clone()),
                _ => None,
            };
            // Drawn only for the kind too: one link, or all of them (the interconnect down).
            let (pause_ms, links) = if kind == FaultKind::LinkDown {
                let links = if rng.percent(50) {
                    (0..LINKS).collect()
                } else {
                    vec![rng.below(u64::from(LINKS)) as u16]
                };
                (rng.between(300, 4000), links)
            } else if kind == FaultKind::LinksDown {
                // Every link, so the interconnect is down (no draw).
                (pause_ms, (0..LINKS).collect())
            } else {
                (pause_ms, Vec::new())
            };
            PlannedFault {
                cycle,
                kind,
                node,
                pause_ms,
                complete_record: rng.percent(50),
                warmup_ms: rng.between(300, 1200),
                second,
                links,
            }
        })
        .collect()
}

/// `kill_two`'s second node for `nodes[first]`: one that is not next to it in the ring (in
/// the default takeover order neither is then the other's first taker) where there is one
/// (4 nodes or more), else any other node.
fn unrelated(rng: &mut Rng, nodes: &[String], first: usize) -> String {
    let n = nodes.len();
    let others: Vec<usize> = (0..n).filter(|&i| i != first).collect();
    let far: Vec<usize> = others
        .iter()
        .copied()
        .filter(|&i| i != (first + 1) % n && (i + 1) % n != first)
        .collect();
    let pool = if far.is_empty() { others } else { far };
    let pick = rng.below(pool.len() as u64) as usize;
    pool.get(pick)
        .map_or_else(|| nodes[first].clone(), |&i| nodes[i].clone())
}

/// Errors running a fault or recovering from it.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    #[error(transparent)]
    Hostd(#[from] HostdError),
    #[error("node {node} has no pid in the status: {status}")]
    NoPid { node: String, status: String },
    #[error("cannot signal process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot leave a torn tail in {node}'s region")]
    TornTail {
        node: String,
        #[source]
        source: Box<torn_tail::TornTailError>,
    },
    #[error("the fault did not fire: {0}")]
    DidNotFire(String),
    #[error(
        "identity {identity} moved to {got}, but the next candidate in the takeover order is {expected}"
    )]
    UnexpectedTaker {
        identity: String,
        expected: String,
        got: String,
    },
    #[error("cannot read the cluster's regions")]
    Regions(#[from] RegionsError),
    #[error(
        "hostd lets no agent take over without it (its presence in the control region gives no detection times): the fault needs bridge mode or the process backend, with the storage daemon's coordinator; {presence}"
    )]
    NoFailoverWithoutHostd { presence: String },
    #[error(
        "{node} woke after losing its identities while hostd was away, but did not eject itself within {timeout:?}; regions: {regions}"
    )]
    NotEjected {
        node: String,
        timeout: Duration,
        regions: String,
    },
    #[error(
        "{node} (pid {pid}) lost its identities while hostd was away, but its process still runs {timeout:?} after the claim was seen: the coordinator kills a claimed node when no disk fences it (the process backend); regions: {regions}"
    )]
    NotKilled {
        node: String,
        pid: u32,
        timeout: Duration,
        regions: String,
    },
    #[error("{first} and {second} both won: each owns the other's identity; regions: {regions}")]
    BothWon {
        first: String,
        second: String,
        regions: String,
    },
    #[error("{kind} alone moved an identity (both nodes were alive): {what}")]
    MovedWithoutDeath { kind: FaultKind, what: String },
    #[error("hostd, started again, did not adopt what the agents decided: {0}")]
    NotAdopted(String),
}

/// What a fault did, for the history.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    /// When the fault hit (µs since the epoch).
    pub t: u64,
    pub detail: String,
    /// The cluster epoch just before the fault.
    pub epoch_before: u64,
    /// The nodes the fault killed whose identities must move to a live node other than
    /// them (the double faults in a cluster of 3 or more); empty for the others.
    pub killed: Vec<String>,
    /// The faults that kill hostd first: when the node itself was hit.
    pub node_t: Option<u64>,
}

/// The other nodes of `status` in ring order after `node` (status order is configuration
/// order): the default takeover order of `node`'s identity.
fn ring_after<'a>(status: &'a ClusterStatus, node: &str) -> Vec<&'a str> {
    let names: Vec<&str> = status.nodes.iter().map(|n| n.name.as_str()).collect();
    ring_order(&names, node)
}

/// The names of `names` other than `node`, in ring order after it.
fn ring_order<'a>(names: &[&'a str], node: &str) -> Vec<&'a str> {
    let at = names.iter().position(|name| *name == node).unwrap_or(0);
    (1..names.len())
        .map(|step| names[(at + step) % names.len()])
        .collect()
}

/// The node serving `identity`, if it is up.
fn served_by_live<'a>(status: &'a ClusterStatus, identity: &str) -> Option<&'a str> {
    let holder = Hostd::node(status, identity)?.served_by.as_deref()?;
    Hostd::node(status, holder)
        .is_some_and(|h| h.state == NodeState::Up)
        .then_some(holder)
}

/// Whether every identity in `identities` is served by a live node outside `dead`.
fn moved_to_live(status: &ClusterStatus, identities: &[String], dead: &[String]) -> bool {
    identities.iter().all(|identity| {
        served_by_live(status, identity).is_some_and(|holder| !dead.iter().any(|d| d == holder))
    })
}

fn pid_of(status: &ClusterStatus, node: &str) -> Result<u32, NemesisError> {
    Hostd::node(status, node)
        .and_then(|n| n.pid)
        .ok_or_else(|| NemesisError::NoPid {
            node: node.to_owned(),
            status: summary(status),
        })
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<(), NemesisError> {
    // 0 or a negative pid would signal a whole process group: ours.
    let Some(raw) = i32::try_from(pid).ok().filter(|&p| p > 0) else {
        return Err(NemesisError::Signal {
            pid,
            source: nix::errno::Errno::EINVAL,
        });
    };
    let target = nix::unistd::Pid::from_raw(raw);
    match nix::sys::signal::kill(target, signal) {
        // Gone already (hostd fenced it): nothing to do.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(NemesisError::Signal { pid, source }),
    }
}

/// Injects `fault`; returns once it has hit (a stopped node is continued again, a killed
/// hostd restarted; `kill_taker`: the taker's identities moved on), without waiting for the
/// cluster to recover.
/// `torn` is the record a `torn_tail` fault leaves (a block of the node's own export);
/// `acks` what the clients got acknowledged (the faults made while hostd is away wait
/// for the taker to serve them); `fence` how a node that lost its identities while hostd
/// was away is stopped.
pub fn inject(
    hostd: &Hostd,
    fault: &PlannedFault,
    torn: torn_tail::TornWrite,
    acks: &IdentityAcks,
    fence: Fence,
) -> Result<FaultOutcome, NemesisError> {
    use nix::sys::signal::Signal;
    let node = fault.node.as_str();
    let status = hostd.status()?;
    let boot_id = Hostd::node(&status, node).map(|n| n.boot_id);
    let t = wire::time::now_unix_us();
    let mut killed = Vec::new();
    let mut node_t = None;
    let detail = match fault.kind {
        FaultKind::HostdDownKill
        | FaultKind::Zombie
        | FaultKind::BothStop
        | FaultKind::LinksDown => {
            let outcome = away::inject(hostd, fault, &status, acks, fence)?;
            node_t = outcome.node_t;
            outcome.detail
        }
        FaultKind::Kill | FaultKind::Panic => {
            let said = hostd.run(&["kill", node, "--signal", fault.kind.name()])?;
            said.lines().next().unwrap_or_default().to_owned()
        }
        FaultKind::AgentKill => {
            let said = hostd.run(&["kill", node, "--signal", "agent"])?;
            // It fired if the agent restarted (new boot id) or the node was taken over.
            hostd
                .wait_for("the agent to restart", Duration::from_secs(30), |s| {
                    Hostd::node(s, node).is_some_and(|n| {
                        Some(n.boot_id) != boot_id || n.served_by.as_deref() != Some(node)
                    })
                })
                .map_err(|_| NemesisError::DidNotFire(format!("{node}'s agent never restarted")))?;
            said.lines().next().unwrap_or_default().to_owned()
        }
        FaultKind::Stop => {
            let pid = pid_of(&status, node)?;
            hostd.run(&["kill", node, "--signal", "stop"])?;
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            signal(pid, Signal::SIGCONT)?;
            format!("SIGSTOP pid {pid} for {} ms, then SIGCONT", fault.pause_ms)
        }
        FaultKind::TornTail => {
            let pid = pid_of(&status, node)?;
            signal(pid, Signal::SIGSTOP)?;
            // kill() returns before every thread has stopped: a vCPU could still publish a
            // record after the head was read.
            wait_stopped(pid, Duration::from_secs(2));
            let torn = torn_tail::leave(&hostd.region_path(node), torn, fault.complete_record);
            // Killed whatever happened: a frozen node must not be left behind.
            signal(pid, Signal::SIGKILL)?;
            let torn = torn.map_err(|source| NemesisError::TornTail {
                node: node.to_owned(),
                source: Box::new(source),
            })?;
            format!("SIGSTOP pid {pid}, {torn}, SIGKILL")
        }
        FaultKind::DoubleKill => {
            hostd.run(&["kill", node])?;
            // The other node: the one holding (or about to hold) this node's identity, its
            // first taker (in a pair, the other node).
            let other = ring_after(&status, node)
                .first()
                .map(|name| (*name).to_owned())
                .ok_or_else(|| NemesisError::DidNotFire("no second node".into()))?;
            if status.nodes.len() >= 3 {
                // A live node is left: it must take both identities over.
                killed = vec![node.to_owned(), other.clone()];
            }
            if fault.pause_ms > 0 {
                hostd
                    .wait_for(
                        &format!("{node}'s identity to move to {other}"),
                        Duration::from_secs(60),
                        |s| {
                            Hostd::node(s, node)
                                .is_some_and(|n| n.served_by.as_deref() == Some(other.as_str()))
                        },
                    )
                    .map_err(|_| {
                        NemesisError::DidNotFire(format!("{other} never took {node} over"))
                    })?;
                std::thread::sleep(Duration::from_millis(fault.pause_ms));
            }
            hostd.run(&["kill", &other])?;
            if fault.pause_ms == 0 {
                format!("SIGKILL {node}, then at once {other}")
            } else {
                format!(
                    "SIGKILL {node}; {other} took it over; SIGKILL {other} {} ms later",
                    fault.pause_ms
                )
            }
        }
        FaultKind::KillTaker => {
            hostd.run(&["kill", node])?;
            let taken = hostd
                .wait_for(
                    &format!("{node}'s identity to be taken over"),
                    Duration::from_secs(60),
                    |s| served_by_live(s, node).is_some_and(|holder| holder != node),
                )
                .map_err(|_| NemesisError::DidNotFire(format!("no node took {node} over")))?;
            let taker = served_by_live(&taken, node).unwrap_or_default().to_owned();
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            hostd.run(&["kill", &taker])?;
            killed = vec![node.to_owned(), taker.clone()];
            // The taker's identities go to its first live candidate (in the default order:
            // the nodes after it in the ring), never back to the dead first node.
            let expected = ring_after(&status, &taker)
                .into_iter()
                .find(|name| *name != node)
                .unwrap_or_default()
                .to_owned();
            let moved = hostd
                .wait_for(
                    &format!("{node}'s and {taker}'s identities to move to a live node"),
                    Duration::from_secs(60),
                    |s| moved_to_live(s, &killed, &killed),
                )
                .map_err(|_| {
                    NemesisError::DidNotFire(format!(
                        "no live node took {node}'s and {taker}'s identities over"
                    ))
                })?;
            for identity in &killed {
                let got = served_by_live(&moved, identity).unwrap_or_default();
                if got != expected {
                    return Err(NemesisError::UnexpectedTaker {
                        identity: identity.clone(),
                        expected,
                        got: got.to_owned(),
                    });
                }
            }
            format!(
                "SIGKILL {node}; {taker} took it over; SIGKILL {taker} {} ms later; \
                 {expected} took {node} and {taker} over",
                fault.pause_ms
            )
        }
        FaultKind::KillTwo => {
            let second = fault
                .second
                .clone()
                .filter(|second| second != node)
                .ok_or_else(|| {
                    NemesisError::DidNotFire(format!("kill_two on {node} has no second node"))
                })?;
            // Unrelated: neither holds the other's identity now.
            let holds = |holder: &str, identity: &str| {
                Hostd::node(&status, identity)
                    .is_some_and(|n| n.served_by.as_deref() == Some(holder))
            };
            if holds(node, &second) || holds(&second, node) {
                return Err(NemesisError::DidNotFire(format!(
                    "{node} and {second} are not unrelated (one holds the other's identity): {}",
                    summary(&status)
                )));
            }
            hostd.run(&["kill", node])?;
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            hostd.run(&["kill", &second])?;
            killed = vec![node.to_owned(), second.clone()];
            format!("SIGKILL {node}, then {second} {} ms later", fault.pause_ms)
        }
        FaultKind::BlkdRestart => {
            let Some(old) = status.storage_pid else {
                return Err(NemesisError::DidNotFire(format!(
                    "hostd status has no storage daemon: {}",
                    summary(&status)
                )));
            };
            signal(old, Signal::SIGKILL)?;
            let killed_at = Instant::now();
            let restarted = hostd.wait_for(
                "hostd to start the storage daemon again",
                Duration::from_secs(30),
                |s| s.storage_pid.is_some_and(|pid| pid != old),
            )?;
            format!(
                "SIGKILL storage daemon pid {old}; pid {} answered {} ms later",
                restarted.storage_pid.unwrap_or_default(),
                killed_at.elapsed().as_millis()
            )
        }
        FaultKind::LinkDown => {
            for link in &fault.links {
                hostd.run(&["link", node, &link.to_string(), "down"])?;
            }
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            for link in &fault.links {
                hostd.run(&["link", node, &link.to_string(), "up"])?;
            }
            let links: Vec<String> = fault.links.iter().map(u16::to_string).collect();
            format!(
                "links {} of {node} cut for {} ms, then restored",
                links.join(", "),
                fault.pause_ms
            )
        }
        FaultKind::HostdRestart => {
            let epoch = status.epoch;
            let hostd_pid = kill_hostd(&status)?;
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            let adopted = start_hostd(hostd)?;
            if adopted.epoch != epoch {
                return Err(NemesisError::DidNotFire(format!(
                    "the restart alone moved an identity (epoch {epoch} → {})",
                    adopted.epoch
                )));
            }
            format!(
                "SIGKILL hostd pid {hostd_pid}, {} ms without hostd, restarted: adopted pid {}",
                fault.pause_ms, adopted.hostd_pid
            )
        }
    };
    Ok(FaultOutcome {
        t,
        detail,
        epoch_before: status.epoch,
        killed,
        node_t,
    })
}

/// SIGKILLs hostd and waits until it is gone (at most 10 s); returns its pid.
fn kill_hostd(status: &ClusterStatus) -> Result<u32, NemesisError> {
    let hostd_pid = status.hostd_pid;
    if hostd_pid == 0 {
        return Err(NemesisError::DidNotFire(format!(
            "hostd status has no hostd_pid: {}",
            summary(status)
        )));
    }
    signal(hostd_pid, nix::sys::signal::Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(hostd_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(hostd_pid)
}

/// Starts hostd again (`hostd up` without a configuration); it must adopt the running
/// cluster.
fn start_hostd(hostd: &Hostd) -> Result<ClusterStatus, NemesisError> {
    hostd.up(None)?;
    let adopted = hostd.status()?;
    if !adopted.adopted {
        return Err(NemesisError::DidNotFire(format!(
            "the restarted hostd did not adopt the cluster: {}",
            summary(&adopted)
        )));
    }
    Ok(adopted)
}

/// Waits until every thread of `pid` is stopped (state `T` or `t`), at most `timeout`.
fn wait_stopped(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    // Gone counts as stopped: it can publish nothing either.
    let all_stopped = || {
        qemu::thread_states(pid).map_or(true, |states| {
            states.iter().all(|s| matches!(s, 'T' | 't' | 'Z' | 'X'))
        })
    };
    while !all_stopped() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn process_alive(pid: u32) -> bool {
    qemu::process_state(pid).is_ok_and(|state| !matches!(state, 'Z' | 'X'))
}

/// Brings the cluster back to health after a fault (`outcome` is what [`inject`] said):
/// waits for an identity move where one must happen, lets the writers work for `dwell`,
/// then until the cluster is healthy gives back any identity that moved (also one that
/// moved late, after a slow recovery).
pub fn recover(
    hostd: &Hostd,
    fault: &PlannedFault,
    outcome: &FaultOutcome,
    dwell: Duration,
) -> Result<(), NemesisError> {
    let node = fault.node.as_str();
    let epoch_before = outcome.epoch_before;
    let expects_takeover = match fault.kind {
        FaultKind::Kill | FaultKind::Panic | FaultKind::TornTail => true,
        FaultKind::Stop => fault.pause_ms > HEARTBEAT_TIMEOUT_MS,
        // The faults made while hostd is away saw their moves (from the regions) and hostd
        // adopt them before they returned.
        FaultKind::AgentKill
        | FaultKind::HostdRestart
        | FaultKind::BlkdRestart
        | FaultKind::LinkDown
        | FaultKind::DoubleKill
        | FaultKind::KillTaker
        | FaultKind::KillTwo
        | FaultKind::HostdDownKill
        | FaultKind::Zombie
        | FaultKind::BothStop
        | FaultKind::LinksDown => false,
    };
    if !outcome.killed.is_empty() {
        // Two nodes died and a live one is left: it (or they) took both identities over.
        let killed = &outcome.killed;
        hostd.wait_for(
            &format!(
                "the identities of {} to be served by a live node",
                killed.join(" and ")
            ),
            Duration::from_secs(60),
            |s| moved_to_live(s, killed, killed),
        )?;
    }
    if fault.kind == FaultKind::DoubleKill {
        // In a pair no live node was left: hostd restarts one, which takes every identity
        // over. (In a larger cluster the live node left took both over.)
        hostd.wait_for(
            "every identity served by a live node after the double kill",
            Duration::from_secs(120),
            |s| {
                s.nodes.iter().all(|n| {
                    n.served_by.as_deref().is_some_and(|holder| {
                        Hostd::node(s, holder).is_some_and(|h| h.state == NodeState::Up)
                    })
                })
            },
        )?;
    }
    if expects_takeover {
        hostd.wait_for(
            &format!("{node}'s identity to move to its taker"),
            Duration::from_secs(60),
            |s| Hostd::node(s, node).is_some_and(|n| n.served_by.as_deref() != Some(node)),
        )?;
    }
    std::thread::sleep(dwell);
    if matches!(
        fault.kind,
        FaultKind::HostdRestart
            | FaultKind::BlkdRestart
            | FaultKind::LinkDown
            | FaultKind::LinksDown
    ) {
        // A takeover caused by the fault alone would come a heartbeat timeout later.
        std::thread::sleep(Duration::from_millis(HEARTBEAT_TIMEOUT_MS + 500).saturating_sub(dwell));
        let status = hostd.status()?;
        if status.epoch != epoch_before {
            return Err(NemesisError::DidNotFire(format!(
                "the {} alone moved an identity (epoch {epoch_before} → {})",
                fault.kind, status.epoch
            )));
        }
    }
    // Two dead (or ejected) nodes boot again one after the other.
    let restarts = if fault.kind == FaultKind::BothStop {
        2
    } else {
        outcome.killed.len().max(1)
    };
    let limit = Duration::from_secs(120) * restarts as u32;
    let deadline = Instant::now() + limit;
    loop {
        let status = hostd.status()?;
        if Hostd::healthy(&status) {
            return Ok(());
        }
        for node in &status.nodes {
            let name = node.name.as_str();
            // Whoever holds the identity now must be up to release it.
            let holder_up = node.served_by.as_deref().is_some_and(|holder| {
                holder != name
                    && Hostd::node(&status, holder).is_some_and(|h| h.state == NodeState::Up)
            });
            if holder_up {
                if let Err(error) = hostd.run(&["giveback", name]) {
                    log::warn!("giveback {name}: {error}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(NemesisError::Hostd(HostdError::Timeout {
                what: "a healthy cluster".into(),
                timeout: limit,
                status: summary(&status),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// hostd's default heartbeat timeout, which the campaign's cluster uses.
const HEARTBEAT_TIMEOUT_MS: u64 = 3000;

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<String> {
        cluster(2)
    }

    fn cluster(n: u8) -> Vec<String> {
        (0..n).map(|i| char::from(b'a' + i).to_string()).collect()
    }

    /// The kinds there were before the double faults of larger clusters.
    const PAIR_KINDS: [FaultKind; 7] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Panic,
        FaultKind::AgentKill,
        FaultKind::HostdRestart,
        FaultKind::TornTail,
        FaultKind::DoubleKill,
    ];

    #[test]
    fn a_seed_names_one_schedule() {
        let one = schedule(42, 30, &FaultKind::ALL, &nodes());
        assert_eq!(one, schedule(42, 30, &FaultKind::ALL, &nodes()));
        assert_ne!(one, schedule(43, 30, &FaultKind::ALL, &nodes()));
    }

    #[test]
    fn every_kind_comes_in_each_round() {
        for n in [2, 3, 4] {
            let kinds = FaultKind::fitting(&FaultKind::ALL, n as usize);
            let plan = schedule(7, 2 * kinds.len() as u64, &FaultKind::ALL, &cluster(n));
            for round in plan.chunks(kinds.len()) {
                for &kind in &kinds {
                    assert_eq!(round.iter().filter(|f| f.kind == kind).count(), 1);
                }
            }
        }
        let plan = schedule(7, 200, &FaultKind::ALL, &nodes());
        assert!(plan.iter().any(|f| f.node == "a") && plan.iter().any(|f| f.node == "b"));
        let stops: Vec<u64> = schedule(9, 120, &[FaultKind::Stop], &nodes())
            .iter()
            .map(|f| f.pause_ms)
            .collect();
        assert!(stops.iter().any(|&ms| ms < 3000) && stops.iter().any(|&ms| ms > 3000));
    }

    /// A pair's schedule is the one it was before the double faults of larger clusters:
    /// checksums of `schedule.json` as the code before them wrote it.
    #[test]
    fn a_pair_schedule_has_not_changed() {
        let digest = |plan: &[PlannedFault]| {
            let json = serde_json::to_vec(plan).unwrap_or_default();
            (crc32c::crc32c(&json), json.len())
        };
        // blkd_restart came later and changed a pair's schedule with every kind once; the
        // kinds before it still give the pinned one.
        let before_blkd: Vec<FaultKind> = FaultKind::ALL
            .into_iter()
            .filter(|&k| {
                k != FaultKind::BlkdRestart
                    && k != FaultKind::LinkDown
                    && !k.needs_failover_without_hostd()
            })
            .collect();
        for kinds in [&PAIR_KINDS[..], &before_blkd[..]] {
            assert_eq!(
                digest(&schedule(42, 30, kinds, &nodes())),
                (0xab27_ee93, 2852)
            );
        }
        let process_kinds = [
            FaultKind::Kill,
            FaultKind::Stop,
            FaultKind::AgentKill,
            FaultKind::HostdRestart,
            FaultKind::TornTail,
            FaultKind::DoubleKill,
        ];
        assert_eq!(
            digest(&schedule(7, 12, &process_kinds, &nodes())),
            (0xab52_9fb3, 1144)
        );
        // Double faults asked for a pair are left out: the same schedule as without them.
        let mut asked = process_kinds.to_vec();
        asked.extend([FaultKind::KillTaker, FaultKind::KillTwo]);
        assert_eq!(
            schedule(7, 12, &asked, &nodes()),
            schedule(7, 12, &process_kinds, &nodes())
        );
        assert!(
            schedule(5, 50, &FaultKind::ALL, &nodes())
                .iter()
                .all(|f| f.kind.min_nodes() <= 2
                    && (f.second.is_none() || f.kind == FaultKind::BothStop))
        );
        // Every kind there was before the faults made while hostd is away: the schedules
        // the code before them drew, for a pair and for 3 nodes.
        let before_away: Vec<FaultKind> = FaultKind::ALL
            .into_iter()
            .filter(|k| !k.needs_failover_without_hostd())
            .collect();
        assert_eq!(before_away.len(), 11);
        assert_eq!(
            digest(&schedule(42, 30, &before_away, &nodes())),
            (0x8a76_500b, 2935)
        );
        assert_eq!(
            digest(&schedule(42, 60, &before_away, &cluster(3))),
            (0x3cc4_fd50, 5951)
        );
    }

    /// The faults made while hostd is away: their parameters, drawn only for them (a
    /// schedule without them is the one it was: `a_pair_schedule_has_not_changed`).
    #[test]
    fn faults_without_hostd_are_drawn_apart() {
        let away = [
            FaultKind::HostdDownKill,
            FaultKind::Zombie,
            FaultKind::BothStop,
            FaultKind::LinksDown,
        ];
        assert_eq!(
            FaultKind::ALL
                .into_iter()
                .filter(|k| k.needs_failover_without_hostd())
                .collect::<Vec<_>>(),
            away
        );
        for n in [2, 3, 5] {
            let nodes = cluster(n);
            let plan = schedule(21, 120, &away, &nodes);
            for kind in away {
                assert!(plan.iter().any(|f| f.kind == kind), "{n} nodes: no {kind}");
            }
            for fault in &plan {
                let at = nodes.iter().position(|n| *n == fault.node).unwrap_or(99);
                match fault.kind {
                    FaultKind::HostdDownKill => {
                        assert!(fault.pause_ms <= 2000);
                        assert_eq!((fault.second.as_deref(), fault.links.len()), (None, 0));
                    }
                    FaultKind::Zombie => {
                        assert!((500..=3000).contains(&fault.pause_ms));
                        assert_eq!((fault.second.as_deref(), fault.links.len()), (None, 0));
                    }
                    // The node and its first taker, the next in the ring.
                    FaultKind::BothStop => {
                        assert!((500..=3000).contains(&fault.pause_ms));
                        assert_eq!(
                            fault.second.as_deref(),
                            Some(nodes[(at + 1) % nodes.len()].as_str())
                        );
                    }
                    // Every link: the interconnect is down.
                    FaultKind::LinksDown => {
                        assert!((500..=3000).contains(&fault.pause_ms));
                        assert_eq!(fault.links, [0, 1, 2]);
                        assert_eq!(fault.second, None);
                    }
                    other => panic!("{other} was not asked for"),
                }
            }
            assert_eq!(plan, schedule(21, 120, &away, &nodes));
        }
    }

    #[test]
    fn larger_clusters_have_deterministic_schedules_with_double_faults() {
        for n in [3, 4] {
            let nodes = cluster(n);
            let one = schedule(42, 60, &FaultKind::ALL, &nodes);
            assert_eq!(one, schedule(42, 60, &FaultKind::ALL, &nodes));
            assert_ne!(one, schedule(43, 60, &FaultKind::ALL, &nodes));
            for kind in [FaultKind::KillTaker, FaultKind::KillTwo] {
                assert!(one.iter().any(|f| f.kind == kind), "{n} nodes: no {kind}");
            }
            // Faults hit every node.
            for node in &nodes {
                assert!(
                    one.iter().any(|f| &f.node == node),
                    "{n} nodes: none on {node}"
                );
            }
            for fault in &one {
                assert!(nodes.contains(&fault.node));
                match fault.kind {
                    FaultKind::KillTwo => {
                        let second = fault.second.as_ref().expect("kill_two has a second node");
                        assert_ne!(second, &fault.node);
                        assert!(nodes.contains(second));
                        assert!(fault.pause_ms <= 300);
                    }
                    FaultKind::KillTaker => {
                        assert!(fault.pause_ms <= 2000);
                        assert_eq!(fault.second, None);
                    }
                    FaultKind::BothStop => assert!(fault.second.is_some()),
                    _ => assert_eq!(fault.second, None),
                }
            }
            // schedule.json names the second node only where there is one.
            let json = serde_json::to_string(&one).unwrap_or_default();
            assert_eq!(
                json.matches("\"second\"").count(),
                one.iter()
                    .filter(|f| matches!(f.kind, FaultKind::KillTwo | FaultKind::BothStop))
                    .count()
            );
        }
        // With 4 nodes, kill_two's nodes are not neighbours in the ring (neither is the
        // other's first taker).
        let nodes = cluster(4);
        for fault in schedule(11, 90, &[FaultKind::KillTwo], &nodes) {
            let at = |name: &str| nodes.iter().position(|n| n == name).unwrap_or(9);
            let (first, second) = (at(&fault.node), at(fault.second.as_deref().unwrap_or("")));
            assert_eq!((first + 2) % 4, second, "{fault:?}");
        }
        // With 3 every other node is a neighbour: both are drawn.
        let seconds: std::collections::BTreeSet<String> =
            schedule(11, 90, &[FaultKind::KillTwo], &cluster(3))
                .into_iter()
                .filter(|f| f.node == "a")
                .filter_map(|f| f.second)
                .collect();
        assert_eq!(seconds.into_iter().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn kinds_parse_by_name() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        assert_eq!("agent-kill".parse::<FaultKind>(), Ok(FaultKind::AgentKill));
        assert_eq!("kill-taker".parse::<FaultKind>(), Ok(FaultKind::KillTaker));
        assert_eq!(
            "hostd-down-kill".parse::<FaultKind>(),
            Ok(FaultKind::HostdDownKill)
        );
        assert!(
            "meteor"
                .parse::<FaultKind>()
                .unwrap_err()
                .contains("links_down")
        );
        assert!(
            "meteor"
                .parse::<FaultKind>()
                .unwrap_err()
                .contains("torn_tail")
        );
    }

    #[test]
    fn the_ring_orders_takers() {
        assert_eq!(ring_order(&["a", "b", "c", "d"], "c"), ["d", "a", "b"]);
        assert_eq!(ring_order(&["a", "b", "c"], "a"), ["b", "c"]);
        assert_eq!(ring_order(&["a", "b"], "b"), ["a"]);
    }
}
