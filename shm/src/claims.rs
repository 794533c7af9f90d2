//! Claims: what an agent publishes in its own region when it wins an identity at the
//! coordinator while hostd is away, and the rule every reader uses to tell who owns an
//! identity from the control region and the claims together.
//!
//! hostd is the only writer of the control region, so an agent that took over without it
//! cannot say so there. It says so in its own region instead, with the coordinator's
//! generation of the claim. The owner of an identity is then the newest word among the
//! control region's owner record (its epoch is a coordinator generation too) and every
//! claim a reader can see; once hostd is back it adopts the claim into the control region
//! at the same generation, and the two agree.
//!
//! The ordering argument (see docs/takeover.md, "Without hostd"): a writer publishes its
//! record, then reads the owners; a claimer publishes its claim, then reads the victim's
//! log. With a sequentially consistent fence between each one's store and load, at least
//! one of them sees the other's store: the claimer's replay has the record, or the writer
//! sees the claim and fails the write.

use std::sync::Arc;

use serde::Serialize;

use crate::control::{ControlRegion, Owner};
use crate::layout::{MAX_IDENTITIES, node_live};
use crate::mapping::Mapping;
use crate::node::NodeRegion;
use crate::published::PublishedWriter;

/// A claim this node won at the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// The coordinator's generation for the claim.
    pub generation: u64,
    /// The node the identity was claimed from.
    pub victim: u32,
}

/// Why an agent stopped serving everything on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EjectReason {
    /// The coordinator says this node is no member: another node claimed what it held.
    NotMember,
    /// A peer published a newer claim of an identity this node served.
    Claimed,
    /// A reason this build does not know.
    Unknown(u64),
}

impl EjectReason {
    pub fn to_word(self) -> u64 {
        match self {
            EjectReason::NotMember => 1,
            EjectReason::Claimed => 2,
            EjectReason::Unknown(word) => word,
        }
    }

    pub fn from_word(word: u64) -> Self {
        match word {
            1 => EjectReason::NotMember,
            2 => EjectReason::Claimed,
            other => EjectReason::Unknown(other),
        }
    }

    pub fn describe(self) -> String {
        match self {
            EjectReason::NotMember => {
                "the coordinator says it is no member: another node claimed what it held".into()
            }
            EjectReason::Claimed => {
                "another node claimed an identity it served while hostd was away".into()
            }
            EjectReason::Unknown(word) => format!("reason {word}, unknown to this build"),
        }
    }
}

/// An agent's note that it ejected itself: it serves nothing until hostd restarts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ejection {
    /// The newest generation the agent knew of when it ejected itself.
    pub generation: u64,
    pub reason: EjectReason,
    pub unix_ns: u64,
}

impl NodeRegion {
    /// This node's claim of identity `identity` (`None`: it never claimed it, or the index
    /// is out of range).
    pub fn claim(&self, identity: u32) -> Option<Claim> {
        if identity as usize >= MAX_IDENTITIES {
            return None;
        }
        let [generation, victim] = node_live::claim(identity as usize).read(self.mapping())?;
        (generation > 0).then_some(Claim {
            generation,
            victim: u32::try_from(victim.checked_sub(1)?).ok()?,
        })
    }

    /// Whether this node ejected itself, and why.
    pub fn ejected(&self) -> Option<Ejection> {
        let [generation, reason, unix_ns] = node_live::EJECTED.read(self.mapping())?;
        (reason > 0).then_some(Ejection {
            generation,
            reason: EjectReason::from_word(reason),
            unix_ns,
        })
    }
}

/// Publishes this node's claims and its ejection.
#[derive(Debug)]
pub struct ClaimWriter {
    mapping: Arc<Mapping>,
    claims: Vec<PublishedWriter<2>>,
    ejected: PublishedWriter<3>,
}

impl ClaimWriter {
    /// A new life of the agent: an ejection note of an earlier one is cleared (hostd
    /// restarted it), its claims stay (they are facts about generations).
    pub(crate) fn resume(mapping: &Arc<Mapping>) -> Self {
        let mut writer = Self {
            claims: (0..MAX_IDENTITIES)
                .map(|i| PublishedWriter::new(node_live::claim(i), mapping))
                .collect(),
            ejected: PublishedWriter::new(node_live::EJECTED, mapping),
            mapping: Arc::clone(mapping),
        };
        writer.ejected.publish(&writer.mapping, [0, 0, 0]);
        writer
    }

