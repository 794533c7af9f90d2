//! `hostd down`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::{CommandResult, client};
use crate::state_dir::StateDir;
use wire::control::{Request, Response};

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Also delete the regions (with any unflushed writes in them) and the disk images.
    #[arg(long)]
    pub purge: bool,
}

pub fn run(state: &StateDir, args: &DownArgs) -> CommandResult {
    let request = Request::Down { purge: args.purge };
    let Response::Down(report) = client::call(state, &request, Duration::from_secs(30))? else {
        return Err("hostd answered a down request with something else".into());
    };
    for (node, how) in &report.stopped {
        println!("node {node}: {how}");
    }
    // The daemon exits right after answering; wait for its socket to go so that a
    // following `hostd up` finds the state directory free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.control_socket().exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if args.purge {
        println!(
            "{}",
            if report.purged {
                "regions and disks removed"
            } else {
                "some files could not be removed (see the daemon log)"
            }
        );
    } else {
        println!("regions and disks kept in {}", state.root().display());
    }
    Ok(ExitCode::SUCCESS)
}
