//! The shared-memory mailbox as a link: frames for a peer are posted in this node's own
//! region, and each peer's frames for this node are read from the peer's region (mapped
//! read-only). No descriptor wakes the reader: the runtime reads on a timer.

use std::os::fd::BorrowedFd;

use shm::{MailboxReader, MailboxWriter, NodeRegion};

use super::transport::{Transport, TransportCounters};

/// This node's mailbox and its peers'.
#[derive(Debug)]
pub struct MailboxLink {
    me: u16,
    writer: MailboxWriter,
    /// Each peer's mailbox, by node id (peers whose region has none are left out).
    readers: Vec<(u16, MailboxReader)>,
    counters: TransportCounters,
    buffer: Vec<Vec<u8>>,
}

impl MailboxLink {
    pub fn new(me: u16, writer: MailboxWriter, peers: &[NodeRegion]) -> Self {
        let readers = peers
            .iter()
            .filter_map(|peer| {
                let id = u16::try_from(peer.header().node_id).ok()?;
                Some((id, MailboxReader::new(peer)?))
            })
            .collect();
        Self {
            me,
            writer,
            readers,
            counters: TransportCounters::default(),
            buffer: Vec::new(),
        }
    }
}

impl Transport for MailboxLink {
    fn kind(&self) -> &'static str {
        "mailbox"
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn send(&mut self, peer: u16, frame: &[u8]) {
        if self.writer.post(peer, frame).is_err() {
            // Longer than a slot: the channel retransmits it on another link, if one is up.
            self.counters.send_failures += 1;
        }
    }

    fn receive(&mut self, out: &mut Vec<(u16, Vec<u8>)>) {
        let mut lost = 0;
        for (peer, reader) in &mut self.readers {
            reader.read(self.me, &mut self.buffer);
            out.extend(self.buffer.drain(..).map(|frame| (*peer, frame)));
            lost += reader.lost + reader.corrupt;
        }
        self.counters.lost = lost;
    }

    fn counters(&self) -> TransportCounters {
        self.counters
    }
}
