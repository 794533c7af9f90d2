//! Nodes as QEMU guests: the command line, QMP (events, quit, panics, port forwards) and the
//! guest shell.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use qemu::{Accel, AccelChoice, HostForward, QemuCommand, QmpClient, QmpEvent};
use wire::records::RunRecord;

use super::children::{Children, GuestThreads};
use super::shell::run_in_shell;
use super::{
    Adopted, BackendError, NodeBackend, NodePaths, Polled, Scheduling, Signal, SpawnPlan, Stopped,
    VmEvent,
};
use crate::config::{AccelSetting, Config, GUEST_NBD_PORT};
use crate::daemon::topology::NodeId;
use crate::network::BridgeNetwork;

/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a running QEMU gets to greet a restarted hostd on QMP.
const QMP_ADOPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one QMP `quit` may take to be answered (a paused or hung QEMU never answers).
const QMP_QUIT_TIMEOUT: Duration = Duration::from_secs(1);
/// After QEMU exited, how long its last QMP events may take to arrive (the channel ends
/// sooner, when the reader sees the connection close).
const EVENTS_AFTER_EXIT: Duration = Duration::from_millis(100);
/// How long a killed QEMU may take to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors choosing what to run.
#[derive(Debug, thiserror::Error)]
pub enum QemuSetupError {
    #[error(
        "guest image not found: {} does not exist; build it with `scripts/build-guest-image.sh` (or set qemu.kernel / qemu.initrd in the config)",
        path.display()
    )]
    NoImage { path: PathBuf },
    #[error(
        "{} not found: install QEMU (`apt-get install qemu-system-x86`) or set qemu.binary",
        binary.display()
    )]
    NoQemu { binary: PathBuf },
    #[error("cannot choose an accelerator")]
    Accel(#[source] qemu::AccelError),
}

/// One QEMU guest per node.
#[derive(Debug)]
pub struct QemuBackend {
    binary: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    accel: AccelChoice,
    memory_mib: u32,
    cpus: u32,
    children: Children,
    qmp: Vec<Option<QmpClient>>,
    events: Vec<Option<Receiver<QmpEvent>>>,
    /// Bridge mode: each guest's NIC is a tap on this bridge, and the agents hold the
    /// service IPs (nothing to forward). None: user networking with port forwards.
    bridge: Option<BridgeNetwork>,
}

impl QemuBackend {
    /// Finds the image and the binary and chooses the accelerator for `config`'s nodes,
    /// whose files are `paths` (per node, in order).
    pub fn new(
        config: &Config,
        paths: Vec<NodePaths>,
        bridge: Option<BridgeNetwork>,
    ) -> Result<Self, QemuSetupError> {
        let (kernel, initrd) = image(config)?;
        let binary = find_binary(&config.qemu.binary).ok_or_else(|| QemuSetupError::NoQemu {
            binary: config.qemu.binary.clone(),
        })?;
        let accel = choose_accel(config, &binary)?;
        let n = paths.len();
        Ok(Self {
            binary,
            kernel,
            initrd,
            accel,
            memory_mib: config.qemu.memory_mib,
            cpus: config.qemu.cpus,
            children: Children::new(paths),
            qmp: (0..n).map(|_| None).collect(),
            events: (0..n).map(|_| None).collect(),
            bridge,
        })
    }

    fn name(&self, node: NodeId) -> String {
        self.children.name(node).to_owned()
    }

