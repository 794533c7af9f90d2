//! The daemon: launches the cluster, watches it, answers the control socket, shuts it down.
//!
//! One thread owns all cluster state (the main loop below); the control socket and signal
//! threads only pass requests to it over a channel. No locks, no shared mutable state.
//!
//! - [`topology`]: node and identity ids, and who may take over whom;
//! - [`backend`]: where nodes run (QEMU guests, agent processes, a fake for tests);
//! - `health`: one node's liveness from its heartbeat and its backend's reports;
//! - `cluster`: the nodes, the control region (owners, commands), sampling and status,
//!   and keeping in step with the coordinator (`claims`: what to adopt from it);
//! - `moves`: takeover, planned takeover and giveback; `inject`: `hostd kill`;
//! - `fencing`: `hostd fence` and `hostd unfence` (the storage daemon's reservations);
//! - `records` and `adopt`: what a restarted hostd finds and how it adopts the nodes;
//! - [`prepare`]: regions and disks; `socket`: the control socket;
//! - `metrics`: Prometheus metrics, served from a thread of their own.

mod adopt;
pub mod backend;
mod claims;
mod cluster;
mod fencing;
mod health;
mod heartbeat_figures;
mod inject;
mod interconnect;
mod links;
mod metrics;
mod moves;
pub mod prepare;
pub(crate) mod records;
mod socket;
pub mod topology;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{Backend, Config};
use crate::state_dir::StateDir;
use moves::send;
use socket::Envelope;
use wire::control::{ClusterStatus, Request, Response};

/// Errors that stop the daemon from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "another hostd is already running for state directory {path} (stop it with `hostd down`)"
    )]
    AlreadyRunning { path: PathBuf },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
    #[error("cannot set up QEMU")]
    Qemu(#[from] backend::qemu::QemuSetupError),
    #[error("cannot set up the agent processes")]
    Process(#[from] backend::process::NoAgent),
    #[error("cannot launch the cluster")]
    Launch(#[from] cluster::LaunchError),
    #[error("cannot set up the storage daemon")]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Adopt(#[from] adopt::AdoptError),
    #[error("cannot serve the control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error(
        "cannot tell whether the cluster an earlier hostd started still runs; nothing was started or stopped"
    )]
    Records(#[from] records::RecordError),
}

/// Runs the daemon in this process until `down` or SIGINT/SIGTERM. `on_progress` is called
/// with each status while the guests boot, until both are up.
pub fn run(
    config: &Config,
    state: &StateDir,
    mut on_progress: impl FnMut(&ClusterStatus),
) -> Result<(), DaemonError> {
    // Signals go to a dedicated thread; block them before any other thread starts so they
    // inherit the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(DaemonError::Signals)?;

    state.create().map_err(|source| DaemonError::Io {
        path: state.root().to_owned(),
        source,
    })?;
    let lock = lock(state)?;
    // A pair left running by an earlier hostd is adopted with the configuration it was
    // started with: its QEMUs were built from it.
    let saved_config = records::load_config(state);
    let running = records::running_nodes(state, saved_config.as_ref().unwrap_or(config))?;
    let adopted_config = match saved_config {
        Some(saved) if !running.is_empty() => {
            if saved != *config {
                log::warn!(
                    "adopting the running pair with the configuration it was started with; \
                     the configuration given now applies after `hostd down` and `hostd up`"
                );
            }
            Some(saved)
        }
        _ => None,
    };
    let config = adopted_config.as_ref().unwrap_or(config);
    let bridge = crate::network::BridgeNetwork::from_config(config, state);
    let (files, control) = prepare::prepare(config, state, bridge.as_ref())?;
    let (requests_tx, requests) = crossbeam_channel::unbounded::<Envelope>();
    let listener =
        socket::serve(&state.control_socket(), requests_tx.clone()).map_err(|source| {
            DaemonError::Socket {
                path: state.control_socket(),
                source,
            }
        })?;
    let signal_tx = requests_tx;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                log::info!("{signal:?}: stopping the pair");
                let _ = signal_tx.send(Envelope {
                    request: Request::Down { purge: false },
                    reply: None,
                    written: None,
                });
            }
        })
        .map_err(|source| DaemonError::Io {
            path: PathBuf::from("signal thread"),
            source,
        })?;

    // Before the nodes start, so that a scrape sees them boot.
    let mut cluster_metrics = metrics::Metrics::default();
    let metrics_server = metrics::server::start(&config.metrics, &mut cluster_metrics);
    let paths = cluster::node_paths(config, state);
    let backend: Box<dyn backend::NodeBackend> = match config.backend {
        Backend::Qemu => Box::new(backend::qemu::QemuBackend::new(
            config,
            paths,
            bridge.clone(),
        )?),
        Backend::Process => Box::new(backend::process::ProcessBackend::new(paths)?),
    };
    // Before the guests: they attach their disks and the coordinator at its sockets.
    let storage = storage_daemon(config, state, &files)?;
    let cluster = cluster::Cluster::new(config, state, &files, &control, backend)?
        .with_metrics(cluster_metrics)
        .with_bridge(bridge)
        .with_storage(storage);
    let mut cluster = if running.is_empty() {
        cluster.launch()?
    } else {
        log::info!(
            "adopting the running cluster ({} node(s) alive)",
            running.len()
        );
        let mut adopted = adopt::adopt(cluster, &running)?;
        // Its guests are attached to the daemon an earlier hostd started, if it lives.
        adopted.check_storage();
        // Before any decision: what the agents claimed while no hostd ran is the truth
        // (a node they claimed is fenced here, before its missing key could count as a
        // fence kept running).
        adopted.adopt_coordinator();
        // hostd is back: the agents stop acting alone.
        adopted.beat();
        adopted.reconcile_fences();
        adopted
    };
    let result = main_loop(&mut cluster, &requests, &mut on_progress);
    // Children (reaped), then the lock, then the socket: `hostd down` takes a gone socket
    // to mean the state directory is free for the next `hostd up`. The metrics address
    // too must be free by then.
    drop(cluster);
    drop(metrics_server);
    drop(lock);
    drop(listener);
    let _ = std::fs::remove_file(state.control_socket());
    result
}

