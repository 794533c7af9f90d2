//! The cluster configuration: a TOML file whose every field has a default, so `hostd up`
//! needs no file at all.
//!
//! ```toml
//! backend = "qemu"          # qemu | process (agents as host processes, for tests)
//!
//! [qemu]
//! binary = "qemu-system-x86_64"
//! accel = "auto"            # auto | kvm | tcg
//! memory_mib = 256
//! cpus = 1
//! kernel = "target/guest/vmlinuz"             # default: the image scripts/build-guest-image.sh makes
//! initrd = "target/guest/initramfs.cpio.gz"
//! kernel_args = ""          # appended to the guest kernel command line
//!
//! [regions]
//! node_mib = 64             # each node's NVRAM region
//!
//! [disks]
//! size_mib = 1024           # sparse images, created once and never truncated
//! dir = "/var/lib/ivha"     # default: STATE_DIR/disks
//! served_by = "blkd"        # blkd: the storage daemon, with reservations (docs/storage.md);
//!                           # qemu: each QEMU opens the images itself (no I/O fencing)
//!
//! [heartbeat]
//! interval_ms = 100
//! timeout_ms = 3000         # the most a silent heartbeat is given (the ceiling)
//! detector = "phi"          # phi | fixed: judge a silence by the node's own intervals, or only by timeout_ms
//! phi_threshold = 8.0       # phi: Down when a live node would be this late once in 10^8
//! min_timeout_ms = 1000     # phi: never Down on a silence shorter than this (the floor;
//!                           # default 1000, or twice interval_ms if more, at most timeout_ms)
//!
//! [nbd]
//! poll_us = 50              # after a reply, poll for the next request this long before blocking
//! max_connections = 128     # per export; clients over it are refused and counted
//! max_negotiating = 32      # connections that have not chosen an export yet
//! idle_timeout_s = 0        # close a connection idle this long (0: never)
//!
//! [recovery]
//! restart_limit = 5         # restarts of a fenced node when nothing live can serve (0: off)
//! restart_window_s = 600    # ... counted over this window
//! restart_backoff_ms = 1000 # the pause before the second restart; doubles, at most a minute
//!
//! [flusher]
//! release = "host"          # host | media: when a logged write leaves the log (below)
//! sync_interval_ms = 1000   # release = "host", process backend: disks synced this often
//! delay_ms = 0              # > 0 keeps records unflushed for a while (demos, tests)
//! paused = false            # true: nothing is flushed (replay tests)
//!
//! [metrics]
//! enabled = true            # serve Prometheus metrics (docs/metrics.md)
//! listen = "127.0.0.1:9187" # IP address and port of http://ADDRESS/metrics
//!
//! [network]                 # user (default) | bridge: see config/network.rs, docs/network.md
//! mode = "user"
//!
//! [interconnect]           # links between the agents: see config/interconnect.rs, docs/interconnect.md
//! links = 2                 # point-to-point network links between every two nodes (0 to 3)
//! mailbox = true            # and the shared-memory mailbox as one more
//! heartbeat_ms = 50         # two silent intervals: degraded; three: down
//!
//! [failover]                # takeovers while hostd is away: see config/failover.rs, docs/takeover.md
//! without_hostd = true      # agents claim a dead peer at the coordinator (bridge mode, process backend)
//! hostd_absent_ms = 1500    # hostd's presence standing still this long: hostd is away (500 to 600000)
//! peer_dead_ms = 1000       # a peer silent this long, every link down: dead (default: heartbeat's floor)
//!
//! [[node]]
//! name = "a"
//! nbd_port = 10809
//! kernel_args = ""          # this node only, e.g. "ivha.debug=1"
//! [[node]]
//! name = "b"
//! nbd_port = 10810
//! ```
//!
//! A cluster has 2 to 8 nodes. Each node's `takeover_by` lists the nodes that may take its
//! identity over, most preferred first; by default all the other nodes in ring order
//! after it (with nodes a, b, c: a's is `["b", "c"]`, b's `["c", "a"]`, c's `["a", "b"]`):
//!
//! ```toml
//! [[node]]
//! name = "a"
//! nbd_port = 10809
//! takeover_by = ["b"]       # only b may take a's identity over
//! ```
//!
//! `flusher.release`: a logged write may leave the log (its ring space reused) once the disk
//! holds it as durably as the log does. With `"host"` and the process backend that is as
//! soon as it is written to the disk image (the host's page cache survives whatever the
//! tmpfs region survives), and the agents sync the disks to their media every
//! `sync_interval_ms`; a host crash loses what came after the last sync. A guest's page
//! cache dies with the guest, so in a guest a write leaves the log only once synced.
//! `"media"` does that everywhere: a host crash then loses only the log's unflushed
//! records, and write IOPS are bounded by the disk.

