//! What the metrics read from the cluster: its figures on each tick, and the facts of a
//! move that its report does not carry.

use std::time::Instant;

use shm::NodeRegion;
use wire::control::MoveReport;
use wire::events::Event;

use super::{ClusterFigures, LogFigures, MoveCause, MoveFacts, NodeFigures};
use crate::daemon::cluster::Cluster;

/// Replaces the metrics' figures with what the cluster shows now.
pub fn publish(cluster: &Cluster) {
    cluster.metrics().replace_figures(figures(cluster));
}

fn figures(cluster: &Cluster) -> ClusterFigures {
    let now = Instant::now();
    let topology = cluster.topology();
    let nodes = topology
        .nodes()
        .map(|node| {
            let health = cluster.node(node);
            let region = &health.region;
            NodeFigures {
                node: health.name.clone(),
                state: health.state(),
                heartbeat_age: health.heartbeat_age(now),
                log: region.log_cursors().ok().map(|(flushed, head)| LogFigures {
                    head_seq: head.seq,
                    flushed_seq: flushed.seq,
                    unflushed_bytes: head.pos.saturating_sub(flushed.pos),
                }),
                synced_seq: region.synced().map(|synced| synced.seq),
                capacity_bytes: region.geometry().ring_size,
                stats: region.stats(),
                service: region.service(),
            }
        })
        .collect();
    let served_by = topology
        .identities()
        .filter_map(|identity| {
            let owner = cluster.owner_of(identity)?;
            Some((
                topology.identity_name(identity).to_owned(),
                topology.name(owner).to_owned(),
            ))
        })
        .collect();
    ClusterFigures {
        epoch: cluster.epoch(),
        nodes,
        served_by,
    }
}

/// The facts of a move `event` records that was not planned (its old holder was fenced);
/// nothing for other events.
pub fn move_facts(cluster: &Cluster, event: &Event) -> MoveFacts {
    let report = match event {
        Event::Takeover(report) | Event::Giveback(report) if !report.planned => report,
        _ => return MoveFacts::default(),
    };
    let Some(holder) = cluster.node_named(&report.from) else {
        return MoveFacts::default();
    };
    // Fenced, the holder's monitor keeps its verdict and its region stays as it died,
    // until hostd starts it again.
    let holder = cluster.node(holder);
    MoveFacts {
        cause: Some(MoveCause::of(holder.verdict())),
        replay_log_bytes: replay_log_bytes(&holder.region, report),
    }
}

/// The log bytes of the records `report` says the taker scanned in the fenced holder's
/// `region`: they lie between its flushed cursor and its head when the scan went from one
/// to the other. None when it did not (it stopped at a bad record).
fn replay_log_bytes(region: &NodeRegion, report: &MoveReport) -> Option<u64> {
    if report.replayed_records == 0 {
        return Some(0);
    }
    let (flushed, head) = region.log_cursors().ok()?;
    let whole_log = report.replay_complete
        && report.replayed_first_seq == flushed.seq + 1
        && report.replayed_last_seq == head.seq;
    whole_log.then(|| head.pos.saturating_sub(flushed.pos))
}
