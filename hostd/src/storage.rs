//! The storage daemon as hostd runs it: the plan (which node attaches which disk, over
//! which socket), starting it before the guests and adopting it across hostd restarts, and
//! the reservation requests: a node's key at each start, preemption at each fence. It also
//! keeps the coordinator (`wire::coordinator`): every move of hostd's is an `Assign` there,
//! and hostd reads it to adopt what the agents claimed while it was away. With the process
//! backend it runs for the coordinator alone (no disks).
//!
//! The daemon is a process of its own (`ivha-blkd`), never a thread of hostd: hostd may
//! die, the disks must not. Like a QEMU, it outlives a killed hostd and is found again
//! through its record, `STATE_DIR/run/blkd.json` (pid and start time, so a recycled pid is
//! never taken for it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::QemuChild;
use serde::{Deserialize, Serialize};
use wire::coordinator::{CoordinatorState, IdentityOwner};
use wire::storage::{
    Attachment, CoordinatorNode, CoordinatorPlan, DiskReservationStatus, PlannedDisk, StoragePlan,
    StorageRequest, StorageResponse,
};

use crate::daemon::prepare::NodeFiles;
use crate::daemon::topology::{NodeId, Topology};
use crate::state_dir::StateDir;

/// How long the daemon may take to answer on its control socket after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take (a preemption waits for the victim's write in progress).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often hostd asks a running daemon whether it answers, how long it waits, and after
/// how many unanswered probes in a row it replaces it.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const PROBES_BEFORE_REPLACING: u32 = 3;
/// How long `hostd status` waits for the disks' reservations.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long hostd's loop waits for the coordinator's state (it asks about once a second).
const COORDINATOR_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a stopped daemon may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors running the storage daemon or asking it something.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(
        "ivha-blkd not found at {}: build it (`cargo build -p blkd`) or set IVHA_BLKD_BINARY",
        path.display()
    )]
    NoBinary { path: PathBuf },
    #[error("the socket path {} is too long ({len} bytes; at most {})", path.display(), qemu::cmdline::MAX_SOCKET_PATH)]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error(
        "the disk serial {serial:?} is longer than the {} bytes virtio-blk has: use a node name of at most 15 characters",
        qemu::cmdline::MAX_DISK_SERIAL
    )]
    SerialTooLong { serial: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the storage daemon")]
    Spawn(#[source] qemu::ChildError),
    #[error("the storage daemon did not answer within {waited:?} of its start (see {})", log.display())]
    NotReady { waited: Duration, log: PathBuf },
    #[error("the storage daemon does not answer")]
    Unreachable(#[source] std::io::Error),
    #[error("the storage daemon refused: {message}")]
    Refused { message: String },
    #[error("the storage daemon answered something else than asked")]
    UnexpectedAnswer,
    #[error(
        "the disks are not served by the storage daemon (disks.served_by = \"qemu\", or the process backend): only a kill fences"
    )]
    NoDaemon,
    #[error(
        "the storage daemon keeps no coordinator (failover.without_hostd is off, or disks.served_by = \"qemu\")"
    )]
    NoCoordinator,
}

/// What the daemon should serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The disk images (QEMU guests with `served_by = "blkd"`).
    pub disks: bool,
    /// The coordinator (`Config::runs_coordinator`).
    pub coordinator: bool,
}

/// The coordinator's answer to a change hostd asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordinated {
    /// Carried out; the state after it.
    Accepted(CoordinatorState),
    /// Refused: the coordinator is at a newer generation than asked (an agent claimed
    /// something while hostd was away). hostd adopts this state.
    Stale(CoordinatorState),
}

/// What lets a restarted hostd find the daemon.
#[derive(Debug, Serialize, Deserialize)]
struct DaemonRecord {
    pid: u32,
    start_time: u64,
}

