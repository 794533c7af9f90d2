//! The daemon's life: read the plan hostd wrote, load the reservations (and the
//! coordinator's state, if the plan has a coordinator), serve every (disk, node) socket and
//! every node's coordinator socket from threads of their own, and answer the control socket.
//!
//! Each attachment's thread serves one QEMU at a time and accepts the next connection when
//! it leaves, so a killed and restarted QEMU (or a restarted daemon, which QEMU reconnects
//! to) needs nothing from hostd.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wire::storage::{CoordinatorPlan, StoragePlan};

use crate::backend::{self, BlockBackend};
use crate::control;
use crate::coordination::Coordination;
use crate::coordinator::{self, Coordinator};
use crate::disk::{BlockFile, RawFile};
use crate::node_socket;
use crate::stonith::{HostProcesses, Stonith};
use crate::table::{LoadError, Table};

/// Queues per device: the guests are small, and requests complete in order per queue.
const QUEUES: usize = 1;

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the plan {}", path.display())]
    ReadPlan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a storage plan", path.display())]
    ParsePlan {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot open the lock file {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another storage daemon holds {} (one per cluster)", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("the plan names disk {0:?} twice")]
    DuplicateDisk(String),
    #[error("cannot load the reservations")]
    Reservations(#[from] LoadError),
    #[error("the plan's coordinator is not valid")]
    CoordinatorPlan(#[from] coordinator::PlanError),
    #[error("cannot load the coordinator")]
    Coordinator(#[from] coordinator::OpenError),
    #[error("cannot serve node {node}'s coordinator socket")]
    NodeSocket {
        node: u32,
        #[source]
        source: control::ControlSocketError,
    },
    #[error("cannot open disk {disk}")]
    OpenDisk {
        disk: String,
        #[source]
        source: crate::disk::OpenError,
    },
    #[error("cannot serve the control socket")]
    Control(#[from] control::ControlSocketError),
    #[error("cannot start the thread for {}", socket.display())]
    Thread {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads and checks the plan at `path`.
pub fn read_plan(path: &Path) -> Result<StoragePlan, StartError> {
    let bytes = std::fs::read(path).map_err(|source| StartError::ReadPlan {
        path: path.to_owned(),
        source,
    })?;
    let plan: StoragePlan =
        serde_json::from_slice(&bytes).map_err(|source| StartError::ParsePlan {
            path: path.to_owned(),
            source,
        })?;
    let mut names = std::collections::BTreeSet::new();
    for disk in &plan.disks {
        if !names.insert(disk.name.as_str()) {
            return Err(StartError::DuplicateDisk(disk.name.clone()));
        }
    }
    if let Some(coordinator) = &plan.coordinator {
        coordinator::check_plan(coordinator)?;
    }
    Ok(plan)
}

/// Holds the lock beside the control socket: one daemon per plan, or two would serve the
/// same disks with reservations the other does not see.
fn lock(plan: &StoragePlan) -> Result<nix::fcntl::Flock<std::fs::File>, StartError> {
    let path = plan.control_socket.with_file_name("blkd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::Lock {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StartError::AlreadyRunning { path })
}

/// Runs the daemon for `plan` until the process is killed. Returns only if it cannot start.
pub fn run(plan: &StoragePlan) -> Result<(), StartError> {
    let _lock = lock(plan)?;
    let names: Vec<String> = plan.disks.iter().map(|d| d.name.clone()).collect();
    let table = Arc::new(Table::load(&plan.reservations, &names)?);
    // The control socket answers only once every disk is open: hostd takes an answer to
    // mean the daemon is ready.
    let mut attachments = Vec::new();
    for disk in &plan.disks {
        let file: Arc<dyn BlockFile> =
            Arc::new(
                RawFile::open(&disk.path).map_err(|source| StartError::OpenDisk {
                    disk: disk.name.clone(),
                    source,
                })?,
            );
        for attachment in &disk.attachments {
            let gate = table
                .gate(&disk.name, attachment.node)
                .ok_or_else(|| StartError::DuplicateDisk(disk.name.clone()))?;
            attachments.push((
                attachment.socket.clone(),
                Arc::clone(&file),
                disk.serial.clone(),
                gate,
            ));
        }
    }
    for (socket, file, serial, gate) in attachments {
        let name = socket
            .file_name()
            .map_or_else(|| "disk".to_owned(), |n| n.to_string_lossy().into_owned());
        std::thread::Builder::new()
            .name(name)
            .spawn({
                let socket = socket.clone();
                move || {
                    let make = || {
                        BlockBackend::new(Arc::clone(&file), serial.clone(), gate.clone(), QUEUES)
                    };
                    if let Err(error) = backend::serve(&socket, make) {
                        // One attachment failing must not take the others down: its QEMU
                        // waits, reconnecting, and the log says why.
                        log::error!("{}", wire::error_chain::one_line(&error));
                    }
                }
            })
            .map_err(|source| StartError::Thread { socket, source })?;
    }
    let coordination = match &plan.coordinator {
        Some(coordinator) => Some(coordinate(coordinator, &table, names)?),
        None => None,
    };
    let listener = control::listen(&plan.control_socket)?;
    log::info!(
        "serving {} disk(s){}; control socket {}",
        plan.disks.len(),
        if coordination.is_some() {
            " and the coordinator"
        } else {
            ""
        },
        plan.control_socket.display()
    );
    control::serve(&listener, &table, coordination.as_deref());
    Ok(())
}

/// Loads the coordinator and serves each node's socket from a thread of its own.
fn coordinate(
    plan: &CoordinatorPlan,
    table: &Arc<Table>,
    disks: Vec<String>,
) -> Result<Arc<Coordination>, StartError> {
    let coordinator = Coordinator::open(plan)?;
    let generation = coordinator.state().generation;
    let stonith = plan
        .kill_victims
        .then(|| Stonith::new(Box::new(HostProcesses)));
    let coordination = Arc::new(Coordination::new(
        coordinator,
        Arc::clone(table),
        disks,
        stonith,
    ));
    for node in &plan.nodes {
        let id = node.node;
        let listener = control::listen(&node.socket)
            .map_err(|source| StartError::NodeSocket { node: id, source })?;
        std::thread::Builder::new()
            .name(format!("coordinator-{id}-accept"))
            .spawn({
                let coordination = Arc::clone(&coordination);
                move || node_socket::serve(&listener, id, &coordination)
            })
            .map_err(|source| StartError::Thread {
                socket: node.socket.clone(),
                source,
            })?;
    }
    log::info!(
        "coordinator at generation {generation}; {} node socket(s){}",
        plan.nodes.len(),
        if plan.kill_victims {
            "; a won claim kills its victim's process"
        } else {
            ""
        }
    );
    Ok(coordination)
}
