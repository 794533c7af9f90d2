//! Heartbeat monitoring for ivha.
//!
//! Scope: the monitor state machine (Up, Suspect, Down, with reasons) fed by the heartbeat
//! counter in a node's region, process death, QMP events and indirect evidence, with an
//! injectable clock. It arrives with the takeover issue; the heartbeat words themselves
//! are written and read through `shm::node`.
