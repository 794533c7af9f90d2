//! The faults made while hostd is away (`hostd_down_kill`, `zombie`, `both_stop`,
//! `links_down`). hostd is SIGKILLed first, so the agents decide alone: a node takes over a
//! peer that is dead (its region heartbeat and every interconnect link silent) while hostd
//! is absent, by a claim at the storage daemon's coordinator (docs/takeover.md). The
//! nemesis cannot ask hostd then: it reads what the agents publish in their regions
//! (claims, ejections) and what the clients get. hostd is started again before the fault
//! returns, and must adopt what the agents decided; recovery gives back as after `kill`.
//!
//! A node that lost its identities is fenced as the backend allows ([`Fence`]): QEMU
//! guests at the storage daemon (their disk keys preempted), so a stopped one wakes and
//! must eject itself; agent processes by the coordinator's SIGKILL before it answers the
//! claim, so a stopped one never wakes.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use wire::control::ClusterStatus;

use super::{
    FaultKind, LINKS, NemesisError, PlannedFault, kill_hostd, pid_of, process_alive, ring_after,
    signal, start_hostd, wait_stopped,
};
use crate::hostd::Hostd;
use crate::regions::{ClusterRegions, Snapshot};
use crate::workload::IdentityAcks;

/// How long the agents get, past their detection time, to claim a dead peer.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node that woke after losing its identities gets to eject itself.
const EJECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a claimed node's process may outlive the claim the nemesis saw (the
/// coordinator kills it before it answers, so it is gone already; this covers the exit).
const KILLED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long two nodes woken together get to settle (the loser, if any, ejected).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the clients get to be served by the taker (only reported).
const SERVED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the writers work without hostd after a takeover, before hostd comes back.
const AWAY_DWELL: Duration = Duration::from_millis(500);
/// How long hostd, back, gets to adopt the agents' claims.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest detection time waited out: a threshold set absurdly must not hang the run.
const MAX_DETECTION: Duration = Duration::from_secs(60);
/// How often the regions are read while waiting.
const POLL: Duration = Duration::from_millis(20);

/// How a node that lost its identities while hostd was away is fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Its disk keys are preempted at the storage daemon (QEMU guests whose disks it
    /// serves): the node keeps running, and must eject itself once it runs again.
    Ejects,
    /// The coordinator SIGKILLs its process before answering the claim (the process
    /// backend: each agent opens its disk images itself, so no key fences it): it never
    /// wakes, and hostd restarts it as a standby.
    Killed,
}

impl Fence {
    /// The fence of a cluster on `backend` ("qemu" or "process").
    pub fn of_backend(backend: &str) -> Self {
        if backend == "process" {
            Fence::Killed
        } else {
            Fence::Ejects
        }
    }

    /// Whether `node` (pid `pid`, in life `life` before the fault) is fenced now.
    fn holds(self, snapshot: &Snapshot, node: &str, life: Option<u64>, pid: u32) -> bool {
        match self {
            Fence::Ejects => ejected_in(snapshot, node, life),
            Fence::Killed => !process_alive(pid),
        }
    }
}

/// What a fault did while hostd was away.
#[derive(Debug)]
pub(super) struct AwayOutcome {
    pub detail: String,
    /// When the node itself was hit (µs since the epoch), after hostd.
    pub node_t: Option<u64>,
}

/// Injects a fault made while hostd is away; returns once hostd is back and adopted what
/// the agents decided.
pub(super) fn inject(
    hostd: &Hostd,
    fault: &PlannedFault,
    status: &ClusterStatus,
    acks: &IdentityAcks,
    fence: Fence,
) -> Result<AwayOutcome, NemesisError> {
    match fault.kind {
        FaultKind::HostdDownKill => hostd_down_kill(hostd, fault, status, acks),
        FaultKind::Zombie => zombie(hostd, fault, status, acks, fence),
        FaultKind::BothStop => both_stop(hostd, fault, status, fence),
        FaultKind::LinksDown => links_down(hostd, fault, status),
        other => Err(NemesisError::DidNotFire(format!(
            "{other} is not a fault made while hostd is away"
        ))),
    }
}

