//! Decoding any region into a report, whatever state it is in.
//!
//! `inspect` is what an operator reaches for when something went wrong, so it must work on
//! the region of a writer that died mid-append, on a corrupt region and on garbage: it never
//! fails on the region's contents, it describes them, and names the first problem it found.

use serde::Serialize;

use crate::control::{Command, ControlRegion, Owner};
use crate::header::StaticHeader;
use crate::interconnect::{InterconnectConfig, LinkStateCode, LinkStatus};
use crate::layout::{CONTROL_MAGIC, NODE_MAGIC};
use crate::log::record::{RECORD_HEADER_LEN, RecordHeader, RecordKind, WRITE_PREFIX_LEN};
use crate::log::{Cursor, LogError, LogScanner};
use crate::mapping::Mapping;
use crate::node::{Ack, Heartbeat, NodeHeader, NodeRegion, NodeStats, PeerObservation, Synced};

/// What kind of region a mapping holds, judged by its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionKind {
    Node { node_id: u32, name: String },
    Control,
    Unknown,
}

/// Identifies a region by its magic and header (never by where it was found: PCI slot
/// order is not stable).
pub fn identify(mapping: &Mapping) -> RegionKind {
    match StaticHeader::peek_magic(mapping) {
        Some(NODE_MAGIC) => match crate::node::NodeRegion::peek_identity(mapping) {
            Some((node_id, name)) => RegionKind::Node { node_id, name },
            None => RegionKind::Unknown,
        },
        Some(CONTROL_MAGIC) => RegionKind::Control,
        _ => RegionKind::Unknown,
    }
}

/// How much `inspect` decodes.
#[derive(Debug, Clone, Copy, Default)]
pub struct InspectOptions {
    /// Stop listing records after this many (the scan still checks the rest).
    pub max_records: Option<usize>,
}

/// The first problem found in a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The log record it concerns, if any.
    pub seq: Option<u64>,
    pub message: String,
}

impl Problem {
    fn from_log(error: &LogError) -> Self {
        Self {
            seq: error.seq(),
            message: error.to_string(),
        }
    }
}

/// One record as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordSummary {
    pub seq: u64,
    pub pos: u64,
    pub kind: Option<RecordKind>,
    pub export: Option<u32>,
    pub offset: Option<u64>,
    /// Bytes affected on disk (data length for writes).
    pub len: u64,
    pub crc_ok: bool,
}

/// A record that was being appended but never published: the writer died mid-append.
/// It was never acknowledged, so losing it is correct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnpublishedTail {
    pub seq: u64,
    pub pos: u64,
    pub payload_len: u32,
}

/// A decoded node region.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeReport {
    pub source: String,
    pub size: u64,
    pub header: Option<NodeHeader>,
    pub boot_id: u64,
    pub heartbeat: Option<Heartbeat>,
    pub head: Option<Cursor>,
    pub flushed: Option<Cursor>,
    pub head_seq: Option<u64>,
    pub flushed_seq: Option<u64>,
    /// How far the disk's media holds the log (a host crash loses what came after).
    pub synced: Option<Synced>,
    pub unflushed_records: u64,
    pub unflushed_bytes: u64,
    pub stats: NodeStats,
    pub ack: Option<Ack>,
    /// What the agent last read in each peer's region, by node id.
    pub peers: Vec<PeerObservation>,
    /// The interconnect area's contents (`None`: the region has none).
    pub interconnect: Option<InterconnectReport>,
    pub records: Vec<RecordSummary>,
    /// True when `max_records` cut the list short.
    pub records_truncated: bool,
    pub unpublished_tail: Option<UnpublishedTail>,
    pub problem: Option<Problem>,
}

/// What the interconnect area holds.
#[derive(Debug, Clone, Serialize)]
pub struct InterconnectReport {
    pub config: Option<InterconnectConfig>,
    /// Number of the last message posted in the mailbox.
    pub mailbox_head: u64,
    /// Every link status the agent published.
    pub links: Vec<LinkReport>,
}

/// One published link status.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub peer: usize,
    pub link: usize,
    #[serde(flatten)]
    pub status: LinkStatus,
}

