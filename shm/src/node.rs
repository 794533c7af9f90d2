//! A node region: one node's header, heartbeat, acknowledgements and write log.
//!
//! Only that node's agent writes it. Its partner and hostd map it read-only and read it
//! through [`NodeRegion`]; the agent gets the writer halves from [`NodeRegion::writer`], one
//! value per group of words it owns, so that ownership of every shared word is a Rust value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::header::{self, HeaderError, StaticHeader};
use crate::interconnect::{InterconnectGeometry, InterconnectWriter};
use crate::layout::{FORMAT_VERSION, HEADER_PAGE, NAME_LEN, NODE_MAGIC, node_header, node_live};
use crate::log::{Cursor, FlushedWriter, Geometry, LogAppender, LogError, LogScanner};
use crate::mapping::{Access, Mapping};
use crate::published::PublishedWriter;

/// Errors from formatting or opening a node region.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("region {source_path} is not a usable node region")]
    Header {
        source_path: String,
        #[source]
        source: HeaderError,
    },
    #[error("node name {name:?} is empty or longer than {NAME_LEN} bytes")]
    BadName { name: String },
    #[error("region {source_path} is mapped read-only; only its owner may write it")]
    ReadOnly { source_path: String },
    #[error("the log of region {source_path} cannot be resumed")]
    Log {
        source_path: String,
        #[source]
        source: LogError,
    },
}

/// The static part of a node region's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeHeader {
    pub version: u32,
    pub region_size: u64,
    pub node_id: u32,
    pub name: String,
    pub created_unix_ns: u64,
    #[serde(flatten)]
    pub geometry: Geometry,
    /// The interconnect area (`None`: the region has none, see [`crate::interconnect`]).
    pub interconnect: Option<InterconnectGeometry>,
}

/// A heartbeat as last published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Heartbeat {
    /// Increases by one per beat; 0 means the agent never beat.
    pub counter: u64,
    /// The agent's wall clock at that beat, ns since the Unix epoch (informative only:
    /// monitors judge liveness by the counter moving, on their own clock).
    pub unix_ns: u64,
}

/// How far the disk's media holds the log, as last published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Synced {
    /// Every record up to this seq was on the media at `unix_ns` (0: never synced).
    pub seq: u64,
    /// The agent's wall clock when the sync returned, ns since the Unix epoch.
    pub unix_ns: u64,
}

/// Codes of [`Ack::status`].
pub mod ack_status {
    /// Done.
    pub const OK: u64 = 0;
    /// Takeover done, but the replay stopped before the partner's head (see the agent's log).
    pub const PARTIAL_REPLAY: u64 = 1;
    /// Could not be done (see the agent's log).
    pub const FAILED: u64 = 2;
    /// The command or identity is not known to the agent.
    pub const UNKNOWN: u64 = 3;
    /// A negotiation's answer: the holder refused; `first_seq` holds the
    /// [`Refusal`](super::Refusal) as its word.
    pub const REFUSED: u64 = 4;
    /// A negotiation's answer: no interconnect link to the holder is up, or it did not
    /// answer in time.
    pub const UNREACHABLE: u64 = 5;
}

/// Why a holder refused to give an identity up (a negotiated takeover's veto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// It does not hold the identity (the control region names another owner).
    NotHolder,
    /// Its flusher failed to write the identity's disk: a release could not flush.
    DiskFailing,
    /// A reason this build does not know (a newer agent gave it).
    Unknown(u64),
}

impl Refusal {
    pub fn to_word(self) -> u64 {
        match self {
            Refusal::NotHolder => 1,
            Refusal::DiskFailing => 2,
            Refusal::Unknown(word) => word,
        }
    }

    pub fn from_word(word: u64) -> Self {
        match word {
            1 => Refusal::NotHolder,
            2 => Refusal::DiskFailing,
            other => Refusal::Unknown(other),
        }
    }

    /// The reason in words.
    pub fn describe(self) -> String {
        match self {
            Refusal::NotHolder => "it does not hold the identity".into(),
            Refusal::DiskFailing => {
                "its disk refused the flusher's writes: a release could not flush the log".into()
            }
            Refusal::Unknown(word) => format!("reason {word}, unknown to this build"),
        }
    }
}

