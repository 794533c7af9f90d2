#![allow(clippy::unwrap_used)]
//! Per-operation latency of an ivha log append, next to the two things it replaces:
//! a TCP loopback round trip (the floor of mirroring a write over the network) and an
//! `fdatasync`'d file write (the floor of making it durable on a local disk).
//!
//! Run with `cargo bench -p shm --bench latency_table` (or `scripts/bench-log.sh`).
//!
//! Environment:
//! - `IVHA_BENCH_SAMPLES`: timed samples per size for the append and TCP columns
//!   (default 20000).
//! - `IVHA_BENCH_SYNC_SAMPLES`: timed samples per size for the fdatasync column
//!   (default 400).
//! - `IVHA_BENCH_QUICK=1` or the argument `--quick`: tiny sample counts, a smoke run for CI.
//! - `IVHA_BENCH_SYNC_DIR`: where the fdatasync file goes (default: the cargo target
//!   directory, which must be on a real disk, not tmpfs).
//!
//! Unknown arguments (cargo passes `--bench`) are ignored. Nothing here fails on a slow
//! result: the 1 µs target is printed as information.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shm::log::FlushedWriter;
use shm::log::record::footprint;
use shm::{Entry, LogAppender, Mapping, NodeRegion};

/// Record data sizes measured.
const SIZES: [usize; 3] = [64, 4096, 65536];
/// Size of the shared region the log lives in.
const REGION_SIZE: u64 = 64 << 20;
/// Bytes a write record carries besides its data (record header + write prefix).
const RECORD_OVERHEAD: usize = 32 + 16;
/// The target: a 4 KiB append's median latency, in nanoseconds.
const TARGET_4K_P50_NS: u64 = 1000;

struct Config {
    quick: bool,
    samples: usize,
    sync_samples: usize,
    warmup: usize,
    sync_warmup: usize,
}

impl Config {
    fn from_env() -> Self {
        let quick = std::env::args().skip(1).any(|a| a == "--quick")
            || std::env::var("IVHA_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let (samples, sync_samples) = if quick { (300, 10) } else { (20_000, 400) };
        let samples = env_count("IVHA_BENCH_SAMPLES", samples);
        let sync_samples = env_count("IVHA_BENCH_SYNC_SAMPLES", sync_samples);
        Self {
            quick,
            samples,
            sync_samples,
            warmup: (samples / 5).clamp(50, 5000),
            sync_warmup: (sync_samples / 10).clamp(3, 50),
        }
    }
}

fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("{name}={v:?} is not a positive sample count");
                std::process::exit(2);
            }
        },
    }
}

/// Latency samples of one operation, in nanoseconds.
struct Stats {
    sorted: Vec<u64>,
}