    fn command(
        &self,
        paths: &NodePaths,
        plan: &SpawnPlan,
        interconnect: &[InterconnectNic],
        tap: Option<(Arc<OwnedFd>, String)>,
    ) -> Result<std::process::Command, BackendError> {
        let mut append = format!(
            // unknown_nmi_panic: `hostd kill --signal panic` panics the kernel with an NMI.
            "console=ttyS0 panic=-1 unknown_nmi_panic=1 ivha.node={} {}",
            plan.name,
            plan.options.to_kernel_args()
        );
        if !plan.kernel_args.is_empty() {
            append.push(' ');
            append.push_str(&plan.kernel_args);
        }
        let forwards: Vec<HostForward> = plan
            .ports
            .iter()
            .map(|&port| HostForward {
                host_addr: std::net::Ipv4Addr::LOCALHOST,
                host_port: port,
                guest_port: GUEST_NBD_PORT,
            })
            .collect();
        let mut command = QemuCommand::new(&self.binary)
            .name(&format!("ivha-{}", plan.name))
            .accel(self.accel.accel)
            .memory_mib(self.memory_mib)
            .cpus(self.cpus)
            .kernel(&self.kernel)
            .initrd(&self.initrd)
            .append(&append)
            .serial_log(&plan.console)
            .shell_socket(&paths.shell_socket)
            .qmp_socket(&paths.qmp_socket)
            // Its own region read-write; the others' and the control region read-only,
            // so this guest cannot write them even by mistake.
            .shared_region("own", &plan.region, plan.region_size, false);
        for (n, watched) in plan.watched.iter().enumerate() {
            // The first watched node keeps the id the agent and the tests know.
            let id = if n == 0 {
                "partner".to_owned()
            } else {
                format!("partner{n}")
            };
            command = command.shared_region(&id, &watched.region, plan.region_size, true);
        }
        command = command.shared_region("control", &plan.control_region, plan.control_size, true);
        // Every disk it may serve: the others' are only written after a takeover. The
        // storage daemon serves them when there is one (it answers the serial), and then
        // needs the guest's RAM shared.
        let disks = std::iter::once((
            "disk-own".to_owned(),
            &plan.name,
            &plan.disk,
            &plan.disk_socket,
        ))
        .chain(plan.watched.iter().enumerate().map(|(n, watched)| {
            let id = if n == 0 {
                "disk-partner".to_owned()
            } else {
                format!("disk-partner{n}")
            };
            (id, &watched.name, &watched.disk, &watched.disk_socket)
        }));
        for (id, name, image, socket) in disks {
            command = match socket {
                Some(socket) => command.shared_memory().vhost_user_disk(&id, socket),
                None => command.disk(&id, image, &crate::storage::disk_serial(name), true),
            };
        }
        // The coordinator, reachable without the network (the agent claims a dead peer
        // there while hostd is away). The daemon listens before any guest starts.
        if let Some(socket) = &plan.coordinator_socket {
            command = command.virtio_serial_port("coord", socket, wire::coordinator::PORT_NAME);
        }
        command = match tap {
            // The service network only: clients reach the identities at their service IPs.
            Some((fd, mac)) => command.tap_net("br0", fd, &mac),
            None => command.user_net("n0", &forwards),
        };
        // The interconnect's NICs after the service NIC, which stays eth0.
        for (id, local, remote, mac) in interconnect {
            command = command.dgram_net(id, local, remote, mac);
        }
        command
            .pvpanic()
            // Only the event: QEMU's default action ends the process before the kernel has
            // printed the panic, and the console would not say why the guest died. The
            // guest's `panic=-1` with QEMU's -no-reboot still ends the process right after.
            .panic_action(qemu::PanicAction::None)
            .virtio_rng()
            .build()
            .map_err(|source| BackendError::Cmdline {
                node: plan.name.clone(),
                source: Box::new(source),
            })
    }

