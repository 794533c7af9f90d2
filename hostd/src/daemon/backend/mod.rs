//! Where nodes run: the [`NodeBackend`] trait and its implementations. The cluster's state
//! machine (health, fencing, moves) only talks to this trait, so it runs unchanged over
//! QEMU guests ([`qemu::QemuBackend`]), agents as host processes
//! ([`process::ProcessBackend`]) and, in unit tests, a fake.

mod children;
pub mod process;
pub mod qemu;
mod shell;

#[cfg(test)]
pub mod fake;

use std::path::PathBuf;
use std::time::Duration;

use wire::agent::AgentOptions;
use wire::records::RunRecord;

use super::topology::NodeId;

/// What a node needs to start: its files, the files of the nodes it may take over, its
/// agent's settings and the addresses it holds from the start.
#[derive(Debug, Clone)]
pub struct SpawnPlan {
    pub name: String,
    pub options: AgentOptions,
    pub region: PathBuf,
    pub disk: PathBuf,
    /// The storage daemon's socket for this node's own disk; None: QEMU opens `disk`.
    pub disk_socket: Option<PathBuf>,
    /// The node's coordinator socket (the storage daemon's), when it keeps one: a guest
    /// reaches it through a virtio-serial port, an agent process connects to it itself.
    pub coordinator_socket: Option<PathBuf>,
    /// The nodes whose identities this node may take over: their names, regions and disks.
    pub watched: Vec<WatchedNode>,
    pub control_region: PathBuf,
    pub region_size: u64,
    pub control_size: u64,
    /// The directory of all regions (the process backend's agents find theirs there).
    pub regions_dir: PathBuf,
    /// Host ports this node serves from the start (its own identity's, when it holds it).
    pub ports: Vec<u16>,
    /// Extra kernel arguments (configuration), for guests.
    pub kernel_args: String,
    /// The guest's console log.
    pub console: PathBuf,
    /// Where the interconnect's sockets live (QEMU's `-netdev dgram` ends, or the agent
    /// processes' sockets).
    pub interconnect_dir: PathBuf,
}

/// Where a node's process keeps its sockets and its own output, for as long as the state
/// directory lives (a restarted hostd finds them there).
#[derive(Debug, Clone)]
pub struct NodePaths {
    pub name: String,
    /// The process's stdout and stderr.
    pub log: PathBuf,
    pub qmp_socket: PathBuf,
    pub shell_socket: PathBuf,
}

/// A node whose identity another may take over.
#[derive(Debug, Clone)]
pub struct WatchedNode {
    pub name: String,
    pub region: PathBuf,
    pub disk: PathBuf,
    /// The storage daemon's socket for that disk, for the watching node.
    pub disk_socket: Option<PathBuf>,
}

/// What happened to a node since the last poll.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Polled {
    /// How the node's process ended, the first time that is seen.
    pub exited: Option<String>,
    /// What the hypervisor said, in order.
    pub events: Vec<VmEvent>,
    /// How the node's process runs on the host now, where the backend can tell (set by
    /// [`NodeBackend::sample`]).
    pub scheduling: Option<Scheduling>,
}

/// How a node's process runs on the host, as the kernel's scheduler sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scheduling {
    /// Every thread of the process is stopped (SIGSTOP, or held by a debugger): it does
    /// nothing until continued.
    pub all_stopped: bool,
    /// CPU time of the threads that run the node (a QEMU's vCPUs; an agent process's main
    /// thread, which beats) and their wait for a CPU, since they started; None when those
    /// threads cannot be told apart (a QEMU started without thread names).
    pub cpu: Option<::qemu::child::SchedStat>,
}

/// What a hypervisor reports about its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    Stopped,
    Resumed,
    Panicked(String),
    Shutdown(String),
}

/// A process an earlier hostd started, now under this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The VM was found paused.
    pub paused: bool,
    /// What was adopted, in words.
    pub note: String,
}

/// How `stop_all` ended each node.
pub type Stopped = Vec<(NodeId, String)>;

/// A signal `hostd kill` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Stop,
}

