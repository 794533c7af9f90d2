//! The ivha guest agent.
//!
//! Runs inside each guest (regions are ivshmem BARs found on PCI) or as a host process
//! (regions are files in a directory). Today it owns its node's region: it publishes
//! heartbeats and what it reads in its partner's region. NBD service, the flusher and the
//! failover monitor arrive with the NBD and takeover issues.

pub mod agent;
pub mod args;
pub mod export;
pub mod export_file;
pub mod nbd;
pub mod nvram;
pub mod regions;
