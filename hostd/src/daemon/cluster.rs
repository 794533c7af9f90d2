//! The cluster as hostd holds it: its nodes' health, who owns each identity (the control
//! region, which only hostd writes), the commands hostd gives the agents, and the
//! backend that runs the nodes. The steps that move identities are in `moves.rs`,
//! adoption after a restart in `adopt.rs`; both work through this type's methods. Keeping
//! in step with the coordinator is in `cluster/coordinator.rs`.

mod coordinator;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shm::node::{Ack, ack_status};
use shm::{Access, Command, CommandKind, ControlRegion, ControlWriter, Mapping, NodeRegion, Owner};
use wire::control::{ClusterStatus, DownReport, NodeState, NodeStatus};
use wire::events::Event;
use wire::state_dir::StateDir;

use super::backend::{BackendError, NodeBackend, NodePaths, SpawnPlan, WatchedNode};
use super::health::NodeHealth;
use super::metrics::{self, Metrics};
use super::prepare::{NodeFiles, RegionError};
use super::records::{self, RecordError};
use super::topology::{IdentityId, NodeId, Topology};
use crate::config::{Config, GUEST_NBD_PORT};
use crate::events::EventLog;
use crate::network::BridgeNetwork;
use crate::storage::{Ensured, Storage, StorageError};

/// How long a fenced node may take to die and be reaped.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long hostd waits, in all, for the nodes to quit on their own before killing them.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting the cluster up or starting a node.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot map region {path}")]
    Region {
        path: PathBuf,
        #[source]
        source: RegionError,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "node {node} cannot serve at 127.0.0.1:{port}: the port is taken (another program listens there?)"
    )]
    PortInUse {
        node: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record node {node}'s process for a restarted hostd")]
    Record {
        node: String,
        #[source]
        source: RecordError,
    },
    #[error("cannot register node {node}'s keys on its disks")]
    Storage {
        node: String,
        #[source]
        source: StorageError,
    },
    #[error(
        "node {node} is no member at the coordinator (another node claimed what it held) and cannot rejoin"
    )]
    Rejoin {
        node: String,
        #[source]
        source: StorageError,
    },
}

/// Errors giving an agent a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot write the control region")]
    Control(#[from] shm::ControlError),
    #[error("node {node} did not acknowledge command {seq} within {timeout:?}")]
    AckTimeout {
        node: String,
        seq: u64,
        timeout: Duration,
    },
    #[error("node {node} failed command {seq} (status {status}; see its console)")]
    AckFailed { node: String, seq: u64, status: u64 },
    #[error("node {node} died before it acknowledged command {seq}")]
    Died { node: String, seq: u64 },
    #[error(
        "the coordinator refused to move {identity} at epoch {epoch}: another node claimed while hostd was away: adopted generation {generation}"
    )]
    ClaimedMeanwhile {
        identity: String,
        epoch: u64,
        generation: u64,
    },
    #[error("the coordinator did not take the move of {identity} at epoch {epoch}; it waits")]
    CoordinatorSilent {
        identity: String,
        epoch: u64,
        #[source]
        source: crate::storage::StorageError,
    },
}

/// The running cluster.
#[derive(Debug)]
pub struct Cluster {
    config: Config,
    state: StateDir,
    topology: Topology,
    nodes: Vec<NodeHealth>,
    backend: Box<dyn NodeBackend>,
    control: ControlRegion,
    /// hostd is the control region's only writer.
    control_writer: ControlWriter,
    /// Seq of the last command issued to any node.
    command_seq: u64,
    files: Vec<NodeFiles>,
    control_path: PathBuf,
    started: Instant,
    events: EventLog,
    /// Each node's state at the last sample, to record transitions.
    last_states: Vec<NodeState>,
    /// Whether this hostd adopted running nodes rather than launching them.
    adopted: bool,
    /// Identities held away from home when this hostd launched the nodes: their owner
    /// started without their address, which must be re-established once it is up.
    addresses_pending: BTreeSet<IdentityId>,
    /// Takeovers whose taker serves the dead holder's log while it replays it.
    replays_pending: Vec<PendingReplay>,
    /// When each node last failed to take each identity over: it is passed over for a
    /// while, so the next node of the list gets its turn.
    refused_takeovers: BTreeMap<(IdentityId, NodeId), Instant>,
    /// Counts what `record` and `fence` see; the daemon serves them.
    metrics: Metrics,
    /// Bridge mode's network (the nodes' MACs for status); None in user mode.
    bridge: Option<BridgeNetwork>,
    /// The storage daemon serving the disks; None when QEMU or the agents open them.
    storage: Option<Box<dyn Storage>>,
    /// The interconnect links' states last seen, to record their changes.
    link_watch: super::interconnect::LinkWatch,
    /// What hostd knows of the coordinator (`cluster/coordinator.rs`).
    coordinator: coordinator::CoordinatorView,
    /// When hostd last published its presence in the control region.
    last_beat: Instant,
}

/// A takeover whose background replay hostd waits to see finish (to record it).
#[derive(Debug, Clone, Copy)]
pub struct PendingReplay {
    pub identity: IdentityId,
    pub taker: NodeId,
    pub dead: NodeId,
    pub epoch: u64,
    /// When the failure was detected.
    pub detected: Instant,
}

/// The files of each node's process, from the state directory.
pub fn node_paths(config: &Config, state: &StateDir) -> Vec<NodePaths> {
    config
        .nodes
        .iter()
        .map(|node| NodePaths {
            name: node.name.clone(),
            log: state.qemu_log(&node.name),
            qmp_socket: state.qmp_socket(&node.name),
            shell_socket: state.shell_socket(&node.name),
        })
        .collect()
}

fn map_node_region(path: &Path) -> Result<NodeRegion, LaunchError> {
    let region_error = |source: RegionError| LaunchError::Region {
        path: path.to_owned(),
        source,
    };
    let mapping = Mapping::open(path, Access::ReadOnly).map_err(|e| region_error(e.into()))?;
    NodeRegion::open(mapping).map_err(|e| region_error(e.into()))
}

