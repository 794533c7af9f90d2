//! The nemesis: one fault per cycle, chosen from a seed, then recovery (giveback or restart)
//! so the next cycle starts from a healthy pair.
//!
//! The whole schedule is drawn before the run starts, so a seed names one schedule: a
//! failing seed replays the same faults in the same order on the same nodes.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Serialize;

use wire::control::{ClusterStatus, NodeState};

use crate::hostd::{Hostd, HostdError, summary};
use crate::rng::Rng;
use crate::torn_tail;

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
    /// SIGKILL hostd and start it again: it must adopt the running pair.
    HostdRestart,
    /// Freeze the node, leave a record half written past its log head (as if the agent
    /// died mid-append), then SIGKILL it.
    TornTail,
    /// SIGKILL the node, then the node holding its identity: at once (before any
    /// takeover), or after the takeover. No live node is left; hostd must restart one.
    DoubleKill,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Panic,
        FaultKind::AgentKill,
        FaultKind::HostdRestart,
        FaultKind::TornTail,
        FaultKind::DoubleKill,
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
        }
    }

    /// Whether the fault needs real QEMU guests (a kernel to panic).
    pub fn needs_vm(self) -> bool {
        matches!(self, FaultKind::Panic)
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
    /// How long the node stays stopped (`stop`) or hostd stays dead (`hostd_restart`).
    pub pause_ms: u64,
    /// `torn_tail`: whether the record past the head is complete (crc right, head never
    /// published) rather than cut short.
    pub complete_record: bool,
    /// How long the writers run before the fault.
    pub warmup_ms: u64,
}

/// Draws `cycles` faults from `seed`. Kinds come in shuffled rounds of all of `kinds`, so
/// a short campaign still has each kind a few times.
pub fn schedule(
    seed: u64,
    cycles: u64,
    kinds: &[FaultKind],
    nodes: &[String],
) -> Vec<PlannedFault> {
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
            let node = nodes[rng.below(nodes.len() as u64) as usize].clone();
            let pause_ms = match kind {
                // Half below the heartbeat timeout (3 s), half well past it.
                FaultKind::Stop if rng.percent(50) => rng.between(300, 2000),
                FaultKind::Stop => rng.between(4000, 6000),
                FaultKind::HostdRestart => rng.between(100, 2000),
                // 0: both at once; else the taker dies this long after the takeover.
                FaultKind::DoubleKill if rng.percent(50) => 0,
                FaultKind::DoubleKill => rng.between(100, 2000),
                _ => 0,
            };
            PlannedFault {
                cycle,
                kind,
                node,
                pause_ms,
                complete_record: rng.percent(50),
                warmup_ms: rng.between(300, 1200),
            }
        })
        .collect()
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
}