/// What an agent says about the last command hostd gave it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// The command's seq (0: nothing acknowledged yet).
    pub command_seq: u64,
    pub epoch: u64,
    /// One of [`ack_status`].
    pub status: u64,
    /// Command specific, e.g. the first and last seq replayed by a takeover.
    pub first_seq: u64,
    pub last_seq: u64,
}

/// What a node last read in a peer's region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerObservation {
    /// The peer's node id, or `None` if nothing was observed yet.
    pub node_id: Option<u32>,
    pub boot_id: u64,
    pub heartbeat: u64,
}

/// Counters the appender keeps in the region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NodeStats {
    /// Appends that found the ring full and waited for the flusher.
    pub backpressure_waits: u64,
    /// Nanoseconds spent in those waits (added as each wait ends).
    pub backpressure_wait_ns: u64,
    /// When the append waiting for ring space now began (ns since the Unix epoch, the
    /// agent's clock); 0 while the log has room.
    pub log_full_since_unix_ns: u64,
}

#[cfg(test)]
mod refusal_tests {
    use super::Refusal;

    #[test]
    fn refusals_read_back() {
        for refusal in [
            Refusal::NotHolder,
            Refusal::DiskFailing,
            Refusal::Unknown(9),
        ] {
            assert_eq!(Refusal::from_word(refusal.to_word()), refusal);
        }
    }
}

/// Why an agent stopped serving an identity it had served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The control region names another owner (hostd moved the identity).
    Reassigned,
    /// The storage refused the node's writes to the identity's disk, and the control region
    /// names another owner: the storage reports the identity was reassigned.
    StorageRefused,
    /// A reason this build does not know (a newer agent wrote it).
    Unknown(u64),
}

impl StopReason {
    fn to_word(self) -> u64 {
        match self {
            StopReason::Reassigned => 1,
            StopReason::StorageRefused => 2,
            StopReason::Unknown(word) => word,
        }
    }

    fn from_word(word: u64) -> Self {
        match word {
            1 => StopReason::Reassigned,
            2 => StopReason::StorageRefused,
            other => StopReason::Unknown(other),
        }
    }

    /// The reason in words, for status and logs.
    pub fn describe(self) -> String {
        match self {
            StopReason::Reassigned => "the control region names another owner".into(),
            StopReason::StorageRefused => {
                "the storage reports this identity was reassigned (its writes were refused)".into()
            }
            StopReason::Unknown(word) => format!("reason {word}"),
        }
    }
}

/// The last identity an agent stopped serving because another node owns it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoppedServing {
    pub identity: u32,
    pub reason: StopReason,
    /// The control region's epoch when the agent stopped.
    pub epoch: u64,
    pub unix_ns: u64,
}

/// Publishes why the agent stopped serving an identity.
#[derive(Debug)]
pub struct StoppedServingWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<4>,
}

impl StoppedServingWriter {
    pub fn publish(&mut self, stopped: StoppedServing) {
        self.writer.publish(
            &self.mapping,
            [
                u64::from(stopped.identity) + 1,
                stopped.reason.to_word(),
                stopped.epoch,
                stopped.unix_ns,
            ],
        );
    }
}

/// What the agent's services report, published with each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    /// NBD connections open now (negotiating or transmitting).
    pub nbd_connections: u64,
    /// NBD connections refused since the agent started (over a connection limit).
    pub nbd_refused: u64,
    /// NBD connections closed for idling since the agent started.
    pub nbd_idle_closed: u64,
    /// Writes waiting now to get into the log (while it is full, every new write waits).
    pub writes_waiting: u64,
}

/// A mapped, validated node region (read side; works on read-only mappings).
#[derive(Debug, Clone)]
pub struct NodeRegion {
    mapping: Arc<Mapping>,
    header: NodeHeader,
}

