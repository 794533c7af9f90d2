//! Launching the pair, reporting on it and shutting it down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::{Accel, AccelChoice, HostForward, QemuChild, QemuCommand};
use shm::{Access, ControlRegion, ControlWriter, Mapping, NodeRegion};

use super::node::{Node, heartbeat_counter};
use super::prepare::NodeFiles;
use crate::config::{AccelSetting, Backend, Config, GUEST_NBD_PORT};
use crate::events::{Event, EventLog};
use crate::protocol::{ClusterStatus, DownReport, NodeState, NodeStatus};
use crate::state_dir::StateDir;

/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a running QEMU gets to greet a restarted hostd on QMP.
const QMP_ADOPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors launching the pair.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "guest image not found: {path} does not exist; build it with `scripts/build-guest-image.sh` (or set qemu.kernel / qemu.initrd in the config)"
    )]
    NoImage { path: PathBuf },
    #[error(
        "{binary} not found: install QEMU (`apt-get install qemu-system-x86`) or set qemu.binary"
    )]
    NoQemu { binary: PathBuf },
    #[error(
        "guest-agent not found at {path}: build it (`cargo build -p guest-agent`) or set IVHA_AGENT_BINARY"
    )]
    NoAgent { path: PathBuf },
    #[error("cannot choose an accelerator")]
    Accel(#[source] qemu::AccelError),
    #[error("cannot build the QEMU command line for node {node}")]
    Cmdline {
        node: String,
        #[source]
        source: qemu::CmdlineError,
    },
    #[error("cannot start QEMU for node {node}")]
    Spawn {
        node: String,
        #[source]
        source: qemu::ChildError,
    },
    #[error("QEMU for node {node} did not start")]
    Qmp {
        node: String,
        #[source]
        source: qemu::LaunchError,
    },
    #[error("cannot record node {node}'s process for a restarted hostd")]
    Record {
        node: String,
        #[source]
        source: super::adopt::RecordError,
    },
    #[error("cannot adopt node {node}'s running process; the guests were left running")]
    Adopt {
        node: String,
        #[source]
        source: qemu::ChildError,
    },
    #[error("cannot map region {path}")]
    Region {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The launched pair. The failover steps live in `failover.rs`.
#[derive(Debug)]
pub struct Cluster {
    pub(super) config: Config,
    pub(super) state: StateDir,
    pub(super) nodes: Vec<Node>,
    pub(super) control: ControlRegion,
    /// hostd is the control region's only writer.
    pub(super) control_writer: ControlWriter,
    /// Seq of the last command issued to any node.
    pub(super) command_seq: u64,
    /// "tcg", "kvm" or "process", and why.
    accel: (String, String),
    plan: Plan,
    files: Vec<NodeFiles>,
    control_path: PathBuf,
    started: Instant,
    pub(super) events: EventLog,
    /// Each node's state at the last sample, to record transitions.
    last_states: Vec<NodeState>,
    /// A giveback waiting for its node to boot.
    pub(super) pending_giveback: Option<super::failover::PendingGiveback>,
    /// Whether this hostd adopted a running pair rather than launching it.
    adopted: bool,
}

/// Where the guest image is looked for when the config names none: `IVHA_GUEST_DIR`, then
/// `guest` in the cargo target directory of the running binary (`<target>/{debug,release}/hostd`),
/// then `$CARGO_TARGET_DIR/guest`, then `target/guest` under the current directory.
pub fn default_image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IVHA_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("guest")));
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(|dir| PathBuf::from(dir).join("guest"));
    [beside_binary, target_dir]
        .into_iter()
        .flatten()
        .find(|dir| dir.join("vmlinuz").exists())
        .unwrap_or_else(|| PathBuf::from("target/guest"))
}