mod failover;
mod interconnect;
mod network;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wire::agent::{AgentOptions, Release};
use wire::interconnect::InterconnectOptions;
use wire::network::{Ipv4Net, ServiceIps};

pub use failover::FailoverConfig;
pub use interconnect::InterconnectConfig;
pub use network::{NetworkConfig, NetworkMode};

/// Errors loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Where the nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Each node is a QEMU guest (the real thing).
    #[default]
    Qemu,
    /// Each node's agent runs as a host process over the same region files and disk
    /// images: for fast tests and machines without QEMU. No fencing of a guest, no VM.
    Process,
}

/// Which accelerator to run guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM where the CPU and a probe allow it, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accel: AccelSetting,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guest kernel; default: the image built by `scripts/build-guest-image.sh`.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Appended to the guest kernel command line.
    pub kernel_args: String,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelSetting::Auto,
            memory_mib: 256,
            cpus: 1,
            kernel: None,
            initrd: None,
            kernel_args: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionConfig {
    /// Size of each node's region in MiB (a power of two: ivshmem BARs are).
    pub node_mib: u64,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self { node_mib: 64 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    pub size_mib: u64,
    /// Where disk images live; default `STATE_DIR/disks`. Put them on real storage: the
    /// state directory is usually tmpfs.
    pub dir: Option<PathBuf>,
    /// Who serves the images to QEMU guests. (Agents of the process backend open them
    /// themselves.)
    pub served_by: DiskServer,
}

/// Who serves the disk images to QEMU guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskServer {
    /// The storage daemon (`ivha-blkd`) over vhost-user-blk, with a reservation per disk:
    /// a fenced node's writes fail at the device.
    #[default]
    Blkd,
    /// Each QEMU opens the images itself (`file.locking=off`): only the kill keeps a
    /// fenced node off a disk.
    Qemu,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            size_mib: 1024,
            dir: None,
            served_by: DiskServer::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    pub interval_ms: u64,
    /// A heartbeat older than this counts as missed, whatever the detector says (the
    /// ceiling). Generous by default: a TCG guest on a busy host can stall for a second
    /// without being dead.
    pub timeout_ms: u64,
    /// How a silence shorter than `timeout_ms` is judged.
    pub detector: DetectorKind,
    /// `phi`: the phi at which a silence means Down. 8 is one chance in 10^8 that a live
    /// node with the intervals seen so far would be this late (Akka's default).
    pub phi_threshold: f64,
    /// `phi`: no silence shorter than this makes a node Down (the floor). Unset: 1000 ms
    /// ([`DEFAULT_MIN_TIMEOUT_MS`]), or twice `interval_ms` if that is more, and at most
    /// `timeout_ms`.
    pub min_timeout_ms: Option<u64>,
}

/// The floor of the phi detector unless configured. The longest heartbeat gap of a live
/// TCG guest measured here, with both guests under full write load and both host cores
/// busy, was well under it (docs/takeover.md); with 100 ms beats it leaves a hung agent
/// caught in under a second.
pub const DEFAULT_MIN_TIMEOUT_MS: u64 = 1000;

/// How hostd judges a heartbeat silence shorter than the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorKind {
    /// Phi accrual over each node's observed intervals, between `min_timeout_ms` and
    /// `timeout_ms`.
    #[default]
    Phi,
    /// Down at `timeout_ms`, never sooner (process exit and stop are still seen at once).
    Fixed,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: 100,
            timeout_ms: 3000,
            detector: DetectorKind::Phi,
            phi_threshold: 8.0,
            min_timeout_ms: None,
        }
    }
}

impl HeartbeatConfig {
    /// The phi detector's floor: as configured, else the default (see `min_timeout_ms`).
    pub fn min_timeout_ms(&self) -> u64 {
        self.min_timeout_ms.unwrap_or_else(|| {
            DEFAULT_MIN_TIMEOUT_MS
                .max(2 * self.interval_ms)
                .min(self.timeout_ms)
        })
    }

    /// The liveness monitor's settings.
    pub fn monitor_config(&self) -> heartbeat::Config {
        let interval = std::time::Duration::from_millis(self.interval_ms);
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        match self.detector {
            DetectorKind::Fixed => heartbeat::Config::new(interval, timeout),
            DetectorKind::Phi => heartbeat::Config::phi(
                interval,
                std::time::Duration::from_millis(self.min_timeout_ms()),
                timeout,
                self.phi_threshold,
            ),
        }
    }