/// SIGKILL hostd, `pause_ms` later SIGKILL the node; its first taker must claim it and
/// serve it; hostd started again adopts the claim.
fn hostd_down_kill(
    hostd: &Hostd,
    fault: &PlannedFault,
    status: &ClusterStatus,
    acks: &IdentityAcks,
) -> Result<AwayOutcome, NemesisError> {
    let node = fault.node.as_str();
    let pid = pid_of(status, node)?;
    let expected = first_taker(status, node)?;
    let mut away = Away::prepare(hostd)?;
    away.kill_hostd(status)?;
    std::thread::sleep(Duration::from_millis(fault.pause_ms));
    signal(pid, Signal::SIGKILL)?;
    wait_gone(pid, Duration::from_secs(5));
    let (hit, node_t) = (Instant::now(), wire::time::now_unix_us());
    let claimed = away.wait_claimed(node, status.epoch, away.detection + CLAIM_TIMEOUT)?;
    claimed.expect_taker(node, &expected)?;
    let served = wait_served(acks, node, node_t, SERVED_TIMEOUT);
    std::thread::sleep(AWAY_DWELL);
    away.back()?;
    wait_adopted(hostd, &[(node, claimed.taker.as_str())], claimed.generation)?;
    Ok(AwayOutcome {
        detail: format!(
            "SIGKILL hostd pid {}; {} ms later SIGKILL {node} pid {pid}; {} claimed it at \
             generation {} within {} ms of the kill; {}; hostd back, adopted it",
            away.hostd_pid,
            fault.pause_ms,
            claimed.taker,
            claimed.generation,
            claimed.at.duration_since(hit).as_millis(),
            served_text(served, "the kill"),
        ),
        node_t: Some(node_t),
    })
}

/// SIGKILL hostd and SIGSTOP the node past detection; its first taker claims and serves it.
/// With [`Fence::Ejects`], SIGCONT the node, which must eject itself; with
/// [`Fence::Killed`], the coordinator must have killed it. hostd started again adopts the
/// claim (and restarts the node as a standby).
fn zombie(
    hostd: &Hostd,
    fault: &PlannedFault,
    status: &ClusterStatus,
    acks: &IdentityAcks,
    fence: Fence,
) -> Result<AwayOutcome, NemesisError> {
    let node = fault.node.as_str();
    let pid = pid_of(status, node)?;
    let expected = first_taker(status, node)?;
    let mut away = Away::prepare(hostd)?;
    let life = away.snapshot()?.region(node).map(|r| r.boot_id);
    away.kill_hostd(status)?;
    away.stop(&[pid])?;
    let (hit, node_t) = (Instant::now(), wire::time::now_unix_us());
    let claimed = away.wait_claimed(node, status.epoch, away.detection + CLAIM_TIMEOUT)?;
    claimed.expect_taker(node, &expected)?;
    let served = wait_served(acks, node, claimed.at_us, SERVED_TIMEOUT);
    let fenced = match fence {
        Fence::Ejects => {
            // Stopped past detection by the drawn margin at least.
            let stopped_for = away.detection + Duration::from_millis(fault.pause_ms);
            std::thread::sleep(stopped_for.saturating_sub(hit.elapsed()));
            away.resume(&[pid])?;
            let woke = Instant::now();
            away.wait_ejected(node, life, EJECT_TIMEOUT)?;
            format!(
                "SIGCONT {node} after {} ms stopped, it ejected itself {} ms later",
                woke.duration_since(hit).as_millis(),
                woke.elapsed().as_millis()
            )
        }
        Fence::Killed => {
            away.wait_killed(node, pid, KILLED_TIMEOUT)?;
            format!(
                "the coordinator had killed {node} (gone within {} ms of the claim seen)",
                claimed.at.elapsed().as_millis()
            )
        }
    };
    // Its clients try it meanwhile: what it acknowledges now is an anomaly.
    std::thread::sleep(AWAY_DWELL);
    away.back()?;
    wait_adopted(hostd, &[(node, claimed.taker.as_str())], claimed.generation)?;
    Ok(AwayOutcome {
        detail: format!(
            "SIGKILL hostd pid {}, SIGSTOP {node} pid {pid}; {} claimed it at generation {} \
             {} ms after the stop; {}; {fenced}; hostd back, adopted it",
            away.hostd_pid,
            claimed.taker,
            claimed.generation,
            claimed.at.duration_since(hit).as_millis(),
            served_text(served, "the claim"),
        ),
        node_t: Some(node_t),
    })
}

