//! Where everything lives in the node and control regions.
//!
//! Both regions start with a 4 KiB header page. Its first 128 bytes are a static header,
//! written once when the region is formatted and covered by a crc32c; the rest of the page
//! holds the live words, each written by exactly one party. In a node region of at least
//! [`node_interconnect::MIN_REGION`] bytes the interconnect area follows the header page and
//! the ring fills the rest; in a smaller one (or one formatted before the area existed) the
//! ring fills everything after the header page.
//!
//! All multi-byte fields are little-endian; all live words are naturally aligned `u64`s.

use crate::published::{Published, published_size};

/// Size of the header page of both region kinds.
pub const HEADER_PAGE: u64 = 4096;
/// Bytes of the static header covered by its crc (the crc sits right after them).
pub const STATIC_HEADER_CRC_OFFSET: usize = 120;
/// Length of the static header, crc included.
pub const STATIC_HEADER_LEN: usize = 128;
/// Region format version this build reads and writes. Version 2 (n-way clusters): one peer
/// observation per node in node regions, and the dead holder's node in a takeover command.
pub const FORMAT_VERSION: u32 = 2;
/// Longest node or identity name, in bytes.
pub const NAME_LEN: usize = 16;

/// Magic of a node region ("IVHANODE").
pub const NODE_MAGIC: [u8; 8] = *b"IVHANODE";
/// Magic of the control region ("IVHACTRL").
pub const CONTROL_MAGIC: [u8; 8] = *b"IVHACTRL";

/// Most nodes and identities a control region describes.
pub const MAX_NODES: usize = 8;
/// Most identities (exports with their addresses) a control region describes.
pub const MAX_IDENTITIES: usize = 8;

/// Static node header fields (byte offsets).
pub mod node_header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 12;
    pub const REGION_SIZE: usize = 16;
    pub const RING_OFFSET: usize = 24;
    pub const RING_SIZE: usize = 32;
    pub const MAX_PAYLOAD: usize = 40;
    pub const NODE_ID: usize = 48;
    pub const NAME: usize = 56;
    pub const CREATED_UNIX_NS: usize = 72;
    /// Offset of the interconnect area (u64); zero in a region without one: too small, or
    /// formatted before the area existed (those bytes were zero then).
    pub const IC_OFFSET: usize = 80;
    /// Size of the interconnect area (u64), link table and mailbox included.
    pub const IC_SIZE: usize = 88;
    /// Slots in the mailbox ring (u32).
    pub const MAILBOX_SLOTS: usize = 96;
    /// Size of one mailbox slot (u32), its header included.
    pub const MAILBOX_SLOT_SIZE: usize = 100;

    const _: () = assert!(CREATED_UNIX_NS + 8 <= IC_OFFSET);
    const _: () = assert!(MAILBOX_SLOT_SIZE + 4 <= super::STATIC_HEADER_CRC_OFFSET);
}

/// Live words of a node region, all written by that node's agent.
pub mod node_live {
    use super::*;

    /// Random id the agent picks each time it starts writing the region.
    pub const BOOT_ID: u64 = 512;
    /// `(counter, unix time ns)`.
    pub const HEARTBEAT: Published<2> = Published::at(576);
    /// `(seq, position)` just past the last published record.
    pub const HEAD: Published<2> = Published::at(640);
    /// `(seq, position)` just past the last record whose data is on disk: written there
    /// in a way that survives what the log survives (see the agent's flusher), so its
    /// ring space may be reused.
    pub const FLUSHED: Published<2> = Published::at(704);
    /// Times an append waited for ring space (back-pressure).
    pub const BACKPRESSURE_WAITS: u64 = 768;
    /// Total nanoseconds appends spent waiting for ring space.
    pub const BACKPRESSURE_WAIT_NS: u64 = 776;
    /// Unix time (ns) at which the append waiting for ring space now began; 0 when none
    /// waits. Written by the appender as the wait starts and ends.
    pub const LOG_FULL_SINCE_NS: u64 = 784;
    /// What this node last read in its first peer's region, through its read-only mapping:
    /// `(peer node id + 1, peer boot id, peer heartbeat counter)`; [`peer`] has every peer.
    pub const PEER: Published<3> = Published::at(800);
    /// Never written by anyone in a healthy cluster: the target of the self-test in which
    /// a partner tries to write into this region through its read-only mapping.
    pub const WRITE_PROBE: u64 = 3072;
    /// Acknowledgement of the last command hostd addressed to this node:
    /// `(command seq, epoch, status, first seq, last seq)`.
    pub const ACK: Published<5> = Published::at(1024);
    /// `(seq, unix time ns)`: every record up to `seq` was on the disk's media (fdatasync
    /// returned) at that time. Zero in a region no agent synced yet.
    pub const SYNCED: Published<2> = Published::at(1152);
    /// The agent's service counters, published with each heartbeat: `(NBD connections
    /// open, NBD connections refused, NBD connections closed idle, writes waiting for the
    /// log)`; the two totals count since the agent started.
    pub const SERVICE: Published<4> = Published::at(1200);
    /// What this node did with the logs of nodes whose identities it took over, one value
    /// per node id (see [`replay`]).
    pub const REPLAYS: u64 = 1280;
    /// Distance between two replay values.
    pub const REPLAY_STRIDE: u64 = 80;

