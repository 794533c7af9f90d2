//! The control socket's protocol: one JSON request line, one JSON response line.
//!
//! The socket is `STATE_DIR/hostd.sock`, mode 0600, and the daemon also checks the peer's
//! uid (only root and the daemon's own user are served).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Stop every node; with `purge`, also delete regions and disks.
    Down {
        purge: bool,
    },
    /// Inject a fault into a node (the monitor then detects it and fails over).
    Kill {
        node: String,
        signal: KillSignal,
    },
    /// Planned takeover: another node takes the node's identity over; nothing is killed.
    Takeover {
        node: String,
        /// The node to take it over, which must be in the node's `takeover_by` list;
        /// unset (and in requests of older clients): the first of that list that is up.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// The node takes its identity back (its QEMU is restarted first if it is not running).
    Giveback {
        node: String,
    },
    /// Preempt the node's keys on every disk (its writes fail there), then kill it unless
    /// `keep_running`; its identities move to takers.
    Fence {
        node: String,
        #[serde(default)]
        keep_running: bool,
    },
    /// Register the node's keys on its disks again (a node kept running is stopped first).
    Unfence {
        node: String,
    },
    /// Cut one of the node's interconnect links, or restore it (fault injection).
    Link {
        node: String,
        link: u16,
        up: bool,
    },
}

/// How `hostd kill` hurts a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KillSignal {
    /// SIGKILL the node's QEMU: the process dies at once.
    Kill,
    /// SIGSTOP the node's QEMU: it hangs; only its heartbeat's silence tells.
    Stop,
    /// Panic the guest kernel (an NMI through QMP `inject-nmi`; the guest panics on it).
    Panic,
    /// Kill only the guest agent inside the guest (SIGKILL from the guest's shell); the
    /// guest's init starts it again. With the process backend the agent is the node's
    /// process, so this is the same as `kill`.
    Agent,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(ClusterStatus),
    Down(DownReport),
    /// What `kill` did.
    Killed {
        message: String,
    },
    /// A finished takeover or giveback, with its timeline.
    Moved(MoveReport),
    /// What `fence` or `unfence` did.
    Fenced {
        message: String,
    },
    /// What `link` did.
    Linked {
        message: String,
    },
    Error {
        message: String,
    },
}

/// The whole cluster as `hostd status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub epoch: u64,
    pub state_dir: String,
    pub hostd_pid: u32,
    pub accel: String,
    pub accel_reason: String,
    /// Seconds since the daemon launched (or adopted) the guests.
    pub uptime_s: f64,
    /// Whether this daemon adopted a pair an earlier hostd left running.
    #[serde(default)]
    pub adopted: bool,
    /// Where hostd serves its Prometheus metrics (`http://ADDRESS/metrics`), or why not.
    #[serde(default)]
    pub metrics: String,
    pub nodes: Vec<NodeStatus>,
    /// The storage daemon's pid, when it serves the disks and runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_pid: Option<u32>,
    /// Each disk's reservation, from the storage daemon (empty without one).
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// The coordinator's generation as hostd last read it (about once a second); `None`
    /// without a coordinator, or while it does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_generation: Option<u64>,
    /// The nodes the coordinator says are no members: another node claimed what they held
    /// while hostd was away. hostd fences them and restarts them as standbys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_members: Vec<String>,
    /// Claims the agents published in their regions that the control region does not say
    /// yet (hostd adopts them at its next look at the coordinator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unadopted_claims: Vec<ClaimStatus>,
}

/// A claim an agent won at the coordinator while hostd was away, as it published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimStatus {
    /// The identity claimed.
    pub identity: String,
    /// The node that claimed it.
    pub by: String,
    /// The node it was claimed from.
    pub from: String,
    pub generation: u64,
}

