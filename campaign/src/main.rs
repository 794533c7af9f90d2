//! `ivha-campaign`: run a fault campaign, check a recorded history, or measure takeovers.
//!
//! `run` and `check` exit 0 (valid), 1 (invalid: anomalies), 2 (unknown: nothing proven) or
//! 3 (bad input, a run that could not finish, or another error); `measure-takeover` exits
//! 0 when every trial ran and 3 otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use campaign::checker::{self, CheckError, FinalContents, Verdict};
use campaign::history::{History, HistoryError};
use campaign::nemesis::FaultKind;
use campaign::report::Report;
use clap::{Args, Parser, Subcommand};

/// Exit code for bad input and every other error; 0..=2 are verdicts.
const EXIT_ERROR: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "ivha-campaign", about = "ivha fault campaign")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a cluster (a pair by default), run NBD writers and one seeded fault per cycle,
    /// then check the history.
    Run(RunArgs),
    /// Check a recorded history against the final contents of the exports.
    Check(CheckArgs),
    /// Measure takeover time against a running pair whose flushers are paused (see
    /// scripts/measure-takeover.sh, which sets one up).
    MeasureTakeover(campaign::measure::MeasureArgs),
    /// Boot a client VM with an ext4 filesystem on export a (through QEMU's NBD driver) and
    /// kill, hang, take over and give back the node serving it while it writes; check its
    /// files and kernel log, and report its stalls (see docs/clients.md). Exits 0 (passed),
    /// 1 (violations) or 3.
    ClientVm(campaign::client_vm::ClientVmArgs),
    /// Time from a fault to the first 4 KiB read through an address, as a fresh client
    /// (scripts/compare-keepalived.sh times ivha and keepalived with it).
    Probe(campaign::probe::ProbeArgs),
    /// Draw the figures of a finished run again (into RUN_DIR/figures), from its
    /// history.jsonl and logs/events.jsonl.
    Figures(FiguresArgs),
}

