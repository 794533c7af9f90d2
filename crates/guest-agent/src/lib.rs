//! The ivha guest agent.
//!
//! Scope: runs inside each guest (or as a host process in tests) and owns that node's
//! region through `shm::NodeWriter`: NBD service, log appends, the flusher, heartbeats and
//! the failover monitor. It arrives with the paired-guests and NBD issues; until then this
//! crate has no binary, so nothing pretends to serve.
