//! `hostd status`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{CommandResult, client};
use crate::render;
use crate::state_dir::StateDir;
use wire::control::{Request, Response};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(state: &StateDir, args: &StatusArgs) -> CommandResult {
    let Response::Status(status) = client::call(state, &Request::Status, Duration::from_secs(10))?
    else {
        return Err("hostd answered a status request with something else".into());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render::status_table(&status));
    }
    Ok(ExitCode::SUCCESS)
}