impl NodeRegion {
    /// Writes a fresh header and empty log into a read-write mapping, erasing what was there.
    pub fn format(mapping: Mapping, node_id: u32, name: &str) -> Result<Self, NodeError> {
        let source_path = mapping.source().display().to_string();
        if mapping.access() != Access::ReadWrite {
            return Err(NodeError::ReadOnly { source_path });
        }
        if name.is_empty() || name.len() > NAME_LEN {
            return Err(NodeError::BadName { name: name.into() });
        }
        let region_size = mapping.len();
        // The interconnect area, if the region is large enough for one, then the ring.
        let interconnect = InterconnectGeometry::for_region(region_size);
        let ring_offset = interconnect.map_or(HEADER_PAGE, |ic| ic.end());
        let ring_size = region_size - ring_offset;
        let geometry = Geometry {
            ring_offset,
            ring_size,
            max_payload: Geometry::default_max_payload(ring_size),
        };
        let mut h = StaticHeader::new(NODE_MAGIC);
        h.put_u32(node_header::VERSION, FORMAT_VERSION);
        h.put_u32(node_header::HEADER_LEN, HEADER_PAGE as u32);
        h.put_u64(node_header::REGION_SIZE, region_size);
        h.put_u64(node_header::RING_OFFSET, geometry.ring_offset);
        h.put_u64(node_header::RING_SIZE, geometry.ring_size);
        h.put_u64(node_header::MAX_PAYLOAD, geometry.max_payload);
        h.put_u32(node_header::NODE_ID, node_id);
        h.put_name(node_header::NAME, name);
        h.put_u64(node_header::CREATED_UNIX_NS, unix_ns());
        if let Some(ic) = interconnect {
            h.put_u64(node_header::IC_OFFSET, ic.offset);
            h.put_u64(node_header::IC_SIZE, ic.size);
            h.put_u32(node_header::MAILBOX_SLOTS, ic.mailbox_slots);
            h.put_u32(node_header::MAILBOX_SLOT_SIZE, ic.slot_size);
        }
        // Zero the live words first, then the header: a region is only recognised once its
        // magic is there, so a crash mid-format leaves something that does not open.
        header::clear_header_page(&mapping);
        if let Some(ic) = interconnect {
            ic.zero(&mapping);
        }
        h.store(&mapping);
        Self::open(mapping)
    }

    /// Validates the header of a mapped region.
    pub fn open(mapping: Mapping) -> Result<Self, NodeError> {
        let source_path = mapping.source().display().to_string();
        let header = read_header(&mapping).map_err(|source| NodeError::Header {
            source_path,
            source,
        })?;
        Ok(Self {
            mapping: Arc::new(mapping),
            header,
        })
    }

    /// Node id and name, if `mapping` holds a valid node region.
    pub(crate) fn peek_identity(mapping: &Mapping) -> Option<(u32, String)> {
        read_header(mapping).ok().map(|h| (h.node_id, h.name))
    }

    pub fn header(&self) -> &NodeHeader {
        &self.header
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The mapping, for readers that outlive this value.
    pub(crate) fn shared_mapping(&self) -> Arc<Mapping> {
        Arc::clone(&self.mapping)
    }

    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    /// The boot id of the agent that last started writing this region (0: never).
    pub fn boot_id(&self) -> u64 {
        self.mapping.load(node_live::BOOT_ID)
    }

    pub fn heartbeat(&self) -> Option<Heartbeat> {
        let [counter, unix_ns] = node_live::HEARTBEAT.read(&self.mapping)?;
        Some(Heartbeat { counter, unix_ns })
    }

    pub fn head(&self) -> Option<Cursor> {
        node_live::HEAD.read(&self.mapping).map(Cursor::from_words)
    }

    pub fn flushed(&self) -> Option<Cursor> {
        node_live::FLUSHED
            .read(&self.mapping)
            .map(Cursor::from_words)
    }

    /// How far the disk's media is known to hold the log (zero: never synced).
    pub fn synced(&self) -> Option<Synced> {
        let [seq, unix_ns] = node_live::SYNCED.read(&self.mapping)?;
        Some(Synced { seq, unix_ns })
    }

    pub fn ack(&self) -> Option<Ack> {
        let [command_seq, epoch, status, first_seq, last_seq] =
            node_live::ACK.read(&self.mapping)?;
        Some(Ack {
            command_seq,
            epoch,
            status,
            first_seq,
            last_seq,
        })
    }

    /// What this node last read in its first peer's region.
    pub fn peer(&self) -> Option<PeerObservation> {
        read_peer(&self.mapping, node_live::PEER)
    }

    /// What this node last read in node `node`'s region (`None` for a node id out of range,
    /// or a peer it never read).
    pub fn peer_of(&self, node: u32) -> Option<PeerObservation> {
        if node as usize >= crate::layout::MAX_NODES {
            return None;
        }
        read_peer(&self.mapping, node_live::peer(node as usize))
            .filter(|seen| seen.node_id == Some(node))
    }

    /// The write-probe word: 0 unless someone wrote where nobody may (see
    /// [`crate::layout::node_live::WRITE_PROBE`]).
    pub fn write_probe(&self) -> u64 {
        self.mapping.load(node_live::WRITE_PROBE)
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            backpressure_waits: self.mapping.load(node_live::BACKPRESSURE_WAITS),
            backpressure_wait_ns: self.mapping.load(node_live::BACKPRESSURE_WAIT_NS),
            log_full_since_unix_ns: self.mapping.load(node_live::LOG_FULL_SINCE_NS),
        }
    }

