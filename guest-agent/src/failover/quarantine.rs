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

use shm::{NodeRegion, Replay, ReplayStatus};

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

/// Whether the peers' regions say node `node`'s old log, up to seq `through_seq`, has been
/// replayed: some peer finished a replay of it for a takeover at `start_epoch` (the
/// ownership's when this node started) or later, or one whose records reach `through_seq`
/// (after a chained takeover the holder is a later node than the one that replayed it;
/// seqs only grow in a log, so a replay from an earlier life of the log cannot reach
/// them); and no peer still replays it for the identity's current ownership
/// (`current_epoch`): after a giveback from a dead holder, two nodes may each replay that
/// holder's log for the identity each took, and one finishing says nothing of the other.
pub fn old_log_replayed(
    peers: &[&NodeRegion],
    node: u32,
    start_epoch: u64,
    current_epoch: u64,
    through_seq: u64,
) -> bool {
    let marks: Vec<Replay> = peers.iter().filter_map(|p| p.replay_of(node)).collect();
    let still_replaying = marks
        .iter()
        .any(|m| m.status == ReplayStatus::Replaying && m.epoch >= current_epoch);
    !still_replaying
        && marks
            .iter()
            .any(|m| m.status.finished() && (m.epoch >= start_epoch || m.last_seq >= through_seq))
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

#[cfg(test)]
mod tests {
    use shm::{Mapping, ReplayWriter};

    use super::*;

    fn peer(id: u32) -> (NodeRegion, ReplayWriter) {
        let mapping = Mapping::create_memfd("peer", 1 << 20).unwrap();
        let region = NodeRegion::format(mapping, id, &format!("n{id}")).unwrap();
        let replays = region.writer(1).unwrap().replays;
        (region, replays)
    }

    fn mark(epoch: u64, status: ReplayStatus, last_seq: u64) -> Replay {
        Replay {
            epoch,
            status,
            first_seq: 1,
            last_seq,
        }
    }

    /// Node 0 restarted with old records up to seq 10 while node 1 held its identity from
    /// epoch 3; the identity is now at epoch `current`.
    fn replayed(marks: &[(u32, Replay)], current: u64) -> bool {
        let peers: Vec<(NodeRegion, ReplayWriter)> = (1..=3).map(peer).collect();
        let mut peers = peers;
        for (id, m) in marks {
            peers[*id as usize - 1].1.publish(0, *m);
        }
        let regions: Vec<&NodeRegion> = peers.iter().map(|(r, _)| r).collect();
        old_log_replayed(&regions, 0, 3, current, 10)
    }

    #[test]
    fn the_holder_finishing_its_replay_ends_the_quarantine() {
        assert!(!replayed(&[], 3), "nobody replayed anything");
        assert!(!replayed(&[(1, mark(3, ReplayStatus::Replaying, 10))], 3));
        assert!(replayed(&[(1, mark(3, ReplayStatus::Replayed, 10))], 3));
        assert!(
            !replayed(&[(1, mark(2, ReplayStatus::Replayed, 7))], 3),
            "a replay of an earlier life of the log"
        );
    }

    /// Node 1 died replaying; node 2 applied the log at epoch 5 and holds the identity now.
    #[test]
    fn a_chained_takeovers_replay_ends_it_despite_the_dead_takers_mark() {
        let marks = [
            (1, mark(3, ReplayStatus::Replaying, 10)),
            (2, mark(5, ReplayStatus::Replayed, 10)),
        ];
        assert!(replayed(&marks, 5));
    }

    /// After a giveback from a dead holder split its identities, node 2 finished replaying
    /// the log for one of them while node 3 still replays it for this node's identity, which
    /// it holds since epoch 6: the quarantine stays until node 3 has finished.
    #[test]
    fn a_replay_still_running_for_the_current_ownership_keeps_it() {
        let mut marks = vec![
            (2, mark(5, ReplayStatus::Replayed, 10)),
            (3, mark(6, ReplayStatus::Replaying, 10)),
        ];
        assert!(!replayed(&marks, 6));
        marks[1].1.status = ReplayStatus::Replayed;
        assert!(replayed(&marks, 6));
    }
}
