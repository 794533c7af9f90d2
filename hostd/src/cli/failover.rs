//! `hostd kill`, `hostd takeover`, `hostd giveback`, `hostd fence` and `hostd unfence`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::{CommandResult, client};
use crate::state_dir::StateDir;
use wire::control::{KillSignal, MoveReport, Request, Response};

#[derive(Debug, Args)]
pub struct KillArgs {
    /// The node to hurt.
    pub node: String,
    /// kill: SIGKILL its QEMU; stop: SIGSTOP its QEMU (a hang); panic: panic its guest kernel.
    #[arg(long, value_enum, default_value_t = KillSignal::Kill)]
    pub signal: KillSignal,
}

#[derive(Debug, Args)]
pub struct TakeoverArgs {
    /// The node whose identity (address and export) moves.
    pub node: String,
    /// The node to take it over: one of the node's `takeover_by` list, and up. Default:
    /// the first of that list that is up.
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The node whose identity (address and export) moves.
    pub node: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FenceArgs {
    /// The node to cut off its disks.
    pub node: String,
    /// Preempt its keys only and leave its QEMU running (a diagnosis and test aid): its
    /// writes to the disks fail, and its identities move to takers all the same.
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Debug, Args)]
pub struct UnfenceArgs {
    /// The node to register on its disks again.
    pub node: String,
}

pub fn fence(state: &StateDir, args: &FenceArgs) -> CommandResult {
    let request = Request::Fence {
        node: args.node.clone(),
        keep_running: args.keep_running,
    };
    fenced(state, &request)
}

pub fn unfence(state: &StateDir, args: &UnfenceArgs) -> CommandResult {
    let request = Request::Unfence {
        node: args.node.clone(),
    };
    fenced(state, &request)
}

fn fenced(state: &StateDir, request: &Request) -> CommandResult {
    // A fence waits for the victim's writes in progress and may move identities.
    match client::call(state, request, Duration::from_secs(200))? {
        Response::Fenced { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("hostd answered with something else than a fence report".into()),
    }
}

pub fn kill(state: &StateDir, args: &KillArgs) -> CommandResult {
    let request = Request::Kill {
        node: args.node.clone(),
        signal: args.signal,
    };
    match client::call(state, &request, Duration::from_secs(10))? {
        Response::Killed { message } => {
            println!("{message}");
            println!("watch the takeover with `hostd events --follow` or `hostd status`");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("hostd answered a kill request with something else".into()),
    }
}

pub fn takeover(state: &StateDir, args: &TakeoverArgs) -> CommandResult {
    let request = Request::Takeover {
        node: args.node.clone(),
        to: args.to.clone(),
    };
    moved(state, &request, args.json, Duration::from_secs(200))
}

pub fn giveback(state: &StateDir, args: &MoveArgs) -> CommandResult {
    let request = Request::Giveback {
        node: args.node.clone(),
    };
    // A giveback may boot the node first.
    moved(state, &request, args.json, Duration::from_secs(400))
}

fn moved(state: &StateDir, request: &Request, json: bool, timeout: Duration) -> CommandResult {
    let Response::Moved(report) = client::call(state, request, timeout)? else {
        return Err("hostd answered with something else than a move report".into());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// A move report for people.
pub fn render(report: &MoveReport) -> String {
    let mut out = format!(
        "{}'s identity moved {} → {} (epoch {}): {}\n",
        report.node, report.from, report.to, report.epoch, report.reason
    );
    for (step, at) in report.timeline_ms.steps() {
        out.push_str(&format!("  {step:<10}+{at:.1} ms\n"));
    }
    if !report.planned {
        out.push_str(&format!(
            "  replayed {} records{}\n",
            report.replayed_records,
            if report.replay_complete {
                ""
            } else {
                " (INCOMPLETE: a bad record stopped the replay; see the survivor's console)"
            }
        ));
    }
    out
}