    /// The service counters the agent last published (zero before it first did).
    pub fn service(&self) -> Option<ServiceCounters> {
        let [
            nbd_connections,
            nbd_refused,
            nbd_idle_closed,
            writes_waiting,
        ] = node_live::SERVICE.read(&self.mapping)?;
        Some(ServiceCounters {
            nbd_connections,
            nbd_refused,
            nbd_idle_closed,
            writes_waiting,
        })
    }

    /// The last identity this node stopped serving because another node owns it now.
    pub fn stopped_serving(&self) -> Option<StoppedServing> {
        let [identity, reason, epoch, unix_ns] = node_live::STOPPED_SERVING.read(&self.mapping)?;
        Some(StoppedServing {
            identity: u32::try_from(identity.checked_sub(1)?).ok()?,
            reason: StopReason::from_word(reason),
            epoch,
            unix_ns,
        })
    }

    /// What this node did with node `node`'s log after taking its identities over; `None`
    /// if the value cannot be read (a node id out of range included).
    pub fn replay_of(&self, node: u32) -> Option<Replay> {
        if node as usize >= crate::layout::MAX_NODES {
            return None;
        }
        let [epoch, status, first_seq, last_seq] =
            node_live::replay(node as usize).read(&self.mapping)?;
        Some(Replay {
            epoch,
            status: ReplayStatus::from_word(status),
            first_seq,
            last_seq,
        })
    }

    /// The flushed and head cursors as they were at one instant.
    ///
    /// They are published separately (by the flusher and the appender), so reading one and
    /// then the other can pair a stale head with a newer flushed cursor. Both only grow:
    /// reading flushed, head, flushed again, an unchanged flushed cursor means it still held
    /// when the head was read, so the pair is a true snapshot.
    pub fn log_cursors(&self) -> Result<(Cursor, Cursor), LogError> {
        const ATTEMPTS: usize = 1000;
        for _ in 0..ATTEMPTS {
            let flushed = self
                .flushed()
                .ok_or(LogError::CursorUnreadable { name: "flushed" })?;
            let head = self
                .head()
                .ok_or(LogError::CursorUnreadable { name: "head" })?;
            if self.flushed() == Some(flushed) {
                return Ok((flushed, head));
            }
            std::hint::spin_loop();
        }
        Err(LogError::CursorUnreadable {
            name: "flushed and head together",
        })
    }

