//! The coordinator's state machine: one order of ownership changes for the whole cluster.
//!
//! It keeps the generation, each node's membership and each identity's owner, and changes
//! them only by an agent's claim, hostd's assignment, hostd's sync or a rejoin. Every change
//! is written to its file (atomically, synced) before it takes effect, and a claim's
//! answer is kept per node, so a claim asked again after a reconnect or a restart of the
//! daemon is answered as the first time and never carried out twice.
//!
//! No sockets and no locks here (see [`crate::coordination`]); the preemption of a
//! victim's disk keys is a function the caller passes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wire::coordinator::{CoordinatorState, IdentityOwner, LostReason, MemberRecord, NodeAnswer};
use wire::storage::CoordinatorPlan;

/// The file's format version.
const FORMAT_VERSION: u32 = 1;

/// What a preemption of the victim's keys did: per disk, done or why not.
pub type Preempted = Vec<(String, Result<(), String>)>;

#[derive(Debug, Serialize, Deserialize)]
struct CoordinatorFile {
    version: u32,
    state: CoordinatorState,
    #[serde(default)]
    claims: Vec<LastClaim>,
}

/// A node's last claim and its answer: the same claim asked again gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LastClaim {
    node: u32,
    victim: u32,
    number: u64,
    answer: NodeAnswer,
    /// Won and saved, but the victim's keys not preempted yet: set only between the save
    /// and the preemption, so found in a file only if the daemon died in between.
    #[serde(default)]
    preemption_pending: bool,
}

/// Errors in the coordinator's part of the plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the coordinator's plan names node {0} twice")]
    DuplicateNode(u32),
    #[error("the coordinator's plan gives nodes {first} and {second} the same socket {}", socket.display())]
    DuplicateSocket {
        first: u32,
        second: u32,
        socket: PathBuf,
    },
    #[error("node {node}'s takers name node {taker}, which the coordinator's plan does not have")]
    UnknownTaker { node: u32, taker: u32 },
    #[error("node {node}'s takers name node {taker} twice")]
    DuplicateTaker { node: u32, taker: u32 },
    #[error("node {node}'s takers name the node itself")]
    SelfTaker { node: u32 },
}

/// Errors loading the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the coordinator's plan is not valid")]
    Plan(#[from] PlanError),
    #[error("cannot read the coordinator's state {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a coordinator state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}; this daemon reads version {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("the coordinator's state {} does not fit the plan", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: StateError,
    },
}

/// What is wrong with a coordinator state file's content.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("it names node {0}, which the plan does not have")]
    UnknownNode(u32),
    #[error("it has node {0}'s record twice")]
    DuplicateNode(u32),
    #[error("it names identity {identity}, and the plan has {identities} identities")]
    UnknownIdentity { identity: u32, identities: u32 },
    #[error("it has identity {0}'s owner twice")]
    DuplicateIdentity(u32),
    #[error("it has node {0}'s last claim twice")]
    DuplicateClaim(u32),
    #[error("it records generation {found} for {what}, newer than its generation {generation}")]
    FromTheFuture {
        what: String,
        found: u64,
        generation: u64,
    },
}

/// Errors carrying out hostd's requests (a claim's refusal is an answer, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("the coordinator does not know node {0}")]
    UnknownNode(u32),
    #[error("the coordinator has no identity {0}")]
    UnknownIdentity(u32),
    #[error("identity {0} is listed twice")]
    DuplicateIdentity(u32),
    #[error(
        "identity {identity}'s owner has generation {found}, newer than the sync's {generation}"
    )]
    OwnerFromTheFuture {
        identity: u32,
        found: u64,
        generation: u64,
    },
    #[error("cannot save the coordinator's state in {}", path.display())]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How hostd's assignment or sync went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Carried out (or found as asked); the state after it.
    Done(CoordinatorState),
    /// Older than the coordinator's state, which is returned and unchanged.
    Stale(CoordinatorState),
}

/// The coordinator: its state, each node's last claim, and the file they live in.
#[derive(Debug)]
pub struct Coordinator {
    path: PathBuf,
    state: CoordinatorState,
    claims: BTreeMap<u32, LastClaim>,
}