fn main_loop(
    cluster: &mut cluster::Cluster,
    requests: &Receiver<Envelope>,
    on_progress: &mut impl FnMut(&ClusterStatus),
) -> Result<(), DaemonError> {
    let tick = cluster.tick();
    let mut moves = moves::Moves::default();
    let mut booting = true;
    let mut last_progress = Instant::now() - PROGRESS_INTERVAL;
    let mut last_metrics = Instant::now() - METRICS_INTERVAL;
    let mut next_tick = Instant::now();
    loop {
        let timeout = crossbeam_channel::after(next_tick.saturating_duration_since(Instant::now()));
        select! {
            recv(requests) -> envelope => {
                let Ok(Envelope { request, reply, written }) = envelope else { continue };
                match request {
                    Request::Status => send(reply, Response::Status(cluster.status())),
                    Request::Kill { node, signal } => {
                        let response = match inject::inject(cluster, &node, signal) {
                            Ok(message) => Response::Killed { message },
                            Err(error) => error_response(&error),
                        };
                        send(reply, response);
                    }
                    Request::Takeover { node, to } => {
                        let response = match moves::planned_takeover(cluster, &node, to.as_deref()) {
                            Ok(report) => Response::Moved(report),
                            Err(error) => error_response(&error),
                        };
                        send(reply, response);
                    }
                    Request::Giveback { node } => moves.start_giveback(cluster, &node, reply),
                    Request::Fence { node, keep_running } => {
                        let response = match fencing::fence(cluster, &node, keep_running) {
                            Ok(message) => Response::Fenced { message },
                            Err(error) => error_response(&error),
                        };
                        send(reply, response);
                    }
                    Request::Link { node, link, up } => {
                        let response = match links::set_link(cluster, &node, link, up) {
                            Ok(message) => Response::Linked { message },
                            Err(error) => error_response(&error),
                        };
                        send(reply, response);
                    }
                    Request::Unfence { node } => {
                        let response = match fencing::unfence(cluster, &node) {
                            Ok(message) => Response::Fenced { message },
                            Err(error) => error_response(&error),
                        };
                        send(reply, response);
                    }
                    Request::Down { purge } => {
                        let report = cluster.shut_down(purge);
                        log::info!("cluster stopped: {:?}", report.stopped);
                        send(reply, Response::Down(report));
                        if let Some(written) = written {
                            let _ = written.recv_timeout(Duration::from_secs(2));
                        }
                        return Ok(());
                    }
                }
            }
            recv(timeout) -> _ => {
                next_tick += tick;
                moves.tick(cluster);
                if last_metrics.elapsed() >= METRICS_INTERVAL {
                    last_metrics = Instant::now();
                    metrics::publish(cluster);
                }
                if booting && last_progress.elapsed() >= PROGRESS_INTERVAL {
                    last_progress = Instant::now();
                    let status = cluster.status();
                    on_progress(&status);
                    booting = !status.all_up();
                }
            }
        }
    }
}

