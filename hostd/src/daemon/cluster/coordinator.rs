//! The cluster in step with the coordinator (docs/takeover.md): hostd's presence in the
//! control region, every move an `Assign` there first, and, at start and about once a
//! second, adopting what the agents claimed while hostd was away: the owners and the epoch
//! into the control region, and the nodes they claimed fenced and restarted as standbys.
//! What to adopt is worked out in `daemon::claims`; this carries it out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shm::Owner;
use wire::control::{ClaimStatus, NodeState};
use wire::coordinator::CoordinatorState;
use wire::events::Event;

use super::{Cluster, CommandError, PendingReplay};
use crate::daemon::claims::{self, Adoption, OwnerChange};
use crate::daemon::topology::{IdentityId, NodeId};
use crate::storage::{Coordinated, StorageError};

/// How often hostd reads the coordinator's state (with the storage daemon's probe).
const READ_INTERVAL: Duration = Duration::from_secs(1);

/// What hostd knows of the coordinator.
#[derive(Debug, Default)]
pub struct CoordinatorView {
    /// Its state as last read or answered.
    state: Option<CoordinatorState>,
    /// Whether it answered the last time it was asked: the agents may act without hostd
    /// only while it does.
    answers: bool,
    read_at: Option<Instant>,
    /// Read it at the next tick: an answer showed it ahead of the control region.
    due: bool,
    /// Nodes fenced because they are no members or ejected themselves, to be restarted
    /// as standbys, each with why.
    rejoin: BTreeMap<NodeId, String>,
}

impl Cluster {
    /// Whether the storage daemon keeps a coordinator for this cluster.
    pub fn keeps_coordinator(&self) -> bool {
        self.storage.as_ref().is_some_and(|s| s.keeps_coordinator())
    }

    /// The coordinator's state as last read, while it answers.
    pub fn coordinator_state(&self) -> Option<&CoordinatorState> {
        self.coordinator
            .state
            .as_ref()
            .filter(|_| self.coordinator.answers)
    }

    /// The thresholds hostd gives the agents with its presence: both 0 (they never act
    /// alone) unless the cluster may move identities without hostd: failover without
    /// hostd on, a coordinator that answers, and agents that move addresses themselves
    /// (bridge mode, process backend; in user mode only hostd moves a port).
    pub fn presence_thresholds(&self) -> (u64, u64) {
        let failover = &self.config.failover;
        let allowed = failover.without_hostd
            && self.config.agents_move_addresses()
            && self.coordinator_state().is_some();
        if allowed {
            (
                failover.hostd_absent_ms,
                failover.peer_dead_ms(&self.config.heartbeat),
            )
        } else {
            (0, 0)
        }
    }

    /// Says hostd is here: its presence counter moves (every tick, and while it waits for
    /// an agent).
    pub fn beat(&mut self) {
        let (absent, dead) = self.presence_thresholds();
        self.control_writer.beat(absent, dead);
        self.last_beat = Instant::now();
    }

    /// Beats if a tick has passed since the last beat: for hostd's waits (an acknowledgement
    /// may take minutes), which must not make the agents take hostd for absent.
    pub(super) fn keep_beating(&mut self) {
        if self.last_beat.elapsed() >= self.tick() {
            self.beat();
        }
    }

    /// Tells the agents that hostd stops the cluster on purpose: they must not take each
    /// other over while their nodes go one after the other.
    pub(super) fn stop_beating(&mut self) {
        self.control_writer.beat(0, 0);
    }

    /// About once a second (and at once when an answer showed the coordinator ahead):
    /// reads the coordinator and adopts what it has newer.
    pub fn probe_coordinator(&mut self) {
        let recent = self
            .coordinator
            .read_at
            .is_some_and(|at| at.elapsed() < READ_INTERVAL);
        if self.keeps_coordinator() && (self.coordinator.due || !recent) {
            self.adopt_coordinator();
        }
    }

    /// Reads the coordinator's state and brings the control region in step with it: seeds
    /// it if the control region is ahead, else adopts the owners it has newer and fences
    /// the nodes that are no members. At start, before any decision, and from
    /// [`Cluster::probe_coordinator`].
    pub fn adopt_coordinator(&mut self) {
        let Some(storage) = &self.storage else {
            return;
        };
        if !storage.keeps_coordinator() {
            return;
        }
        self.coordinator.read_at = Some(Instant::now());
        self.coordinator.due = false;
        match storage.coordinator() {
            Ok(state) => self.settle(state),
            Err(error) => self.coordinator_failed(&error),
        }
    }

