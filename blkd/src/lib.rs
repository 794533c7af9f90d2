//! The storage daemon: serves the cluster's disk images to the guests over vhost-user-blk,
//! one socket per (disk, node) so every request is known to come from one node, and keeps
//! SCSI-3-style persistent reservations per disk so a fenced node cannot write.

pub mod backend;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod request;
pub mod reservation;
pub mod table;