/// SIGKILL hostd, SIGSTOP the node and the next one in the ring past detection, SIGCONT
/// both at once: at most one of them may win the other's identity (in a larger cluster a
/// third node takes both over while they are stopped), and every node that lost must be
/// fenced (ejected itself, or killed by the winner's claim: `fence`); hostd started again
/// adopts the outcome.
fn both_stop(
    hostd: &Hostd,
    fault: &PlannedFault,
    status: &ClusterStatus,
    fence: Fence,
) -> Result<AwayOutcome, NemesisError> {
    let node = fault.node.as_str();
    let second = fault
        .second
        .clone()
        .filter(|second| second != node)
        .ok_or_else(|| {
            NemesisError::DidNotFire(format!("both_stop on {node} has no second node"))
        })?;
    let nodes = [node, second.as_str()];
    let pids = [pid_of(status, node)?, pid_of(status, &second)?];
    let mut away = Away::prepare(hostd)?;
    let before = away.snapshot()?;
    let lives = nodes.map(|n| before.region(n).map(|r| r.boot_id));
    away.kill_hostd(status)?;
    away.stop(&pids)?;
    let node_t = wire::time::now_unix_us();
    std::thread::sleep(away.detection + Duration::from_millis(fault.pause_ms));
    away.resume(&pids)?;
    let losers = Losers {
        nodes,
        lives,
        pids,
        fence,
    };
    let settled = away.wait_settled(&losers, status.epoch)?;
    away.back()?;
    let moved: Vec<(&str, &str)> = nodes
        .iter()
        .filter_map(|n| Some((*n, settled.owner(n)?.0?)))
        .filter(|(identity, owner)| identity != owner)
        .collect();
    let generation = nodes
        .iter()
        .filter_map(|n| Some(settled.owner(n)?.1))
        .max()
        .unwrap_or(status.epoch);
    wait_adopted(hostd, &moved, generation)?;
    let outcome = if moved.is_empty() {
        "nobody took either over".to_owned()
    } else {
        let moves: Vec<String> = moved
            .iter()
            .map(|(identity, owner)| format!("{owner} took {identity} over"))
            .collect();
        let fenced = match fence {
            Fence::Ejects => "every loser ejected itself",
            Fence::Killed => "the coordinator killed every loser",
        };
        format!("{} ({fenced})", moves.join(", "))
    };
    Ok(AwayOutcome {
        detail: format!(
            "SIGKILL hostd pid {}, SIGSTOP {node} and {second} for {} ms, SIGCONT both; \
             {outcome}; regions: {}; hostd back, adopted it",
            away.hostd_pid,
            (away.detection + Duration::from_millis(fault.pause_ms)).as_millis(),
            settled.summary(),
        ),
        node_t: Some(node_t),
    })
}

/// Cut every interconnect link of the node and SIGKILL hostd, for longer than detection:
/// both nodes live, so nobody may claim anything. hostd is started again, then the links
/// restored.
fn links_down(
    hostd: &Hostd,
    fault: &PlannedFault,
    status: &ClusterStatus,
) -> Result<AwayOutcome, NemesisError> {
    let node = fault.node.as_str();
    let links: Vec<u16> = if fault.links.is_empty() {
        (0..LINKS).collect()
    } else {
        fault.links.clone()
    };
    let mut away = Away::prepare(hostd)?;
    let initial = away.snapshot()?;
    let restore = |links: &[u16]| {
        for link in links {
            if let Err(error) = hostd.run(&["link", node, &link.to_string(), "up"]) {
                log::warn!("cannot restore link {link} of {node}: {error}");
            }
        }
    };
    for (index, link) in links.iter().enumerate() {
        if let Err(error) = hostd.run(&["link", node, &link.to_string(), "down"]) {
            restore(&links[..index]);
            return Err(error.into());
        }
    }
    away.kill_hostd(status)?;
    let hold = away.detection + Duration::from_millis(fault.pause_ms);
    let deadline = Instant::now() + hold;
    let mut moved = None;
    while Instant::now() < deadline && moved.is_none() {
        std::thread::sleep(POLL);
        let now = away.snapshot()?;
        moved = moves_since(&initial, &now, status.epoch);
    }
    if moved.is_some() {
        // Past the first move: let the rest happen, for the report.
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    }
    let adopted = away.back()?;
    restore(&links);
    if let Some(what) = moved {
        return Err(NemesisError::MovedWithoutDeath {
            kind: fault.kind,
            what: format!("{what}; regions: {}", away.snapshot()?.summary()),
        });
    }
    if adopted.epoch != status.epoch {
        return Err(NemesisError::MovedWithoutDeath {
            kind: fault.kind,
            what: format!("epoch {} → {}", status.epoch, adopted.epoch),
        });
    }
    let shown: Vec<String> = links.iter().map(u16::to_string).collect();
    Ok(AwayOutcome {
        detail: format!(
            "links {} of {node} cut and SIGKILL hostd pid {}, {} ms without either, nobody \
             claimed; hostd back, links restored",
            shown.join(", "),
            away.hostd_pid,
            hold.as_millis()
        ),
        node_t: None,
    })
}