    /// Copies the log's bytes at log position `pos` into `buf`, as the appender left them;
    /// false if the range is not inside the ring in one piece. A record's data stays
    /// unchanged at [`crate::Appended::data_pos`] until the flushed cursor passes the record,
    /// so its writer may read it back from here instead of keeping a copy.
    pub fn read_log(&self, pos: u64, buf: &mut [u8]) -> bool {
        let geometry = self.geometry();
        let within = (pos % geometry.ring_size)
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= geometry.ring_size);
        within && self.mapping.read_bytes(geometry.region_offset(pos), buf)
    }

    /// Scans the unflushed records: what a partner replays after this node died.
    pub fn unflushed(&self) -> Result<LogScanner<'_>, LogError> {
        let (flushed, head) = self.log_cursors()?;
        Ok(LogScanner::new(
            &self.mapping,
            self.geometry(),
            flushed,
            head,
        ))
    }

    /// Takes over writing the region: picks a new boot id and returns one writer per group
    /// of words. The log resumes from its published cursors.
    pub fn writer(&self, boot_id: u64) -> Result<NodeWriter, NodeError> {
        let source_path = self.mapping.source().display().to_string();
        if self.mapping.access() != Access::ReadWrite {
            return Err(NodeError::ReadOnly { source_path });
        }
        let log_error = |source| NodeError::Log {
            source_path: source_path.clone(),
            source,
        };
        let appender =
            LogAppender::resume(Arc::clone(&self.mapping), self.geometry()).map_err(log_error)?;
        let flushed =
            FlushedWriter::resume(Arc::clone(&self.mapping), self.geometry()).map_err(log_error)?;
        if let Some(word) = self.mapping.word(node_live::BOOT_ID) {
            word.store(boot_id, Ordering::Release);
        }
        let heartbeat = HeartbeatWriter {
            counter: self.heartbeat().map_or(0, |h| h.counter),
            writer: PublishedWriter::new(node_live::HEARTBEAT, &self.mapping),
            mapping: Arc::clone(&self.mapping),
        };
        let ack = AckWriter {
            writer: PublishedWriter::new(node_live::ACK, &self.mapping),
            mapping: Arc::clone(&self.mapping),
        };
        let peer = PeerWriter {
            writer: PublishedWriter::new(node_live::PEER, &self.mapping),
            mapping: Arc::clone(&self.mapping),
            peers: BTreeMap::new(),
        };
        let synced = SyncedWriter {
            writer: PublishedWriter::new(node_live::SYNCED, &self.mapping),
            mapping: Arc::clone(&self.mapping),
        };
        let service = ServiceWriter {
            writer: PublishedWriter::new(node_live::SERVICE, &self.mapping),
            mapping: Arc::clone(&self.mapping),
        };
        let replays = ReplayWriter {
            mapping: Arc::clone(&self.mapping),
        };
        let stopped = StoppedServingWriter {
            writer: PublishedWriter::new(node_live::STOPPED_SERVING, &self.mapping),
            mapping: Arc::clone(&self.mapping),
        };
        let interconnect = self
            .header
            .interconnect
            .map(|geometry| InterconnectWriter::resume(&self.mapping, geometry));
        let claims = crate::claims::ClaimWriter::resume(&self.mapping);
        Ok(NodeWriter {
            claims,
            interconnect,
            replays,
            stopped,
            appender,
            flushed,
            synced,
            heartbeat,
            ack,
            peer,
            service,
        })
    }
}

/// Everything a node's agent writes, split so each part can go to its own thread.
#[derive(Debug)]
pub struct NodeWriter {
    pub appender: LogAppender,
    pub flushed: FlushedWriter,
    pub synced: SyncedWriter,
    pub heartbeat: HeartbeatWriter,
    pub ack: AckWriter,
    pub peer: PeerWriter,
    pub service: ServiceWriter,
    pub replays: ReplayWriter,
    pub stopped: StoppedServingWriter,
    /// Claims won at the coordinator, and this node's ejection.
    pub claims: crate::claims::ClaimWriter,
    /// The link table and the mailbox (`None`: the region has no interconnect area).
    pub interconnect: Option<InterconnectWriter>,
}

/// Publishes heartbeats.
#[derive(Debug)]
pub struct HeartbeatWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<2>,
    counter: u64,
}

impl HeartbeatWriter {
    /// Publishes the next beat and returns it.
    pub fn beat(&mut self) -> Heartbeat {
        self.counter += 1;
        let beat = Heartbeat {
            counter: self.counter,
            unix_ns: unix_ns(),
        };
        self.writer
            .publish(&self.mapping, [beat.counter, beat.unix_ns]);
        beat
    }
}

/// Publishes acknowledgements of hostd's commands.
#[derive(Debug)]
pub struct AckWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<5>,
}

impl AckWriter {
    pub fn acknowledge(&mut self, ack: Ack) {
        self.writer.publish(
            &self.mapping,
            [
                ack.command_seq,
                ack.epoch,
                ack.status,
                ack.first_seq,
                ack.last_seq,
            ],
        );
    }
}

/// Publishes how far the disk's media holds the log.
#[derive(Debug)]
pub struct SyncedWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<2>,
}

impl SyncedWriter {
    /// Declares every record up to `seq` on the disk's media now.
    pub fn publish(&mut self, seq: u64) {
        self.writer.publish(&self.mapping, [seq, unix_ns()]);
    }
}

fn read_peer(mapping: &Mapping, at: crate::published::Published<3>) -> Option<PeerObservation> {
    let [node, boot_id, heartbeat] = at.read(mapping)?;
    Some(PeerObservation {
        node_id: node.checked_sub(1).map(|n| n as u32),
        boot_id,
        heartbeat,
    })
}

