//! Failover without hostd: while hostd is away, this node claims a dead peer's identities
//! at the coordinator and takes them over, or ejects itself when it finds it lost.
//!
//! Each round of the failover monitor reads hostd's presence counter and the peers'
//! heartbeats (cheap: a few words); only while hostd is absent does it ask the coordinator
//! for its state (about once a second: membership and takers) and decide
//! ([`decision`]). A won claim is published in this node's region, one claim per identity
//! won, before anything of the victim's log is read; then each identity is taken over as
//! hostd's `TakeOver` with the replay flag would (the victim's log replayed and served at
//! the claim's generation, the service IP held in bridge mode, the identity's port in
//! process mode). A node the coordinator says is no member, or one that finds a peer's
//! claim of an identity it served, stops serving everything, drops its addresses and
//! listeners, says so in its region ([`shm::Ejection`]) and stays a standby until hostd
//! restarts it.

pub mod decision;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shm::node::Ack;
use shm::{Claim, ClaimWriter, EjectReason, Ejection, LinkStateCode, NodeRegion, TakeOverArgument};
use wire::agent::IdentityPorts;
use wire::coordinator::{CoordinatorState, LostReason};

use super::FailoverMonitor;
use crate::coordinator::{ClaimOutcome, CoordinatorClient};
use crate::nvram::FlushHold;
use decision::{Hostd, PeerView, Verdict, View};

/// How often the coordinator's state is read while hostd is absent.
pub const STATE_EVERY: Duration = Duration::from_secs(1);
/// How often a claim without an answer is asked again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long after a claim (won or lost) the same victim is not claimed again.
pub const CLAIM_PAUSE: Duration = Duration::from_secs(5);
/// A link table not published for this long is stale: its interconnect stopped, and its
/// links say nothing.
const LINK_TABLE_STALE_MS: u64 = 5000;

/// A counter and since when it has stood still, on this node's monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Stillness {
    value: Option<u64>,
    since: Instant,
}

impl Stillness {
    fn observe(&mut self, value: Option<u64>, now: Instant) {
        if value != self.value {
            *self = Self { value, since: now };
        }
    }

    fn still_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

/// What the monitor keeps for failover without hostd (only with `--coordinator`).
#[derive(Debug)]
pub struct WithoutHostd {
    client: CoordinatorClient,
    /// Process mode: the port of each identity's address.
    identity_ports: IdentityPorts,
    claims: ClaimWriter,
    /// Whether this node runs an interconnect (else its link table says nothing).
    interconnect: bool,
    /// When this agent started watching: a counter never seen moving stands still since.
    started: Instant,
    hostd_beat: Option<Stillness>,
    peer_beats: BTreeMap<u32, Stillness>,
    /// hostd's standing in the last round.
    hostd: Hostd,
    state: Option<CoordinatorState>,
    next_fetch: Instant,
    next_retry: Instant,
    /// When this node last claimed each victim.
    claimed: BTreeMap<u32, Instant>,
    /// The last decision logged.
    said: String,
    /// Whether the last state request failed (said once per failing streak).
    unreachable: bool,
    ejected: Option<Ejection>,
    /// Keeps an ejected node's flusher from writing anything more to the disks.
    _ejected_hold: Option<FlushHold>,
}

impl WithoutHostd {
    pub fn new(
        client: CoordinatorClient,
        identity_ports: IdentityPorts,
        claims: ClaimWriter,
        interconnect: bool,
        now: Instant,
    ) -> Self {
        Self {
            client,
            identity_ports,
            claims,
            interconnect,
            started: now,
            hostd_beat: None,
            peer_beats: BTreeMap::new(),
            hostd: Hostd::Decides,
            state: None,
            next_fetch: now,
            next_retry: now,
            claimed: BTreeMap::new(),
            said: String::new(),
            unreachable: false,
            ejected: None,
            _ejected_hold: None,
        }
    }

    /// Whether this node ejected itself.
    pub fn ejected(&self) -> Option<Ejection> {
        self.ejected
    }

