//! Command-line parsing and dispatch.

mod client;
mod down;
mod events;
#[doc(hidden)]
pub use events::{EventsError, render_log_for_fuzzing};
mod failover;
mod inspect;
mod link;
mod status;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::state_dir::{DEFAULT_STATE_DIR, StateDir};

/// ivha host daemon: keeps a cluster of QEMU guests (a pair by default, up to 8) highly
/// available through shared memory.
#[derive(Debug, Parser)]
#[command(name = "hostd", version, about, long_about = None)]
pub struct Cli {
    /// The cluster's state directory (regions, sockets, logs); use one per cluster.
    #[arg(long, global = true, env = "IVHA_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the cluster: regions, disks, every guest; with --detach, return once every agent is up.
    Up(up::UpArgs),

    /// Show each node: VM and agent state, heartbeat, log, who serves it, its NBD address.
    Status(status::StatusArgs),

    /// Stop every guest (QMP quit, SIGKILL if they do not go) and the daemon.
    Down(down::DownArgs),

    /// Inject a fault into a node: SIGKILL or SIGSTOP its QEMU, or panic its kernel.
    ///
    /// hostd's monitor then detects the failure, fences the node and moves every identity
    /// it held to a taker (the first live node of its `takeover_by` list), like for any
    /// real failure.
    Kill(failover::KillArgs),

    /// Planned takeover: another node takes the node's identity over (the node flushes and
    /// releases it first; nothing is killed, nothing is lost).
    ///
    /// The taker is the first node of the node's `takeover_by` list that is up, or the one
    /// named with --to.
    Takeover(failover::TakeoverArgs),

    /// Give a node its identity back, restarting its QEMU first if it is not running.
    Giveback(failover::MoveArgs),

    /// Cut a node off its disks: preempt its keys on every disk (its writes fail at the
    /// storage daemon), then kill it; its identities move to takers.
    ///
    /// As fence_scsi does with SCSI-3 persistent reservations. --keep-running leaves its
    /// QEMU alive (a diagnosis and test aid). Needs disks.served_by = "blkd".
    Fence(failover::FenceArgs),

    /// Register a fenced node on its disks again. A node kept running after its fence is
    /// stopped first; `hostd giveback NODE` then restarts it and gives its identity back.
    Unfence(failover::UnfenceArgs),

    /// Cut one of a node's interconnect links (`down`) or restore it (`up`): fault
    /// injection for tests and drills. A cut link is shown in `hostd status`.
    Link(link::LinkArgs),

    /// Run the daemon in the foreground without progress output (what `up --detach` starts).
    #[command(hide = true)]
    Daemon(up::DaemonArgs),

    /// Decode a node's shared-memory region: header, heartbeat, log cursors and records.
    ///
    /// Works on any region, including one whose writer is dead or whose log is corrupt:
    /// the first problem found is reported, and the exit status is 3 when there is one.
    Inspect(inspect::InspectArgs),

    /// Show the event history (state changes, takeovers, givebacks), optionally following it.
    Events(events::EventsArgs),
}

/// Exit status when the command worked but found a problem in what it inspected.
pub const EXIT_PROBLEM_FOUND: u8 = 3;

/// Parses the command line, runs the command and prints errors with their whole chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let state = StateDir::new(&cli.state_dir);
    let result = match &cli.command {
        Command::Up(args) => up::run(&state, args),
        Command::Status(args) => status::run(&state, args),
        Command::Down(args) => down::run(&state, args),
        Command::Kill(args) => failover::kill(&state, args),
        Command::Takeover(args) => failover::takeover(&state, args),
        Command::Giveback(args) => failover::giveback(&state, args),
        Command::Fence(args) => failover::fence(&state, args),
        Command::Unfence(args) => failover::unfence(&state, args),
        Command::Link(args) => link::run(&state, args),
        Command::Daemon(args) => up::run_daemon(&state, args),
        Command::Inspect(args) => inspect::run(&state, args),
        Command::Events(args) => events::run(&state, args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            wire::error_chain::print("hostd", error.as_ref());
            ExitCode::FAILURE
        }
    }
}

/// What a command returns: an exit status, or an error to print.
pub type CommandResult = Result<ExitCode, Box<dyn std::error::Error>>;