/// The plan for `files` (per node, in order): disk `i` is node `i`'s; it is attached by
/// its node and by every node that may take that node over, each over a socket of its own.
/// With `served.coordinator`, each node gets its coordinator socket too.
pub fn plan(
    state: &StateDir,
    topology: &Topology,
    files: &[NodeFiles],
    served: Served,
) -> Result<StoragePlan, StorageError> {
    let dir = state.storage_dir();
    let mut disks = Vec::new();
    let owners = topology.nodes().filter(|_| served.disks);
    for owner in owners {
        let name = topology.name(owner).to_owned();
        let attachments = topology
            .nodes()
            .filter(|&node| node == owner || topology.watched_by(node).contains(&owner))
            .map(|node| {
                let socket = dir.join(format!("{name}-{}.sock", topology.name(node)));
                let len = socket.as_os_str().len();
                if len > qemu::cmdline::MAX_SOCKET_PATH {
                    return Err(StorageError::SocketPathTooLong { path: socket, len });
                }
                Ok(Attachment {
                    node: node.index() as u32,
                    socket,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serial = disk_serial(&name);
        if serial.len() > qemu::cmdline::MAX_DISK_SERIAL {
            return Err(StorageError::SerialTooLong { serial });
        }
        disks.push(PlannedDisk {
            serial,
            path: files[owner.index()].disk.clone(),
            name,
            attachments,
        });
    }
    let coordinator = served
        .coordinator
        .then(|| coordinator_plan(&dir, topology, !served.disks))
        .transpose()?;
    Ok(StoragePlan {
        control_socket: dir.join("control.sock"),
        reservations: dir.join("reservations.json"),
        disks,
        coordinator,
    })
}

/// The coordinator's part of the plan: its state file, and per node its socket and takers.
/// `kill_victims`: no disk fences a claimed node (the process backend), so the daemon
/// kills it.
fn coordinator_plan(
    dir: &Path,
    topology: &Topology,
    kill_victims: bool,
) -> Result<CoordinatorPlan, StorageError> {
    let nodes = topology
        .nodes()
        .map(|node| {
            let socket = dir.join(wire::coordinator::socket_name(topology.name(node)));
            let len = socket.as_os_str().len();
            if len > qemu::cmdline::MAX_SOCKET_PATH {
                return Err(StorageError::SocketPathTooLong { path: socket, len });
            }
            Ok(CoordinatorNode {
                node: node.index() as u32,
                socket,
                takers: topology
                    .takeover_by(node)
                    .iter()
                    .map(|taker| taker.index() as u32)
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CoordinatorPlan {
        state: dir.join("coordinator.json"),
        identities: topology.len() as u32,
        nodes,
        kill_victims,
    })
}

/// The serial a guest reads from node `name`'s disk (the agent finds its disks by it).
pub fn disk_serial(name: &str) -> String {
    format!("ivha-{name}")
}

/// Where hostd records the daemon it started.
fn record_path(state: &StateDir) -> PathBuf {
    state.run_dir().join("blkd.json")
}

/// The daemon's stdout and stderr.
fn log_path(state: &StateDir) -> PathBuf {
    state.root().join("consoles").join("blkd.log")
}

/// The daemon an earlier hostd recorded at `record`, if it still runs.
fn recorded(record: &Path, log: &Path) -> Option<QemuChild> {
    let record: DaemonRecord = serde_json::from_slice(&std::fs::read(record).ok()?).ok()?;
    QemuChild::adopt(record.pid, record.start_time, Some(log.to_owned())).ok()
}

/// `hostd down` without a daemon and without running nodes: stops the storage daemon an
/// earlier hostd left running, if any. Returns its pid.
pub fn stop_recorded(state: &StateDir) -> Option<u32> {
    let record = record_path(state);
    let mut child = recorded(&record, &log_path(state))?;
    let pid = child.pid();
    let _ = child.signal(qemu::Signal::Term);
    if !matches!(child.wait_timeout(STOP_TIMEOUT), Ok(Some(_))) {
        let _ = child.kill_and_reap(STOP_TIMEOUT);
    }
    let _ = std::fs::remove_file(&record);
    Some(pid)
}

/// What [`StorageDaemon::ensure_running`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// It was running.
    Running,
    /// A daemon an earlier hostd started runs and answers: it is this hostd's now.
    Adopted { pid: u32 },
    /// A new daemon runs.
    Started { pid: u32 },
}

/// What hostd asks of whatever serves the disks with reservations: the storage daemon
/// ([`StorageDaemon`]), or a test double that records the calls.
pub trait Storage: std::fmt::Debug + Send {
    /// Makes sure it runs (adopting or starting it); says what it did.
    fn ensure_running(&mut self) -> Result<Ensured, StorageError>;
    /// Its pid, while it runs.
    fn pid(&self) -> Option<u32>;
    /// The socket over which `node` attaches `disk` (its owner's name).
    fn socket(&self, disk: &str, node: NodeId) -> Option<PathBuf>;
    /// Every disk's reservation.
    fn status(&self) -> Result<Vec<DiskReservationStatus>, StorageError>;
    /// Registers `node` on the disks it attaches; returns those that changed.
    fn register(&self, node: NodeId) -> Result<Vec<DiskReservationStatus>, StorageError>;
    /// Preempts `victim`'s keys (by `by` where registered); returns each preempted disk
    /// with its preemptor.
    fn preempt(
        &self,
        victim: NodeId,
        by: Option<NodeId>,
    ) -> Result<Vec<(u32, DiskReservationStatus)>, StorageError>;
    /// Stops it (after the guests).
    fn stop(&mut self);
    /// Whether it serves the disks (with the process backend it runs for the coordinator
    /// alone).
    fn serves_disks(&self) -> bool;
    /// Whether it keeps the coordinator.
    fn keeps_coordinator(&self) -> bool;
    /// Node `node`'s coordinator socket; None without a coordinator.
    fn coordinator_socket(&self, node: NodeId) -> Option<PathBuf>;
    /// The coordinator's state.
    fn coordinator(&self) -> Result<CoordinatorState, StorageError>;
    /// hostd moves `identity` to `node` at `generation` (its new epoch).
    fn assign(
        &self,
        identity: u32,
        node: Option<u32>,
        generation: u64,
    ) -> Result<Coordinated, StorageError>;
    /// Seeds the coordinator from the control region, which is ahead of it.
    fn sync(
        &self,
        generation: u64,
        owners: Vec<IdentityOwner>,
    ) -> Result<Coordinated, StorageError>;
    /// `node` is a member again (hostd restarts it after another node claimed it).
    fn rejoin(&self, node: NodeId) -> Result<CoordinatorState, StorageError>;
}

/// The storage daemon of one cluster.
#[derive(Debug)]
pub struct StorageDaemon {
    plan: StoragePlan,
    dir: PathBuf,
    record: PathBuf,
    log: PathBuf,
    binary: PathBuf,
    child: Option<QemuChild>,
    /// When the daemon was last asked whether it answers, and how many times in a row it
    /// did not: a hung daemon is replaced like a dead one.
    last_probe: Instant,
    unanswered: u32,
}

impl StorageDaemon {
    /// The daemon for `plan`; `ivha-blkd` from `IVHA_BLKD_BINARY`, else beside this binary.
    pub fn new(state: &StateDir, plan: StoragePlan) -> Result<Self, StorageError> {
        let binary = crate::programs::beside_hostd("IVHA_BLKD_BINARY", "ivha-blkd");
        if !binary.exists() {
            return Err(StorageError::NoBinary { path: binary });
        }
        Ok(Self {
            plan,
            dir: state.storage_dir(),
            record: record_path(state),
            log: log_path(state),
            binary,
            child: None,
            last_probe: Instant::now(),
            unanswered: 0,
        })
    }

    pub fn plan(&self) -> &StoragePlan {
        &self.plan
    }

    /// Whether the running daemon is alive and, when a probe is due, answers; a daemon
    /// that misses several probes in a row counts as dead.
    fn answers(&mut self, child: &mut QemuChild) -> bool {
        if !matches!(child.try_wait(), Ok(None)) {
            log::warn!("the storage daemon (pid {}) is gone", child.pid());
            return false;
        }
        if self.last_probe.elapsed() < PROBE_INTERVAL {
            return true;
        }
        self.last_probe = Instant::now();
        let answered = self.call(&StorageRequest::Status, PROBE_TIMEOUT).is_ok();
        self.unanswered = if answered { 0 } else { self.unanswered + 1 };
        if self.unanswered < PROBES_BEFORE_REPLACING {
            return true;
        }
        log::error!(
            "the storage daemon (pid {}) did not answer {} probes in a row: replacing it",
            child.pid(),
            self.unanswered
        );
        false
    }

    fn adopt(&self) -> Option<QemuChild> {
        let answered = self.call(&StorageRequest::Status, REQUEST_TIMEOUT);
        let mut child = match recorded(&self.record, &self.log) {
            Some(child) => child,
            None => {
                // No record, yet a daemon answers on this cluster's 0600 socket: one a
                // hostd started and died before recording it. It serves the guests; a
                // second one would not share its reservations.
                let Ok(StorageResponse::Status { pid, .. }) = answered else {
                    return None;
                };
                let start_time = qemu::process_start_time(pid).ok()?;
                return QemuChild::adopt(pid, start_time, Some(self.log.clone())).ok();
            }
        };
        match answered {
            Ok(StorageResponse::Status { pid, .. }) if pid == child.pid() => Some(child),
            _ => {
                // Ours (its pid and start time say so) but deaf: it must not keep serving
                // the QEMUs connected to it with reservations a new daemon would not
                // share. They reconnect to the new one.
                log::warn!(
                    "the storage daemon (pid {}) does not answer: stopping it",
                    child.pid()
                );
                let _ = child.kill_and_reap(STOP_TIMEOUT);
                None
            }
        }
    }

    fn start(&mut self) -> Result<(), StorageError> {
        let plan_path = self.dir.join("plan.json");
        crate::daemon::records::write_json(&plan_path, &self.plan).map_err(|source| {
            StorageError::Write {
                path: plan_path.clone(),
                source,
            }
        })?;
        std::fs::create_dir_all(self.log.parent().unwrap_or(Path::new("."))).map_err(|source| {
            StorageError::Write {
                path: self.log.clone(),
                source,
            }
        })?;
        let mut command = std::process::Command::new(&self.binary);
        command.arg("--plan").arg(&plan_path);
        let mut child =
            QemuChild::spawn_with_log(command, &self.log).map_err(StorageError::Spawn)?;
        // Recorded at once: a hostd that dies while this one starts leaves it findable.
        let recorded = qemu::process_start_time(child.pid()).and_then(|start_time| {
            let record = DaemonRecord {
                pid: child.pid(),
                start_time,
            };
            crate::daemon::records::write_json(&self.record, &record)
        });
        if let Err(source) = recorded {
            let _ = child.kill_and_reap(STOP_TIMEOUT);
            return Err(StorageError::Write {
                path: self.record.clone(),
                source,
            });
        }
        let started = Instant::now();
        loop {
            match self.call(&StorageRequest::Status, REQUEST_TIMEOUT) {
                Ok(StorageResponse::Status { pid, .. }) if pid == child.pid() => break,
                _ if started.elapsed() >= READY_TIMEOUT
                    || !matches!(child.try_wait(), Ok(None)) =>
                {
                    let _ = child.kill_and_reap(STOP_TIMEOUT);
                    return Err(StorageError::NotReady {
                        waited: started.elapsed(),
                        log: self.log.clone(),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        log::info!("storage daemon started (pid {})", child.pid());
        self.child = Some(child);
        Ok(())
    }

    fn call(
        &self,
        request: &StorageRequest,
        timeout: Duration,
    ) -> Result<StorageResponse, StorageError> {
        wire::storage::call(&self.plan.control_socket, request, timeout)
            .map_err(StorageError::Unreachable)
    }

    /// Asks the coordinator something: refused without one.
    fn coordinate(&self, request: &StorageRequest) -> Result<Coordinated, StorageError> {
        if self.plan.coordinator.is_none() {
            return Err(StorageError::NoCoordinator);
        }
        // A change waits as long as a preemption: a claim holds the coordinator while it
        // fences, and a change given up on would still be carried out after hostd moved on.
        let timeout = match request {
            StorageRequest::Coordinator => COORDINATOR_TIMEOUT,
            _ => REQUEST_TIMEOUT,
        };
        match self.call(request, timeout)? {
            StorageResponse::Coordinator { state } => Ok(Coordinated::Accepted(state)),
            StorageResponse::Stale { state } => Ok(Coordinated::Stale(state)),
            StorageResponse::Error { message } => Err(StorageError::Refused { message }),
            _ => Err(StorageError::UnexpectedAnswer),
        }
    }

    fn change(
        &self,
        request: &StorageRequest,
    ) -> Result<(bool, DiskReservationStatus), StorageError> {
        match self.call(request, REQUEST_TIMEOUT)? {
            StorageResponse::Done { changed, disk } => Ok((changed, disk)),
            StorageResponse::Error { message } => Err(StorageError::Refused { message }),
            _ => Err(StorageError::UnexpectedAnswer),
        }
    }
}

impl Storage for StorageDaemon {
    /// The socket over which `node` attaches `disk`'s image (the disk's owner's name).
    fn socket(&self, disk: &str, node: NodeId) -> Option<PathBuf> {
        self.plan
            .disks
            .iter()
            .find(|d| d.name == disk)?
            .attachments
            .iter()
            .find(|a| a.node == node.index() as u32)
            .map(|a| a.socket.clone())
    }

    /// The daemon's pid, while hostd knows it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(QemuChild::pid)
    }

    /// Makes sure the daemon runs: adopts the one an earlier hostd started if it is alive
    /// and answers, else starts one and waits until it answers. Returns what it did.
    fn ensure_running(&mut self) -> Result<Ensured, StorageError> {
        if let Some(mut child) = self.child.take() {
            if self.answers(&mut child) {
                self.child = Some(child);
                return Ok(Ensured::Running);
            }
            // Dead, or hung: replaced like a dead one.
            let _ = child.kill_and_reap(STOP_TIMEOUT);
            self.unanswered = 0;
        }
        if let Some(child) = self.adopt() {
            log::info!("adopted the storage daemon (pid {})", child.pid());
            let pid = child.pid();
            self.child = Some(child);
            return Ok(Ensured::Adopted { pid });
        }
        self.start()?;
        Ok(Ensured::Started {
            pid: self.pid().unwrap_or_default(),
        })
    }

    /// Stops the daemon (after the guests: nothing writes any more) and forgets it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.signal(qemu::Signal::Term);
            if !matches!(child.wait_timeout(STOP_TIMEOUT), Ok(Some(_))) {
                let _ = child.kill_and_reap(STOP_TIMEOUT);
            }
        }
        let _ = std::fs::remove_file(&self.record);
    }

    /// Every disk's reservation.
    fn status(&self) -> Result<Vec<DiskReservationStatus>, StorageError> {
        // Short: `hostd status` asks this on hostd's one thread.
        match self.call(&StorageRequest::Status, STATUS_TIMEOUT)? {
            StorageResponse::Status { disks, .. } => Ok(disks),
            StorageResponse::Error { message } => Err(StorageError::Refused { message }),
            _ => Err(StorageError::UnexpectedAnswer),
        }
    }

    /// Registers `node` on every disk it attaches (a new generation if it was preempted);
    /// a node takes its own disk's reservation if nobody holds it. Returns what changed.
    fn register(&self, node: NodeId) -> Result<Vec<DiskReservationStatus>, StorageError> {
        let mut changed = Vec::new();
        // The plan lists node i's disk i-th.
        for (owner, disk) in self.plan.disks.iter().enumerate() {
            if !disk
                .attachments
                .iter()
                .any(|a| a.node == node.index() as u32)
            {
                continue;
            }
            let (registered, mut status) = self.change(&StorageRequest::Register {
                disk: disk.name.clone(),
                node: node.index() as u32,
            })?;
            if status.holder.is_none() && owner == node.index() {
                let (_, reserved) = self.change(&StorageRequest::Reserve {
                    disk: disk.name.clone(),
                    node: node.index() as u32,
                })?;
                status = reserved;
            }
            if registered {
                changed.push(status);
            }
        }
        Ok(changed)
    }

    /// Removes `victim`'s key from every disk it is registered on (preempt and abort): once
    /// this returns, the victim has no write in progress and every later one fails. Each
    /// disk is preempted by `by` if it is registered there, else by another registrant;
    /// returns each preempted disk with its preemptor. A disk that cannot be preempted (no
    /// other registrant, or the daemon refused) is logged and the others are preempted.
    /// A disk with no other registrant keeps the victim's key (nobody may preempt it: SCSI
    /// asks the same); it is named in the error.
    fn preempt(
        &self,
        victim: NodeId,
        by: Option<NodeId>,
    ) -> Result<Vec<(u32, DiskReservationStatus)>, StorageError> {
        let victim = victim.index() as u32;
        let mut preempted = Vec::new();
        for disk in self.status()? {
            if !disk.registered.iter().any(|k| k.node == victim) {
                continue;
            }
            let others: Vec<u32> = disk
                .registered
                .iter()
                .map(|k| k.node)
                .filter(|&n| n != victim)
                .collect();
            let preemptor = by
                .map(|n| n.index() as u32)
                .filter(|n| others.contains(n))
                .or_else(|| others.first().copied());
            // One disk that cannot be preempted must not spare the victim the others.
            let Some(preemptor) = preemptor else {
                log::error!(
                    "disk {}: no other node is registered to preempt node {victim}; it keeps its key there",
                    disk.name
                );
                continue;
            };
            match self.change(&StorageRequest::Preempt {
                disk: disk.name.clone(),
                victim,
                by: preemptor,
            }) {
                Ok((_, status)) => preempted.push((preemptor, status)),
                Err(error) => log::error!(
                    "disk {}: cannot preempt node {victim}: {}",
                    disk.name,
                    wire::error_chain::one_line(&error)
                ),
            }
        }
        Ok(preempted)
    }

    fn serves_disks(&self) -> bool {
        !self.plan.disks.is_empty()
    }

    fn keeps_coordinator(&self) -> bool {
        self.plan.coordinator.is_some()
    }

    fn coordinator_socket(&self, node: NodeId) -> Option<PathBuf> {
        self.plan
            .coordinator
            .as_ref()?
            .nodes
            .iter()
            .find(|n| n.node == node.index() as u32)
            .map(|n| n.socket.clone())
    }

    fn coordinator(&self) -> Result<CoordinatorState, StorageError> {
        match self.coordinate(&StorageRequest::Coordinator)? {
            Coordinated::Accepted(state) => Ok(state),
            Coordinated::Stale(_) => Err(StorageError::UnexpectedAnswer),
        }
    }

    fn assign(
        &self,
        identity: u32,
        node: Option<u32>,
        generation: u64,
    ) -> Result<Coordinated, StorageError> {
        self.coordinate(&StorageRequest::Assign {
            identity,
            node,
            generation,
        })
    }

    fn sync(
        &self,
        generation: u64,
        owners: Vec<IdentityOwner>,
    ) -> Result<Coordinated, StorageError> {
        self.coordinate(&StorageRequest::Sync { generation, owners })
    }

    fn rejoin(&self, node: NodeId) -> Result<CoordinatorState, StorageError> {
        match self.coordinate(&StorageRequest::Rejoin {
            node: node.index() as u32,
        })? {
            Coordinated::Accepted(state) => Ok(state),
            Coordinated::Stale(_) => Err(StorageError::UnexpectedAnswer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The region and disk of nodes a, b and c.
    fn three_nodes_files() -> Vec<NodeFiles> {
        ["a", "b", "c"]
            .iter()
            .map(|n| NodeFiles {
                region: PathBuf::from(format!("/r/{n}")),
                disk: PathBuf::from(format!("/d/{n}.img")),
            })
            .collect()
    }

    #[test]
    fn every_disk_is_attached_by_its_node_and_its_takers() {
        let topology = Topology::new(["a".to_owned(), "b".to_owned(), "c".to_owned()]);
        let state = StateDir::new("/run/ivha");
        let files = three_nodes_files();
        let disks_only = Served {
            disks: true,
            coordinator: false,
        };
        let plan = plan(&state, &topology, &files, disks_only).unwrap();
        assert_eq!(plan.disks.len(), 3);
        assert_eq!(plan.coordinator, None);
        let a = &plan.disks[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.serial, "ivha-a");
        assert_eq!(a.path, PathBuf::from("/d/a.img"));
        assert_eq!(a.attachments[0].node, 0);
        assert_eq!(
            a.attachments[0].socket,
            PathBuf::from("/run/ivha/blkd/a-a.sock")
        );
        // Every other node may take a over in a three-node cluster by default.
        assert_eq!(a.attachments.len(), 3);
        assert_eq!(
            plan.control_socket,
            PathBuf::from("/run/ivha/blkd/control.sock")
        );

        let named = Topology::new(["a".to_owned(), "sixteen-letters1".to_owned()]);
        assert!(matches!(
            super::plan(&state, &named, &files[..2], disks_only),
            Err(StorageError::SerialTooLong { .. })
        ));
        let long = StateDir::new(format!("/{}", "x".repeat(100)));
        assert!(matches!(
            super::plan(&long, &topology, &files, disks_only),
            Err(StorageError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn the_coordinator_has_a_socket_per_node_and_each_node_s_takers() {
        let topology = Topology::with_takeover_order(
            ["a".to_owned(), "b".to_owned(), "c".to_owned()],
            vec![vec![1], vec![2, 0], vec![0, 1]],
        );
        let state = StateDir::new("/run/ivha");
        let files = three_nodes_files();
        let both = Served {
            disks: true,
            coordinator: true,
        };
        let plan = plan(&state, &topology, &files, both).unwrap();
        assert_eq!(plan.disks.len(), 3);
        let coordinator = plan.coordinator.unwrap();
        assert!(!coordinator.kill_victims, "the disks fence a claimed node");
        assert_eq!(
            coordinator.state,
            PathBuf::from("/run/ivha/blkd/coordinator.json")
        );
        assert_eq!(coordinator.identities, 3);
        let takers: Vec<(u32, Vec<u32>)> = coordinator
            .nodes
            .iter()
            .map(|n| (n.node, n.takers.clone()))
            .collect();
        assert_eq!(takers, [(0, vec![1]), (1, vec![2, 0]), (2, vec![0, 1])]);
        assert_eq!(
            coordinator.nodes[1].socket,
            PathBuf::from("/run/ivha/blkd/coord-b.sock")
        );
        // The process backend: the coordinator alone.
        let alone = Served {
            disks: false,
            coordinator: true,
        };
        let plan = super::plan(&state, &topology, &files, alone).unwrap();
        assert!(plan.disks.is_empty());
        let coordinator = plan.coordinator.unwrap();
        assert_eq!(coordinator.nodes.len(), 3);
        assert!(
            coordinator.kill_victims,
            "no disk fences a claimed agent process"
        );
        // The coordinator's sockets are checked like the disks'.
        let long = StateDir::new(format!("/{}", "x".repeat(90)));
        assert!(matches!(
            super::plan(&long, &topology, &files, alone),
            Err(StorageError::SocketPathTooLong { len, .. }) if len > qemu::cmdline::MAX_SOCKET_PATH
        ));
    }
}