    /// What this node last read in each peer's region, one value per node id, as [`PEER`].
    pub const PEERS: u64 = 2048;
    /// Distance between two peer observations.
    pub const PEER_STRIDE: u64 = 64;

    /// The last identity this node stopped serving because it found another owner had it:
    /// `(identity index + 1, reason, control epoch then, unix time ns)`; zero when none
    /// (see `crate::node::StoppedServing`). Regions older than it read as zero.
    pub const STOPPED_SERVING: Published<4> = Published::at(2560);

    /// This node's claims, one per identity index: `(generation, victim node id + 1)`, the
    /// coordinator's generation at which this node claimed the identity while hostd was
    /// away; zero when it never did (and in regions older than these words).
    pub const CLAIMS: u64 = 3136;
    /// Distance between two claims.
    pub const CLAIM_STRIDE: u64 = 40;
    /// Whether this node ejected itself: `(generation seen, reason, unix time ns)`; zero
    /// when it did not (see `crate::node::Ejection`).
    pub const EJECTED: Published<3> = Published::at(3520);

    /// This node's claim of identity `identity`.
    pub const fn claim(identity: usize) -> Published<2> {
        Published::at(CLAIMS + identity as u64 * CLAIM_STRIDE)
    }

    /// What this node last read in node `node`'s region.
    pub const fn peer(node: usize) -> Published<3> {
        Published::at(PEERS + node as u64 * PEER_STRIDE)
    }

    /// This node's replay of node `node`'s log: `(epoch of the takeover, status, seq of
    /// the first record to replay, seq of the last)`; see `crate::node::ReplayStatus`.
    pub const fn replay(node: usize) -> Published<4> {
        Published::at(REPLAYS + node as u64 * REPLAY_STRIDE)
    }

    const _: () = assert!(HEARTBEAT.end() <= HEAD.offset());
    const _: () = assert!(HEAD.end() <= FLUSHED.offset());
    const _: () = assert!(FLUSHED.end() <= BACKPRESSURE_WAITS);
    const _: () = assert!(BACKPRESSURE_WAIT_NS + 8 <= LOG_FULL_SINCE_NS);
    const _: () = assert!(LOG_FULL_SINCE_NS + 8 <= PEER.offset());
    const _: () = assert!(PEER.end() <= ACK.offset());
    const _: () = assert!(ACK.end() <= SYNCED.offset());
    const _: () = assert!(SYNCED.end() <= SERVICE.offset());
    const _: () = assert!(SERVICE.end() <= REPLAYS);
    const _: () = assert!(replay(0).end() <= REPLAYS + REPLAY_STRIDE);
    const _: () = assert!(replay(MAX_NODES - 1).end() <= PEERS);
    const _: () = assert!(published_size(3) <= PEER_STRIDE);
    const _: () = assert!(peer(MAX_NODES - 1).end() <= STOPPED_SERVING.offset());
    const _: () = assert!(STOPPED_SERVING.end() <= WRITE_PROBE);
    const _: () = assert!(WRITE_PROBE + 8 <= CLAIMS);
    const _: () = assert!(published_size(2) <= CLAIM_STRIDE);
    const _: () = assert!(claim(MAX_IDENTITIES - 1).end() <= EJECTED.offset());
    const _: () = assert!(EJECTED.end() <= HEADER_PAGE);
}