fn image(config: &Config) -> Result<(PathBuf, PathBuf), LaunchError> {
    let dir = default_image_dir();
    let kernel = config
        .qemu
        .kernel
        .clone()
        .unwrap_or_else(|| dir.join("vmlinuz"));
    let initrd = config
        .qemu
        .initrd
        .clone()
        .unwrap_or_else(|| dir.join("initramfs.cpio.gz"));
    for path in [&kernel, &initrd] {
        if !path.exists() {
            return Err(LaunchError::NoImage { path: path.clone() });
        }
    }
    Ok((kernel, initrd))
}

fn find_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.exists().then(|| binary.to_owned());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.exists())
    })
}

fn choose_accel(config: &Config, binary: &Path) -> Result<AccelChoice, LaunchError> {
    match config.qemu.accel {
        AccelSetting::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "configured (qemu.accel = \"tcg\")".into(),
        }),
        AccelSetting::Kvm => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: "configured (qemu.accel = \"kvm\")".into(),
        }),
        AccelSetting::Auto => qemu::accel::detect(binary).map_err(LaunchError::Accel),
    }
}

/// Boots both guests. On any failure, whatever was started is killed before returning.
pub fn launch(
    config: &Config,
    state: &StateDir,
    files: &[NodeFiles],
    control_path: &Path,
) -> Result<Cluster, LaunchError> {
    let mut cluster = Cluster::new(config, state, files, control_path)?;
    cluster.events.record(&Event::PairStarting {
        accel: cluster.accel.0.clone(),
        accel_reason: cluster.accel.1.clone(),
    });
    if let Err(error) = super::adopt::save_config(state, config) {
        log::warn!("a restarted hostd will not be able to adopt this pair: {error}");
    }
    for identity in 0..cluster.nodes.len() {
        if let Some(owner) = cluster.owner_of(identity) {
            cluster.events.record(&Event::ServingStarted {
                identity: cluster.nodes[identity].name.clone(),
                node: cluster.nodes[owner].name.clone(),
                epoch: cluster.control.epoch(),
            });
        }
    }
    // Both nodes start before either QMP connection is awaited: they boot in parallel.
    for index in 0..cluster.nodes.len() {
        cluster.spawn_node(index)?;
    }
    for index in 0..cluster.nodes.len() {
        if let Err(error) = cluster.connect_node(index) {
            cluster.kill_all();
            return Err(error);
        }
    }
    cluster.started = Instant::now();
    Ok(cluster)
}

/// Adopts the pair an earlier hostd left running (`running`: the nodes whose recorded
/// process still runs). Nothing is restarted and no takeover is started for it: the
/// running nodes get a fresh heartbeat timeout from now. A node whose process is gone died
/// while no hostd watched; it counts as fenced, and its identity moves to the partner if
/// it still held it.
pub fn adopt(
    config: &Config,
    state: &StateDir,
    files: &[NodeFiles],
    control_path: &Path,
    running: &[(usize, super::adopt::RunRecord)],
) -> Result<Cluster, LaunchError> {
    let mut cluster = Cluster::new(config, state, files, control_path)?;
    let mut adopted = Vec::new();
    for index in 0..cluster.nodes.len() {
        let name = cluster.nodes[index].name.clone();
        let found = running.iter().find(|(i, _)| *i == index).map(|(_, r)| *r);
        let how = match found.map(|record| cluster.adopt_node(index, record)) {
            Some(Ok(how)) => how,
            Some(Err(qemu::ChildError::Adopt { reason, .. })) => {
                // It ended between the check and the adoption.
                log::warn!("node {name}: {reason}");
                cluster.mark_gone(index)
            }
            Some(Err(source)) => {
                // Not known to be dead, not under control either: touch nothing.
                for node in &mut cluster.nodes {
                    if let Some(child) = node.child.take() {
                        child.disown();
                    }
                }
                return Err(LaunchError::Adopt { node: name, source });
            }
            None => cluster.mark_gone(index),
        };
        log::info!("node {name}: {how}");
        adopted.push((name, how));
    }
    cluster.reconcile_forwards();
    cluster.adopted = true;
    cluster.last_states = cluster.nodes.iter().map(Node::state).collect();
    cluster
        .events
        .record(&Event::PairAdopted { nodes: adopted });
    Ok(cluster)
}

