//! Heartbeat monitoring for ivha.
//!
//! [`monitor::Monitor`] is the liveness state machine of one node (Up, Suspect, Down, with
//! reasons), fed by the heartbeat counter in the node's region, process exit and stop, the
//! CPU its guest gets, QMP events and indirect evidence, on a clock the caller passes in.
//! How long a heartbeat may be silent is learned from the node's own intervals by
//! [`detector::Intervals`] (phi accrual), between a floor and a timeout. The heartbeat
//! words themselves are written and read through `shm::node`; hostd feeds one monitor per
//! node (`hostd/src/daemon/health.rs`).

pub mod detector;
pub mod monitor;

pub use detector::Intervals;
pub use monitor::{
    Config, Detector, DownReason, Evidence, Health, Monitor, PhiConfig, Silence, SilenceCause,
    SuspectReason, Transition,
};