/// One disk's reservation, by node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The disk: the identity whose data it holds.
    pub name: String,
    /// The node holding its reservation.
    pub holder: Option<String>,
    /// The nodes registered on it, which may write it.
    pub registered: Vec<String>,
    /// How many changes its reservation has seen.
    pub generation: u64,
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
    /// The heartbeat is late (not yet past the timeout, or the node still shows activity).
    Suspect,
    /// QEMU is paused (QMP STOP).
    Paused,
    /// Dead: QEMU exited, the guest panicked or shut down, or the heartbeat timed out.
    Down,
    /// Killed and reaped by hostd; its identities are served by a taker.
    Fenced,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Booting => "booting",
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Paused => "paused",
            NodeState::Down => "down",
            NodeState::Fenced => "fenced",
        }
    }
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// Who would take this node's identity over next: the first node of its current
    /// holder's `takeover_by` list that is not down or fenced (the list's first when all
    /// are). Older hostds called it `partner`.
    #[serde(alias = "partner")]
    pub next_taker: String,
    pub state: NodeState,
    /// Why the node is not up, in words (empty when it is).
    pub health: String,
    /// QEMU's state in words ("running", "paused", "exited: signal 9", ...).
    pub vm: String,
    pub pid: Option<u32>,
    pub heartbeat: u64,
    /// Milliseconds since hostd last saw the heartbeat counter move.
    pub heartbeat_age_ms: Option<u64>,
    pub boot_id: u64,
    /// The boot id and heartbeat of the first node this node watches, as it last read
    /// them in that node's region (proof that it can read it).
    pub peer_boot_id: u64,
    pub peer_heartbeat: u64,
    pub head_seq: Option<u64>,
    /// Acknowledgement of the last command hostd gave the node (see `shm::node::Ack`).
    pub last_ack_seq: u64,
    pub flushed_seq: Option<u64>,
    /// Node serving this node's identity (from the control region).
    pub served_by: Option<String>,
    /// The state of the node in `served_by`: anything but up means nobody serves the
    /// identity now (a fenced owner is dead; hostd moves or restarts it).
    #[serde(default)]
    pub served_by_state: Option<NodeState>,
    /// NBD connections open on this node now.
    #[serde(default)]
    pub nbd_connections: u64,
    /// Refusals over a connection limit since this node's agent started: connections closed
    /// as they were accepted, and choices of an export that was full (a client may retry on
    /// the same connection; each refusal counts).
    #[serde(default)]
    pub nbd_refused: u64,
    /// NBD connections this node's agent closed for idling since it started.
    #[serde(default)]
    pub nbd_idle_closed: u64,
    /// How long the write now waiting for space in this node's log has waited, in
    /// milliseconds (by the agent's clock); `None` while none waits.
    #[serde(default)]
    pub log_full_ms: Option<u64>,
    /// Writes waiting now to get into this node's log.
    #[serde(default)]
    pub writes_waiting: u64,
    /// Where clients reach the identity: `nbd://127.0.0.1:PORT/NAME` in user mode,
    /// `nbd://SERVICE_IP:10809/NAME` in bridge mode.
    pub nbd: String,
    /// Bridge mode: the identity's service IP, held by the node in `served_by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ip: Option<String>,
    /// Bridge mode: the MAC address of the NIC that holds the service IP (`served_by`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_mac: Option<String>,
    /// The last identity this node's agent stopped serving because another node owns it,
    /// and why, as the agent recorded it in its region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_serving: Option<String>,
    /// Why this node's agent ejected itself, when it did: it serves nothing until hostd
    /// restarts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected: Option<String>,
    /// This node's interconnect links to each peer, as its agent published them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    /// What the interconnect's test clients saw from each peer (when they run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link_clients: Vec<LinkClientStatus>,
    pub takeover_possible: bool,
    pub takeover_reason: String,
    pub console: String,
}

/// What carries an interconnect link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// A point-to-point NIC pair (a guest), or a Unix datagram socket (process mode).
    Network,
    /// The regions' shared-memory mailbox.
    Mailbox,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Network => "network",
            LinkKind::Mailbox => "mailbox",
        }
    }
}

/// Where an interconnect link stands, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Opening,
    Up,
    Degraded,
    Down,
    /// The peer refused it, or it the peer.
    Refused,
    /// Cut by the node's agent (`hostd link NODE LINK down`).
    Cut,
    /// The agent stopped publishing its links: what it said last is old.
    Stale,
    /// Nothing published (or a state this build does not know).
    Unknown,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Opening => "opening",
            LinkState::Up => "up",
            LinkState::Degraded => "degraded",
            LinkState::Down => "down",
            LinkState::Refused => "refused",
            LinkState::Cut => "cut",
            LinkState::Stale => "stale",
            LinkState::Unknown => "unknown",
        }
    }
}

/// One interconnect link from a node to a peer, as the node's agent published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub peer: String,
    pub link: u16,
    pub kind: LinkKind,
    pub state: LinkState,
    /// Cut by `hostd link NODE LINK down`.
    pub cut: bool,
    /// The last heartbeat round trip (0: none measured yet).
    pub rtt_us: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Frames dropped (malformed, misaddressed, stale) or lost by the transport.
    pub dropped: u64,
    /// Retransmissions of the channels placed on it.
    pub retransmissions: u64,
    /// Channels placed on it.
    pub channels: u64,
    /// Since when it is in that state (Unix ms).
    pub since_unix_ms: u64,
}

/// What a node's interconnect test clients saw from a peer (docs/interconnect.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkClientStatus {
    pub peer: String,
    pub stream_received: u64,
    /// Stream messages out of order or seen twice.
    pub stream_errors: u64,
    pub stream_max_gap_us: u64,
    pub pings: u64,
    pub ping_p50_us: u64,
    pub ping_p99_us: u64,
    pub bulk_bytes_in: u64,
    /// The longest time between two stream messages over the last few seconds.
    pub stream_recent_gap_us: u64,
}