    /// The coordinator did not answer: the agents wait for hostd until it does (the
    /// presence thresholds drop to 0); said once per outage.
    fn coordinator_failed(&mut self, error: &StorageError) {
        if self.coordinator.answers || self.coordinator.state.is_none() {
            log::warn!(
                "the coordinator does not answer; no takeover without hostd until it does: {}",
                wire::error_chain::one_line(error)
            );
        }
        self.coordinator.answers = false;
        // Some state, answering or not: one that never answered is warned about once, not
        // every second.
        self.coordinator.state.get_or_insert_with(Default::default);
    }

    fn settle(&mut self, state: CoordinatorState) {
        let plan = claims::plan(self.epoch(), &self.recorded_owners(), &state);
        let state = match plan {
            Adoption::Sync { generation, owners } => {
                log::info!(
                    "the control region (epoch {generation}) is ahead of the coordinator (generation {}): seeding it",
                    state.generation
                );
                let synced = self
                    .storage
                    .as_ref()
                    .map(|s| s.sync(generation, owners))
                    .unwrap_or(Err(StorageError::NoCoordinator));
                match synced {
                    Ok(Coordinated::Accepted(state)) => {
                        self.remember(state);
                        return;
                    }
                    // It moved on meanwhile: adopt that instead.
                    Ok(Coordinated::Stale(state)) => state,
                    Err(error) => {
                        self.coordinator_failed(&error);
                        return;
                    }
                }
            }
            Adoption::Adopt { .. } => state,
        };
        self.adopt_owners(&state);
        self.fence_the_lost(&state);
        self.remember(state);
    }

    fn remember(&mut self, state: CoordinatorState) {
        if !self.coordinator.answers {
            log::info!("the coordinator answers (generation {})", state.generation);
        }
        self.coordinator.answers = true;
        self.coordinator.state = Some(state);
    }

    /// The control region's owner of each identity, by index.
    fn recorded_owners(&self) -> Vec<Option<Owner>> {
        self.topology
            .identities()
            .map(|identity| self.control.owner(identity.index()))
            .collect()
    }

    /// Writes into the control region every owner `state` has newer, and raises the epoch
    /// to its generation; records each identity that changed hands and moves its address.
    fn adopt_owners(&mut self, state: &CoordinatorState) {
        let Adoption::Adopt {
            generation,
            changes,
            ..
        } = claims::plan(self.epoch(), &self.recorded_owners(), state)
        else {
            return;
        };
        // The epoch first, as every move writes it: an agent that sees the new owner sees
        // an epoch at least as new.
        if generation > self.epoch() {
            self.control_writer.set_epoch(generation);
        }
        for change in changes {
            let owner = Owner {
                node: change.to,
                epoch: change.generation,
            };
            if let Err(error) = self
                .control_writer
                .set_owner(change.identity as usize, owner)
            {
                log::error!("cannot adopt the coordinator's owner: {error}");
                continue;
            }
            if change.moves() {
                self.adopted_move(change);
            }
        }
    }

    /// Records an identity that changed hands at the coordinator and makes its address
    /// follow.
    fn adopted_move(&mut self, change: OwnerChange) {
        let Some(identity) = self.topology.identities().nth(change.identity as usize) else {
            return;
        };
        let from = change.from.and_then(|n| self.topology.node_at(n as usize));
        let to = change.to.and_then(|n| self.topology.node_at(n as usize));
        // The claimer's own word, when it published one for this generation.
        let claim = to
            .and_then(|to| self.nodes[to.index()].region.claim(change.identity))
            .filter(|claim| claim.generation == change.generation);
        let victim = claim
            .and_then(|claim| self.topology.node_at(claim.victim as usize))
            .or(from);
        let name = |node: Option<NodeId>| {
            node.map_or_else(|| "nobody".to_owned(), |n| self.topology.name(n).to_owned())
        };
        let (to_name, victim_name) = (name(to), name(victim));
        log::warn!(
            "adopting the coordinator's owner of {}: {to_name} since generation {} (claimed from {victim_name} while hostd was away)",
            self.topology.identity_name(identity),
            change.generation
        );
        // A fenced node's serving ended when it was fenced; a node not started yet (a
        // launch) serves nothing, and its start records what it serves.
        let serves = |cluster: &Cluster, node: NodeId| {
            let health = &cluster.nodes[node.index()];
            health.started && !health.fenced
        };
        if let Some(from) = from.filter(|&from| serves(self, from)) {
            self.record_serving_ended(
                identity,
                from,
                &format!("{to_name} claimed it while hostd was away"),
            );
        }
        self.record(&Event::ClaimAdopted {
            node: self.topology.identity_name(identity).to_owned(),
            by: to_name,
            from: victim_name,
            generation: change.generation,
            published: claim.is_some(),
        });
        let Some(to) = to else {
            return;
        };
        if serves(self, to) {
            self.record_serving_started(identity, to, change.generation);
        }
        self.follow_address(identity, from, to);
        // The claimer replays the victim's log in the background: its end is recorded
        // (`replayed`, timed from this adoption) if it has not ended yet.
        if let Some(dead) = victim.filter(|&dead| dead != to) {
            let finished = self.nodes[to.index()]
                .region
                .replay_of(dead.index() as u32)
                .is_some_and(|r| r.status.finished() && r.epoch >= change.generation);
            if claim.is_some() && !finished {
                self.expect_replay(PendingReplay {
                    identity,
                    taker: to,
                    dead,
                    epoch: change.generation,
                    detected: Instant::now(),
                });
            }
        }
    }

