//! `hostd down`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::{CommandResult, client};
use crate::daemon::Offline;
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
    let report = match client::call(state, &request, Duration::from_secs(30)) {
        Ok(Response::Down(report)) => report,
        Ok(_) => return Err("hostd answered a down request with something else".into()),
        Err(client::ClientError::NotRunning { .. }) if state.root().exists() => {
            return offline(state, args.purge);
        }
        Err(client::ClientError::NotRunning { .. }) => {
            println!(
                "nothing runs in {} (no such directory)",
                state.root().display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(error) => return Err(error.into()),
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

/// No daemon answers: nothing to stop, unless nodes still run without one.
fn offline(state: &StateDir, purge: bool) -> CommandResult {
    match crate::daemon::down_offline(state, purge)? {
        Offline::NodesRunning(nodes) => Err(format!(
            "no hostd is running for {}, but node(s) {} still run: `hostd up` adopts them, then `hostd down` stops them",
            state.root().display(),
            nodes.join(", ")
        )
        .into()),
        Offline::Stopped { purged: None } => {
            println!("nothing runs in {}; regions and disks kept", state.root().display());
            Ok(ExitCode::SUCCESS)
        }
        Offline::Stopped { purged: Some(true) } => {
            println!("nothing runs in {}; regions and disks removed", state.root().display());
            Ok(ExitCode::SUCCESS)
        }
        Offline::Stopped { purged: Some(false) } => {
            Err("some files could not be removed (see the messages above)".into())
        }
    }
}