/// What a fault did, for the history.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    /// When the fault hit (µs since the epoch).
    pub t: u64,
    pub detail: String,
    /// The cluster epoch just before the fault.
    pub epoch_before: u64,
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
/// hostd restarted), without waiting for the pair to recover.
/// `torn` is the record a `torn_tail` fault leaves (a block of the node's own export).
pub fn inject(
    hostd: &Hostd,
    fault: &PlannedFault,
    torn: torn_tail::TornWrite,
) -> Result<FaultOutcome, NemesisError> {
    use nix::sys::signal::Signal;
    let node = fault.node.as_str();
    let status = hostd.status()?;
    let boot_id = Hostd::node(&status, node).map(|n| n.boot_id);
    let t = wire::time::now_unix_us();
    let detail = match fault.kind {
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
            // The other node: the one holding (or about to hold) this node's identity.
            let other = status
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .find(|name| name != node)
                .ok_or_else(|| NemesisError::DidNotFire("no second node".into()))?;
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
        FaultKind::HostdRestart => {
            let hostd_pid = status.hostd_pid;
            if hostd_pid == 0 {
                return Err(NemesisError::DidNotFire(format!(
                    "hostd status has no hostd_pid: {}",
                    summary(&status)
                )));
            }
            let epoch = status.epoch;
            signal(hostd_pid, Signal::SIGKILL)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(hostd_pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(fault.pause_ms));
            hostd.up(None)?;
            let adopted = hostd.status()?;
            if !adopted.adopted {
                return Err(NemesisError::DidNotFire(format!(
                    "the restarted hostd did not adopt the pair: {}",
                    summary(&adopted)
                )));
            }
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
    })
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

/// Brings the pair back to health after a fault: waits for an identity move where one
/// must happen, lets the writers work for `dwell`, then until the pair is healthy gives back
/// any identity that moved (also one that moved late, after a slow recovery).
pub fn recover(
    hostd: &Hostd,
    fault: &PlannedFault,
    epoch_before: u64,
    dwell: Duration,
) -> Result<(), NemesisError> {
    let node = fault.node.as_str();
    let expects_takeover = match fault.kind {
        FaultKind::Kill | FaultKind::Panic | FaultKind::TornTail => true,
        FaultKind::Stop => fault.pause_ms > HEARTBEAT_TIMEOUT_MS,
        FaultKind::AgentKill | FaultKind::HostdRestart | FaultKind::DoubleKill => false,
    };
    if fault.kind == FaultKind::DoubleKill {
        // No live node was left: hostd restarts one, which takes every identity over.
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
            &format!("{node}'s identity to move to its partner"),
            Duration::from_secs(60),
            |s| Hostd::node(s, node).is_some_and(|n| n.served_by.as_deref() != Some(node)),
        )?;
    }
    std::thread::sleep(dwell);
    if fault.kind == FaultKind::HostdRestart {
        // A takeover caused by the restart alone would come a heartbeat timeout later.
        std::thread::sleep(Duration::from_millis(HEARTBEAT_TIMEOUT_MS + 500).saturating_sub(dwell));
        let status = hostd.status()?;
        if status.epoch != epoch_before {
            return Err(NemesisError::DidNotFire(format!(
                "the hostd restart alone moved an identity (epoch {epoch_before} → {})",
                status.epoch
            )));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
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
                what: "a healthy pair".into(),
                timeout: Duration::from_secs(120),
                status: summary(&status),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// hostd's default heartbeat timeout, which the campaign's pair uses.
const HEARTBEAT_TIMEOUT_MS: u64 = 3000;

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn a_seed_names_one_schedule() {
        let one = schedule(42, 30, &FaultKind::ALL, &nodes());
        assert_eq!(one, schedule(42, 30, &FaultKind::ALL, &nodes()));
        assert_ne!(one, schedule(43, 30, &FaultKind::ALL, &nodes()));
    }

    #[test]
    fn every_kind_comes_in_each_round() {
        let kinds = FaultKind::ALL.len();
        let plan = schedule(7, 2 * kinds as u64, &FaultKind::ALL, &nodes());
        for round in plan.chunks(kinds) {
            for kind in FaultKind::ALL {
                assert_eq!(round.iter().filter(|f| f.kind == kind).count(), 1);
            }
        }
        assert!(plan.iter().any(|f| f.node == "a") && plan.iter().any(|f| f.node == "b"));
        let stops: Vec<u64> = schedule(9, 120, &[FaultKind::Stop], &nodes())
            .iter()
            .map(|f| f.pause_ms)
            .collect();
        assert!(stops.iter().any(|&ms| ms < 3000) && stops.iter().any(|&ms| ms > 3000));
    }

    #[test]
    fn kinds_parse_by_name() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>(), Ok(kind));
        }
        assert_eq!("agent-kill".parse::<FaultKind>(), Ok(FaultKind::AgentKill));
        assert!(
            "meteor"
                .parse::<FaultKind>()
                .unwrap_err()
                .contains("torn_tail")
        );
    }
}
