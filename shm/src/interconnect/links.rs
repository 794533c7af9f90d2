//! The link-status table: the state of every link the agent runs, for hostd to show.
//!
//! One published value per (peer node id, link index), one per peer with what the agent's
//! interconnect test clients saw, and a table header with the agent's interconnect
//! configuration. Only the region's agent writes it ([`LinkTableWriter`]);
//! anyone reads it through [`NodeRegion::link_status`] and
//! [`NodeRegion::interconnect_config`].

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::InterconnectGeometry;
use crate::layout::MAX_NODES;
use crate::layout::node_interconnect::MAX_LINKS;
use crate::mapping::Mapping;
use crate::node::NodeRegion;
use crate::published::PublishedWriter;

/// Where a link stands, as the table stores it (one word).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkStateCode {
    /// Never published: the agent does not run this link (or has not said so yet).
    #[default]
    Absent,
    /// Saying Hello; nothing heard yet.
    Opening,
    Up,
    /// Heard nothing for a while.
    Degraded,
    /// Silent past the limit.
    Down,
    /// The peer refused the link (or was refused).
    Refused,
    /// Cut by hostd (fault injection).
    Cut,
    /// A code this build does not know (a newer agent wrote it).
    Unknown(u64),
}

impl LinkStateCode {
    pub fn to_word(self) -> u64 {
        match self {
            Self::Absent => 0,
            Self::Opening => 1,
            Self::Up => 2,
            Self::Degraded => 3,
            Self::Down => 4,
            Self::Refused => 5,
            Self::Cut => 6,
            Self::Unknown(word) => word,
        }
    }

    pub fn from_word(word: u64) -> Self {
        match word {
            0 => Self::Absent,
            1 => Self::Opening,
            2 => Self::Up,
            3 => Self::Degraded,
            4 => Self::Down,
            5 => Self::Refused,
            6 => Self::Cut,
            other => Self::Unknown(other),
        }
    }
}

/// One link to one peer, as its agent last published it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStatus {
    pub state: LinkStateCode,
    /// Last measured round trip, microseconds.
    pub rtt_us: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Frames dropped (not frames, or not for this node).
    pub dropped: u64,
    pub retransmissions: u64,
    /// Channels placed on this link now.
    pub channels: u64,
    /// When the link entered its state, ms since the Unix epoch (the agent's clock).
    pub since_unix_ms: u64,
}

impl LinkStatus {
    fn to_words(self) -> [u64; 8] {
        [
            self.state.to_word(),
            self.rtt_us,
            self.bytes_out,
            self.bytes_in,
            self.dropped,
            self.retransmissions,
            self.channels,
            self.since_unix_ms,
        ]
    }

    fn from_words(words: [u64; 8]) -> Self {
        let [
            state,
            rtt_us,
            bytes_out,
            bytes_in,
            dropped,
            retransmissions,
            channels,
            since_unix_ms,
        ] = words;
        Self {
            state: LinkStateCode::from_word(state),
            rtt_us,
            bytes_out,
            bytes_in,
            dropped,
            retransmissions,
            channels,
            since_unix_ms,
        }
    }
}

/// What the agent's interconnect test clients saw from one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkClients {
    /// Stream messages received from the peer.
    pub stream_received: u64,
    /// Stream messages out of order or seen twice.
    pub stream_errors: u64,
    /// The longest time between two stream messages, microseconds.
    pub stream_max_gap_us: u64,
    /// Pings answered.
    pub pings: u64,
    pub ping_p50_us: u64,
    pub ping_p99_us: u64,
    /// Bulk bytes received from the peer.
    pub bulk_bytes_in: u64,
    /// The longest time between two stream messages over the last few seconds.
    pub stream_recent_gap_us: u64,
}

impl LinkClients {
    fn to_words(self) -> [u64; 8] {
        [
            self.stream_received,
            self.stream_errors,
            self.stream_max_gap_us,
            self.pings,
            self.ping_p50_us,
            self.ping_p99_us,
            self.bulk_bytes_in,
            self.stream_recent_gap_us,
        ]
    }

    fn from_words(words: [u64; 8]) -> Self {
        let [
            stream_received,
            stream_errors,
            stream_max_gap_us,
            pings,
            ping_p50_us,
            ping_p99_us,
            bulk_bytes_in,
            stream_recent_gap_us,
        ] = words;
        Self {
            stream_received,
            stream_errors,
            stream_max_gap_us,
            pings,
            ping_p50_us,
            ping_p99_us,
            bulk_bytes_in,
            stream_recent_gap_us,
        }
    }
}

/// The table header: how the agent's interconnect is set up (zero before it first said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InterconnectConfig {
    /// Links the agent runs to each peer.
    pub links: u16,
    pub heartbeat_ms: u64,
    /// The agent's interconnect session id: new at each start of the agent.
    pub session: u64,
    /// When the agent last published anything in the table, ms since the Unix epoch (its
    /// clock): an old value means the statuses are stale.
    pub published_unix_ms: u64,
}

