//! Heartbeat monitoring for ivha.
//!
//! [`monitor::Monitor`] is the liveness state machine of one node (Up, Suspect, Down, with
//! reasons), fed by the heartbeat counter in the node's region, process exit, QMP events
//! and indirect evidence, on a clock the caller passes in. The heartbeat words themselves
//! are written and read through `shm::node`. Wiring it into hostd's failover (fencing and
//! takeover) is the takeover issue's work; today hostd's status uses a plain age check.

pub mod monitor;

pub use monitor::{Config, DownReason, Evidence, Health, Monitor, SuspectReason, Transition};