#[derive(Debug, Args)]
struct FiguresArgs {
    /// The run's directory (the --out of `run`).
    #[arg(value_name = "RUN_DIR")]
    run_dir: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The seed: it fixes the fault schedule (default: drawn from the clock, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults to inject, one per cycle.
    #[arg(long, default_value_t = 12)]
    cycles: u64,
    /// Fault kinds to draw from (comma-separated): kill, stop, panic, agent_kill,
    /// hostd_restart, torn_tail, double_kill, kill_taker, kill_two, blkd_restart,
    /// link_down, hostd_down_kill, zombie, both_stop, links_down. `panic` and blkd_restart
    /// need QEMU guests; kill_taker and kill_two need 3 nodes or more (left out of a pair's
    /// run); hostd_down_kill, zombie, both_stop and links_down need the agents to take over
    /// without hostd: bridge mode or the process backend (refused in user networking).
    /// Default: kill,stop,panic,agent_kill,hostd_restart,torn_tail,double_kill,kill_taker,
    /// kill_two,blkd_restart,link_down.
    #[arg(long, value_delimiter = ',', value_name = "KIND,KIND,...")]
    faults: Option<Vec<FaultKind>>,
    /// Nodes in the cluster, named a, b, c, ...: 2 (a pair) to 8.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=8))]
    nodes: u8,
    /// Where the nodes run: QEMU guests, or agents as host processes.
    #[arg(long, default_value = "qemu", value_parser = ["qemu", "process"])]
    backend: String,
    /// Directory for the history, the final contents, the report and the logs (default:
    /// $CARGO_TARGET_DIR/campaign/seed-SEED, where CARGO_TARGET_DIR defaults to target).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The hostd binary (default: beside this one).
    #[arg(long, env = "IVHA_HOSTD", value_name = "PATH")]
    hostd: Option<PathBuf>,
    /// NBD writers per identity.
    #[arg(long, default_value_t = 2)]
    writers: u32,
    /// Blocks (4 KiB) each writer owns.
    #[arg(long, default_value_t = 32)]
    blocks: u64,
    /// Host ports of the identities a, b, ..., one per node (default: free ports).
    #[arg(long, value_name = "PORT,PORT,...", value_parser = parse_ports)]
    ports: Option<Ports>,
    /// How the writers reach the identities: `user` (127.0.0.1 ports) or `bridge` (service
    /// IPs on a bridge hostd makes in the namespace the campaign runs in: QEMU only, root,
    /// inside `ip netns exec NS`).
    #[arg(long, value_enum, default_value = "user")]
    network: campaign::run::Network,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The history (JSON lines).
    history: PathBuf,
    /// The final contents of one identity's export; repeat per identity.
    #[arg(long = "final", value_name = "IDENTITY=PATH", value_parser = checker::parse_final_arg)]
    finals: Vec<(String, PathBuf)>,
    /// Print the verdict, anomalies and counts as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// Also write the run report as JSON to this file (and print it for humans).
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("cannot read the history")]
    History(#[from] HistoryError),
    #[error("cannot check the history")]
    Check(#[from] CheckError),
    #[error("cannot serialize the output as JSON")]
    Json(#[from] serde_json::Error),
    #[error("the campaign run failed")]
    Run(#[from] campaign::run::RunError),
    #[error("--faults names faults that cannot apply to this cluster")]
    Unfit(#[source] campaign::run::RunError),
    #[error("the run stopped before its last cycle: {0}")]
    Aborted(String),
    #[error("the probe failed")]
    Probe(#[from] campaign::probe::ProbeError),
    #[error("the takeover measurement failed")]
    Measure(#[from] campaign::measure::MeasureError),
    #[error("cannot find a free port")]
    Port(#[source] std::io::Error),
    #[error("--ports gives {given} ports, but --nodes {nodes} needs one per node: {nodes}")]
    PortCount { given: usize, nodes: usize },
    #[error(
        "no fault kind of --faults can run on {nodes} nodes (kill_taker and kill_two need 3 or more)"
    )]
    NoFaults { nodes: usize },
    #[error("the client VM run failed")]
    ClientVm(#[from] campaign::client_vm::ClientVmError),
    #[error("cannot draw the run's figures")]
    Figures(#[from] campaign::plots::FiguresError),
    #[error("cannot write the report to {path}")]
    WriteReport {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn main() -> ExitCode {
    campaign::progress::init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Clap exits 2 on usage errors, which would read as the verdict "unknown".
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { EXIT_ERROR } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Check(args) => check(&args),
        Command::Run(args) => run(&args),
        Command::Figures(args) => figures(&args),
        Command::ClientVm(args) => {
            campaign::client_vm::main(&args, hostd_binary(args.hostd.as_ref()))
                .map(|passed| {
                    if passed {
                        Verdict::Valid
                    } else {
                        Verdict::Invalid
                    }
                })
                .map_err(CommandError::from)
        }
        Command::Probe(args) => campaign::probe::run(&args)
            .map(|()| Verdict::Valid)
            .map_err(CommandError::from),
        Command::MeasureTakeover(args) => {
            campaign::measure::run(&args, hostd_binary(args.hostd.as_ref()))
                .map(|()| Verdict::Valid)
                .map_err(CommandError::from)
        }
    };
    match result {
        Ok(verdict) => ExitCode::from(verdict.exit_code()),
        Err(error) => {
            wire::error_chain::print("ivha-campaign", &error);
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn check(args: &CheckArgs) -> Result<Verdict, CommandError> {
    let history = History::read(&args.history)?;
    let finals = FinalContents::load(&history, &args.finals)?;
    let outcome = checker::check(&history, &finals)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{outcome}");
    }
    if let Some(path) = &args.report {
        let report = Report::build(&history, &outcome);
        write_report(path, &report)?;
        // Keep stdout pure JSON under --json.
        if args.json {
            eprint!("{report}");
        } else {
            print!("\n{report}");
        }
    }
    Ok(outcome.verdict)
}

fn run(args: &RunArgs) -> Result<Verdict, CommandError> {
    let seed = args
        .seed
        .unwrap_or_else(|| wire::time::now_unix_us() % 1_000_000);
    let out = args.out.clone().unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
        PathBuf::from(target).join(format!("campaign/seed-{seed}"))
    });
    let hostd = hostd_binary(args.hostd.as_ref());
    let nodes = usize::from(args.nodes);
    let ports = match &args.ports {
        Some(Ports(ports)) if ports.len() == nodes => ports.clone(),
        Some(Ports(ports)) => {
            return Err(CommandError::PortCount {
                given: ports.len(),
                nodes,
            });
        }
        None => free_ports(nodes)?,
    };
    let kinds = match &args.faults {
        // Named: a kind that cannot apply in this mode is refused, not left out.
        Some(kinds) => {
            let unfit = campaign::run::unfit_kinds(kinds, &args.backend, args.network);
            if !unfit.is_empty() {
                let names: Vec<&str> = unfit.iter().map(|kind| kind.name()).collect();
                return Err(CommandError::Unfit(
                    campaign::run::RunError::NeedsFailoverWithoutHostd {
                        kinds: names.join(", "),
                    },
                ));
            }
            kinds.clone()
        }
        None => default_faults(&args.backend, args.network),
    };
    // The double faults need a third node: a pair's run leaves them out (its schedule is
    // the same as without them).
    let kinds = FaultKind::fitting(&kinds, nodes);
    if kinds.is_empty() {
        return Err(CommandError::NoFaults { nodes });
    }
    let fault_names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    let cluster = if nodes == 2 {
        String::new()
    } else {
        format!(" with {nodes} nodes")
    };
    println!(
        "campaign seed {seed}: {} cycles of {} on the {} backend{cluster}; files in {}",
        args.cycles,
        fault_names.join(", "),
        args.backend,
        out.display()
    );
    let config = campaign::run::RunConfig {
        seed,
        cycles: args.cycles,
        kinds,
        backend: args.backend.clone(),
        out_dir: out.clone(),
        hostd,
        writers_per_identity: args.writers,
        blocks_per_writer: args.blocks,
        ports,
        network: args.network,
    };
    let finished = campaign::run::run(&config)?;
    print!("{}\n{}", finished.outcome, finished.report);
    let nodes_arg = if nodes == 2 {
        String::new()
    } else {
        format!(" --nodes {nodes}")
    };
    let network_arg = match args.network {
        campaign::run::Network::User => "",
        campaign::run::Network::Bridge => " --network bridge",
    };
    println!(
        "reproduce: ivha-campaign run --seed {seed} --cycles {} --faults {} --backend {}{nodes_arg}{network_arg}",
        args.cycles,
        fault_names.join(","),
        args.backend
    );
    if let Some(why) = finished.aborted {
        // Anomalies found before the stop still make the run invalid.
        if finished.outcome.verdict != Verdict::Invalid {
            return Err(CommandError::Aborted(why));
        }
        eprintln!("error: the run stopped early: {why}");
    }
    Ok(finished.outcome.verdict)
}

fn figures(args: &FiguresArgs) -> Result<Verdict, CommandError> {
    for path in campaign::plots::redraw_run_figures(&args.run_dir)? {
        println!("{}", path.display());
    }
    // Not a verdict: exit 0 when the figures are drawn.
    Ok(Verdict::Valid)
}

/// The fault kinds of a run that names none.
const DEFAULT_FAULTS: [FaultKind; 11] = [
    FaultKind::Kill,
    FaultKind::Stop,
    FaultKind::Panic,
    FaultKind::AgentKill,
    FaultKind::HostdRestart,
    FaultKind::TornTail,
    FaultKind::DoubleKill,
    FaultKind::KillTaker,
    FaultKind::KillTwo,
    FaultKind::BlkdRestart,
    FaultKind::LinkDown,
];

/// The default kinds that can apply on `backend` with `network`: those that need the agents
/// to take over without hostd are left out where they do not.
fn default_faults(backend: &str, network: campaign::run::Network) -> Vec<FaultKind> {
    let unfit = campaign::run::unfit_kinds(&DEFAULT_FAULTS, backend, network);
    DEFAULT_FAULTS
        .into_iter()
        .filter(|kind| !unfit.contains(kind))
        .collect()
}

/// The `--ports` of `run`: distinct, nonzero, one per node (the count is checked against
/// `--nodes` once both are known).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ports(Vec<u16>);

/// `--ports A,B,...`: the host ports of identities a, b, ...
fn parse_ports(text: &str) -> Result<Ports, String> {
    let ports: Vec<u16> = text
        .split(',')
        .map(|port| {
            port.trim()
                .parse()
                .map_err(|e| format!("{port:?} is not a port: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if ports.contains(&0) {
        return Err("port 0 is not a port".into());
    }
    for (i, port) in ports.iter().enumerate() {
        if ports[..i].contains(port) {
            return Err(format!("the ports must differ, {port} is given twice"));
        }
    }
    let max = campaign::run::MAX_NODES;
    if !(2..=max).contains(&ports.len()) {
        return Err(format!(
            "one port per node is needed (2 to {max}: PORT,PORT,...), {} given",
            ports.len()
        ));
    }
    Ok(Ports(ports))
}

/// `count` distinct free ports: each listener is held until all are found.
fn free_ports(count: usize) -> Result<Vec<u16>, CommandError> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CommandError::Port)?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|addr| addr.port()))
        .collect::<Result<_, _>>()
        .map_err(CommandError::Port)
}

/// The hostd binary: as given, else beside this one, else `hostd` in PATH.
fn hostd_binary(given: Option<&PathBuf>) -> PathBuf {
    if let Some(path) = given {
        return path.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("hostd")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("hostd"))
}

fn write_report(path: &Path, report: &Report) -> Result<(), CommandError> {
    let json = report.to_json()?;
    std::fs::File::create(path)
        .and_then(|mut file| file.write_all(&json))
        .map_err(|source| CommandError::WriteReport {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["ivha-campaign", "run"].iter().chain(args))?;
        let Command::Run(args) = cli.command else {
            panic!("not a run");
        };
        Ok(args)
    }

    #[test]
    fn ports_take_the_form_the_usage_shows() {
        let args = run_args(&["--ports", "31001,31002"]).unwrap();
        assert_eq!(args.ports, Some(Ports(vec![31001, 31002])));
        assert_eq!(args.nodes, 2);
        for bad in ["31001", "31001,31001", "x,2", "0,5", "1,2,3,4,5,6,7,8,9"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
        // A pair takes two ports, no more.
        let three = run_args(&["--ports", "1,2,3"]).unwrap();
        let error = run(&three).unwrap_err().to_string();
        assert_eq!(
            error,
            "--ports gives 3 ports, but --nodes 2 needs one per node: 2"
        );
    }

    #[test]
    fn nodes_go_from_two_to_eight() {
        let args = run_args(&["--nodes", "4", "--ports", "1,2,3,4"]).unwrap();
        assert_eq!(args.nodes, 4);
        assert_eq!(args.ports, Some(Ports(vec![1, 2, 3, 4])));
        for bad in ["1", "9", "x"] {
            assert!(run_args(&["--nodes", bad]).is_err(), "{bad}");
        }
        let error = run(&run_args(&["--nodes", "3", "--ports", "1,2"]).unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "--ports gives 2 ports, but --nodes 3 needs one per node: 3"
        );
        // Only double faults on a pair: nothing to run.
        let error = run(&run_args(&["--faults", "kill_taker,kill_two"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("need 3 or more"), "{error}");
        let ports = free_ports(8).unwrap();
        assert_eq!(ports.len(), 8);
        assert!(ports.iter().all(|p| *p != 0));
    }

    #[test]
    fn faults_without_hostd_are_refused_where_agents_wait_for_hostd() {
        // Named in user networking with QEMU guests: refused before anything starts.
        for kind in ["hostd_down_kill", "zombie", "both_stop", "links_down"] {
            let args = run_args(&["--faults", &format!("kill,{kind}")]).unwrap();
            let error = wire::error_chain::one_line(&run(&args).unwrap_err());
            assert!(
                error.starts_with(&format!(
                    "--faults names faults that cannot apply to this cluster: {kind}: these \
                     faults need the agents to take over without hostd"
                )),
                "{error}"
            );
            assert!(error.contains("--network bridge"), "{error}");
        }
        // Accepted by the parser for the process backend and bridge mode.
        let args = run_args(&["--faults", "zombie,both-stop", "--backend", "process"]).unwrap();
        assert_eq!(
            args.faults,
            Some(vec![FaultKind::Zombie, FaultKind::BothStop])
        );
        assert!(
            campaign::run::unfit_kinds(&FaultKind::ALL, "qemu", campaign::run::Network::Bridge)
                .is_empty()
        );
        assert!(
            campaign::run::unfit_kinds(&FaultKind::ALL, "process", campaign::run::Network::User)
                .is_empty()
        );
    }

    #[test]
    fn the_defaults_are_the_kinds_there_were() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.faults, None);
        for (backend, network) in [
            ("qemu", campaign::run::Network::User),
            ("qemu", campaign::run::Network::Bridge),
            ("process", campaign::run::Network::User),
        ] {
            assert_eq!(default_faults(backend, network), DEFAULT_FAULTS);
        }
        // Were the faults made while hostd is away among the defaults, user networking
        // would leave them out.
        let unfit =
            campaign::run::unfit_kinds(&FaultKind::ALL, "qemu", campaign::run::Network::User);
        assert_eq!(
            unfit,
            [
                FaultKind::HostdDownKill,
                FaultKind::Zombie,
                FaultKind::BothStop,
                FaultKind::LinksDown
            ]
        );
    }
}