    /// Whether hostd was absent in the last round.
    pub fn hostd_absent(&self) -> bool {
        self.hostd == Hostd::Absent
    }

    fn observe(&mut self, hostd: Option<u64>, peers: &BTreeMap<u32, NodeRegion>, now: Instant) {
        let started = self.started;
        let first = |value| Stillness {
            value,
            since: started,
        };
        self.hostd_beat
            .get_or_insert(first(hostd))
            .observe(hostd, now);
        for (id, peer) in peers {
            let beat = peer.heartbeat().map(|h| h.counter);
            self.peer_beats
                .entry(*id)
                .or_insert(first(beat))
                .observe(beat, now);
        }
    }

    /// Whether every interconnect link of this node to `peer` is silent, by this node's
    /// link table (in `own`, published by its interconnect).
    fn links_silent(&self, own: &NodeRegion, peer: u32) -> bool {
        if !self.interconnect {
            return true;
        }
        let Some(config) = own.interconnect_config() else {
            return true;
        };
        let stale = wire::time::now_unix_ms().saturating_sub(config.published_unix_ms)
            > LINK_TABLE_STALE_MS;
        if config.links == 0 || stale {
            return true;
        }
        !(0..usize::from(config.links)).any(|link| {
            own.link_status(peer as usize, link).is_some_and(|status| {
                matches!(status.state, LinkStateCode::Up | LinkStateCode::Degraded)
            })
        })
    }

    /// Logs the decision when it differs from the last one (a claim says more itself).
    fn say(&mut self, verdict: &Verdict, name: &dyn Fn(u32) -> String) {
        let said = verdict.describe(name);
        if said != self.said {
            if !matches!(verdict, Verdict::Claim { .. }) {
                log::info!("failover without hostd: {said}");
            }
            self.said = said;
        }
    }
}

impl FailoverMonitor {
    /// One round of failover without hostd (nothing without `--coordinator`).
    pub(super) fn act_without_hostd(&mut self, now: Instant) {
        let Some(mut alone) = self.without_hostd.take() else {
            return;
        };
        self.round_without_hostd(&mut alone, now);
        self.without_hostd = Some(alone);
    }

    fn round_without_hostd(&mut self, alone: &mut WithoutHostd, now: Instant) {
        let presence = self.control.hostd();
        alone.observe(presence.map(|p| p.counter), &self.peers, now);
        let hostd_still_for = alone
            .hostd_beat
            .map_or(Duration::ZERO, |s| s.still_for(now));
        alone.hostd = decision::hostd(presence, hostd_still_for);
        if alone.ejected.is_some() {
            return;
        }
        // A claim the coordinator may have carried out: its answer comes first.
        if let Some(victim) = alone.client.unanswered() {
            if now >= alone.next_retry {
                self.claim(alone, victim, now);
            }
            return;
        }
        let peers = if alone.hostd == Hostd::Absent {
            if now >= alone.next_fetch {
                alone.next_fetch = now + STATE_EVERY;
                fetch_state(alone);
            }
            self.peer_views(alone, now)
        } else {
            Vec::new()
        };
        let verdict = decision::decide(&View {
            me: self.node_id,
            presence,
            hostd_still_for,
            peers: &peers,
            state: alone.state.as_ref(),
        });
        alone.say(&verdict, &|node| self.node_name(node));
        match verdict {
            Verdict::NotMember => {
                let generation = alone.state.as_ref().map_or(0, |s| s.generation);
                self.eject(alone, EjectReason::NotMember, generation);
            }
            Verdict::Claim { victim } => {
                let still = peers
                    .iter()
                    .find(|p| p.node == victim)
                    .map_or(Duration::ZERO, |p| p.beat_still_for);
                let name = self.node_name(victim);
                log::info!(
                    "failover without hostd: claiming {name}'s identities: hostd's presence stood still for {hostd_still_for:?}, {name}'s heartbeat for {still:?} with {}, and this node is its first live taker",
                    if alone.interconnect {
                        "every interconnect link to it silent"
                    } else {
                        "no interconnect"
                    }
                );
                self.claim(alone, victim, now);
            }
            Verdict::HostdDecides
            | Verdict::HostdPresent
            | Verdict::NoState
            | Verdict::UnknownToCoordinator
            | Verdict::Wait(_) => {}
        }
    }

