//! The label sets of hostd's metrics. Each label takes few values (node and identity names
//! come from the configuration, the rest from the enums here), so a cluster has few series.

use heartbeat::{DownReason, Health, SilenceCause};
use prometheus_client::encoding::EncodeLabelSet;
use wire::control::NodeState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabels {
    pub node: String,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedByLabels {
    pub identity: String,
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub identity: String,
    pub kind: &'static str,
    pub cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveKindLabels {
    pub identity: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayLabels {
    pub identity: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FenceLabels {
    pub node: String,
    pub result: &'static str,
}

/// Every node state, in the order `ivha_node_state` lists them.
pub const NODE_STATES: [NodeState; 6] = [
    NodeState::Booting,
    NodeState::Up,
    NodeState::Suspect,
    NodeState::Paused,
    NodeState::Down,
    NodeState::Fenced,
];

/// How an identity moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// Its holder failed and was fenced; the taker replays its log.
    Unplanned,
    /// `hostd takeover`: the holder released it first.
    Planned,
    /// `hostd giveback`: back to its home node.
    Giveback,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Unplanned => "unplanned",
            MoveKind::Planned => "planned",
            MoveKind::Giveback => "giveback",
        }
    }
}

/// Why an identity moved, in a few words a query can match (the event's `reason` says
/// it in full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveCause {
    /// The holder's process (QEMU, or the agent process) exited.
    ProcessExited,
    /// Every thread of the holder's process was stopped.
    ProcessStopped,
    GuestPanicked,
    GuestShutdown,
    /// The heartbeat was silent past the timeout (the ceiling).
    HeartbeatTimeout,
    /// The phi detector judged the heartbeat's silence a failure.
    HeartbeatSilent,
    /// The heartbeat was silent while the guest's vCPUs ran: hung.
    Hung,
    /// An operator's command (`hostd takeover`, `hostd giveback`).
    Operator,
    /// The holder was fenced for a reason its monitor no longer holds.
    Unknown,
}

impl MoveCause {
    /// Why a fenced holder went down, from its monitor's verdict.
    pub fn of(health: &Health) -> Self {
        match health {
            Health::Down(DownReason::ProcessExited { .. }) => MoveCause::ProcessExited,
            Health::Down(DownReason::ProcessStopped) => MoveCause::ProcessStopped,
            Health::Down(DownReason::GuestPanicked) => MoveCause::GuestPanicked,
            Health::Down(DownReason::Shutdown) => MoveCause::GuestShutdown,
            Health::Down(DownReason::HeartbeatTimeout) => MoveCause::HeartbeatTimeout,
            Health::Down(DownReason::HeartbeatSilent(silence)) => match silence.cause {
                SilenceCause::Phi => MoveCause::HeartbeatSilent,
                SilenceCause::Busy => MoveCause::Hung,
            },
            Health::Unknown | Health::Up | Health::Suspect(_) => MoveCause::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MoveCause::ProcessExited => "process_exited",
            MoveCause::ProcessStopped => "process_stopped",
            MoveCause::GuestPanicked => "guest_panicked",
            MoveCause::GuestShutdown => "guest_shutdown",
            MoveCause::HeartbeatTimeout => "heartbeat_timeout",
            MoveCause::HeartbeatSilent => "heartbeat_silent",
            MoveCause::Hung => "hung",
            MoveCause::Operator => "operator",
            MoveCause::Unknown => "unknown",
        }
    }
}
