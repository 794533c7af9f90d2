//! Launching the pair, reporting on it and shutting it down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::{Accel, AccelChoice, HostForward, QemuChild, QemuCommand};
use shm::{Access, ControlRegion, Mapping, NodeRegion};

use super::node::Node;
use super::prepare::NodeFiles;
use crate::config::{AccelSetting, Backend, Config, GUEST_NBD_PORT};
use crate::events::{Event, EventLog};
use crate::protocol::{ClusterStatus, DownReport, NodeState, NodeStatus};
use crate::state_dir::StateDir;

/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("cannot map region {path}")]
    Region {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The launched pair.
#[derive(Debug)]
pub struct Cluster {
    config: Config,
    state: StateDir,
    nodes: Vec<Node>,
    control: ControlRegion,
    /// "tcg", "kvm" or "process", and why.
    accel: (String, String),
    started: Instant,
    disks: Vec<PathBuf>,
    events: EventLog,
    /// Each node's state at the last sample, to record transitions.
    last_states: Vec<NodeState>,
}

/// Where the guest image is looked for when the config names none: `IVHA_GUEST_DIR`, then
/// `target/guest` beside the running binary (`target/{debug,release}/hostd`), then
/// `target/guest` under the current directory.
pub fn default_image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IVHA_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("guest")));
    match beside_binary {
        Some(dir) if dir.join("vmlinuz").exists() => dir,
        _ => PathBuf::from("target/guest"),
    }
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
    let plan = match config.backend {
        Backend::Qemu => {
            let (kernel, initrd) = image(config)?;
            let binary = find_binary(&config.qemu.binary).ok_or_else(|| LaunchError::NoQemu {
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
    events.record(&Event::PairStarting {
        accel: accel.0.clone(),
        accel_reason: accel.1.clone(),
    });
    let map_error =
        |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| LaunchError::Region {
            path: path.to_owned(),
            source: e,
        };
    let control = Mapping::open(control_path, Access::ReadWrite)
        .map_err(|e| map_error(control_path, Box::new(e)))
        .and_then(|m| ControlRegion::open(m).map_err(|e| map_error(control_path, Box::new(e))))?;

    let mut nodes = Vec::new();
    for (index, node_config) in config.nodes.iter().enumerate() {
        let partner = config.partner_of(index);
        let region_path = &files[index].region;
        let region = Mapping::open(region_path, Access::ReadOnly)
            .map_err(|e| map_error(region_path, Box::new(e)))
            .and_then(|m| NodeRegion::open(m).map_err(|e| map_error(region_path, Box::new(e))))?;
        nodes.push(Node::new(
            node_config.name.clone(),
            partner.name.clone(),
            node_config.nbd_port,
            state.console_log(&node_config.name),
            region,
        ));
    }
    let mut cluster = Cluster {
        config: config.clone(),
        state: state.clone(),
        nodes,
        control,
        accel,
        started: Instant::now(),
        disks: files.iter().map(|f| f.disk.clone()).collect(),
        events,
        last_states: vec![NodeState::Booting; config.nodes.len()],
    };
    // Both nodes start before either QMP connection is awaited: they boot in parallel.
    for index in 0..cluster.nodes.len() {
        let command = match &plan {
            Plan::Qemu {
                binary,
                kernel,
                initrd,
                accel,
            } => cluster.command(
                index,
                (binary, accel.accel),
                kernel,
                initrd,
                files,
                control_path,
            )?,
            Plan::Process { agent } => cluster.agent_command(index, agent, files),
        };
        let name = cluster.nodes[index].name.clone();
        let _ = std::fs::remove_file(state.qmp_socket(&name));
        log::info!("starting node {name}");
        log::debug!("node {name}: {}", display_command(&command));
        let child =
            QemuChild::spawn_with_log(command, &state.qemu_log(&name)).map_err(|source| {
                LaunchError::Spawn {
                    node: name.clone(),
                    source,
                }
            })?;
        cluster.nodes[index].child = Some(child);
    }
    for index in 0..cluster.nodes.len() {
        if config.backend == Backend::Process {
            break;
        }
        let name = cluster.nodes[index].name.clone();
        let socket = state.qmp_socket(&name);
        let connected = match cluster.nodes[index].child.as_mut() {
            Some(child) => qemu::connect_qmp(child, &socket, QMP_CONNECT_TIMEOUT),
            None => continue,
        };
        match connected {
            Ok(qmp) => {
                cluster.nodes[index].events = Some(qmp.events());
                cluster.nodes[index].qmp = Some(qmp);
            }
            Err(source) => {
                cluster.kill_all();
                return Err(LaunchError::Qmp { node: name, source });
            }
        }
    }
    cluster.started = Instant::now();
    Ok(cluster)
}

/// What to start for each node.
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
    /// How often the main loop samples the nodes.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat.interval_ms)
    }

    fn command(
        &self,
        index: usize,
        (binary, accel): (&Path, Accel),
        kernel: &Path,
        initrd: &Path,
        files: &[NodeFiles],
        control_path: &Path,
    ) -> Result<std::process::Command, LaunchError> {
        let node = &self.config.nodes[index];
        let partner_index = 1 - index;
        let partner = &self.config.nodes[partner_index];
        let region_size = self.config.regions.node_mib << 20;
        let control_size = self.control.header().region_size;
        let mut append = format!(
            "console=ttyS0 panic=-1 ivha.node={} ivha.heartbeat_ms={}",
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
        for extra in [&self.config.qemu.kernel_args, &node.kernel_args] {
            if !extra.is_empty() {
                append.push(' ');
                append.push_str(extra);
            }
        }
        QemuCommand::new(binary)
            .name(&format!("ivha-{}", node.name))
            .accel(accel)
            .memory_mib(self.config.qemu.memory_mib)
            .cpus(self.config.qemu.cpus)
            .kernel(kernel)
            .initrd(initrd)
            .append(&append)
            .serial_log(self.state.console_log(&node.name))
            .qmp_socket(self.state.qmp_socket(&node.name))
            // Its own region read-write; the partner's and the control region read-only,
            // so this guest cannot write them even by mistake.
            .shared_region("own", &files[index].region, region_size, false)
            .shared_region("partner", &files[partner_index].region, region_size, true)
            .shared_region("control", control_path, control_size, true)
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
            .user_net(
                "n0",
                &[HostForward {
                    host_addr: std::net::Ipv4Addr::LOCALHOST,
                    host_port: node.nbd_port,
                    guest_port: GUEST_NBD_PORT,
                }],
            )
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
    fn agent_command(
        &self,
        index: usize,
        agent: &Path,
        files: &[NodeFiles],
    ) -> std::process::Command {
        let node = &self.config.nodes[index];
        let mut command = std::process::Command::new(agent);
        command
            .arg("--node")
            .arg(&node.name)
            .arg("--region-dir")
            .arg(self.state.regions_dir())
            .arg("--disk")
            .arg(&files[index].disk)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", node.nbd_port))
            .arg("--heartbeat-ms")
            .arg(self.config.heartbeat.interval_ms.to_string());
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

    /// Samples every node and records each state change as an event.
    pub fn sample(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_millis(self.config.heartbeat.timeout_ms);
        for (node, last) in self.nodes.iter_mut().zip(&mut self.last_states) {
            node.sample(now);
            let state = node.state(now, timeout);
            if state != *last {
                self.events.record(&Event::NodeState {
                    node: node.name.clone(),
                    from: last.as_str().to_owned(),
                    to: state.as_str().to_owned(),
                    detail: format!(
                        "vm {}, heartbeat {}, boot id {:#018x}",
                        node.vm_description(),
                        node.heartbeat(),
                        node.region.boot_id()
                    ),
                });
                *last = state;
            }
        }
    }

    /// The cluster as `hostd status` shows it.
    pub fn status(&self) -> ClusterStatus {
        let now = Instant::now();
        let timeout = Duration::from_millis(self.config.heartbeat.timeout_ms);
        let names = &self.control.header().nodes;
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let state = node.state(now, timeout);
                let partner = &self.nodes[1 - index];
                let peer = node.region.peer().unwrap_or_default();
                // One snapshot: read apart, a live flusher can make flushed pass head.
                let cursors = node.region.log_cursors().ok();
                let served_by = self
                    .control
                    .owner(index)
                    .and_then(|o| o.node)
                    .and_then(|n| names.get(n as usize).cloned());
                let (takeover_possible, takeover_reason) =
                    takeover_readiness(node, partner, partner.state(now, timeout));
                NodeStatus {
                    name: node.name.clone(),
                    partner: node.partner.clone(),
                    state,
                    vm: node.vm_description(),
                    pid: node.pid(),
                    heartbeat: node.heartbeat(),
                    heartbeat_age_ms: node.heartbeat_age(now).map(|d| d.as_millis() as u64),
                    boot_id: node.region.boot_id(),
                    peer_boot_id: peer.boot_id,
                    peer_heartbeat: peer.heartbeat,
                    head_seq: cursors.map(|(_, head)| head.seq),
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
            stopped.push((node.name.clone(), how));
        }
        self.events.record(&Event::PairStopped {
            stopped: stopped.clone(),
        });
        let mut purged = false;
        if purge {
            purged = self.purge();
        }
        DownReport { stopped, purged }
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
        for disk in &self.disks {
            remove(disk);
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

/// Whether the partner could take `node` over now, and why not. Takeover itself arrives
/// with the takeover issue; until then the answer is always no, with the reason.
fn takeover_readiness(node: &Node, partner: &Node, partner_state: NodeState) -> (bool, String) {
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
        false,
        format!(
            "partner {} is ready, but this build cannot take over yet",
            partner.name
        ),
    )
}
