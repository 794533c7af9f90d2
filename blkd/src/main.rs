//! `ivha-blkd`: the storage daemon hostd starts before the guests (see the crate's docs).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The ivha storage daemon: serves the cluster's disks to its guests over vhost-user-blk,
/// with a persistent reservation per disk. hostd starts it; it is not meant to be run by
/// hand except to debug.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The plan hostd wrote: disks, the nodes attaching each, sockets, reservations file.
    #[arg(long, value_name = "FILE")]
    plan: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // hostd waits for signals on a thread, so it blocks them, and a child inherits the
    // mask: unblock, so hostd's SIGTERM stops the daemon at once (every change it keeps is
    // on disk before it is answered).
    let mut stop_signals = nix::sys::signal::SigSet::empty();
    stop_signals.add(nix::sys::signal::Signal::SIGTERM);
    stop_signals.add(nix::sys::signal::Signal::SIGINT);
    if let Err(error) = stop_signals.thread_unblock() {
        log::warn!("cannot unblock SIGTERM and SIGINT: {error}");
    }
    let args = Args::parse();
    let result = blkd::daemon::read_plan(&args.plan).and_then(|plan| blkd::daemon::run(&plan));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            wire::error_chain::print("ivha-blkd", &error);
            ExitCode::FAILURE
        }
    }
}
