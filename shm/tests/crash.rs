//! Crash test of the NVRAM write log.
//!
//! A writer process (this test binary, re-executed to run [`crash_writer_child`]) maps a
//! small file-backed node region, formats or resumes it, and appends records of varied kinds
//! and sizes as fast as it can while a flusher thread in the same process advances the
//! flushed cursor now and then. After every append returns, it tells the parent the seq on
//! its stdout (`ACK <seq>`). The parent SIGKILLs it at a random moment, then maps the region
//! read-only and checks what a partner replaying after a crash relies on:
//!
//! - the log scans from the flushed cursor to the head without an error (contiguous seqs,
//!   good crcs, records where the head says they end), and `inspect` finds no problem;
//! - every record's contents are the ones its seq generates;
//! - every acknowledged seq is at or below the head (so present unless flushed), and at
//!   most one record (the one being acknowledged when the kill came) is published without
//!   an acknowledgement.
//!
//! The next iteration's writer resumes the same region, so the test also covers resuming
//! after a crash. The region is small (64 KiB) so that the ring wraps constantly.
//!
//! Environment:
//! - `IVHA_CRASH_SEED`: seed of the kill schedule and of the record contents (decimal or
//!   `0x` hex). A failure prints the seed and the iteration.
//! - `IVHA_CRASH_ITERATIONS`: number of kills (default 500).
//! - `IVHA_CRASH_SABOTAGE=ack-before-append`: the writer acknowledges each record *before*
//!   appending it, and `=phantom-ack`: the verifier expects one acknowledgement more than
//!   the child gave. The test must then fail (this is how it was checked to be able to
//!   fail); never set it otherwise.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{ChildGuard, OwnedEntry, Rng, mix, rerun_test};
use shm::inspect::{InspectOptions, RegionReport, inspect};
use shm::log::FlushedWriter;
use shm::{Access, BackPressure, Cursor, LogScanner, Mapping, NodeRegion, Record};

/// Name of the test function that acts as the writer in the child process.
const CHILD_TEST: &str = "crash_writer_child";
/// Set (to the region path) only in the child: makes [`crash_writer_child`] the writer.
const ENV_REGION: &str = "IVHA_CRASH_CHILD_REGION";
const ENV_CHILD_SEED: &str = "IVHA_CRASH_CHILD_SEED";
const ENV_DATA_SEED: &str = "IVHA_CRASH_DATA_SEED";
const ENV_SEED: &str = "IVHA_CRASH_SEED";
const ENV_ITERATIONS: &str = "IVHA_CRASH_ITERATIONS";
const ENV_SABOTAGE: &str = "IVHA_CRASH_SABOTAGE";

const DEFAULT_SEED: u64 = 0x1bad_5eed_c0ff_ee00;
const DEFAULT_ITERATIONS: usize = 500;
/// 4 KiB header page and a 60 KiB ring.
const REGION_SIZE: u64 = 64 * 1024;
/// How long the parent waits for a child to get ready before calling it hung.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A child whose parent vanished without killing it stops on its own after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Deterministic contents.

/// What record `seq` must contain: a pure function of the data seed and the seq, so the
/// parent can check any record it finds without talking to the writer.
fn spec(data_seed: u64, seq: u64) -> OwnedEntry {
    let mut rng = Rng::new(mix(data_seed ^ mix(seq)));
    let export = rng.below(4) as u32;
    let offset = rng.below(1 << 30) * 512;
    let range_len = |rng: &mut Rng| (rng.below(256) + 1) * 4096;
    match rng.below(16) {
        0 => OwnedEntry::trim(export, offset, range_len(&mut rng)),
        1 => OwnedEntry::write_zeroes(export, offset, range_len(&mut rng)),
        k => {
            // Mostly small and medium writes, some empty, some of several KiB.
            let len = match k % 4 {
                0 => rng.below(64),
                1 | 2 => rng.below(2048),
                _ => rng.below(8192),
            } as usize;
            OwnedEntry::write(export, offset, rng.bytes(len))
        }
    }
}

/// Checks that `record` is record `seq` with the contents its seq generates.
fn check_record(data_seed: u64, seq: u64, record: &Record) -> Result<(), String> {
    common::check_record(record, seq, &spec(data_seed, seq).entry())
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text:?} is not a number: {e}")))
}

// ---------------------------------------------------------------------------------------
// The writer (child process).