    /// User mode: the identity's port leaves `from` and leads to `to`, where they run. (The
    /// agents hold their addresses in bridge mode and with the process backend.)
    fn follow_address(&mut self, identity: IdentityId, from: Option<NodeId>, to: NodeId) {
        let running = |cluster: &Cluster, node: NodeId| {
            cluster.backend.pid(node).is_some() && !cluster.nodes[node.index()].fenced
        };
        if let Some(from) = from.filter(|&from| running(self, from))
            && let Err(error) = self.unforward(from, identity)
        {
            log::warn!(
                "cannot take {}'s address from {}: {}",
                self.topology.identity_name(identity),
                self.topology.name(from),
                wire::error_chain::one_line(&error)
            );
        }
        if running(self, to)
            && let Err(error) = self.forward(to, identity)
        {
            log::warn!(
                "cannot give {}'s address to {}: {}",
                self.topology.identity_name(identity),
                self.topology.name(to),
                wire::error_chain::one_line(&error)
            );
        }
    }

    /// Fences every node the coordinator says is no member and that hostd started or
    /// adopted, and every running node that ejected itself, and notes each for a restart
    /// as a standby. (A node not started yet rejoins before its start:
    /// [`Cluster::rejoin_if_no_member`].)
    fn fence_the_lost(&mut self, state: &CoordinatorState) {
        for record in state.nodes.iter().filter(|m| !m.member) {
            let Some(node) = self.topology.node_at(record.node as usize) else {
                continue;
            };
            let health = &self.nodes[node.index()];
            // Neither started nor fenced: a launch, whose start rejoins it.
            let launching = !health.started && !health.fenced;
            if launching || self.coordinator.rejoin.contains_key(&node) {
                continue;
            }
            let by = claims::claimed_by(state, record.node)
                .and_then(|n| self.topology.node_at(n as usize))
                .map(|n| self.topology.name(n).to_owned());
            let reason = format!(
                "no member since generation {}: {} claimed what it held while hostd was away",
                record.since,
                by.as_deref().unwrap_or("another node")
            );
            if self.fence_lost(node, &reason) {
                self.record(&Event::MembershipLost {
                    node: self.topology.name(node).to_owned(),
                    by,
                    generation: record.since,
                });
            }
        }
        // A member can eject itself too (a peer claimed an identity it served): it serves
        // nothing until it is restarted.
        for node in self.topology.nodes() {
            let health = &self.nodes[node.index()];
            // A booting node's region still holds its previous life's note: its agent
            // clears it when it starts writing, before its first heartbeat.
            if health.fenced
                || matches!(health.state(), NodeState::Booting | NodeState::Down)
                || self.backend.pid(node).is_none()
                || self.coordinator.rejoin.contains_key(&node)
            {
                continue;
            }
            if let Some(ejection) = self.ejection_of(node) {
                self.fence_lost(node, &ejection);
            }
        }
    }

    /// Fences `node`, which lost its place for `reason`, if it still runs, and notes it for
    /// a restart as a standby; false if it could not be fenced (tried again at the next
    /// look).
    fn fence_lost(&mut self, node: NodeId, reason: &str) -> bool {
        let name = self.topology.name(node).to_owned();
        let health = &self.nodes[node.index()];
        if !health.fenced || health.kept_running {
            log::warn!("node {name}: {reason}; fencing it");
            if let Err(error) = self.fence_because(node, reason) {
                log::error!(
                    "cannot fence node {name}: {}",
                    wire::error_chain::one_line(&error)
                );
                return false;
            }
            self.nodes[node.index()].kept_running = false;
        }
        self.coordinator.rejoin.insert(node, reason.to_owned());
        true
    }

    /// The fenced nodes that lost their place while hostd was away and wait for their
    /// restart as standbys, each with why.
    pub fn nodes_to_rejoin(&self) -> Vec<(NodeId, String)> {
        self.coordinator
            .rejoin
            .iter()
            .map(|(node, why)| (*node, why.clone()))
            .collect()
    }

    /// `node` needs no restart as a standby any more (it runs again, or is gone for good).
    pub fn forget_rejoin(&mut self, node: NodeId) {
        self.coordinator.rejoin.remove(&node);
    }

