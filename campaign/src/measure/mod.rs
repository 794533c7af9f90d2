//! `ivha-campaign measure-takeover`: takeover time against a running pair. Node a is killed
//! (SIGKILL, then SIGSTOP for hangs) with a log of unflushed writes of each size asked for,
//! and a client at a's address times how long it waits until it reads its data again
//! (served by the survivor, which serves a's log from a's region while it replays it).
//!
//! The pair must run with `[flusher] paused = true`, so that the writes of each trial are
//! still in a's log when a dies. `scripts/measure-takeover.sh` sets that up, runs this and
//! tears the pair down; `docs/takeover-measurements.md` explains the output.
//!
//! Per trial: make sure a holds its identity and every node is up (`hostd giveback a`
//! otherwise); write `--unflushed-mib` of a pseudo-random pattern to a's export; with an
//! idle client connected, take t0 and ask hostd (over its control socket) to kill a; then
//! connect to a's address and read one written block until the bytes are right (t1);
//! take the detection time and the takeover's timeline from `events.jsonl`; verify every
//! written byte through a's address; give a its identity back.

mod plots;
mod trial;

use std::path::PathBuf;

use clap::Args;
use wire::control::KillSignal;

use crate::progress::Progress;
use crate::report::Percentiles;
use plots::TrialSeries;
use trial::{Probe, Trial};

/// Targets of the takeover-speed work (this machine, TCG): kill → first good read, p50,
/// with an empty log; the p50 with a full log against it; a hang → first good read, p50.
const TARGET_P50_MS: f64 = 60.0;
const TARGET_RATIO: f64 = 1.3;
const TARGET_HANG_P50_MS: f64 = 500.0;

/// Options of `ivha-campaign measure-takeover`.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// The pair's state directory.
    #[arg(long, env = "IVHA_STATE_DIR", default_value = "/dev/shm/ivha")]
    pub state_dir: PathBuf,
    /// The hostd binary (default: beside this one, else `hostd` in PATH).
    #[arg(long)]
    pub hostd: Option<PathBuf>,
    /// SIGKILL trials.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    /// SIGSTOP (hang) trials, after the SIGKILL ones.
    #[arg(long, default_value_t = 3)]
    pub hang_trials: usize,
    /// MiB written to a's export before each kill (all of it unflushed: the flusher is
    /// paused), one series of trials per size; 0 writes only the probe's block. The first
    /// size is the baseline the others are compared with.
    #[arg(long, default_values_t = [0, 16, 64], value_delimiter = ',',
          value_parser = clap::value_parser!(u64).range(0..=4096))]
    pub unflushed_mib: Vec<u64>,
    /// Size of each write, in KiB (4 to 1024).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(4..=1024))]
    pub write_kib: u32,
    /// The pair's heartbeat timeout in ms (hang trials wait for it).
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Kill through the `hostd kill` CLI (t0 before spawning it) instead of the control
    /// socket (t0 before sending the request).
    #[arg(long)]
    pub kill_via_cli: bool,
    /// Write the figures (a timeline per trial, every trial's kill → first read) into
    /// this directory.
    #[arg(long, value_name = "DIR")]
    pub figures: Option<PathBuf>,
}

