//! Appends 4 KiB writes to a node region's log until killed, printing each acknowledged seq.
//!
//! Used by `scripts/demo.sh` to show what a crash leaves behind, and handy for poking at
//! `hostd inspect` by hand:
//!
//! ```text
//! cargo run -p shm --example log-writer -- /dev/shm/a.region [--flush-lag N] [--count N]
//! ```
//!
//! The region is created (64 MiB) and formatted if missing, else resumed. The "flusher"
//! here only advances the flushed cursor, keeping the last `--flush-lag` records unflushed,
//! so there is something to inspect and replay after a kill.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use shm::{Access, BackPressure, Entry, Mapping, NodeRegion};

struct Args {
    path: PathBuf,
    flush_lag: u64,
    count: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        path: PathBuf::new(),
        flush_lag: 64,
        count: u64::MAX,
    };
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--flush-lag" => parsed.flush_lag = number("--flush-lag")?,
            "--count" => parsed.count = number("--count")?,
            "-h" | "--help" => {
                return Err("usage: log-writer REGION [--flush-lag N] [--count N]".into());
            }
            path if parsed.path.as_os_str().is_empty() => parsed.path = PathBuf::from(path),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if parsed.path.as_os_str().is_empty() {
        return Err("usage: log-writer REGION [--flush-lag N] [--count N]".into());
    }
    Ok(parsed)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let region = if args.path.exists() {
        NodeRegion::open(Mapping::open(&args.path, Access::ReadWrite)?)?
    } else {
        NodeRegion::format(Mapping::create_file(&args.path, 64 << 20)?, 0, "a")?
    };
    let mut writer = region.writer(std::process::id().into())?;
    let mut pending = std::collections::VecDeque::new();
    let mut data = vec![0u8; 4096];
    let mut stdout = std::io::stdout().lock();
    for i in 0..args.count {
        // Each block says which seq wrote it, so a reader can check what it finds.
        let seq = writer.appender.head().seq + 1;
        for (j, chunk) in data.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(seq ^ j as u64).to_le_bytes());
        }
        let offset = (seq * 7919 % 16384) * 4096;
        let appended = writer.appender.append(
            &Entry::Write {
                export: 0,
                offset,
                data: &data,
            },
            BackPressure::default(),
        )?;
        // The "reply to the client": only now is the write acknowledged.
        writeln!(stdout, "acknowledged {}", appended.seq)?;
        stdout.flush()?;
        pending.push_back(appended.head);
        while pending.len() as u64 > args.flush_lag {
            if let Some(end) = pending.pop_front() {
                writer.flushed.advance(end)?;
            }
        }
        if i % 100 == 0 {
            writer.heartbeat.beat();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "log-writer: error: {}",
                wire::error_chain::one_line(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
