//! This node's veto on a peer's negotiated takeover of an identity it holds: it refuses
//! when it could not release the identity cleanly.

use std::sync::Arc;

use shm::Refusal;

use crate::interconnect::negotiation::Veto;
use crate::nvram::{Nvram, Ownership};

/// Answers from the owners (the control region and the claims) and the node's log.
#[derive(Debug)]
pub struct NodeVeto {
    /// None: no control region, this node holds what it serves.
    pub ownership: Option<Ownership>,
    pub nvram: Arc<Nvram>,
}

impl Veto for NodeVeto {
    fn check(&self, identity: u32) -> Option<Refusal> {
        let holds = self
            .ownership
            .as_ref()
            .is_none_or(|ownership| ownership.owns(identity));
        if !holds {
            return Some(Refusal::NotHolder);
        }
        // A full log is no reason: a release drains it, which makes a planned takeover the
        // way out of a paused or stuck flusher.
        if self.nvram.has_disk_error(identity) {
            return Some(Refusal::DiskFailing);
        }
        None
    }
}