    /// Before a node starts: if the coordinator says it is no member (another node claimed
    /// what it held while hostd was away), it rejoins, and starts as a standby: the control
    /// region names another owner of its identity, and it waits for `hostd giveback`.
    pub(super) fn rejoin_if_no_member(&mut self, node: NodeId) -> Result<(), StorageError> {
        self.coordinator.rejoin.remove(&node);
        let Some(storage) = self.storage.as_ref().filter(|s| s.keeps_coordinator()) else {
            return Ok(());
        };
        // Fresh: a claim since the last look would have this node start a non-member.
        let state = match storage.coordinator() {
            Ok(state) => state,
            Err(error) => match self.coordinator_state() {
                Some(state) => state.clone(),
                // Nothing known of it: nothing to rejoin.
                None => {
                    log::warn!(
                        "cannot ask the coordinator whether node {} is a member: {}",
                        self.topology.name(node),
                        wire::error_chain::one_line(&error)
                    );
                    return Ok(());
                }
            },
        };
        if state.node(node.index() as u32).is_none_or(|m| m.member) {
            return Ok(());
        }
        let state = storage.rejoin(node)?;
        log::info!(
            "node {} rejoins the cluster (generation {})",
            self.topology.name(node),
            state.generation
        );
        self.adopt_owners(&state);
        self.remember(state);
        Ok(())
    }

    /// With a coordinator: hostd's move of `identity` to `node` at `epoch` is an `Assign`
    /// there first. A claim an agent won since hostd last looked makes it stale: hostd
    /// adopts the coordinator's state instead and the move fails. A coordinator that does
    /// not answer does not stop the move (the agents cannot claim while it does not
    /// answer); it is seeded from the control region once it answers again.
    pub(super) fn assign(
        &mut self,
        identity: IdentityId,
        node: NodeId,
        epoch: u64,
    ) -> Result<(), CommandError> {
        let Some(storage) = self.storage.as_ref().filter(|s| s.keeps_coordinator()) else {
            return Ok(());
        };
        let assigned = storage.assign(identity.index() as u32, Some(node.index() as u32), epoch);
        match assigned {
            Ok(Coordinated::Accepted(state)) => {
                self.remember(state);
                Ok(())
            }
            Ok(Coordinated::Stale(state)) => {
                let generation = state.generation;
                self.adopt_owners(&state);
                self.remember(state);
                // The nodes that claim took out are fenced at the next tick.
                self.coordinator.due = true;
                Err(CommandError::ClaimedMeanwhile {
                    identity: self.topology.identity_name(identity).to_owned(),
                    epoch,
                    generation,
                })
            }
            Err(error) => {
                // Without the coordinator's word, a claim may hold this generation: the
                // move waits for the next tick rather than make two owners of one number.
                self.coordinator.answers = false;
                self.coordinator.due = true;
                Err(CommandError::CoordinatorSilent {
                    identity: self.topology.identity_name(identity).to_owned(),
                    epoch,
                    source: error,
                })
            }
        }
    }

    // --- Status --------------------------------------------------------------------------

    /// The nodes the coordinator says are no members.
    pub(super) fn non_members(&self) -> Vec<String> {
        self.coordinator_state()
            .map(|state| {
                state
                    .nodes
                    .iter()
                    .filter(|m| !m.member)
                    .filter_map(|m| self.topology.node_at(m.node as usize))
                    .map(|n| self.topology.name(n).to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The claims published in the regions that the control region does not say yet.
    pub(super) fn unadopted_claims(&self) -> Vec<ClaimStatus> {
        let published = self.topology.nodes().flat_map(|node| {
            let region = &self.nodes[node.index()].region;
            self.topology.identities().filter_map(move |identity| {
                let claim = region.claim(identity.index() as u32)?;
                Some((node.index() as u32, identity.index() as u32, claim))
            })
        });
        let published: Vec<_> = published.collect();
        claims::unadopted(&self.recorded_owners(), published)
            .into_iter()
            .filter_map(|claim| {
                let by = self.topology.node_at(claim.by as usize)?;
                let identity = self.topology.identities().nth(claim.identity as usize)?;
                let from = self
                    .topology
                    .node_at(claim.claim.victim as usize)
                    .map_or("?", |n| self.topology.name(n));
                Some(ClaimStatus {
                    identity: self.topology.identity_name(identity).to_owned(),
                    by: self.topology.name(by).to_owned(),
                    from: from.to_owned(),
                    generation: claim.claim.generation,
                })
            })
            .collect()
    }

    /// Why node `node`'s agent ejected itself, if it did (while it runs: a new life clears
    /// the note).
    pub(super) fn ejection_of(&self, node: NodeId) -> Option<String> {
        let ejection = self.nodes[node.index()].region.ejected()?;
        Some(format!(
            "ejected itself at generation {}: {}",
            ejection.generation,
            ejection.reason.describe()
        ))
    }
}
