//! Shared-memory regions and the NVRAM write log of ivha.
//!
//! A pair of guests shares three kinds of memory, each with exactly one writer:
//!
//! - a **node region** per node ([`node`]): header, heartbeat, acknowledgements of hostd's
//!   commands, and the write log ([`log`]) the node appends every write to before it
//!   acknowledges it to a client. The node's partner reads it to replay after a crash.
//!   Regions of 1 MiB and more also hold the node's interconnect area ([`interconnect`]):
//!   the state of its links to its peers, and a mailbox of frames for them.
//! - the **control region** ([`control`]): hostd's epoch, identity owners and commands,
//!   and hostd's presence; while hostd is away, agents publish the identities they claimed
//!   in their own regions ([`claims`]).
//!
//! Regions are mapped from tmpfs files, sealed memfds or a guest's ivshmem BAR
//! ([`mapping`]). Multi-word values are published crash-safely by one writer
//! ([`published`]), and any region, however broken, can be decoded into a report
//! ([`inspect`]).
//!
//! One writer per shared word: under TCG, an atomic read-modify-write in one guest is not
//! atomic against another QEMU process mapping the same file, and single-writer words make
//! fencing a matter of stopping one writer. Writers publish with release stores; readers
//! use acquire loads; nothing uses compare-and-swap across processes.

pub mod claims;
pub mod control;
pub mod header;
pub mod inspect;
pub mod interconnect;
pub mod layout;
pub mod log;
pub mod mapping;
pub mod node;
pub mod published;

pub use claims::{Claim, ClaimWriter, EjectReason, Ejection, newest_owner};
pub use control::{
    Command, CommandKind, ControlError, ControlRegion, ControlWriter, HostdPresence, Owner,
    TakeOverArgument,
};
pub use inspect::{InspectOptions, RegionKind, RegionReport, identify, inspect};
pub use interconnect::{
    BROADCAST, InterconnectConfig, InterconnectGeometry, InterconnectWriter, LinkClients,
    LinkStateCode, LinkStatus, LinkTableError, LinkTableWriter, MailboxError, MailboxReader,
    MailboxWriter,
};
pub use layout::node_interconnect::MAX_LINKS;
pub use log::{
    Appended, BackPressure, Cursor, Entry, Extent, FlushedWriter, Geometry, LogAppender, LogError,
    LogScanner, Record, RecordKind,
};
pub use mapping::{Access, Mapping, MappingError};
pub use node::{
    Ack, Heartbeat, NodeError, NodeRegion, NodeWriter, PeerObservation, Refusal, Replay,
    ReplayStatus, ReplayWriter, ServiceCounters, ServiceWriter, StopReason, StoppedServing,
    StoppedServingWriter, Synced, SyncedWriter,
};