/// Checks the coordinator's part of the plan: nodes and sockets once each, takers known.
pub fn check_plan(plan: &CoordinatorPlan) -> Result<(), PlanError> {
    let mut nodes = BTreeMap::new();
    for node in &plan.nodes {
        if nodes.insert(node.node, node).is_some() {
            return Err(PlanError::DuplicateNode(node.node));
        }
    }
    let mut sockets: BTreeMap<&Path, u32> = BTreeMap::new();
    for node in &plan.nodes {
        if let Some(&first) = sockets.get(node.socket.as_path()) {
            return Err(PlanError::DuplicateSocket {
                first,
                second: node.node,
                socket: node.socket.clone(),
            });
        }
        sockets.insert(&node.socket, node.node);
        let mut takers = BTreeSet::new();
        for &taker in &node.takers {
            if taker == node.node {
                return Err(PlanError::SelfTaker { node: node.node });
            }
            if !nodes.contains_key(&taker) {
                return Err(PlanError::UnknownTaker {
                    node: node.node,
                    taker,
                });
            }
            if !takers.insert(taker) {
                return Err(PlanError::DuplicateTaker {
                    node: node.node,
                    taker,
                });
            }
        }
    }
    Ok(())
}

/// The state a cluster starts with: generation 0, identity `i` owned by node `i` where
/// there is one, every node a member.
pub fn initial_state(plan: &CoordinatorPlan) -> CoordinatorState {
    let mut nodes: Vec<MemberRecord> = plan
        .nodes
        .iter()
        .map(|n| MemberRecord {
            node: n.node,
            member: true,
            since: 0,
            takers: n.takers.clone(),
        })
        .collect();
    nodes.sort_by_key(|n| n.node);
    let owners = (0..plan.identities)
        .map(|identity| IdentityOwner {
            identity,
            node: plan
                .nodes
                .iter()
                .any(|n| n.node == identity)
                .then_some(identity),
            generation: 0,
        })
        .collect();
    CoordinatorState {
        generation: 0,
        nodes,
        owners,
    }
}

impl Coordinator {
    /// Loads the coordinator for `plan` from its file; a missing file is a new cluster.
    /// The takers come from the plan (they are configuration); a node or identity the
    /// plan has and the file does not joins as at the start, and a file naming a node or
    /// identity the plan does not have is refused.
    pub fn open(plan: &CoordinatorPlan) -> Result<Self, OpenError> {
        check_plan(plan)?;
        let path = plan.state.clone();
        let (state, claims) = match fs::read(&path) {
            Ok(bytes) => {
                let file: CoordinatorFile =
                    serde_json::from_slice(&bytes).map_err(|source| OpenError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(OpenError::Version {
                        path,
                        found: file.version,
                    });
                }
                adopt(plan, file).map_err(|source| OpenError::Invalid {
                    path: path.clone(),
                    source,
                })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                (initial_state(plan), BTreeMap::new())
            }
            Err(source) => return Err(OpenError::Read { path, source }),
        };
        Ok(Self {
            path,
            state,
            claims,
        })
    }

    /// The state now.
    pub fn state(&self) -> CoordinatorState {
        self.state.clone()
    }