impl Stats {
    fn new(mut samples: Vec<u64>) -> Self {
        assert!(!samples.is_empty());
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> u64 {
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    fn p50(&self) -> u64 {
        self.pct(50.0)
    }

    fn p99(&self) -> u64 {
        self.pct(99.0)
    }

    fn mean(&self) -> f64 {
        self.sorted.iter().map(|&x| x as f64).sum::<f64>() / self.sorted.len() as f64
    }

    fn max(&self) -> u64 {
        *self.sorted.last().unwrap()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A duration in µs, with precision that fits its magnitude.
fn us(ns: f64) -> String {
    let us = ns / 1000.0;
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 1000.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn data_of(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 131 + 7) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// a. ivha log append

/// A formatted node region on a tmpfs file, with its appender and flusher.
struct Log {
    // Dropped last: the region file lives in it.
    _dir: tempfile::TempDir,
    _region: NodeRegion,
    appender: LogAppender,
    flushed: FlushedWriter,
    backing: PathBuf,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ivha-bench-")
            .tempdir_in(shm_dir())
            .unwrap();
        let path = dir.path().join("node");
        let mapping = Mapping::create_file(&path, REGION_SIZE).unwrap();
        let region = NodeRegion::format(mapping, 1, "bench").unwrap();
        let writer = region.writer(0xb0075).unwrap();
        Self {
            _dir: dir,
            _region: region,
            appender: writer.appender,
            flushed: writer.flushed,
            backing: path,
        }
    }

    /// Appends one record and frees its ring space again, returning how long the append
    /// alone took.
    fn timed_append(&mut self, entry: &Entry<'_>) -> u64 {
        let start = Instant::now();
        let appended = self.appender.try_append(entry);
        let elapsed = start.elapsed();
        let appended = appended.unwrap();
        // The flusher, outside the timed section: the ring never fills.
        self.flushed.advance(appended.head).unwrap();
        nanos(elapsed)
    }

    /// Writes every ring page once, so the measured appends do not pay for tmpfs page
    /// allocation and first-touch faults (a running node's ring is warm after one lap).
    fn prefault(&mut self) {
        let data = data_of(65536);
        let ring = self.appender.geometry().ring_size;
        let mut written = 0;
        let mut offset = 0;
        while written < ring + footprint(65536 + 16) {
            let entry = Entry::Write {
                export: 0,
                offset,
                data: &data,
            };
            self.timed_append(&entry);
            written += footprint(entry.payload_len());
            offset += data.len() as u64;
        }
    }

    fn measure(&mut self, size: usize, warmup: usize, samples: usize) -> Stats {
        let data = data_of(size);
        let mut out = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            let entry = Entry::Write {
                export: 1,
                offset: (i * size) as u64,
                data: &data,
            };
            let ns = self.timed_append(&entry);
            if i >= warmup {
                out.push(ns);
            }
        }
        Stats::new(out)
    }
}

fn shm_dir() -> PathBuf {
    let dev_shm = Path::new("/dev/shm");
    if dev_shm.is_dir() {
        dev_shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

// ---------------------------------------------------------------------------------------
// b. TCP loopback round trip

/// Message on the wire: `len u64` (bytes after this word), `seq u64`, `export u32`, `pad u32`,
/// `offset u64`, data. The server answers each message with its `seq`.
const TCP_HEADER: usize = 32;

fn tcp_server(listener: TcpListener) {
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 8];
        if stream.read_exact(&mut len).is_err() {
            return; // The client hung up.
        }
        let len = u64::from_le_bytes(len) as usize;
        buf.resize(len, 0);
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf[..8]).unwrap();
    }
}

struct Tcp {
    stream: TcpStream,
    server: Option<std::thread::JoinHandle<()>>,
    seq: u64,
}

impl Tcp {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || tcp_server(listener));
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            server: Some(server),
            seq: 0,
        }
    }

    fn measure(&mut self, size: usize, warmup: usize, samples: usize) -> Stats {
        let mut msg = vec![0u8; TCP_HEADER];
        msg[0..8].copy_from_slice(&((TCP_HEADER - 8 + size) as u64).to_le_bytes());
        msg.extend_from_slice(&data_of(size));
        let mut out = Vec::with_capacity(samples);
        for i in 0..warmup + samples {
            self.seq += 1;
            msg[8..16].copy_from_slice(&self.seq.to_le_bytes());
            msg[24..32].copy_from_slice(&((i * size) as u64).to_le_bytes());
            let mut ack = [0u8; 8];
            let start = Instant::now();
            self.stream.write_all(&msg).unwrap();
            self.stream.read_exact(&mut ack).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(u64::from_le_bytes(ack), self.seq, "ack of another message");
            if i >= warmup {
                out.push(nanos(elapsed));
            }
        }
        Stats::new(out)
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// c. fdatasync'd file write

/// Where the fdatasync files go: `IVHA_BENCH_SYNC_DIR`, else the cargo target directory
/// (cargo names `<target>/tmp` to benchmarks at build time).
fn sync_base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IVHA_BENCH_SYNC_DIR") {
        return PathBuf::from(dir);
    }
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    target_tmp.parent().unwrap_or(target_tmp).to_owned()
}

/// Filesystem type of the mount holding `path`, from `/proc/self/mounts`.
fn fs_type(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "?".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "?".into();
    };
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(dev), Some(mount_point), Some(kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mount_point = mount_point.replace("\\040", " ");
        let depth = Path::new(&mount_point).components().count();
        // Later lines win on ties: they are mounted over earlier ones.
        if path.starts_with(&mount_point) && best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
            best = Some((depth, kind.to_owned(), dev.to_owned()));
        }
    }
    best.map_or_else(
        || "?".into(),
        |(_, kind, dev)| {
            if dev == kind || !dev.starts_with('/') {
                kind
            } else {
                format!("{kind} ({dev})")
            }
        },
    )
}

struct SyncFile {
    _dir: tempfile::TempDir,
    dir_fs: String,
}

impl SyncFile {
    fn new() -> Self {
        let base = sync_base_dir();
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("ivha-bench-sync-")
            .tempdir_in(&base)
            .unwrap();
        let dir_fs = fs_type(dir.path());
        Self { _dir: dir, dir_fs }
    }

    fn measure(&self, size: usize, warmup: usize, samples: usize) -> Stats {
        let record_len = RECORD_OVERHEAD + size;
        let total = warmup + samples;
        let file_len = (total * record_len).next_multiple_of(1 << 20);
        let path = self._dir.path().join(format!("log-{size}"));
        let file = preallocated(&path, file_len);
        let mut record = vec![0u8; RECORD_OVERHEAD];
        record.extend_from_slice(&data_of(size));
        let mut out = Vec::with_capacity(samples);
        for i in 0..total {
            record[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let offset = (i * record_len) as u64;
            let start = Instant::now();
            file.write_all_at(&record, offset).unwrap();
            file.sync_data().unwrap();
            let elapsed = start.elapsed();
            if i >= warmup {
                out.push(nanos(elapsed));
            }
        }
        drop(file);
        std::fs::remove_file(&path).unwrap();
        Stats::new(out)
    }
}

/// A file of `len` bytes whose blocks are all written and synced, so that a later
/// `fdatasync` flushes data only (no block allocation, no size change to journal).
fn preallocated(path: &Path, len: usize) -> File {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    file.sync_all().unwrap();
    file
}

// ---------------------------------------------------------------------------------------
// Context and report

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

/// What one `Instant::now()` + `elapsed()` pair costs: included in every sample above.
fn timer_overhead() -> Stats {
    let mut out = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let start = Instant::now();
        black_box(());
        out.push(nanos(start.elapsed()));
    }
    Stats::new(out)
}