/// A decoded control region.
#[derive(Debug, Clone, Serialize)]
pub struct ControlReport {
    pub source: String,
    pub size: u64,
    pub header: Option<crate::control::ControlHeader>,
    pub epoch: u64,
    pub owners: Vec<IdentityOwner>,
    pub commands: Vec<NodeCommand>,
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityOwner {
    pub identity: String,
    pub owner: Option<String>,
    #[serde(flatten)]
    pub raw: Option<Owner>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeCommand {
    pub node: String,
    pub command: Option<Command>,
}

/// Any region, decoded.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "region", rename_all = "snake_case")]
pub enum RegionReport {
    Node(Box<NodeReport>),
    Control(ControlReport),
    Unknown {
        source: String,
        size: u64,
        problem: Problem,
    },
}

/// Decodes whatever region `mapping` holds.
pub fn inspect(mapping: Mapping, options: InspectOptions) -> RegionReport {
    match StaticHeader::peek_magic(&mapping) {
        Some(NODE_MAGIC) => RegionReport::Node(Box::new(inspect_node(mapping, options))),
        Some(CONTROL_MAGIC) => RegionReport::Control(inspect_control(mapping)),
        magic => RegionReport::Unknown {
            source: mapping.source().display().to_string(),
            size: mapping.len(),
            problem: Problem {
                seq: None,
                message: format!(
                    "not an ivha region: it starts with {:02x?}, not \"IVHANODE\" or \"IVHACTRL\"",
                    magic.unwrap_or_default()
                ),
            },
        },
    }
}

/// Decodes a node region.
pub fn inspect_node(mapping: Mapping, options: InspectOptions) -> NodeReport {
    let source = mapping.source().display().to_string();
    let size = mapping.len();
    let region = match NodeRegion::open(mapping) {
        Ok(region) => region,
        Err(error) => {
            return NodeReport {
                source,
                size,
                problem: Some(Problem {
                    seq: None,
                    message: wire::error_chain::one_line(&error),
                }),
                ..NodeReport::default()
            };
        }
    };
    let cursors = region.log_cursors();
    let (flushed, head) = match &cursors {
        Ok((flushed, head)) => (Some(*flushed), Some(*head)),
        Err(_) => (region.flushed(), region.head()),
    };
    let mut report = NodeReport {
        source,
        size,
        header: Some(region.header().clone()),
        boot_id: region.boot_id(),
        heartbeat: region.heartbeat(),
        head,
        flushed,
        head_seq: head.map(|c| c.seq),
        flushed_seq: flushed.map(|c| c.seq),
        synced: region.synced(),
        stats: region.stats(),
        ack: region.ack(),
        peers: (0..crate::layout::MAX_NODES as u32)
            .filter_map(|node| region.peer_of(node))
            .collect(),
        interconnect: inspect_interconnect(&region),
        ..NodeReport::default()
    };
    let (flushed, head) = match cursors {
        Ok(pair) => pair,
        Err(error) => {
            report.problem = Some(Problem::from_log(&error));
            return report;
        }
    };
    // Counts from cursors that cannot both be right would only mislead.
    if let Err(error) = crate::log::check_cursors(&region.geometry(), flushed, head) {
        report.problem = Some(Problem::from_log(&error));
        return report;
    }
    report.unflushed_records = head.seq.saturating_sub(flushed.seq);
    report.unflushed_bytes = head.pos.saturating_sub(flushed.pos);
    let mut scanner = LogScanner::new(region.mapping(), region.geometry(), flushed, head);
    for item in scanner.by_ref() {
        match item {
            Ok(record) => {
                if options
                    .max_records
                    .is_some_and(|max| report.records.len() >= max)
                {
                    report.records_truncated = true;
                    continue;
                }
                report.records.push(RecordSummary {
                    seq: record.seq,
                    pos: record.pos,
                    kind: Some(record.kind),
                    export: Some(record.export),
                    offset: Some(record.offset),
                    len: record.len,
                    crc_ok: true,
                });
            }
            Err(error) => {
                if let LogError::BadCrc { seq, pos, .. } = error {
                    report.records.push(summarize_bad_record(&region, seq, pos));
                }
                report.problem = Some(Problem::from_log(&error));
            }
        }
    }
    // The cursors passed their checks above: the head is worth looking past.
    report.unpublished_tail = unpublished_tail(&region, head);
    report
}

fn inspect_interconnect(region: &NodeRegion) -> Option<InterconnectReport> {
    let mut links = Vec::new();
    for peer in 0..crate::layout::MAX_NODES {
        for link in 0..crate::layout::node_interconnect::MAX_LINKS {
            let status = region.link_status(peer, link);
            if let Some(status) = status.filter(|s| s.state != LinkStateCode::Absent) {
                links.push(LinkReport { peer, link, status });
            }
        }
    }
    Some(InterconnectReport {
        config: region.interconnect_config(),
        mailbox_head: region.mailbox_head()?,
        links,
    })
}

/// What can still be said about a record whose crc failed.
fn summarize_bad_record(region: &NodeRegion, seq: u64, pos: u64) -> RecordSummary {
    let geometry = region.geometry();
    let mut raw = [0u8; RECORD_HEADER_LEN + WRITE_PREFIX_LEN];
    let readable = geometry.remaining_in_ring(pos) >= raw.len() as u64
        && region
            .mapping()
            .read_bytes(geometry.region_offset(pos), &mut raw);
    let mut header_bytes = [0u8; RECORD_HEADER_LEN];
    header_bytes.copy_from_slice(&raw[..RECORD_HEADER_LEN]);
    let header = RecordHeader::decode(&header_bytes);
    let kind = RecordKind::from_code(header.kind_code);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let prefix = RECORD_HEADER_LEN;
    RecordSummary {
        seq,
        pos,
        kind,
        export: readable.then(|| (u64_at(prefix) & u64::from(u32::MAX)) as u32),
        offset: readable.then(|| u64_at(prefix + 8)),
        len: match kind {
            Some(RecordKind::Write) => {
                u64::from(header.len).saturating_sub(WRITE_PREFIX_LEN as u64)
            }
            _ => u64::from(header.len),
        },
        crc_ok: false,
    }
}

/// A record header right at the head that the head does not cover yet.
fn unpublished_tail(region: &NodeRegion, head: Cursor) -> Option<UnpublishedTail> {
    let geometry = region.geometry();
    let mut pos = head.pos;
    let mut bytes = [0u8; RECORD_HEADER_LEN];
    for _ in 0..2 {
        if geometry.remaining_in_ring(pos) < RECORD_HEADER_LEN as u64 {
            pos = pos.checked_add(geometry.remaining_in_ring(pos))?;
            continue;
        }
        if !region
            .mapping()
            .read_bytes(geometry.region_offset(pos), &mut bytes)
        {
            return None;
        }
        let header = RecordHeader::decode(&bytes);
        if !header.has_magic() || header.pos != pos || header.seq != head.seq + 1 {
            return None;
        }
        if header.kind_code == RecordKind::Wrap.code() {
            pos = pos.checked_add(geometry.remaining_in_ring(pos))?;
            continue;
        }
        return Some(UnpublishedTail {
            seq: header.seq,
            pos,
            payload_len: header.len,
        });
    }
    None
}

/// Decodes the control region.
pub fn inspect_control(mapping: Mapping) -> ControlReport {
    let source = mapping.source().display().to_string();
    let size = mapping.len();
    match ControlRegion::open(mapping) {
        Ok(region) => {
            let header = region.header().clone();
            let owners = header
                .identities
                .iter()
                .enumerate()
                .map(|(i, identity)| {
                    let raw = region.owner(i);
                    IdentityOwner {
                        identity: identity.clone(),
                        owner: raw.and_then(|o| o.node).map(|n| {
                            header
                                .nodes
                                .get(n as usize)
                                .cloned()
                                .unwrap_or_else(|| format!("node#{n}"))
                        }),
                        raw,
                    }
                })
                .collect();
            let commands = header
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| NodeCommand {
                    node: node.clone(),
                    command: region.command(i),
                })
                .collect();
            ControlReport {
                source,
                size,
                epoch: region.epoch(),
                header: Some(header),
                owners,
                commands,
                problem: None,
            }
        }
        Err(error) => ControlReport {
            source,
            size,
            header: None,
            epoch: 0,
            owners: Vec::new(),
            commands: Vec::new(),
            problem: Some(Problem {
                seq: None,
                message: wire::error_chain::one_line(&error),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{BackPressure, Entry};
    use crate::mapping::Access;

    #[test]
    fn a_live_healthy_log_is_never_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.region");
        let region =
            NodeRegion::format(Mapping::create_file(&path, 65536).unwrap(), 0, "a").unwrap();
        let writer = region.writer(1).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        // Stops the writer even when an assertion below panics; otherwise the scope would
        // wait for it forever and the test would hang instead of failing.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let crate::node::NodeWriter {
                    mut appender,
                    mut flushed,
                    ..
                } = writer;
                let data = [9u8; 200];
                let entry = Entry::Write {
                    export: 0,
                    offset: 0,
                    data: &data,
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let appended = appender.append(&entry, BackPressure::default()).unwrap();
                    if appended.seq % 3 == 0 {
                        flushed.advance(appended.head).unwrap();
                    }
                }
            });
            let _stop_writer = StopOnDrop(&stop);
            let mut inspected = 0;
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(1500) {
                let mapping = Mapping::open(&path, Access::ReadOnly).unwrap();
                let report = inspect_node(mapping, InspectOptions::default());
                // A record reused after the flusher passed it is "overwritten", not corrupt.
                if let Some(problem) = &report.problem {
                    assert!(
                        problem.message.contains("overwritten while being read"),
                        "a healthy log was reported as corrupt: {}",
                        problem.message
                    );
                }
                inspected += 1;
            }
            assert!(inspected > 100, "only {inspected} inspections ran");
        });
    }
}
