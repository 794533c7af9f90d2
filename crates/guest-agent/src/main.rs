//! `guest-agent`: runs in each guest of an ivha pair (or on the host, in process mode).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = guest_agent::args::Args::parse();
    match guest_agent::agent::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("guest-agent: error: {}", shm::inspect::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
