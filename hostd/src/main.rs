//! `hostd`: the ivha host daemon and its command-line interface.

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    hostd::cli::main()
}
