//! The control region: written only by hostd, read by every agent.
//!
//! It holds the cluster epoch, the owner of each identity (which node serves it, since which
//! epoch) and one command slot per node. An agent acknowledges a command in its own region
//! (see [`crate::node::Ack`]); nothing here is ever written by an agent.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::header::{self, HeaderError, StaticHeader, decode_name};
use crate::layout::{
    CONTROL_MAGIC, FORMAT_VERSION, HEADER_PAGE, MAX_IDENTITIES, MAX_NODES, NAME_LEN,
    control_header, control_live, control_names,
};
use crate::mapping::{Access, Mapping};
use crate::published::PublishedWriter;

/// Errors from formatting, opening or writing the control region.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("region {source_path} is not a usable control region")]
    Header {
        source_path: String,
        #[source]
        source: HeaderError,
    },
    #[error("{what} list has {count} entries; 1 to {max} are supported")]
    Count {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("name {name:?} is empty or longer than {NAME_LEN} bytes")]
    BadName { name: String },
    #[error("region {source_path} is mapped read-only; only hostd writes it")]
    ReadOnly { source_path: String },
    #[error("{what} {index} does not exist (the region has {count})")]
    NoSuch {
        what: &'static str,
        index: usize,
        count: usize,
    },
}

/// What hostd asks a node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Nothing asked yet.
    None,
    /// Replay the identity's log and serve it.
    TakeOver,
    /// Flush everything written for the identity and stop serving it.
    Release,
    /// Stop writing for the identity at once (fenced).
    StopWriting,
    /// Before a planned takeover: ask the identity's holder (the argument: its node id)
    /// over the interconnect whether it will give the identity up, and acknowledge with its
    /// answer.
    Negotiate,
    /// A code this build does not know (a newer hostd, or corruption).
    Unknown(u64),
}

impl CommandKind {
    fn code(self) -> u64 {
        match self {
            CommandKind::None => 0,
            CommandKind::TakeOver => 1,
            CommandKind::Release => 2,
            CommandKind::StopWriting => 3,
            CommandKind::Negotiate => 4,
            CommandKind::Unknown(code) => code,
        }
    }

    fn from_code(code: u64) -> Self {
        match code {
            0 => CommandKind::None,
            1 => CommandKind::TakeOver,
            2 => CommandKind::Release,
            3 => CommandKind::StopWriting,
            4 => CommandKind::Negotiate,
            other => CommandKind::Unknown(other),
        }
    }
}

/// A command in a node's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Command {
    /// Increases with every command to this node; the ack names it.
    pub seq: u64,
    pub kind: CommandKind,
    pub identity: u64,
    /// The epoch the command was issued in.
    pub epoch: u64,
    /// Command specific.
    pub argument: u64,
}

/// The argument word of a `TakeOver` command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TakeOverArgument {
    /// The identity's old owner, fenced: the taker replays this node's log before serving
    /// (`None`: a planned move or a giveback, whose old owner flushed its log).
    pub replay_from: Option<u32>,
    /// Process mode: the port to listen on for the identity (0: none).
    pub port: u16,
}

impl TakeOverArgument {
    const REPLAY: u64 = 1 << 32;
    const REPLAY_FROM_SHIFT: u32 = 40;

    pub fn to_word(self) -> u64 {
        let replay = self.replay_from.map_or(0, |node| {
            Self::REPLAY | (u64::from(node & 0xff) << Self::REPLAY_FROM_SHIFT)
        });
        replay | u64::from(self.port)
    }

    pub fn from_word(word: u64) -> Self {
        Self {
            replay_from: (word & Self::REPLAY != 0)
                .then_some(((word >> Self::REPLAY_FROM_SHIFT) & 0xff) as u32),
            port: (word & 0xffff) as u16,
        }
    }

    /// Whether the taker replays the old owner's log.
    pub fn replays(self) -> bool {
        self.replay_from.is_some()
    }
}