/// The writer. When the test harness runs it normally (no `IVHA_CRASH_CHILD_REGION`), it
/// does nothing; the crash test runs it in a child process it kills.
#[test]
fn crash_writer_child() {
    let Some(path) = std::env::var_os(ENV_REGION) else {
        return;
    };
    run_writer(Path::new(&path));
}

/// Reports a fatal problem to the parent (stdout and stderr) and exits.
fn die(what: &str) -> ! {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "\nERR {what}");
    let _ = out.flush();
    eprintln!("crash writer: {what}");
    std::process::exit(3);
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        // The parent is gone: nobody is listening, so stop writing.
        std::process::exit(2);
    }
}

fn open_or_format(path: &Path) -> NodeRegion {
    if path.exists() {
        let mapping = Mapping::open(path, Access::ReadWrite)
            .unwrap_or_else(|e| die(&format!("cannot map {}: {e}", path.display())));
        return NodeRegion::open(mapping)
            .unwrap_or_else(|e| die(&format!("cannot resume {}: {e}", path.display())));
    }
    // Format under another name and rename: a kill mid-format leaves no half-made region
    // under the real name.
    let tmp = path.with_extension("formatting");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => die(&format!("cannot remove {}: {e}", tmp.display())),
    }
    let mapping = Mapping::create_file(&tmp, REGION_SIZE)
        .unwrap_or_else(|e| die(&format!("cannot create {}: {e}", tmp.display())));
    let region = NodeRegion::format(mapping, 0, "crash")
        .unwrap_or_else(|e| die(&format!("cannot format {}: {e}", tmp.display())));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| die(&format!("cannot rename: {e}")));
    region
}

fn run_writer(path: &Path) {
    let seed = env_u64(ENV_CHILD_SEED).unwrap_or(1);
    let data_seed = env_u64(ENV_DATA_SEED).unwrap_or_else(|| die("no data seed"));
    let ack_first = std::env::var(ENV_SABOTAGE).is_ok_and(|v| v == "ack-before-append");
    let started = Instant::now();

    let region = open_or_format(path);
    let writer = region
        .writer(seed | 1)
        .unwrap_or_else(|e| die(&format!("cannot take over the region: {e}")));
    let mut appender = writer.appender;
    let flushed = writer.flushed;
    // The harness may have printed "test crash_writer_child ... " without a newline.
    say(&format!(
        "\nREADY {} {}",
        appender.head().seq,
        flushed.flushed().seq
    ));

    let flusher_region = region.clone();
    std::thread::spawn(move || run_flusher(&flusher_region, flushed, seed, data_seed));

    loop {
        let seq = appender.head().seq + 1;
        let spec = spec(data_seed, seq);
        if ack_first {
            say(&format!("ACK {seq}"));
        }
        let appended = appender
            .append(&spec.entry(), BackPressure::default())
            .unwrap_or_else(|e| die(&format!("append of record {seq} failed: {e}")));
        if appended.seq != seq {
            die(&format!(
                "appended record {} where {seq} was due",
                appended.seq
            ));
        }
        if !ack_first {
            say(&format!("ACK {seq}"));
        }
        if started.elapsed() > CHILD_LIFETIME {
            std::process::exit(0);
        }
    }
}