    /// Sets the interconnect NICs of `link` on node `node` up or down (QMP `set_link`: the
    /// guest sees its carrier go, and frames in both directions are dropped).
    pub fn set_interconnect_link(
        &mut self,
        node: NodeId,
        link: u16,
        peers: &[u16],
        up: bool,
    ) -> Result<(), BackendError> {
        let name = self.name(node);
        let qmp = self.qmp[node.index()]
            .as_mut()
            .ok_or_else(|| BackendError::NoQmp { node: name.clone() })?;
        for &peer in peers {
            let id = nic_id(link, peer);
            qmp.execute(
                "set_link",
                Some(serde_json::json!({ "name": id, "up": up })),
            )
            .map_err(|source| BackendError::QmpCommand {
                node: name.clone(),
                command: format!("set_link {id}"),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Runs an HMP command through QMP; `accepted` judges its text reply.
    fn hmp(
        &mut self,
        node: NodeId,
        command: &str,
        accepted: fn(&str) -> bool,
    ) -> Result<String, BackendError> {
        let name = self.name(node);
        let qmp = self.qmp[node.index()]
            .as_mut()
            .ok_or(BackendError::NoQmp { node: name.clone() })?;
        let reply =
            qmp.human_monitor_command(command)
                .map_err(|source| BackendError::QmpCommand {
                    node: name.clone(),
                    command: command.to_owned(),
                    source: Box::new(source),
                })?;
        if accepted(&reply) {
            Ok(reply)
        } else {
            Err(BackendError::Refused {
                node: name,
                command: command.to_owned(),
                reply: reply.trim().to_owned(),
            })
        }
    }

    fn drop_qmp(&mut self, node: NodeId) {
        self.qmp[node.index()] = None;
        self.events[node.index()] = None;
    }
}

impl NodeBackend for QemuBackend {
    fn accel(&self) -> (String, String) {
        (
            format!("{:?}", self.accel.accel).to_lowercase(),
            self.accel.reason.clone(),
        )
    }

    fn process_name(&self) -> &'static str {
        "QEMU"
    }

    fn spawn(&mut self, node: NodeId, plan: &SpawnPlan) -> Result<u32, BackendError> {
        let paths = self.children.paths(node).clone();
        // QEMU gets its own duplicate: the tap lives as long as the QEMU.
        let tap = match &self.bridge {
            Some(bridge) => Some((
                Arc::new(bridge.open_tap(node.index()).map_err(|source| {
                    BackendError::Network {
                        node: plan.name.clone(),
                        source: Box::new(source),
                    }
                })?),
                bridge.mac(node.index()),
            )),
            None => None,
        };
        let nics = interconnect_nics(plan, node.index() as u16);
        // QEMU binds its ends of the interconnect; an earlier QEMU of this node left them.
        for (_, local, _, _) in &nics {
            let _ = std::fs::remove_file(local);
        }
        let command = self.command(&paths, plan, &nics, tap)?;
        log::debug!("node {}: {}", plan.name, display_command(&command));
        let _ = std::fs::remove_file(&paths.qmp_socket);
        self.drop_qmp(node);
        self.children.spawn(node, command)
    }

    fn connect(&mut self, node: NodeId) -> Result<(), BackendError> {
        let name = self.name(node);
        let socket = self.children.paths(node).qmp_socket.clone();
        let qmp = {
            let Some(child) = self.children.child_mut(node) else {
                return Err(BackendError::NotRunning { node: name });
            };
            qemu::connect_qmp(child, &socket, QMP_CONNECT_TIMEOUT).map_err(|source| {
                BackendError::Qmp {
                    node: name,
                    source: Box::new(source),
                }
            })?
        };
        self.events[node.index()] = Some(qmp.events());
        self.qmp[node.index()] = Some(qmp);
        Ok(())
    }

    fn adopt(&mut self, node: NodeId, record: &RunRecord) -> Result<Adopted, BackendError> {
        let name = self.name(node);
        self.children.adopt(node, record)?;
        let socket = self.children.paths(node).qmp_socket.clone();
        let mut qmp = match QmpClient::connect(&socket, QMP_ADOPT_TIMEOUT) {
            Ok(qmp) => qmp,
            Err(error) => {
                // A hung QEMU does not answer; its heartbeat will tell, and the fence
                // works through the pidfd without QMP.
                log::warn!(
                    "node {name}: QMP at {} does not answer: {}",
                    socket.display(),
                    wire::error_chain::one_line(&error)
                );
                return Ok(Adopted {
                    paused: false,
                    note: format!(
                        "QEMU pid {} adopted without QMP (not answering)",
                        record.pid
                    ),
                });
            }
        };
        // Later commands get the time a launched node's do.
        qmp.set_timeout(QMP_CONNECT_TIMEOUT);
        // QMP events sent while no hostd listened are lost: ask for the VM's state.
        let running = qmp
            .execute("query-status", None)
            .map(|status| status["running"].as_bool().unwrap_or(true))
            .unwrap_or(true);
        self.events[node.index()] = Some(qmp.events());
        self.qmp[node.index()] = Some(qmp);
        Ok(Adopted {
            paused: !running,
            note: format!(
                "QEMU pid {} adopted{}",
                record.pid,
                if running { "" } else { " (VM paused)" }
            ),
        })
    }

    fn poll(&mut self, node: NodeId) -> Polled {
        let exited = self.children.poll_exit(node);
        let mut events = Vec::new();
        if let Some(channel) = &self.events[node.index()] {
            // QEMU says why it stops (GUEST_PANICKED, SHUTDOWN) before it exits, but the
            // event may still be on its way through the QMP reader when the exit is seen:
            // after an exit, take every event up to the end of the connection, so the
            // cause is judged before the bare exit.
            let pending: Vec<QmpEvent> = if exited.is_some() {
                let deadline = Instant::now() + EVENTS_AFTER_EXIT;
                std::iter::from_fn(|| channel.recv_deadline(deadline).ok()).collect()
            } else {
                channel.try_iter().collect()
            };
            for event in pending {
                log::debug!(
                    "node {}: QMP event {} {}",
                    self.children.name(node),
                    event.name,
                    event.data
                );
                match event.name.as_str() {
                    "STOP" => events.push(VmEvent::Stopped),
                    "RESUME" => events.push(VmEvent::Resumed),
                    "GUEST_PANICKED" => events.push(VmEvent::Panicked(event.data.to_string())),
                    "SHUTDOWN" => events.push(VmEvent::Shutdown(event.data.to_string())),
                    _ => {}
                }
            }
        }
        Polled {
            exited,
            events,
            scheduling: None,
        }
    }

    fn scheduling(&mut self, node: NodeId) -> Option<Scheduling> {
        // The vCPUs run the guest: the QEMU's other threads (I/O, QMP) may run while the
        // guest itself is stuck.
        self.children.scheduling(node, Some(GuestThreads::Vcpus))
    }

    fn pid(&self, node: NodeId) -> Option<u32> {
        self.children.pid(node)
    }

    fn has_exited(&mut self, node: NodeId) -> bool {
        self.children.has_exited(node)
    }

    fn signal(&mut self, node: NodeId, signal: Signal) -> Result<(), BackendError> {
        self.children.signal(node, signal)
    }

    fn fence(&mut self, node: NodeId, timeout: Duration) -> Result<String, BackendError> {
        // Its QMP connection dies with it; drop it first so nothing waits on it.
        self.drop_qmp(node);
        self.children.fence(node, timeout)
    }

    fn forward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError> {
        if self.bridge.is_some() {
            // The agent holds the service IP once it serves the identity.
            return Ok(());
        }
        self.hmp(
            node,
            &format!("hostfwd_add n0 tcp:127.0.0.1:{port}-:{GUEST_NBD_PORT}"),
            hostfwd_succeeded,
        )
        .map(drop)
    }

    fn unforward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError> {
        if self.bridge.is_some() {
            // A release drops the service IP first, in the agent.
            return Ok(());
        }
        self.hmp(
            node,
            &format!("hostfwd_remove n0 tcp:127.0.0.1:{port}"),
            hostfwd_succeeded,
        )
        .map(drop)
    }

    fn forwarded_ports(&mut self, node: NodeId) -> Option<Result<Vec<u16>, BackendError>> {
        if self.bridge.is_some() {
            return None;
        }
        Some(
            self.hmp(node, "info usernet", |_| true)
                .map(|table| forwarded_ports(&table)),
        )
    }

    fn set_network_link(
        &mut self,
        node: NodeId,
        link: u16,
        peers: &[u16],
        up: bool,
    ) -> Result<bool, BackendError> {
        self.set_interconnect_link(node, link, peers, up)
            .map(|()| true)
    }

    fn agents_listen(&self) -> bool {
        false
    }

    fn panic(&mut self, node: NodeId) -> Result<(), BackendError> {
        let name = self.name(node);
        let qmp = self.qmp[node.index()]
            .as_mut()
            .ok_or(BackendError::NoQmp { node: name.clone() })?;
        qmp.execute("inject-nmi", None)
            .map(drop)
            .map_err(|source| BackendError::QmpCommand {
                node: name,
                command: "inject-nmi".into(),
                source: Box::new(source),
            })
    }

    fn kill_agent(&mut self, node: NodeId) -> Result<String, BackendError> {
        // The guest runs a shell on its second serial port; the agent's respawn loop in
        // the guest's init starts it again.
        let name = self.name(node);
        let socket = self.children.paths(node).shell_socket.clone();
        run_in_shell(&socket, "pid=$(pidof guest-agent) && kill -9 $pid").map_err(|source| {
            BackendError::Shell {
                node: name.clone(),
                socket,
                source,
            }
        })?;
        Ok(format!(
            "SIGKILL sent to the guest agent inside node {name} (from its shell)"
        ))
    }

    fn stop_all(&mut self, timeout: Duration) -> Stopped {
        let mut asked = Vec::new();
        for index in 0..self.qmp.len() {
            let node = NodeId::from_index(index);
            if !self.children.running(node) {
                continue;
            }
            let request = match self.qmp[index].as_mut() {
                Some(qmp) => {
                    qmp.set_timeout(QMP_QUIT_TIMEOUT);
                    qmp.quit()
                        .map(|()| "quit cleanly")
                        .map_err(|e| wire::error_chain::one_line(&e))
                }
                None => self
                    .children
                    .terminate(node)
                    .map(|()| "stopped (SIGTERM)")
                    .map_err(|e| wire::error_chain::one_line(&e)),
            };
            asked.push((node, request));
        }
        let stopped = self.children.finish_stop(asked, timeout);
        for index in 0..self.qmp.len() {
            self.drop_qmp(NodeId::from_index(index));
        }
        stopped
    }

    fn kill_all(&mut self) {
        self.children.kill_all(KILL_TIMEOUT);
    }

    fn disown_all(&mut self) {
        self.children.disown_all();
    }
}

fn image(config: &Config) -> Result<(PathBuf, PathBuf), QemuSetupError> {
    let dir = qemu::image::default_image_dir();
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
            return Err(QemuSetupError::NoImage { path: path.clone() });
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

fn choose_accel(config: &Config, binary: &Path) -> Result<AccelChoice, QemuSetupError> {
    match config.qemu.accel {
        AccelSetting::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "configured (qemu.accel = \"tcg\")".into(),
        }),
        AccelSetting::Kvm => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: "configured (qemu.accel = \"kvm\")".into(),
        }),
        AccelSetting::Auto => qemu::accel::detect(binary).map_err(QemuSetupError::Accel),
    }
}