    /// Publishes a claim of identity `identity`, then a sequentially consistent fence: a
    /// caller's later reads (the victim's log) are ordered after it.
    pub fn publish(&mut self, identity: u32, claim: Claim) {
        if let Some(writer) = self.claims.get_mut(identity as usize) {
            writer.publish(
                &self.mapping,
                [claim.generation, u64::from(claim.victim) + 1],
            );
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub fn eject(&mut self, ejection: Ejection) {
        self.ejected.publish(
            &self.mapping,
            [
                ejection.generation,
                ejection.reason.to_word(),
                ejection.unix_ns,
            ],
        );
    }
}

/// Who owns `identity`: the newest of the control region's owner record and the claims
/// published in `regions` (hostd's record on a tie: it adopted that claim).
pub fn newest_owner<'a>(
    control: &ControlRegion,
    regions: impl IntoIterator<Item = &'a NodeRegion>,
    identity: u32,
) -> Option<Owner> {
    let recorded = control.owner(identity as usize);
    regions
        .into_iter()
        .filter_map(|region| {
            region.claim(identity).map(|claim| Owner {
                node: Some(region.header().node_id),
                epoch: claim.generation,
            })
        })
        .fold(recorded, |newest, claim| match newest {
            Some(owner) if owner.epoch >= claim.epoch => Some(owner),
            _ => Some(claim),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> ControlRegion {
        ControlRegion::format(
            Mapping::create_memfd("control", 1 << 20).unwrap(),
            &["a", "b", "c"],
            &["a", "b", "c"],
        )
        .unwrap()
    }

    fn region(id: u32, name: &str) -> NodeRegion {
        NodeRegion::format(Mapping::create_memfd(name, 1 << 20).unwrap(), id, name).unwrap()
    }

    #[test]
    fn the_newest_word_names_the_owner() {
        let control = control();
        let (a, b, c) = (region(0, "a"), region(1, "b"), region(2, "c"));
        let owner = |identity| newest_owner(&control, [&a, &b, &c], identity);
        assert_eq!(
            owner(0),
            Some(Owner {
                node: Some(0),
                epoch: 0
            })
        );
        let mut b_claims = b.writer(1).unwrap().claims;
        b_claims.publish(
            0,
            Claim {
                generation: 3,
                victim: 0,
            },
        );
        assert_eq!(b.claim(0).map(|c| c.victim), Some(0));
        assert_eq!(
            owner(0),
            Some(Owner {
                node: Some(1),
                epoch: 3
            })
        );
        // c's later claim of the same identity (it took b over in turn) wins.
        let mut c_claims = c.writer(1).unwrap().claims;
        c_claims.publish(
            0,
            Claim {
                generation: 5,
                victim: 1,
            },
        );
        assert_eq!(owner(0).and_then(|o| o.node), Some(2));
        // hostd came back, adopted c's claim and gave the identity back to a at 6.
        let mut writer = control.writer().unwrap();
        writer
            .set_owner(
                0,
                Owner {
                    node: Some(0),
                    epoch: 6,
                },
            )
            .unwrap();
        assert_eq!(owner(0).and_then(|o| o.node), Some(0));
        // Untouched identities stay hostd's.
        assert_eq!(owner(1).and_then(|o| o.node), Some(1));
        assert_eq!(a.claim(1), None);
        assert_eq!(region(0, "x").claim(MAX_IDENTITIES as u32), None);
    }

    #[test]
    fn an_ejection_reads_back_and_a_new_life_clears_it() {
        let a = region(0, "a");
        let mut writer = a.writer(1).unwrap().claims;
        assert_eq!(a.ejected(), None);
        let ejection = Ejection {
            generation: 4,
            reason: EjectReason::NotMember,
            unix_ns: 9,
        };
        writer.eject(ejection);
        assert_eq!(a.ejected(), Some(ejection));
        drop(writer);
        let _next_life = a.writer(2).unwrap();
        assert_eq!(a.ejected(), None);
    }
}