/// Errors of a backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot build the QEMU command line for node {node}")]
    Cmdline {
        node: String,
        #[source]
        source: Box<::qemu::CmdlineError>,
    },
    #[error("cannot give node {node} its NIC on the bridge")]
    Network {
        node: String,
        #[source]
        source: Box<crate::network::OpenTapError>,
    },
    #[error("cannot start node {node}")]
    Spawn {
        node: String,
        #[source]
        source: Box<::qemu::ChildError>,
    },
    #[error("QEMU for node {node} did not start")]
    Qmp {
        node: String,
        #[source]
        source: Box<::qemu::LaunchError>,
    },
    #[error("cannot take over node {node}'s running process")]
    Adopt {
        node: String,
        #[source]
        source: Box<::qemu::ChildError>,
    },
    #[error("node {node} is not running")]
    NotRunning { node: String },
    #[error("cannot signal node {node}")]
    Signal {
        node: String,
        #[source]
        source: Box<::qemu::ChildError>,
    },
    #[error("cannot kill and reap node {node}")]
    Fence {
        node: String,
        #[source]
        source: Box<::qemu::ChildError>,
    },
    #[error("node {node} has no QMP connection")]
    NoQmp { node: String },
    #[error("QMP `{command}` failed on node {node}")]
    QmpCommand {
        node: String,
        command: String,
        #[source]
        source: Box<::qemu::QmpError>,
    },
    #[error("node {node} refused `{command}`: {reply}")]
    Refused {
        node: String,
        command: String,
        reply: String,
    },
    #[error("cannot reach node {node}'s guest shell at {}", socket.display())]
    Shell {
        node: String,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {backend} backend cannot {what}")]
    Unsupported {
        backend: &'static str,
        what: &'static str,
    },
}

/// Nodes' processes and their control channels. Every method names the node; a backend
/// keeps one process per node at a time.
pub trait NodeBackend: std::fmt::Debug + Send {
    /// The backend's name for status ("tcg", "kvm", "process") and why it was chosen.
    fn accel(&self) -> (String, String);

    /// What a node's process is, in words ("QEMU", "agent process"), for reasons like
    /// "QEMU exited (...)".
    fn process_name(&self) -> &'static str;

    /// Starts node `node`'s process; returns its pid. A process the node had before must
    /// have ended (fenced or stopped).
    fn spawn(&mut self, node: NodeId, plan: &SpawnPlan) -> Result<u32, BackendError>;

    /// Waits until a spawned node's control channel answers (QMP; nothing for a process).
    fn connect(&mut self, node: NodeId) -> Result<(), BackendError>;

    /// Takes over the process an earlier hostd recorded for `node`.
    fn adopt(&mut self, node: NodeId, record: &RunRecord) -> Result<Adopted, BackendError>;

    /// Whether the node's process ended and what its hypervisor said, since the last poll.
    fn poll(&mut self, node: NodeId) -> Polled;

    /// How the node's process runs on the host now; None where the backend cannot tell or
    /// the process is gone. Called on every tick: it must be cheap.
    fn scheduling(&mut self, _node: NodeId) -> Option<Scheduling> {
        None
    }

    /// What hostd samples on every tick: [`poll`](Self::poll), and while the process has
    /// not exited, its [`scheduling`](Self::scheduling).
    fn sample(&mut self, node: NodeId) -> Polled {
        let mut polled = self.poll(node);
        if polled.exited.is_none() {
            polled.scheduling = self.scheduling(node);
        }
        polled
    }

    /// The pid of the node's process while it runs.
    fn pid(&self, node: NodeId) -> Option<u32>;

    /// Whether the node's process has ended (without reporting it: `poll` still does).
    fn has_exited(&mut self, node: NodeId) -> bool;

    /// Sends `signal` to the node's process.
    fn signal(&mut self, node: NodeId, signal: Signal) -> Result<(), BackendError>;

    /// Kills the node's process and reaps it: once this returns Ok it can write nothing
    /// more. Returns how it ended.
    fn fence(&mut self, node: NodeId, timeout: Duration) -> Result<String, BackendError>;

    /// Makes host port `port` lead to node `node`'s NBD server.
    fn forward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError>;

    /// Makes host port `port` no longer lead to node `node`.
    fn unforward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError>;

    /// The host ports leading to the node now, where the backend can tell (QEMU's
    /// forwards); None where the agents listen themselves.
    fn forwarded_ports(&mut self, node: NodeId) -> Option<Result<Vec<u16>, BackendError>>;

    /// Whether the agents listen on the identities' host ports themselves (the process
    /// backend): then a takeover command carries the port.
    fn agents_listen(&self) -> bool;

    /// Sets node `node`'s NICs of interconnect link `link` (one per peer in `peers`) up or
    /// down, where the backend has NICs; Ok(false) where it has none (the agent cuts the
    /// link, told through the control region).
    fn set_network_link(
        &mut self,
        _node: NodeId,
        _link: u16,
        _peers: &[u16],
        _up: bool,
    ) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Panics the guest's kernel.
    fn panic(&mut self, node: NodeId) -> Result<(), BackendError>;

    /// Kills only the agent, which its guest starts again; says what was done.
    fn kill_agent(&mut self, node: NodeId) -> Result<String, BackendError>;

    /// Stops every running node: asks each to go, waits for all on one deadline, kills
    /// what is left. Returns how each node ended.
    fn stop_all(&mut self, timeout: Duration) -> Stopped;

    /// Kills every node process (a failed launch).
    fn kill_all(&mut self);

    /// Lets every node process run on without this hostd (an adoption that went wrong:
    /// nothing may be killed on a guess).
    fn disown_all(&mut self);
}