impl Cluster {
    /// The cluster's state without any node process: regions mapped, control region
    /// opened, the nodes' plan chosen.
    fn new(
        config: &Config,
        state: &StateDir,
        files: &[NodeFiles],
        control_path: &Path,
    ) -> Result<Cluster, LaunchError> {
        let plan = match config.backend {
            Backend::Qemu => {
                let (kernel, initrd) = image(config)?;
                let binary =
                    find_binary(&config.qemu.binary).ok_or_else(|| LaunchError::NoQemu {
                        binary: config.qemu.binary.clone(),
                    })?;
                let accel = choose_accel(config, &binary)?;
                Plan::Qemu {
                    binary,
                    kernel,
                    initrd,
                    accel,
                }
            }
            Backend::Process => Plan::Process {
                agent: agent_binary()?,
            },
        };
        let accel = match &plan {
            Plan::Qemu { accel, .. } => (
                format!("{:?}", accel.accel).to_lowercase(),
                accel.reason.clone(),
            ),
            Plan::Process { .. } => (
                "process".to_owned(),
                "agents run as host processes (--backend process)".to_owned(),
            ),
        };
        let events = EventLog::new(&state.event_log());
        let map_error =
            |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| LaunchError::Region {
                path: path.to_owned(),
                source: e,
            };
        let control = Mapping::open(control_path, Access::ReadWrite)
            .map_err(|e| map_error(control_path, Box::new(e)))
            .and_then(|m| {
                ControlRegion::open(m).map_err(|e| map_error(control_path, Box::new(e)))
            })?;
        let control_writer = control
            .writer()
            .map_err(|e| map_error(control_path, Box::new(e)))?;
        let command_seq = (0..control.header().nodes.len())
            .filter_map(|i| control.command(i).map(|c| c.seq))
            .max()
            .unwrap_or(0);
        let monitor = heartbeat::Monitor::new(heartbeat::Config::new(
            Duration::from_millis(config.heartbeat.interval_ms),
            Duration::from_millis(config.heartbeat.timeout_ms),
        ));

        let mut nodes = Vec::new();
        for (index, node_config) in config.nodes.iter().enumerate() {
            let partner = config.partner_of(index);
            let region_path = &files[index].region;
            let region = Mapping::open(region_path, Access::ReadOnly)
                .map_err(|e| map_error(region_path, Box::new(e)))
                .and_then(|m| {
                    NodeRegion::open(m).map_err(|e| map_error(region_path, Box::new(e)))
                })?;
            let mut node = Node::new(
                node_config.name.clone(),
                partner.name.clone(),
                node_config.nbd_port,
                state.console_log(&node_config.name),
                region,
                monitor.clone(),
            );
            // A state directory kept from an earlier run may have this identity with the
            // partner: then the partner's QEMU forwards its address.
            node.forwards_own_port = control
                .owner(index)
                .is_none_or(|o| o.node.is_none_or(|n| n as usize == index));
            nodes.push(node);
        }
        Ok(Cluster {
            config: config.clone(),
            state: state.clone(),
            nodes,
            control,
            control_writer,
            command_seq,
            accel,
            plan,
            files: files.to_vec(),
            control_path: control_path.to_owned(),
            started: Instant::now(),
            events,
            last_states: vec![NodeState::Booting; config.nodes.len()],
            pending_giveback: None,
            adopted: false,
        })
    }
}

/// What to start for each node.
#[derive(Debug, Clone)]
enum Plan {
    Qemu {
        binary: PathBuf,
        kernel: PathBuf,
        initrd: PathBuf,
        accel: AccelChoice,
    },
    Process {
        agent: PathBuf,
    },
}

