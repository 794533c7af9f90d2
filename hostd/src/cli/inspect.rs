//! `hostd inspect`.

use std::process::ExitCode;

use clap::Args;
use shm::inspect::Problem;
use shm::{Access, InspectOptions, Mapping, MappingError, RegionReport};

use super::{CommandResult, EXIT_PROBLEM_FOUND};
use crate::render;
use crate::state_dir::StateDir;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A node name (its region in the state directory) or a path to a region file.
    pub node: String,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// List at most this many records (all are still checked).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

pub fn run(state: &StateDir, args: &InspectArgs) -> CommandResult {
    let path = state.resolve_region(&args.node)?;
    // Read-only: inspecting must never disturb the region's writer.
    let report = match Mapping::open(&path, Access::ReadOnly) {
        Ok(mapping) => shm::inspect(
            mapping,
            InspectOptions {
                max_records: args.limit,
            },
        ),
        // A file that is there but too short (or oddly sized) to be a region is a finding
        // about the region, like a corrupt header: reported, exit code 3.
        Err(error @ (MappingError::TooSmall { .. } | MappingError::Unaligned { .. })) => {
            RegionReport::Unknown {
                source: path.display().to_string(),
                size: std::fs::metadata(&path).map_or(0, |m| m.len()),
                problem: Problem {
                    seq: None,
                    message: wire::error_chain::one_line(&error),
                },
            }
        }
        Err(error) => return Err(error.into()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::region_report(&report));
    }
    let problem = match &report {
        RegionReport::Node(n) => n.problem.is_some(),
        RegionReport::Control(c) => c.problem.is_some(),
        RegionReport::Unknown { .. } => true,
    };
    Ok(if problem {
        ExitCode::from(EXIT_PROBLEM_FOUND)
    } else {
        ExitCode::SUCCESS
    })
}
