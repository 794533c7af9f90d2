//! Ownership judged from what the agents published and what the clients saw, not from
//! hostd's record alone. The sampler read the regions every few milliseconds into the
//! history: hostd's owner records (`owner`), the agents' claims (`claim`) and ejections
//! (`ejected`), each published after its `since` and by its `t`. The writers name the node
//! that accepted each operation's connection (`server`), the only node that can answer it.
//!
//! - `ack_without_ownership`: a write acknowledged by node X, when a record naming another
//!   owner Y was published before the write was invoked, and no record that could make X the
//!   owner again (naming X, newer than Y's) was published before the acknowledgement. Every
//!   agent checks, after the write's record is published and before it acknowledges, who
//!   owns the identity by the newest of these records (`shm::newest_owner`); at that moment
//!   Y's record was in memory, so X acknowledged while it read someone else as the owner, or
//!   without reading at all.
//! - `split_claim`: two nodes claimed one identity at one generation, hostd's record and a
//!   claim name different owners at one generation, or two nodes' claims share a generation
//!   (the coordinator gives every claim a generation of its own).
//! - `claim_by_non_member`: a node won a claim in a life in which it had lost its
//!   membership: another node had claimed from it (in that life, at an older generation), or
//!   it had ejected itself. A node that lost waits, serving nothing, until hostd restarts it.
//! - `unexpected_move`: an owner record or a claim published during a fault that kills
//!   nothing (`link_down`, `links_down`, `hostd_restart`, `blkd_restart`): after the fault
//!   started and seen before the next fault started (its `fault_start` entry, recorded
//!   before the nemesis acts, so a move of a fault that follows is never blamed on this
//!   one, also when that fault could not be injected).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Anomaly, AnomalyKind};
use crate::history::{Action, ClaimSeen, Entry, History, Invoke};

/// The faults after which no identity may move: every node stays alive.
const MOVES_NOTHING: [&str; 4] = ["link_down", "links_down", "hostd_restart", "blkd_restart"];

/// Every ownership check over `history`.
pub(super) fn check(history: &History) -> Vec<Anomaly> {
    let mut found = Vec::new();
    acks_without_ownership(history, &mut found);
    split_claims(history, &mut found);
    claims_by_non_members(history, &mut found);
    unexpected_moves(history, &mut found);
    found
}

fn anomaly(kind: AnomalyKind, explanation: String) -> Anomaly {
    Anomaly {
        kind,
        identity: None,
        block: None,
        writer: None,
        seq: None,
        op: None,
        node: None,
        window: None,
        explanation,
    }
}

/// One record of who owns an identity: hostd's or a claim.
#[derive(Debug, Clone, Copy)]
struct Record<'h> {
    /// None: nobody serves it (hostd's record only).
    node: Option<&'h str>,
    generation: u64,
    /// hostd's record (wins a tie with a claim: it adopted that claim).
    hostd: bool,
    /// Published by then.
    t: u64,
    /// Published after this; None if unknown.
    since: Option<u64>,
}

impl Record<'_> {
    /// The agents' order of records: by generation, hostd's on a tie.
    fn rank(&self) -> (u64, bool) {
        (self.generation, self.hostd)
    }

    /// Whether it may have been published before `t`.
    fn maybe_before(&self, t: u64) -> bool {
        self.since.is_none_or(|since| since < t)
    }

    fn describe(&self) -> String {
        let what = if self.hostd {
            "hostd's record"
        } else {
            "its claim"
        };
        format!(
            "{} (generation {}, {what}, read by t={})",
            self.node.unwrap_or("nobody"),
            self.generation,
            self.t
        )
    }
}

/// The ownership records of each identity.
fn records(history: &History) -> HashMap<&str, Vec<Record<'_>>> {
    let mut records: HashMap<&str, Vec<Record<'_>>> = HashMap::new();
    for entry in history.entries() {
        let (identity, record) = match entry {
            Entry::Owner(owner) => (
                owner.identity.as_str(),
                Record {
                    node: owner.node.as_deref(),
                    generation: owner.epoch,
                    hostd: true,
                    t: owner.t,
                    since: owner.since,
                },
            ),
            Entry::Claim(claim) => (
                claim.identity.as_str(),
                Record {
                    node: Some(&claim.node),
                    generation: claim.generation,
                    hostd: false,
                    t: claim.t,
                    since: claim.since,
                },
            ),
            _ => continue,
        };
        records.entry(identity).or_default().push(record);
    }
    records
}