/// The agent binary for the process backend: `IVHA_AGENT_BINARY`, else beside hostd.
fn agent_binary() -> Result<PathBuf, LaunchError> {
    let path = match std::env::var_os("IVHA_AGENT_BINARY") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("guest-agent")))
            .unwrap_or_else(|| PathBuf::from("guest-agent")),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(LaunchError::NoAgent { path })
    }
}

fn display_command(command: &std::process::Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Cluster {
    /// How often the main loop samples the nodes: often, since a sample is a few loads
    /// from shared memory and a `waitid`, and process death should be seen at once.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat.interval_ms.min(10))
    }

    /// Starts node `index`'s QEMU (or agent process).
    pub(super) fn spawn_node(&mut self, index: usize) -> Result<(), LaunchError> {
        let command = match &self.plan {
            Plan::Qemu {
                binary,
                kernel,
                initrd,
                accel,
            } => self.command(index, (binary, accel.accel), kernel, initrd)?,
            Plan::Process { agent } => self.agent_command(index, agent),
        };
        let name = self.nodes[index].name.clone();
        let _ = std::fs::remove_file(self.state.qmp_socket(&name));
        log::info!("starting node {name}");
        log::debug!("node {name}: {}", display_command(&command));
        let region = &self.nodes[index].region;
        let before = (region.boot_id(), heartbeat_counter(region));
        let child =
            QemuChild::spawn_with_log(command, &self.state.qemu_log(&name)).map_err(|source| {
                LaunchError::Spawn {
                    node: name.clone(),
                    source,
                }
            })?;
        // Without its record a restarted hostd could not adopt the node, and might take it
        // for dead: no node runs unrecorded.
        if let Err(source) = super::adopt::save_record(&self.state, &name, child.pid(), before) {
            let mut child = child;
            let _ = child.kill_and_reap(super::QUIT_TIMEOUT);
            return Err(LaunchError::Record { node: name, source });
        }
        self.nodes[index].restarted(child, before);
        Ok(())
    }

    /// Takes over node `index`'s running process from an earlier hostd: its pidfd, its
    /// QMP socket (QEMU backend) and whether the VM is paused. Returns what was adopted,
    /// in words.
    fn adopt_node(
        &mut self,
        index: usize,
        record: super::adopt::RunRecord,
    ) -> Result<String, qemu::ChildError> {
        let name = self.nodes[index].name.clone();
        let child = QemuChild::adopt(
            record.pid,
            record.start_time,
            Some(self.state.qemu_log(&name)),
        )?;
        let clock = self.clock(Instant::now());
        let before = (record.boot_id_before, record.heartbeat_before);
        let booting = self.nodes[index].adopted(child, before, Instant::now(), clock);
        let booting_note = if booting { ", still booting" } else { "" };
        if self.is_process_backend() {
            return Ok(format!(
                "agent process {} adopted{booting_note}",
                record.pid
            ));
        }
        let socket = self.state.qmp_socket(&name);
        let mut qmp = match qemu::QmpClient::connect(&socket, QMP_ADOPT_TIMEOUT) {
            Ok(qmp) => qmp,
            Err(error) => {
                // A hung QEMU does not answer; its heartbeat will tell, and the fence
                // works through the pidfd without QMP.
                log::warn!(
                    "node {name}: QMP at {} does not answer: {error}",
                    socket.display()
                );
                return Ok(format!(
                    "QEMU pid {} adopted without QMP (not answering){booting_note}",
                    record.pid
                ));
            }
        };
        // Later commands get the time a launched node's do.
        qmp.set_timeout(QMP_CONNECT_TIMEOUT);
        // QMP events sent while no hostd listened are lost: ask for the VM's state.
        let running = qmp
            .execute("query-status", None)
            .map(|status| status["running"].as_bool().unwrap_or(true))
            .unwrap_or(true);
        let node = &mut self.nodes[index];
        node.events = Some(qmp.events());
        node.qmp = Some(qmp);
        if !running {
            node.paused = true;
            node.monitor.observe(heartbeat::Evidence::Stopped, clock);
        }
        Ok(format!(
            "QEMU pid {} adopted{}{booting_note}",
            record.pid,
            if running { "" } else { " (VM paused)" }
        ))
    }

    /// Node `index` had no running process when the pair was adopted: it died while no
    /// hostd watched. It counts as fenced, so its identity moves to the partner.
    fn mark_gone(&mut self, index: usize) -> String {
        let what = "gone while no hostd was running";
        let clock = self.clock(Instant::now());
        let node = &mut self.nodes[index];
        // So that its takeover gives this as the reason.
        node.monitor.observe(
            heartbeat::Evidence::ProcessExited {
                status: what.into(),
            },
            clock,
        );
        node.fenced = true;
        node.exit = Some(what.into());
        node.forwards_own_port = false;
        self.record_serving_ended_all(index, "gone");
        what.to_owned()
    }

    /// After an adoption: each identity's address leads to its owner and nowhere else. A
    /// hostd that died between moving the owner and moving the address left them apart.
    fn reconcile_forwards(&mut self) {
        if self.is_process_backend() {
            return;
        }
        for node in 0..self.nodes.len() {
            let Some(qmp) = self.nodes[node].qmp.as_mut() else {
                continue;
            };
            let table = match qmp.human_monitor_command("info usernet") {
                Ok(table) => table,
                Err(error) => {
                    log::warn!("node {}: info usernet: {error}", self.nodes[node].name);
                    continue;
                }
            };
            for identity in 0..self.nodes.len() {
                let port = self.nodes[identity].nbd_port;
                let has = forwards_port(&table, port);
                let should = self.owner_of(identity) == Some(node) && !self.nodes[node].fenced;
                let result = match (has, should) {
                    (true, false) => self.unforward(node, identity),
                    (false, true) => self.forward(node, identity),
                    _ => Ok(()),
                };
                match result {
                    Ok(()) if has != should => log::warn!(
                        "adoption: the address of {} {} node {} (a move was cut short)",
                        self.nodes[identity].name,
                        if should {
                            "now leads to"
                        } else {
                            "no longer leads to"
                        },
                        self.nodes[node].name
                    ),
                    Ok(()) => {}
                    Err(error) => log::error!("adoption: {error}"),
                }
            }
        }
    }

    /// Connects to node `index`'s QMP socket (QEMU backend only).
    pub(super) fn connect_node(&mut self, index: usize) -> Result<(), LaunchError> {
        if self.is_process_backend() {
            return Ok(());
        }
        let name = self.nodes[index].name.clone();
        let socket = self.state.qmp_socket(&name);
        let Some(child) = self.nodes[index].child.as_mut() else {
            return Ok(());
        };
        let qmp = qemu::connect_qmp(child, &socket, QMP_CONNECT_TIMEOUT)
            .map_err(|source| LaunchError::Qmp { node: name, source })?;
        self.nodes[index].events = Some(qmp.events());
        self.nodes[index].qmp = Some(qmp);
        Ok(())
    }

    /// The monitors' clock now: time since launch (set before the first sample).
    pub(super) fn clock(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub(super) fn is_process_backend(&self) -> bool {
        self.config.backend == Backend::Process
    }

    fn command(
        &self,
        index: usize,
        (binary, accel): (&Path, Accel),
        kernel: &Path,
        initrd: &Path,
    ) -> Result<std::process::Command, LaunchError> {
        let files = &self.files;
        let node = &self.config.nodes[index];
        let partner_index = 1 - index;
        let partner = &self.config.nodes[partner_index];
        let region_size = self.config.regions.node_mib << 20;
        let control_size = self.control.header().region_size;
        let mut append = format!(
            // unknown_nmi_panic: `hostd kill --signal panic` panics the kernel with an NMI.
            "console=ttyS0 panic=-1 unknown_nmi_panic=1 ivha.node={} ivha.heartbeat_ms={}",
            node.name, self.config.heartbeat.interval_ms
        );
        if self.config.flusher.delay_ms > 0 {
            append.push_str(&format!(
                " ivha.flush_delay_ms={}",
                self.config.flusher.delay_ms
            ));
        }
        if self.config.flusher.paused {
            append.push_str(" ivha.flush_paused=1");
        }
        append.push_str(&format!(" ivha.nbd_poll_us={}", self.config.nbd.poll_us));
        for extra in [&self.config.qemu.kernel_args, &node.kernel_args] {
            if !extra.is_empty() {
                append.push(' ');
                append.push_str(extra);
            }
        }
        // The identity's address goes to this QEMU unless the partner holds it now.
        let forwards: Vec<HostForward> = if self.nodes[index].forwards_own_port {
            vec![HostForward {
                host_addr: std::net::Ipv4Addr::LOCALHOST,
                host_port: node.nbd_port,
                guest_port: GUEST_NBD_PORT,
            }]
        } else {
            Vec::new()
        };
        QemuCommand::new(binary)
            .name(&format!("ivha-{}", node.name))
            .accel(accel)
            .memory_mib(self.config.qemu.memory_mib)
            .cpus(self.config.qemu.cpus)
            .kernel(kernel)
            .initrd(initrd)
            .append(&append)
            .serial_log(self.state.console_log(&node.name))
            .shell_socket(self.state.shell_socket(&node.name))
            .qmp_socket(self.state.qmp_socket(&node.name))
            // Its own region read-write; the partner's and the control region read-only,
            // so this guest cannot write them even by mistake.
            .shared_region("own", &files[index].region, region_size, false)
            .shared_region("partner", &files[partner_index].region, region_size, true)
            .shared_region("control", &self.control_path, control_size, true)
            // Both disks in both guests: the partner's is only written after a takeover.
            .disk(
                "disk-own",
                &files[index].disk,
                &format!("ivha-{}", node.name),
                true,
            )
            .disk(
                "disk-partner",
                &files[partner_index].disk,
                &format!("ivha-{}", partner.name),
                true,
            )
            .user_net("n0", &forwards)
            .pvpanic()
            // Only the event: QEMU's default action ends the process before the kernel has
            // printed the panic, and the console would not say why the guest died. The
            // guest's `panic=-1` with QEMU's -no-reboot still ends the process right after.
            .panic_action(qemu::PanicAction::None)
            .virtio_rng()
            .build()
            .map_err(|source| LaunchError::Cmdline {
                node: node.name.clone(),
                source,
            })
    }

    /// The command line of node `index`'s agent as a host process.
    fn agent_command(&self, index: usize, agent: &Path) -> std::process::Command {
        let files = &self.files;
        let node = &self.config.nodes[index];
        let mut command = std::process::Command::new(agent);
        command
            .arg("--node")
            .arg(&node.name)
            .arg("--region-dir")
            .arg(self.state.regions_dir())
            .arg("--disk")
            .arg(&files[index].disk)
            .arg("--partner-disk")
            .arg(&files[1 - index].disk)
            .arg("--listen")
            // While the partner holds this identity, it holds its address too.
            .arg(if self.nodes[index].forwards_own_port {
                format!("127.0.0.1:{}", node.nbd_port)
            } else {
                "127.0.0.1:0".to_owned()
            })
            .arg("--heartbeat-ms")
            .arg(self.config.heartbeat.interval_ms.to_string())
            .arg("--release")
            .arg(self.config.flusher.release.agent_arg())
            .arg("--sync-interval-ms")
            .arg(self.config.flusher.sync_interval_ms.to_string())
            .arg("--nbd-poll-us")
            .arg(self.config.nbd.poll_us.to_string());
        if self.config.flusher.delay_ms > 0 {
            command
                .arg("--flush-delay-ms")
                .arg(self.config.flusher.delay_ms.to_string());
        }
        if self.config.flusher.paused {
            command.arg("--flush-paused");
        }
        command
    }

    /// Samples every node (fenced ones are done with), records each state change as an
    /// event, and returns the nodes that went Down in this sample.
    pub fn sample(&mut self) -> Vec<usize> {
        let now = Instant::now();
        let clock = self.clock(now);
        let mut down = Vec::new();
        for (index, (node, last)) in self.nodes.iter_mut().zip(&mut self.last_states).enumerate() {
            if !node.fenced && node.sample(now, clock) {
                down.push(index);
            }
            let state = node.state();
            if state != *last {
                self.events.record(&Event::NodeState {
                    node: node.name.clone(),
                    from: last.as_str().to_owned(),
                    to: state.as_str().to_owned(),
                    detail: format!(
                        "{}vm {}, heartbeat {}, boot id {:#018x}",
                        match node.health_reason() {
                            reason if reason.is_empty() => String::new(),
                            reason => format!("{reason}; "),
                        },
                        node.vm_description(),
                        node.heartbeat(),
                        node.region.boot_id()
                    ),
                });
                *last = state;
            }
        }
        down
    }

    /// The cluster as `hostd status` shows it.
    pub fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let names = &self.control.header().nodes;
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let state = node.state();
                let partner = &self.nodes[1 - index];
                let peer = node.region.peer().unwrap_or_default();
                // One snapshot: read apart, a live flusher can make flushed pass head.
                let cursors = node.region.log_cursors().ok();
                let owner = self.owner_of(index);
                let served_by = owner.and_then(|n| names.get(n).cloned());
                let (takeover_possible, takeover_reason) =
                    takeover_readiness(node, partner, owner == Some(index));
                NodeStatus {
                    name: node.name.clone(),
                    partner: node.partner.clone(),
                    state,
                    health: node.health_reason(),
                    vm: node.vm_description(),
                    pid: node.pid(),
                    heartbeat: node.heartbeat(),
                    heartbeat_age_ms: node.heartbeat_age(now).map(|d| d.as_millis() as u64),
                    boot_id: node.region.boot_id(),
                    peer_boot_id: peer.boot_id,
                    peer_heartbeat: peer.heartbeat,
                    head_seq: cursors.map(|(_, head)| head.seq),
                    last_ack_seq: node.region.ack().map_or(0, |a| a.command_seq),
                    flushed_seq: cursors.map(|(flushed, _)| flushed.seq),
                    served_by,
                    nbd: format!("nbd://127.0.0.1:{}/{}", node.nbd_port, node.name),
                    takeover_possible,
                    takeover_reason,
                    console: node.console.display().to_string(),
                }
            })
            .collect();
        ClusterStatus {
            epoch: self.control.epoch(),
            state_dir: self.state.root().display().to_string(),
            hostd_pid: std::process::id(),
            accel: self.accel.0.clone(),
            accel_reason: self.accel.1.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            adopted: self.adopted,
            nodes,
        }
    }

    /// Stops both nodes: asks each to go (QMP `quit`, or SIGTERM for an agent process), then
    /// waits for all of them on one deadline and SIGKILLs whatever is left. A hung node
    /// costs at most [`super::QMP_QUIT_TIMEOUT`] plus [`super::QUIT_TIMEOUT`] in all.
    pub fn shut_down(&mut self, purge: bool) -> DownReport {
        let mut asked = Vec::new();
        for node in &mut self.nodes {
            let request = match (node.child.as_mut(), &node.exit, node.qmp.as_mut()) {
                (Some(_), None, Some(qmp)) => {
                    qmp.set_timeout(super::QMP_QUIT_TIMEOUT);
                    qmp.quit().map_err(|e| e.to_string())
                }
                (Some(child), None, None) => {
                    child.signal(qemu::Signal::Term).map_err(|e| e.to_string())
                }
                _ => Ok(()),
            };
            asked.push(request);
        }
        let deadline = Instant::now() + super::QUIT_TIMEOUT;
        let mut stopped = Vec::new();
        for (node, request) in self.nodes.iter_mut().zip(asked) {
            let how = match (node.child.as_mut(), &node.exit) {
                (None, _) => "never started".to_owned(),
                (Some(_), Some(exit)) => format!("had already {exit}"),
                (Some(child), None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match (child.wait_timeout(left), request) {
                        (Ok(Some(_)), Ok(())) if node.qmp.is_some() => "quit cleanly".to_owned(),
                        (Ok(Some(_)), Ok(())) => "stopped (SIGTERM)".to_owned(),
                        _ => match child.kill_and_reap(super::QUIT_TIMEOUT) {
                            Ok(_) => "killed (did not stop in time)".to_owned(),
                            Err(error) => format!("could not be killed: {error}"),
                        },
                    }
                }
            };
            log::info!("node {}: {how}", node.name);
            node.qmp = None;
            super::adopt::remove_record(&self.state, &node.name);
            stopped.push((node.name.clone(), how));
        }
        for identity in 0..self.nodes.len() {
            if let Some(owner) = self.owner_of(identity)
                && !self.nodes[owner].fenced
            {
                self.record_serving_ended(identity, owner, "stopped");
            }
        }
        self.events.record(&Event::PairStopped {
            stopped: stopped.clone(),
        });
        let mut purged = false;
        if purge {
            purged = self.purge();
        } else {
            self.sync_disks();
        }
        DownReport { stopped, purged }
    }

    /// Syncs the disk images to their media: agents may have left released writes in the
    /// host's page cache (`flusher.release = "host"`), and after a clean `down` everything
    /// the pair released should be on the media, not only in memory.
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
        let mut ok = true;
        let mut remove = |path: &Path| {
            let result = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            if let Err(error) = result.or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }) {
                log::warn!("cannot remove {}: {error}", path.display());
                ok = false;
            }
        };
        remove(&self.state.regions_dir());
        for files in &self.files {
            remove(&files.disk);
        }
        remove(&self.state.root().join("qmp"));
        ok
    }

    fn kill_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.kill_and_reap(super::QUIT_TIMEOUT);
            }
        }
    }
}

