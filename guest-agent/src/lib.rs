//! The ivha guest agent.
//!
//! Runs inside each guest (regions are ivshmem BARs found on PCI) or as a host process
//! (regions are files in a directory). It owns its node's region (heartbeat, log, acks),
//! serves its volume over NBD with NVRAM write-back ([`nvram`], [`nbd`]), and carries out
//! hostd's takeover and giveback commands ([`failover`]), holding the service IPs of the
//! identities it serves in bridge mode ([`service_ip`]). It talks to its peers over the
//! interconnect's links ([`interconnect`]). While hostd is away, it claims a dead peer's
//! identities at the coordinator ([`coordinator`]) and takes them over, or ejects itself
//! when it finds it lost ([`failover::without_hostd`]).

pub mod agent;
pub mod args;
pub mod coordinator;
pub mod export;
pub mod export_file;
pub mod failover;
pub mod interconnect;
pub mod nbd;
pub mod nvram;
pub mod regions;
pub mod service_ip;
