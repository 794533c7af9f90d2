//! Files hostd keeps in its state directory for the next hostd (and for tools that clean
//! up after one): `run/NODE.json`, one per running node process.

use serde::{Deserialize, Serialize};

/// One node's running process, as the hostd that started it recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The region's boot id and heartbeat counter before this process started: while the
    /// region still shows them, the node's agent has not started (it is booting).
    #[serde(default)]
    pub boot_id_before: u64,
    #[serde(default)]
    pub heartbeat_before: u64,
}
