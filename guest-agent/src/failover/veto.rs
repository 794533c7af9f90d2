//! This node's veto on a peer's negotiated takeover of an identity it holds: it refuses
//! when it could not release the identity cleanly.

use std::sync::Arc;

use shm::{ControlRegion, Refusal};

use crate::interconnect::negotiation::Veto;
use crate::nvram::Nvram;

/// Answers from the control region and the node's log.
#[derive(Debug)]
pub struct NodeVeto {
    pub node_id: u32,
    pub control: Option<ControlRegion>,
    pub nvram: Arc<Nvram>,
}

impl Veto for NodeVeto {
    fn check(&self, identity: u32) -> Option<Refusal> {
        let holds = self.control.as_ref().is_none_or(|control| {
            control
                .owner(identity as usize)
                .is_some_and(|owner| owner.node == Some(self.node_id))
        });
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
