//! Moving identities between nodes: takeover after a failure, planned takeover, giveback.
//!
//! Unplanned takeover (a node went Down): fence first (kill and reap: no takeover until
//! the node is confirmed dead), then a new epoch and owner in the control region, then the
//! taker's `TakeOver` command (it replays the dead node's log and acknowledges), then the
//! address. Planned moves (takeover, giveback) release first: the old owner stops writing
//! and flushes its log before the new one starts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use shm::CommandKind;
use shm::TakeOverArgument;
use shm::node::ack_status;
use wire::control::{MoveReport, NodeState, Response, Timeline};
use wire::events::Event;

use super::backend::BackendError;
use super::cluster::{Cluster, CommandError, LaunchError, PendingReplay};
use super::topology::{IdentityId, NodeId};

/// How long an agent may take to acknowledge a takeover (a replay of a full log included).
const TAKEOVER_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node fenced at the storage only (kept running) has to say it stopped serving
/// an identity that moved (see [`move_identity`]).
const STOP_SERVING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a release may take (the old owner flushes its whole log).
const RELEASE_ACK_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a taker gets to ask the holder over the interconnect (its agent waits 3 s for
/// the answer).
const NEGOTIATE_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node whose takeover of an identity failed is passed over for it, so that the
/// next node of the list is tried (and one that keeps failing does not cost an epoch per tick).
const REFUSED_TAKEOVER_BACKOFF: Duration = Duration::from_secs(5);
/// How long a restarted node may take to boot for a giveback.
const GIVEBACK_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Why a move failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot fence node {node}")]
    Fence {
        node: String,
        #[source]
        source: BackendError,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("cannot move the address of {identity} to node {node}")]
    Address {
        identity: String,
        node: String,
        #[source]
        source: BackendError,
    },
    #[error("cannot restart node {node}")]
    Restart {
        node: String,
        #[source]
        source: Box<LaunchError>,
    },
}

/// How an identity moves.
#[derive(Debug, Clone)]
enum Move {
    /// Its owner was fenced; the new owner replays its log.
    Unplanned { reason: String },
    /// Its owner `from` is alive and releases it first.
    Planned { from: NodeId, reason: String },
}

/// A giveback waiting for its node to boot.
#[derive(Debug)]
struct PendingGiveback {
    node: NodeId,
    reply: Option<Sender<Response>>,
    started: Instant,
    started_unix_ms: u64,
    /// Whether this giveback started the node's process again.
    restarted: bool,
}

/// The moves in progress: the daemon's failover state beside the cluster's.
#[derive(Debug, Default)]
pub struct Moves {
    pending_giveback: Option<PendingGiveback>,
    /// Per node, hostd's own restarts of it within the window.
    restarts: BTreeMap<NodeId, Restarts>,
}

/// hostd's own restarts of one node.
#[derive(Debug, Default)]
struct Restarts {
    times: Vec<Instant>,
    /// The limit was reached and said so.
    exhausted: bool,
}

/// The wait before restart number `n` (0-based) within the window: at once, then
/// `first`, twice that, and so on, at most a minute.
fn restart_backoff(n: usize, first: Duration) -> Duration {
    match n {
        0 => Duration::ZERO,
        n => first
            .saturating_mul(1 << (n - 1).min(16))
            .min(Duration::from_secs(60)),
    }
}

