//! `[failover]`: whether the agents may take over from each other while hostd is away
//! (docs/takeover.md).
//!
//! ```toml
//! [failover]
//! without_hostd = true      # agents claim a dead peer at the coordinator while hostd is away
//! hostd_absent_ms = 1500    # hostd's presence counter standing still this long: hostd is away
//! peer_dead_ms = 1000       # a peer's heartbeat silent this long (and every link down): dead;
//!                           # default: the heartbeat's floor (heartbeat.min_timeout_ms)
//! ```
//!
//! It takes a coordinator (the storage daemon keeps it: QEMU guests with
//! `disks.served_by = "blkd"`, and the process backend, where the daemon runs for it alone)
//! and a way to move an address without hostd (bridge mode, or the process backend). In
//! user (slirp) mode only hostd can move a port: there the agents wait for hostd whatever
//! this says.

use serde::{Deserialize, Serialize};

use super::HeartbeatConfig;

/// Failover while hostd is away.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// Whether the agents may take over from each other while hostd is away.
    pub without_hostd: bool,
    /// How long hostd's presence counter may stand still before the agents take hostd for
    /// absent. Above hostd's longest pause in normal work (a probe of a hung storage
    /// daemon takes up to a second).
    pub hostd_absent_ms: u64,
    /// How long a peer's region heartbeat must stand still, with every interconnect link
    /// to it down, before an agent takes it for dead while hostd is away. Unset: the
    /// heartbeat detector's floor (`heartbeat.min_timeout_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_dead_ms: Option<u64>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            without_hostd: true,
            hostd_absent_ms: DEFAULT_HOSTD_ABSENT_MS,
            peer_dead_ms: None,
        }
    }
}

/// hostd is away once its presence counter stood still this long, unless configured.
pub const DEFAULT_HOSTD_ABSENT_MS: u64 = 1500;
/// The shortest `hostd_absent_ms`: hostd's loop may pause for a probe of a storage daemon
/// that does not answer (half a second each for its status and its coordinator).
pub const MIN_HOSTD_ABSENT_MS: u64 = 500;
/// The longest of either setting: ten minutes.
pub const MAX_FAILOVER_MS: u64 = 600_000;

impl FailoverConfig {
    /// How long a peer's heartbeat stands still before it is dead: as configured, else the
    /// heartbeat detector's floor.
    pub fn peer_dead_ms(&self, heartbeat: &HeartbeatConfig) -> u64 {
        self.peer_dead_ms
            .unwrap_or_else(|| heartbeat.min_timeout_ms())
    }

    /// Checks the settings (`heartbeat`: a peer silent for a single interval is no
    /// failure).
    pub fn validate(&self, heartbeat: &HeartbeatConfig) -> Result<(), String> {
        if !(MIN_HOSTD_ABSENT_MS..=MAX_FAILOVER_MS).contains(&self.hostd_absent_ms) {
            return Err(format!(
                "failover.hostd_absent_ms {} must be from {MIN_HOSTD_ABSENT_MS} to {MAX_FAILOVER_MS} (hostd's loop may pause for half a second while the storage daemon does not answer)",
                self.hostd_absent_ms
            ));
        }
        if let Some(dead) = self.peer_dead_ms {
            let floor = 2 * heartbeat.interval_ms;
            if !(floor..=MAX_FAILOVER_MS).contains(&dead) {
                return Err(format!(
                    "failover.peer_dead_ms {dead} must be from twice heartbeat.interval_ms ({floor}) to {MAX_FAILOVER_MS}: one late heartbeat is no failure"
                ));
            }
        }
        Ok(())
    }
}