struct Row {
    size: usize,
    append: Stats,
    tcp: Stats,
    sync: Stats,
}

fn pair(s: &Stats) -> String {
    format!("{}/{}", us(s.p50() as f64), us(s.p99() as f64))
}

fn ratio(a: &Stats, b: &Stats) -> String {
    let r = a.p50() as f64 / b.p50().max(1) as f64;
    if r < 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.0}x")
    }
}

fn main() {
    let config = Config::from_env();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let sync = SyncFile::new();

    println!(
        "ivha log latency table{}",
        if config.quick {
            " (quick mode: smoke run, numbers are noisy)"
        } else {
            ""
        }
    );
    println!("  cpu:          {} ({cores} cores)", cpu_model());
    println!(
        "  kernel:       {}",
        read_trimmed("/proc/sys/kernel/osrelease")
    );
    println!(
        "  clocksource:  {}",
        read_trimmed("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    );
    let mut log = Log::new();
    println!(
        "  ivha region:  {} MiB, file on {} ({})",
        REGION_SIZE >> 20,
        fs_type(&log.backing),
        log.backing.parent().unwrap().display()
    );
    println!(
        "  fdatasync:    {} ({})",
        sync.dir_fs,
        sync._dir.path().display()
    );
    if sync.dir_fs.starts_with("tmpfs") || sync.dir_fs.starts_with("ramfs") {
        println!("  WARNING: the fdatasync directory is not on a disk; set IVHA_BENCH_SYNC_DIR");
    }
    println!(
        "  samples:      {} per size (append, tcp), {} per size (fdatasync), after {}/{} warm-up",
        config.samples, config.sync_samples, config.warmup, config.sync_warmup
    );
    let timer = timer_overhead();
    println!(
        "  timer:        Instant::now()+elapsed() p50 {} ns (included in every sample)",
        timer.p50()
    );
    println!();

    log.prefault();
    let mut tcp = Tcp::new();
    let mut rows = Vec::new();
    for size in SIZES {
        let append = log.measure(size, config.warmup, config.samples);
        let tcp_stats = tcp.measure(size, config.warmup, config.samples);
        let sync_stats = sync.measure(size, config.sync_warmup, config.sync_samples);
        rows.push(Row {
            size,
            append,
            tcp: tcp_stats,
            sync: sync_stats,
        });
    }
    drop(tcp);

    println!("latency in µs, p50/p99 (ratios are of p50)");
    println!(
        "{:>7}  {:>19}  {:>20}  {:>17}  {:>8}  {:>10}",
        "size",
        "ivha append p50/p99",
        "tcp loopback p50/p99",
        "fdatasync p50/p99",
        "tcp/ivha",
        "fsync/ivha"
    );
    for r in &rows {
        println!(
            "{:>7}  {:>19}  {:>20}  {:>17}  {:>8}  {:>10}",
            size_label(r.size),
            pair(&r.append),
            pair(&r.tcp),
            pair(&r.sync),
            ratio(&r.tcp, &r.append),
            ratio(&r.sync, &r.append),
        );
    }
    println!();
    println!("details in µs");
    println!(
        "{:>7}  {:<13}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
        "size", "operation", "mean", "p50", "p99", "p99.9", "max", "samples"
    );
    for r in &rows {
        for (name, s) in [
            ("ivha append", &r.append),
            ("tcp loopback", &r.tcp),
            ("fdatasync", &r.sync),
        ] {
            println!(
                "{:>7}  {:<13}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
                size_label(r.size),
                name,
                us(s.mean()),
                us(s.p50() as f64),
                us(s.p99() as f64),
                us(s.pct(99.9) as f64),
                us(s.max() as f64),
                s.sorted.len(),
            );
        }
    }
    println!();
    for r in &rows {
        let mb_s = r.size as f64 / r.append.p50() as f64 * 1000.0;
        println!(
            "ivha append {:>7}: {:.0} MB/s of record data at the p50 latency",
            size_label(r.size),
            mb_s
        );
    }
    if let Some(r) = rows.iter().find(|r| r.size == 4096) {
        let p50 = r.append.p50();
        println!();
        println!(
            "target: 4 KiB append p50 < 1 µs: {} (p50 {} µs)",
            if p50 < TARGET_4K_P50_NS {
                "PASS"
            } else {
                "MISS"
            },
            us(p50 as f64)
        );
    }
}
