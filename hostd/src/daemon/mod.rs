//! The daemon: launches the pair, watches it, answers the control socket, shuts it down.
//!
//! One thread owns all cluster state (the main loop below); the control socket and signal
//! threads only pass requests to it over a channel. No locks, no shared mutable state.

mod adopt;
mod failover;
mod launch;
mod node;
pub mod prepare;
mod socket;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use nix::sys::signal::{SigSet, Signal};

use crate::config::Config;
use crate::protocol::{ClusterStatus, Request, Response};
use crate::state_dir::StateDir;
pub use socket::call as socket_call;

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
    #[error(transparent)]
    Launch(#[from] launch::LaunchError),
    #[error("cannot serve the control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error(
        "cannot tell whether the pair an earlier hostd started still runs; nothing was started or stopped"
    )]
    Adopt(#[from] adopt::RecordError),
}

/// A request from the socket or a signal, with where to send the answer.
pub(crate) struct Envelope {
    pub request: Request,
    pub reply: Option<Sender<Response>>,
    /// Disconnects once the answer is written to the client: the daemon waits for it
    /// before exiting after `down`, or the client would get nothing.
    pub written: Option<Receiver<()>>,
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
    let saved_config = adopt::load_config(state);
    let running = adopt::running_nodes(state, saved_config.as_ref().unwrap_or(config))?;
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
    let (files, control) = prepare::prepare(config, state)?;
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

    let mut cluster = if running.is_empty() {
        launch::launch(config, state, &files, &control)?
    } else {
        log::info!(
            "adopting the running pair ({} node(s) alive)",
            running.len()
        );
        launch::adopt(config, state, &files, &control, &running)?
    };
    let result = main_loop(&mut cluster, &requests, &mut on_progress);
    // Children (reaped), then the lock, then the socket: `hostd down` takes a gone socket
    // to mean the state directory is free for the next `hostd up`.
    drop(cluster);
    drop(lock);
    drop(listener);
    let _ = std::fs::remove_file(state.control_socket());
    result
}

fn main_loop(
    cluster: &mut launch::Cluster,
    requests: &Receiver<Envelope>,
    on_progress: &mut impl FnMut(&ClusterStatus),
) -> Result<(), DaemonError> {
    let tick = cluster.tick();
    let mut booting = true;
    let mut last_progress = Instant::now() - PROGRESS_INTERVAL;
    let mut next_tick = Instant::now();
    loop {
        let timeout = crossbeam_channel::after(next_tick.saturating_duration_since(Instant::now()));
        select! {
            recv(requests) -> envelope => {
                let Ok(Envelope { request, reply, written }) = envelope else { continue };
                match request {
                    Request::Status => {
                        send(reply, Response::Status(cluster.status()));
                    }
                    Request::Kill { node, signal } => {
                        let response = match cluster.inject(&node, signal) {
                            Ok(message) => Response::Killed { message },
                            Err(error) => Response::Error { message: error.to_string() },
                        };
                        send(reply, response);
                    }
                    Request::Takeover { node } => {
                        let response = match cluster.planned_takeover(&node) {
                            Ok(report) => Response::Moved(report),
                            Err(error) => Response::Error {
                                message: shm::inspect::error_chain(&error),
                            },
                        };
                        send(reply, response);
                    }
                    Request::Giveback { node } => cluster.start_giveback(&node, reply),
                    Request::Down { purge } => {
                        let report = cluster.shut_down(purge);
                        log::info!("pair stopped: {:?}", report.stopped);
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
                for node in cluster.sample() {
                    cluster.fail_over(node);
                }
                cluster.adopt_orphans();
                cluster.continue_giveback();
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

fn send(reply: Option<Sender<Response>>, response: Response) {
    if let Some(reply) = reply {
        // The client may have gone; that is its business.
        let _ = reply.send(response);
    }
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

/// How long hostd waits, in all, for the nodes to quit on their own before killing them.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP `quit` may take to be answered (a paused or hung QEMU never answers).
pub const QMP_QUIT_TIMEOUT: Duration = Duration::from_secs(1);