/// What `down` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DownReport {
    /// Per node: how its QEMU ended ("quit cleanly", "killed after 5 s", "already exited").
    pub stopped: Vec<(String, String)>,
    pub purged: bool,
}

/// One finished identity move (takeover or giveback), as recorded in the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveReport {
    /// The identity that moved (named after its home node).
    pub node: String,
    pub from: String,
    pub to: String,
    pub planned: bool,
    /// Why: the monitor's verdict, or the operator's command.
    pub reason: String,
    pub epoch: u64,
    /// Wall-clock time the move started (failure detected, or command received).
    pub detected_unix_ms: u64,
    /// When each step completed, in milliseconds after `detected_unix_ms`.
    pub timeline_ms: Timeline,
    /// Records of the old owner's log replayed onto the disk (unplanned takeover).
    pub replayed_records: u64,
    pub replayed_first_seq: u64,
    pub replayed_last_seq: u64,
    /// False when the replay stopped at a bad record (see the survivor's console).
    pub replay_complete: bool,
}

/// The steps of an identity move, each in milliseconds after the move started; a step the
/// move did not need is absent. Fields are in the order the steps happen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Giveback: the returning node's QEMU was started again and its agent is up.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restarted: Option<f64>,
    /// Planned move: the old owner stopped writing and flushed its log.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub released: Option<f64>,
    /// Unplanned takeover: the failed node was killed and reaped.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub fenced: Option<f64>,
    /// The new owner replayed the old owner's log before it acknowledged (older versions;
    /// a taker now serves first and replays in the background: see the `replayed` event).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replayed: Option<f64>,
    /// Unplanned takeover: the new owner scanned the old owner's log and acknowledged; it
    /// serves the log's records from the old owner's region while it replays them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scanned: Option<f64>,
    /// The identity's address leads to the new owner.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub serving: Option<f64>,
}

impl Timeline {
    /// The steps the move took, in order, with their times.
    pub fn steps(&self) -> impl Iterator<Item = (&'static str, f64)> {
        [
            ("restarted", self.restarted),
            ("released", self.released),
            ("fenced", self.fenced),
            ("replayed", self.replayed),
            ("scanned", self.scanned),
            ("serving", self.serving),
        ]
        .into_iter()
        .filter_map(|(step, at)| Some((step, at?)))
    }
}

/// Client side: sends one request and reads the response.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    crate::json_line::call(path, request, timeout, "hostd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_takeover_request_names_its_taker_only_when_chosen() {
        // An older client's request.
        let old: Request = serde_json::from_str(r#"{"request":"takeover","node":"a"}"#).unwrap();
        assert_eq!(
            old,
            Request::Takeover {
                node: "a".into(),
                to: None
            }
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"request":"takeover","node":"a"}"#
        );
        let chosen: Request =
            serde_json::from_str(r#"{"request":"takeover","node":"a","to":"c"}"#).unwrap();
        assert_eq!(
            chosen,
            Request::Takeover {
                node: "a".into(),
                to: Some("c".into())
            }
        );
    }

    #[test]
    fn node_status_reads_the_older_partner_field() {
        let status = NodeStatus {
            name: "a".into(),
            next_taker: "b".into(),
            state: NodeState::Up,
            health: String::new(),
            vm: "running".into(),
            pid: None,
            heartbeat: 0,
            heartbeat_age_ms: None,
            boot_id: 0,
            peer_boot_id: 0,
            peer_heartbeat: 0,
            head_seq: None,
            last_ack_seq: 0,
            flushed_seq: None,
            served_by: None,
            served_by_state: None,
            nbd_connections: 0,
            nbd_refused: 0,
            nbd_idle_closed: 0,
            log_full_ms: None,
            writes_waiting: 0,
            nbd: String::new(),
            service_ip: None,
            service_mac: None,
            stopped_serving: None,
            ejected: None,
            links: Vec::new(),
            link_clients: Vec::new(),
            takeover_possible: false,
            takeover_reason: String::new(),
            console: String::new(),
        };
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains(r#""next_taker":"b""#), "{json}");
        let old = json.replace("next_taker", "partner");
        let read: NodeStatus = serde_json::from_str(&old).unwrap();
        assert_eq!(read.next_taker, "b");
        assert!(!json.contains("ejected"), "{json}");
    }

    #[test]
    fn cluster_status_of_an_older_hostd_reads_without_the_coordinator() {
        let old = r#"{"epoch":2,"state_dir":"/s","hostd_pid":1,"accel":"tcg","accel_reason":"","uptime_s":1.0,"nodes":[]}"#;
        let status: ClusterStatus = serde_json::from_str(old).unwrap();
        assert_eq!(status.coordinator_generation, None);
        assert!(status.non_members.is_empty() && status.unadopted_claims.is_empty());
        let json = serde_json::to_string(&status).unwrap();
        assert!(!json.contains("coordinator_generation"), "{json}");
    }
}
