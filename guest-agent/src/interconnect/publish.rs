//! The runtime's [`StatusSink`] over the node region's link table.

use shm::{LinkStatus, LinkTableWriter};

use super::clients::ClientStats;
use super::runtime::StatusSink;

/// Publishes into this node's region.
#[derive(Debug)]
pub struct RegionSink(pub LinkTableWriter);

impl StatusSink for RegionSink {
    fn config(&mut self, links: u16, heartbeat_ms: u64, session: u64) {
        self.0.publish_config(links, heartbeat_ms, session);
    }

    fn link(&mut self, peer: u16, link: u16, status: &LinkStatus) {
        if let Err(error) = self.0.publish(usize::from(peer), usize::from(link), status) {
            log::debug!("interconnect: {error}");
        }
    }

    fn clients(&mut self, peer: u16, stats: &ClientStats) {
        if let Err(error) = self.0.publish_clients(usize::from(peer), stats) {
            log::debug!("interconnect: {error}");
        }
    }
}
