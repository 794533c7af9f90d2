//! `hostd link NODE LINK down|up`: cuts one of a node's interconnect links, or restores it.
//! A guest's network link is cut at its NICs (QMP `set_link`), where the guest sees its
//! carrier go; what has no wire hostd can cut (the mailbox, the process backend's sockets)
//! is cut by the agent, told through the control region. Either way the cut is recorded in
//! the control region, so status shows it and a restarted node or hostd keeps it.

use wire::events::Event;

use super::backend::BackendError;
use super::cluster::Cluster;
use super::topology::NodeId;

/// Why a link could not be set.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("the interconnect is off (interconnect.links = 0 and no mailbox)")]
    Off,
    #[error("node {node} has links 0 to {last}; there is no link {link}")]
    NoSuchLink { node: String, link: u16, last: u16 },
    #[error("cannot set link {link} of node {node}")]
    Backend {
        node: String,
        link: u16,
        #[source]
        source: BackendError,
    },
}

/// Sets link `link` of node `name` up or down; says what was done.
pub fn set_link(
    cluster: &mut Cluster,
    name: &str,
    link: u16,
    up: bool,
) -> Result<String, LinkError> {
    let node = cluster
        .node_named(name)
        .ok_or_else(|| LinkError::NoSuchNode(name.to_owned()))?;
    let ic = cluster.config().interconnect.clone();
    if !ic.enabled() {
        return Err(LinkError::Off);
    }
    let count = ic.links + u16::from(ic.mailbox);
    if link >= count {
        return Err(LinkError::NoSuchLink {
            node: name.to_owned(),
            link,
            last: count - 1,
        });
    }
    let mask = cluster.links_cut(node);
    let mask = if up {
        mask & !(1 << link)
    } else {
        mask | (1 << link)
    };
    cluster.set_links_cut(node, mask);
    let at_nic = link < ic.links
        && apply_at_nic(cluster, node, link, up).map_err(|source| LinkError::Backend {
            node: name.to_owned(),
            link,
            source,
        })?;
    cluster.record(&Event::FaultInjected {
        node: name.to_owned(),
        signal: format!("link{link}_{}", if up { "up" } else { "down" }),
    });
    let kind = if link < ic.links {
        "network link"
    } else {
        "mailbox link"
    };
    let how = if at_nic {
        "at its NICs (QMP set_link)"
    } else {
        "by its agent (control region)"
    };
    Ok(format!(
        "node {name}: {kind} {link} {} {how}",
        if up { "restored" } else { "cut" }
    ))
}

/// Sets a network link at the node's NICs where the backend has them; Ok(false) where it
/// has none (the agent cuts it).
fn apply_at_nic(
    cluster: &mut Cluster,
    node: NodeId,
    link: u16,
    up: bool,
) -> Result<bool, BackendError> {
    if cluster.pid(node).is_none() {
        // Not running: the cut is recorded and applied when it starts.
        return Ok(false);
    }
    let peers: Vec<u16> = cluster
        .topology()
        .interconnect_peers(node)
        .iter()
        .map(|peer| peer.index() as u16)
        .collect();
    cluster
        .backend_mut()
        .set_network_link(node, link, &peers, up)
}

/// Cuts again, at the NICs of a node just started, the network links recorded as cut.
pub fn reapply_cuts(cluster: &mut Cluster, node: NodeId) {
    let links = cluster.config().interconnect.links;
    let mask = cluster.links_cut(node);
    for link in (0..links).filter(|link| mask & (1 << link) != 0) {
        if let Err(error) = apply_at_nic(cluster, node, link, false) {
            log::warn!(
                "node {}: cannot cut link {link} again: {}",
                cluster.topology().name(node),
                wire::error_chain::one_line(&error)
            );
        }
    }
}