    /// Checks the settings against each other.
    fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 || self.timeout_ms < 2 * self.interval_ms {
            return Err(format!(
                "heartbeat: interval_ms {} must be positive and timeout_ms {} at least twice it",
                self.interval_ms, self.timeout_ms
            ));
        }
        if self.detector == DetectorKind::Fixed {
            return Ok(());
        }
        if !(1.0..=16.0).contains(&self.phi_threshold) {
            return Err(format!(
                "heartbeat.phi_threshold {} must be from 1 to 16 (8 is one false alarm in 10^8 late beats)",
                self.phi_threshold
            ));
        }
        // Below two intervals a single late beat would be a failure.
        match self.min_timeout_ms {
            Some(floor) if floor < 2 * self.interval_ms || floor > self.timeout_ms => Err(format!(
                "heartbeat.min_timeout_ms {floor} must be from twice interval_ms ({}) to timeout_ms ({})",
                2 * self.interval_ms,
                self.timeout_ms
            )),
            _ => Ok(()),
        }
    }
}

/// What hostd does on its own when no live node can serve an identity.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoverySettings {
    /// How many times within `restart_window_s` hostd restarts a fenced node by itself
    /// when no live node could take over what it (or its taker) held; 0 turns that off
    /// (then `hostd giveback NODE` restarts it). Restarts back off: the first at once,
    /// then after `restart_backoff_ms`, twice that, and so on (at most a minute).
    /// `hostd giveback NODE` resets the count.
    pub restart_limit: u32,
    pub restart_window_s: u64,
    pub restart_backoff_ms: u64,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        Self {
            restart_limit: 5,
            restart_window_s: 600,
            restart_backoff_ms: 1000,
        }
    }
}

/// The agents' NBD servers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdSettings {
    /// After answering a request, a connection polls its socket this long for the next
    /// one before it blocks: a client at queue depth 1 is then answered without a wakeup
    /// of the server thread. 0 blocks at once (no CPU spent waiting).
    pub poll_us: u64,
    /// Most connections one export serves at once; more are refused (and counted), so
    /// idle clients cannot use up the agent's descriptors and threads.
    pub max_connections: u32,
    /// Most connections still negotiating at once (they have not chosen an export).
    pub max_negotiating: u32,
    /// Close a connection that sends no request for this long; 0 never does.
    pub idle_timeout_s: u64,
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self {
            poll_us: 50,
            max_connections: 128,
            max_negotiating: 32,
            idle_timeout_s: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlusherSettings {
    /// When a logged write may leave the log.
    pub release: Release,
    /// With `release = "host"` and the process backend: how often the agents sync their
    /// disks to the media, bounding what a host crash loses.
    pub sync_interval_ms: u64,
    /// The agents' flushers wait this long before each batch, so unflushed records stay
    /// visible (and replayable) for a while. 0 in production.
    pub delay_ms: u64,
    /// The flushers never run: for replay tests and demos only (writes block once a log is
    /// full).
    pub paused: bool,
}

impl Default for FlusherSettings {
    fn default() -> Self {
        Self {
            release: Release::Host,
            sync_interval_ms: 1000,
            delay_ms: 0,
            paused: false,
        }
    }
}

/// hostd's Prometheus endpoint (docs/metrics.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// Where: an IP address and a port. Loopback by default, since the metrics name the
    /// cluster's nodes and addresses. An address taken by another program is logged and
    /// shown by `hostd status`; the pair runs without metrics then.
    pub listen: std::net::SocketAddr,
}

/// Where hostd serves its metrics unless configured: loopback only.
pub const DEFAULT_METRICS_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 9187);

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: std::net::SocketAddr::from(DEFAULT_METRICS_LISTEN),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// Host port (on 127.0.0.1) that clients reach this node's NBD export at.
    pub nbd_port: u16,
    /// Appended to this node's guest kernel command line (after `qemu.kernel_args`).
    #[serde(default)]
    pub kernel_args: String,
    /// The nodes that may take this node's identity over, most preferred first; unset: all
    /// the other nodes in ring order after this one (for a, b, c: a's is b, c; b's is c, a).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover_by: Option<Vec<String>>,
    /// Bridge mode: the node's own fixed address on the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Net>,
    /// Bridge mode: the address of the node's identity, held by whichever node serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ip: Option<Ipv4Net>,
}

/// A whole cluster configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub backend: Backend,
    pub qemu: QemuConfig,
    pub regions: RegionConfig,
    pub disks: DiskConfig,
    pub heartbeat: HeartbeatConfig,
    pub nbd: NbdSettings,
    pub recovery: RecoverySettings,
    pub flusher: FlusherSettings,
    pub metrics: MetricsSettings,
    pub network: NetworkConfig,
    pub interconnect: InterconnectConfig,
    pub failover: FailoverConfig,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: Backend::Qemu,
            qemu: QemuConfig::default(),
            regions: RegionConfig::default(),
            disks: DiskConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            nbd: NbdSettings::default(),
            recovery: RecoverySettings::default(),
            flusher: FlusherSettings::default(),
            metrics: MetricsSettings::default(),
            network: NetworkConfig::default(),
            interconnect: InterconnectConfig::default(),
            failover: FailoverConfig::default(),
            nodes: vec![
                NodeConfig {
                    name: "a".into(),
                    nbd_port: 10809,
                    kernel_args: String::new(),
                    takeover_by: None,
                    address: None,
                    service_ip: None,
                },
                NodeConfig {
                    name: "b".into(),
                    nbd_port: 10810,
                    kernel_args: String::new(),
                    takeover_by: None,
                    address: None,
                    service_ip: None,
                },
            ],
        }
    }
}

