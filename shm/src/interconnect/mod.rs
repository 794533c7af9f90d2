//! The interconnect area of a node region: what the agent's connection manager shares.
//!
//! Agents talk to each other over several links; one of them is a mailbox in the regions
//! themselves ([`mailbox`]): each agent posts frames for its peers in its own region, and the
//! peers read them through their read-only mappings. The agent also publishes the state of
//! every link it runs ([`links`]), so that hostd can show them.
//!
//! The area lies between the header page and the ring, in regions of at least
//! [`MIN_REGION`](crate::layout::node_interconnect::MIN_REGION) bytes formatted by a build that
//! knows it; its place is recorded in the static header. Other regions have none: their
//! readers return `None` and their agents get no writer. Like everything in a node region,
//! every word of the area has one writer, the region's agent.

pub mod links;
pub mod mailbox;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use serde::Serialize;

use crate::layout::node_interconnect::{
    CONFIG, LINK_TABLE_SIZE, MAILBOX_HEAD, MAX_LINKS, MAX_SLOT_SIZE, SLOT_HEADER_LEN, SLOT_SIZE,
    SLOTS, area_size, clients, link,
};
use crate::layout::{HEADER_PAGE, MAX_NODES};
use crate::mapping::Mapping;
use crate::published::Published;

pub use links::{
    InterconnectConfig, LinkClients, LinkStateCode, LinkStatus, LinkTableError, LinkTableWriter,
};
pub use mailbox::{BROADCAST, MailboxError, MailboxReader, MailboxWriter};

/// Most mailbox slots a header may claim: what the largest mailbox holds in this build's
/// slots, with room for a later build's smaller slots.
const MAX_SLOTS: u64 = 1024;

/// Where the interconnect area lies in a node region, as its static header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InterconnectGeometry {
    /// Byte offset of the area in the region.
    pub offset: u64,
    /// Size of the area in bytes.
    pub size: u64,
    /// Slots in the mailbox ring.
    pub mailbox_slots: u32,
    /// Size of one slot, its header included.
    pub slot_size: u32,
}

impl InterconnectGeometry {
    /// The area this build lays out in a region of `region_size` bytes (`None`: too small).
    pub fn for_region(region_size: u64) -> Option<Self> {
        let size = area_size(region_size);
        let slots = size.checked_sub(SLOTS)? / SLOT_SIZE;
        Some(Self {
            offset: HEADER_PAGE,
            size,
            mailbox_slots: u32::try_from(slots).ok().filter(|&s| s > 0)?,
            slot_size: SLOT_SIZE as u32,
        })
    }

    /// The area a static header describes: `None` when its fields are all zero (a region
    /// without one), an error when they do not fit before the ring at `ring_offset`.
    pub(crate) fn from_header(
        offset: u64,
        size: u64,
        mailbox_slots: u32,
        slot_size: u32,
        ring_offset: u64,
    ) -> Result<Option<Self>, String> {
        if offset == 0 && size == 0 && mailbox_slots == 0 && slot_size == 0 {
            return Ok(None);
        }
        let geometry = Self {
            offset,
            size,
            mailbox_slots,
            slot_size,
        };
        let slot = u64::from(slot_size);
        let needed = u64::from(mailbox_slots)
            .saturating_mul(slot)
            .saturating_add(SLOTS);
        let fits = offset >= HEADER_PAGE
            && offset % 4096 == 0
            && offset
                .checked_add(size)
                .is_some_and(|end| end <= ring_offset);
        // The slot count is bounded too: a reader scans up to every slot each read, and a
        // hostile header must not make that a loop of millions.
        let slots_ok = mailbox_slots > 0
            && u64::from(mailbox_slots) <= MAX_SLOTS
            && slot % 8 == 0
            && (SLOT_HEADER_LEN + 8..=MAX_SLOT_SIZE).contains(&slot)
            && needed <= size;
        if fits && slots_ok {
            Ok(Some(geometry))
        } else {
            Err(format!(
                "interconnect area at {offset} of {size} bytes with {mailbox_slots} mailbox slots of {slot_size} bytes does not fit before the ring at {ring_offset}"
            ))
        }
    }

    /// First byte after the area.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    /// The largest frame a mailbox slot holds.
    pub fn max_frame(&self) -> usize {
        u64::from(self.slot_size).saturating_sub(SLOT_HEADER_LEN) as usize
    }

    /// The link table's header.
    pub(crate) fn config(&self) -> Published<4> {
        Published::at(self.offset + CONFIG)
    }

    /// The status of link `index` of peer `peer` (`None`: out of the table).
    pub(crate) fn link(&self, peer: usize, index: usize) -> Option<Published<8>> {
        (peer < MAX_NODES && index < MAX_LINKS)
            .then(|| Published::at(self.offset + link(peer, index)))
    }

    /// The test-client statistics of peer `peer` (`None`: out of the table).
    pub(crate) fn clients(&self, peer: usize) -> Option<Published<8>> {
        (peer < MAX_NODES).then(|| Published::at(self.offset + clients(peer)))
    }

    /// The mailbox's head word.
    pub(crate) fn mailbox_head(&self) -> u64 {
        self.offset + MAILBOX_HEAD
    }

    /// The slot message `n` goes in.
    pub(crate) fn slot(&self, n: u64) -> u64 {
        let slots = u64::from(self.mailbox_slots.max(1));
        self.offset + SLOTS + (n % slots) * u64::from(self.slot_size)
    }

    /// The link table, then the mailbox; what formatting zeroes.
    pub(crate) fn zero(&self, mapping: &Mapping) -> bool {
        let zeros = vec![0u8; LINK_TABLE_SIZE as usize];
        let mut at = self.offset;
        while at < self.end() {
            let len = (self.end() - at).min(zeros.len() as u64);
            if !mapping.write_bytes(at, &zeros[..len as usize]) {
                return false;
            }
            at += len;
        }
        true
    }
}

/// Everything an agent writes in the interconnect area, split by who uses it.
#[derive(Debug)]
pub struct InterconnectWriter {
    pub links: LinkTableWriter,
    pub mailbox: MailboxWriter,
}

impl InterconnectWriter {
    /// Takes over the area's words, continuing from what a previous agent published.
    pub(crate) fn resume(mapping: &Arc<Mapping>, geometry: InterconnectGeometry) -> Self {
        Self {
            links: LinkTableWriter::resume(Arc::clone(mapping), geometry),
            mailbox: MailboxWriter::resume(Arc::clone(mapping), geometry),
        }
    }
}