/// Why a measurement stopped.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Hostd(#[from] crate::hostd::HostdError),
    #[error("cannot {what}")]
    Nbd {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hostd refused the kill: {0}")]
    KillRefused(String),
    #[error("cannot ask hostd to kill node a over its control socket")]
    Socket(#[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
    #[error("cannot draw the measurement's figures")]
    DrawFigure(#[source] figures::DrawError),
    #[error("cannot write {path}")]
    WriteFigure {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the trials and prints each, then the summary against the targets.
pub fn run(args: &MeasureArgs, hostd: PathBuf) -> Result<(), MeasureError> {
    let probe = Probe::new(args, hostd);
    let status = probe.ready()?;
    let sizes: Vec<String> = args.unflushed_mib.iter().map(u64::to_string).collect();
    println!(
        "takeover probe: state dir {}, accel {}, {} MiB unflushed per trial in {} KiB writes, heartbeat timeout {} ms",
        args.state_dir.display(),
        status.accel,
        sizes.join(" / "),
        args.write_kib,
        args.timeout_ms
    );

    let total = args.unflushed_mib.len() * args.trials + args.hang_trials;
    let mut progress = Progress::new("measure-takeover", "trials", total as u64);
    let mut series: Vec<(u64, Vec<Trial>)> = Vec::new();
    let mut index = 0;
    for &mib in &args.unflushed_mib {
        let mut kills = Vec::new();
        for trial_number in 0..args.trials {
            let trial = probe.trial(index, KillSignal::Kill, mib)?;
            index += 1;
            progress.suspend(|| {
                println!(
                    "kill {mib:>3} MiB {:>2}: {}",
                    trial_number + 1,
                    trial.line()
                );
            });
            progress.step();
            kills.push(trial);
        }
        series.push((mib, kills));
    }
    let hang_mib = args.unflushed_mib.first().copied().unwrap_or(0);
    let mut hangs = Vec::new();
    for trial_number in 0..args.hang_trials {
        let trial = probe.trial(index, KillSignal::Stop, hang_mib)?;
        index += 1;
        progress.suspend(|| {
            println!(
                "hang {hang_mib:>3} MiB {:>2}: {}",
                trial_number + 1,
                trial.line()
            );
        });
        progress.step();
        hangs.push(trial);
    }
    drop(progress);

    let p50 = |trials: &[Trial]| {
        let first: Vec<f64> = trials.iter().map(|t| t.first_read).collect();
        Percentiles::of(&first).p50
    };
    for (mib, kills) in series.iter().filter(|(_, k)| !k.is_empty()) {
        println!();
        println!(
            "SIGKILL of a's QEMU, {} trials, {mib} MiB unflushed each (times in ms):",
            kills.len()
        );
        print!("{}", table(kills));
    }
    println!();
    println!("kill → first good read, p50 by unflushed MiB (ratio to the first size):");
    let baseline = series.first().and_then(|(_, k)| p50(k));
    for (mib, kills) in &series {
        let Some(this) = p50(kills) else {
            continue;
        };
        let ratio = baseline.map(|b| this / b.max(f64::MIN_POSITIVE));
        println!(
            "  {mib:>4} MiB: {this:>7.1} ms  {}",
            ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
        );
    }
    if let Some(base) = baseline {
        println!(
            "target: p50 < {TARGET_P50_MS:.0} ms with the first size: {}",
            verdict(base < TARGET_P50_MS)
        );
        let worst = series
            .iter()
            .filter_map(|(_, k)| p50(k))
            .map(|p| p / base.max(f64::MIN_POSITIVE))
            .fold(0.0, f64::max);
        println!(
            "target: every size at most {TARGET_RATIO:.1}x the first: {} (worst {worst:.2}x)",
            verdict(worst <= TARGET_RATIO)
        );
    }
    if !hangs.is_empty() {
        println!();
        println!(
            "SIGSTOP of a's QEMU (a hang), {} trials, {hang_mib} MiB unflushed, heartbeat timeout {} ms (times in ms):",
            hangs.len(),
            args.timeout_ms
        );
        print!("{}", table(&hangs));
        if let Some(hang) = p50(&hangs) {
            println!(
                "target: hang → first good read p50 < {TARGET_HANG_P50_MS:.0} ms: {} ({hang:.1} ms)",
                verdict(hang < TARGET_HANG_P50_MS)
            );
        }
    }
    println!();
    println!("for context, quoted, not measured here: keepalived (VRRP) moves an address in");
    println!("  3.05-3.6 s with default 1 s adverts, 0.28-0.34 s tuned to 100 ms adverts");
    println!("  (address only: no log replay, no data check)");
    if let Some(dir) = &args.figures {
        let mut all: Vec<TrialSeries<'_>> = series
            .iter()
            .map(|(mib, kills)| TrialSeries {
                fault: "kill",
                unflushed_mib: *mib,
                trials: kills,
            })
            .collect();
        all.push(TrialSeries {
            fault: "hang",
            unflushed_mib: hang_mib,
            trials: &hangs,
        });
        let written = plots::write_figures(dir, &all)?;
        println!();
        for path in written {
            println!("figure: {}", path.display());
        }
    }
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// The summary table: p50, p99 and max of each column.
fn table(trials: &[Trial]) -> String {
    type Column = fn(&Trial) -> Option<f64>;
    let columns: [(&str, Column); 9] = [
        ("kill → first read", |t| Some(t.first_read)),
        ("kill request → injected", |t| t.injected),
        ("detection (after kill)", |t| t.detection),
        ("fenced (after detection)", |t| t.fenced),
        ("scanned (after detection)", |t| t.scanned),
        ("serving (after detection)", |t| t.serving),
        ("replayed (after detection)", |t| t.replayed),
        ("serving → first read", |t| {
            Some(t.first_read - t.detection? - t.serving?)
        }),
        ("replayed records", |t| Some(t.records as f64)),
    ];
    let mut out = format!(
        "  {:<28} {:>8} {:>8} {:>8} {:>4}\n",
        "", "p50", "p99", "max", "n"
    );
    for (name, column) in &columns {
        let values: Vec<f64> = trials.iter().filter_map(column).collect();
        let spread = Percentiles::of(&values);
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        out.push_str(&format!(
            "  {name:<28} {:>8} {:>8} {:>8} {:>4}\n",
            cell(spread.p50),
            cell(spread.p99),
            cell(spread.max),
            values.len()
        ));
    }
    out
}