impl Cluster {
    /// The cluster without any node process: regions mapped, control region opened.
    pub fn new(
        config: &Config,
        state: &StateDir,
        files: &[NodeFiles],
        control_path: &Path,
        backend: Box<dyn NodeBackend>,
    ) -> Result<Cluster, LaunchError> {
        let region_error = |source: RegionError| LaunchError::Region {
            path: control_path.to_owned(),
            source,
        };
        let control = Mapping::open(control_path, Access::ReadWrite)
            .map_err(|e| region_error(e.into()))
            .and_then(|m| ControlRegion::open(m).map_err(|e| region_error(e.into())))?;
        let control_writer = control.writer().map_err(|e| region_error(e.into()))?;
        let command_seq = (0..control.header().nodes.len())
            .filter_map(|i| control.command(i).map(|c| c.seq))
            .max()
            .unwrap_or(0);
        let monitor = heartbeat::Monitor::new(config.heartbeat.monitor_config());
        let topology = Topology::from_config(config);
        let mut nodes = Vec::new();
        for (node, node_config) in topology.nodes().zip(&config.nodes) {
            let region = map_node_region(&files[node.index()].region)?;
            let mut health = NodeHealth::new(
                node_config.name.clone(),
                node_config.nbd_port,
                state.console_log(&node_config.name),
                backend.process_name(),
                region,
                monitor.clone(),
            );
            // A state directory kept from an earlier run may have this identity with
            // another node: then that node serves its address.
            health.forwards_own_port = control
                .owner(node.home_identity().index())
                .is_none_or(|o| o.node.is_none_or(|n| n as usize == node.index()));
            nodes.push(health);
        }
        Ok(Cluster {
            config: config.clone(),
            state: state.clone(),
            topology,
            nodes,
            backend,
            control,
            control_writer,
            command_seq,
            files: files.to_vec(),
            control_path: control_path.to_owned(),
            started: Instant::now(),
            events: EventLog::new(&state.event_log()),
            last_states: vec![NodeState::Booting; config.nodes.len()],
            adopted: false,
            addresses_pending: BTreeSet::new(),
            replays_pending: Vec::new(),
            refused_takeovers: BTreeMap::new(),
            metrics: Metrics::default(),
            bridge: None,
            storage: None,
            link_watch: Default::default(),
            coordinator: Default::default(),
            last_beat: Instant::now(),
        })
    }

