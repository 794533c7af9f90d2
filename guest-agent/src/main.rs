//! `guest-agent`: runs in each guest of an ivha pair (or on the host, in process mode).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    // A parent that waits for signals on a thread (hostd does) blocks them, and a child
    // inherits the mask: unblock, so SIGTERM and SIGINT stop the agent as they should.
    let mut stop_signals = nix::sys::signal::SigSet::empty();
    stop_signals.add(nix::sys::signal::Signal::SIGTERM);
    stop_signals.add(nix::sys::signal::Signal::SIGINT);
    if let Err(error) = stop_signals.thread_unblock() {
        log::warn!("cannot unblock SIGTERM and SIGINT: {error}");
    }
    let mut args = guest_agent::args::Args::parse();
    if let Err(error) = args.read_kernel_cmdline() {
        wire::error_chain::print("guest-agent", &error);
        return ExitCode::FAILURE;
    }
    match guest_agent::agent::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            wire::error_chain::print("guest-agent", &error);
            ExitCode::FAILURE
        }
    }
}