/// Publishes what this node read in its peers' regions.
#[derive(Debug)]
pub struct PeerWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<3>,
    /// One per node id, made on first use.
    peers: BTreeMap<usize, PublishedWriter<3>>,
}

impl PeerWriter {
    /// Publishes an observation of one peer, in its own slot and, for the first peer (the
    /// lowest node id observed), in the summary slot too.
    pub fn observe(&mut self, seen: PeerObservation) {
        let node = seen.node_id.map_or(0, |n| u64::from(n) + 1);
        let words = [node, seen.boot_id, seen.heartbeat];
        let index = seen
            .node_id
            .map(|n| n as usize)
            .filter(|&n| n < crate::layout::MAX_NODES);
        if let Some(index) = index {
            let mapping = &self.mapping;
            self.peers
                .entry(index)
                .or_insert_with(|| PublishedWriter::new(node_live::peer(index), mapping))
                .publish(mapping, words);
        }
        let first = self.peers.keys().next().copied();
        if index.is_none() || index == first {
            self.writer.publish(&self.mapping, words);
        }
    }
}

/// Where a node's replay of another node's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStatus {
    /// Never replayed (a fresh region).
    None,
    /// The taker serves the log's records from the dead node's region while it writes them
    /// to the disks: the dead node's log must stay as it is.
    Replaying,
    /// Every record from `first_seq` to `last_seq` is on the disks and synced.
    Replayed,
    /// The replay stopped at a bad record: `last_seq` is the last one on the disks.
    Stopped,
    /// A value this build does not know.
    Unknown(u64),
}

impl ReplayStatus {
    pub fn from_word(word: u64) -> Self {
        match word {
            0 => Self::None,
            1 => Self::Replaying,
            2 => Self::Replayed,
            3 => Self::Stopped,
            other => Self::Unknown(other),
        }
    }

    pub fn to_word(self) -> u64 {
        match self {
            Self::None => 0,
            Self::Replaying => 1,
            Self::Replayed => 2,
            Self::Stopped => 3,
            Self::Unknown(other) => other,
        }
    }

    /// Whether the replay has ended: the dead node's log is no longer read.
    pub fn finished(self) -> bool {
        matches!(self, Self::Replayed | Self::Stopped)
    }
}

/// A node's replay of another node's log, at the epoch of the takeover that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub epoch: u64,
    pub status: ReplayStatus,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Publishes this node's replays of other nodes' logs.
#[derive(Debug)]
pub struct ReplayWriter {
    mapping: Arc<Mapping>,
}

impl ReplayWriter {
    /// Publishes where the replay of node `node`'s log stands; false for a node id out of
    /// range.
    pub fn publish(&mut self, node: u32, replay: Replay) -> bool {
        if node as usize >= crate::layout::MAX_NODES {
            return false;
        }
        let location = node_live::replay(node as usize);
        PublishedWriter::new(location, &self.mapping).publish(
            &self.mapping,
            [
                replay.epoch,
                replay.status.to_word(),
                replay.first_seq,
                replay.last_seq,
            ],
        )
    }
}

/// Publishes the agent's service counters.
#[derive(Debug)]
pub struct ServiceWriter {
    mapping: Arc<Mapping>,
    writer: PublishedWriter<4>,
}

impl ServiceWriter {
    pub fn publish(&mut self, counters: ServiceCounters) {
        self.writer.publish(
            &self.mapping,
            [
                counters.nbd_connections,
                counters.nbd_refused,
                counters.nbd_idle_closed,
                counters.writes_waiting,
            ],
        );
    }
}