/// What moved between `initial` and `now`: a claim newer than `generation`, or an ejection
/// not there at first.
fn moves_since(initial: &Snapshot, now: &Snapshot, generation: u64) -> Option<String> {
    let mut moves: Vec<String> = now
        .claims_after(generation)
        .into_iter()
        .map(|(node, identity, claim)| {
            format!(
                "{node} claimed {identity} at generation {}",
                claim.generation
            )
        })
        .collect();
    for node in &now.nodes {
        if now.ejected(node).is_some() && now.ejected(node) != initial.ejected(node) {
            moves.push(format!("{node} ejected itself"));
        }
    }
    (!moves.is_empty()).then(|| moves.join(", "))
}

/// The node after `node` in the ring: its first taker.
fn first_taker(status: &ClusterStatus, node: &str) -> Result<String, NemesisError> {
    ring_after(status, node)
        .first()
        .map(|name| (*name).to_owned())
        .ok_or_else(|| NemesisError::DidNotFire(format!("{node} has no taker")))
}

/// Waits until `pid` is gone (or a zombie), at most `timeout`; whether it is.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    !process_alive(pid)
}

/// How long after `since_us` a client got an operation on `identity` invoked after it
/// acknowledged, waiting at most `timeout`; None if none did.
fn wait_served(
    acks: &IdentityAcks,
    identity: &str,
    since_us: u64,
    timeout: Duration,
) -> Option<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        if acks.newest_invoked(identity) >= since_us {
            let now = wire::time::now_unix_us();
            return Some(Duration::from_micros(now.saturating_sub(since_us)));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

fn served_text(served: Option<Duration>, after: &str) -> String {
    match served {
        Some(within) => format!(
            "a client was served again within {} ms of {after}",
            within.as_millis()
        ),
        None => format!(
            "no client was served within {} s of {after}",
            SERVED_TIMEOUT.as_secs()
        ),
    }
}

/// Waits until hostd, back, shows each `(identity, owner)` and an epoch of `generation` or
/// later: it adopted the agents' claims.
fn wait_adopted(
    hostd: &Hostd,
    owners: &[(&str, &str)],
    generation: u64,
) -> Result<(), NemesisError> {
    if owners.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = owners
        .iter()
        .map(|(identity, owner)| format!("{identity} on {owner}"))
        .collect();
    hostd
        .wait_for(
            &format!(
                "hostd to adopt {} (generation {generation})",
                shown.join(", ")
            ),
            ADOPT_TIMEOUT,
            |s| {
                s.epoch >= generation
                    && owners.iter().all(|(identity, owner)| {
                        Hostd::node(s, identity)
                            .is_some_and(|n| n.served_by.as_deref() == Some(owner))
                    })
            },
        )
        .map(|_| ())
        .map_err(|error| NemesisError::NotAdopted(error.to_string()))
}

/// A claim the nemesis saw.
#[derive(Debug)]
struct Claimed {
    taker: String,
    generation: u64,
    /// When it was first seen.
    at: Instant,
    at_us: u64,
}

impl Claimed {
    /// The taker must be the first in the takeover order (it is alive).
    fn expect_taker(&self, identity: &str, expected: &str) -> Result<(), NemesisError> {
        if self.taker == expected {
            return Ok(());
        }
        Err(NemesisError::UnexpectedTaker {
            identity: identity.to_owned(),
            expected: expected.to_owned(),
            got: self.taker.clone(),
        })
    }
}

/// hostd killed by a fault. Dropped before hostd is back (the fault stopped early), it
/// continues the nodes it stopped and starts hostd again: no frozen node and no missing
/// hostd is left behind.
struct Away<'a> {
    hostd: &'a Hostd,
    regions: ClusterRegions,
    /// hostd absent + peer dead, as hostd published them: how long agents take to act.
    detection: Duration,
    hostd_pid: u32,
    stopped: Vec<u32>,
    back: bool,
}