/// Who serves an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Node id, or `None` while nobody serves it.
    pub node: Option<u32>,
    /// The epoch in which this ownership began.
    pub epoch: u64,
}

/// hostd's presence, as it publishes it every tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HostdPresence {
    /// Bumped every tick: an agent judges hostd's presence by whether it moves.
    pub counter: u64,
    pub unix_ns: u64,
    /// How long the counter may stand still before agents take hostd for absent (0: they
    /// never act without it).
    pub absent_after_ms: u64,
    /// How long a peer's region heartbeat must stand still, with every interconnect link
    /// to it silent, before an agent takes it for dead while hostd is absent.
    pub peer_dead_after_ms: u64,
}

impl HostdPresence {
    /// Whether agents may take over from each other while hostd is away.
    pub fn allows_moves_without_hostd(&self) -> bool {
        self.absent_after_ms > 0 && self.peer_dead_after_ms > 0
    }
}

/// The static part of the control region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlHeader {
    pub version: u32,
    pub region_size: u64,
    pub created_unix_ns: u64,
    pub nodes: Vec<String>,
    pub identities: Vec<String>,
}

/// A mapped, validated control region (read side).
#[derive(Debug, Clone)]
pub struct ControlRegion {
    mapping: Arc<Mapping>,
    header: ControlHeader,
}

impl ControlRegion {
    /// Writes a fresh control region: epoch 0, identity `i` owned by node `i` where such a
    /// node exists, no commands.
    pub fn format(
        mapping: Mapping,
        nodes: &[&str],
        identities: &[&str],
    ) -> Result<Self, ControlError> {
        if mapping.access() != Access::ReadWrite {
            return Err(ControlError::ReadOnly {
                source_path: mapping.source().display().to_string(),
            });
        }
        check_names("node", nodes, MAX_NODES)?;
        check_names("identity", identities, MAX_IDENTITIES)?;
        let mut h = StaticHeader::new(CONTROL_MAGIC);
        h.put_u32(control_header::VERSION, FORMAT_VERSION);
        h.put_u32(control_header::HEADER_LEN, HEADER_PAGE as u32);
        h.put_u64(control_header::REGION_SIZE, mapping.len());
        h.put_u32(control_header::NODE_COUNT, nodes.len() as u32);
        h.put_u32(control_header::IDENTITY_COUNT, identities.len() as u32);
        h.put_u64(control_header::CREATED_UNIX_NS, crate::node::unix_ns());
        header::clear_header_page(&mapping);
        let names = encode_names(nodes, identities);
        mapping.write_bytes(control_names::NODES, &names);
        mapping.write_bytes(control_names::CRC, &crc32c::crc32c(&names).to_le_bytes());
        for index in 0..identities.len().min(nodes.len()) {
            PublishedWriter::new(control_live::owner(index), &mapping)
                .publish(&mapping, [index as u64 + 1, 0]);
        }
        h.store(&mapping);
        Self::open(mapping)
    }

    /// Validates the header of a mapped control region.
    pub fn open(mapping: Mapping) -> Result<Self, ControlError> {
        let header = read_header(&mapping).map_err(|source| ControlError::Header {
            source_path: mapping.source().display().to_string(),
            source,
        })?;
        Ok(Self {
            mapping: Arc::new(mapping),
            header,
        })
    }

