//! The interconnect as hostd sees it: each node's links to its peers, read from what the
//! node's agent publishes in its region, with the cuts hostd recorded; and an event each
//! time a link changes state.

use std::collections::BTreeMap;

use shm::{LinkStateCode, NodeRegion};
use wire::control::{LinkKind, LinkState, LinkStatus};
use wire::events::Event;

use super::topology::NodeId;
use crate::config::InterconnectConfig;

/// How old a link table may be before status calls its links stale.
const STALE_AFTER_MS: u64 = 1500;

/// A published state as status names it.
pub fn state_of(code: LinkStateCode) -> LinkState {
    match code {
        LinkStateCode::Opening => LinkState::Opening,
        LinkStateCode::Up => LinkState::Up,
        LinkStateCode::Degraded => LinkState::Degraded,
        LinkStateCode::Down => LinkState::Down,
        LinkStateCode::Refused => LinkState::Refused,
        LinkStateCode::Cut => LinkState::Cut,
        LinkStateCode::Absent | LinkStateCode::Unknown(_) => LinkState::Unknown,
    }
}

/// Node `node`'s links to each of `peers` (index, name), as its region says.
pub fn links(
    config: &InterconnectConfig,
    region: &NodeRegion,
    peers: &[(NodeId, &str)],
    cut_mask: u64,
) -> Vec<LinkStatus> {
    if !config.enabled() {
        return Vec::new();
    }
    let count = config.links + u16::from(config.mailbox);
    // The agent publishes every 100 ms: a table much older than that is no longer run (the
    // agent is stopped or its connection manager failed), whatever it last said.
    let stale = region.interconnect_config().is_some_and(|published| {
        published.published_unix_ms > 0
            && wire::time::now_unix_ms().saturating_sub(published.published_unix_ms)
                > STALE_AFTER_MS
    });
    peers
        .iter()
        .flat_map(|&(peer, name)| {
            (0..count).map(move |link| {
                let published = region
                    .link_status(peer.index(), usize::from(link))
                    .unwrap_or_default();
                LinkStatus {
                    peer: name.to_owned(),
                    link,
                    kind: if link < config.links {
                        LinkKind::Network
                    } else {
                        LinkKind::Mailbox
                    },
                    state: if stale && published.state != LinkStateCode::Absent {
                        LinkState::Stale
                    } else {
                        state_of(published.state)
                    },
                    cut: cut_mask & (1 << link) != 0,
                    rtt_us: published.rtt_us,
                    bytes_out: published.bytes_out,
                    bytes_in: published.bytes_in,
                    dropped: published.dropped,
                    retransmissions: published.retransmissions,
                    channels: published.channels,
                    since_unix_ms: published.since_unix_ms,
                }
            })
        })
        .collect()
}

/// The last state seen of every (node, peer, link), to record changes.
#[derive(Debug, Default)]
pub struct LinkWatch {
    seen: BTreeMap<(usize, String, u16), LinkState>,
}

impl LinkWatch {
    /// The events of node `node`'s links that changed state since the last call, given
    /// its links now. Call it only for nodes that are up: a dead agent's table is its last
    /// word, not news.
    pub fn changes(&mut self, node: usize, name: &str, links: &[LinkStatus]) -> Vec<Event> {
        let mut events = Vec::new();
        for link in links
            .iter()
            .filter(|link| !matches!(link.state, LinkState::Unknown | LinkState::Stale))
        {
            let key = (node, link.peer.clone(), link.link);
            let before = self.seen.insert(key, link.state);
            // A node's first table is its start, not a change.
            if before.as_ref().is_none_or(|before| *before == link.state) {
                continue;
            }
            let reachable = links
                .iter()
                .any(|other| other.peer == link.peer && other.state == LinkState::Up);
            events.push(Event::InterconnectLink {
                node: name.to_owned(),
                peer: link.peer.clone(),
                link: link.link,
                state: link.state,
                reachable,
            });
        }
        events
    }

    /// Forgets node `node`'s links (it stopped): its next agent's table is a start.
    pub fn forget(&mut self, node: usize) {
        self.seen.retain(|(n, _, _), _| *n != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(peer: &str, link: u16, state: LinkState) -> LinkStatus {
        LinkStatus {
            peer: peer.into(),
            link,
            kind: LinkKind::Network,
            state,
            cut: false,
            rtt_us: 0,
            bytes_out: 0,
            bytes_in: 0,
            dropped: 0,
            retransmissions: 0,
            channels: 0,
            since_unix_ms: 0,
        }
    }

    #[test]
    fn changes_are_events_and_a_start_is_not() {
        let mut watch = LinkWatch::default();
        let start = [link("b", 0, LinkState::Up), link("b", 1, LinkState::Up)];
        assert!(watch.changes(0, "a", &start).is_empty());
        let one_down = [link("b", 0, LinkState::Down), link("b", 1, LinkState::Up)];
        let events = watch.changes(0, "a", &one_down);
        assert_eq!(
            events,
            vec![Event::InterconnectLink {
                node: "a".into(),
                peer: "b".into(),
                link: 0,
                state: LinkState::Down,
                reachable: true,
            }]
        );
        let both_down = [link("b", 0, LinkState::Down), link("b", 1, LinkState::Down)];
        let events = watch.changes(0, "a", &both_down);
        assert!(matches!(
            &events[..],
            [Event::InterconnectLink {
                link: 1,
                reachable: false,
                ..
            }]
        ));
        watch.forget(0);
        assert!(watch.changes(0, "a", &start).is_empty());
    }
}