fn ms_since(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn node_named(cluster: &Cluster, name: &str) -> Result<NodeId, MoveError> {
    cluster
        .node_named(name)
        .ok_or_else(|| MoveError::NoSuchNode(name.to_owned()))
}

impl Moves {
    /// What the main loop does on every tick: fence and take over what went Down, move
    /// identities whose taker was not ready before, finish a giveback whose node is up.
    pub fn tick(&mut self, cluster: &mut Cluster) {
        cluster.beat();
        cluster.check_storage();
        // Before any decision: a claim the agents won while hostd was away stands.
        cluster.probe_coordinator();
        for node in cluster.sample() {
            fail_over(cluster, node);
        }
        // A giveback whose node is up takes its identity before anyone else may.
        self.continue_giveback(cluster);
        adopt_orphans(cluster);
        restore_addresses(cluster);
        self.restart_for_orphans(cluster);
        self.restart_non_members(cluster);
        report_finished_replays(cluster);
        cluster.observe_links();
    }

    /// Whether hostd may restart `node` by itself now, within the restart budget (the limit
    /// within the window, and the backoff since the last restart); says once when the limit
    /// is reached. Counts the restart and returns its number when it may.
    fn restart_allowed(&mut self, cluster: &Cluster, node: NodeId) -> Option<u32> {
        let limit = cluster.recovery().restart_limit as usize;
        let window = Duration::from_secs(cluster.recovery().restart_window_s);
        let backoff = Duration::from_millis(cluster.recovery().restart_backoff_ms);
        let restarts = self.restarts.entry(node).or_default();
        restarts.times.retain(|t| t.elapsed() < window);
        if restarts.times.len() >= limit {
            if !restarts.exhausted && limit > 0 {
                restarts.exhausted = true;
                let name = cluster.topology().name(node).to_owned();
                log::error!(
                    "node {name}: {limit} restarts within {window:?}; hostd restarts it no more (`hostd giveback {name}` does)"
                );
                cluster.record(&Event::RestartsExhausted {
                    node: name,
                    restarts: limit as u32,
                });
            }
            return None;
        }
        let waited = restarts
            .times
            .last()
            .map_or(Duration::MAX, Instant::elapsed);
        if waited < restart_backoff(restarts.times.len(), backoff) {
            return None;
        }
        restarts.times.push(Instant::now());
        Some(restarts.times.len() as u32)
    }

    /// Restarts as standbys the nodes fenced because they lost their place while hostd was
    /// away (the coordinator says they are no members: another node claimed what they
    /// held; or they ejected themselves), within the restart budget. A node that is no
    /// member rejoins before its start; one whose identity is held elsewhere waits for
    /// `hostd giveback`.
    fn restart_non_members(&mut self, cluster: &mut Cluster) {
        for (node, why) in cluster.nodes_to_rejoin() {
            let health = cluster.node(node);
            if !health.fenced || cluster.pid(node).is_some() {
                // Started again meanwhile (a giveback, or a restart for an orphan).
                cluster.forget_rejoin(node);
                continue;
            }
            let Some(attempt) = self.restart_allowed(cluster, node) else {
                continue;
            };
            let name = cluster.topology().name(node).to_owned();
            let reason = format!("restarted as a standby: {why}");
            log::warn!("node {name}: {reason} (attempt {attempt})");
            cluster.record(&Event::NodeRestarted {
                node: name.clone(),
                attempt,
                reason: reason.clone(),
            });
            if let Err(source) = restart(cluster, node) {
                let error = MoveError::Restart {
                    node: name,
                    source: Box::new(source),
                };
                cluster.record_failure(node.home_identity(), node, &reason, &error);
            }
        }
    }

    /// Restarts a fenced node when an identity has no live node that could serve it
    /// (its holder and every candidate are fenced or down), within the restart budget.
    fn restart_for_orphans(&mut self, cluster: &mut Cluster) {
        let identities: Vec<IdentityId> = cluster.topology().identities().collect();
        for identity in identities {
            let Some(owner) = cluster.owner_of(identity) else {
                continue;
            };
            if !cluster.node(owner).fenced {
                continue;
            }
            let candidates: Vec<NodeId> = cluster
                .topology()
                .takeover_candidates(owner.home_identity())
                .collect();
            let alive = |node: NodeId| {
                matches!(
                    cluster.node(node).state(),
                    NodeState::Up | NodeState::Suspect | NodeState::Booting | NodeState::Paused
                )
            };
            if candidates.iter().any(|&node| alive(node)) {
                continue;
            }
            // The first candidate gets the identity once it is up (adopt_orphans).
            let Some(&target) = candidates.first() else {
                continue;
            };
            let Some(attempt) = self.restart_allowed(cluster, target) else {
                continue;
            };
            let name = cluster.topology().name(target).to_owned();
            let reason = format!(
                "no live node can serve {}",
                cluster.topology().identity_name(identity)
            );
            log::warn!("node {name}: restarting it ({reason}, attempt {attempt})");
            cluster.record(&Event::NodeRestarted {
                node: name.clone(),
                attempt,
                reason: reason.clone(),
            });
            if let Err(source) = restart(cluster, target) {
                let error = MoveError::Restart {
                    node: name,
                    source: Box::new(source),
                };
                cluster.record_failure(identity, target, &reason, &error);
            }
        }
    }

    /// `hostd giveback NODE`: starts NODE again if it is not running; the move itself
    /// happens once it is up (see [`Moves::continue_giveback`]).
    pub fn start_giveback(
        &mut self,
        cluster: &mut Cluster,
        name: &str,
        reply: Option<Sender<Response>>,
    ) {
        match self.begin_giveback(cluster, name) {
            Ok(pending) => {
                self.pending_giveback = Some(PendingGiveback { reply, ..pending });
                // It may be up already.
                self.continue_giveback(cluster);
            }
            Err(error) => send(
                reply,
                Response::Error {
                    message: wire::error_chain::one_line(&error),
                },
            ),
        }
    }

    fn begin_giveback(
        &mut self,
        cluster: &mut Cluster,
        name: &str,
    ) -> Result<PendingGiveback, MoveError> {
        let node = node_named(cluster, name)?;
        let identity = node.home_identity();
        if self.pending_giveback.is_some() {
            return Err(MoveError::Refused(
                "a giveback is already in progress".into(),
            ));
        }
        // A fenced node has an exit status too: no pid means nothing runs.
        let dead = |cluster: &Cluster, node: NodeId| {
            cluster.pid(node).is_none()
                || matches!(
                    cluster.node(node).state(),
                    NodeState::Down | NodeState::Fenced
                )
        };
        let holder = cluster.owner_of(identity).unwrap_or(node);
        if holder == node && !dead(cluster, node) {
            return Err(MoveError::Refused(format!(
                "{name} holds its own identity already: nothing to give back"
            )));
        }
        // A live holder must be up to release the identity; a dead one was fenced, and the
        // node replays its log instead.
        let holder_state = cluster.node(holder).state();
        if holder != node && holder_state != NodeState::Up && !cluster.node(holder).fenced {
            return Err(MoveError::Refused(format!(
                "{} holds {name}'s identity and is {}: it cannot release it",
                cluster.topology().name(holder),
                holder_state.as_str()
            )));
        }
        let started = Instant::now();
        // The operator's word: hostd may restart it by itself again.
        self.restarts.remove(&node);
        let restart_needed = dead(cluster, node);
        if restart_needed {
            restart(cluster, node).map_err(|source| MoveError::Restart {
                node: name.to_owned(),
                source: Box::new(source),
            })?;
            log::info!("giveback: node {name} restarted; waiting for its agent");
        }
        let restart = restart_needed;
        Ok(PendingGiveback {
            node,
            reply: None,
            started,
            started_unix_ms: wire::time::now_unix_ms(),
            restarted: restart,
        })
    }

    /// Completes a pending giveback once its node is up; gives up after a boot timeout.
    fn continue_giveback(&mut self, cluster: &mut Cluster) {
        let Some(pending) = self.pending_giveback.take() else {
            return;
        };
        let node = pending.node;
        let name = cluster.topology().name(node).to_owned();
        let state = cluster.node(node).state();
        if state != NodeState::Up {
            if pending.started.elapsed() > GIVEBACK_BOOT_TIMEOUT
                || matches!(state, NodeState::Down | NodeState::Fenced)
            {
                let error = MoveError::Refused(format!(
                    "node {name} did not come up for the giveback (it is {})",
                    state.as_str()
                ));
                send(
                    pending.reply,
                    Response::Error {
                        message: error.to_string(),
                    },
                );
            } else {
                self.pending_giveback = Some(pending);
            }
            return;
        }
        let identity = node.home_identity();
        let timeline = Timeline {
            restarted: pending.restarted.then(|| ms_since(pending.started)),
            ..Timeline::default()
        };
        let response = match cluster.owner_of(identity) {
            Some(holder) if holder != node => {
                let how = if cluster.node(holder).fenced {
                    // Its holder died too: the node replays the holder's log.
                    Move::Unplanned {
                        reason: format!(
                            "giveback (hostd giveback) from fenced {}",
                            cluster.topology().name(holder)
                        ),
                    }
                } else {
                    Move::Planned {
                        from: holder,
                        reason: "giveback (hostd giveback)".into(),
                    }
                };
                let planned = matches!(how, Move::Planned { .. });
                let started = (pending.started, pending.started_unix_ms);
                let mut result =
                    move_identity(cluster, identity, node, how, started, timeline.clone());
                // Only a failed release: once the node owns the identity, its own failure
                // is handled like any taker's.
                if let Err(error) = &result
                    && planned
                    && cluster.owner_of(identity) == Some(holder)
                    && cluster.backend_mut().has_exited(holder)
                {
                    result = replay_from_dead_holder(
                        cluster, identity, node, holder, error, started, timeline,
                    );
                }
                match result {
                    Ok(report) => {
                        cluster.record(&Event::Giveback(report.clone()));
                        Response::Moved(report)
                    }
                    Err(error) => {
                        cluster.record_failure(identity, node, "giveback", &error);
                        Response::Error {
                            message: format!(
                                "giveback of {name} failed: {}",
                                wire::error_chain::one_line(&error)
                            ),
                        }
                    }
                }
            }
            // It held its own identity when it died: restarted, it serves it again from
            // its log.
            _ if pending.restarted => Response::Moved(MoveReport {
                node: name.clone(),
                from: name.clone(),
                to: name.clone(),
                planned: true,
                reason: "giveback (hostd giveback): restarted".into(),
                epoch: cluster.epoch(),
                detected_unix_ms: pending.started_unix_ms,
                timeline_ms: timeline,
                replayed_records: 0,
                replayed_first_seq: 0,
                replayed_last_seq: 0,
                replay_complete: true,
            }),
            _ => Response::Error {
                message: format!("{name} holds its own identity already: nothing to give back"),
            },
        };
        send(pending.reply, response);
    }
}

/// The holder died while it released the identity: what it did not flush is in its log,
/// so, once it is fenced, the returning node replays that log, as a takeover from a dead
/// holder does. The giveback then ends as asked, and says how.
fn replay_from_dead_holder(
    cluster: &mut Cluster,
    identity: IdentityId,
    node: NodeId,
    holder: NodeId,
    release_error: &MoveError,
    started: (Instant, u64),
    timeline: Timeline,
) -> Result<MoveReport, MoveError> {
    let holder_name = cluster.topology().name(holder).to_owned();
    log::warn!(
        "giveback: {holder_name} died while releasing ({}); {} replays its log instead",
        wire::error_chain::one_line(release_error),
        cluster.topology().name(node)
    );
    cluster.fence(holder).map_err(|source| MoveError::Fence {
        node: holder_name.clone(),
        source,
    })?;
    move_identity(
        cluster,
        identity,
        node,
        Move::Unplanned {
            reason: format!("giveback (hostd giveback): {holder_name} died while releasing"),
        },
        started,
        timeline,
    )
}

/// Starts a dead node again: whatever is left of its process is reaped, and it starts
/// without its address unless it holds its identity.
fn restart(cluster: &mut Cluster, node: NodeId) -> Result<(), LaunchError> {
    let _ = cluster
        .backend_mut()
        .fence(node, super::cluster::FENCE_TIMEOUT);
    let home = cluster
        .owner_of(node.home_identity())
        .is_none_or(|owner| owner == node);
    cluster.node_mut(node).forwards_own_port = home;
    // What it owns it serves from its start (its own log holds the writes).
    let identities: Vec<IdentityId> = cluster.topology().identities().collect();
    for identity in identities {
        if cluster.owner_of(identity) == Some(node) {
            cluster.record_serving_started(identity, node, cluster.epoch());
        }
    }
    cluster.spawn_node(node)?;
    cluster.connect_node(node)
}

/// Acts on a node that went Down: fences it, then moves every identity it held to a
/// taker. Records the outcome as events; never panics the daemon.
pub fn fail_over(cluster: &mut Cluster, victim: NodeId) {
    let detected = cluster.node(victim).down_at.unwrap_or_else(Instant::now);
    if let Err(source) = cluster.fence(victim) {
        // No takeover without a confirmed fence: two writers would be worse than none.
        let reason = cluster.node(victim).health_reason();
        let error = MoveError::Fence {
            node: cluster.topology().name(victim).to_owned(),
            source,
        };
        let identity = victim.home_identity();
        if let Some(taker) = cluster.topology().first_taker(identity) {
            cluster.record_failure(identity, taker, &reason, &error);
        }
        return;
    }
    cluster.node_mut(victim).fenced_ms = Some(ms_since(detected));
    adopt_orphans(cluster);
}

/// Moves each identity held by a fenced node to a taker, as soon as one can serve (called
/// after every fence and on every tick, so a takeover refused while the taker was booting
/// or suspect happens once it is up).
pub fn adopt_orphans(cluster: &mut Cluster) {
    let identities: Vec<IdentityId> = cluster.topology().identities().collect();
    for identity in identities {
        let Some(owner) = cluster.owner_of(identity) else {
            continue;
        };
        if !cluster.node(owner).fenced {
            continue;
        }
        let reason = cluster.node(owner).health_reason();
        // The nodes that may take the owner's identities, in order; the first live one.
        let takers: Vec<NodeId> = cluster
            .topology()
            .takeover_candidates(owner.home_identity())
            .collect();
        // Up or only late, not already dead without the monitor knowing yet, and not
        // just failed to take this identity over.
        let usable = |cluster: &mut Cluster, taker: NodeId| {
            matches!(
                cluster.node(taker).state(),
                NodeState::Up | NodeState::Suspect
            ) && !cluster.backend_mut().has_exited(taker)
                && !cluster.refused_takeover_lately(identity, taker, REFUSED_TAKEOVER_BACKOFF)
        };
        // A node already replaying the owner's log (a giveback from the dead owner took one
        // identity there) takes the others too: one replay per dead log, so a restarted
        // node's log is settled by one node's word.
        let replaying = cluster
            .replaying_taker(owner)
            .filter(|&taker| cluster.topology().may_hold(identity).contains(&taker))
            .filter(|&taker| usable(cluster, taker));
        let ready =
            replaying.or_else(|| takers.iter().copied().find(|&taker| usable(cluster, taker)));
        let Some(taker) = ready else {
            if !cluster.node(owner).orphan_reported
                && let Some(&first) = takers.first()
            {
                cluster.node_mut(owner).orphan_reported = true;
                let error = MoveError::Refused(format!(
                    "taker {} is {}; the takeover waits until a node that may take over is up",
                    cluster.topology().name(first),
                    cluster.node(first).state().as_str()
                ));
                cluster.record_failure(identity, first, &reason, &error);
            }
            continue;
        };
        let detected = cluster.node(owner).down_at.unwrap_or_else(Instant::now);
        let detected_unix_ms =
            wire::time::now_unix_ms().saturating_sub(detected.elapsed().as_millis() as u64);
        let timeline = Timeline {
            fenced: cluster.node(owner).fenced_ms,
            ..Timeline::default()
        };
        let report = move_identity(
            cluster,
            identity,
            taker,
            Move::Unplanned {
                reason: reason.clone(),
            },
            (detected, detected_unix_ms),
            timeline,
        );
        match report {
            Ok(report) => cluster.record(&Event::Takeover(report)),
            // No fault of the taker's: the next tick tries again on the adopted state.
            Err(error @ MoveError::Command(CommandError::ClaimedMeanwhile { .. })) => {
                cluster.record_failure(identity, taker, &reason, &error);
            }
            Err(error) => {
                cluster.note_refused_takeover(identity, taker);
                cluster.record_failure(identity, taker, &reason, &error);
            }
        }
    }
}

/// Gives each identity held away from home at launch its address again, once its owner
/// is up: the owner is told to serve it (no replay: the log it would replay was replayed
/// when it took the identity over) and the address follows.
pub fn restore_addresses(cluster: &mut Cluster) {
    for identity in cluster.addresses_pending() {
        let Some(owner) = cluster.owner_of(identity) else {
            continue;
        };
        if cluster.node(owner).fenced || cluster.node(owner).state() != NodeState::Up {
            // A fenced owner's identities move on (adopt_orphans); a booting one waits.
            continue;
        }
        let epoch = cluster.epoch();
        match serve_flushed(cluster, identity, owner, epoch) {
            Ok(()) => log::info!(
                "identity {} is served by {} at its address again",
                cluster.topology().identity_name(identity),
                cluster.topology().name(owner)
            ),
            Err(error) => {
                // Said once; `hostd giveback` (or a takeover) is the way out.
                cluster.forget_pending_address(identity);
                cluster.record_failure(
                    identity,
                    owner,
                    "restoring its address after a restart",
                    &error,
                );
            }
        }
    }
}

/// `hostd takeover NODE [--to TAKER]`: another node takes NODE's identity over; NODE keeps
/// running. The taker is `to`, which must be in NODE's takeover list and up, or else the
/// first node of that list that is up.
pub fn planned_takeover(
    cluster: &mut Cluster,
    name: &str,
    to: Option<&str>,
) -> Result<MoveReport, MoveError> {
    let node = node_named(cluster, name)?;
    let identity = node.home_identity();
    if cluster.owner_of(identity) != Some(node) {
        return Err(MoveError::Refused(format!(
            "{name} does not hold its identity now (use `hostd giveback {name}` to return it)"
        )));
    }
    let topology = cluster.topology();
    let candidates = topology.takeover_by(node).to_vec();
    let list = candidates
        .iter()
        .map(|&n| topology.name(n))
        .collect::<Vec<_>>()
        .join(", ");
    let up = |cluster: &Cluster, member: NodeId| cluster.node(member).state() == NodeState::Up;
    let state_of = |cluster: &Cluster, member: NodeId| {
        format!(
            "{} is {}",
            cluster.topology().name(member),
            cluster.node(member).state().as_str()
        )
    };
    if !up(cluster, node) {
        return Err(MoveError::Refused(format!(
            "node {}: a planned takeover needs {name} up to release its identity",
            state_of(cluster, node)
        )));
    }
    let taker = match to {
        Some(to) => {
            let taker = node_named(cluster, to)?;
            if taker == node {
                return Err(MoveError::Refused(format!(
                    "{name} cannot take over its own identity: it holds it already"
                )));
            }
            if !candidates.contains(&taker) {
                return Err(MoveError::Refused(format!(
                    "{to} may not take over {name}'s identity (takeover_by for {name} is [{list}])"
                )));
            }
            if !up(cluster, taker) {
                return Err(MoveError::Refused(format!(
                    "node {}: a planned takeover needs the taker up",
                    state_of(cluster, taker)
                )));
            }
            taker
        }
        None => match candidates.iter().copied().find(|&n| up(cluster, n)) {
            Some(taker) => taker,
            None if candidates.is_empty() => {
                return Err(MoveError::Refused(format!(
                    "no other node may take {name}'s identity over"
                )));
            }
            None => {
                let states = candidates
                    .iter()
                    .map(|&n| state_of(cluster, n))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(MoveError::Refused(format!(
                    "no node that may take over {name}'s identity is up (takeover_by for {name} is [{list}]: {states})"
                )));
            }
        },
    };
    let negotiated = negotiate(cluster, identity, node, taker)?;
    let reason = match to {
        Some(to) => format!("planned takeover (hostd takeover --to {to}), {negotiated}"),
        None => format!("planned takeover (hostd takeover), {negotiated}"),
    };
    let report = move_identity(
        cluster,
        identity,
        taker,
        Move::Planned { from: node, reason },
        (Instant::now(), wire::time::now_unix_ms()),
        Timeline::default(),
    )?;
    cluster.record(&Event::Takeover(report.clone()));
    Ok(report)
}

/// Before a planned takeover, the taker asks the holder over the interconnect whether it
/// gives `identity` up (ONTAP's negotiated takeover). A refusal stops the takeover with the
/// holder's reason; a holder the taker cannot reach is not asked (hostd still has it
/// release first), and the report says so. Returns how it went, in words.
fn negotiate(
    cluster: &mut Cluster,
    identity: IdentityId,
    holder: NodeId,
    taker: NodeId,
) -> Result<String, MoveError> {
    if !cluster.config().interconnect.enabled() {
        return Ok("not negotiated (no interconnect)".into());
    }
    let (holder_name, taker_name) = (
        cluster.topology().name(holder).to_owned(),
        cluster.topology().name(taker).to_owned(),
    );
    let epoch = cluster.epoch();
    let asked = cluster
        .issue(
            taker,
            CommandKind::Negotiate,
            identity,
            epoch,
            holder.index() as u64,
        )
        .and_then(|seq| cluster.await_ack(taker, seq, NEGOTIATE_ACK_TIMEOUT));
    match asked {
        Ok(_) => Ok(format!("agreed by {holder_name} over the interconnect")),
        Err(CommandError::AckFailed {
            status: ack_status::REFUSED,
            ..
        }) => {
            let refusal = cluster
                .node(taker)
                .region
                .ack()
                .map_or(shm::Refusal::Unknown(0), |ack| {
                    shm::Refusal::from_word(ack.first_seq)
                });
            Err(MoveError::Refused(format!(
                "{holder_name} refuses to give its identity up, asked by {taker_name} over the interconnect: {} (`hostd fence {holder_name}` moves it unplanned, replaying its log)",
                refusal.describe()
            )))
        }
        Err(CommandError::AckFailed {
            status: ack_status::UNREACHABLE,
            ..
        }) => {
            log::warn!(
                "{taker_name} could not reach {holder_name} over the interconnect: the takeover goes on unnegotiated"
            );
            Ok(format!(
                "not negotiated ({taker_name} could not reach {holder_name} over the interconnect)"
            ))
        }
        // An agent that does not know the command (an older build) or failed at it: the
        // release below is as safe as before negotiation existed.
        Err(CommandError::AckFailed { status, .. }) => Ok(format!(
            "not negotiated ({taker_name}'s agent answered status {status})"
        )),
        Err(error) => Err(error.into()),
    }
}

/// A `TakeOver` command's argument: the fenced old owner whose log to replay, if any, and
/// the port to listen on where the agents listen themselves.
fn takeover_argument(
    cluster: &mut Cluster,
    identity: IdentityId,
    replay_from: Option<NodeId>,
) -> TakeOverArgument {
    TakeOverArgument {
        replay_from: replay_from.map(|node| node.index() as u32),
        port: if cluster.backend_mut().agents_listen() {
            cluster.port(identity)
        } else {
            0
        },
    }
}

/// Moves `identity` to node `to`. The caller has fenced the old owner (unplanned) or names
/// it for a release (planned).
fn move_identity(
    cluster: &mut Cluster,
    identity: IdentityId,
    to: NodeId,
    how: Move,
    (started, started_unix_ms): (Instant, u64),
    mut timeline: Timeline,
) -> Result<MoveReport, MoveError> {
    let identity_name = cluster.topology().identity_name(identity).to_owned();
    let address_error = |cluster: &Cluster, node: NodeId, source| MoveError::Address {
        identity: identity_name.clone(),
        node: cluster.topology().name(node).to_owned(),
        source,
    };
    let from = match &how {
        Move::Unplanned { .. } => cluster.owner_of(identity).unwrap_or(identity.home()),
        Move::Planned { from, .. } => *from,
    };
    let replay_from = matches!(how, Move::Unplanned { .. }).then_some(from);
    let argument = takeover_argument(cluster, identity, replay_from);
    if let Move::Planned { from, .. } = how {
        // New clients must not reach the old owner while it flushes.
        cluster
            .unforward(from, identity)
            .map_err(|source| address_error(cluster, from, source))?;
        let epoch = cluster.epoch();
        let released = cluster
            .issue(from, CommandKind::Release, identity, epoch, 0)
            .and_then(|seq| cluster.await_ack(from, seq, RELEASE_ACK_TIMEOUT));
        if let Err(error) = released {
            // The old owner keeps the identity. It may have stopped writing (and dropped the
            // service IP) before its release failed: it serves again, then gets the address
            // back.
            if let Err(undo) = serve_flushed(cluster, identity, from, epoch) {
                log::error!(
                    "cannot have {} serve {identity_name} again after a failed release: {}",
                    cluster.topology().name(from),
                    wire::error_chain::one_line(&undo)
                );
                // The address goes back to the owner whatever it answered.
                if let Err(undo) = cluster.forward(from, identity) {
                    log::error!(
                        "cannot restore the address after a failed release: {}",
                        wire::error_chain::one_line(&undo)
                    );
                }
            }
            return Err(error.into());
        }
        timeline.released = Some(ms_since(started));
        cluster.record_serving_ended(identity, from, "released");
    } else {
        // The fenced node's process is gone and with it its forward.
        cluster.node_mut(from).forwards_own_port = false;
    }
    let epoch = cluster.epoch() + 1;
    // Before the owner changes: the agent may start serving as soon as it does.
    cluster.record_serving_started(identity, to, epoch);
    if let Err(error) = cluster.set_owner(identity, to, epoch) {
        refused_by_the_coordinator(cluster, identity, to, &how);
        return Err(error.into());
    }
    if matches!(how, Move::Unplanned { .. }) && cluster.node(from).kept_running {
        // Fenced at the storage only, the old owner still runs and may be logging a write
        // it let in before the owner changed: its log is whole only once it says it
        // stopped serving the identity. One that does not say so in time is killed.
        if !cluster.await_stopped_serving(from, identity, epoch, STOP_SERVING_TIMEOUT) {
            log::warn!(
                "{} did not say it stopped serving {identity_name} within {STOP_SERVING_TIMEOUT:?}: killing it",
                cluster.topology().name(from)
            );
            cluster
                .backend_mut()
                .fence(from, super::cluster::FENCE_TIMEOUT)
                .map_err(|source| MoveError::Fence {
                    node: cluster.topology().name(from).to_owned(),
                    source,
                })?;
            cluster.node_mut(from).kept_running = false;
        }
    }
    let taken = cluster
        .issue(
            to,
            CommandKind::TakeOver,
            identity,
            epoch,
            argument.to_word(),
        )
        .and_then(|seq| cluster.await_ack(to, seq, TAKEOVER_ACK_TIMEOUT));
    let ack = match taken {
        Ok(ack) => ack,
        Err(error) => {
            match how {
                Move::Unplanned { .. } => {
                    // The taker never said it replayed the old owner's log (it died or
                    // failed): the identity goes back to its fenced owner at a new epoch,
                    // so the next taker replays that log, and no one serves it unreplayed.
                    if let Err(undo) = cluster.set_owner(identity, from, epoch + 1) {
                        log::error!(
                            "cannot give {identity_name} back to {} after a failed takeover: {}",
                            cluster.topology().name(from),
                            wire::error_chain::one_line(&undo)
                        );
                    }
                    cluster.record_serving_ended(identity, to, "its takeover failed");
                }
                Move::Planned { .. } => {
                    // The old owner flushed and released it and is alive: it serves the
                    // identity again rather than nobody.
                    cluster.record_serving_ended(identity, to, "its takeover failed");
                    if let Err(undo) = serve_again(cluster, identity, from, epoch + 1) {
                        log::error!(
                            "cannot give {identity_name} back to {} after a failed planned move: {}",
                            cluster.topology().name(from),
                            wire::error_chain::one_line(&undo)
                        );
                    }
                }
            }
            return Err(error.into());
        }
    };
    let replayed = argument.replays();
    if replayed {
        timeline.scanned = Some(ms_since(started));
        cluster.expect_replay(PendingReplay {
            identity,
            taker: to,
            dead: from,
            epoch,
            detected: started,
        });
    }
    cluster
        .forward(to, identity)
        .map_err(|source| address_error(cluster, to, source))?;
    timeline.serving = Some(ms_since(started));
    let report = MoveReport {
        node: identity_name,
        from: cluster.topology().name(from).to_owned(),
        to: cluster.topology().name(to).to_owned(),
        planned: !replayed,
        reason: match how {
            Move::Unplanned { reason } | Move::Planned { reason, .. } => reason,
        },
        epoch,
        detected_unix_ms: started_unix_ms,
        timeline_ms: timeline,
        replayed_records: if replayed {
            (ack.last_seq + 1).saturating_sub(ack.first_seq)
        } else {
            0
        },
        replayed_first_seq: ack.first_seq,
        replayed_last_seq: ack.last_seq,
        replay_complete: ack.status != ack_status::PARTIAL_REPLAY,
    };
    log::info!(
        "identity {} moved {} → {} in {:.1} ms (epoch {epoch})",
        report.node,
        report.from,
        report.to,
        report.timeline_ms.serving.unwrap_or_default()
    );
    Ok(report)
}

/// The coordinator refused the move of `identity` to `to` (a claim an agent won while
/// hostd was away; hostd adopted it): `to` does not serve it, and a planned move's old
/// owner, which released it, serves it again if it still owns it.
fn refused_by_the_coordinator(cluster: &mut Cluster, identity: IdentityId, to: NodeId, how: &Move) {
    cluster.record_serving_ended(identity, to, "the coordinator refused the move");
    let Move::Planned { from, .. } = *how else {
        return;
    };
    if cluster.owner_of(identity) != Some(from) {
        return;
    }
    cluster.record_serving_started(identity, from, cluster.epoch());
    let epoch = cluster.epoch();
    if let Err(undo) = serve_flushed(cluster, identity, from, epoch) {
        log::error!(
            "cannot have {} serve {} again after the coordinator refused its move: {}",
            cluster.topology().name(from),
            cluster.topology().identity_name(identity),
            wire::error_chain::one_line(&undo)
        );
    }
}

/// Gives `identity` back to `node`, which released it (flushed) a moment ago, at `epoch`.
fn serve_again(
    cluster: &mut Cluster,
    identity: IdentityId,
    node: NodeId,
    epoch: u64,
) -> Result<(), MoveError> {
    cluster.record_serving_started(identity, node, epoch);
    cluster.set_owner(identity, node, epoch)?;
    serve_flushed(cluster, identity, node, epoch)
}

/// Has `node`, the owner of `identity` at `epoch`, serve it with no log to replay (the log
/// was replayed or flushed before): `TakeOver` without replay, then the address.
fn serve_flushed(
    cluster: &mut Cluster,
    identity: IdentityId,
    node: NodeId,
    epoch: u64,
) -> Result<(), MoveError> {
    let argument = takeover_argument(cluster, identity, None);
    let seq = cluster.issue(
        node,
        CommandKind::TakeOver,
        identity,
        epoch,
        argument.to_word(),
    )?;
    cluster.await_ack(node, seq, TAKEOVER_ACK_TIMEOUT)?;
    cluster
        .forward(node, identity)
        .map_err(|source| MoveError::Address {
            identity: cluster.topology().identity_name(identity).to_owned(),
            node: cluster.topology().name(node).to_owned(),
            source,
        })
}

/// Records a `replayed` event for each takeover whose taker says its background replay
/// of the dead holder's log has finished.
fn report_finished_replays(cluster: &mut Cluster) {
    for pending in cluster.finished_replays() {
        let (pending, replay) = pending;
        let topology = cluster.topology();
        let event = Event::Replayed {
            node: topology.identity_name(pending.identity).to_owned(),
            by: topology.name(pending.taker).to_owned(),
            from: topology.name(pending.dead).to_owned(),
            epoch: pending.epoch,
            after_ms: ms_since(pending.detected),
            first_seq: replay.first_seq,
            last_seq: replay.last_seq,
            complete: replay.status == shm::ReplayStatus::Replayed,
        };
        log::info!(
            "identity {}: {} finished replaying {}'s log {:.1} ms after detection",
            topology.identity_name(pending.identity),
            topology.name(pending.taker),
            topology.name(pending.dead),
            ms_since(pending.detected)
        );
        cluster.record(&event);
    }
}

/// Answers a client, if it still waits.
pub fn send(reply: Option<Sender<Response>>, response: Response) {
    if let Some(reply) = reply {
        // The client may have gone; that is its business.
        let _ = reply.send(response);
    }
}