/// The interconnect area of a node region: the link-status table, then the mailbox. Offsets
/// here are from the area's start (see `crate::interconnect::InterconnectGeometry`); every
/// word in it is written by the region's agent only.
pub mod node_interconnect {
    use super::*;

    /// Regions smaller than this get no area: their ring is too small to give any up.
    pub const MIN_REGION: u64 = 1 << 20;
    /// Links per peer the table has room for.
    pub const MAX_LINKS: usize = 4;

    /// Table header: `(links configured, heartbeat interval ms, session, unix ms of the last
    /// publish)`, at the area's start.
    pub const CONFIG: u64 = 0;
    /// Status of link 0 of peer 0; one `Published<8>` per (peer node id, link index).
    pub const LINKS: u64 = 128;
    /// Distance between two link statuses.
    pub const LINK_STRIDE: u64 = 144;
    /// What the agent's interconnect test clients saw from peer 0; one `Published<8>` per
    /// peer node id, after the link statuses.
    pub const CLIENTS: u64 = link(MAX_NODES, 0);
    /// Size of the link table, page aligned so the mailbox starts on a page.
    pub const LINK_TABLE_SIZE: u64 = 8192;

    /// The mailbox's head word: the number of the last message posted (0: none yet).
    pub const MAILBOX_HEAD: u64 = LINK_TABLE_SIZE;
    /// The mailbox header (the head word and room to grow), a page.
    pub const MAILBOX_HEADER_SIZE: u64 = 4096;
    /// The first mailbox slot.
    pub const SLOTS: u64 = MAILBOX_HEAD + MAILBOX_HEADER_SIZE;
    /// Size of a slot as this build formats it.
    pub const SLOT_SIZE: u64 = 8192;
    /// A slot starts with `(message number, to | len << 32)`; the frame follows.
    pub const SLOT_HEADER_LEN: u64 = 16;
    /// Largest slot a reader accepts from a header (bounds a hostile header's claims).
    pub const MAX_SLOT_SIZE: u64 = 1 << 20;
    /// Bounds of the mailbox's slots, sized from the region (see [`mailbox_size`]).
    pub const MIN_MAILBOX: u64 = 64 << 10;
    pub const MAX_MAILBOX: u64 = 512 << 10;

    /// Offset of link `link` of peer `peer` from the area's start.
    pub const fn link(peer: usize, link: usize) -> u64 {
        LINKS + (peer * MAX_LINKS + link) as u64 * LINK_STRIDE
    }

    /// Offset of peer `peer`'s test-client statistics from the area's start.
    pub const fn clients(peer: usize) -> u64 {
        CLIENTS + peer as u64 * LINK_STRIDE
    }

    /// Bytes of mailbox slots in a region of `region_size` bytes: a sixteenth, within
    /// [`MIN_MAILBOX`] and [`MAX_MAILBOX`], in whole slots.
    pub const fn mailbox_size(region_size: u64) -> u64 {
        let size = region_size / 16;
        let size = if size < MIN_MAILBOX {
            MIN_MAILBOX
        } else if size > MAX_MAILBOX {
            MAX_MAILBOX
        } else {
            size
        };
        size / SLOT_SIZE * SLOT_SIZE
    }

    /// Size of the area in a region of `region_size` bytes (0: none).
    pub const fn area_size(region_size: u64) -> u64 {
        if region_size < MIN_REGION {
            0
        } else {
            SLOTS + mailbox_size(region_size)
        }
    }

