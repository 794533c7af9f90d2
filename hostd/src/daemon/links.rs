//! `hostd link NODE LINK down|up`: cuts one of a node's interconnect links, or restores it.
//! A guest's network link is cut at its NICs (QMP `set_link`), where the guest sees its
//! carrier go; what has no wire hostd can cut (the mailbox, the process backend's sockets)
//! is cut by the agent, told through the control region. Either way the cut is recorded in
//! the control region, so status shows it and a restarted node or hostd keeps it.

use wire::events::Event;

use super::backend::BackendError;
use super::cluster::Cluster;

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
    // At the NIC first: a cut that could not be made is not recorded as made.
    let at_nic = link < ic.links
        && cluster
            .set_network_link(node, link, up)
            .map_err(|source| LinkError::Backend {
                node: name.to_owned(),
                link,
                source,
            })?;
    let mask = cluster.links_cut(node);
    let mask = if up {
        mask & !(1 << link)
    } else {
        mask | (1 << link)
    };
    cluster.set_links_cut(node, mask);
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
    } else if link < ic.links && cluster.pid(node).is_none() {
        "when it starts (it is not running)"
    } else {
        "by its agent (control region)"
    };
    Ok(format!(
        "node {name}: {kind} {link} {} {how}",
        if up { "restored" } else { "cut" }
    ))
}