fn read_header(mapping: &Mapping) -> Result<NodeHeader, HeaderError> {
    let h = StaticHeader::load(mapping, NODE_MAGIC)?;
    let version = h.u32(node_header::VERSION);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let region_size = h.u64(node_header::REGION_SIZE);
    if region_size != mapping.len() {
        return Err(HeaderError::Size {
            recorded: region_size,
            mapped: mapping.len(),
        });
    }
    let header_len = u64::from(h.u32(node_header::HEADER_LEN));
    let geometry = Geometry {
        ring_offset: h.u64(node_header::RING_OFFSET),
        ring_size: h.u64(node_header::RING_SIZE),
        max_payload: h.u64(node_header::MAX_PAYLOAD),
    };
    if header_len != HEADER_PAGE || geometry.ring_offset < header_len {
        return Err(HeaderError::Geometry(format!(
            "header of {header_len} bytes and ring at {} overlap or are unknown",
            geometry.ring_offset
        )));
    }
    geometry
        .validate(region_size)
        .map_err(HeaderError::Geometry)?;
    let interconnect = InterconnectGeometry::from_header(
        h.u64(node_header::IC_OFFSET),
        h.u64(node_header::IC_SIZE),
        h.u32(node_header::MAILBOX_SLOTS),
        h.u32(node_header::MAILBOX_SLOT_SIZE),
        geometry.ring_offset,
    )
    .map_err(HeaderError::Geometry)?;
    Ok(NodeHeader {
        version,
        region_size,
        node_id: h.u32(node_header::NODE_ID),
        name: h.name(node_header::NAME)?,
        created_unix_ns: h.u64(node_header::CREATED_UNIX_NS),
        geometry,
        interconnect,
    })
}

pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{BackPressure, Entry};

    fn region(size: u64) -> NodeRegion {
        NodeRegion::format(Mapping::create_memfd("n", size).unwrap(), 0, "a").unwrap()
    }

    #[test]
    fn a_write_can_be_read_back_where_the_append_says_its_data_is() {
        let r = region(64 << 10);
        let mut writer = r.writer(1).unwrap();
        let mut scanned = Vec::new();
        // Enough records to wrap the ring, so data positions pass its size.
        for i in 0..40u64 {
            let data: Vec<u8> = (0..3000).map(|j| (i * 7 + j) as u8).collect();
            let entry = Entry::Write {
                export: 0,
                offset: i,
                data: &data,
            };
            let appended = writer
                .appender
                .append(&entry, BackPressure::default())
                .unwrap();
            let mut back = vec![0u8; data.len()];
            assert!(r.read_log(appended.data_pos, &mut back), "record {i}");
            assert_eq!(back, data, "record {i}");
            scanned.extend(r.unflushed().unwrap().map(Result::unwrap));
            let last = scanned.last().unwrap();
            assert_eq!(last.data_pos, appended.data_pos, "record {i}");
            writer.flushed.advance(appended.head).unwrap();
        }
        assert!(scanned.last().unwrap().data_pos > r.geometry().ring_size);
        // A range that would run past the ring's end is refused, not wrapped.
        let ring = r.geometry().ring_size;
        assert!(!r.read_log(ring - 8, &mut [0u8; 16]));
        assert!(r.read_log(ring - 16, &mut [0u8; 16]));
    }

    #[test]
    fn the_stopped_serving_record_reads_back_and_starts_empty() {
        let r = region(64 << 10);
        assert_eq!(r.stopped_serving(), None);
        let mut writer = r.writer(1).unwrap();
        for (identity, reason) in [
            (0, StopReason::Reassigned),
            (3, StopReason::StorageRefused),
            (1, StopReason::Unknown(9)),
        ] {
            let stopped = StoppedServing {
                identity,
                reason,
                epoch: 4,
                unix_ns: 5,
            };
            writer.stopped.publish(stopped);
            assert_eq!(r.stopped_serving(), Some(stopped));
        }
        assert!(StopReason::StorageRefused.describe().contains("reassigned"));
    }

    #[test]
    fn format_then_open_gives_the_same_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.region");
        let formatted =
            NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), 1, "b").unwrap();
        let reopened = NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap();
        assert_eq!(formatted.header(), reopened.header());
        assert_eq!(reopened.header().name, "b");
        assert_eq!(reopened.header().node_id, 1);
        // The interconnect area takes 76 KiB of a 1 MiB region: 8 KiB of link table, a
        // page of mailbox header and 8 slots of 8 KiB.
        let ic = reopened.header().interconnect.unwrap();
        assert_eq!((ic.offset, ic.size, ic.mailbox_slots), (4096, 76 << 10, 8));
        assert_eq!(reopened.geometry().ring_offset, 80 << 10);
        assert_eq!(reopened.geometry().ring_size, (1 << 20) - (80 << 10));
        assert_eq!(reopened.head(), Some(Cursor::default()));
    }

    #[test]
    fn read_only_regions_give_no_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.region");
        NodeRegion::format(Mapping::create_file(&path, 65536).unwrap(), 0, "a").unwrap();
        let ro = NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap();
        assert!(matches!(ro.writer(1), Err(NodeError::ReadOnly { .. })));
    }

    #[test]
    fn names_are_checked() {
        let m = || Mapping::create_memfd("n", 65536).unwrap();
        assert!(matches!(
            NodeRegion::format(m(), 0, ""),
            Err(NodeError::BadName { .. })
        ));
        assert!(matches!(
            NodeRegion::format(m(), 0, "a-name-longer-than-16"),
            Err(NodeError::BadName { .. })
        ));
    }

    #[test]
    fn heartbeat_ack_and_boot_id_are_visible_to_readers() {
        let r = region(65536);
        let mut w = r.writer(0xb007).unwrap();
        assert_eq!(r.boot_id(), 0xb007);
        assert_eq!(r.heartbeat().unwrap().counter, 0);
        w.heartbeat.beat();
        let beat = w.heartbeat.beat();
        assert_eq!(r.heartbeat(), Some(beat));
        assert_eq!(beat.counter, 2);
        let ack = Ack {
            command_seq: 3,
            epoch: 2,
            status: 0,
            first_seq: 10,
            last_seq: 20,
        };
        w.ack.acknowledge(ack);
        assert_eq!(r.ack(), Some(ack));
        let seen = PeerObservation {
            node_id: Some(1),
            boot_id: 77,
            heartbeat: 5,
        };
        w.peer.observe(seen);
        assert_eq!(r.peer(), Some(seen));
        // Each peer has its slot; the summary slot keeps the lowest node id.
        let third = PeerObservation {
            node_id: Some(3),
            boot_id: 78,
            heartbeat: 9,
        };
        w.peer.observe(third);
        assert_eq!(r.peer(), Some(seen));
        assert_eq!(r.peer_of(1), Some(seen));
        assert_eq!(r.peer_of(3), Some(third));
        assert_eq!(r.peer_of(2), None, "never observed");
        assert_eq!(r.peer_of(99), None);
        assert_eq!(r.write_probe(), 0);
        // A restarted agent continues the heartbeat counter.
        drop(w);
        let mut w2 = r.writer(0xb008).unwrap();
        assert_eq!(w2.heartbeat.beat().counter, 3);
    }

    #[test]
    fn a_resumed_writer_continues_the_log() {
        let r = region(65536);
        let mut w = r.writer(1).unwrap();
        let data = [1u8; 100];
        let entry = Entry::Write {
            export: 0,
            offset: 0,
            data: &data,
        };
        for _ in 0..3 {
            w.appender.append(&entry, BackPressure::default()).unwrap();
        }
        drop(w);
        let mut w = r.writer(2).unwrap();
        let appended = w.appender.append(&entry, BackPressure::default()).unwrap();
        assert_eq!(appended.seq, 4);
        let seqs: Vec<u64> = r.unflushed().unwrap().map(|rec| rec.unwrap().seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn back_pressure_waits_for_the_flusher_and_is_counted() {
        let r = region(16384);
        let mut w = r.writer(1).unwrap();
        let data = vec![5u8; 1000];
        let entry = Entry::Write {
            export: 0,
            offset: 0,
            data: &data,
        };
        let short = BackPressure {
            timeout: std::time::Duration::from_millis(20),
        };
        let mut appended = 0;
        let err = loop {
            match w.appender.append(&entry, short) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, LogError::BackPressureTimeout { .. }), "{err}");
        assert!(appended >= 10, "only {appended} records fit");
        assert_eq!(r.stats().backpressure_waits, 1);
        // A flusher frees space on another thread; the blocked append then goes through.
        let NodeWriter {
            mut appender,
            mut flushed,
            ..
        } = w;
        let reader = r.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                // A wait in progress is counted, and the log reads as full, before it ends.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while reader.stats().log_full_since_unix_ns == 0 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the wait never showed"
                    );
                    std::thread::yield_now();
                }
                assert_eq!(reader.stats().backpressure_waits, 2);
                let first = reader.unflushed().unwrap().next().unwrap().unwrap();
                flushed.advance(first.end()).unwrap();
            });
            appender.append(&entry, BackPressure::default()).unwrap();
        });
        assert_eq!(r.stats().backpressure_waits, 2);
        assert!(r.stats().backpressure_wait_ns > 0);
        assert_eq!(r.stats().log_full_since_unix_ns, 0, "the wait is over");
    }
}
