//! The control socket's protocol: one JSON request line, one JSON response line.
//!
//! The socket is `STATE_DIR/hostd.sock`, mode 0600, and the daemon also checks the peer's
//! uid (only root and the daemon's own user are served).

use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Stop both guests; with `purge`, also delete regions and disks.
    Down {
        purge: bool,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(ClusterStatus),
    Down(DownReport),
    Error { message: String },
}

/// The whole cluster as `hostd status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub epoch: u64,
    pub state_dir: String,
    pub hostd_pid: u32,
    pub accel: String,
    pub accel_reason: String,
    /// Seconds since the daemon launched the guests.
    pub uptime_s: f64,
    pub nodes: Vec<NodeStatus>,
}

impl ClusterStatus {
    /// True once every node's agent is up.
    pub fn all_up(&self) -> bool {
        self.nodes.iter().all(|n| n.state == NodeState::Up)
    }
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// QEMU runs; the agent has not published a heartbeat for this boot yet.
    Booting,
    /// The agent's heartbeat advances.
    Up,
    /// The heartbeat has not advanced within the timeout.
    Stale,
    /// QEMU is paused (QMP STOP).
    Paused,
    /// The QEMU process has exited.
    Dead,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Booting => "booting",
            NodeState::Up => "up",
            NodeState::Stale => "stale",
            NodeState::Paused => "paused",
            NodeState::Dead => "dead",
        }
    }
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub partner: String,
    pub state: NodeState,
    /// QEMU's state in words ("running", "paused", "exited: signal 9", ...).
    pub vm: String,
    pub pid: Option<u32>,
    pub heartbeat: u64,
    /// Milliseconds since hostd last saw the heartbeat counter move.
    pub heartbeat_age_ms: Option<u64>,
    pub boot_id: u64,
    /// The partner's boot id and heartbeat as this node last read them in the partner's
    /// region (proof that it can read it).
    pub peer_boot_id: u64,
    pub peer_heartbeat: u64,
    pub head_seq: Option<u64>,
    pub flushed_seq: Option<u64>,
    /// Node serving this node's identity (from the control region).
    pub served_by: Option<String>,
    pub nbd: String,
    pub takeover_possible: bool,
    pub takeover_reason: String,
    pub console: String,
}

/// What `down` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownReport {
    /// Per node: how its QEMU ended ("quit cleanly", "killed after 5 s", "already exited").
    pub stopped: Vec<(String, String)>,
    pub purged: bool,
}