fn acks_without_ownership(history: &History, found: &mut Vec<Anomaly>) {
    let records = records(history);
    // First invoke and first acknowledgement of each op (duplicates are reported elsewhere).
    let mut invokes: BTreeMap<u64, &Invoke> = BTreeMap::new();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for entry in history.entries() {
        match entry {
            Entry::Invoke(invoke) => {
                invokes.entry(invoke.op).or_insert(invoke);
            }
            Entry::Ok(ok) => {
                acked.entry(ok.op).or_insert(ok.t);
            }
            _ => {}
        }
    }
    for (&op, invoke) in &invokes {
        let (Action::Write, Some(server), Some(&acked_t)) =
            (invoke.action, invoke.server.as_deref(), acked.get(&op))
        else {
            continue;
        };
        let Some(spec) = history.writer(invoke.writer) else {
            continue;
        };
        let Some(list) = records.get(spec.identity.as_str()) else {
            continue;
        };
        // The newest record surely in memory when the write was invoked.
        let Some(owner) = list
            .iter()
            .filter(|record| record.t <= invoke.t)
            .max_by_key(|record| record.rank())
        else {
            continue;
        };
        if owner.node == Some(server) {
            continue;
        }
        // A newer record naming the server, maybe published in time, may have made it the
        // owner while the write was in flight.
        let regained = list.iter().any(|record| {
            record.node == Some(server)
                && record.rank() > owner.rank()
                && record.maybe_before(acked_t)
        });
        if regained {
            continue;
        }
        let explanation = format!(
            "write op {op} was acknowledged at t={acked_t} by node {server}, which accepted its \
             connection, but identity {} was owned by {} before the write was invoked at t={}, \
             and nothing made {server} its owner again before the acknowledgement.",
            spec.identity,
            owner.describe(),
            invoke.t
        );
        let mut found_one = anomaly(AnomalyKind::AckWithoutOwnership, explanation);
        found_one.identity = Some(spec.identity.clone());
        found_one.block = Some(invoke.block);
        found_one.writer = Some(invoke.writer);
        found_one.seq = invoke.seq;
        found_one.op = Some(op);
        found_one.node = Some(server.to_owned());
        found.push(found_one);
    }
}

fn claims(history: &History) -> Vec<&ClaimSeen> {
    history
        .entries()
        .iter()
        .filter_map(|entry| match entry {
            Entry::Claim(claim) => Some(claim),
            _ => None,
        })
        .collect()
}

fn split_claims(history: &History, found: &mut Vec<Anomaly>) {
    let claims = claims(history);
    // generation → identity → claimants.
    let mut by_generation: BTreeMap<u64, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for claim in &claims {
        by_generation
            .entry(claim.generation)
            .or_default()
            .entry(&claim.identity)
            .or_default()
            .insert(&claim.node);
    }
    for (generation, identities) in &by_generation {
        let mut split_identity = false;
        for (identity, nodes) in identities {
            if nodes.len() > 1 {
                split_identity = true;
                let names: Vec<&str> = nodes.iter().copied().collect();
                let mut split = anomaly(
                    AnomalyKind::SplitClaim,
                    format!(
                        "nodes {} all claimed identity {identity} at generation {generation}.",
                        names.join(", ")
                    ),
                );
                split.identity = Some((*identity).to_owned());
                found.push(split);
            }
        }
        let nodes: BTreeSet<&str> = identities.values().flatten().copied().collect();
        if !split_identity && nodes.len() > 1 {
            let names: Vec<&str> = nodes.into_iter().collect();
            found.push(anomaly(
                AnomalyKind::SplitClaim,
                format!(
                    "nodes {} each won a claim at generation {generation}, which the \
                     coordinator gives one claim only.",
                    names.join(", ")
                ),
            ));
        }
    }
    // hostd's records against the claims of the same identity and generation.
    let mut reported = BTreeSet::new();
    for entry in history.entries() {
        let Entry::Owner(owner) = entry else { continue };
        let Some(claimants) = by_generation
            .get(&owner.epoch)
            .and_then(|identities| identities.get(owner.identity.as_str()))
        else {
            continue;
        };
        for claimant in claimants {
            if owner.node.as_deref() == Some(*claimant)
                || !reported.insert((owner.identity.as_str(), owner.epoch, *claimant))
            {
                continue;
            }
            let mut split = anomaly(
                AnomalyKind::SplitClaim,
                format!(
                    "hostd's record names {} the owner of identity {} at epoch {}, but node \
                     {claimant} claimed it at that generation.",
                    owner.node.as_deref().unwrap_or("nobody"),
                    owner.identity,
                    owner.epoch
                ),
            );
            split.identity = Some(owner.identity.clone());
            split.node = Some((*claimant).to_owned());
            found.push(split);
        }
    }
}