fn display_command(command: &std::process::Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether an HMP `hostfwd_add` / `hostfwd_remove` reply means it worked: `hostfwd_add`
/// says nothing when it works, `hostfwd_remove` says "... removed" (or "... not found":
/// gone already).
fn hostfwd_succeeded(reply: &str) -> bool {
    let reply = reply.trim();
    reply.is_empty() || reply.ends_with(" removed") || reply.ends_with(" not found")
}

/// The host ports HMP `info usernet` lists as forwarded from 127.0.0.1, e.g.
/// `  TCP[HOST_FORWARD]  12   127.0.0.1 24809  10.0.2.15 10809   0   0`.
fn forwarded_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.first().is_some_and(|f| f.contains("HOST_FORWARD")) {
                return None;
            }
            fields
                .windows(2)
                .find(|w| w[0] == "127.0.0.1")
                .and_then(|w| w[1].parse().ok())
        })
        .collect()
}

/// The QEMU id of node's NIC for `link` to `peer`.
fn nic_id(link: u16, peer: u16) -> String {
    format!("ic{link}n{peer}")
}

/// An interconnect NIC: its id, its socket, the peer's socket (where its frames go) and its
/// MAC.
type InterconnectNic = (String, PathBuf, PathBuf, String);

/// Node `me`'s interconnect NICs, one for each network link and peer.
fn interconnect_nics(plan: &SpawnPlan, me: u16) -> Vec<InterconnectNic> {
    use wire::interconnect::{format_mac, netdev_socket_name, nic_mac};
    let ic = &plan.options.interconnect;
    if !ic.enabled() {
        return Vec::new();
    }
    let dir = &plan.interconnect_dir;
    (0..ic.links)
        .flat_map(|link| ic.peers.iter().map(move |&peer| (link, peer)))
        .map(|(link, peer)| {
            (
                nic_id(link, peer),
                dir.join(netdev_socket_name(link, me, peer)),
                dir.join(netdev_socket_name(link, peer, me)),
                format_mac(nic_mac(link, me, peer)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_usernet_forwards() {
        let table = "Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]   3       127.0.0.1 24999       10.0.2.15 10809     0     0\r\n  TCP[ESTABLISHED]   14       127.0.0.1 24998       10.0.2.15 10809     0     0\r\n";
        assert_eq!(
            forwarded_ports(table),
            [24999],
            "a connection is not a forward"
        );
        assert!(forwarded_ports("").is_empty());
    }

    #[test]
    fn hostfwd_replies() {
        assert!(hostfwd_succeeded(""));
        assert!(hostfwd_succeeded(
            "host forwarding rule for tcp:127.0.0.1:24809 removed\r\n"
        ));
        assert!(hostfwd_succeeded(
            "host forwarding rule for tcp:127.0.0.1:24809 not found\r\n"
        ));
        assert!(!hostfwd_succeeded(
            "Could not set up host forwarding rule 'tcp:127.0.0.1:1-:2'"
        ));
        assert!(!hostfwd_succeeded("invalid format"));
    }
}
