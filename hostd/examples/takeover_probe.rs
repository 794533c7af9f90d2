//! Measures takeover time against a running pair: kill node a (SIGKILL, then optionally
//! SIGSTOP for hangs) with a full log of unflushed writes, and time how long a client at a's
//! address waits until it reads its data again (served by b, after b replayed a's log).
//!
//! ```sh
//! cargo run -p hostd --example takeover_probe -- --state-dir DIR --trials 20
//! ```
//!
//! The pair must run with `[flusher] paused = true`, so that the writes of each trial are
//! still in a's log when a dies. `scripts/measure-takeover.sh` sets all of that up, runs
//! this and tears the pair down; `docs/takeover-measurements.md` explains the output.
//!
//! Per trial: make sure a holds its identity and both nodes are up (`hostd giveback a`
//! otherwise); write `--unflushed-mib` of a pseudo-random pattern to a's export; with an
//! idle client connected, take t0 and ask hostd (over its control socket) to kill a; then
//! connect to a's address and read one written block until the bytes are right (t1);
//! take the detection time and the takeover's timeline from `events.jsonl`; verify every
//! written byte through a's address; give a its identity back.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hostd::protocol::{ClusterStatus, KillSignal, MoveReport, NodeState, Request, Response};
use serde_json::Value;

use campaign::nbd_client::NbdClient;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The node that is killed, and whose address the probe reads through.
const VICTIM: &str = "a";
/// Bytes the probe reads per attempt.
const PROBE_LEN: u32 = 4096;
/// Connect and I/O timeout of each probe attempt.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Least time between two probe attempts (refused connects return at once: do not spin on
/// a 2-core host whose CPU the surviving guest needs).
const PROBE_PAUSE: Duration = Duration::from_millis(2);
/// Timeout for the bulk writes and the verification reads.
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a trial may wait for the pair to be ready (a giveback boots a again).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the probe waits for a's address to work again after the fault was injected,
/// beyond the heartbeat timeout for hangs.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Targets from the takeover issue (this machine, TCG, 16 MiB of unflushed log).
const TARGET_P50_MS: f64 = 500.0;
const TARGET_P99_MS: f64 = 1000.0;
const TARGET_HANG_MARGIN_MS: f64 = 300.0;

/// Measures kill-to-first-read through a node's address across N kills of a running pair.
#[derive(Debug, Parser)]
#[command(name = "takeover_probe")]
struct Args {
    /// The pair's state directory.
    #[arg(long, env = "IVHA_STATE_DIR", default_value = "/dev/shm/ivha")]
    state_dir: PathBuf,
    /// The hostd binary (default: target/debug/hostd beside this example, else `hostd` in PATH).
    #[arg(long)]
    hostd: Option<PathBuf>,
    /// SIGKILL trials.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// SIGSTOP (hang) trials, after the SIGKILL ones.
    #[arg(long, default_value_t = 3)]
    hang_trials: usize,
    /// MiB written to a's export before each kill (all of it unflushed: the flusher is paused).
    #[arg(long, default_value_t = 16)]
    unflushed_mib: u64,
    /// Size of each write, in KiB (4 to 1024).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(4..=1024))]
    write_kib: u32,
    /// The pair's config file, to read the heartbeat timeout from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The heartbeat timeout in ms (default: from --config, else 3000).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Kill through the `hostd kill` CLI (t0 before spawning it) instead of the control
    /// socket (t0 before sending the request).
    #[arg(long)]
    kill_via_cli: bool,
}

