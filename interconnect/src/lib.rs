//! The cluster connection manager: one place that opens, watches and re-opens the links
//! between two nodes, and carries every cluster service's messages over them.
//!
//! - [`frame`]: the one wire format of a link, typed, decoded with every field checked;
//! - [`session`]: which start of each node a frame belongs to (stale, current, a restart);
//! - [`link`]: a link's session (version and capability exchange, heartbeats) and its state
//!   (up, degraded, down) from what arrives and what does not;
//! - [`channel`]: a client's ordered, exactly-once message stream, with sequence numbers,
//!   acknowledgements and retransmission, independent of the link it travels on;
//! - [`manager`]: the links and channels of one peer together: placement of channels on
//!   links by class, failover when a link dies, rebalancing when it returns and has
//!   settled (the placement rules are in `placement`).
//!
//! Everything here is sans-I/O: the manager is fed received bytes and the time, and hands
//! back the frames to send, so its state machines are tested without sockets or sleeps.

pub mod channel;
pub mod frame;
pub mod link;
pub mod manager;
mod placement;
pub mod session;

#[cfg(test)]
mod tests;
