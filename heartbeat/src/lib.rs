//! Heartbeat monitoring for ivha.
//!
//! [`monitor::Monitor`] is the liveness state machine of one node (Up, Suspect, Down, with
//! reasons), fed by the heartbeat counter in the node's region, process exit, QMP events
//! and indirect evidence, on a clock the caller passes in. The heartbeat words themselves
//! are written and read through `shm::node`; hostd feeds one monitor per node
//! (`hostd/src/daemon/health.rs`).

pub mod monitor;

pub use monitor::{Config, DownReason, Evidence, Health, Monitor, SuspectReason, Transition};
