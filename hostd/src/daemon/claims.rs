//! What hostd must do to agree with the coordinator, worked out from plain values: which
//! owners to write into the control region, whether to seed the coordinator instead, which
//! nodes are no members, and which claims the agents published that hostd has not adopted
//! yet. The cluster carries it out (`cluster/coordinator.rs`).
//!
//! The control region's epoch and the coordinator's generation are one sequence: every
//! move of hostd's is an `Assign` at its new epoch, every claim of an agent takes the next
//! generation. So the newer number says who is right.

use shm::{Claim, Owner};
use wire::coordinator::{CoordinatorState, IdentityOwner};

/// What hostd does to agree with the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// The control region is ahead (a state directory from before the coordinator, or its
    /// state lost): the coordinator takes hostd's owners at hostd's epoch.
    Sync {
        generation: u64,
        owners: Vec<IdentityOwner>,
    },
    /// The coordinator is level or ahead: hostd writes the owners it has newer, raises its
    /// epoch to `generation`, and fences and restarts the nodes that are no members.
    Adopt {
        generation: u64,
        changes: Vec<OwnerChange>,
        non_members: Vec<u32>,
    },
}

/// An owner the coordinator has newer than the control region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerChange {
    pub identity: u32,
    /// The control region's owner now.
    pub from: Option<u32>,
    pub to: Option<u32>,
    pub generation: u64,
}

impl OwnerChange {
    /// Whether the identity changes hands (not only its generation).
    pub fn moves(&self) -> bool {
        self.from != self.to
    }
}

/// What to do, given the control region's `epoch` and its owner of each identity
/// (`recorded[i]`: identity `i`'s), and the coordinator's `state`.
pub fn plan(epoch: u64, recorded: &[Option<Owner>], state: &CoordinatorState) -> Adoption {
    if epoch > state.generation {
        let owners = recorded
            .iter()
            .enumerate()
            .filter_map(|(identity, owner)| {
                let owner = (*owner)?;
                Some(IdentityOwner {
                    identity: identity as u32,
                    node: owner.node,
                    generation: owner.epoch,
                })
            })
            .collect();
        return Adoption::Sync {
            generation: epoch,
            owners,
        };
    }
    let changes = recorded
        .iter()
        .enumerate()
        .filter_map(|(identity, owner)| {
            let newer = state.owner(identity as u32)?;
            let recorded_epoch = owner.map_or(0, |o| o.epoch);
            (newer.generation > recorded_epoch).then_some(OwnerChange {
                identity: identity as u32,
                from: owner.and_then(|o| o.node),
                to: newer.node,
                generation: newer.generation,
            })
        })
        .collect();
    Adoption::Adopt {
        generation: state.generation,
        changes,
        non_members: state
            .nodes
            .iter()
            .filter(|m| !m.member)
            .map(|m| m.node)
            .collect(),
    }
}

/// The node whose claim took node `node` out of the membership: the owner of an identity
/// at the generation its membership ended.
pub fn claimed_by(state: &CoordinatorState, node: u32) -> Option<u32> {
    let since = state.node(node).filter(|m| !m.member)?.since;
    state
        .owners
        .iter()
        .find(|o| o.generation == since && o.node != Some(node))
        .and_then(|o| o.node)
}

/// A claim an agent published in its region that the control region does not say yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnadoptedClaim {
    pub identity: u32,
    pub by: u32,
    pub claim: Claim,
}

/// The claims in `published` (claimer, identity, claim) newer than the control region's
/// owner of their identity (`recorded[i]`: identity `i`'s).
pub fn unadopted(
    recorded: &[Option<Owner>],
    published: impl IntoIterator<Item = (u32, u32, Claim)>,
) -> Vec<UnadoptedClaim> {
    published
        .into_iter()
        .filter(|&(_, identity, claim)| {
            let epoch = recorded
                .get(identity as usize)
                .copied()
                .flatten()
                .map_or(0, |o| o.epoch);
            claim.generation > epoch
        })
        .map(|(by, identity, claim)| UnadoptedClaim {
            identity,
            by,
            claim,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::coordinator::MemberRecord;

    fn owner(node: u32, epoch: u64) -> Option<Owner> {
        Some(Owner {
            node: Some(node),
            epoch,
        })
    }

    fn member(node: u32, member: bool, since: u64) -> MemberRecord {
        MemberRecord {
            node,
            member,
            since,
            takers: vec![1 - node],
        }
    }

    fn owned(identity: u32, node: u32, generation: u64) -> IdentityOwner {
        IdentityOwner {
            identity,
            node: Some(node),
            generation,
        }
    }

    /// A pair: b claimed a at generation 3, after hostd's last move at 2.
    fn claimed() -> CoordinatorState {
        CoordinatorState {
            generation: 3,
            nodes: vec![member(0, false, 3), member(1, true, 0)],
            owners: vec![owned(0, 1, 3), owned(1, 1, 2)],
        }
    }

    #[test]
    fn a_claim_newer_than_the_control_region_is_adopted() {
        let recorded = [owner(0, 0), owner(1, 2)];
        let Adoption::Adopt {
            generation,
            changes,
            non_members,
        } = plan(2, &recorded, &claimed())
        else {
            panic!("not an adoption");
        };
        assert_eq!(generation, 3);
        assert_eq!(
            changes,
            [OwnerChange {
                identity: 0,
                from: Some(0),
                to: Some(1),
                generation: 3
            }],
            "b's own identity is as recorded"
        );
        assert!(changes[0].moves());
        assert_eq!(non_members, [0]);
        assert_eq!(claimed_by(&claimed(), 0), Some(1));
        assert_eq!(claimed_by(&claimed(), 1), None, "b is a member");
    }

    #[test]
    fn a_control_region_ahead_seeds_the_coordinator() {
        // A state directory from before the coordinator: hostd moved a to b at epoch 4.
        let recorded = [owner(1, 4), owner(1, 0)];
        let fresh = CoordinatorState {
            generation: 0,
            nodes: vec![member(0, true, 0), member(1, true, 0)],
            owners: vec![owned(0, 0, 0), owned(1, 1, 0)],
        };
        assert_eq!(
            plan(4, &recorded, &fresh),
            Adoption::Sync {
                generation: 4,
                owners: vec![owned(0, 1, 4), owned(1, 1, 0)],
            }
        );
    }

    #[test]
    fn agreement_changes_nothing() {
        let recorded = [owner(1, 3), owner(1, 2)];
        assert_eq!(
            plan(3, &recorded, &claimed()),
            Adoption::Adopt {
                generation: 3,
                changes: vec![],
                non_members: vec![0],
            }
        );
    }

    #[test]
    fn only_claims_newer_than_the_control_region_are_unadopted() {
        let claim = |generation, victim| Claim { generation, victim };
        let recorded = [owner(1, 3), owner(1, 2)];
        let published = [(1, 0, claim(3, 0)), (0, 1, claim(5, 1))];
        assert_eq!(
            unadopted(&recorded, published),
            [UnadoptedClaim {
                identity: 1,
                by: 0,
                claim: claim(5, 1)
            }]
        );
    }
}
