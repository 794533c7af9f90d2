//! Two processes mapping the same region see each other's published words.
//!
//! A child process (this test binary, re-executed to run [`two_process_child`]) maps a node
//! region read-write and appends records in batches, beating the heartbeat as it goes. The
//! parent maps the same region read-only and follows the log and the heartbeat until it has
//! seen everything, checking every record's contents; it never relies on the child's output
//! or exit to know what was written, only on the shared memory.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod common;

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::{ChildGuard, OwnedEntry, RegionFile, Rng, mix, rerun_test};
use shm::{Access, BackPressure, Cursor, Heartbeat, LogScanner, Mapping, NodeRegion, Record};

/// Name of the test function that acts as the writer in the child process.
const CHILD_TEST: &str = "two_process_child";
/// Set (to the region path) only in the child: makes [`two_process_child`] the writer.
const ENV_REGION: &str = "IVHA_TWO_PROC_REGION";
/// Comma-separated batch sizes; between two batches the child waits for "go" on stdin.
const ENV_BATCHES: &str = "IVHA_TWO_PROC_BATCHES";
const ENV_DATA_SEED: &str = "IVHA_TWO_PROC_DATA_SEED";

/// The child beats once every this many records, and once at the end of each batch.
const BEAT_EVERY: u64 = 8;
/// How long the parent waits for something it expects to see in shared memory.
const TIMEOUT: Duration = Duration::from_secs(30);
const REGION_SIZE: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Deterministic contents.

/// Record `seq` as the child appends it: a write of 0..2 KiB, or now and then a trim or
/// write-zeroes. A pure function of the seed and the seq.
fn spec(data_seed: u64, seq: u64) -> OwnedEntry {
    let mut rng = Rng::new(mix(data_seed ^ mix(seq)));
    let kind = rng.below(10);
    let export = rng.below(4) as u32;
    let offset = rng.below(1 << 30) * 512;
    match kind {
        0 => OwnedEntry::trim(export, offset, (rng.below(64) + 1) * 4096),
        1 => OwnedEntry::write_zeroes(export, offset, (rng.below(64) + 1) * 4096),
        _ => {
            let len = rng.below(2048) as usize;
            OwnedEntry::write(export, offset, rng.bytes(len))
        }
    }
}

fn check_record(data_seed: u64, seq: u64, record: &Record) -> Result<(), String> {
    common::check_record(record, seq, &spec(data_seed, seq).entry())
}

/// Heartbeats the child publishes for batches of these sizes.
fn beats_for(batches: &[u64]) -> u64 {
    batches.iter().map(|n| n / BEAT_EVERY + 1).sum()
}

// ---------------------------------------------------------------------------------------
// The writer (child process).

/// The writer. When the test harness runs it normally (no `IVHA_TWO_PROC_REGION`), it does
/// nothing; the tests below run it in a child process.
#[test]
fn two_process_child() {
    let Some(path) = std::env::var_os(ENV_REGION) else {
        return;
    };
    let batches: Vec<u64> = std::env::var(ENV_BATCHES)
        .unwrap()
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let data_seed: u64 = std::env::var(ENV_DATA_SEED).unwrap().parse().unwrap();

    let mapping = Mapping::open(Path::new(&path), Access::ReadWrite).unwrap();
    let region = NodeRegion::open(mapping).unwrap();
    let mut writer = region.writer(std::process::id().into()).unwrap();
    let mut stdin = std::io::stdin().lock();
    for (i, &n) in batches.iter().enumerate() {
        if i > 0 {
            let mut line = String::new();
            stdin.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "go", "unexpected line from the parent");
        }
        for k in 1..=n {
            let seq = writer.appender.head().seq + 1;
            let spec = spec(data_seed, seq);
            let appended = writer
                .appender
                .append(&spec.entry(), BackPressure::default())
                .unwrap();
            assert_eq!(appended.seq, seq);
            if k % BEAT_EVERY == 0 {
                writer.heartbeat.beat();
            }
        }
        writer.heartbeat.beat();
    }
}

// ---------------------------------------------------------------------------------------
// The parent.

