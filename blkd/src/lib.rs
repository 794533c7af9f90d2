//! The storage daemon: serves the cluster's disk images to the guests over vhost-user-blk,
//! one socket per (disk, node) so every request is known to come from one node, and keeps
//! SCSI-3-style persistent reservations per disk so a fenced node cannot write. It may also
//! run the cluster's coordinator: one order of ownership changes, which the agents reach
//! over one socket per node to take over from each other while hostd is away.

pub mod backend;
pub mod control;
pub mod coordination;
pub mod coordinator;
pub mod daemon;
pub mod disk;
pub mod durable;
pub mod node_socket;
pub mod request;
pub mod reservation;
pub mod stonith;
pub mod table;
