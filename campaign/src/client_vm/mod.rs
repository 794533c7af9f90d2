//! `ivha-campaign client-vm`: a client VM with an ext4 filesystem on an ivha export rides
//! through kills, hangs, planned takeovers and givebacks of the node serving it.
//!
//! The run: start a pair; put a fresh ext4 on export a (`mke2fs` on the host, copied in
//! with `qemu-img`); boot the client VM (`machine`) with export a as its virtio disk through
//! QEMU's NBD driver; let its workload (`client-load`) write and fsync files; then rounds of
//! kill, hang and takeover of node a, each followed by a giveback (`events`); stop the
//! workload, which unmounts and powers off; copy the export back and check it (`verify`);
//! attribute the client's operations to events (`stalls`); scan the client's kernel log for
//! errors (`console`). Files (in the out directory): `report.json`, `client-console.log`,
//! `client-control.log` (every control line with its arrival), `client-qemu.log`,
//! `export.img`, `logs/` (hostd's log, events and the pair's consoles).

mod console;
mod events;
mod machine;
mod report;
mod stalls;
mod tools;
mod verify;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use client_load::record::{FileRecord, Line};
use wire::error_chain::one_line as error_chain;

use crate::hostd::{Hostd, HostdError};
use crate::progress::Progress;
use crate::report::Percentiles;
pub use events::EventKind;
use events::Injected;
use machine::{ClientVm, ControlLine, MachineConfig, MachineError};
use qemu::child::Exit;
pub use report::{ClientVmReport, EventRecord, KindSummary};
use stalls::Arrived;
pub use tools::missing as missing_tools;

/// The node whose identity the client uses; its partner is b.
const NODE: &str = "a";
/// How long the client may go without finishing an operation after an event has settled.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `ivha-campaign client-vm`.
#[derive(Debug, Args)]
pub struct ClientVmArgs {
    /// Rounds of events: each is a kill, a hang and a planned takeover of the node serving
    /// the client's export, each followed by a giveback (N of each, 3N givebacks).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub events: u64,
    /// Directory for the report and the logs (default:
    /// $CARGO_TARGET_DIR/client-vm/seed-SEED, where CARGO_TARGET_DIR defaults to target).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Where the pair's nodes run: QEMU guests, or agents as host processes (the client is
    /// a VM either way).
    #[arg(long, default_value = "qemu", value_parser = ["qemu", "process"])]
    pub backend: String,
    /// The hostd binary (default: beside this one, else `hostd` in PATH).
    #[arg(long, env = "IVHA_HOSTD", value_name = "PATH")]
    pub hostd: Option<PathBuf>,
    /// Fixes the workload's file lengths and contents (default: drawn from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The client's QEMU NBD driver: seconds a request waits for a lost server.
    #[arg(long, default_value_t = 30)]
    pub reconnect_delay: u32,
    /// The client's QEMU NBD driver: seconds the first connection is retried.
    #[arg(long, default_value_t = 30)]
    pub open_timeout: u32,
    /// Milliseconds the client works before the first event and after each.
    #[arg(long, default_value_t = 2000)]
    pub dwell_ms: u64,
    /// The export's size in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=65_536))]
    pub disk_mib: u64,
    /// The workload's largest file in KiB.
    #[arg(long, default_value_t = 128)]
    pub max_kib: u64,
    /// The workload's file names (each rewritten in turn).
    #[arg(long, default_value_t = 64)]
    pub slots: u64,
    /// The kernel (default: vmlinuz of the guest image).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The client's initramfs (default: client-initramfs.cpio.gz of the guest image).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ClientVmConfig {
    pub seed: u64,
    pub rounds: u64,
    pub backend: String,
    pub out_dir: PathBuf,
    pub hostd: PathBuf,
    /// Host ports of identities a and b.
    pub ports: [u16; 2],
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub reconnect_delay_s: u32,
    pub open_timeout_s: u32,
    pub dwell: Duration,
    pub disk_mib: u64,
    pub max_kib: u64,
    pub slots: u64,
}