    fn peer_views(&self, alone: &WithoutHostd, now: Instant) -> Vec<PeerView> {
        let identities = self.control.header().identities.len() as u32;
        let owners: Vec<Option<u32>> = (0..identities)
            .map(|identity| self.owner(identity).and_then(|o| o.node))
            .collect();
        self.peers
            .keys()
            .map(|&node| PeerView {
                node,
                beat_still_for: alone
                    .peer_beats
                    .get(&node)
                    .map_or(Duration::ZERO, |s| s.still_for(now)),
                links_silent: alone.links_silent(self.nvram.region(), node),
                owns_something: owners.contains(&Some(node)),
                claimed_recently: alone
                    .claimed
                    .get(&node)
                    .is_some_and(|at| now.saturating_duration_since(*at) < CLAIM_PAUSE),
            })
            .collect()
    }

    /// Claims `victim` at the coordinator and acts on the answer.
    fn claim(&mut self, alone: &mut WithoutHostd, victim: u32, now: Instant) {
        let name = self.node_name(victim);
        let outcome = match alone.client.claim(victim) {
            Ok(outcome) => outcome,
            Err(error) => {
                log::warn!(
                    "the claim of {name} has no answer yet (asked again in {RETRY_EVERY:?} with the same number): {}",
                    wire::error_chain::one_line(&error)
                );
                alone.next_retry = now + RETRY_EVERY;
                return;
            }
        };
        alone.claimed.insert(victim, now);
        // Membership changed, or this node's view of it was old.
        alone.next_fetch = now;
        match outcome {
            ClaimOutcome::Won {
                generation,
                identities,
                preempted,
                not_preempted,
            } => {
                log::info!(
                    "won the claim of {name} at generation {generation}: identities {identities:?}; its key preempted on {}",
                    if preempted.is_empty() {
                        "no disk".to_owned()
                    } else {
                        preempted.join(", ")
                    }
                );
                if !not_preempted.is_empty() {
                    log::warn!(
                        "{name}'s key could not be preempted on {}: only its own checks keep it off those disks",
                        not_preempted.join("; ")
                    );
                }
                self.serve_claimed(alone, victim, generation, &identities);
            }
            ClaimOutcome::Lost { reason, state } => {
                log::info!(
                    "lost the claim of {name} (generation {}): {}",
                    state.generation,
                    reason.describe()
                );
                let generation = state.generation;
                alone.state = Some(state);
                if reason == LostReason::NotMember {
                    self.eject(alone, EjectReason::NotMember, generation);
                }
            }
        }
    }