/// Largest disk image: 16 TiB.
const MAX_DISK_MIB: u64 = 16 << 20;

/// The fewest nodes a cluster has: one alone could not be taken over.
pub const MIN_NODES: usize = 2;
/// The most nodes a cluster has: the control region has a slot for each, and each node
/// maps the regions of the nodes whose identities it may come to hold.
pub const MAX_NODES: usize = shm::layout::MAX_NODES;

/// Node names the state directory uses for other things (`regions/control.region`).
const RESERVED_NAMES: [&str; 1] = ["control"];

/// The NBD port the agent listens on inside each guest.
pub use wire::network::GUEST_NBD_PORT;

impl Config {
    /// Loads `path`, or the defaults when no file is given.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { source, .. } => ConfigError::Parse {
                        path: path.to_owned(),
                        source,
                    },
                    other => other,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (without validating).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(source),
        })
    }

    /// Checks everything a launch depends on that can be checked without launching.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let count = self.nodes.len();
        if count < MIN_NODES {
            return invalid(format!(
                "a cluster needs {MIN_NODES} to {MAX_NODES} [[node]] entries, {count} given (a node alone has no one to take its identity over)"
            ));
        }
        if count > MAX_NODES {
            return invalid(format!(
                "a cluster has at most {MAX_NODES} nodes, {count} [[node]] entries given"
            ));
        }
        for node in &self.nodes {
            let plain = !node.name.is_empty()
                && node.name.len() <= shm::layout::NAME_LEN
                && node
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !plain {
                return invalid(format!(
                    "node name {:?} must be 1 to 16 letters, digits, '-' or '_'",
                    node.name
                ));
            }
            if RESERVED_NAMES.contains(&node.name.as_str()) {
                return invalid(format!(
                    "node name {:?} is reserved (the state directory uses it)",
                    node.name
                ));
            }
            if node.nbd_port == 0 {
                return invalid(format!("node {}: nbd_port 0 is not a port", node.name));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for earlier in &self.nodes[..i] {
                if earlier.name == node.name {
                    return invalid(format!(
                        "two nodes are named {:?}: node names must be unique",
                        node.name
                    ));
                }
                if earlier.nbd_port == node.nbd_port {
                    return invalid(format!(
                        "nodes {} and {} both use nbd_port {}",
                        earlier.name, node.name, node.nbd_port
                    ));
                }
            }
        }
        self.validate_takeover_by()?;
        self.interconnect.validate()?;
        let mib = self.regions.node_mib;
        if !(1..=4096).contains(&mib) || !mib.is_power_of_two() {
            return invalid(format!(
                "regions.node_mib = {mib}: a power of two from 1 to 4096 is needed (ivshmem BARs are powers of two)"
            ));
        }
        if !(1..=MAX_DISK_MIB).contains(&self.disks.size_mib) {
            return invalid(format!(
                "disks.size_mib = {}: from 1 to {MAX_DISK_MIB} (16 TiB)",
                self.disks.size_mib
            ));
        }
        if self.qemu.memory_mib < 64 {
            return invalid(format!(
                "qemu.memory_mib = {}: guests need at least 64",
                self.qemu.memory_mib
            ));
        }
        if self.qemu.cpus == 0 {
            return invalid("qemu.cpus must be at least 1".into());
        }
        self.heartbeat.validate().map_err(ConfigError::Invalid)?;
        self.failover
            .validate(&self.heartbeat)
            .map_err(ConfigError::Invalid)?;
        if self.nbd.poll_us > 10_000 {
            return invalid(format!(
                "nbd.poll_us {} must be at most 10000 (10 ms)",
                self.nbd.poll_us
            ));
        }
        let nbd = &self.nbd;
        for (key, value) in [
            ("max_connections", nbd.max_connections),
            ("max_negotiating", nbd.max_negotiating),
        ] {
            if !(1..=4096).contains(&value) {
                return invalid(format!("nbd.{key} {value} must be from 1 to 4096"));
            }
        }
        if nbd.idle_timeout_s > 86_400 {
            return invalid(format!(
                "nbd.idle_timeout_s {} must be at most 86400 (a day; 0 never closes)",
                nbd.idle_timeout_s
            ));
        }
        let sync = self.flusher.sync_interval_ms;
        if !(1..=3_600_000).contains(&sync) {
            return invalid(format!(
                "flusher.sync_interval_ms {sync} must be from 1 to 3600000 (an hour)"
            ));
        }
        if self.metrics.enabled && self.metrics.listen.port() == 0 {
            return invalid(format!(
                "metrics.listen {}: name a port (scrapers must know where to look)",
                self.metrics.listen
            ));
        }
        if self.metrics.enabled
            && let Some(node) = self
                .nodes
                .iter()
                .find(|n| n.nbd_port == self.metrics.listen.port())
        {
            return invalid(format!(
                "metrics.listen {} uses node {}'s nbd_port",
                self.metrics.listen, node.name
            ));
        }
        let all_args = self
            .nodes
            .iter()
            .map(|n| n.kernel_args.as_str())
            .chain([self.qemu.kernel_args.as_str()]);
        for args in all_args {
            for key in [
                "node",
                "service_ips",
                "node_address",
                "coordinator",
                "identity_ports",
            ] {
                if args.contains(&format!("ivha.{key}=")) {
                    return invalid(format!(
                        "kernel_args must not set ivha.{key}: hostd sets it"
                    ));
                }
            }
        }
        self.network
            .validate(&self.nodes)
            .map_err(ConfigError::Invalid)?;
        if self.network.is_bridge() && self.backend == Backend::Process {
            return invalid(
                "network.mode = \"bridge\" needs guests (backend = \"qemu\"): agents as host processes listen on 127.0.0.1 ports".into(),
            );
        }
        self.validate_agent_options()?;
        // The agent refuses what it does not know; say so before anything boots. It reads
        // hostd's settings, then the cluster's and the node's kernel_args.
        for (index, node) in self.nodes.iter().enumerate() {
            let cmdline = format!(
                "{} {} {}",
                self.agent_options_for(index).to_kernel_args(),
                self.qemu.kernel_args,
                node.kernel_args
            );
            if let Err(error) = AgentOptions::from_kernel_args(&cmdline) {
                let text = error.to_string();
                let first = text.lines().next().unwrap_or_default();
                return invalid(format!(
                    "node {}: kernel_args: {}",
                    node.name,
                    first.trim_start_matches("error: ")
                ));
            }
        }
        Ok(())
    }

    /// Whether the storage daemon serves the disks (QEMU guests with `served_by = "blkd"`).
    pub fn uses_storage_daemon(&self) -> bool {
        self.backend == Backend::Qemu && self.disks.served_by == DiskServer::Blkd
    }

    /// Whether the storage daemon keeps a coordinator, so that every move is a claim there
    /// and the agents may claim a dead peer while hostd is away: `failover.without_hostd`,
    /// where a daemon runs (QEMU guests whose disks it serves) or may run for the
    /// coordinator alone (the process backend). With `served_by = "qemu"` there is none.
    pub fn runs_coordinator(&self) -> bool {
        self.failover.without_hostd
            && (self.backend == Backend::Process || self.uses_storage_daemon())
    }

    /// Whether an agent can move an identity's address by itself: it holds the service IP
    /// (bridge mode) or listens on the port (process backend). In user mode only hostd
    /// moves a port (`hostfwd`), so the agents wait for hostd there.
    pub fn agents_move_addresses(&self) -> bool {
        self.backend == Backend::Process || self.network.is_bridge()
    }

    /// Checks each node's `takeover_by` list against the node names (which must be unique
    /// already).
    fn validate_takeover_by(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for node in &self.nodes {
            let Some(list) = &node.takeover_by else {
                continue;
            };
            if list.is_empty() {
                return invalid(format!(
                    "node {}: takeover_by is empty, so no node could take its identity over (leave it out for all the other nodes)",
                    node.name
                ));
            }
            for (i, taker) in list.iter().enumerate() {
                if *taker == node.name {
                    return invalid(format!(
                        "node {}: takeover_by names {} itself (a node cannot take its own identity over)",
                        node.name, node.name
                    ));
                }
                if !self.nodes.iter().any(|n| n.name == *taker) {
                    return invalid(format!(
                        "node {}: takeover_by names {taker:?}, which is not a node of this cluster",
                        node.name
                    ));
                }
                if list[..i].contains(taker) {
                    return invalid(format!(
                        "node {}: takeover_by names {taker} twice",
                        node.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per node in configuration order, the positions of the nodes that may take its
    /// identity over, most preferred first: its `takeover_by` list, or all the other nodes
    /// in ring order after it. Names the configuration does not know are left out (a
    /// validated configuration has none).
    pub fn takeover_order(&self) -> Vec<Vec<usize>> {
        let count = self.nodes.len();
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| match &node.takeover_by {
                Some(list) => list
                    .iter()
                    .filter_map(|taker| self.nodes.iter().position(|n| n.name == *taker))
                    .collect(),
                None => crate::daemon::topology::ring_after(index, count),
            })
            .collect()
    }

    /// Checks the agents' settings against the agent's own limits (it would refuse them and
    /// exit at every start).
    fn validate_agent_options(&self) -> Result<(), ConfigError> {
        self.agent_options().validate().map_err(|error| {
            let text = error.to_string();
            ConfigError::Invalid(format!(
                "the agents would refuse these settings: {}",
                text.lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
            ))
        })
    }

    /// What every agent of this cluster is told.
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            heartbeat_ms: self.heartbeat.interval_ms,
            nbd_poll_us: self.nbd.poll_us,
            nbd_max_connections: self.nbd.max_connections,
            nbd_max_negotiating: self.nbd.max_negotiating,
            nbd_idle_timeout_s: self.nbd.idle_timeout_s,
            flush_delay_ms: self.flusher.delay_ms,
            flush_paused: self.flusher.paused,
            release: self.flusher.release,
            sync_interval_ms: self.flusher.sync_interval_ms,
            // The peers are each node's own (the daemon knows the topology).
            interconnect: InterconnectOptions {
                links: self.interconnect.links,
                mailbox: self.interconnect.mailbox,
                heartbeat_ms: self.interconnect.heartbeat_ms,
                stream_ms: self.interconnect.stream_ms,
                ping_ms: self.interconnect.ping_ms,
                bulk: self.interconnect.bulk,
                ..InterconnectOptions::default()
            },
            ..AgentOptions::default()
        }
    }

    /// What node `index`'s agent is told: [`agent_options`](Self::agent_options) and, in
    /// bridge mode, the service IPs and its own address.
    pub fn agent_options_for(&self, index: usize) -> AgentOptions {
        let mut options = self.agent_options();
        if self.network.is_bridge() {
            options.service_ips = ServiceIps(
                self.nodes
                    .iter()
                    .filter_map(|n| Some((n.name.clone(), n.service_ip?)))
                    .collect(),
            );
            options.node_address = self.nodes.get(index).and_then(|n| n.address);
            options.arp_count = self.network.arp_count;
            options.arp_interval_ms = self.network.arp_interval_ms;
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file_and_are_valid() {
        let config = Config::load(None).unwrap();
        assert_eq!(config.nodes[0].name, "a");
        assert_eq!(config.nodes[1].nbd_port, 10810);
        assert_eq!(Config::parse("").unwrap(), config);
    }

    #[test]
    fn partial_files_keep_the_other_defaults() {
        let config = Config::parse(
            "[heartbeat]\ntimeout_ms = 5000\n[[node]]\nname = \"x\"\nnbd_port = 2000\n[[node]]\nname = \"y\"\nnbd_port = 2001\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.heartbeat.timeout_ms, 5000);
        assert_eq!(config.heartbeat.interval_ms, 100);
        assert_eq!(config.nodes[1].name, "y");
        assert_eq!(config.regions.node_mib, 64);
    }

    #[test]
    fn mistakes_get_clear_errors() {
        let cases = [
            ("[qemu]\nmemroy_mib = 5\n", "unknown field"),
            ("[regions]\nnode_mib = 48\n", "power of two"),
            (
                "[[node]]\nname = \"a\"\nnbd_port = 1\n",
                "a cluster needs 2 to 8 [[node]] entries, 1 given",
            ),
            (
                "[[node]]\nname = \"a\"\nnbd_port = 1\n[[node]]\nname = \"a\"\nnbd_port = 2\n",
                "two nodes are named \"a\"",
            ),
            (
                "[[node]]\nname = \"a/b\"\nnbd_port = 1\n[[node]]\nname = \"c\"\nnbd_port = 2\n",
                "letters, digits",
            ),
            (
                "[heartbeat]\ninterval_ms = 100\ntimeout_ms = 150\n",
                "at least twice",
            ),
            (
                "[heartbeat]\nmin_timeout_ms = 5000\n",
                "min_timeout_ms 5000 must be from twice interval_ms (200) to timeout_ms (3000)",
            ),
            ("[heartbeat]\nmin_timeout_ms = 150\n", "must be from twice"),
            ("[heartbeat]\nphi_threshold = 0.5\n", "from 1 to 16"),
            ("[heartbeat]\nphi_threshold = nan\n", "from 1 to 16"),
            ("[heartbeat]\ndetector = \"adaptive\"\n", "unknown variant"),
            (
                "[qemu]\nkernel_args = \"ivha.node=b\"\n",
                "must not set ivha.node",
            ),
            ("[disks]\nsize_mib = \"big\"\n", "invalid type"),
            ("[flusher]\nsync_interval_ms = 0\n", "from 1 to 3600000"),
            ("[nbd]\npoll_us = 20000\n", "at most 10000"),
            (
                "[nbd]\nmax_connections = 0\n",
                "nbd.max_connections 0 must be from 1",
            ),
            ("[nbd]\nidle_timeout_s = 100000\n", "at most 86400"),
            ("[flusher]\nrelease = \"disk\"\n", "unknown variant"),
            (
                "[metrics]\nlisten = \"localhost:9187\"\n",
                "invalid socket address syntax",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1\"\n",
                "invalid socket address",
            ),
            ("[metrics]\nlisten = \"127.0.0.1:0\"\n", "name a port"),
            (
                "[metrics]\nlisten = \"127.0.0.1:10810\"\n",
                "uses node b's nbd_port",
            ),
            ("[metrics]\nport = 9187\n", "unknown field"),
            (
                "[qemu]\nkernel_args = \"quiet ivha.flush_pasued\"\n",
                "flush-pasued",
            ),
            ("[disks]\nsize_mib = 17592186044417\n", "from 1 to 16777216"),
            (
                "[heartbeat]\ninterval_ms = 70000\ntimeout_ms = 200000\n",
                "the agents would refuse",
            ),
            (
                "[[node]]\nname = \"control\"\nnbd_port = 1\n[[node]]\nname = \"b\"\nnbd_port = 2\n",
                "reserved",
            ),
            (
                "[[node]]\nname = \"a\"\nnbd_port = 1\nkernel_args = \"ivha.heartbeat_ms=x\"\n[[node]]\nname = \"b\"\nnbd_port = 2\n",
                "node a: kernel_args",
            ),
            (
                "[failover]\nhostd_absent_ms = 100\n",
                "failover.hostd_absent_ms 100 must be from 500 to 600000",
            ),
            (
                "[failover]\npeer_dead_ms = 150\n",
                "failover.peer_dead_ms 150 must be from twice heartbeat.interval_ms (200)",
            ),
            ("[failover]\nwithout_hostd = \"yes\"\n", "invalid type"),
            ("[failover]\nabsent_ms = 1\n", "unknown field"),
            (
                "[qemu]\nkernel_args = \"ivha.coordinator=virtio\"\n",
                "must not set ivha.coordinator",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::parse(text).and_then(|c| c.validate()).unwrap_err();
            let message = wire::error_chain::one_line(&error);
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn the_detector_s_floor_follows_the_interval_and_timeout_unless_set() {
        let floor = |text: &str| {
            let config = Config::parse(text).unwrap();
            config.validate().unwrap();
            config.heartbeat.min_timeout_ms()
        };
        assert_eq!(floor(""), DEFAULT_MIN_TIMEOUT_MS);
        assert_eq!(
            floor("[heartbeat]\ninterval_ms = 1000\ntimeout_ms = 5000\n"),
            2000
        );
        assert_eq!(
            floor("[heartbeat]\ninterval_ms = 10\ntimeout_ms = 150\n"),
            150
        );
        assert_eq!(floor("[heartbeat]\nmin_timeout_ms = 300\n"), 300);
        // The fixed detector ignores the phi settings.
        floor("[heartbeat]\ndetector = \"fixed\"\nmin_timeout_ms = 1\nphi_threshold = 0.0\n");
    }

    #[test]
    fn failover_without_hostd_needs_a_coordinator_and_agents_that_move_addresses() {
        let config = Config::parse("").unwrap();
        assert!(config.failover.without_hostd);
        assert_eq!(config.failover.hostd_absent_ms, 1500);
        // The peer's death defaults to the heartbeat's floor.
        assert_eq!(config.failover.peer_dead_ms(&config.heartbeat), 1000);
        let slow = Config::parse("[heartbeat]\ninterval_ms = 1000\ntimeout_ms = 5000\n").unwrap();
        assert_eq!(slow.failover.peer_dead_ms(&slow.heartbeat), 2000);
        let set = Config::parse("[failover]\npeer_dead_ms = 700\nhostd_absent_ms = 900\n").unwrap();
        set.validate().unwrap();
        assert_eq!(set.failover.peer_dead_ms(&set.heartbeat), 700);
        // QEMU guests on the storage daemon keep a coordinator; user mode moves no address
        // without hostd.
        assert!(config.runs_coordinator());
        assert!(!config.agents_move_addresses());
        let process = Config::parse("backend = \"process\"\n").unwrap();
        assert!(process.runs_coordinator() && process.agents_move_addresses());
        let own_images = Config::parse("[disks]\nserved_by = \"qemu\"\n").unwrap();
        assert!(!own_images.runs_coordinator());
        let off =
            Config::parse("backend = \"process\"\n[failover]\nwithout_hostd = false\n").unwrap();
        assert!(!off.runs_coordinator());
        // A configuration saved before the section existed reads with its defaults.
        let mut json: serde_json::Value = serde_json::to_value(&config).unwrap();
        json.as_object_mut().unwrap().remove("failover");
        let back: Config = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn a_node_may_override_hostd_s_agent_settings() {
        let text = "[flusher]\npaused = true\n[[node]]\nname = \"a\"\nnbd_port = 1\nkernel_args = \"ivha.heartbeat_ms=50 ivha.flush_paused=1\"\n[[node]]\nname = \"b\"\nnbd_port = 2\n";
        Config::parse(text).unwrap().validate().unwrap();
    }

    #[test]
    fn metrics_are_served_on_loopback_unless_configured() {
        let config = Config::parse("").unwrap();
        assert!(config.metrics.enabled);
        assert!(config.metrics.listen.ip().is_loopback());
        let config = Config::parse("[metrics]\nlisten = \"[::1]:9300\"\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.metrics.listen.to_string(), "[::1]:9300");
        // Off, the address is not checked.
        let config =
            Config::parse("[metrics]\nenabled = false\nlisten = \"127.0.0.1:0\"\n").unwrap();
        config.validate().unwrap();
    }

    /// `count` nodes n0, n1, ... on ports 2000, 2001, ..., with `extra` TOML lines per node.
    fn nodes(count: usize, extra: impl Fn(usize) -> String) -> String {
        (0..count)
            .map(|i| {
                format!(
                    "[[node]]\nname = \"n{i}\"\nnbd_port = {}\n{}",
                    2000 + i,
                    extra(i)
                )
            })
            .collect()
    }

    fn error_of(text: &str) -> String {
        let error = Config::parse(text).and_then(|c| c.validate()).unwrap_err();
        wire::error_chain::one_line(&error)
    }

    #[test]
    fn a_cluster_has_2_to_8_nodes() {
        for count in 2..=8 {
            let config = Config::parse(&nodes(count, |_| String::new())).unwrap();
            config.validate().unwrap();
            assert_eq!(config.nodes.len(), count);
        }
        assert!(
            error_of(&nodes(9, |_| String::new()))
                .contains("a cluster has at most 8 nodes, 9 [[node]] entries given"),
        );
        assert!(
            error_of(&nodes(1, |_| String::new()))
                .contains("a cluster needs 2 to 8 [[node]] entries, 1 given"),
        );
        // An empty list of nodes is an explicit `node = []`.
        assert!(error_of("node = []\n").contains("0 given"));
    }

    #[test]
    fn node_names_and_ports_are_unique() {
        let text = nodes(3, |_| String::new()).replace("nbd_port = 2002", "nbd_port = 2000");
        let message = error_of(&text);
        assert!(
            message.contains("nodes n0 and n2 both use nbd_port 2000"),
            "{message}"
        );
        let text = nodes(3, |_| String::new()).replace("name = \"n2\"", "name = \"n1\"");
        let message = error_of(&text);
        assert!(
            message.contains("two nodes are named \"n1\": node names must be unique"),
            "{message}"
        );
    }

    #[test]
    fn takeover_by_defaults_to_the_ring_after_each_node() {
        let config = Config::parse(&nodes(3, |_| String::new())).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.takeover_order(),
            [vec![1, 2], vec![2, 0], vec![0, 1]]
        );
        // The pair: each takes the other over.
        assert_eq!(Config::default().takeover_order(), [vec![1], vec![0]]);
        // A list given for one node leaves the others' defaults.
        let config = Config::parse(&nodes(4, |i| match i {
            0 => "takeover_by = [\"n2\", \"n1\"]\n".into(),
            _ => String::new(),
        }))
        .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.takeover_order(),
            [vec![2, 1], vec![2, 3, 0], vec![3, 0, 1], vec![0, 1, 2]]
        );
        // Saved and loaded again (records::save_config), an unset list stays unset.
        let json = serde_json::to_string(&config).unwrap();
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        assert!(
            !serde_json::to_string(&Config::default())
                .unwrap()
                .contains("takeover_by")
        );
    }

    #[test]
    fn takeover_by_mistakes_get_clear_errors() {
        let with = |list: &str| {
            nodes(3, move |i| match i {
                0 => format!("takeover_by = {list}\n"),
                _ => String::new(),
            })
        };
        let cases = [
            (
                "[\"n1\", \"x\"]",
                "node n0: takeover_by names \"x\", which is not a node of this cluster",
            ),
            ("[\"n0\"]", "node n0: takeover_by names n0 itself"),
            (
                "[\"n1\", \"n2\", \"n1\"]",
                "node n0: takeover_by names n1 twice",
            ),
            (
                "[]",
                "node n0: takeover_by is empty, so no node could take its identity over",
            ),
            ("\"n1\"", "invalid type"),
        ];
        for (list, expected) in cases {
            let message = error_of(&with(list));
            assert!(message.contains(expected), "{list}: {message}");
        }
        Config::parse(&with("[\"n2\"]"))
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = Config::load(Some(Path::new("/nonexistent/ivha.toml"))).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ivha.toml"));
    }
}
