//! `hostd up`: start the cluster.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::{CommandResult, client};
use crate::config::{Backend, Config, ConfigError};
use crate::render;
use crate::state_dir::StateDir;
use wire::control::{ClusterStatus, Request, Response};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Cluster configuration (TOML); every setting has a default.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the nodes run (overrides `backend` in the config): QEMU guests, or agents as
    /// host processes (fast tests, machines without QEMU).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,

    /// Start the daemon in the background and return once every agent is up.
    #[arg(long)]
    pub detach: bool,

    /// With --detach: give up if the agents are not up after this many seconds.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub timeout: u64,
}

/// Errors specific to `up`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("cannot start the daemon")]
    Spawn(#[source] std::io::Error),
    #[error("cannot create {path} or its log")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon exited before the cluster was up; the end of {log}:\n{tail}")]
    DaemonDied { log: String, tail: String },
    #[error("the agents were not up after {seconds} s; last status:\n{status}")]
    Timeout { seconds: u64, status: String },
}

/// The configuration from `path` (defaults without one), with `--backend` over its
/// `backend`.
fn load_config(path: Option<&Path>, backend: Option<Backend>) -> Result<Config, ConfigError> {
    let mut config = Config::load(path)?;
    if let Some(backend) = backend {
        config.backend = backend;
    }
    Ok(config)
}

pub fn run(state: &StateDir, args: &UpArgs) -> CommandResult {
    let config = load_config(args.config.as_deref(), args.backend)?;
    if args.detach {
        return detach(state, args);
    }
    println!(
        "starting the cluster in {} (Ctrl-C stops it)",
        state.root().display()
    );
    let mut last_states = String::new();
    crate::daemon::run(&config, state, |status| {
        let states = render::progress_states(status);
        if states != last_states {
            println!("{}", render::progress_line(status));
            last_states = states;
        }
        if status.all_up() {
            print!("{}", render::status_table(status));
            println!("the cluster is up; `hostd status` shows it, `hostd down` stops it");
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `hostd daemon` in the background and follows its progress over the socket.
fn detach(state: &StateDir, args: &UpArgs) -> CommandResult {
    let state_error = |source| UpError::StateDir {
        path: state.root().to_owned(),
        source,
    };
    state.create().map_err(state_error)?;
    crate::daemon::ensure_not_running(state)?;
    let log_path = state.daemon_log();
    // Appended to: a restarted hostd must not wipe what the previous one logged.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(state_error)?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("--state-dir")
        .arg(state.root())
        .arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(config) = &args.config {
        command.arg("--config").arg(config);
    }
    if let Some(value) = args.backend.and_then(|b| b.to_possible_value()) {
        command.arg("--backend").arg(value.get_name());
    }
    // Its own process group: a Ctrl-C at this terminal must not reach the daemon.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut daemon = command.spawn().map_err(UpError::Spawn)?;
    println!(
        "hostd daemon started (pid {}), log {}",
        daemon.id(),
        log_path.display()
    );

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut last_states = String::new();
    let mut last_status: Option<ClusterStatus> = None;
    loop {
        if let Some(exit) = daemon.try_wait()? {
            return Err(UpError::DaemonDied {
                log: format!("{} ({exit})", log_path.display()),
                tail: crate::daemon::tail(&log_path, 25),
            }
            .into());
        }
        // Only the daemon started here counts: another one may have taken the socket.
        if let Ok(Response::Status(status)) =
            client::call(state, &Request::Status, Duration::from_secs(5))
            && status.hostd_pid == daemon.id()
        {
            let states = render::progress_states(&status);
            if states != last_states {
                println!("{}", render::progress_line(&status));
                last_states = states;
            }
            if status.adopted {
                // Nothing boots: the guests kept running while no hostd watched them.
                print!("{}", render::status_table(&status));
                println!(
                    "adopted the cluster an earlier hostd left running; `hostd status` shows it, `hostd down` stops it"
                );
                return Ok(ExitCode::SUCCESS);
            }
            if status.all_up() {
                print!("{}", render::status_table(&status));
                println!(
                    "the cluster is up after {:.1} s; `hostd status` shows it, `hostd down` stops it",
                    started.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            last_status = Some(status);
        }
        if Instant::now() >= deadline {
            // Leave nothing running behind a failed start.
            stop_daemon(state, &mut daemon);
            return Err(UpError::Timeout {
                seconds: args.timeout,
                status: last_status
                    .map(|s| render::status_table(&s) + &consoles_of_nodes_not_up(state, &s))
                    .unwrap_or_else(|| "(the daemon never answered)".into()),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of the console and process output of each node that is not up: an agent that
/// exits at every start (a guest's init starts it again) says why there, and nowhere else.
fn consoles_of_nodes_not_up(state: &StateDir, status: &ClusterStatus) -> String {
    let mut out = String::new();
    for node in &status.nodes {
        if node.state == wire::control::NodeState::Up {
            continue;
        }
        for path in [state.console_log(&node.name), state.qemu_log(&node.name)] {
            let tail = crate::daemon::tail(&path, 15);
            if !tail.trim().is_empty() {
                out.push_str(&format!("the end of {}:\n{tail}\n", path.display()));
            }
        }
    }
    out
}

/// Stops a daemon this command started: `down` over the socket, SIGKILL if it lingers.
fn stop_daemon(state: &StateDir, daemon: &mut std::process::Child) {
    let asked = client::call(
        state,
        &Request::Down { purge: false },
        Duration::from_secs(15),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked.is_ok() && Instant::now() < deadline {
        if let Ok(Some(_)) = daemon.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// The hidden `daemon` subcommand: what `up --detach` runs in the background.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
}

pub fn run_daemon(state: &StateDir, args: &DaemonArgs) -> CommandResult {
    let config = load_config(args.config.as_deref(), args.backend)?;
    crate::daemon::run(&config, state, |status| {
        log::info!("{}", render::progress_line(status));
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_are_the_flag_values() {
        let names: Vec<String> = [Backend::Qemu, Backend::Process]
            .iter()
            .filter_map(|b| b.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(names, ["qemu", "process"]);
    }
}