/// What one trial measured (times in ms).
#[derive(Debug, Clone, Default)]
struct Trial {
    /// t1 - t0: kill request sent until the first correct read through a's address.
    first_read: f64,
    /// a's `node_state` → down event, after t0.
    detection: Option<f64>,
    /// The fault_injected event, after t0 (the cost of the kill request itself).
    injected: Option<f64>,
    /// The takeover's timeline, in ms after detection.
    fenced: Option<f64>,
    replayed: Option<f64>,
    serving: Option<f64>,
    records: u64,
    /// Probe attempts until the first correct read.
    attempts: u64,
    /// Failed attempts: refused, timed out (connect, handshake or read), other errors.
    refused: u64,
    timed_out: u64,
    other_errors: u64,
    /// The first other error, with its time after t0.
    first_other: Option<(f64, String)>,
    /// Time to write the unflushed data.
    write_ms: f64,
    /// Records in a's log that were not flushed when it was killed.
    unflushed_records: u64,
    /// Time `hostd giveback a` took.
    giveback_ms: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("takeover_probe: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let hostd = match &args.hostd {
        Some(path) => path.clone(),
        None => default_hostd(),
    };
    let timeout_ms = heartbeat_timeout_ms(args)?;
    let probe = Probe {
        hostd,
        state_dir: args.state_dir.clone(),
        bytes: args.unflushed_mib << 20,
        write_len: args.write_kib as usize * 1024,
        kill_via_cli: args.kill_via_cli,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    if probe.bytes < u64::from(PROBE_LEN) {
        return Err("--unflushed-mib must be at least 1".into());
    }
    let status = probe.ready()?;
    println!(
        "takeover probe: state dir {}, accel {}, {} MiB unflushed per trial in {} KiB writes, heartbeat timeout {timeout_ms} ms",
        args.state_dir.display(),
        status.accel,
        args.unflushed_mib,
        args.write_kib
    );

    let mut kills = Vec::new();
    for index in 0..args.trials {
        let trial = probe.trial(index, KillSignal::Kill, timeout_ms)?;
        println!("kill {:>2}: {}", index + 1, trial_line(&trial));
        kills.push(trial);
    }
    let mut hangs = Vec::new();
    for index in 0..args.hang_trials {
        let trial = probe.trial(args.trials + index, KillSignal::Stop, timeout_ms)?;
        println!("hang {:>2}: {}", index + 1, trial_line(&trial));
        hangs.push(trial);
    }

    println!();
    if !kills.is_empty() {
        println!(
            "SIGKILL of a's QEMU, {} trials, {} MiB unflushed each (times in ms):",
            kills.len(),
            args.unflushed_mib
        );
        print!("{}", table(&kills));
        let first: Vec<f64> = kills.iter().map(|t| t.first_read).collect();
        let (p50, p99) = (percentile(&first, 0.50), percentile(&first, 0.99));
        println!(
            "target: p50 < {TARGET_P50_MS:.0} ms: {}; p99 < {TARGET_P99_MS:.0} ms: {}",
            verdict(p50 < TARGET_P50_MS),
            verdict(p99 < TARGET_P99_MS)
        );
    }
    if !hangs.is_empty() {
        println!();
        println!(
            "SIGSTOP of a's QEMU (a hang), {} trials, heartbeat timeout {timeout_ms} ms (times in ms):",
            hangs.len()
        );
        print!("{}", table(&hangs));
        let late: Vec<f64> = hangs
            .iter()
            .filter_map(|t| t.detection)
            .map(|d| d - timeout_ms as f64)
            .collect();
        if late.is_empty() {
            println!("detection minus timeout: no detection event recorded");
        } else {
            let max = late.iter().copied().fold(f64::MIN, f64::max);
            println!(
                "detection minus timeout: {}; target: within timeout + {TARGET_HANG_MARGIN_MS:.0} ms: {}",
                late.iter()
                    .map(|l| format!("{l:+.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                verdict(max <= TARGET_HANG_MARGIN_MS)
            );
        }
    }
    println!();
    println!("for context, quoted, not measured here: keepalived (VRRP) moves an address in");
    println!("  3.05-3.10 s with default 1 s adverts, 0.28-0.34 s tuned to 100 ms adverts");
    println!("  (address only: no log replay, no data check)");
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// target/debug/hostd beside this example (target/debug/examples/), else `hostd` in PATH.
fn default_hostd() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("hostd");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("hostd")
}

fn heartbeat_timeout_ms(args: &Args) -> Result<u64> {
    if let Some(ms) = args.timeout_ms {
        return Ok(ms);
    }
    match &args.config {
        Some(path) => Ok(hostd::config::Config::load(Some(path))?
            .heartbeat
            .timeout_ms),
        None => Ok(hostd::config::HeartbeatConfig::default().timeout_ms),
    }
}

#[derive(Debug)]
struct Probe {
    hostd: PathBuf,
    state_dir: PathBuf,
    /// Bytes written per trial.
    bytes: u64,
    write_len: usize,
    kill_via_cli: bool,
    seed: u64,
}

impl Probe {
    /// Runs the hostd CLI; its stdout, or an error with its stderr.
    fn hostd(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.hostd)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.hostd.display()))?;
        if !out.status.success() {
            return Err(format!(
                "hostd {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&self) -> Result<ClusterStatus> {
        Ok(serde_json::from_str(&self.hostd(&["status", "--json"])?)?)
    }

    /// Waits until both nodes are up and each serves its own identity, giving a its
    /// identity back if b holds it. Returns the status and how long a giveback took (ms).
    fn ready_with_giveback(&self) -> Result<(ClusterStatus, f64)> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut giveback_ms = 0.0;
        loop {
            let status = self.status()?;
            let [a, b] = status.nodes.as_slice() else {
                return Err("hostd status does not show two nodes".into());
            };
            let served_by = |n: &hostd::protocol::NodeStatus| n.served_by.clone();
            let home = served_by(a).as_deref() == Some(&a.name)
                && served_by(b).as_deref() == Some(&b.name);
            if home && a.state == NodeState::Up && b.state == NodeState::Up {
                return Ok((status, giveback_ms));
            }
            if served_by(a).as_deref() == Some(&b.name) && b.state == NodeState::Up {
                let started = Instant::now();
                let report: MoveReport =
                    serde_json::from_str(&self.hostd(&["giveback", &a.name, "--json"])?)?;
                giveback_ms += ms(started.elapsed());
                if report.to != a.name {
                    return Err(format!("giveback moved {} to {}", report.node, report.to).into());
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the pair is not ready after {READY_TIMEOUT:?}: a {} (served by {:?}), b {} (served by {:?})",
                    a.state.as_str(),
                    a.served_by,
                    b.state.as_str(),
                    b.served_by
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ready(&self) -> Result<ClusterStatus> {
        self.ready_with_giveback().map(|(status, _)| status)
    }

    fn trial(&self, index: usize, signal: KillSignal, timeout_ms: u64) -> Result<Trial> {
        let mut trial = Trial::default();
        let status = self.ready()?;
        let victim = &status.nodes[0];
        if victim.name != VICTIM {
            return Err(format!("node 0 is {:?}, expected {VICTIM:?}", victim.name).into());
        }
        let addr = nbd_addr(&victim.nbd)?;
        let seed = mix(self.seed.wrapping_add(index as u64));

        // b. The unflushed writes.
        let started = Instant::now();
        let mut client = NbdClient::connect(addr, VICTIM, BULK_TIMEOUT)
            .map_err(|e| format!("cannot connect to {addr} (export {VICTIM}): {e}"))?;
        if client.size() < self.bytes {
            return Err(format!(
                "export {VICTIM} has {} bytes, fewer than the {} to write",
                client.size(),
                self.bytes
            )
            .into());
        }
        let mut buf = vec![0u8; self.write_len];
        let mut offset = 0;
        while offset < self.bytes {
            let len = (self.bytes - offset).min(self.write_len as u64) as usize;
            pattern(seed, offset, &mut buf[..len]);
            client
                .write(offset, &buf[..len], false)
                .map_err(|e| format!("write at {offset}: {e}"))?;
            offset += len as u64;
        }
        client.disconnect();
        trial.write_ms = ms(started.elapsed());
        let after = self.status()?;
        let a = &after.nodes[0];
        let unflushed = a
            .head_seq
            .zip(a.flushed_seq)
            .map(|(head, flushed)| head.saturating_sub(flushed));
        match unflushed {
            Some(n) if n > 0 => trial.unflushed_records = n,
            _ => {
                return Err(format!(
                    "a's log holds no unflushed records after the writes (head {:?}, flushed {:?}): \
                     start the pair with [flusher] paused = true",
                    a.head_seq, a.flushed_seq
                )
                .into());
            }
        }

        // The block the probe reads: the last one written (the end of the replay), and a
        // few samples checked by checksum once a's address answers again.
        let probe_offset = (self.bytes - u64::from(PROBE_LEN)) / 4096 * 4096;
        let mut expected = vec![0u8; PROBE_LEN as usize];
        pattern(seed, probe_offset, &mut expected);
        let samples = sample_offsets(seed, self.bytes);
        let sample_sums: Vec<u64> = samples
            .iter()
            .map(|&o| {
                let mut block = vec![0u8; PROBE_LEN as usize];
                pattern(seed, o, &mut block);
                fnv1a(&block)
            })
            .collect();

        // c. The fault, with an idle client connected, then the probe.
        let idle = NbdClient::connect(addr, VICTIM, Duration::from_secs(5))
            .map_err(|e| format!("cannot connect the idle client: {e}"))?;
        let t0_unix_ms = unix_ms();
        let t0 = Instant::now();
        self.kill(signal)?;
        let limit = TAKEOVER_TIMEOUT
            + match signal {
                KillSignal::Stop => Duration::from_millis(timeout_ms),
                _ => Duration::ZERO,
            };
        let mut last_error;
        loop {
            let attempt = Instant::now();
            trial.attempts += 1;
            match NbdClient::connect(addr, VICTIM, PROBE_TIMEOUT)
                .and_then(|mut c| c.read(probe_offset, PROBE_LEN).map(|data| (c, data)))
            {
                Ok((c, data)) if data == expected => {
                    trial.first_read = ms(t0.elapsed());
                    c.disconnect();
                    break;
                }
                Ok((_, data)) => {
                    return Err(format!(
                        "a read through a's address after the {signal:?} returned wrong data at offset {probe_offset} \
                         (first bad byte at +{}): stale or lost writes",
                        first_difference(&data, &expected)
                    )
                    .into());
                }
                Err(error) => {
                    use std::io::ErrorKind;
                    match error.kind() {
                        ErrorKind::ConnectionRefused => trial.refused += 1,
                        ErrorKind::TimedOut | ErrorKind::WouldBlock => trial.timed_out += 1,
                        _ => {
                            trial.other_errors += 1;
                            trial
                                .first_other
                                .get_or_insert_with(|| (ms(t0.elapsed()), error.to_string()));
                        }
                    }
                    last_error = error.to_string();
                }
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "a's address did not serve a correct read within {limit:?} of the {signal:?} \
                     ({} attempts; last error: {last_error})",
                    trial.attempts
                )
                .into());
            }
            std::thread::sleep(PROBE_PAUSE.saturating_sub(attempt.elapsed()));
        }
        drop(idle);

        // d. What hostd recorded.
        let seen = wait_for_takeover(
            &hostd::state_dir::StateDir::new(&self.state_dir).event_log(),
            t0_unix_ms,
        )?;
        trial.injected = seen.injected.map(|t| t - t0_unix_ms);
        trial.detection = seen
            .down
            .or(Some(seen.takeover.detected_unix_ms as f64))
            .map(|t| t - t0_unix_ms);
        let timeline = &seen.takeover.timeline_ms;
        (trial.fenced, trial.replayed, trial.serving) =
            (timeline.fenced, timeline.replayed, timeline.serving);
        trial.records = seen.takeover.replayed_records;
        if !seen.takeover.replay_complete {
            return Err("the takeover's replay was incomplete (see b's console)".into());
        }

        // e. Every byte, through a's address (b serves it now).
        let mut client = NbdClient::connect(addr, VICTIM, BULK_TIMEOUT)
            .map_err(|e| format!("cannot connect to verify: {e}"))?;
        for (&o, &sum) in samples.iter().zip(&sample_sums) {
            let block = client.read(o, PROBE_LEN)?;
            if fnv1a(&block) != sum {
                return Err(format!("sampled block at offset {o} has the wrong checksum").into());
            }
        }
        let mut offset = 0;
        while offset < self.bytes {
            let len = (self.bytes - offset).min(self.write_len as u64) as usize;
            pattern(seed, offset, &mut buf[..len]);
            let data = client
                .read(offset, len as u32)
                .map_err(|e| format!("verification read at {offset}: {e}"))?;
            if data != buf[..len] {
                return Err(format!(
                    "DATA MISMATCH after takeover: byte {} differs (read through a's address)",
                    offset + first_difference(&data, &buf[..len]) as u64
                )
                .into());
            }
            offset += len as u64;
        }
        client.disconnect();

        // f. a gets its identity back (hostd restarts its QEMU first).
        trial.giveback_ms = self.ready_with_giveback()?.1;
        Ok(trial)
    }

    fn kill(&self, signal: KillSignal) -> Result<()> {
        let name = match signal {
            KillSignal::Kill => "kill",
            KillSignal::Stop => "stop",
            KillSignal::Panic => "panic",
            KillSignal::Agent => "agent",
        };
        if self.kill_via_cli {
            self.hostd(&["kill", VICTIM, "--signal", name])?;
            return Ok(());
        }
        let request = Request::Kill {
            node: VICTIM.to_owned(),
            signal,
        };
        let socket = hostd::state_dir::StateDir::new(&self.state_dir).control_socket();
        match hostd::daemon::socket_call(&socket, &request, Duration::from_secs(10))? {
            Response::Killed { .. } => Ok(()),
            Response::Error { message } => Err(format!("hostd refused the kill: {message}").into()),
            _ => Err("hostd answered a kill request with something else".into()),
        }
    }
}

/// What `events.jsonl` says about one fault (times in Unix ms).
#[derive(Debug)]
struct Seen {
    injected: Option<f64>,
    down: Option<f64>,
    takeover: MoveReport,
}

/// Reads the events after `t0_unix_ms` until the takeover of a is there.
fn wait_for_takeover(path: &Path, t0_unix_ms: f64) -> Result<Seen> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (mut injected, mut down, mut takeover) = (None, None, None);
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(time) = event["time_unix_ms"].as_f64() else {
                continue;
            };
            // Event times are whole milliseconds (truncated).
            if time + 1.0 < t0_unix_ms || event["node"] != VICTIM {
                continue;
            }
            match event["event"].as_str() {
                Some("fault_injected") => {
                    injected.get_or_insert(time);
                }
                Some("node_state") if event["to"] == "down" => {
                    down.get_or_insert(time);
                }
                Some("takeover") => takeover = Some(serde_json::from_value(event)?),
                Some("move_failed") => {
                    return Err(format!(
                        "hostd could not move a's identity: {}",
                        event["error"].as_str().unwrap_or("(no error text)")
                    )
                    .into());
                }
                _ => {}
            }
        }
        if let Some(takeover) = takeover {
            return Ok(Seen {
                injected,
                down,
                takeover,
            });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "a's address works again, but {} has no takeover event for it",
                path.display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn trial_line(t: &Trial) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let mut line = format!(
        "kill→read {:>6.0} ms | detect {:>5} | fenced +{} replayed +{} serving +{} \
         | {} records replayed ({} unflushed) | probes: {} ({} refused, {} timed out, {} other) \
         | write {:.0} ms | giveback {:.1} s",
        t.first_read,
        opt(t.detection),
        opt(t.fenced),
        opt(t.replayed),
        opt(t.serving),
        t.records,
        t.unflushed_records,
        t.attempts,
        t.refused,
        t.timed_out,
        t.other_errors,
        t.write_ms,
        t.giveback_ms / 1000.0,
    );
    if let Some((at, error)) = &t.first_other {
        line.push_str(&format!(
            " | first other probe error at +{at:.0} ms: {error}"
        ));
    }
    line
}

/// The summary table: p50, p99 and max of each column.
fn table(trials: &[Trial]) -> String {
    type Column = fn(&Trial) -> Option<f64>;
    let columns: [(&str, Column); 8] = [
        ("kill → first read", |t| Some(t.first_read)),
        ("kill request → injected", |t| t.injected),
        ("detection (after kill)", |t| t.detection),
        ("fenced (after detection)", |t| t.fenced),
        ("replayed (after detection)", |t| t.replayed),
        ("serving (after detection)", |t| t.serving),
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
        if values.is_empty() {
            out.push_str(&format!(
                "  {name:<28} {:>8} {:>8} {:>8} {:>4}\n",
                "-", "-", "-", 0
            ));
            continue;
        }
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        out.push_str(&format!(
            "  {name:<28} {:>8.1} {:>8.1} {:>8.1} {:>4}\n",
            percentile(&values, 0.50),
            percentile(&values, 0.99),
            max,
            values.len()
        ));
    }
    out
}

/// Nearest-rank percentile (p99 of fewer than 100 values is the maximum).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// "nbd://127.0.0.1:PORT/NAME" → 127.0.0.1:PORT.
fn nbd_addr(uri: &str) -> Result<SocketAddr> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| format!("not an nbd:// address: {uri:?}"))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    Ok(host_port
        .parse()
        .map_err(|e| format!("bad NBD address {uri:?}: {e}"))?)
}

/// Offsets of 8 sampled 4 KiB blocks among the first `bytes`.
fn sample_offsets(seed: u64, bytes: u64) -> Vec<u64> {
    let blocks = bytes / 4096;
    (0..8u64)
        .map(|i| mix(seed ^ (i + 1).wrapping_mul(0x9e37_79b9)) % blocks * 4096)
        .collect()
}

/// Fills `buf` with the pattern of `seed` at `offset` (a multiple of 8; each 8-byte word
/// depends on the seed and its own offset, so any range can be regenerated).
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let value = mix(seed ^ (offset / 8 + i as u64)).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}