/// A running writer. Dropping it kills and reaps the child.
#[derive(Debug)]
struct Writer {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
}

impl Writer {
    fn spawn(region_path: &Path, batches: &[u64], data_seed: u64) -> Self {
        let batches: Vec<String> = batches.iter().map(u64::to_string).collect();
        let mut command = rerun_test(CHILD_TEST).unwrap();
        command
            .env(ENV_REGION, region_path)
            .env(ENV_BATCHES, batches.join(","))
            .env(ENV_DATA_SEED, data_seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn(&mut command).unwrap();
        let stdin = guard.child.stdin.take();
        Self { guard, stdin }
    }

    /// Whether the child is still running.
    fn running(&mut self) -> bool {
        self.guard.running()
    }

    fn go(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Kills the child (if it still runs) and returns how it ended and its stderr.
    fn finish(&mut self) -> (String, String) {
        let status = self
            .guard
            .kill_and_wait()
            .map_or_else(|e| format!("unknown ({e})"), |s| s.to_string());
        (status, self.guard.stderr())
    }

    /// Fails the test with `message`, the child's status and its stderr.
    fn fail(&mut self, message: &str) -> ! {
        let (status, stderr) = self.finish();
        panic!("{message}\nwriter ended with {status}; its stderr:\n{stderr}");
    }

    /// Waits for the child to exit on its own and checks it succeeded.
    fn expect_success(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.guard.child.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(_)) => self.fail("the writer failed"),
                Ok(None) if Instant::now() > deadline => {
                    self.fail(&format!("the writer did not exit within {TIMEOUT:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => self.fail(&format!("cannot wait for the writer: {e}")),
            }
        }
    }
}

/// The parent's read-side view: follows a region's log and heartbeat.
#[derive(Debug)]
struct Follower {
    region: NodeRegion,
    data_seed: u64,
    /// Just past the last record seen and checked.
    seen: Cursor,
    beat: Heartbeat,
}

impl Follower {
    fn new(region: NodeRegion, data_seed: u64) -> Self {
        let seen = region.head().unwrap();
        let beat = region.heartbeat().unwrap();
        Self {
            region,
            data_seed,
            seen,
            beat,
        }
    }

    /// Reads what is new since the last poll. Errors are test failures.
    fn poll(&mut self) -> Result<(), String> {
        let head = self.region.head().ok_or("head unreadable")?;
        if head.seq < self.seen.seq || head.pos < self.seen.pos {
            return Err(format!(
                "head went backwards from {:?} to {head:?}",
                self.seen
            ));
        }
        let mapping = self.region.mapping();
        for item in LogScanner::new(mapping, self.region.geometry(), self.seen, head) {
            let record = item.map_err(|e| format!("scan from {:?}: {e}", self.seen))?;
            check_record(self.data_seed, self.seen.seq + 1, &record)?;
            self.seen = record.end();
        }
        if self.seen != head {
            return Err(format!(
                "scan stopped at {:?} before head {head:?}",
                self.seen
            ));
        }
        let beat = self.region.heartbeat().ok_or("heartbeat unreadable")?;
        if beat.counter < self.beat.counter || beat.unix_ns < self.beat.unix_ns {
            return Err(format!(
                "heartbeat went backwards from {:?} to {beat:?}",
                self.beat
            ));
        }
        self.beat = beat;
        Ok(())
    }

    /// Polls until `seq` records and `beats` heartbeats are visible; never more. Fails on
    /// timeout, on a bad record or when the writer dies first.
    fn wait_for(&mut self, writer: &mut Writer, seq: u64, beats: u64) {
        let started = Instant::now();
        loop {
            if let Err(e) = self.poll() {
                writer.fail(&format!("reader: {e}"));
            }
            if self.seen.seq > seq || self.beat.counter > beats {
                writer.fail(&format!(
                    "reader saw more than expected: records up to {:?} (expected {seq}), \
                     heartbeat {} (expected {beats})",
                    self.seen, self.beat.counter
                ));
            }
            if self.seen.seq == seq && self.beat.counter == beats {
                return;
            }
            if started.elapsed() > TIMEOUT {
                writer.fail(&format!(
                    "timed out after {TIMEOUT:?} waiting for records up to {seq} and heartbeat \
                     {beats}: the reader's mapping shows records up to {:?} and heartbeat {}",
                    self.seen, self.beat.counter
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// A fresh file-backed node region; returns its read-only view for the parent.
fn file_region() -> (RegionFile, NodeRegion) {
    let (file, formatted) = RegionFile::format(REGION_SIZE, 1, "b");
    drop(formatted);
    let reader = file.open(Access::ReadOnly);
    (file, reader)
}

#[test]
fn the_parent_sees_every_record_and_beat_a_child_process_publishes() {
    let (file, reader) = file_region();
    assert_eq!(reader.mapping().access(), Access::ReadOnly);
    let data_seed = 0x5eed_0001;
    let batches = [300];
    let mut follower = Follower::new(reader, data_seed);
    assert_eq!(follower.seen, Cursor::default());
    assert_eq!(follower.beat.counter, 0);

    let mut writer = Writer::spawn(&file.path, &batches, data_seed);
    follower.wait_for(&mut writer, 300, beats_for(&batches));
    writer.expect_success();
    assert!(follower.beat.unix_ns > 0);
    assert_ne!(follower.region.boot_id(), 0);
    println!(
        "two_process: the parent saw records 1..={} ({} log bytes) and {} beats",
        follower.seen.seq, follower.seen.pos, follower.beat.counter
    );
}

#[test]
fn records_appear_in_the_parent_while_the_child_is_still_writing() {
    let (file, reader) = file_region();
    let data_seed = 0x5eed_0002;
    let batches = [40, 60, 25];
    let mut follower = Follower::new(reader, data_seed);
    let mut writer = Writer::spawn(&file.path, &batches, data_seed);

    let mut total = 0;
    for (i, &n) in batches.iter().enumerate() {
        if i > 0 {
            writer.go();
        }
        total += n;
        follower.wait_for(&mut writer, total, beats_for(&batches[..=i]));
        if i + 1 < batches.len() {
            // The writer is blocked waiting for "go": what we saw was published live, by a
            // process that is still running and has not written the next batch.
            assert!(
                writer.running(),
                "the writer exited before its batch {}",
                i + 2
            );
        }
    }
    writer.expect_success();
    // Nothing more shows up after the writer is done.
    follower.poll().unwrap();
    assert_eq!(follower.seen.seq, 125);
    assert_eq!(follower.beat.counter, beats_for(&batches));
}

#[test]
fn a_memfd_region_is_shared_with_a_child_through_proc_fd() {
    let formatted = NodeRegion::format(
        Mapping::create_memfd("ivha-two-proc", REGION_SIZE).unwrap(),
        2,
        "c",
    )
    .unwrap();
    let fd = formatted.mapping().file().as_raw_fd();
    // The memfd is close-on-exec, so the child opens it through our fd table instead: a
    // new open file description of the same memfd.
    let child_path = format!("/proc/{}/fd/{fd}", std::process::id());
    let reader = NodeRegion::open(
        Mapping::open(Path::new(&format!("/proc/self/fd/{fd}")), Access::ReadOnly).unwrap(),
    )
    .unwrap();
    assert_eq!(reader.header(), formatted.header());
    let data_seed = 0x5eed_0003;
    let batches = [100, 20];
    let mut follower = Follower::new(reader, data_seed);
    let mut writer = Writer::spawn(Path::new(&child_path), &batches, data_seed);
    follower.wait_for(&mut writer, 100, beats_for(&batches[..1]));
    writer.go();
    follower.wait_for(&mut writer, 120, beats_for(&batches));
    writer.expect_success();
    // The parent's own read-write mapping of the memfd sees the same.
    assert_eq!(formatted.head(), Some(follower.seen));
    assert_eq!(formatted.heartbeat(), Some(follower.beat));
    // `formatted` holds the memfd open until here, so the child could always reach it.
    drop(formatted);
}