    /// Node `sender` claims everything node `victim` owns (rule 2 of the design): valid iff
    /// both are known members, `sender` is not `victim` and is among `victim`'s takers.
    /// Won, the change is saved first, then `preempt(victim, sender)` removes the
    /// victim's keys (what it could not do is listed in the answer; the claim stands),
    /// then the answer comes. The same (sender, victim, number) asked again gets the
    /// answer it got before. An error means nothing changed.
    pub fn claim(
        &mut self,
        sender: u32,
        victim: u32,
        number: u64,
        preempt: impl FnOnce(u32, u32) -> Preempted,
    ) -> Result<NodeAnswer, ChangeError> {
        if let Some(last) = self.claims.get(&sender)
            && last.victim == victim
            && last.number == number
        {
            log::info!(
                "node {sender}'s claim {number} of node {victim} asked again: answered as before"
            );
            return Ok(last.answer.clone());
        }
        if let Some(reason) = self.refusal(sender, victim) {
            return Ok(self.refuse(sender, victim, number, reason));
        }
        let mut next = self.state.clone();
        next.generation += 1;
        let generation = next.generation;
        for record in next.nodes.iter_mut().filter(|r| r.node == victim) {
            record.member = false;
            record.since = generation;
        }
        let mut identities = Vec::new();
        for owner in next.owners.iter_mut().filter(|o| o.node == Some(victim)) {
            owner.node = Some(sender);
            owner.generation = generation;
            identities.push(owner.identity);
        }
        let mut claims = self.claims.clone();
        claims.insert(
            sender,
            LastClaim {
                node: sender,
                victim,
                number,
                answer: NodeAnswer::Won {
                    number,
                    generation,
                    identities: identities.clone(),
                    preempted: Vec::new(),
                    not_preempted: Vec::new(),
                },
                preemption_pending: true,
            },
        );
        self.save(&next, &claims)?;
        self.state = next;
        self.claims = claims;
        log::info!(
            "node {sender} won its claim {number} of node {victim}: generation {generation}, \
             identities {identities:?} now node {sender}'s, node {victim} no member"
        );
        Ok(self.finish_claim(sender, preempt))
    }

    /// Carries out the preemptions of claims a previous daemon saved but died before
    /// preempting (call before answering anyone). Returns how many there were.
    pub fn finish_preemptions(&mut self, mut preempt: impl FnMut(u32, u32) -> Preempted) -> usize {
        let pending: Vec<u32> = self
            .claims
            .values()
            .filter(|c| c.preemption_pending)
            .map(|c| c.node)
            .collect();
        for &node in &pending {
            log::warn!("node {node}'s won claim was saved but not preempted: preempting now");
            self.finish_claim(node, &mut preempt);
        }
        pending.len()
    }

    /// hostd moves `identity` to `node` at `generation`, accepted iff newer than the
    /// coordinator's generation, which becomes it.
    pub fn assign(
        &mut self,
        identity: u32,
        node: Option<u32>,
        generation: u64,
    ) -> Result<Outcome, ChangeError> {
        if self.state.owner(identity).is_none() {
            return Err(ChangeError::UnknownIdentity(identity));
        }
        if let Some(node) = node.filter(|&n| self.state.node(n).is_none()) {
            return Err(ChangeError::UnknownNode(node));
        }
        if generation <= self.state.generation {
            log::info!(
                "hostd's assignment of identity {identity} to {} at generation {generation} is \
                 stale: the coordinator is at generation {}",
                describe_owner(node),
                self.state.generation
            );
            return Ok(Outcome::Stale(self.state()));
        }
        let mut next = self.state.clone();
        next.generation = generation;
        for owner in next.owners.iter_mut().filter(|o| o.identity == identity) {
            owner.node = node;
            owner.generation = generation;
        }
        self.commit(next)?;
        log::info!(
            "hostd assigned identity {identity} to {} at generation {generation}",
            describe_owner(node)
        );
        Ok(Outcome::Done(self.state()))
    }

    /// hostd's owners at `generation`, accepted iff not older than the coordinator's
    /// generation: each listed identity's owner is replaced, and the generation becomes
    /// `generation`.
    pub fn sync(
        &mut self,
        generation: u64,
        owners: &[IdentityOwner],
    ) -> Result<Outcome, ChangeError> {
        let mut seen = BTreeSet::new();
        for owner in owners {
            if self.state.owner(owner.identity).is_none() {
                return Err(ChangeError::UnknownIdentity(owner.identity));
            }
            if !seen.insert(owner.identity) {
                return Err(ChangeError::DuplicateIdentity(owner.identity));
            }
            if let Some(node) = owner.node.filter(|&n| self.state.node(n).is_none()) {
                return Err(ChangeError::UnknownNode(node));
            }
            if owner.generation > generation {
                return Err(ChangeError::OwnerFromTheFuture {
                    identity: owner.identity,
                    found: owner.generation,
                    generation,
                });
            }
        }
        // At the coordinator's own generation, a claim may have taken that number: the
        // sync is stale unless it changes nothing.
        let changes_something = owners.iter().any(|given| {
            self.state
                .owner(given.identity)
                .is_some_and(|o| o.node != given.node || o.generation != given.generation)
        });
        if generation < self.state.generation
            || (generation == self.state.generation && changes_something)
        {
            log::info!(
                "hostd's sync at generation {generation} is stale: the coordinator is at \
                 generation {}",
                self.state.generation
            );
            return Ok(Outcome::Stale(self.state()));
        }
        let mut next = self.state.clone();
        next.generation = generation;
        for given in owners {
            for owner in next
                .owners
                .iter_mut()
                .filter(|o| o.identity == given.identity)
            {
                *owner = *given;
            }
        }
        if next != self.state {
            self.commit(next)?;
        }
        log::info!(
            "hostd synced the coordinator at generation {generation}: {}",
            describe_owners(&self.state.owners)
        );
        Ok(Outcome::Done(self.state()))
    }