/// Whether HMP `info usernet` lists a host forward from 127.0.0.1:`port`, e.g.
/// `  TCP[HOST_FORWARD]  12   127.0.0.1 24809  10.0.2.15 10809   0   0`.
fn forwards_port(table: &str, port: u16) -> bool {
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first().is_some_and(|f| f.contains("HOST_FORWARD"))
            && fields
                .windows(2)
                .any(|w| w[0] == "127.0.0.1" && w[1] == port.to_string())
    })
}

/// Whether the partner could take `node`'s identity over now, and why not.
fn takeover_readiness(node: &Node, partner: &Node, node_owns_identity: bool) -> (bool, String) {
    if !node_owns_identity {
        return (
            false,
            format!("{} does not hold its identity now", node.name),
        );
    }
    let partner_state = partner.state();
    if partner_state != NodeState::Up {
        return (
            false,
            format!("partner {} is {}", partner.name, partner_state.as_str()),
        );
    }
    let peer = partner.region.peer().unwrap_or_default();
    if peer.boot_id == 0 || peer.boot_id != node.region.boot_id() {
        return (
            false,
            format!(
                "partner {} does not read {}'s region yet",
                partner.name, node.name
            ),
        );
    }
    (
        true,
        format!("partner {} is up and reads its region", partner.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_usernet_forwards() {
        let table = "Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]   3       127.0.0.1 24999       10.0.2.15 10809     0     0\r\n  TCP[ESTABLISHED]   14       127.0.0.1 24998       10.0.2.15 10809     0     0\r\n";
        assert!(forwards_port(table, 24999));
        assert!(
            !forwards_port(table, 24998),
            "a connection is not a forward"
        );
        assert!(!forwards_port(table, 10809));
        assert!(!forwards_port("", 24999));
    }
}