fn claims_by_non_members(history: &History, found: &mut Vec<Anomaly>) {
    let claims = claims(history);
    for claim in &claims {
        let Some(life) = claim.boot_id else { continue };
        // Claimed from in this very life, at an older generation.
        let lost = claims
            .iter()
            .filter(|earlier| {
                earlier.victim == claim.node
                    && earlier.victim_boot_id == Some(life)
                    && earlier.generation < claim.generation
            })
            .min_by_key(|earlier| earlier.generation);
        let why = if let Some(earlier) = lost {
            Some(format!(
                "node {} had claimed identity {} from it at generation {} in that life",
                earlier.node, earlier.identity, earlier.generation
            ))
        } else {
            // Ejected in this life, surely before the claim was published.
            history.entries().iter().find_map(|entry| match entry {
                Entry::Ejected(ejected)
                    if ejected.node == claim.node
                        && ejected.boot_id == Some(life)
                        && claim.since.is_some_and(|since| ejected.t <= since) =>
                {
                    Some(format!(
                        "it had ejected itself ({}, seen by t={}) in that life",
                        ejected.reason, ejected.t
                    ))
                }
                _ => None,
            })
        };
        let Some(why) = why else { continue };
        let mut claimed = anomaly(
            AnomalyKind::ClaimByNonMember,
            format!(
                "node {} claimed identity {} at generation {} (boot id {life}), but {why}: a \
                 node that lost its membership claims nothing until hostd restarts it.",
                claim.node, claim.identity, claim.generation
            ),
        );
        claimed.identity = Some(claim.identity.clone());
        claimed.node = Some(claim.node.clone());
        found.push(claimed);
    }
}

/// One fault as the nemesis started it: `start` from its `fault_start` entry (the `fault`
/// entry's `t`, the moment it began to act, in a history without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FaultSpan<'h> {
    start: u64,
    cycle: u64,
    kind: &'h str,
    node: &'h str,
}

/// Every fault the nemesis started, by start time: each `fault_start` entry, and each
/// `fault` entry without one (a history written before them).
fn fault_spans(history: &History) -> Vec<FaultSpan<'_>> {
    let mut spans: Vec<FaultSpan<'_>> = history
        .entries()
        .iter()
        .filter_map(|entry| match entry {
            Entry::FaultStart(start) => Some(FaultSpan {
                start: start.t,
                cycle: start.cycle,
                kind: &start.fault,
                node: &start.node,
            }),
            _ => None,
        })
        .collect();
    let started: BTreeSet<(u64, &str, &str)> = spans
        .iter()
        .map(|span| (span.cycle, span.kind, span.node))
        .collect();
    for entry in history.entries() {
        let Entry::Fault(fault) = entry else { continue };
        let key = (fault.cycle, fault.fault.as_str(), fault.node.as_str());
        if !started.contains(&key) {
            spans.push(FaultSpan {
                start: fault.t,
                cycle: fault.cycle,
                kind: &fault.fault,
                node: &fault.node,
            });
        }
    }
    spans.sort_unstable();
    spans
}

fn unexpected_moves(history: &History, found: &mut Vec<Anomaly>) {
    let spans = fault_spans(history);
    let records = records(history);
    for (index, span) in spans.iter().enumerate() {
        if !MOVES_NOTHING.contains(&span.kind) {
            continue;
        }
        // Until the next fault starts: what comes after is that fault's (also one that
        // could not be injected, and left no `fault` entry).
        let until = spans.get(index + 1).map_or(u64::MAX, |next| next.start);
        for (identity, list) in &records {
            // Published after the fault started, and seen before the next one started.
            let moves = list.iter().filter(|record| {
                record.since.is_some_and(|since| since >= span.start) && record.t <= until
            });
            for record in moves {
                let mut moved = anomaly(
                    AnomalyKind::UnexpectedMove,
                    format!(
                        "identity {identity} moved to {} during {} on {} (cycle {}, from t={}), \
                         which kills nothing.",
                        record.describe(),
                        span.kind,
                        span.node,
                        span.cycle,
                        span.start
                    ),
                );
                moved.identity = Some((*identity).to_owned());
                moved.node = record.node.map(str::to_owned);
                found.push(moved);
            }
        }
    }
}