    /// Node `node` is a member again, since the current generation (which stays). Its
    /// last claim is forgotten: the node starts a new life, whose claims are new.
    pub fn rejoin(&mut self, node: u32) -> Result<CoordinatorState, ChangeError> {
        let Some(record) = self.state.node(node) else {
            return Err(ChangeError::UnknownNode(node));
        };
        if record.member {
            log::info!("node {node} rejoined: it was a member already");
            return Ok(self.state());
        }
        let mut next = self.state.clone();
        let generation = next.generation;
        for record in next.nodes.iter_mut().filter(|r| r.node == node) {
            record.member = true;
            record.since = generation;
        }
        let mut claims = self.claims.clone();
        claims.remove(&node);
        self.save(&next, &claims)?;
        self.state = next;
        self.claims = claims;
        log::info!("node {node} rejoined at generation {generation}");
        Ok(self.state())
    }

    fn refusal(&self, sender: u32, victim: u32) -> Option<LostReason> {
        let (Some(asking), Some(claimed)) = (self.state.node(sender), self.state.node(victim))
        else {
            return Some(LostReason::UnknownNode);
        };
        if !asking.member {
            Some(LostReason::NotMember)
        } else if !claimed.member {
            Some(LostReason::VictimGone)
        } else if sender == victim || !claimed.takers.contains(&sender) {
            Some(LostReason::NotATaker)
        } else {
            None
        }
    }

    /// Answers a refused claim, and keeps the answer if both nodes are known.
    fn refuse(&mut self, sender: u32, victim: u32, number: u64, reason: LostReason) -> NodeAnswer {
        let answer = NodeAnswer::Lost {
            number,
            reason,
            state: self.state(),
        };
        log::info!(
            "node {sender} lost its claim {number} of node {victim} at generation {}: {}",
            self.state.generation,
            reason.describe()
        );
        if reason != LostReason::UnknownNode {
            self.claims.insert(
                sender,
                LastClaim {
                    node: sender,
                    victim,
                    number,
                    answer: answer.clone(),
                    preemption_pending: false,
                },
            );
            // Nothing changed: if the answer is not kept, the same claim asked after a
            // restart is only judged again.
            if let Err(error) = self.save(&self.state, &self.claims) {
                log::warn!("{}", wire::error_chain::one_line(&error));
            }
        }
        answer
    }

    /// Preempts the victim of `node`'s won claim and completes its kept answer.
    fn finish_claim(
        &mut self,
        node: u32,
        preempt: impl FnOnce(u32, u32) -> Preempted,
    ) -> NodeAnswer {
        let Some(claim) = self.claims.get_mut(&node) else {
            return NodeAnswer::Error {
                message: format!("node {node} has no claim to finish"),
            };
        };
        let results = preempt(claim.victim, node);
        if let NodeAnswer::Won {
            preempted,
            not_preempted,
            ..
        } = &mut claim.answer
        {
            for (disk, result) in results {
                match result {
                    Ok(()) => preempted.push(disk),
                    Err(why) => {
                        log::warn!(
                            "node {node}'s claim stands, but node {} is not fenced at \
                             {disk}: {why}",
                            claim.victim
                        );
                        not_preempted.push(format!("{disk}: {why}"));
                    }
                }
            }
        }
        claim.preemption_pending = false;
        let answer = claim.answer.clone();
        // The claim took effect already; failing to note the preemption only means a
        // restarted daemon preempts again, which changes nothing.
        if let Err(error) = self.save(&self.state, &self.claims) {
            log::warn!("{}", wire::error_chain::one_line(&error));
        }
        answer
    }