impl<'a> Away<'a> {
    /// Checks that the agents may act without hostd (hostd's presence in the control
    /// region gives them thresholds); hostd is still up.
    fn prepare(hostd: &'a Hostd) -> Result<Self, NemesisError> {
        let mut regions = ClusterRegions::new(&hostd.state_dir);
        let snapshot = regions.snapshot(true)?;
        let presence = snapshot
            .presence
            .filter(shm::HostdPresence::allows_moves_without_hostd)
            .ok_or_else(|| NemesisError::NoFailoverWithoutHostd {
                presence: snapshot.summary(),
            })?;
        let detection = Duration::from_millis(
            presence
                .absent_after_ms
                .saturating_add(presence.peer_dead_after_ms),
        );
        Ok(Self {
            hostd,
            regions,
            detection: detection.min(MAX_DETECTION),
            hostd_pid: 0,
            stopped: Vec::new(),
            back: true,
        })
    }

    fn kill_hostd(&mut self, status: &ClusterStatus) -> Result<(), NemesisError> {
        self.hostd_pid = kill_hostd(status)?;
        self.back = false;
        Ok(())
    }

    /// Starts hostd again; it must adopt the running cluster.
    fn back(&mut self) -> Result<ClusterStatus, NemesisError> {
        self.back = true;
        start_hostd(self.hostd)
    }

    fn snapshot(&mut self) -> Result<Snapshot, NemesisError> {
        Ok(self.regions.snapshot(false)?)
    }

    /// SIGSTOPs every process of `pids` at once, then waits until all their threads stopped.
    fn stop(&mut self, pids: &[u32]) -> Result<(), NemesisError> {
        for &pid in pids {
            signal(pid, Signal::SIGSTOP)?;
            self.stopped.push(pid);
        }
        for &pid in pids {
            wait_stopped(pid, Duration::from_secs(2));
        }
        Ok(())
    }

    /// SIGCONTs every process of `pids`, one right after the other.
    fn resume(&mut self, pids: &[u32]) -> Result<(), NemesisError> {
        for &pid in pids {
            self.stopped.retain(|&stopped| stopped != pid);
            signal(pid, Signal::SIGCONT)?;
        }
        Ok(())
    }

