//! `hostd link NODE LINK down|up`: cut one of a node's interconnect links, or restore it.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use wire::control::{Request, Response};

use super::CommandResult;
use super::client;
use crate::state_dir::StateDir;

/// What a link is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkSetting {
    Down,
    Up,
}

#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The node whose link changes.
    pub node: String,
    /// The link's number as `hostd status` shows it: the network links from 0, then the
    /// mailbox.
    pub link: u16,
    /// `down` cuts it (a guest's NICs of that link lose their carrier, QMP `set_link`;
    /// the mailbox and the process backend's sockets drop every frame); `up` restores it.
    #[arg(value_enum)]
    pub setting: LinkSetting,
}

pub fn run(state: &StateDir, args: &LinkArgs) -> CommandResult {
    let request = Request::Link {
        node: args.node.clone(),
        link: args.link,
        up: args.setting == LinkSetting::Up,
    };
    match client::call(state, &request, Duration::from_secs(30))? {
        Response::Linked { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("hostd answered with something else than a link report".into()),
    }
}