    pub fn header(&self) -> &ControlHeader {
        &self.header
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    pub fn epoch(&self) -> u64 {
        self.mapping.load(control_live::EPOCH)
    }

    /// Owner of identity `index`; `None` if the index is out of range or unreadable.
    pub fn owner(&self, index: usize) -> Option<Owner> {
        if index >= self.header.identities.len() {
            return None;
        }
        let [node, epoch] = control_live::owner(index).read(&self.mapping)?;
        Some(Owner {
            node: node.checked_sub(1).map(|n| n as u32),
            epoch,
        })
    }

    /// Command in node `index`'s slot.
    pub fn command(&self, index: usize) -> Option<Command> {
        if index >= self.header.nodes.len() {
            return None;
        }
        let [seq, kind, identity, epoch, argument] =
            control_live::command(index).read(&self.mapping)?;
        Some(Command {
            seq,
            kind: CommandKind::from_code(kind),
            identity,
            epoch,
            argument,
        })
    }

    /// The links hostd has cut for node `index`, a bitmask of link indexes (fault injection;
    /// 0 for a node out of range, and in regions older than these words).
    pub fn links_cut(&self, index: usize) -> u64 {
        if index >= self.header.nodes.len() {
            return 0;
        }
        self.mapping.load(control_live::links_cut(index))
    }

    /// hostd's presence (`None` in a region hostd never published it in).
    pub fn hostd(&self) -> Option<HostdPresence> {
        let [counter, unix_ns, absent_after_ms, peer_dead_after_ms] =
            control_live::HOSTD.read(&self.mapping)?;
        (counter > 0).then_some(HostdPresence {
            counter,
            unix_ns,
            absent_after_ms,
            peer_dead_after_ms,
        })
    }

    /// The writer's handle. Only hostd calls this, once.
    pub fn writer(&self) -> Result<ControlWriter, ControlError> {
        if self.mapping.access() != Access::ReadWrite {
            return Err(ControlError::ReadOnly {
                source_path: self.mapping.source().display().to_string(),
            });
        }
        Ok(ControlWriter {
            owners: (0..self.header.identities.len())
                .map(|i| PublishedWriter::new(control_live::owner(i), &self.mapping))
                .collect(),
            commands: (0..self.header.nodes.len())
                .map(|i| PublishedWriter::new(control_live::command(i), &self.mapping))
                .collect(),
            hostd: PublishedWriter::new(control_live::HOSTD, &self.mapping),
            hostd_counter: self.hostd().map_or(0, |h| h.counter),
            region: self.clone(),
        })
    }
}

/// hostd's handle on the control region.
#[derive(Debug)]
pub struct ControlWriter {
    region: ControlRegion,
    owners: Vec<PublishedWriter<2>>,
    commands: Vec<PublishedWriter<5>>,
    hostd: PublishedWriter<4>,
    hostd_counter: u64,
}

impl ControlWriter {
    /// Publishes a new epoch. Epochs only grow; agents holding an older one stop writing.
    pub fn set_epoch(&mut self, epoch: u64) {
        if let Some(word) = self.region.mapping.word(control_live::EPOCH) {
            word.store(epoch, Ordering::Release);
        }
    }

    /// Says hostd is here: bumps the presence counter, with the agents' thresholds.
    pub fn beat(&mut self, absent_after_ms: u64, peer_dead_after_ms: u64) -> HostdPresence {
        self.hostd_counter += 1;
        let presence = HostdPresence {
            counter: self.hostd_counter,
            unix_ns: crate::node::unix_ns(),
            absent_after_ms,
            peer_dead_after_ms,
        };
        self.hostd.publish(
            &self.region.mapping,
            [
                presence.counter,
                presence.unix_ns,
                presence.absent_after_ms,
                presence.peer_dead_after_ms,
            ],
        );
        presence
    }

    pub fn set_owner(&mut self, identity: usize, owner: Owner) -> Result<(), ControlError> {
        let count = self.owners.len();
        let writer = self.owners.get_mut(identity).ok_or(ControlError::NoSuch {
            what: "identity",
            index: identity,
            count,
        })?;
        let node = owner.node.map_or(0, |n| u64::from(n) + 1);
        writer.publish(&self.region.mapping, [node, owner.epoch]);
        Ok(())
    }

