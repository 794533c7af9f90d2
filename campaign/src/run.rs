//! One campaign run: start a cluster of 2 to 8 nodes (a pair by default), run the workload,
//! inject the seeded faults one per cycle with recovery after each, read the final contents,
//! stop the cluster, then check the history and write the report.
//!
//! Files of a run (in `out_dir`): `history.jsonl`, `final/IDENTITY.img`, `report.json`,
//! `schedule.json`, `figures/` (see [`plots`]), and in `logs/` hostd's `events.jsonl`,
//! `hostd.log` and the guest consoles. While the writers run, the [`Sampler`] records what
//! the regions say about ownership into the history.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wire::events::{Event, EventLine};
use wire::network::GUEST_NBD_PORT;
use wire::records::RunRecord;

use wire::error_chain::one_line as error_chain;

use crate::attribution::Attribution;
use crate::checker::{self, CheckOutcome, FinalContents};
use crate::history::{
    End, Entry, Fault, FaultStart, History, HistoryWriter, RunInfo, ServeEnd, ServeStart, Takeover,
    WriterSpec,
};
use crate::hostd::Hostd;
use crate::nbd_client::NbdClient;
use crate::nemesis::{self, FaultKind, Fence, PlannedFault};
use crate::plots;
use crate::progress::Progress;
use crate::report::Report;
use crate::rng::Rng;
use crate::sampler::Sampler;
use crate::torn_tail::TornWrite;
use crate::workload::{Workload, WriterConfig};

/// The most nodes a cluster may have (hostd's limit).
pub const MAX_NODES: usize = 8;
/// How long the writers work against the survivor before the giveback.
const DWELL: Duration = Duration::from_millis(800);

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub cycles: u64,
    pub kinds: Vec<FaultKind>,
    /// "qemu" or "process".
    pub backend: String,
    pub out_dir: PathBuf,
    pub hostd: PathBuf,
    pub writers_per_identity: u32,
    pub blocks_per_writer: u64,
    /// Host ports of the identities, one per node: their number is the cluster's size (2 to
    /// [`MAX_NODES`]; the nodes are named a, b, c, ... in this order).
    pub ports: Vec<u16>,
    /// How the writers reach the identities.
    pub network: Network,
}

/// How the writers reach the identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Network {
    /// At their ports on 127.0.0.1 (QEMU user networking, or the agents' own listeners).
    #[default]
    User,
    /// At their service IPs on a bridge in the network namespace the campaign runs in
    /// (`ip netns exec NS ivha-campaign run --network bridge ...`): node N has 10.79.0.(2+N),
    /// its identity 10.79.0.(11+N), the namespace 10.79.0.1.
    Bridge,
}

/// Node `index`'s own address and its identity's service IP, in bridge mode.
fn bridge_addresses(index: usize) -> (Ipv4Addr, Ipv4Addr) {
    let index = index as u8;
    (
        Ipv4Addr::new(10, 79, 0, 2 + index),
        Ipv4Addr::new(10, 79, 0, 11 + index),
    )
}

impl RunConfig {
    /// The nodes (and identities) of the cluster, in configuration order: a, b, c, ...
    pub fn nodes(&self) -> Vec<String> {
        node_names(self.ports.len())
    }

    /// Whether the agents take over from each other while hostd is away in this run.
    pub fn failover_without_hostd(&self) -> bool {
        failover_without_hostd(&self.backend, self.network)
    }
}

/// Whether agents take over from each other while hostd is away in a cluster on `backend`
/// reached through `network`: only where they can move an address themselves, in bridge
/// mode (the service IP) or with the process backend (they listen on the ports). In user
/// networking only hostd can move a port, so the agents wait for it.
pub fn failover_without_hostd(backend: &str, network: Network) -> bool {
    backend == "process" || network == Network::Bridge
}