    /// Waits until a node other than `victim` owns `victim`'s identity by a claim newer
    /// than `generation`.
    fn wait_claimed(
        &mut self,
        victim: &str,
        generation: u64,
        timeout: Duration,
    ) -> Result<Claimed, NemesisError> {
        let deadline = Instant::now() + timeout;
        loop {
            let snapshot = self.snapshot()?;
            if let Some((Some(taker), newest)) = snapshot.owner(victim)
                && taker != victim
                && newest > generation
                && snapshot
                    .claim(taker, victim)
                    .is_some_and(|claim| claim.generation == newest)
            {
                return Ok(Claimed {
                    taker: taker.to_owned(),
                    generation: newest,
                    at: Instant::now(),
                    at_us: wire::time::now_unix_us(),
                });
            }
            if Instant::now() >= deadline {
                return Err(NemesisError::DidNotFire(format!(
                    "no node claimed {victim} while hostd was away ({} s past its death or \
                     stop); regions: {}",
                    timeout.as_secs(),
                    snapshot.summary()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `node` published an ejection in its life `life` (any life if unknown).
    fn wait_ejected(
        &mut self,
        node: &str,
        life: Option<u64>,
        timeout: Duration,
    ) -> Result<(), NemesisError> {
        let deadline = Instant::now() + timeout;
        loop {
            let snapshot = self.snapshot()?;
            if ejected_in(&snapshot, node, life) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NemesisError::NotEjected {
                    node: node.to_owned(),
                    timeout,
                    regions: snapshot.summary(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `node`'s process `pid`, claimed, is gone; it is no longer continued
    /// when hostd comes back (its pid may name another process by then).
    fn wait_killed(&mut self, node: &str, pid: u32, timeout: Duration) -> Result<(), NemesisError> {
        let gone = wait_gone(pid, timeout);
        self.stopped.retain(|&stopped| stopped != pid);
        if gone {
            return Ok(());
        }
        Err(NemesisError::NotKilled {
            node: node.to_owned(),
            pid,
            timeout,
            regions: self.snapshot()?.summary(),
        })
    }

    /// After two nodes woke together: waits at least a detection time (a claim comes, if
    /// one does, as soon as either sees the other's heartbeat stale), then until every one
    /// of the `losers`' nodes whose identity another node now owns is fenced. Two nodes that
    /// each own the other's identity both won: an error.
    fn wait_settled(&mut self, losers: &Losers, generation: u64) -> Result<Snapshot, NemesisError> {
        let woke = Instant::now();
        let deadline = woke + self.detection + SETTLE_TIMEOUT;
        loop {
            let snapshot = self.snapshot()?;
            let [first, second] = losers.nodes;
            let lost_to = |node: &str| lost_to(&snapshot, node, generation);
            if lost_to(first) == Some(second) && lost_to(second) == Some(first) {
                return Err(NemesisError::BothWon {
                    first: first.to_owned(),
                    second: second.to_owned(),
                    regions: snapshot.summary(),
                });
            }
            match losers.unfenced(&snapshot, generation) {
                None if woke.elapsed() >= self.detection => return Ok(snapshot),
                Some(index) if Instant::now() >= deadline => {
                    let node = losers.nodes[index].to_owned();
                    let timeout = self.detection + SETTLE_TIMEOUT;
                    let regions = snapshot.summary();
                    return Err(match losers.fence {
                        Fence::Ejects => NemesisError::NotEjected {
                            node,
                            timeout,
                            regions,
                        },
                        Fence::Killed => NemesisError::NotKilled {
                            node,
                            pid: losers.pids[index],
                            timeout,
                            regions,
                        },
                    });
                }
                _ => std::thread::sleep(POLL),
            }
        }
    }
}

/// The two nodes `both_stop` stopped, as they were before: each may lose and must then be
/// fenced.
struct Losers<'n> {
    nodes: [&'n str; 2],
    /// Their lives (boot ids) before the fault, if known.
    lives: [Option<u64>; 2],
    pids: [u32; 2],
    fence: Fence,
}

impl Losers<'_> {
    /// The index of a node that lost its identity (claimed past `generation` by another
    /// node) and is not fenced yet.
    fn unfenced(&self, snapshot: &Snapshot, generation: u64) -> Option<usize> {
        (0..2).find(|&index| {
            let node = self.nodes[index];
            lost_to(snapshot, node, generation).is_some()
                && !self
                    .fence
                    .holds(snapshot, node, self.lives[index], self.pids[index])
        })
    }
}

/// The node that owns `node`'s identity by a record newer than `generation`, if another.
fn lost_to<'s>(snapshot: &'s Snapshot, node: &str, generation: u64) -> Option<&'s str> {
    let (owner, newest) = snapshot.owner(node)?;
    owner.filter(|owner| *owner != node && newest > generation)
}

/// Whether `node` ejected itself in life `life` (any, if None).
fn ejected_in(snapshot: &Snapshot, node: &str, life: Option<u64>) -> bool {
    snapshot.region(node).is_some_and(|region| {
        region.ejected.is_some() && life.is_none_or(|life| region.boot_id == life)
    })
}

impl Drop for Away<'_> {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.stopped) {
            if let Err(error) = signal(pid, Signal::SIGCONT) {
                log::warn!("cannot continue process {pid}: {error}");
            }
        }
        if !self.back
            && let Err(error) = start_hostd(self.hostd)
        {
            log::warn!(
                "cannot start hostd again after a fault stopped early: {}",
                wire::error_chain::one_line(&error)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::RegionState;
    use shm::{Claim, EjectReason, Ejection, Owner};

    fn snapshot(claims: &[(usize, usize, u64)], ejected: &[usize]) -> Snapshot {
        let names = vec!["a".to_owned(), "b".to_owned()];
        let mut regions: Vec<RegionState> = (0..2)
            .map(|i| RegionState {
                boot_id: 10 + i,
                claims: vec![None, None],
                ejected: None,
            })
            .collect();
        for &(node, identity, generation) in claims {
            regions[node].claims[identity] = Some(Claim {
                generation,
                victim: identity as u32,
            });
        }
        for &node in ejected {
            regions[node].ejected = Some(Ejection {
                generation: 5,
                reason: EjectReason::NotMember,
                unix_ns: 1,
            });
        }
        let newest = (0..2)
            .map(|identity| {
                let claimed = claims
                    .iter()
                    .filter(|c| c.1 == identity)
                    .max_by_key(|c| c.2);
                Some(claimed.map_or(
                    Owner {
                        node: Some(identity as u32),
                        epoch: 0,
                    },
                    |&(node, _, generation)| Owner {
                        node: Some(node as u32),
                        epoch: generation,
                    },
                ))
            })
            .collect();
        Snapshot {
            nodes: names.clone(),
            identities: names,
            recorded: vec![None, None],
            newest,
            regions: regions.into_iter().map(Some).collect(),
            presence: None,
        }
    }

    #[test]
    fn a_claim_or_an_ejection_is_a_move_during_links_down() {
        let quiet = snapshot(&[], &[]);
        assert_eq!(moves_since(&quiet, &quiet, 0), None);
        let claimed = snapshot(&[(1, 0, 3)], &[]);
        assert_eq!(
            moves_since(&quiet, &claimed, 0).as_deref(),
            Some("b claimed a at generation 3")
        );
        // A claim of an earlier cycle (not newer than the epoch before the fault) is none.
        assert_eq!(moves_since(&claimed, &claimed, 3), None);
        let ejected = snapshot(&[], &[0]);
        assert_eq!(
            moves_since(&quiet, &ejected, 0).as_deref(),
            Some("a ejected itself")
        );
        assert_eq!(moves_since(&ejected, &ejected, 0), None);
    }

    #[test]
    fn a_loser_is_fenced_as_its_backend_fences() {
        // b claimed a at generation 3; b lost nothing.
        let claimed = snapshot(&[(1, 0, 3)], &[]);
        let ejected = snapshot(&[(1, 0, 3)], &[0]);
        let alive = std::process::id();
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let gone = exited.id();
        exited.wait().unwrap();
        let losers = |fence, pids| Losers {
            nodes: ["a", "b"],
            lives: [Some(10), Some(11)],
            pids,
            fence,
        };
        // QEMU guests: a must eject itself, whatever its process does.
        let ejects = losers(Fence::Ejects, [gone, alive]);
        assert_eq!(ejects.unfenced(&claimed, 0), Some(0));
        assert_eq!(ejects.unfenced(&ejected, 0), None);
        // A claim of an earlier cycle is no loss now.
        assert_eq!(ejects.unfenced(&claimed, 3), None);
        // Agent processes: a's must be gone; an ejection note alone is not enough.
        assert_eq!(
            losers(Fence::Killed, [alive, alive]).unfenced(&ejected, 0),
            Some(0)
        );
        assert_eq!(
            losers(Fence::Killed, [gone, alive]).unfenced(&claimed, 0),
            None
        );
        assert_eq!(Fence::of_backend("process"), Fence::Killed);
        assert_eq!(Fence::of_backend("qemu"), Fence::Ejects);
    }

    #[test]
    fn an_ejection_counts_in_the_life_that_lost() {
        let ejected = snapshot(&[(1, 0, 3)], &[0]);
        assert!(ejected_in(&ejected, "a", Some(10)));
        assert!(ejected_in(&ejected, "a", None));
        // Another life's (a restarted node's) note is not this one's.
        assert!(!ejected_in(&ejected, "a", Some(9)));
        assert!(!ejected_in(&ejected, "b", None));
    }
}