/// The storage daemon for `config`, if one runs: for the disks of QEMU guests (`served_by =
/// "blkd"`), and for the coordinator (also alone, with the process backend). A process
/// backend without `ivha-blkd` runs without a coordinator, as it ran without the daemon
/// before: its agents then never take over while hostd is away.
fn storage_daemon(
    config: &Config,
    state: &StateDir,
    files: &[prepare::NodeFiles],
) -> Result<Option<Box<dyn crate::storage::Storage>>, DaemonError> {
    let served = crate::storage::Served {
        disks: config.uses_storage_daemon(),
        coordinator: config.runs_coordinator(),
    };
    if !served.disks && !served.coordinator {
        return Ok(None);
    }
    let topology = topology::Topology::from_config(config);
    let plan = crate::storage::plan(state, &topology, files, served)?;
    match crate::storage::StorageDaemon::new(state, plan) {
        Ok(daemon) => Ok(Some(Box::new(daemon))),
        Err(error) if !served.disks => {
            log::warn!(
                "no takeovers while hostd is away: {}",
                wire::error_chain::one_line(&error)
            );
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// An error as the control socket answers it: the whole chain, once.
fn error_response(error: &dyn std::error::Error) -> Response {
    Response::Error {
        message: wire::error_chain::one_line(error),
    }
}

/// What `hostd down` does when no daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offline {
    /// Nothing runs; with `purge`, the regions and disks were removed (all of them).
    Stopped { purged: Option<bool> },
    /// No daemon, but these nodes still run: a new `hostd up` adopts them.
    NodesRunning(Vec<String>),
}

/// `hostd down` without a daemon: nothing to stop, unless node processes an earlier hostd
/// started still run; with `purge`, deletes the regions and the disks the last
/// configuration named (`down --purge` must work after a failed `up`).
pub fn down_offline(state: &StateDir, purge: bool) -> Result<Offline, DaemonError> {
    let _lock = lock(state)?;
    let config = records::load_config(state).unwrap_or_default();
    let running = records::running_nodes(state, &config)?;
    if !running.is_empty() {
        return Ok(Offline::NodesRunning(
            running
                .iter()
                .map(|(node, _)| config.nodes[node.index()].name.clone())
                .collect(),
        ));
    }
    // Nothing attaches its disks any more.
    if let Some(pid) = crate::storage::stop_recorded(state) {
        log::info!("stopped the storage daemon an earlier hostd left running (pid {pid})");
    }
    let purged = purge.then(|| prepare::purge(state, &prepare::disk_paths(&config, state)));
    Ok(Offline::Stopped { purged })
}

/// Fails when a daemon holds the state directory (`up --detach` checks before it starts
/// one, whose own start would only fail in its log).
pub fn ensure_not_running(state: &StateDir) -> Result<(), DaemonError> {
    lock(state).map(drop)
}

/// Holds `hostd.lock` for the life of the daemon.
fn lock(state: &StateDir) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = state.lock_file();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::Io {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => DaemonError::AlreadyRunning {
                path: state.root().to_owned(),
            },
            other => DaemonError::Lock {
                path: path.clone(),
                source: other,
            },
        },
    )
}

/// Reads the last `lines` lines of a log file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How often boot progress is reported.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// How often the metrics' node figures are refreshed: scrapes come seconds apart, so the
/// 10 ms tick need not rebuild them each time.
const METRICS_INTERVAL: Duration = Duration::from_millis(100);