    /// Cuts node `node`'s links whose bits are set in `mask`, and restores the others: the
    /// node's agent stops sending and receiving on a cut link.
    pub fn set_links_cut(&mut self, node: usize, mask: u64) -> Result<(), ControlError> {
        let count = self.region.header.nodes.len();
        let word = (node < count)
            .then(|| self.region.mapping.word(control_live::links_cut(node)))
            .flatten()
            .ok_or(ControlError::NoSuch {
                what: "node",
                index: node,
                count,
            })?;
        word.store(mask, Ordering::Release);
        Ok(())
    }

    pub fn issue(&mut self, node: usize, command: Command) -> Result<(), ControlError> {
        let count = self.commands.len();
        let writer = self.commands.get_mut(node).ok_or(ControlError::NoSuch {
            what: "node",
            index: node,
            count,
        })?;
        writer.publish(
            &self.region.mapping,
            [
                command.seq,
                command.kind.code(),
                command.identity,
                command.epoch,
                command.argument,
            ],
        );
        Ok(())
    }
}

fn check_names(what: &'static str, names: &[&str], max: usize) -> Result<(), ControlError> {
    if names.is_empty() || names.len() > max {
        return Err(ControlError::Count {
            what,
            count: names.len(),
            max,
        });
    }
    match names.iter().find(|n| n.is_empty() || n.len() > NAME_LEN) {
        Some(bad) => Err(ControlError::BadName {
            name: (*bad).to_owned(),
        }),
        None => Ok(()),
    }
}

fn encode_names(nodes: &[&str], identities: &[&str]) -> Vec<u8> {
    let mut bytes = vec![0u8; (MAX_NODES + MAX_IDENTITIES) * NAME_LEN];
    let slots = nodes.iter().enumerate().chain(
        identities
            .iter()
            .enumerate()
            .map(|(i, n)| (MAX_NODES + i, n)),
    );
    for (slot, name) in slots {
        bytes[slot * NAME_LEN..slot * NAME_LEN + name.len()].copy_from_slice(name.as_bytes());
    }
    bytes
}

fn read_header(mapping: &Mapping) -> Result<ControlHeader, HeaderError> {
    let h = StaticHeader::load(mapping, CONTROL_MAGIC)?;
    let version = h.u32(control_header::VERSION);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let region_size = h.u64(control_header::REGION_SIZE);
    if region_size != mapping.len() {
        return Err(HeaderError::Size {
            recorded: region_size,
            mapped: mapping.len(),
        });
    }
    let node_count = h.u32(control_header::NODE_COUNT) as usize;
    let identity_count = h.u32(control_header::IDENTITY_COUNT) as usize;
    if !(1..=MAX_NODES).contains(&node_count) || !(1..=MAX_IDENTITIES).contains(&identity_count) {
        return Err(HeaderError::Geometry(format!(
            "{node_count} nodes and {identity_count} identities (1 to {MAX_NODES} and 1 to {MAX_IDENTITIES} are supported)"
        )));
    }
    let mut names = vec![0u8; (MAX_NODES + MAX_IDENTITIES) * NAME_LEN];
    let mut crc = [0u8; 4];
    if !mapping.read_bytes(control_names::NODES, &mut names)
        || !mapping.read_bytes(control_names::CRC, &mut crc)
    {
        return Err(HeaderError::Unreadable);
    }
    let (stored, computed) = (u32::from_le_bytes(crc), crc32c::crc32c(&names));
    if stored != computed {
        return Err(HeaderError::NameTableCrc { stored, computed });
    }
    let name_at = |slot: usize| {
        decode_name(&names[slot * NAME_LEN..(slot + 1) * NAME_LEN]).ok_or(HeaderError::Name {
            offset: control_names::NODES as usize + slot * NAME_LEN,
        })
    };
    Ok(ControlHeader {
        version,
        region_size,
        created_unix_ns: h.u64(control_header::CREATED_UNIX_NS),
        nodes: (0..node_count).map(name_at).collect::<Result<_, _>>()?,
        identities: (0..identity_count)
            .map(|i| name_at(MAX_NODES + i))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostd_writes_and_agents_read_through_read_only_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.region");
        let region = ControlRegion::format(
            Mapping::create_file(&path, 65536).unwrap(),
            &["a", "b"],
            &["a", "b"],
        )
        .unwrap();
        let agent_view =
            ControlRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap();
        assert_eq!(agent_view.header().nodes, ["a", "b"]);
        assert_eq!(agent_view.header().identities, ["a", "b"]);
        assert_eq!(
            agent_view.owner(0),
            Some(Owner {
                node: Some(0),
                epoch: 0
            })
        );
        assert_eq!(
            agent_view.owner(1),
            Some(Owner {
                node: Some(1),
                epoch: 0
            })
        );
        assert_eq!(agent_view.owner(2), None);
        assert_eq!(agent_view.command(1).unwrap().kind, CommandKind::None);

        let mut w = region.writer().unwrap();
        w.set_epoch(1);
        w.set_owner(
            0,
            Owner {
                node: Some(1),
                epoch: 1,
            },
        )
        .unwrap();
        let cmd = Command {
            seq: 1,
            kind: CommandKind::TakeOver,
            identity: 0,
            epoch: 1,
            argument: 0,
        };
        w.issue(1, cmd).unwrap();
        assert_eq!(agent_view.epoch(), 1);
        assert_eq!(
            agent_view.owner(0),
            Some(Owner {
                node: Some(1),
                epoch: 1
            })
        );
        assert_eq!(agent_view.command(1), Some(cmd));
        assert!(agent_view.writer().is_err());
        assert!(matches!(w.issue(5, cmd), Err(ControlError::NoSuch { .. })));
        assert_eq!(agent_view.links_cut(1), 0);
        w.set_links_cut(1, 0b101).unwrap();
        assert_eq!(agent_view.links_cut(1), 0b101);
        assert_eq!(agent_view.links_cut(0), 0, "one word per node");
        w.set_links_cut(1, 0).unwrap();
        assert_eq!(agent_view.links_cut(1), 0);
        assert!(matches!(
            w.set_links_cut(2, 1),
            Err(ControlError::NoSuch { .. })
        ));
        assert_eq!(agent_view.links_cut(9), 0);
        assert!(matches!(
            w.set_owner(
                9,
                Owner {
                    node: None,
                    epoch: 1
                }
            ),
            Err(ControlError::NoSuch { .. })
        ));
    }

    #[test]
    fn bad_name_lists_are_refused() {
        let m = || Mapping::create_memfd("c", 65536).unwrap();
        assert!(matches!(
            ControlRegion::format(m(), &[], &["a"]),
            Err(ControlError::Count { .. })
        ));
        assert!(matches!(
            ControlRegion::format(m(), &["a"; 9], &["a"]),
            Err(ControlError::Count { .. })
        ));
        assert!(matches!(
            ControlRegion::format(m(), &["a", ""], &["a"]),
            Err(ControlError::BadName { .. })
        ));
    }

    #[test]
    fn unknown_command_codes_are_reported_not_trusted() {
        let region =
            ControlRegion::format(Mapping::create_memfd("c", 65536).unwrap(), &["a"], &["a"])
                .unwrap();
        let mut w = region.writer().unwrap();
        w.issue(
            0,
            Command {
                seq: 1,
                kind: CommandKind::Unknown(77),
                identity: 0,
                epoch: 0,
                argument: 0,
            },
        )
        .unwrap();
        assert_eq!(region.command(0).unwrap().kind, CommandKind::Unknown(77));
    }
}

#[cfg(test)]
mod takeover_argument_tests {
    use super::TakeOverArgument;

    #[test]
    fn round_trips() {
        for replay_from in [None, Some(0), Some(3), Some(7)] {
            for port in [0, 1, 10809, u16::MAX] {
                let argument = TakeOverArgument { replay_from, port };
                assert_eq!(TakeOverArgument::from_word(argument.to_word()), argument);
            }
        }
    }
}
