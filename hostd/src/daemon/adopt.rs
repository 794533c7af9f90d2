//! A restarted hostd takes over the nodes an earlier one left running, instead of launching
//! new ones. Nothing is restarted and no takeover is started for it: the running nodes get
//! a fresh heartbeat timeout from now. A node whose process is gone died while no hostd
//! watched; it counts as fenced, so its identities move on.

use std::time::Instant;

use wire::events::Event;
use wire::records::RunRecord;

use super::backend::BackendError;
use super::cluster::Cluster;
use super::topology::NodeId;

/// Why nothing could be adopted.
#[derive(Debug, thiserror::Error)]
#[error("cannot adopt node {node}'s running process; the guests were left running")]
pub struct AdoptError {
    pub node: String,
    #[source]
    pub source: BackendError,
}

/// Adopts the running nodes (`running`: those whose recorded process still runs).
pub fn adopt(mut cluster: Cluster, running: &[(NodeId, RunRecord)]) -> Result<Cluster, AdoptError> {
    let mut adopted = Vec::new();
    let nodes: Vec<NodeId> = cluster.topology().nodes().collect();
    for node in nodes {
        let name = cluster.topology().name(node).to_owned();
        let found = running.iter().find(|(n, _)| *n == node).map(|(_, r)| r);
        let how = match found.map(|record| adopt_node(&mut cluster, node, record)) {
            Some(Ok(how)) => how,
            Some(Err(BackendError::Adopt { source, .. }))
                if matches!(*source, qemu::ChildError::Adopt { .. }) =>
            {
                // It ended between the check and the adoption.
                log::warn!("node {name}: {source}");
                mark_gone(&mut cluster, node)
            }
            Some(Err(source)) => {
                // Not known to be dead, not under control either: touch nothing.
                cluster.disown_all();
                return Err(AdoptError { node: name, source });
            }
            None => mark_gone(&mut cluster, node),
        };
        log::info!("node {name}: {how}");
        adopted.push((name, how));
    }
    reconcile_forwards(&mut cluster);
    cluster.set_adopted();
    cluster.record(&Event::PairAdopted { nodes: adopted });
    Ok(cluster)
}

/// Takes over `node`'s running process; returns what was adopted, in words.
fn adopt_node(
    cluster: &mut Cluster,
    node: NodeId,
    record: &RunRecord,
) -> Result<String, BackendError> {
    let adopted = cluster.backend_mut().adopt(node, record)?;
    let now = Instant::now();
    let clock = cluster.clock(now);
    let before = (record.boot_id_before, record.heartbeat_before);
    let booting = cluster
        .node_mut(node)
        .adopted(before, adopted.paused, now, clock);
    Ok(if booting {
        format!("{}, still booting", adopted.note)
    } else {
        adopted.note
    })
}

/// `node` had no running process: it died while no hostd watched. It counts as fenced,
/// so its identities move on.
fn mark_gone(cluster: &mut Cluster, node: NodeId) -> String {
    let what = "gone while no hostd was running";
    let clock = cluster.clock(Instant::now());
    cluster.node_mut(node).gone(what, clock);
    cluster.record_serving_ended_all(node, "gone");
    what.to_owned()
}

/// Each identity's address leads to its owner and nowhere else. A hostd that died between
/// moving the owner and moving the address left them apart.
fn reconcile_forwards(cluster: &mut Cluster) {
    let nodes: Vec<NodeId> = cluster.topology().nodes().collect();
    for node in nodes {
        let ports = match cluster.backend_mut().forwarded_ports(node) {
            None => return,
            Some(Ok(ports)) => ports,
            Some(Err(error)) => {
                log::warn!(
                    "adoption: cannot list node {}'s forwards: {}",
                    cluster.topology().name(node),
                    wire::error_chain::one_line(&error)
                );
                continue;
            }
        };
        let identities: Vec<_> = cluster.topology().identities().collect();
        for identity in identities {
            let has = ports.contains(&cluster.port(identity));
            let should = cluster.owner_of(identity) == Some(node) && !cluster.node(node).fenced;
            let result = match (has, should) {
                (true, false) => cluster.unforward(node, identity),
                (false, true) => cluster.forward(node, identity),
                _ => Ok(()),
            };
            match result {
                Ok(()) if has != should => log::warn!(
                    "adoption: the address of {} {} node {} (a move was cut short)",
                    cluster.topology().identity_name(identity),
                    if should {
                        "now leads to"
                    } else {
                        "no longer leads to"
                    },
                    cluster.topology().name(node)
                ),
                Ok(()) => {}
                Err(error) => log::error!("adoption: {}", wire::error_chain::one_line(&error)),
            }
        }
    }
}