    /// Saves `next` with the claims as they are, then lets it take effect.
    fn commit(&mut self, next: CoordinatorState) -> Result<(), ChangeError> {
        self.save(&next, &self.claims)?;
        self.state = next;
        Ok(())
    }

    fn save(
        &self,
        state: &CoordinatorState,
        claims: &BTreeMap<u32, LastClaim>,
    ) -> Result<(), ChangeError> {
        let file = CoordinatorFile {
            version: FORMAT_VERSION,
            state: state.clone(),
            claims: claims.values().cloned().collect(),
        };
        let save = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
            crate::durable::replace(&self.path, &bytes)
        };
        save().map_err(|source| ChangeError::Save {
            path: self.path.clone(),
            source,
        })
    }
}

/// Checks a loaded file against the plan and merges the plan's configuration into it.
fn adopt(
    plan: &CoordinatorPlan,
    file: CoordinatorFile,
) -> Result<(CoordinatorState, BTreeMap<u32, LastClaim>), StateError> {
    let known = |node: u32| plan.nodes.iter().any(|n| n.node == node);
    let mut state = file.state;
    let generation = state.generation;
    let future = |what: String, found: u64| StateError::FromTheFuture {
        what,
        found,
        generation,
    };
    let mut nodes = BTreeSet::new();
    for record in &state.nodes {
        if !known(record.node) {
            return Err(StateError::UnknownNode(record.node));
        }
        if !nodes.insert(record.node) {
            return Err(StateError::DuplicateNode(record.node));
        }
        if let Some(&taker) = record.takers.iter().find(|&&t| !known(t)) {
            return Err(StateError::UnknownNode(taker));
        }
        if record.since > generation {
            return Err(future(
                format!("node {}'s membership", record.node),
                record.since,
            ));
        }
    }
    let mut identities = BTreeSet::new();
    for owner in &state.owners {
        if owner.identity >= plan.identities {
            return Err(StateError::UnknownIdentity {
                identity: owner.identity,
                identities: plan.identities,
            });
        }
        if !identities.insert(owner.identity) {
            return Err(StateError::DuplicateIdentity(owner.identity));
        }
        if let Some(node) = owner.node.filter(|&n| !known(n)) {
            return Err(StateError::UnknownNode(node));
        }
        if owner.generation > generation {
            return Err(future(
                format!("identity {}'s owner", owner.identity),
                owner.generation,
            ));
        }
    }
    let mut claims = BTreeMap::new();
    for claim in file.claims {
        if let Some(node) = [claim.node, claim.victim].into_iter().find(|&n| !known(n)) {
            return Err(StateError::UnknownNode(node));
        }
        let node = claim.node;
        if claims.insert(node, claim).is_some() {
            return Err(StateError::DuplicateClaim(node));
        }
    }
    // The plan's configuration wins: takers from it, newcomers as at the start.
    let initial = initial_state(plan);
    for record in initial.nodes {
        match state.nodes.iter_mut().find(|r| r.node == record.node) {
            Some(kept) => kept.takers = record.takers,
            None => {
                log::info!("node {} joins the coordinator as a member", record.node);
                state.nodes.push(MemberRecord {
                    since: generation,
                    ..record
                });
            }
        }
    }
    for owner in initial.owners {
        if state.owner(owner.identity).is_none() {
            state.owners.push(owner);
        }
    }
    state.nodes.sort_by_key(|r| r.node);
    state.owners.sort_by_key(|o| o.identity);
    Ok((state, claims))
}

fn describe_owner(node: Option<u32>) -> String {
    node.map_or_else(|| "nobody".to_owned(), |n| format!("node {n}"))
}

fn describe_owners(owners: &[IdentityOwner]) -> String {
    owners
        .iter()
        .map(|o| format!("identity {} to {}", o.identity, describe_owner(o.node)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
