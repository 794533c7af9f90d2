//! `[interconnect]`: the links between the agents (docs/interconnect.md).

use serde::{Deserialize, Serialize};
use wire::interconnect::MAX_NETWORK_LINKS;

use super::ConfigError;

/// The interconnect between the agents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterconnectConfig {
    /// Network links between every two nodes that may take each other over: point-to-point
    /// NICs (QEMU `-netdev dgram`), or Unix datagram sockets for the process backend.
    pub links: u16,
    /// The shared-memory mailbox in the regions as one more link.
    pub mailbox: bool,
    /// Every link's heartbeat: two silent intervals make a link degraded, three down.
    pub heartbeat_ms: u64,
    /// Test clients (tests, benchmarks): a numbered control stream this often (0: off),
    pub stream_ms: u64,
    /// ... pings this often (0: off),
    pub ping_ms: u64,
    /// ... and this many bulk channels kept full (0: off).
    pub bulk: u16,
}

impl Default for InterconnectConfig {
    fn default() -> Self {
        Self {
            links: 2,
            mailbox: true,
            heartbeat_ms: 50,
            stream_ms: 0,
            ping_ms: 0,
            bulk: 0,
        }
    }
}

impl InterconnectConfig {
    pub fn enabled(&self) -> bool {
        self.links > 0 || self.mailbox
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.links > MAX_NETWORK_LINKS {
            return invalid(format!(
                "interconnect.links = {}: at most {MAX_NETWORK_LINKS}",
                self.links
            ));
        }
        // Retransmissions wait four heartbeats: past 250 ms a lost negotiation question
        // would not be resent before the taker gives up on it (2 s).
        if !(2..=250).contains(&self.heartbeat_ms) {
            return invalid(format!(
                "interconnect.heartbeat_ms = {}: from 2 to 250",
                self.heartbeat_ms
            ));
        }
        if self.bulk > 4 {
            return invalid(format!("interconnect.bulk = {}: at most 4", self.bulk));
        }
        for (name, value) in [("stream_ms", self.stream_ms), ("ping_ms", self.ping_ms)] {
            if value > 60_000 {
                return invalid(format!("interconnect.{name} = {value}: at most 60000"));
            }
        }
        Ok(())
    }
}