/// The kinds of `kinds` that cannot apply on `backend` with `network`: those that need the
/// agents to take over without hostd, where they do not.
pub fn unfit_kinds(kinds: &[FaultKind], backend: &str, network: Network) -> Vec<FaultKind> {
    if failover_without_hostd(backend, network) {
        return Vec::new();
    }
    kinds
        .iter()
        .copied()
        .filter(|kind| kind.needs_failover_without_hostd())
        .collect()
}

/// The names of a cluster of `count` nodes: a, b, c, ... (at most 26).
pub fn node_names(count: usize) -> Vec<String> {
    (b'a'..=b'z')
        .take(count)
        .map(|letter| char::from(letter).to_string())
        .collect()
}

/// Whether this process shares the network namespace of PID 1 (the host's, usually).
fn in_hosts_namespace() -> bool {
    let own = std::fs::read_link("/proc/self/ns/net").ok();
    own.is_none() || own == std::fs::read_link("/proc/1/ns/net").ok()
}

/// Errors that stop a run before it could be checked.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "--network bridge makes a bridge where the campaign runs: run it in a network namespace of its own (ip netns add ivc && ip netns exec ivc ivha-campaign run --network bridge ...)"
    )]
    HostNamespace,
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    History(#[from] crate::history::HistoryError),
    #[error("a cluster has 2 to {MAX_NODES} nodes, not {0} (one port per node)")]
    Nodes(usize),
    #[error(
        "{kinds}: these faults need the agents to take over without hostd, which they do only in bridge mode (--network bridge) or with the process backend (--backend process); in user networking only hostd can move a port, so the agents wait for it"
    )]
    NeedsFailoverWithoutHostd { kinds: String },
    #[error("cannot start the cluster")]
    Up(#[source] crate::hostd::HostdError),
    #[error("cannot start the workload")]
    Workload(#[source] std::io::Error),
    #[error("cannot read the final contents of {identity}")]
    Final {
        identity: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read hostd's events, which the checker needs")]
    Events(#[source] crate::hostd::HostdError),
    #[error(transparent)]
    Check(#[from] checker::CheckError),
}

/// A finished run.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: Report,
    pub outcome: CheckOutcome,
    /// Why the run stopped before its last cycle, if it did (the cluster did not recover, or
    /// a fault could not be injected): a failure of the run even if the history is valid.
    pub aborted: Option<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs the campaign.
pub fn run(config: &RunConfig) -> Result<RunOutcome, RunError> {
    if !(2..=MAX_NODES).contains(&config.ports.len()) {
        return Err(RunError::Nodes(config.ports.len()));
    }
    let unfit = unfit_kinds(&config.kinds, &config.backend, config.network);
    if !unfit.is_empty() {
        let names: Vec<&str> = unfit.iter().map(|kind| kind.name()).collect();
        return Err(RunError::NeedsFailoverWithoutHostd {
            kinds: names.join(", "),
        });
    }
    if config.network == Network::Bridge && in_hosts_namespace() {
        return Err(RunError::HostNamespace);
    }
    let out = &config.out_dir;
    std::fs::create_dir_all(out.join("final")).map_err(io_err(out))?;
    // Regions on tmpfs, as in production; removed at the end.
    let state_dir = PathBuf::from(format!(
        "/dev/shm/ivha-campaign-{}-{}",
        std::process::id(),
        config.seed
    ));
    let hostd = Hostd {
        binary: config.hostd.clone(),
        state_dir: state_dir.clone(),
    };
    let config_path = out.join("ivha.toml");
    std::fs::write(&config_path, cluster_config(config)).map_err(io_err(&config_path))?;
    let nodes = config.nodes();
    let kinds: Vec<FaultKind> = config
        .kinds
        .iter()
        .copied()
        .filter(|k| config.backend == "qemu" || !k.needs_vm())
        .collect();
    let plan = nemesis::schedule(config.seed, config.cycles, &kinds, &nodes);
    let schedule_path = out.join("schedule.json");
    std::fs::write(
        &schedule_path,
        serde_json::to_vec_pretty(&plan).unwrap_or_default(),
    )
    .map_err(io_err(&schedule_path))?;

    let run_id = Rng::new(config.seed ^ wire::time::now_unix_us(), 2).next_u64();
    let writers = writer_specs(config);
    let history_path = out.join("history.jsonl");
    let history = Arc::new(HistoryWriter::create(&history_path)?);
    history.append(&Entry::Run(RunInfo {
        t: wire::time::now_unix_us(),
        seed: config.seed,
        run_id,
        block_size: crate::block::BLOCK_SIZE as u64,
        writers: writers.clone(),
    }))?;

    let (aborted, fault_times) = match hostd.up(Some(&config_path)) {
        Ok(_) => drive(config, &hostd, &history, &plan, run_id, &writers),
        Err(error) => {
            collect_logs(&hostd, out);
            stop_pair(&hostd);
            return Err(RunError::Up(error));
        }
    };
    let finals = read_finals(config, &writers, out);
    let events = hostd.events();
    if let Ok(events) = &events {
        for entry in hostd_entries(events, &fault_times) {
            history.append(&entry)?;
        }
    }
    history.append(&Entry::End(End {
        t: wire::time::now_unix_us(),
    }))?;
    collect_logs(&hostd, out);
    stop_pair(&hostd);
    let finals = finals?;
    let events = events.map_err(RunError::Events)?;

    let history = History::read(&history_path)?;
    let outcome = checker::check(&history, &finals)?;
    let report = Report::build(&history, &outcome);
    let report_path = out.join("report.json");
    let json = report.to_json().unwrap_or_default();
    std::fs::write(&report_path, json).map_err(io_err(&report_path))?;
    // Pictures help to read a run; without them the verdict stands.
    match plots::write_run_figures(out, &history, &events) {
        Ok(paths) => log::info!("figures: {}", display_paths(&paths)),
        Err(error) => log::warn!("no figures: {}", error_chain(&error)),
    }
    Ok(RunOutcome {
        report,
        outcome,
        aborted,
    })
}

/// The cycles; returns why they stopped early, if they did, and (cycle, time in µs) of
/// every fault that hit.
fn drive(
    config: &RunConfig,
    hostd: &Hostd,
    history: &Arc<HistoryWriter>,
    plan: &[PlannedFault],
    run_id: u64,
    writers: &[WriterSpec],
) -> (Option<String>, Vec<(u64, u64)>) {
    if let Err(error) = hostd.wait_for(
        "a healthy cluster",
        Duration::from_secs(120),
        Hostd::healthy,
    ) {
        let why = format!("the cluster never became healthy: {error}");
        return (Some(why), Vec::new());
    }
    // Before the writers: its first read is what they start from.
    let sampler = match Sampler::start(&hostd.state_dir, history.clone()) {
        Ok(sampler) => sampler,
        Err(error) => {
            let why = format!("cannot start the region sampler: {error}");
            return (Some(why), Vec::new());
        }
    };
    let attribution = attribution(config, hostd);
    let configs = writers
        .iter()
        .map(|spec| WriterConfig {
            spec: spec.clone(),
            address: address(config, &spec.identity),
            run_id,
            seed: config.seed,
            read_percent: 25,
            attribution: attribution.clone(),
        })
        .collect();
    let workload = match Workload::start(configs, history.clone()) {
        Ok(workload) => workload,
        Err(error) => {
            sampler.stop();
            let why = format!("cannot start the workload: {error}");
            return (Some(why), Vec::new());
        }
    };
    let acks = workload.acks();
    let fence = Fence::of_backend(&config.backend);
    let mut aborted = None;
    let mut fault_times = Vec::new();
    let mut progress = Progress::new("campaign", "cycles", plan.len() as u64);
    for fault in plan {
        std::thread::sleep(Duration::from_millis(fault.warmup_ms));
        let torn = torn_target(run_id, writers, &config.nodes(), &fault.node);
        log::info!(
            "cycle {}: {} on {} ({} acknowledged so far)",
            fault.cycle,
            fault.kind,
            fault.node,
            workload.acked()
        );
        // Before the fault acts: what happens from now on is this fault's (and not the
        // previous one's), even if it cannot be injected.
        let started = history.append(&Entry::FaultStart(FaultStart {
            t: wire::time::now_unix_us(),
            cycle: fault.cycle,
            fault: fault.kind.name().to_owned(),
            node: fault.node.clone(),
        }));
        if let Err(error) = started {
            aborted = Some(format!("cannot record the fault's start: {error}"));
            break;
        }
        let outcome = match nemesis::inject(hostd, fault, torn, &acks, fence) {
            Ok(outcome) => outcome,
            Err(error) => {
                aborted = Some(format!(
                    "cycle {}: cannot inject {} on {}: {}",
                    fault.cycle,
                    fault.kind,
                    fault.node,
                    error_chain(&error)
                ));
                break;
            }
        };
        log::info!("cycle {}: {}", fault.cycle, outcome.detail);
        fault_times.push((fault.cycle, outcome.t));
        let recorded = history.append(&Entry::Fault(Fault {
            t: outcome.t,
            cycle: fault.cycle,
            fault: fault.kind.name().to_owned(),
            node: fault.node.clone(),
            detail: outcome.detail.clone(),
            node_t: outcome.node_t,
        }));
        if let Err(error) = recorded {
            aborted = Some(format!("cannot record the fault: {error}"));
            break;
        }
        if let Err(error) = nemesis::recover(hostd, fault, &outcome, DWELL) {
            aborted = Some(format!(
                "cycle {}: the cluster did not recover from {} on {}: {}",
                fault.cycle,
                fault.kind,
                fault.node,
                error_chain(&error)
            ));
            break;
        }
        progress.step();
    }
    drop(progress);
    // A last stretch of writes against the healthy cluster.
    std::thread::sleep(Duration::from_millis(500));
    workload.stop();
    sampler.stop();
    (aborted, fault_times)
}

/// How the writers tell which node accepted their connection: the neighbour table in bridge
/// mode, else the process holding the server's socket (an agent, or a QEMU whose user
/// network accepted it).
fn attribution(config: &RunConfig, hostd: &Hostd) -> Attribution {
    match config.network {
        Network::Bridge => Attribution::Neighbour {
            nodes: config.nodes(),
        },
        Network::User => Attribution::SocketOwner {
            run_dir: hostd.state_dir.join("run"),
            nodes: config.nodes(),
        },
    }
}

/// `a, b` for a list of files.
fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    shown.join(", ")
}

/// The position of `identity` in the configuration (its export id); 0 if unknown.
fn identity_index(config: &RunConfig, identity: &str) -> usize {
    config
        .nodes()
        .iter()
        .position(|n| n == identity)
        .unwrap_or(0)
}

fn address(config: &RunConfig, identity: &str) -> SocketAddr {
    let index = identity_index(config, identity);
    match config.network {
        Network::User => SocketAddr::from(([127, 0, 0, 1], config.ports[index])),
        Network::Bridge => SocketAddr::from((bridge_addresses(index).1, GUEST_NBD_PORT)),
    }
}

/// hostd's configuration: one `[[node]]` per port. No `takeover_by`: hostd's default, the
/// other nodes in ring order after each node, is the order the nemesis expects.
fn cluster_config(config: &RunConfig) -> String {
    let mut text = format!(
        "# written by ivha-campaign\nbackend = \"{}\"\n\
         [flusher]\n# Writes stay unflushed for a while, so faults find them in the log.\ndelay_ms = 200\n\
         [regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n",
        config.backend
    );
    if config.network == Network::Bridge {
        // In the campaign's own namespace: hostd makes the bridge there and removes it at
        // `down --purge`.
        text.push_str(&format!(
            "[network]\nmode = \"bridge\"\nbridge = \"ivc{}\"\nbridge_address = \"10.79.0.1/24\"\n",
            std::process::id() % 100_000_000
        ));
    }
    for (index, (name, port)) in config.nodes().iter().zip(&config.ports).enumerate() {
        text.push_str(&format!("[[node]]\nname = \"{name}\"\nnbd_port = {port}\n"));
        if config.network == Network::Bridge {
            let (own, service) = bridge_addresses(index);
            text.push_str(&format!(
                "address = \"{own}/24\"\nservice_ip = \"{service}/24\"\n"
            ));
        }
    }
    text
}

/// Writers 0.. on identity a, then on b, c, ...; each owns `blocks_per_writer` blocks of
/// its identity's export.
fn writer_specs(config: &RunConfig) -> Vec<WriterSpec> {
    let mut specs = Vec::new();
    for identity in config.nodes() {
        for index in 0..config.writers_per_identity {
            specs.push(WriterSpec {
                writer: specs.len() as u32,
                identity: identity.clone(),
                first_block: u64::from(index) * config.blocks_per_writer,
                blocks: config.blocks_per_writer,
            });
        }
    }
    specs
}

/// The record a torn-tail fault on `node` leaves: a block of the first writer of its own
/// identity (its export id is its position among `nodes`).
fn torn_target(run_id: u64, writers: &[WriterSpec], nodes: &[String], node: &str) -> TornWrite {
    let writer = writers.iter().find(|w| w.identity == node);
    TornWrite {
        run_id,
        export: nodes.iter().position(|n| n == node).unwrap_or(0) as u32,
        writer: writer.map_or(0, |w| w.writer),
        block: writer.map_or(0, |w| w.first_block),
    }
}

/// Reads every writer block of each identity through its address, keeping a copy in
/// `final/ID.img`.
fn read_finals(
    config: &RunConfig,
    writers: &[WriterSpec],
    out: &Path,
) -> Result<FinalContents, RunError> {
    let mut finals = FinalContents::new();
    for identity in config.nodes() {
        let identity = identity.as_str();
        let end = checker::writers_needed_bytes(writers, identity);
        let final_err = |source| RunError::Final {
            identity: identity.to_owned(),
            source,
        };
        let mut client =
            connect_retrying(address(config, identity), identity).map_err(final_err)?;
        let mut image = Vec::with_capacity(end as usize);
        const CHUNK: u64 = 256 << 10;
        let mut offset = 0;
        while offset < end {
            let len = CHUNK.min(end - offset);
            image.extend(client.read(offset, len as u32).map_err(final_err)?);
            offset += len;
        }
        client.disconnect();
        let path = out.join("final").join(format!("{identity}.img"));
        std::fs::write(&path, &image).map_err(io_err(&path))?;
        finals.insert(identity, image);
    }
    Ok(finals)
}

fn connect_retrying(address: SocketAddr, export: &str) -> std::io::Result<NbdClient> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match NbdClient::connect(address, export, Duration::from_secs(5)) {
            Ok(client) => return Ok(client),
            Err(error) if std::time::Instant::now() >= deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// hostd's serving intervals and unplanned takeovers, as history entries. A takeover
/// belongs to the last fault before it was detected.
fn hostd_entries(events: &[EventLine], faults: &[(u64, u64)]) -> Vec<Entry> {
    events
        .iter()
        .filter_map(|event| hostd_entry(event, faults))
        .collect()
}

fn hostd_entry(line: &EventLine, faults: &[(u64, u64)]) -> Option<Entry> {
    let t = line.time_us();
    match &line.event {
        Event::ServingStarted { identity, node, .. } => Some(Entry::ServeStart(ServeStart {
            t,
            identity: identity.clone(),
            node: node.clone(),
        })),
        Event::ServingEnded {
            identity,
            node,
            reason,
        } => Some(Entry::ServeEnd(ServeEnd {
            t,
            identity: identity.clone(),
            node: node.clone(),
            reason: reason.clone(),
        })),
        Event::Takeover(report) if !report.planned => {
            let detected_us = report.detected_unix_ms * 1000;
            let serving_ms = report.timeline_ms.serving?;
            // Detection is stamped in whole ms: allow for the rounding.
            let (cycle, fault_t) = faults
                .iter()
                .copied()
                .filter(|(_, fault_t)| *fault_t <= detected_us + 1000)
                .max_by_key(|(_, fault_t)| *fault_t)?;
            let serving_us = detected_us as f64 + serving_ms * 1000.0;
            Some(Entry::Takeover(Takeover {
                t,
                cycle,
                identity: report.node.clone(),
                from: report.from.clone(),
                to: report.to.clone(),
                fault_to_serving_ms: ((serving_us - fault_t as f64) / 1000.0).max(0.0),
                detect_to_serving_ms: serving_ms,
            }))
        }
        _ => None,
    }
}

/// Stops the cluster and removes its state directory. If no hostd answers (one that failed to
/// restart), the node processes it recorded are killed, so no QEMU outlives the run.
pub(crate) fn stop_pair(hostd: &Hostd) {
    if let Err(error) = hostd.run(&["down", "--purge"]) {
        log::warn!("hostd down: {error}; killing the recorded node processes");
        let records = std::fs::read_dir(hostd.state_dir.join("run"))
            .into_iter()
            .flatten()
            .flatten();
        for record in records {
            let pid = std::fs::read(record.path())
                .ok()
                .and_then(|text| serde_json::from_slice::<RunRecord>(&text).ok())
                .map(|record| record.pid);
            // Only a process whose command line names this state directory.
            if let Some(pid) = pid
                .and_then(|pid| i32::try_from(pid).ok())
                .filter(|&pid| pid > 0)
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    String::from_utf8_lossy(&cmdline).contains(&*hostd.state_dir.to_string_lossy())
                })
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&hostd.state_dir);
}

/// Copies what explains a run into its directory: hostd's events and log, the consoles.
pub(crate) fn collect_logs(hostd: &Hostd, out: &Path) {
    let logs = out.join("logs");
    let _ = std::fs::create_dir_all(&logs);
    for name in ["events.jsonl", "hostd.log"] {
        let _ = std::fs::copy(hostd.state_dir.join(name), logs.join(name));
    }
    if let Ok(entries) = std::fs::read_dir(hostd.state_dir.join("consoles")) {
        for entry in entries.flatten() {
            let _ = std::fs::copy(entry.path(), logs.join(entry.file_name()));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn takeover_events_become_entries_of_their_cycle() {
        let faults = [(0, 1_000_000_000), (1, 2_000_000_000)];
        let event = EventLine::parse(
            r#"{"time_unix_ms":2000200,"time_unix_us":2000200000,"event":"takeover","node":"a","from":"a","to":"b","planned":false,"reason":"","epoch":1,"detected_unix_ms":2000010,"timeline_ms":{"fenced":1.0,"serving":150.5},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#,
        )
        .unwrap();
        let Some(Entry::Takeover(takeover)) = hostd_entry(&event, &faults) else {
            panic!("not a takeover entry");
        };
        assert_eq!(takeover.cycle, 1);
        assert_eq!(takeover.detect_to_serving_ms, 150.5);
        assert!((takeover.fault_to_serving_ms - 160.5).abs() < 1e-6);
        let planned = EventLine::parse(
            r#"{"time_unix_ms":0,"time_unix_us":1,"event":"takeover","planned":true,"node":"a","from":"a","to":"b","reason":"","epoch":1,"detected_unix_ms":1,"timeline_ms":{"serving":1},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#,
        )
        .unwrap();
        assert!(hostd_entry(&planned, &faults).is_none());
        let started = EventLine::parse(
            r#"{"time_unix_ms":0,"time_unix_us":5,"event":"serving_started","identity":"a","node":"b","epoch":2}"#,
        )
        .unwrap();
        assert!(
            matches!(hostd_entry(&started, &faults), Some(Entry::ServeStart(s)) if s.t == 5 && s.node == "b")
        );
    }

    #[test]
    fn writers_own_disjoint_blocks_per_identity() {
        let config = RunConfig {
            writers_per_identity: 3,
            ..config_of(vec![1, 2])
        };
        let specs = writer_specs(&config);
        assert_eq!(specs.len(), 6);
        for (i, a) in specs.iter().enumerate() {
            for b in &specs[i + 1..] {
                let overlap = a.identity == b.identity
                    && a.first_block < b.first_block + b.blocks
                    && b.first_block < a.first_block + a.blocks;
                assert!(!overlap, "{a:?} {b:?}");
            }
        }
        let torn = torn_target(9, &specs, &config.nodes(), "b");
        assert_eq!((torn.export, torn.writer, torn.block), (1, 3, 0));
    }

    #[test]
    fn bridge_mode_gives_each_node_its_addresses() {
        let config = RunConfig {
            network: Network::Bridge,
            ..config_of(vec![31001, 31002, 31003])
        };
        let text = cluster_config(&config);
        assert!(text.contains("mode = \"bridge\""), "{text}");
        assert!(
            text.ends_with("name = \"c\"\nnbd_port = 31003\naddress = \"10.79.0.4/24\"\nservice_ip = \"10.79.0.13/24\"\n"),
            "{text}"
        );
        assert_eq!(address(&config, "b").to_string(), "10.79.0.12:10809");
    }

    fn config_of(ports: Vec<u16>) -> RunConfig {
        RunConfig {
            seed: 1,
            cycles: 1,
            kinds: FaultKind::ALL.to_vec(),
            backend: "process".into(),
            out_dir: PathBuf::from("/nonexistent"),
            hostd: PathBuf::from("hostd"),
            writers_per_identity: 2,
            blocks_per_writer: 8,
            ports,
            network: Network::User,
        }
    }

    #[test]
    fn a_pair_config_is_as_it_was() {
        assert_eq!(
            cluster_config(&config_of(vec![31001, 31002])),
            "# written by ivha-campaign\nbackend = \"process\"\n[flusher]\n\
             # Writes stay unflushed for a while, so faults find them in the log.\n\
             delay_ms = 200\n[regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n\
             [[node]]\nname = \"a\"\nnbd_port = 31001\n[[node]]\nname = \"b\"\nnbd_port = 31002\n"
        );
    }

    #[test]
    fn a_larger_cluster_has_a_node_writers_and_an_address_per_port() {
        let config = config_of(vec![31001, 31002, 31003, 31004]);
        assert_eq!(config.nodes(), ["a", "b", "c", "d"]);
        let text = cluster_config(&config);
        assert_eq!(text.matches("[[node]]").count(), 4);
        assert!(
            text.ends_with("[[node]]\nname = \"d\"\nnbd_port = 31004\n"),
            "{text}"
        );
        let specs = writer_specs(&config);
        assert_eq!(specs.len(), 8);
        for (index, identity) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let on: Vec<u32> = specs
                .iter()
                .filter(|s| s.identity == identity)
                .map(|s| s.writer)
                .collect();
            assert_eq!(on, [2 * index as u32, 2 * index as u32 + 1]);
            assert_eq!(address(&config, identity).port(), 31001 + index as u16);
        }
        let torn = torn_target(9, &specs, &config.nodes(), "c");
        assert_eq!((torn.export, torn.writer, torn.block), (2, 4, 0));
        assert_eq!(node_names(8).concat(), "abcdefgh");
    }

    #[test]
    fn a_cluster_needs_two_to_eight_ports() {
        for ports in [vec![31001], (31001..31010).collect()] {
            let count = ports.len();
            assert!(matches!(run(&config_of(ports)), Err(RunError::Nodes(n)) if n == count));
        }
    }
}