/// Errors that stop a run before it could be judged.
#[derive(Debug, thiserror::Error)]
pub enum ClientVmError {
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find a free port")]
    Port(#[source] std::io::Error),
    #[error("cannot start the pair")]
    Up(#[source] HostdError),
    #[error("the pair never became healthy")]
    Pair(#[source] HostdError),
    #[error("cannot put a fresh ext4 filesystem on export {NODE}")]
    Format(#[source] tools::ToolError),
    #[error("the client VM failed")]
    Machine(#[from] MachineError),
    #[error("the client's workload did not start: {0}")]
    Workload(String),
    #[error("cannot copy export {NODE} back for the checks")]
    Copy(#[source] tools::ToolError),
    #[error("cannot check the filesystem")]
    Verify(#[from] verify::VerifyError),
    #[error("the run stopped before its last event: {0}")]
    Aborted(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientVmError + '_ {
    move |source| ClientVmError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs `ivha-campaign client-vm`: prints the report; Ok(true) when the run passed,
/// Ok(false) when it found violations.
pub fn main(args: &ClientVmArgs, hostd: PathBuf) -> Result<bool, ClientVmError> {
    let seed = args
        .seed
        .unwrap_or_else(|| wire::time::now_unix_us() % 1_000_000);
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(target).join(format!("client-vm/seed-{seed}")));
    let image = qemu::image::default_image_dir();
    let config = ClientVmConfig {
        seed,
        rounds: args.events,
        backend: args.backend.clone(),
        out_dir,
        hostd,
        ports: [free_port()?, free_port()?],
        kernel: args.kernel.clone().unwrap_or_else(|| image.join("vmlinuz")),
        initrd: args
            .initrd
            .clone()
            .unwrap_or_else(|| image.join("client-initramfs.cpio.gz")),
        reconnect_delay_s: args.reconnect_delay,
        open_timeout_s: args.open_timeout,
        dwell: Duration::from_millis(args.dwell_ms),
        disk_mib: args.disk_mib,
        max_kib: args.max_kib,
        slots: args.slots,
    };
    println!(
        "client VM run, seed {seed}: {} rounds of kill, hang, takeover (each followed by a giveback) \
         of node {NODE}, pair backend {}; files in {}",
        config.rounds,
        config.backend,
        config.out_dir.display()
    );
    let report = run(&config)?;
    print!("{report}");
    println!("report: {}", config.out_dir.join("report.json").display());
    match &report.aborted {
        Some(why) if report.violations.is_empty() => Err(ClientVmError::Aborted(why.clone())),
        _ => Ok(report.passed()),
    }
}

/// Runs the client VM against a pair of its own and judges the result.
pub fn run(config: &ClientVmConfig) -> Result<ClientVmReport, ClientVmError> {
    let out = &config.out_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let hostd = Hostd {
        binary: config.hostd.clone(),
        state_dir: PathBuf::from(format!(
            "/dev/shm/ivha-client-vm-{}-{}",
            std::process::id(),
            config.seed
        )),
    };
    let pair_config = out.join("ivha.toml");
    std::fs::write(&pair_config, pair_config_text(config)).map_err(io_err(&pair_config))?;
    let ran = match hostd.up(Some(&pair_config)) {
        Ok(_) => with_pair(config, &hostd),
        Err(error) => Err(ClientVmError::Up(error)),
    };
    crate::run::collect_logs(&hostd, out);
    crate::run::stop_pair(&hostd);
    let ran = ran?;
    judge(config, &ran)
}

/// Most lines [`server_notes`] keeps.
const MAX_SERVER_NOTES: usize = 40;

/// The lines of the nodes' consoles (agents' warnings and errors, NBD connections that
/// ended with failed requests) and of the client's QEMU output, by file.
fn server_notes(out: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(out.join("logs"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.push(out.join("client-qemu.log"));
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let client_qemu = name == "client-qemu.log";
        for line in text.lines() {
            let failed_requests =
                line.contains("disconnected from export") && !line.contains(", 0 errors,");
            let noted = client_qemu
                || failed_requests
                || (line.contains("guest_agent")
                    && (line.contains(" WARN ") || line.contains(" ERROR ")));
            if noted && notes.len() < MAX_SERVER_NOTES {
                notes.push(format!("{name}: {}", line.trim()));
            }
        }
    }
    notes
}

/// What happened while the pair ran.
#[derive(Debug)]
struct Ran {
    accel: String,
    lines: Vec<ControlLine>,
    events: Vec<Injected>,
    /// The console's length when each event began, then at the stop.
    console_marks: Vec<u64>,
    /// When the stop was sent.
    stopped_at: Instant,
    /// How the client's QEMU ended, when it did.
    exit: Option<Exit>,
    aborted: Option<String>,
}

fn with_pair(config: &ClientVmConfig, hostd: &Hostd) -> Result<Ran, ClientVmError> {
    let status = hostd
        .wait_for("a healthy pair", Duration::from_secs(180), Hostd::healthy)
        .map_err(ClientVmError::Pair)?;
    let accel = if status.accel == "kvm" { "kvm" } else { "tcg" }.to_owned();
    let uri = export_uri(config);
    tools::format_export(
        config.disk_mib,
        &uri,
        &config.out_dir.join("fs-initial.img"),
    )
    .map_err(ClientVmError::Format)?;

    let machine = machine_config(config, &accel);
    let mut vm = ClientVm::launch(&machine)?;
    let started = vm.wait_until(
        "the client's workload to start",
        Duration::from_secs(180),
        |lines| lines.iter().any(|l| ends_start(&l.parsed)),
    );
    let stopped_early = workload_failure(&vm.lines());
    if let Err(error) = started.map_err(ClientVmError::from) {
        return Err(stopped_early.map_or(error, ClientVmError::Workload));
    }
    if let Some(why) = stopped_early {
        return Err(ClientVmError::Workload(why));
    }
    println!(
        "client VM up ({accel}): the workload writes to {uri}; {} ms before the first event",
        config.dwell.as_millis()
    );
    std::thread::sleep(config.dwell);

    let plan = events::schedule(config.rounds);
    let mut injected: Vec<Injected> = Vec::new();
    let mut console_marks = Vec::new();
    let mut aborted = None;
    let events_began = Instant::now();
    let mut progress = Progress::new("client-vm", "events", plan.len() as u64);
    for (index, &kind) in plan.iter().enumerate() {
        console_marks.push(file_len(&machine.console));
        let event = match events::inject(hostd, kind, NODE) {
            Ok(event) => event,
            Err(error) => {
                aborted = Some(format!(
                    "event {} ({kind}): {}",
                    index + 1,
                    error_chain(&error)
                ));
                break;
            }
        };
        let settled = event.settled;
        injected.push(event);
        std::thread::sleep(config.dwell);
        if let Err(why) = await_progress(&mut vm, settled) {
            aborted = Some(format!("event {} ({kind}): {why}", index + 1));
            break;
        }
        let lines = vm.lines();
        progress.suspend(|| print_event(&lines, &injected, plan.len()));
        progress.step();
    }
    drop(progress);

    let stopped_at = Instant::now();
    let exit = match vm.stop(Duration::from_secs(180)) {
        Ok(exit) => Some(exit),
        Err(error) => {
            aborted.get_or_insert(format!(
                "cannot stop the client VM: {}",
                error_chain(&error)
            ));
            None
        }
    };
    console_marks.push(file_len(&machine.console));
    let lines = vm.lines();
    // A VM that did not stop is killed here, before its disk is read.
    drop(vm);
    write_control_log(&config.out_dir, &lines, events_began);
    tools::copy_export(&uri, &config.out_dir.join("export.img")).map_err(ClientVmError::Copy)?;
    Ok(Ran {
        accel,
        lines,
        events: injected,
        console_marks,
        stopped_at,
        exit,
        aborted,
    })
}

/// Waits until the client finishes an operation that began after `settled`; why not, if
/// it does not.
fn await_progress(vm: &mut ClientVm, settled: Instant) -> Result<(), String> {
    let progressed = vm.wait_until(
        "the client to finish an operation after the event",
        PROGRESS_TIMEOUT,
        |lines| {
            workload_failure(lines).is_some()
                || lines
                    .iter()
                    .any(|l| l.at > settled && matches!(&l.parsed, Ok(Line::Fsynced(_))))
        },
    );
    let lines = vm.lines();
    if let Some(why) = workload_failure(&lines) {
        return Err(why);
    }
    progressed.map_err(|error| error_chain(&error))
}

/// Whether this line ends the wait for the workload's start (it started, or it never
/// will).
fn ends_start(line: &Result<Line, client_load::record::LineError>) -> bool {
    matches!(
        line,
        Ok(Line::Started { .. } | Line::Error { .. } | Line::Exit { .. })
    )
}

/// Why the workload stopped by itself, if it did.
fn workload_failure(lines: &[ControlLine]) -> Option<String> {
    lines.iter().find_map(|l| match &l.parsed {
        Ok(Line::Error { message }) => Some(format!("the client reported an error: {message}")),
        Ok(Line::Exit { status }) => Some(format!("the workload exited with status {status}")),
        _ => None,
    })
}

/// One line per event: what it did to the client so far.
fn print_event(lines: &[ControlLine], done: &[Injected], total: usize) {
    let Some(event) = done.last() else {
        return;
    };
    let longest = lines
        .iter()
        .filter(|l| l.at > event.at)
        .filter_map(|l| match &l.parsed {
            Ok(Line::Fsynced(op)) => Some(op.duration_ms()),
            _ => None,
        })
        .fold(0.0, f64::max);
    println!(
        "[{}/{total}] {}: served again after {:.0} ms (hostd: {} ms without a server); \
         longest client operation since: {longest:.0} ms",
        done.len(),
        event.kind,
        event.settled.duration_since(event.at).as_secs_f64() * 1000.0,
        event
            .unserved_ms()
            .map_or_else(|| "?".to_owned(), |ms| format!("{ms:.0}")),
    );
    let _ = std::io::stdout().flush();
}

/// Checks what the run left and builds the report.
fn judge(config: &ClientVmConfig, ran: &Ran) -> Result<ClientVmReport, ClientVmError> {
    let mut violations = Vec::new();
    let mut reported: Vec<FileRecord> = Vec::new();
    let mut arrived = Vec::new();
    let (mut stopped, mut unmounted, mut first_ms, mut last_ms) = (false, false, None, 0.0);
    for line in &ran.lines {
        match &line.parsed {
            Ok(Line::Fsynced(op)) => {
                first_ms.get_or_insert(op.start_ms);
                last_ms = op.end_ms;
                reported.push(op.record.clone());
                arrived.push(Arrived {
                    at: line.at,
                    op: op.clone(),
                });
            }
            Ok(Line::Stopped { .. }) => stopped = true,
            Ok(Line::Unmounted) => unmounted = true,
            Ok(Line::Error { message }) => {
                violations.push(format!("the client reported an error: {message}"));
            }
            Ok(Line::Exit { status }) if *status != 0 => {
                violations.push(format!("the workload exited with status {status}"));
            }
            Ok(_) => {}
            Err(error) => violations.push(format!(
                "the client sent a line that is not a report ({error}): {:?}",
                line.text
            )),
        }
    }
    if !stopped {
        violations.push("the workload never confirmed the stop".to_owned());
    }
    if !unmounted {
        violations.push("the client never unmounted its filesystem cleanly".to_owned());
    }
    if let Some(exit) = ran.exit.filter(|exit| !exit.success()) {
        violations.push(format!("the client VM's QEMU ended with {exit}"));
    }

    let console_path = config.out_dir.join("client-console.log");
    let console = std::fs::read(&console_path).map_err(io_err(&console_path))?;
    let slice = |from: u64, to: u64| {
        let end = (to as usize).min(console.len());
        let start = (from as usize).min(end);
        console::error_lines(&String::from_utf8_lossy(&console[start..end]))
    };
    let marks = &ran.console_marks;
    let mut client_io_errors = 0;
    let first_mark = marks.first().copied().unwrap_or(u64::MAX);
    for line in slice(0, first_mark) {
        client_io_errors += 1;
        violations.push(format!(
            "before the first event, the client's kernel logged: {line}"
        ));
    }
    let last_mark = marks.last().copied().unwrap_or(u64::MAX);
    let after_stop = slice(last_mark, u64::MAX);

    let starts: Vec<Instant> = ran.events.iter().map(|e| e.at).collect();
    // Operations after the stop was sent belong to no event.
    let in_run: Vec<Arrived> = arrived
        .iter()
        .filter(|a| a.at <= ran.stopped_at)
        .cloned()
        .collect();
    let (baseline, per_event) = stalls::per_event(&in_run, &starts);
    let mut events = Vec::new();
    for (index, (event, ops)) in ran.events.iter().zip(per_event).enumerate() {
        let from = marks.get(index).copied().unwrap_or(u64::MAX);
        let errors = slice(from, marks.get(index + 1).copied().unwrap_or(u64::MAX));
        client_io_errors += errors.len();
        for line in &errors {
            violations.push(format!(
                "event {} ({}): the client's kernel logged: {line}",
                index + 1,
                event.kind
            ));
        }
        events.push(EventRecord {
            number: index + 1,
            kind: event.kind,
            at_unix_us: event.at_unix_us,
            settled_ms: event.settled.duration_since(event.at).as_secs_f64() * 1000.0,
            unserved_ms: event.unserved_ms(),
            ops: ops.ops,
            stall_ms: ops.longest.map(|(ms, _)| ms),
            stall_seq: ops.longest.map(|(_, seq)| seq),
            console_errors: errors,
            detail: event.detail.clone(),
        });
    }
    for line in after_stop {
        client_io_errors += 1;
        violations.push(format!("at the stop, the client's kernel logged: {line}"));
    }

    let checked = verify::verify(
        &config.out_dir.join("export.img"),
        &config.out_dir,
        &reported,
    )?;
    violations.extend(checked.violations.iter().cloned());
    let report = ClientVmReport {
        seed: config.seed,
        rounds: config.rounds,
        backend: config.backend.clone(),
        accel: ran.accel.clone(),
        reconnect_delay_s: config.reconnect_delay_s,
        open_timeout_s: config.open_timeout_s,
        duration_s: first_ms.map_or(0.0, |first| (last_ms - first) / 1000.0),
        ops: reported.len(),
        baseline_op_ms: Percentiles::of(&baseline),
        kinds: ClientVmReport::summarize(&events),
        events,
        client_io_errors,
        fsck_clean: checked.fsck_clean,
        files_checked: checked.files_checked,
        files_matching: checked.files_matching,
        journal_records: checked.journal_records,
        journal_recovered: checked.journal_recovered,
        violations,
        aborted: ran.aborted.clone(),
        server_notes: server_notes(&config.out_dir),
    };
    let path = config.out_dir.join("report.json");
    let json = report.to_json().unwrap_or_default();
    std::fs::write(&path, json).map_err(io_err(&path))?;
    Ok(report)
}

fn export_uri(config: &ClientVmConfig) -> String {
    format!("nbd://127.0.0.1:{}/{NODE}", config.ports[0])
}

fn machine_config(config: &ClientVmConfig, accel: &str) -> MachineConfig {
    MachineConfig {
        qemu: PathBuf::from("qemu-system-x86_64"),
        accel: accel.to_owned(),
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        memory_mib: 256,
        nbd_host: "127.0.0.1".into(),
        nbd_port: config.ports[0],
        export: NODE.into(),
        reconnect_delay_s: config.reconnect_delay_s,
        open_timeout_s: config.open_timeout_s,
        workload: vec![
            ("seed".into(), config.seed.to_string()),
            ("slots".into(), config.slots.to_string()),
            ("max_kib".into(), config.max_kib.to_string()),
        ],
        console: config.out_dir.join("client-console.log"),
        qemu_log: config.out_dir.join("client-qemu.log"),
        control_socket: machine::control_socket_path(&format!(
            "{}-{}",
            std::process::id(),
            config.seed
        )),
    }
}

fn pair_config_text(config: &ClientVmConfig) -> String {
    format!(
        "# written by ivha-campaign client-vm; every other setting is hostd's default\n\
         backend = \"{}\"\n[disks]\nsize_mib = {}\n\
         [[node]]\nname = \"a\"\nnbd_port = {}\n[[node]]\nname = \"b\"\nnbd_port = {}\n",
        config.backend, config.disk_mib, config.ports[0], config.ports[1]
    )
}

/// Every control line with its arrival (ms after the first event), for reading a run.
fn write_control_log(out: &Path, lines: &[ControlLine], events_began: Instant) {
    let text: String = lines
        .iter()
        .map(|line| {
            let ms = if line.at >= events_began {
                line.at.duration_since(events_began).as_secs_f64() * 1000.0
            } else {
                -(events_began.duration_since(line.at).as_secs_f64() * 1000.0)
            };
            format!("{ms:>12.1} {}\n", line.text)
        })
        .collect();
    let _ = std::fs::write(out.join("client-control.log"), text);
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn free_port() -> Result<u16, ClientVmError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(ClientVmError::Port)
}