    /// Takes over the identities won from `victim` at `generation`.
    fn serve_claimed(
        &mut self,
        alone: &mut WithoutHostd,
        victim: u32,
        generation: u64,
        identities: &[u32],
    ) {
        let served: Vec<u32> = identities
            .iter()
            .copied()
            .filter(|identity| {
                let here = self.identities.contains_key(identity);
                if !here {
                    log::warn!(
                        "identity {identity}, won from {}, has no disk here: it is served by nobody until hostd moves it",
                        self.node_name(victim)
                    );
                }
                here
            })
            .collect();
        // Before anything of the victim's log is read (the fence is in `publish`): a write
        // the victim logs from now on either is in what the replay reads, or meets this
        // claim in the victim's check after logging it (see `shm::claims`).
        for &identity in &served {
            alone.claims.publish(identity, Claim { generation, victim });
        }
        for identity in served {
            let Ok(name) = self.export(identity).map(|e| e.volume().name.clone()) else {
                continue;
            };
            // A late answer (hostd came back, adopted the claim and moved the identity on)
            // must not lay the victim's old records over a newer owner's.
            let owner = self.owner(identity);
            if owner
                != Some(shm::Owner {
                    node: Some(self.node_id),
                    epoch: generation,
                })
            {
                log::warn!(
                    "{name}, won at generation {generation}, has a newer owner now ({owner:?}): not taken over here"
                );
                continue;
            }
            let port = match self.listen_ip {
                Some(_) => alone.identity_ports.port(&name).unwrap_or_else(|| {
                    log::warn!(
                        "--identity-ports names no port for {name}: it is not listened for here"
                    );
                    0
                }),
                None => 0,
            };
            let argument = TakeOverArgument {
                replay_from: Some(victim),
                port,
            };
            let mut ack = Ack::default();
            let started = Instant::now();
            let victim_name = self.node_name(victim);
            match self.take_over(identity, argument, generation, &mut ack) {
                Ok(()) => log::info!(
                    "took {name} over from {victim_name} at generation {generation} in {:?}: its log's seq {}..={} served while replayed{}",
                    started.elapsed(),
                    ack.first_seq,
                    ack.last_seq,
                    if ack.status == shm::node::ack_status::PARTIAL_REPLAY {
                        " (in part: a bad record ends it)"
                    } else {
                        ""
                    }
                ),
                Err(error) => log::error!(
                    "cannot take {name} over from {victim_name} after winning it: {error}; it is served by nobody until hostd moves it"
                ),
            }
            if let Some(job) = self.pending_replay.take() {
                job.start();
            }
        }
    }

    /// Stops serving everything for the rest of this agent's life: hostd restarts it.
    fn eject(&mut self, alone: &mut WithoutHostd, reason: EjectReason, generation: u64) {
        log::warn!(
            "ejecting this node at generation {generation}: {}; it serves nothing until hostd restarts it",
            reason.describe()
        );
        let served: Vec<u32> = self
            .identities
            .iter()
            .filter(|(_, entry)| entry.export.volume().writable())
            .map(|(id, _)| *id)
            .collect();
        for identity in served {
            if let Err(error) = self.stop_writing(identity) {
                log::error!("cannot stop serving identity {identity}: {error}");
            }
        }
        for entry in self.identities.values_mut() {
            entry.listener = None;
        }
        // What is left in the log is the claimer's to replay, or was refused to its clients:
        // none of it may reach a disk from here.
        let flushed = self.nvram.region().flushed().map_or(0, |c| c.seq);
        alone._ejected_hold = Some(self.nvram.hold_flusher(flushed));
        let ejection = Ejection {
            generation,
            reason,
            unix_ns: wire::time::now_unix_us().saturating_mul(1000),
        };
        alone.claims.eject(ejection);
        alone.ejected = Some(ejection);
    }

    /// After the fence found a peer's claim of identities this node served: while hostd is
    /// absent, this node lost them to a claim, so it is no member any more either.
    pub(super) fn ejected_by_claim(&mut self, generation: u64) {
        let Some(mut alone) = self.without_hostd.take() else {
            return;
        };
        if alone.hostd_absent() && alone.ejected.is_none() {
            self.eject(&mut alone, EjectReason::Claimed, generation);
        }
        self.without_hostd = Some(alone);
    }

    /// Node `node`'s name, for logs.
    fn node_name(&self, node: u32) -> String {
        self.control
            .header()
            .nodes
            .get(node as usize)
            .map_or_else(|| format!("node {node}"), |name| format!("node {name}"))
    }

    /// Whether this node ejected itself.
    pub(super) fn ejection(&self) -> Option<Ejection> {
        self.without_hostd.as_ref().and_then(WithoutHostd::ejected)
    }
}

fn fetch_state(alone: &mut WithoutHostd) {
    match alone.client.state() {
        Ok(state) => {
            if alone.unreachable {
                log::info!(
                    "the coordinator answers again (generation {})",
                    state.generation
                );
            }
            alone.unreachable = false;
            alone.state = Some(state);
        }
        Err(error) => {
            if !alone.unreachable {
                log::warn!(
                    "cannot read the coordinator's state (asked again every {STATE_EVERY:?}): {}",
                    wire::error_chain::one_line(&error)
                );
            }
            alone.unreachable = true;
        }
    }
}