    /// The cluster counting into `metrics` (which the daemon serves).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_bridge(mut self, bridge: Option<BridgeNetwork>) -> Self {
        self.bridge = bridge;
        self
    }

    /// The cluster's disks served by `storage`, which runs already.
    pub fn with_storage(mut self, storage: Option<Box<dyn Storage>>) -> Self {
        self.storage = storage;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Boots every node. On any failure, whatever was started is killed before returning.
    pub fn launch(mut self) -> Result<Cluster, LaunchError> {
        let (accel, accel_reason) = self.backend.accel();
        self.record(&Event::PairStarting {
            accel,
            accel_reason,
        });
        // Before the nodes: they attach their disks and the coordinator at its sockets.
        self.check_storage();
        // What the agents claimed while no hostd ran decides who starts with what.
        self.adopt_coordinator();
        // hostd is here, before any agent starts.
        self.beat();
        if let Err(error) = records::save_config(&self.state, &self.config) {
            log::warn!(
                "a restarted hostd will not be able to adopt this cluster: {}",
                wire::error_chain::one_line(&error)
            );
        }
        for identity in self.topology.identities() {
            if let Some(owner) = self.owner_of(identity) {
                self.record_serving_started(identity, owner, self.epoch());
            }
        }
        // A node starts with its own identity's address only; one that holds another
        // node's identity (a move before the last `down`) gets that address once it is up.
        self.addresses_pending = self
            .topology
            .identities()
            .filter(|&identity| {
                self.owner_of(identity)
                    .is_some_and(|owner| owner != identity.home())
            })
            .collect();
        // A taken port would make the node (or its QEMU) fail after the launch, and the
        // takeover that follows fail the same way: refuse now, naming the port.
        let nodes: Vec<NodeId> = self.topology.nodes().collect();
        for &node in &nodes {
            for port in self.plan(node).ports {
                if let Err(source) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                    self.abandon_launch();
                    return Err(LaunchError::PortInUse {
                        node: self.topology.name(node).to_owned(),
                        port,
                        source,
                    });
                }
            }
        }
        // Every node starts before any control channel is awaited: they boot in parallel.
        for &node in &nodes {
            if let Err(error) = self.spawn_node(node) {
                self.abandon_launch();
                return Err(error);
            }
        }
        for &node in &nodes {
            if let Err(error) = self.connect_node(node) {
                self.abandon_launch();
                return Err(error);
            }
        }
        self.started = Instant::now();
        Ok(self)
    }

    /// A launch failed: whatever was started is killed, and the storage daemon, which
    /// serves no node then, is stopped (a daemon left running would be adopted by the next
    /// `up`, with the plan of this one).
    fn abandon_launch(&mut self) {
        self.backend.kill_all();
        if let Some(storage) = &mut self.storage {
            storage.stop();
        }
    }

    // --- What the cluster is ------------------------------------------------------------

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The interconnect links recorded as cut for `node` (bit `k`: link `k`).
    pub fn links_cut(&self, node: NodeId) -> u64 {
        self.control.links_cut(node.index())
    }

    /// Records the interconnect links cut for `node`; agents cut the links hostd cannot.
    pub fn set_links_cut(&mut self, node: NodeId, mask: u64) {
        // Every configured node has its word: a node id out of range is a bug, logged.
        if let Err(error) = self.control_writer.set_links_cut(node.index(), mask) {
            log::error!("cannot record node {node:?}'s cut links: {error}");
        }
    }

    /// Sets node `node`'s network link `link` up or down at its NICs, where the backend has
    /// NICs and the node runs; Ok(false) otherwise (its agent cuts it, or it is cut when the
    /// node starts).
    pub fn set_network_link(
        &mut self,
        node: NodeId,
        link: u16,
        up: bool,
    ) -> Result<bool, super::backend::BackendError> {
        if self.backend.pid(node).is_none() {
            return Ok(false);
        }
        let peers: Vec<u16> = self
            .topology
            .interconnect_peers(node)
            .iter()
            .map(|peer| peer.index() as u16)
            .collect();
        self.backend.set_network_link(node, link, &peers, up)
    }

    /// Cuts again, at the NICs of a node just started, the network links recorded as cut.
    fn reapply_link_cuts(&mut self, node: NodeId) {
        let mask = self.links_cut(node);
        for link in (0..self.config.interconnect.links).filter(|link| mask & (1 << link) != 0) {
            if let Err(error) = self.set_network_link(node, link, false) {
                log::warn!(
                    "node {}: cannot cut link {link} again: {}",
                    self.topology.name(node),
                    wire::error_chain::one_line(&error)
                );
            }
        }
    }

    /// Node `node`'s interconnect links to its peers, as its agent published them.
    pub fn links_of(&self, node: NodeId) -> Vec<wire::control::LinkStatus> {
        let peers: Vec<(NodeId, &str)> = self
            .topology
            .interconnect_peers(node)
            .into_iter()
            .map(|peer| (peer, self.topology.name(peer)))
            .collect();
        super::interconnect::links(
            &self.config.interconnect,
            &self.nodes[node.index()].region,
            &peers,
            self.links_cut(node),
        )
    }

    /// What node `node`'s interconnect test clients saw from each peer (when they run).
    pub fn link_clients_of(&self, node: NodeId) -> Vec<wire::control::LinkClientStatus> {
        if self.config.interconnect.stream_ms == 0
            && self.config.interconnect.ping_ms == 0
            && self.config.interconnect.bulk == 0
        {
            return Vec::new();
        }
        let region = &self.nodes[node.index()].region;
        self.topology
            .interconnect_peers(node)
            .into_iter()
            .filter_map(|peer| {
                let stats = region.link_clients(peer.index())?;
                Some(wire::control::LinkClientStatus {
                    peer: self.topology.name(peer).to_owned(),
                    stream_received: stats.stream_received,
                    stream_errors: stats.stream_errors,
                    stream_max_gap_us: stats.stream_max_gap_us,
                    pings: stats.pings,
                    ping_p50_us: stats.ping_p50_us,
                    ping_p99_us: stats.ping_p99_us,
                    bulk_bytes_in: stats.bulk_bytes_in,
                    stream_recent_gap_us: stats.stream_recent_gap_us,
                })
            })
            .collect()
    }

    /// Records every interconnect link that changed state on a node that is up.
    pub fn observe_links(&mut self) {
        if !self.config.interconnect.enabled() {
            return;
        }
        for node in self.topology.nodes() {
            if self.nodes[node.index()].state() != NodeState::Up {
                self.link_watch.forget(node.index());
                continue;
            }
            let links = self.links_of(node);
            let name = self.topology.name(node).to_owned();
            for event in self.link_watch.changes(node.index(), &name, &links) {
                self.record(&event);
            }
        }
    }

    pub fn node(&self, node: NodeId) -> &NodeHealth {
        &self.nodes[node.index()]
    }

    pub fn node_mut(&mut self, node: NodeId) -> &mut NodeHealth {
        &mut self.nodes[node.index()]
    }

    #[cfg(test)]
    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    pub fn backend_mut(&mut self) -> &mut dyn NodeBackend {
        self.backend.as_mut()
    }

    /// The node called `name`.
    pub fn node_named(&self, name: &str) -> Option<NodeId> {
        self.topology.node_named(name)
    }

    /// The host port of `identity`'s address.
    pub fn port(&self, identity: IdentityId) -> u16 {
        self.nodes[identity.home().index()].nbd_port
    }

    /// What hostd does by itself when nothing live can serve an identity.
    pub fn recovery(&self) -> &crate::config::RecoverySettings {
        &self.config.recovery
    }

    /// How often the main loop samples the nodes: often, since a sample is a few loads
    /// from shared memory and a `waitid`, and process death should be seen at once.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat.interval_ms.min(10))
    }

    /// The monitors' clock now: time since launch (set before the first sample).
    pub fn clock(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub fn set_adopted(&mut self) {
        self.adopted = true;
        self.last_states = self.nodes.iter().map(NodeHealth::state).collect();
    }

    // --- Ownership: the control region -------------------------------------------------

    pub fn epoch(&self) -> u64 {
        self.control.epoch()
    }

    /// Which node holds `identity` now.
    pub fn owner_of(&self, identity: IdentityId) -> Option<NodeId> {
        self.control
            .owner(identity.index())
            .and_then(|o| o.node)
            .and_then(|n| self.topology.node_at(n as usize))
    }

    /// Makes `node` the owner of `identity` at `epoch`, which becomes the cluster's epoch.
    /// With a coordinator the move is an `Assign` there first: a claim an agent won while
    /// hostd was away makes it fail, and hostd adopts that claim instead.
    pub fn set_owner(
        &mut self,
        identity: IdentityId,
        node: NodeId,
        epoch: u64,
    ) -> Result<(), CommandError> {
        self.assign(identity, node, epoch)?;
        self.control_writer.set_epoch(epoch);
        self.control_writer.set_owner(
            identity.index(),
            Owner {
                node: Some(node.index() as u32),
                epoch,
            },
        )?;
        Ok(())
    }

    /// Issues a command to `node`; returns its seq.
    pub fn issue(
        &mut self,
        node: NodeId,
        kind: CommandKind,
        identity: IdentityId,
        epoch: u64,
        argument: u64,
    ) -> Result<u64, CommandError> {
        self.command_seq += 1;
        let seq = self.command_seq;
        self.control_writer.issue(
            node.index(),
            Command {
                seq,
                kind,
                identity: identity.index() as u64,
                epoch,
                argument,
            },
        )?;
        log::info!(
            "command {seq} to {}: {kind:?} identity {} (epoch {epoch})",
            self.topology.name(node),
            self.topology.identity_name(identity)
        );
        Ok(seq)
    }

    /// Polls `node`'s acknowledgement until it names command `seq`; gives up at once if the
    /// node's process ends (its death is then seen by the next sample).
    pub fn await_ack(
        &mut self,
        node: NodeId,
        seq: u64,
        timeout: Duration,
    ) -> Result<Ack, CommandError> {
        let deadline = Instant::now() + timeout;
        let name = self.topology.name(node).to_owned();
        let name = || name.clone();
        loop {
            if let Some(ack) = self.nodes[node.index()].region.ack()
                && ack.command_seq == seq
            {
                return match ack.status {
                    ack_status::OK | ack_status::PARTIAL_REPLAY => Ok(ack),
                    status => Err(CommandError::AckFailed {
                        node: name(),
                        seq,
                        status,
                    }),
                };
            }
            if self.backend.has_exited(node) {
                return Err(CommandError::Died { node: name(), seq });
            }
            if Instant::now() >= deadline {
                return Err(CommandError::AckTimeout {
                    node: name(),
                    seq,
                    timeout,
                });
            }
            self.keep_beating();
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    // --- Processes ----------------------------------------------------------------------

    /// What node `node` needs to start.
    fn plan(&self, node: NodeId) -> SpawnPlan {
        let config = &self.config.nodes[node.index()];
        let watched = self
            .topology
            .watched_by(node)
            .into_iter()
            .map(|other| WatchedNode {
                name: self.topology.name(other).to_owned(),
                region: self.files[other.index()].region.clone(),
                disk: self.files[other.index()].disk.clone(),
                disk_socket: self.disk_socket(other, node),
            })
            .collect();
        let kernel_args = [self.config.qemu.kernel_args.as_str(), &config.kernel_args]
            .into_iter()
            .filter(|args| !args.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let mut options = self.config.agent_options_for(node.index());
        let coordinator_socket = self
            .storage
            .as_ref()
            .and_then(|s| s.coordinator_socket(node));
        if let Some(socket) = &coordinator_socket {
            // A guest reaches it through a virtio-serial port QEMU connects to the socket;
            // an agent process connects to it itself, and listens on the ports of the
            // identities it claims.
            if self.config.backend == crate::config::Backend::Qemu {
                options.coordinator = Some(wire::agent::CoordinatorAddress::Virtio);
            } else {
                options.coordinator = Some(wire::agent::CoordinatorAddress::Socket(socket.clone()));
                options.identity_ports = wire::agent::IdentityPorts(
                    self.config
                        .nodes
                        .iter()
                        .map(|n| (n.name.clone(), n.nbd_port))
                        .collect(),
                );
            }
        }
        if self.config.interconnect.enabled() {
            options.interconnect.peers = self
                .topology
                .interconnect_peers(node)
                .iter()
                .map(|peer| peer.index() as u16)
                .collect();
        }
        SpawnPlan {
            name: config.name.clone(),
            interconnect_dir: self.state.interconnect_dir(),
            options,
            region: self.files[node.index()].region.clone(),
            disk: self.files[node.index()].disk.clone(),
            disk_socket: self.disk_socket(node, node),
            coordinator_socket,
            watched,
            control_region: self.control_path.clone(),
            region_size: self.config.regions.node_mib << 20,
            control_size: self.control.header().region_size,
            regions_dir: self.state.regions_dir(),
            // The identity's address goes to this node unless another node holds it now.
            // Bridge mode forwards no host port: the agent holds the service IP.
            ports: if self.nodes[node.index()].forwards_own_port && !self.config.network.is_bridge()
            {
                vec![config.nbd_port]
            } else {
                Vec::new()
            },
            kernel_args,
            console: self.state.console_log(&config.name),
        }
    }

    /// The storage daemon's socket through which `node` attaches `owner`'s disk.
    fn disk_socket(&self, owner: NodeId, node: NodeId) -> Option<PathBuf> {
        let storage = self.storage.as_ref()?;
        storage.socket(self.topology.name(owner), node)
    }

    /// Starts `node`'s process and records it for a restarted hostd.
    pub fn spawn_node(&mut self, node: NodeId) -> Result<(), LaunchError> {
        // The daemon first: it may not have run since the last start.
        if let Err(error) = self.ensure_storage() {
            return Err(LaunchError::Storage {
                node: self.topology.name(node).to_owned(),
                source: error,
            });
        }
        self.rejoin_if_no_member(node)
            .map_err(|source| LaunchError::Rejoin {
                node: self.topology.name(node).to_owned(),
                source,
            })?;
        // A node starts with its keys on the disks it attaches (fence_scsi's unfence at
        // boot): after a fence, with a newer generation.
        self.register_keys(node)
            .map_err(|source| LaunchError::Storage {
                node: self.topology.name(node).to_owned(),
                source,
            })?;
        let plan = self.plan(node);
        let name = plan.name.clone();
        log::info!("starting node {name}");
        // A new start: what its previous process failed to do says nothing of this one.
        self.refused_takeovers
            .retain(|(_, taker), _| *taker != node);
        keep_previous_console(&plan.console);
        let before = self.nodes[node.index()].before_start();
        let pid = self.backend.spawn(node, &plan)?;
        // Without its record a restarted hostd could not adopt the node, and might take it
        // for dead: no node runs unrecorded.
        if let Err(source) = records::save_record(&self.state, &name, pid, before) {
            let _ = self.backend.fence(node, QUIT_TIMEOUT);
            return Err(LaunchError::Record { node: name, source });
        }
        self.nodes[node.index()].restarted(before);
        Ok(())
    }

    /// Waits until `node`'s control channel answers.
    pub fn connect_node(&mut self, node: NodeId) -> Result<(), LaunchError> {
        self.backend.connect(node)?;
        // A new QEMU's NICs are up: links cut before it started are cut again.
        self.reapply_link_cuts(node);
        Ok(())
    }

    /// Cuts `node` off its disks (its keys preempted), then kills and reaps it; only a
    /// confirmed death counts.
    pub fn fence(&mut self, node: NodeId) -> Result<(), BackendError> {
        let reason = self.nodes[node.index()].health_reason();
        let reason = if reason.is_empty() {
            "fenced".to_owned()
        } else {
            format!("fenced: {reason}")
        };
        self.fence_because(node, &reason)
    }

    /// [`Cluster::fence`] for `reason`.
    pub fn fence_because(&mut self, node: NodeId, reason: &str) -> Result<(), BackendError> {
        if let Err(error) = self.preempt_keys(node, None, reason) {
            // The kill that follows keeps a dead or killed process off the disks all the
            // same; only a fence that cannot kill depends on the preemption.
            log::error!(
                "cannot preempt node {}'s keys: {}",
                self.topology.name(node),
                wire::error_chain::one_line(&error)
            );
        }
        let fenced = self.backend.fence(node, FENCE_TIMEOUT);
        self.metrics
            .fenced(self.topology.name(node), fenced.is_ok());
        let how = fenced?;
        self.nodes[node.index()].fenced(&how);
        log::info!("node {} fenced: {how}", self.topology.name(node));
        self.record_serving_ended_all(node, "fenced");
        Ok(())
    }

    /// Fences `node` at the storage only (`hostd fence --keep-running`): its keys are
    /// preempted, its process keeps running, and it counts as fenced, so its identities
    /// move on. Needs the storage daemon: without it nothing would stop the node writing.
    pub fn fence_at_storage(&mut self, node: NodeId, reason: &str) -> Result<(), StorageError> {
        // A daemon that runs for the coordinator alone (process backend) fences no disk.
        if !self.storage.as_ref().is_some_and(|s| s.serves_disks()) {
            return Err(StorageError::NoDaemon);
        }
        self.preempt_keys(node, None, reason)?;
        // Its addresses go with its identities: the takers get them. (Bridge mode: its
        // agent drops the service IPs once it sees the identities owned elsewhere.)
        let held: Vec<IdentityId> = self
            .topology
            .identities()
            .filter(|&identity| self.owner_of(identity) == Some(node))
            .collect();
        for identity in held {
            if let Err(error) = self.unforward(node, identity) {
                log::warn!(
                    "cannot take {}'s address from node {}: {}",
                    self.topology.identity_name(identity),
                    self.topology.name(node),
                    wire::error_chain::one_line(&error)
                );
            }
        }
        self.nodes[node.index()].fenced(&format!("{reason}; its process keeps running"));
        self.nodes[node.index()].kept_running = true;
        log::warn!(
            "node {} fenced at the storage; its process keeps running",
            self.topology.name(node)
        );
        self.record_serving_ended_all(node, "fenced at the storage");
        Ok(())
    }

    /// After an adoption: a running node without a key on its own disk was cut off at the
    /// storage by an earlier hostd and never killed (`fence --keep-running`, or a hostd that
    /// died between the preemption and the kill). It counts as fenced and kept running
    /// again, so its identities move and `unfence` stops it before registering it.
    pub fn reconcile_fences(&mut self) {
        let Some(disks) = self.storage.as_ref().and_then(|s| s.status().ok()) else {
            return;
        };
        for node in self.topology.nodes() {
            let name = self.topology.name(node).to_owned();
            let Some(disk) = disks.iter().find(|d| d.name == name) else {
                continue;
            };
            // A disk nobody is registered on is one the daemon never served (a cluster
            // started before it, or a reservations file lost): nothing to conclude.
            if disk.registered.is_empty() {
                continue;
            }
            let keyed = disk
                .registered
                .iter()
                .any(|k| k.node == node.index() as u32);
            let health = &mut self.nodes[node.index()];
            if !keyed && !health.fenced && self.backend.pid(node).is_some() {
                log::warn!(
                    "node {name} has no key on its disk: fenced at the storage, kept running"
                );
                health.fenced(
                    "its keys were preempted before hostd restarted; its process keeps running",
                );
                health.kept_running = true;
                self.record_serving_ended_all(node, "fenced at the storage");
            }
        }
    }

    /// Waits until `node`'s agent says, in its region, that it stopped serving `identity`
    /// at `epoch` or later; false after `timeout`.
    pub fn await_stopped_serving(
        &mut self,
        node: NodeId,
        identity: IdentityId,
        epoch: u64,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let stopped = self.nodes[node.index()].region.stopped_serving();
            if stopped.is_some_and(|s| s.identity as usize == identity.index() && s.epoch >= epoch)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.keep_beating();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Registers `node`'s keys on the disks it attaches (no storage daemon: nothing to do).
    pub fn register_keys(&mut self, node: NodeId) -> Result<(), StorageError> {
        self.ensure_storage()?;
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        let registered = storage.register(node)?;
        for disk in registered {
            let generation = disk
                .registered
                .iter()
                .find(|k| k.node == node.index() as u32)
                .map_or(0, |k| k.generation);
            let event = Event::DiskRegistered {
                node: self.topology.name(node).to_owned(),
                generation,
                holder: disk.holder.and_then(|h| self.node_name_at(h)),
                disk: disk.name,
            };
            self.record(&event);
        }
        Ok(())
    }

    /// Removes `victim`'s keys from every disk (preempted by `by` where it may), so its
    /// writes fail at the device from now on; records an event per disk.
    pub fn preempt_keys(
        &mut self,
        victim: NodeId,
        by: Option<NodeId>,
        reason: &str,
    ) -> Result<(), StorageError> {
        self.ensure_storage()?;
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        let preempted = storage.preempt(victim, by)?;
        for (by, disk) in preempted {
            let event = Event::DiskPreempted {
                node: self.topology.name(victim).to_owned(),
                by: self.node_name_at(by).unwrap_or_default(),
                holder: disk.holder.and_then(|h| self.node_name_at(h)),
                reason: reason.to_owned(),
                disk: disk.name,
            };
            self.record(&event);
        }
        Ok(())
    }

    /// The name of the node at index `index` (as the storage daemon names nodes).
    fn node_name_at(&self, index: u32) -> Option<String> {
        let node = self.topology.node_at(index as usize)?;
        Some(self.topology.name(node).to_owned())
    }

    /// Makes sure the storage daemon runs, starting (or adopting) it if need be, and
    /// records that when it happens; without a daemon, nothing to do.
    fn ensure_storage(&mut self) -> Result<(), StorageError> {
        let Some(storage) = &mut self.storage else {
            return Ok(());
        };
        let (pid, adopted) = match storage.ensure_running()? {
            Ensured::Running => return Ok(()),
            Ensured::Adopted { pid } => (pid, true),
            Ensured::Started { pid } => (pid, false),
        };
        self.record(&Event::StorageStarted { pid, adopted });
        Ok(())
    }

    /// Restarts the storage daemon if it died or hung (QEMU reconnects to it by itself).
    pub fn check_storage(&mut self) {
        if let Err(error) = self.ensure_storage() {
            log::error!(
                "the storage daemon is not running and cannot be started: {}",
                wire::error_chain::one_line(&error)
            );
        }
    }

    /// Every disk's reservation, by the daemon; empty without one (or when it does not
    /// answer: status must not fail for it).
    fn disk_statuses(&self) -> Vec<wire::control::DiskStatus> {
        let disks = self
            .storage
            .as_ref()
            .and_then(|s| s.status().ok())
            .unwrap_or_default();
        disks
            .into_iter()
            .map(|disk| wire::control::DiskStatus {
                holder: disk.holder.and_then(|h| self.node_name_at(h)),
                registered: disk
                    .registered
                    .iter()
                    .filter_map(|k| self.node_name_at(k.node))
                    .collect(),
                generation: disk.generation,
                name: disk.name,
            })
            .collect()
    }

    /// Points `identity`'s host port at `node`.
    pub fn forward(&mut self, node: NodeId, identity: IdentityId) -> Result<(), BackendError> {
        self.backend.forward(node, self.port(identity))?;
        if node == identity.home() {
            self.nodes[node.index()].forwards_own_port = true;
        }
        self.addresses_pending.remove(&identity);
        Ok(())
    }

    /// Watches for the end of a takeover's background replay (see `finished_replays`).
    pub fn expect_replay(&mut self, pending: PendingReplay) {
        self.replays_pending.push(pending);
    }

    /// `taker` failed to take `identity` over.
    pub fn note_refused_takeover(&mut self, identity: IdentityId, taker: NodeId) {
        self.refused_takeovers
            .insert((identity, taker), Instant::now());
    }

    /// Whether `taker` failed to take `identity` over within `within`.
    pub fn refused_takeover_lately(
        &self,
        identity: IdentityId,
        taker: NodeId,
        within: Duration,
    ) -> bool {
        self.refused_takeovers
            .get(&(identity, taker))
            .is_some_and(|at| at.elapsed() < within)
    }

    /// The node replaying `dead`'s log now, if hostd knows of one (a takeover from it whose
    /// replay has not been reported finished).
    pub fn replaying_taker(&self, dead: NodeId) -> Option<NodeId> {
        self.replays_pending
            .iter()
            .find(|pending| pending.dead == dead && !self.nodes[pending.taker.index()].fenced)
            .map(|pending| pending.taker)
    }

    /// The pending replays that have finished, with what the taker published; forgets
    /// them, and those whose taker was fenced meanwhile (its successor replays again).
    pub fn finished_replays(&mut self) -> Vec<(PendingReplay, shm::Replay)> {
        let mut finished = Vec::new();
        let nodes = &self.nodes;
        self.replays_pending.retain(|pending| {
            let taker = &nodes[pending.taker.index()];
            if taker.fenced {
                return false;
            }
            match taker.region.replay_of(pending.dead.index() as u32) {
                Some(replay) if replay.status.finished() && replay.epoch >= pending.epoch => {
                    finished.push((*pending, replay));
                    false
                }
                _ => true,
            }
        });
        finished
    }

    /// Gives up re-establishing `identity`'s address (the attempt failed and was reported).
    pub fn forget_pending_address(&mut self, identity: IdentityId) {
        self.addresses_pending.remove(&identity);
    }

    /// The identities whose owner has yet to get their address (see `launch`).
    pub fn addresses_pending(&self) -> Vec<IdentityId> {
        self.addresses_pending.iter().copied().collect()
    }

    /// Takes `identity`'s host port away from `node`.
    pub fn unforward(&mut self, node: NodeId, identity: IdentityId) -> Result<(), BackendError> {
        self.backend.unforward(node, self.port(identity))?;
        if node == identity.home() {
            self.nodes[node.index()].forwards_own_port = false;
        }
        Ok(())
    }

    /// The pid of `node`'s process while it runs.
    pub fn pid(&self, node: NodeId) -> Option<u32> {
        self.backend.pid(node)
    }

    // --- Watching -----------------------------------------------------------------------

    /// Samples every node (fenced ones are done with), records each state change as an
    /// event, and returns the nodes that went Down in this sample.
    pub fn sample(&mut self) -> Vec<NodeId> {
        let now = Instant::now();
        let clock = self.clock(now);
        let mut down = Vec::new();
        for node in self.topology.nodes() {
            let health = &mut self.nodes[node.index()];
            if !health.fenced && health.started {
                let polled = self.backend.sample(node);
                if health.sample(polled, now, clock) {
                    down.push(node);
                }
            }
            let state = health.state();
            let last = &mut self.last_states[node.index()];
            if state != *last {
                let detail = format!(
                    "{}vm {}, heartbeat {}, boot id {:#018x}",
                    match health.health_reason() {
                        reason if reason.is_empty() => String::new(),
                        reason => format!("{reason}; "),
                    },
                    health.vm_description(),
                    health.heartbeat(),
                    health.region.boot_id()
                );
                let event = Event::NodeState {
                    node: health.name.clone(),
                    from: *last,
                    to: state,
                    detail,
                };
                *last = state;
                self.events.record(&event);
            }
        }
        down
    }

    /// The cluster as `hostd status` shows it.
    pub fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let names = &self.control.header().nodes;
        let nodes = self
            .topology
            .nodes()
            .map(|node| {
                let health = &self.nodes[node.index()];
                let identity = node.home_identity();
                let owner = self.owner_of(identity);
                // Who takes the identity over if its holder dies: the first node of the
                // holder's list that is not dead (hostd takes the first live one).
                let holder = owner.unwrap_or(node);
                let next_taker = self.topology.next_taker(holder, |taker| {
                    !matches!(
                        self.nodes[taker.index()].state(),
                        NodeState::Down | NodeState::Fenced
                    )
                });
                let peer = health.region.peer().unwrap_or_default();
                // One snapshot: read apart, a live flusher can make flushed pass head.
                let cursors = health.region.log_cursors().ok();
                let served_by = owner.and_then(|n| names.get(n.index()).cloned());
                let service_ip = self
                    .bridge
                    .as_ref()
                    .and_then(|_| self.config.nodes.get(node.index())?.service_ip);
                let served_by_state = owner
                    .and_then(|n| self.nodes.get(n.index()))
                    .map(NodeHealth::state);
                // What a dead agent last published is no longer true.
                let live = health.state() == NodeState::Up;
                let service = live
                    .then(|| health.region.service())
                    .flatten()
                    .unwrap_or_default();
                let full_since_ns = health.region.stats().log_full_since_unix_ns;
                let log_full_ms = (live && full_since_ns != 0).then(|| {
                    // The agent's clock; a guest's may differ a little from the host's.
                    (wire::time::now_unix_us() * 1000).saturating_sub(full_since_ns) / 1_000_000
                });
                let (takeover_possible, takeover_reason) = match (owner, next_taker) {
                    (Some(owner), Some(taker)) if owner == node => {
                        takeover_readiness(health, &self.nodes[taker.index()])
                    }
                    (Some(owner), None) if owner == node => {
                        (false, "no other node may take it over".to_owned())
                    }
                    (Some(owner), _) => (
                        false,
                        format!(
                            "{} does not hold its identity now ({} does)",
                            health.name,
                            self.topology.name(owner)
                        ),
                    ),
                    (None, _) => (
                        false,
                        format!("{} does not hold its identity now", health.name),
                    ),
                };
                NodeStatus {
                    name: health.name.clone(),
                    next_taker: next_taker
                        .map(|p| self.topology.name(p).to_owned())
                        .unwrap_or_default(),
                    state: health.state(),
                    health: health.health_reason(),
                    vm: health.vm_description(),
                    pid: self.backend.pid(node),
                    heartbeat: health.heartbeat(),
                    heartbeat_age_ms: health.heartbeat_age(now).map(|d| d.as_millis() as u64),
                    boot_id: health.region.boot_id(),
                    peer_boot_id: peer.boot_id,
                    peer_heartbeat: peer.heartbeat,
                    head_seq: cursors.map(|(_, head)| head.seq),
                    last_ack_seq: health.region.ack().map_or(0, |a| a.command_seq),
                    flushed_seq: cursors.map(|(flushed, _)| flushed.seq),
                    served_by,
                    served_by_state,
                    nbd_connections: service.nbd_connections,
                    nbd_refused: service.nbd_refused,
                    nbd_idle_closed: service.nbd_idle_closed,
                    log_full_ms,
                    writes_waiting: service.writes_waiting,
                    nbd: match service_ip {
                        Some(ip) => format!("nbd://{}:{GUEST_NBD_PORT}/{}", ip.addr(), health.name),
                        None => format!("nbd://127.0.0.1:{}/{}", health.nbd_port, health.name),
                    },
                    service_ip: service_ip.map(|ip| ip.addr().to_string()),
                    // A holder that is not up holds nothing: its guest (and NIC) is gone
                    // or about to be.
                    service_mac: self
                        .bridge
                        .as_ref()
                        .zip(owner)
                        .filter(|_| served_by_state == Some(NodeState::Up))
                        .map(|(bridge, holder)| bridge.mac(holder.index())),
                    stopped_serving: health
                        .region
                        .stopped_serving()
                        .filter(|stopped| {
                            // Only while the move it reports is the latest of that identity.
                            self.control
                                .owner(stopped.identity as usize)
                                .is_some_and(|o| {
                                    o.node != Some(node.index() as u32) && o.epoch == stopped.epoch
                                })
                        })
                        .map(|stopped| {
                            format!(
                                "stopped serving {} at epoch {}: {}",
                                names
                                    .get(stopped.identity as usize)
                                    .map_or("?", String::as_str),
                                stopped.epoch,
                                stopped.reason.describe()
                            )
                        }),
                    ejected: self.backend.pid(node).and_then(|_| self.ejection_of(node)),
                    links: self.links_of(node),
                    link_clients: self.link_clients_of(node),
                    takeover_possible,
                    takeover_reason,
                    console: health.console.display().to_string(),
                }
            })
            .collect();
        let (accel, accel_reason) = self.backend.accel();
        ClusterStatus {
            epoch: self.epoch(),
            state_dir: self.state.root().display().to_string(),
            hostd_pid: std::process::id(),
            accel,
            accel_reason,
            uptime_s: self.started.elapsed().as_secs_f64(),
            adopted: self.adopted,
            metrics: self.metrics.endpoint().to_owned(),
            nodes,
            storage_pid: self.storage.as_ref().and_then(|s| s.pid()),
            disks: self.disk_statuses(),
            coordinator_generation: self.coordinator_state().map(|s| s.generation),
            non_members: self.non_members(),
            unadopted_claims: self.unadopted_claims(),
        }
    }

    // --- Stopping -----------------------------------------------------------------------

    /// Stops every node: asks each to go, then waits for all of them on one deadline and
    /// kills whatever is left.
    pub fn shut_down(&mut self, purge: bool) -> DownReport {
        // The nodes stop one after the other: none may take the others over meanwhile.
        self.stop_beating();
        let stopped: Vec<(String, String)> = self
            .backend
            .stop_all(QUIT_TIMEOUT)
            .into_iter()
            .map(|(node, how)| {
                // hostd's own words for an earlier end: "fenced by hostd (...)" or
                // "exited: ..." say more than the bare status the backend kept.
                let how = match (
                    &self.nodes[node.index()].exit,
                    how.strip_prefix("had already "),
                ) {
                    (Some(exit), Some(_)) => format!("had already {exit}"),
                    _ => how,
                };
                let name = self.topology.name(node).to_owned();
                log::info!("node {name}: {how}");
                records::remove_record(&self.state, &name);
                (name, how)
            })
            .collect();
        for identity in self.topology.identities() {
            if let Some(owner) = self.owner_of(identity)
                && !self.nodes[owner.index()].fenced
            {
                self.record_serving_ended(identity, owner, "stopped");
            }
        }
        self.record(&Event::PairStopped {
            stopped: stopped.clone(),
        });
        // After the guests: nothing writes the disks any more.
        if let Some(storage) = &mut self.storage {
            storage.stop();
        }
        let purged = if purge {
            self.purge()
        } else {
            self.sync_disks();
            false
        };
        DownReport { stopped, purged }
    }

    /// Leaves every node process running without this hostd.
    pub fn disown_all(&mut self) {
        self.backend.disown_all();
    }

    /// Syncs the disk images to their media: agents may have left released writes in the
    /// host's page cache (`flusher.release = "host"`), and after a clean `down` everything
    /// the cluster released should be on the media, not only in memory.
    fn sync_disks(&self) {
        for files in &self.files {
            // fdatasync needs no write access.
            let synced = std::fs::File::open(&files.disk).and_then(|disk| disk.sync_data());
            if let Err(error) = synced {
                log::warn!("cannot sync disk {}: {error}", files.disk.display());
            }
        }
    }

    fn purge(&self) -> bool {
        let disks: Vec<PathBuf> = self.files.iter().map(|f| f.disk.clone()).collect();
        super::prepare::purge(&self.state, &disks)
    }

    // --- Events -------------------------------------------------------------------------

    pub fn record(&self, event: &Event) {
        self.events.record(event);
        self.metrics
            .observe(event, &metrics::move_facts(self, event));
    }

    /// Node `node` may serve `identity` from now on: recorded before it is told to.
    pub fn record_serving_started(&self, identity: IdentityId, node: NodeId, epoch: u64) {
        self.record(&Event::ServingStarted {
            identity: self.topology.identity_name(identity).to_owned(),
            node: self.topology.name(node).to_owned(),
            epoch,
        });
    }

    pub fn record_serving_ended(&self, identity: IdentityId, node: NodeId, reason: &str) {
        self.record(&Event::ServingEnded {
            identity: self.topology.identity_name(identity).to_owned(),
            node: self.topology.name(node).to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// Records the end of serving for every identity `node` holds now.
    pub fn record_serving_ended_all(&self, node: NodeId, reason: &str) {
        for identity in self.topology.identities() {
            if self.owner_of(identity) == Some(node) {
                self.record_serving_ended(identity, node, reason);
            }
        }
    }

    /// Logs and records a move of `identity` to `to` that failed.
    pub fn record_failure(
        &self,
        identity: IdentityId,
        to: NodeId,
        reason: &str,
        error: &dyn std::error::Error,
    ) {
        let chain = wire::error_chain::one_line(error);
        let (identity, to) = (
            self.topology.identity_name(identity),
            self.topology.name(to),
        );
        log::error!("moving {identity} to {to} failed: {chain}");
        self.record(&Event::MoveFailed {
            node: identity.to_owned(),
            to: to.to_owned(),
            reason: reason.to_owned(),
            error: chain,
        });
    }
}

/// Keeps the last boot's console as `NAME.previous.log`: the new boot's QEMU truncates
/// `NAME.log`, and the crashed boot's last lines are what explain the crash.
fn keep_previous_console(console: &Path) {
    if console.metadata().is_ok_and(|m| m.len() > 0) {
        let previous = console.with_extension("previous.log");
        if let Err(error) = std::fs::rename(console, &previous) {
            log::warn!(
                "cannot keep the previous console {} as {}: {error}",
                console.display(),
                previous.display()
            );
        }
    }
}

/// Whether `taker` could take `node`'s identity (which `node` holds) over now, and why not.
fn takeover_readiness(node: &NodeHealth, taker: &NodeHealth) -> (bool, String) {
    let taker_state = taker.state();
    if taker_state != NodeState::Up {
        return (
            false,
            format!("taker {} is {}", taker.name, taker_state.as_str()),
        );
    }
    // The taker maps the region when its agent starts, so a takeover works whether or not
    // it has read this boot of the node yet (right after `up` it may not have); but it
    // must have the region at all.
    let Some(peer) = taker.region.peer_of(node.region.header().node_id) else {
        return (
            false,
            format!(
                "taker {} has not read {}'s region yet",
                taker.name, node.name
            ),
        );
    };
    let reads = peer.boot_id != 0 && peer.boot_id == node.region.boot_id();
    (
        true,
        if reads {
            format!("taker {} is up and reads its region", taker.name)
        } else {
            format!(
                "taker {} is up; it has not read {}'s region since {} started",
                taker.name, node.name, node.name
            )
        },
    )
}