/// Frees ring space now and then: scans (and checks) a random number of the unflushed
/// records and publishes the flushed cursor past them.
fn run_flusher(region: &NodeRegion, mut flushed: FlushedWriter, seed: u64, data_seed: u64) {
    let mut rng = Rng::new(mix(seed ^ 0xf1u64));
    loop {
        let from = flushed.flushed();
        let head = region
            .head()
            .unwrap_or_else(|| die("flusher: head unreadable"));
        if head.seq > from.seq {
            let take = rng.below(head.seq - from.seq) + 1;
            let mut to = from;
            let scanner = LogScanner::new(region.mapping(), region.geometry(), from, head);
            for item in scanner.take(take as usize) {
                let record =
                    item.unwrap_or_else(|e| die(&format!("flusher: scan from {from:?}: {e}")));
                check_record(data_seed, to.seq + 1, &record)
                    .unwrap_or_else(|e| die(&format!("flusher: {e}")));
                to = record.end();
            }
            flushed
                .advance(to)
                .unwrap_or_else(|e| die(&format!("flusher: {e}")));
        }
        match rng.below(4) {
            0 => {}
            1 => std::thread::yield_now(),
            _ => std::thread::sleep(Duration::from_micros(rng.below(200))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent.

#[derive(Debug, Clone, Copy)]
enum KillPlan {
    /// Kill this long after spawning, whatever the child is doing (startup, resume).
    AfterSpawn(Duration),
    /// Kill this long after the child said it is appending.
    AfterReady(Duration),
}

impl KillPlan {
    fn pick(rng: &mut Rng) -> Self {
        if rng.below(16) == 0 {
            return KillPlan::AfterSpawn(Duration::from_micros(rng.below(3000)));
        }
        let micros = match rng.below(8) {
            0 => 0,
            1 => rng.below(100),
            2 | 3 => rng.below(1000),
            _ => rng.below(5000),
        };
        KillPlan::AfterReady(Duration::from_micros(micros))
    }
}

/// What one killed child said and how it ended.
#[derive(Debug)]
struct Killed {
    status: ExitStatus,
    /// `(head seq, flushed seq)` the child resumed from.
    ready: Option<(u64, u64)>,
    acks: Vec<u64>,
    errors: Vec<String>,
    stderr: String,
}

fn run_and_kill(
    path: &Path,
    data_seed: u64,
    child_seed: u64,
    plan: KillPlan,
    sabotage: Option<&str>,
) -> Result<Killed, String> {
    let mut command = rerun_test(CHILD_TEST).map_err(|e| format!("current_exe: {e}"))?;
    command
        .env(ENV_REGION, path)
        .env(ENV_CHILD_SEED, child_seed.to_string())
        .env(ENV_DATA_SEED, data_seed.to_string())
        .env_remove(ENV_SABOTAGE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(sabotage) = sabotage {
        command.env(ENV_SABOTAGE, sabotage);
    }
    let mut child =
        ChildGuard::spawn(&mut command).map_err(|e| format!("cannot start the writer: {e}"))?;
    let stdout = child.child.stdout.take().ok_or("no stdout pipe")?;

    // Drain stdout on a thread (the guard drains stderr), so the child never blocks on a
    // full pipe and the parent can wait for READY with a timeout.
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout_thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                // A line cut short by the kill was never acknowledged: ignore it.
                Ok(0) | Err(_) => break,
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    if lines_tx.send(line.trim_end().to_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut seen = Vec::new();
    let mut problem = None;
    match plan {
        KillPlan::AfterSpawn(delay) => std::thread::sleep(delay),
        KillPlan::AfterReady(delay) => {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match lines.recv_timeout(left) {
                    Ok(line) => {
                        let ready = line.starts_with("READY ");
                        seen.push(line);
                        if ready {
                            std::thread::sleep(delay);
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        problem = Some(format!(
                            "the writer did not get ready within {READY_TIMEOUT:?}"
                        ));
                        break;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        problem = Some("the writer exited before it got ready".to_owned());
                        break;
                    }
                }
            }
        }
    }
    let status = child
        .kill_and_wait()
        .map_err(|e| format!("cannot reap the writer: {e}"))?;
    seen.extend(lines.iter());
    let _ = stdout_thread.join();
    let stderr = child.stderr();
    if let Some(problem) = problem {
        return Err(format!(
            "{problem} (status {status})\nwriter stderr:\n{stderr}"
        ));
    }

    let mut killed = Killed {
        status,
        ready: None,
        acks: Vec::new(),
        errors: Vec::new(),
        stderr,
    };
    for line in seen {
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|e| format!("bad line from the writer {line:?}: {e}"))
        };
        if let Some(rest) = line.strip_prefix("ACK ") {
            killed.acks.push(number(rest)?);
        } else if let Some(rest) = line.strip_prefix("READY ") {
            let (head, flushed) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad READY line {line:?}"))?;
            killed.ready = Some((number(head)?, number(flushed)?));
        } else if let Some(rest) = line.strip_prefix("ERR ") {
            killed.errors.push(rest.to_owned());
        }
        // Anything else is the test harness talking.
    }
    Ok(killed)
}

/// What the previous iteration left in the region.
#[derive(Debug, Clone, Copy, Default)]
struct Prev {
    head: Cursor,
    flushed: Cursor,
}

#[derive(Debug, Default)]
struct Totals {
    records_checked: u64,
    acks: u64,
    kills_with_acks: u64,
    kills_without_acks: u64,
    kills_before_region: u64,
    kills_before_ready: u64,
    kills_with_unacked_record: u64,
    torn_tails: u64,
    scans_with_records: u64,
    backpressure_waits: u64,
}

/// Checks the region after `killed` died. `prev` is what the previous check found.
fn verify(
    path: &Path,
    data_seed: u64,
    prev: &mut Option<Prev>,
    killed: &Killed,
    sabotage: Option<&str>,
    totals: &mut Totals,
) -> Result<(), String> {
    if killed.status.signal() != Some(libc::SIGKILL) {
        return Err(format!(
            "the writer was not killed by SIGKILL but ended with {}",
            killed.status
        ));
    }
    if let Some(error) = killed.errors.first() {
        return Err(format!("the writer reported: {error}"));
    }
    if !path.exists() {
        // Killed before the first writer finished formatting.
        if prev.is_some() || !killed.acks.is_empty() || killed.ready.is_some() {
            return Err(format!(
                "region {} vanished after it existed or after acknowledgements",
                path.display()
            ));
        }
        totals.kills_before_region += 1;
        return Ok(());
    }
    let before = prev.unwrap_or_default();
    if killed.ready.is_none() {
        totals.kills_before_ready += 1;
    }

    let mapping = Mapping::open(path, Access::ReadOnly)
        .map_err(|e| format!("cannot map the region read-only: {e}"))?;
    let region = NodeRegion::open(mapping).map_err(|e| format!("region does not open: {e}"))?;
    let head = region.head().ok_or("head cursor unreadable")?;
    let flushed = region.flushed().ok_or("flushed cursor unreadable")?;

    // The writer resumed exactly where the previous one died.
    if let Some((ready_head, ready_flushed)) = killed.ready {
        if (ready_head, ready_flushed) != (before.head.seq, before.flushed.seq) {
            return Err(format!(
                "the writer resumed at head {ready_head} / flushed {ready_flushed}, but the \
                 previous crash left head {:?} / flushed {:?}",
                before.head, before.flushed
            ));
        }
    }
    if head < before.head || flushed < before.flushed {
        return Err(format!(
            "cursors went backwards: head {:?} -> {head:?}, flushed {:?} -> {flushed:?}",
            before.head, before.flushed
        ));
    }

    // Acknowledgements: consecutive from the resumed head, all published, and at most one
    // published record (the one being acknowledged at the kill) not acknowledged.
    for (i, &seq) in killed.acks.iter().enumerate() {
        let expected = before.head.seq + 1 + i as u64;
        if seq != expected {
            return Err(format!(
                "acknowledgement #{i} is seq {seq}, expected {expected}"
            ));
        }
    }
    let last_ack = killed.acks.last().copied().unwrap_or(before.head.seq);
    if last_ack > head.seq {
        return Err(format!(
            "record {last_ack} was acknowledged but the head is at {head:?}: acknowledged \
             records {}..={last_ack} are lost",
            head.seq + 1
        ));
    }
    if head.seq > last_ack + 1 {
        return Err(format!(
            "head {head:?} is {} records past the last acknowledged seq {last_ack}",
            head.seq - last_ack
        ));
    }
    if head.seq == last_ack + 1 {
        totals.kills_with_unacked_record += 1;
    }
    if killed.acks.is_empty() {
        totals.kills_without_acks += 1;
    } else {
        totals.kills_with_acks += 1;
    }
    totals.acks += killed.acks.len() as u64;

    // The unflushed records: a clean scan with the right contents.
    let mut expected_seq = flushed.seq + 1;
    let scanner = region
        .unflushed()
        .map_err(|e| format!("cannot scan the log: {e}"))?;
    for item in scanner {
        let record = item
            .map_err(|e| format!("scan from flushed {flushed:?} to head {head:?} failed: {e}"))?;
        check_record(data_seed, expected_seq, &record)?;
        expected_seq += 1;
        totals.records_checked += 1;
    }
    if expected_seq != head.seq + 1 {
        return Err(format!(
            "scan from {flushed:?} to {head:?} ended after record {}",
            expected_seq - 1
        ));
    }
    if head.seq > flushed.seq {
        totals.scans_with_records += 1;
    }
    if sabotage == Some("phantom-ack") && last_ack + 1 > head.seq {
        return Err(format!(
            "sabotage: expected one more acknowledged record ({}) than the head {head:?}",
            last_ack + 1
        ));
    }

    // `inspect`, the operator's view, agrees and finds nothing wrong.
    let mapping = Mapping::open(path, Access::ReadOnly)
        .map_err(|e| format!("cannot map the region read-only: {e}"))?;
    match inspect(mapping, InspectOptions::default()) {
        RegionReport::Node(report) => {
            if let Some(problem) = report.problem {
                return Err(format!("inspect found a problem: {}", problem.message));
            }
            if report.head != Some(head) || report.flushed != Some(flushed) {
                return Err(format!(
                    "inspect saw head {:?} / flushed {:?}, the scan {head:?} / {flushed:?}",
                    report.head, report.flushed
                ));
            }
            if report.records.len() as u64 != head.seq - flushed.seq {
                return Err(format!(
                    "inspect listed {} records, expected {}",
                    report.records.len(),
                    head.seq - flushed.seq
                ));
            }
            if report.unpublished_tail.is_some() {
                totals.torn_tails += 1;
            }
        }
        other => return Err(format!("inspect does not see a node region: {other:?}")),
    }

    totals.backpressure_waits = region.stats().backpressure_waits;
    *prev = Some(Prev { head, flushed });
    Ok(())
}

#[test]
fn writer_killed_at_random_points_never_loses_acknowledged_records() {
    let seed = env_u64(ENV_SEED).unwrap_or(DEFAULT_SEED);
    let iterations = env_u64(ENV_ITERATIONS).map_or(DEFAULT_ITERATIONS, |n| n as usize);
    let sabotage = std::env::var(ENV_SABOTAGE).ok();
    let sabotage = sabotage.as_deref();
    let data_seed = mix(seed ^ 0xda7a);

    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("node0.region");
    let mut rng = Rng::new(seed);
    let mut prev = None;
    let mut totals = Totals::default();
    let started = Instant::now();

    for iteration in 0..iterations {
        let child_seed = rng.next();
        // The first few writers die early, some before or while formatting the region.
        let plan = if iteration < 4 {
            KillPlan::AfterSpawn(Duration::from_micros(rng.below(2000)))
        } else {
            KillPlan::pick(&mut rng)
        };
        let result = run_and_kill(&path, data_seed, child_seed, plan, sabotage).and_then(|k| {
            verify(&path, data_seed, &mut prev, &k, sabotage, &mut totals)
                .map_err(|e| format!("{e}\nwriter stderr:\n{}", k.stderr))
        });
        if let Err(message) = result {
            panic!(
                "crash test failed at iteration {iteration} of {iterations} \
                 (reproduce with IVHA_CRASH_SEED={seed:#x}; kill plan {plan:?}): {message}"
            );
        }
    }

    let elapsed = started.elapsed();
    let ring_size = REGION_SIZE - 4096;
    let last = prev.expect("no iteration ever found the region");
    let wraps = last.head.pos / ring_size;
    println!(
        "crash: {iterations} kills in {:.1} s (seed {seed:#x}): {} records appended, \
         {} record checks, {} acks; kills with acks {}, without {}, before the writer \
         was ready {}, before the region existed {}, with a published but unacked record {}, with a torn unpublished tail {}; {} back-pressure waits; \
         ring ({ring_size} bytes) wrapped {wraps} times (head {:?}, flushed {:?})",
        elapsed.as_secs_f64(),
        last.head.seq,
        totals.records_checked,
        totals.acks,
        totals.kills_with_acks,
        totals.kills_without_acks,
        totals.kills_before_ready,
        totals.kills_before_region,
        totals.kills_with_unacked_record,
        totals.torn_tails,
        totals.backpressure_waits,
        last.head,
        last.flushed,
    );

    // The kills landed at varied points and the log really was exercised.
    let n = iterations as u64;
    assert!(
        totals.kills_with_acks >= n / 4,
        "only {} of {n} kills came after an acknowledged append",
        totals.kills_with_acks
    );
    assert!(
        totals.scans_with_records >= n / 4,
        "only {} of {n} checks had unflushed records to scan",
        totals.scans_with_records
    );
    assert!(totals.records_checked > n, "too few records checked");
    assert!(
        last.head.pos > ring_size,
        "the ring never wrapped: head {:?}",
        last.head
    );
    if n >= 100 {
        assert!(wraps >= 10, "the ring wrapped only {wraps} times");
        assert!(last.flushed.seq > 0, "the flusher never advanced");
    }
}
