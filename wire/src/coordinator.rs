//! The coordinator's formats: one order of ownership changes, kept by the storage daemon.
//!
//! The coordinator holds the cluster's generation, which node is a member, and which node
//! owns each identity. Every change of an owner is a claim there, serialized by the daemon,
//! and each gets the next generation; hostd's control-region epoch is the same number.
//!
//! - Agents speak to it over a stream socket of their own, one per node
//!   (`STATE_DIR/blkd/coord-NODE.sock`), so the daemon knows which node asks, as with its
//!   disks. A guest reaches that socket through a virtio-serial port that QEMU connects to
//!   it (the port named [`PORT_NAME`]); a process-backend agent connects to it directly.
//!   One JSON [`NodeRequest`] line, one JSON [`NodeAnswer`] line, as often as it likes on
//!   one connection.
//! - hostd asks it through the daemon's control socket (see `crate::storage`).

use serde::{Deserialize, Serialize};

/// The name of the guest's virtio-serial port to the coordinator
/// (`/sys/class/virtio-ports/vport*/name`).
pub const PORT_NAME: &str = "ivha.coordinator";

/// What the coordinator knows of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorState {
    /// Bumped by every change of an owner; hostd's epoch follows it.
    pub generation: u64,
    pub nodes: Vec<MemberRecord>,
    pub owners: Vec<IdentityOwner>,
}

impl CoordinatorState {
    /// The record of node `node`.
    pub fn node(&self, node: u32) -> Option<&MemberRecord> {
        self.nodes.iter().find(|m| m.node == node)
    }

    /// Who owns identity `identity`.
    pub fn owner(&self, identity: u32) -> Option<&IdentityOwner> {
        self.owners.iter().find(|o| o.identity == identity)
    }

    /// The identities node `node` owns.
    pub fn owned_by(&self, node: u32) -> Vec<u32> {
        self.owners
            .iter()
            .filter(|o| o.node == Some(node))
            .map(|o| o.identity)
            .collect()
    }
}

/// One node's membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node: u32,
    /// False once another node's claim took everything it held: it must not serve until
    /// hostd restarts it and it rejoins.
    pub member: bool,
    /// The generation at which `member` last changed (0: since the cluster began).
    pub since: u64,
    /// The nodes that may claim this node's identities, most preferred first (its
    /// `takeover_by` list).
    pub takers: Vec<u32>,
}

/// Who owns an identity, since which generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityOwner {
    pub identity: u32,
    /// `None` while nobody owns it.
    pub node: Option<u32>,
    pub generation: u64,
}

/// What an agent asks on its coordinator socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum NodeRequest {
    /// The coordinator's state.
    State,
    /// Claim every identity `victim` owns: the asking node found it dead while hostd was
    /// away. Won, the claim also takes `victim` out of the membership and preempts its
    /// keys on every disk (the I/O fence) before the answer comes. `number` is the
    /// agent's number for it: the same number asked again (a reconnect after the daemon
    /// restarted) gets the answer it got the first time, without claiming twice.
    Claim { victim: u32, number: u64 },
}

/// The coordinator's answer to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum NodeAnswer {
    State {
        state: CoordinatorState,
    },
    /// The claim was carried out: the asking node owns `identities` at `generation`, and
    /// `victim` can write none of the disks named in `preempted`.
    Won {
        number: u64,
        generation: u64,
        identities: Vec<u32>,
        preempted: Vec<String>,
        /// Disks the victim's key could not be removed from, each with why.
        not_preempted: Vec<String>,
    },
    /// The claim was refused; nothing changed.
    Lost {
        number: u64,
        reason: LostReason,
        state: CoordinatorState,
    },
    Error {
        message: String,
    },
}

/// Why a claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// The asking node is no member: another node's claim took it out (it lost a race,
    /// or was found dead while it hung). It must stop serving.
    NotMember,
    /// The victim is no member any more: another node claimed it first.
    VictimGone,
    /// The asking node is not in the victim's `takeover_by` list, or is the victim.
    NotATaker,
    /// The node or the victim is unknown to the coordinator.
    UnknownNode,
}

impl LostReason {
    pub fn describe(self) -> &'static str {
        match self {
            LostReason::NotMember => {
                "this node is no member of the cluster any more: another node claimed what it held"
            }
            LostReason::VictimGone => "another node claimed the victim first",
            LostReason::NotATaker => "this node may not take the victim's identities over",
            LostReason::UnknownNode => "the coordinator does not know that node",
        }
    }
}

/// Socket name of node `node`'s coordinator socket, under the daemon's directory.
pub fn socket_name(node_name: &str) -> String {
    format!("coord-{node_name}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_read_back_as_written() {
        for request in [
            NodeRequest::State,
            NodeRequest::Claim {
                victim: 0,
                number: 7,
            },
        ] {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<NodeRequest>(&line).unwrap(), request);
        }
        let state = CoordinatorState {
            generation: 3,
            nodes: vec![MemberRecord {
                node: 0,
                member: false,
                since: 3,
                takers: vec![1],
            }],
            owners: vec![IdentityOwner {
                identity: 0,
                node: Some(1),
                generation: 3,
            }],
        };
        for answer in [
            NodeAnswer::State {
                state: state.clone(),
            },
            NodeAnswer::Won {
                number: 7,
                generation: 3,
                identities: vec![0],
                preempted: vec!["a".into()],
                not_preempted: vec![],
            },
            NodeAnswer::Lost {
                number: 7,
                reason: LostReason::NotMember,
                state,
            },
        ] {
            let line = serde_json::to_string(&answer).unwrap();
            assert_eq!(serde_json::from_str::<NodeAnswer>(&line).unwrap(), answer);
        }
    }
}
