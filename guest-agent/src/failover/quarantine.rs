//! A restarted node's own log while the node that took its identity over may still be
//! reading it.
//!
//! The taker serves the dead node's records from the dead node's region until its
//! background replay has put them on the disk. So the restarted node may neither flush
//! those records (the taker has written newer data since) nor reuse their ring space
//! before the taker's region says the replay has finished. Until then its flusher is held
//! at its flushed cursor. Then either the replay is confirmed and the records are
//! discarded, or the taker died before finishing and this node is told to take its
//! identity back with a replay, and its own records are applied first, as the oldest.

use shm::NodeRegion;

use crate::nvram::{FlushHold, Nvram};

/// This node's unflushed records, kept until another node's replay of them is confirmed.
#[derive(Debug)]
pub struct Quarantine {
    pub hold: FlushHold,
    /// The log's head when the node started: the records up to it are the old ones.
    pub through_seq: u64,
    /// The epoch at which the identity's owner held it when this node started: a replay
    /// from that takeover or later covers the old records.
    pub owner_epoch: u64,
    /// The node that held this node's identity when it started: if it dies before it has
    /// replayed the old records, they are this node's to apply.
    pub holder: Option<u32>,
}

/// Whether `peer`'s region says it has finished a replay of node `node`'s log that covers
/// the old records, up to seq `through_seq`: one for a takeover at `epoch` (the current
/// ownership's) or later, or one whose records reach `through_seq` (after a chained
/// takeover the holder is a later node than the one that replayed this log). Seqs only
/// grow in a log, so a replay from an earlier life of the log cannot reach them.
pub fn replay_confirmed(peer: &NodeRegion, node: u32, epoch: u64, through_seq: u64) -> bool {
    peer.replay_of(node)
        .is_some_and(|r| r.status.finished() && (r.epoch >= epoch || r.last_seq >= through_seq))
}

impl Quarantine {
    /// Forgets the old records: another node replayed them.
    pub fn discard(self, nvram: &Nvram) {
        nvram.discard(self.through_seq);
        log::info!(
            "this node's log up to seq {} was replayed by the node that took its identity over: discarded",
            self.through_seq
        );
        drop(self.hold);
    }

    /// Keeps the old records: they are this node's to apply, before anything newer.
    pub fn keep(self) {
        log::info!(
            "this node's log up to seq {} was not replayed by anyone: it is applied here",
            self.through_seq
        );
        drop(self.hold);
    }
}