    const _: () = assert!(published_size(4) <= LINKS);
    const _: () = assert!(published_size(8) <= LINK_STRIDE);
    const _: () = assert!(LINK_STRIDE % 8 == 0 && LINKS % 8 == 0);
    const _: () = assert!(link(MAX_NODES - 1, MAX_LINKS - 1) + LINK_STRIDE <= CLIENTS);
    const _: () = assert!(clients(MAX_NODES - 1) + LINK_STRIDE <= LINK_TABLE_SIZE);
    const _: () = assert!(LINK_TABLE_SIZE % 4096 == 0 && SLOTS % 4096 == 0);
    const _: () = assert!(SLOT_SIZE % 4096 == 0 && SLOT_SIZE <= MAX_SLOT_SIZE);
    const _: () = assert!(MIN_MAILBOX % SLOT_SIZE == 0 && MAX_MAILBOX % SLOT_SIZE == 0);
    // The ring keeps at least 90% of the smallest region with an area, and of the largest.
    const _: () = assert!((HEADER_PAGE + area_size(MIN_REGION)) * 10 <= MIN_REGION);
    const _: () = assert!((HEADER_PAGE + area_size(2 * MIN_REGION)) * 10 <= 2 * MIN_REGION);
    const _: () = assert!(area_size(MIN_REGION - 4096) == 0);
    const _: () = assert!(area_size(4 << 30) == SLOTS + MAX_MAILBOX);
}

/// Static control header fields (byte offsets).
pub mod control_header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_LEN: usize = 12;
    pub const REGION_SIZE: usize = 16;
    pub const NODE_COUNT: usize = 24;
    pub const IDENTITY_COUNT: usize = 28;
    pub const CREATED_UNIX_NS: usize = 32;
}

/// Names of nodes and identities in the control region's header page (outside the crc'd
/// static header: 8 names of 16 bytes each do not fit in it). Written once at format.
pub mod control_names {
    use super::*;
    pub const NODES: u64 = 256;
    pub const IDENTITIES: u64 = NODES + (MAX_NODES * NAME_LEN) as u64;
    /// crc32c over both name tables.
    pub const CRC: u64 = IDENTITIES + (MAX_IDENTITIES * NAME_LEN) as u64;
    const _: () = assert!(CRC + 8 <= 1024);
}

/// Live words of the control region, all written by hostd.
pub mod control_live {
    use super::*;

    /// The cluster epoch: bumped before every change of identity ownership.
    pub const EPOCH: u64 = 1024;
    /// Distance between two identity owner records.
    pub const OWNER_STRIDE: u64 = 64;
    /// Owner of identity 0: `(owner node id + 1, epoch)`; 0 means unowned.
    pub const OWNERS: u64 = 1088;
    /// Distance between two command slots.
    pub const COMMAND_STRIDE: u64 = 128;
    /// Links hostd has cut for node 0: a bitmask of link indexes (fault injection in the
    /// process backend); one word per node, see [`links_cut`].
    pub const LINKS_CUT: u64 = 1600;
    /// hostd's presence: `(counter, unix time ns, absent after ms, peer dead after ms)`.
    /// hostd bumps the counter every tick; an agent that sees it stand still for `absent
    /// after` takes hostd for absent, and may then claim a peer whose heartbeat stood still
    /// for `peer dead after` (0 in either: agents never act without hostd).
    pub const HOSTD: Published<4> = Published::at(1664);
    /// Command slot of node 0: `(command seq, kind, identity, epoch, argument)`.
    pub const COMMANDS: u64 = 2048;

    /// Owner record of identity `index`.
    pub const fn owner(index: usize) -> Published<2> {
        Published::at(OWNERS + index as u64 * OWNER_STRIDE)
    }

    /// Command slot of node `index`.
    pub const fn command(index: usize) -> Published<5> {
        Published::at(COMMANDS + index as u64 * COMMAND_STRIDE)
    }

    /// The links-cut word of node `index`.
    pub const fn links_cut(index: usize) -> u64 {
        LINKS_CUT + index as u64 * 8
    }

    const _: () = assert!(OWNER_STRIDE >= published_size(2));
    const _: () = assert!(OWNERS + MAX_IDENTITIES as u64 * OWNER_STRIDE <= LINKS_CUT);
    const _: () = assert!(links_cut(MAX_NODES) <= HOSTD.offset());
    const _: () = assert!(HOSTD.end() <= COMMANDS);
    const _: () = assert!(COMMAND_STRIDE >= published_size(5));
    const _: () = assert!(COMMANDS + MAX_NODES as u64 * COMMAND_STRIDE <= HEADER_PAGE);
}