/// Why a link status was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkTableError {
    #[error(
        "link {link} of peer {peer} has no place in the table ({MAX_NODES} peers of {MAX_LINKS} links)"
    )]
    NoSuchLink { peer: usize, link: usize },
    #[error("peer {peer} has no place in the table ({MAX_NODES} peers)")]
    NoSuchPeer { peer: usize },
}

/// The agent's handle on its link table.
#[derive(Debug)]
pub struct LinkTableWriter {
    mapping: Arc<Mapping>,
    geometry: InterconnectGeometry,
    config: PublishedWriter<4>,
    /// `(links, heartbeat ms, session)`, republished with each status's time.
    configured: [u64; 3],
    /// One per (peer, link), made on first use.
    links: Vec<Option<PublishedWriter<8>>>,
    /// One per peer, made on first use.
    clients: Vec<Option<PublishedWriter<8>>>,
}

impl LinkTableWriter {
    /// Takes over the table, keeping the configuration a previous agent published until
    /// this one publishes its own.
    pub(crate) fn resume(mapping: Arc<Mapping>, geometry: InterconnectGeometry) -> Self {
        let location = geometry.config();
        let [links, heartbeat_ms, session, _] = location.read(&mapping).unwrap_or_default();
        Self {
            config: PublishedWriter::new(location, &mapping),
            configured: [links, heartbeat_ms, session],
            links: (0..MAX_NODES * MAX_LINKS).map(|_| None).collect(),
            clients: (0..MAX_NODES).map(|_| None).collect(),
            mapping,
            geometry,
        }
    }

    /// Publishes the interconnect's configuration.
    pub fn publish_config(&mut self, links: u16, heartbeat_ms: u64, session: u64) {
        self.configured = [u64::from(links), heartbeat_ms, session];
        self.touch();
    }

    /// Publishes the status of link `link` to peer `peer` (a node id), and the time of this
    /// publish in the table header.
    pub fn publish(
        &mut self,
        peer: usize,
        link: usize,
        status: &LinkStatus,
    ) -> Result<(), LinkTableError> {
        // `link` checks both indexes, so the one below is in the table.
        let location = self
            .geometry
            .link(peer, link)
            .ok_or(LinkTableError::NoSuchLink { peer, link })?;
        let mapping = &self.mapping;
        if let Some(slot) = self.links.get_mut(peer * MAX_LINKS + link) {
            slot.get_or_insert_with(|| PublishedWriter::new(location, mapping))
                .publish(mapping, status.to_words());
        }
        self.touch();
        Ok(())
    }

    /// Publishes what the test clients saw from peer `peer` (a node id).
    pub fn publish_clients(
        &mut self,
        peer: usize,
        clients: &LinkClients,
    ) -> Result<(), LinkTableError> {
        let location = self
            .geometry
            .clients(peer)
            .ok_or(LinkTableError::NoSuchPeer { peer })?;
        let mapping = &self.mapping;
        if let Some(slot) = self.clients.get_mut(peer) {
            slot.get_or_insert_with(|| PublishedWriter::new(location, mapping))
                .publish(mapping, clients.to_words());
        }
        Ok(())
    }

    fn touch(&mut self) {
        let [links, heartbeat_ms, session] = self.configured;
        self.config
            .publish(&self.mapping, [links, heartbeat_ms, session, unix_ms()]);
    }
}

impl NodeRegion {
    /// The interconnect configuration the agent published (zero before it did); `None` for
    /// a region without an interconnect area.
    pub fn interconnect_config(&self) -> Option<InterconnectConfig> {
        let geometry = self.header().interconnect?;
        let [links, heartbeat_ms, session, published_unix_ms] =
            geometry.config().read(self.mapping())?;
        Some(InterconnectConfig {
            links: u16::try_from(links).unwrap_or(u16::MAX),
            heartbeat_ms,
            session,
            published_unix_ms,
        })
    }

    /// The status of link `link` to peer `peer` (state `Absent` if never published); `None`
    /// for a region without an interconnect area or a link out of the table.
    pub fn link_status(&self, peer: usize, link: usize) -> Option<LinkStatus> {
        let location = self.header().interconnect?.link(peer, link)?;
        location.read(self.mapping()).map(LinkStatus::from_words)
    }

    /// What the agent's test clients saw from peer `peer` (zero if never published); `None`
    /// for a region without an interconnect area or a peer out of the table.
    pub fn link_clients(&self, peer: usize) -> Option<LinkClients> {
        let location = self.header().interconnect?.clients(peer)?;
        location.read(self.mapping()).map(LinkClients::from_words)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
