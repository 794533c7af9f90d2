//! The agent's main loop: own the node region, beat, watch the peers.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm::layout::node_live;
use shm::{
    Access, BackPressure, ControlRegion, Mapping, NodeRegion, NodeWriter, PeerObservation,
    ServiceCounters,
};

use crate::args::Args;
use crate::coordinator::{self, CoordinatorClient};
use crate::export::ExportRegistry;
use crate::failover::quarantine::{Quarantine, old_log_replayed};
use crate::failover::replay::{self, ReplayBook, ReplayJob};
use crate::failover::without_hostd::WithoutHostd;
use crate::failover::{FailoverMonitor, Identity};
use crate::nbd::{Server, ServerConfig};
use crate::nvram::flusher::{Flusher, FlusherConfig, Release};
use crate::nvram::volume::{Disk, DiskError, Volume};
use crate::nvram::{Nvram, NvramError, Ownership};
use crate::regions::{self, RegionsError};
use crate::service_ip::{IpCommand, NoServiceAddresses, ServiceAddresses};

/// The marker the write-protection self-test stores ("IVHAPROB").
pub const WRITE_PROBE_MARKER: u64 = u64::from_le_bytes(*b"IVHAPROB");

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot find this node's regions")]
    Regions(#[from] RegionsError),
    #[error("cannot map region {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: shm::MappingError,
    },
    #[error("cannot open this node's disk")]
    Disk(#[from] DiskError),
    #[error("cannot load the log's unflushed records")]
    Nvram(#[from] NvramError),
    #[error("cannot listen for NBD clients on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent already writes region {path}: one writer per region")]
    RegionBusy { path: PathBuf },
    #[error("cannot lock region {path}")]
    RegionLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("control region {path} cannot be used")]
    Control {
        path: PathBuf,
        #[source]
        source: shm::ControlError,
    },
    #[error("cannot resume replaying a dead node's log")]
    Replay(#[source] crate::failover::replay::ReplayError),
    #[error("cannot discard this node's replayed log")]
    Discard(#[source] shm::LogError),
    #[error("cannot set up the service network")]
    Network(#[source] crate::service_ip::AddressError),
    #[error("cannot start the interconnect")]
    Interconnect(#[source] crate::interconnect::StartError),
    #[error("region {path} cannot be used")]
    Node {
        path: PathBuf,
        #[source]
        source: shm::NodeError,
    },
}

/// Runs the agent until killed (or for `--beats` heartbeats).
pub fn run(args: &Args) -> Result<(), AgentError> {
    let candidates = regions::candidates(&args.pci_root, args.region_dir.as_deref())?;
    let found = regions::classify(&args.node, &candidates)?;
    let own = open_node(&found.own, Access::ReadWrite)?;
    let peers = found
        .peers
        .iter()
        .map(|(_, path)| open_node(path, Access::ReadOnly))
        .collect::<Result<Vec<_>, _>>()?;
    let control = match &found.control {
        Some(path) => Some(open_control(path)?),
        None => None,
    };
    // Everything that can fail without touching the region comes first: an agent that
    // cannot serve must not take the region from one that does.
    let listener = TcpListener::bind(args.listen).map_err(|source| AgentError::Listen {
        addr: args.listen,
        source,
    })?;
    let _region_lock = lock_region(&found.own)?;
    let writer = own.writer(boot_id()).map_err(|source| AgentError::Node {
        path: found.own.clone(),
        source,
    })?;
    let NodeWriter {
        appender,
        mut flushed,
        synced,
        mut heartbeat,
        ack,
        peer: mut peer_writer,
        service: mut service_writer,
        replays,
        stopped,
        claims,
        interconnect: interconnect_area,
    } = writer;
    let replay_book = ReplayBook::new(replays);
    let node_id = own.header().node_id;
    let ownership = control.as_ref().map(|control| Ownership {
        control: control.clone(),
        node: node_id,
        regions: std::iter::once(own.clone())
            .chain(peers.iter().cloned())
            .collect(),
    });
    let owns = |identity: u32| ownership.as_ref().is_none_or(|o| o.owns(identity));
    let old_log = if owns(node_id) {
        OldLog::Ours
    } else {
        // Another node took this node's identity over while it was down, replaying this
        // log onto the disk and writing more since: what is left here is stale once that
        // replay has finished.
        discard_replayed_log(&own, &peers, ownership.as_ref(), &mut flushed)?
    };

    // The node's own export: its disk, behind NVRAM write-back; and each peer's disk,
    // served only after a takeover.
    let disk_path = match &args.disk {
        Some(path) => path.clone(),
        None => regions::disk_by_serial(&args.sys_block, &format!("ivha-{}", args.node))?,
    };
    let disk = Disk::open(&disk_path)?;
    let disk_size = disk.size();
    let back_pressure = BackPressure {
        timeout: Duration::from_secs(args.backpressure_timeout_s),
    };
    let nvram = Nvram::with_ownership(own.clone(), appender, back_pressure, ownership.clone());
    let mut identities = BTreeMap::new();
    let export = nvram.add_volume(Volume::with_access(
        node_id,
        &args.node,
        disk,
        owns(node_id),
    ));
    identities.insert(node_id, Identity::new(Arc::clone(&export)));
    for peer in &peers {
        let peer_id = peer.header().node_id;
        let name = &peer.header().name;
        let peer_disk = match args.peer_disk(name) {
            Some(path) => Ok(path.clone()),
            // In process mode hostd names the disk of every node this one may take over.
            None if args.process_mode() => continue,
            None => regions::disk_by_serial(&args.sys_block, &format!("ivha-{name}")),
        };
        match peer_disk
            .map_err(AgentError::from)
            .and_then(|path| Ok(Disk::open(&path)?))
        {
            Ok(disk) => {
                let writable = ownership.as_ref().is_some_and(|o| o.owns(peer_id));
                let volume = Volume::with_access(peer_id, name, disk, writable);
                identities.insert(peer_id, Identity::new(nvram.add_volume(volume)));
            }
            Err(error) => log::warn!(
                "{name}'s disk is not usable, so this node cannot take {name}'s identity over: {}",
                wire::error_chain::one_line(&error)
            ),
        }
    }
    // Writes acknowledged before a crash of this agent are served from the log until the
    // flusher has put them on disk.
    let recovered = nvram.recover()?;
    if recovered > 0 {
        log::info!("recovered {recovered} unflushed records from the log");
    }
    let quarantine = match old_log {
        OldLog::Ours => None,
        OldLog::Quarantined {
            flushed_seq,
            through_seq,
            owner_epoch,
            holder,
        } => Some(Quarantine {
            hold: nvram.hold_flusher(flushed_seq),
            through_seq,
            owner_epoch,
            holder,
        }),
    };
    for peer in &peers {
        resume_replays(
            &nvram,
            peer,
            &identities,
            &replay_book,
            flushed.flushed().seq,
        )?;
    }
    let flusher_config = FlusherConfig {
        delay: Duration::from_millis(args.options.flush_delay_ms),
        paused: args.options.flush_paused,
        release: args.release(),
        sync_interval: Duration::from_millis(args.options.sync_interval_ms),
    };
    log::info!(
        "flusher: {}",
        match flusher_config.release {
            Release::Written => format!(
                "a write leaves the log once in the host's page cache; disks synced every {} ms",
                args.options.sync_interval_ms
            ),
            Release::Synced => "a write leaves the log once synced to the disk".to_owned(),
        }
    );
    let _flusher = Flusher::spawn(Arc::clone(&nvram), flushed, synced, flusher_config)
        .map_err(AgentError::Thread)?;
    // Bridge mode: the NIC with the node's own address (an earlier run's service IPs are
    // dropped); then every identity served from the start gets its export and its address.
    let mut addresses: Box<dyn ServiceAddresses> = match IpCommand::from_options(&args.options) {
        Some(mut ips) => {
            ips.set_up().map_err(AgentError::Network)?;
            Box::new(ips)
        }
        None => Box::new(NoServiceAddresses),
    };
    let registry = Arc::new(ExportRegistry::new());
    for identity in identities.values() {
        let volume = identity.export.volume();
        if volume.writable() {
            registry.insert(Arc::clone(&identity.export) as Arc<dyn crate::export::Export>);
            addresses.hold(&volume.name).map_err(AgentError::Network)?;
        }
    }
    let server_config = ServerConfig {
        poll: Duration::from_micros(args.options.nbd_poll_us),
        max_connections_per_export: args.options.nbd_max_connections as usize,
        max_negotiating: args.options.nbd_max_negotiating as usize,
        idle_timeout: (args.options.nbd_idle_timeout_s > 0)
            .then(|| Duration::from_secs(args.options.nbd_idle_timeout_s)),
        ..ServerConfig::default()
    };
    // One descriptor per connection, for every export this node may serve, on each
    // listener (in process mode each identity has its own).
    let listeners = if args.process_mode() {
        identities.len()
    } else {
        1
    };
    let connections = (server_config.max_negotiating
        + server_config.max_connections_per_export * identities.len())
        * listeners;
    raise_descriptor_limit(connections as u64 + RESERVED_DESCRIPTORS);
    let counters = Arc::clone(&server_config.counters);
    let server = Server::spawn_with(listener, Arc::clone(&registry), server_config.clone())
        .map_err(AgentError::Thread)?;
    // In process mode the listener is the identity's address: it goes when the identity
    // is released. In a guest it is the guest's NBD port, and hostd moves the address.
    let process_mode = args.process_mode();
    let server = if process_mode && export.volume().writable() {
        identities.insert(
            node_id,
            Identity::with_listener(Arc::clone(&export), server),
        );
        None
    } else {
        Some(Arc::new(server))
    };
    log::info!(
        "export {} ({} bytes, disk {}) over NBD on {}: {}",
        args.node,
        disk_size,
        disk_path.display(),
        args.listen,
        if export.volume().writable() {
            "serving"
        } else {
            "held by another node"
        }
    );
    let (negotiation, questions) =
        crate::interconnect::negotiation::pair().map_err(AgentError::Thread)?;
    let veto: Arc<dyn crate::interconnect::negotiation::Veto> =
        Arc::new(crate::failover::veto::NodeVeto {
            ownership: ownership.clone(),
            nvram: Arc::clone(&nvram),
        });
    let interconnect_on = args.options.interconnect.enabled();
    let without_hostd = match (&args.options.coordinator, &control) {
        (Some(address), Some(_)) => {
            let mut client = CoordinatorClient::new(
                coordinator::channel(address, &args.sys_virtio_ports),
                coordinator::first_number(),
            );
            // The daemon learns this agent's process from the connection: a claim of this
            // node can then fence it where the storage cannot (the process backend).
            client.connect_now();
            log::info!(
                "coordinator: {} (takeovers without hostd, when hostd allows them)",
                client.describe()
            );
            Some(WithoutHostd::new(
                client,
                args.options.identity_ports.clone(),
                claims,
                interconnect_on,
                Instant::now(),
            ))
        }
        (Some(address), None) => {
            log::warn!(
                "--coordinator {address} is of no use without a control region: no takeovers without hostd"
            );
            None
        }
        (None, _) => None,
    };
    if let Some(control) = &control {
        let monitor = FailoverMonitor {
            node_id,
            control: control.clone(),
            peers: peers
                .iter()
                .map(|peer| (peer.header().node_id, peer.clone()))
                .collect(),
            nvram: Arc::clone(&nvram),
            registry: Arc::clone(&registry),
            server: server.clone(),
            identities,
            handled: own.ack().map_or(0, |a| a.command_seq),
            ack,
            listen_ip: process_mode.then(|| args.listen.ip()),
            server_config,
            replays: replay_book,
            quarantine,
            pending_replay: None,
            pending_cache_drop: None,
            addresses,
            stopped,
            negotiation: interconnect_on.then(|| negotiation.clone()),
            without_hostd,
        };
        std::thread::Builder::new()
            .name("failover".into())
            .spawn(move || monitor.run())
            .map_err(AgentError::Thread)?;
    }
    // The links to the peers, and the connection manager over them.
    crate::interconnect::start(crate::interconnect::Parts {
        options: &args.options.interconnect,
        me: node_id as u16,
        process_mode: args.process_mode(),
        socket_dir: args.ic_socket_dir.as_deref(),
        sys_class_net: &args.sys_class_net,
        peers: &peers,
        area: interconnect_area,
        control: control.clone(),
        negotiation: Some((questions, veto)),
    })
    .map_err(AgentError::Interconnect)?;
    heartbeat.beat();
    log::info!(
        "node {} up: own region {}, peers {}, control {} (epoch {}), boot id {:#018x}",
        args.node,
        found.own.display(),
        if found.peers.is_empty() {
            "none".to_owned()
        } else {
            found
                .peers
                .iter()
                .map(|(name, path)| format!("{name} at {}", path.display()))
                .collect::<Vec<_>>()
                .join(", ")
        },
        found
            .control
            .as_ref()
            .map_or("none".to_owned(), |p| p.display().to_string()),
        control.as_ref().map_or(0, ControlRegion::epoch),
        own.boot_id()
    );
    if args.selftest_write_partner {
        selftest_write_partner(&args.node, &found);
    }

    let interval = args.heartbeat_interval();
    let mut next = Instant::now() + interval;
    let mut last_seen = vec![PeerObservation::default(); peers.len()];
    let mut beats = 1;
    while args.beats.is_none_or(|max| beats < max) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += interval;
        heartbeat.beat();
        beats += 1;
        for (peer, last_seen) in peers.iter().zip(last_seen.iter_mut()) {
            let seen = PeerObservation {
                node_id: Some(peer.header().node_id),
                boot_id: peer.boot_id(),
                heartbeat: peer.heartbeat().map_or(0, |h| h.counter),
            };
            if seen.boot_id != last_seen.boot_id {
                log::info!(
                    "peer {} boot id {:#018x}, heartbeat {}",
                    peer.header().name,
                    seen.boot_id,
                    seen.heartbeat
                );
            }
            peer_writer.observe(seen);
            *last_seen = seen;
        }
        service_writer.publish(ServiceCounters {
            nbd_connections: counters.open(),
            nbd_refused: counters.refused(),
            nbd_idle_closed: counters.idle_closed(),
            writes_waiting: nvram.writes_waiting(),
        });
    }
    Ok(())
}

/// Descriptors the agent needs besides its NBD connections: regions, disks, listeners,
/// logs, with room to spare.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the open-file limit to at least `wanted` if it can (a guest's init leaves the
/// kernel's 1024), and warns when it cannot: the connection limits would then not hold
/// before the descriptors run out.
fn raise_descriptor_limit(wanted: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(errno) => {
            log::warn!("cannot read the open-file limit ({errno}); leaving it as it is");
            return;
        }
    };
    if soft >= wanted {
        return;
    }
    // Root may raise the hard limit too; anyone may raise the soft one up to the hard one.
    let raised = setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted.max(hard))
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard));
    match (raised, getrlimit(Resource::RLIMIT_NOFILE)) {
        (Ok(()), Ok((now, _))) if now >= wanted => {
            log::info!("open-file limit raised from {soft} to {now}");
        }
        (_, now) => log::warn!(
            "open-file limit is {}, below the {wanted} the NBD connection limits need: clients may be refused for want of descriptors",
            now.map_or(soft, |(now, _)| now)
        ),
    }
}

/// What becomes of the log a node finds when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OldLog {
    /// Its records are this node's to apply (or there are none left).
    Ours,
    /// The node holding this node's identity may still be replaying them: kept, and not
    /// applied, until it says it has finished (see [`Quarantine`]).
    Quarantined {
        flushed_seq: u64,
        through_seq: u64,
        owner_epoch: u64,
        holder: Option<u32>,
    },
}

/// Marks this node's whole log as flushed without applying it: the node that owns this
/// node's identity now replayed it and has written the disk since. Only done once a peer's
/// region says a replay of this log has finished (for the ownership's epoch or later);
/// until then the log is quarantined.
fn discard_replayed_log(
    own: &NodeRegion,
    peers: &[NodeRegion],
    ownership: Option<&Ownership>,
    flushed: &mut shm::FlushedWriter,
) -> Result<OldLog, AgentError> {
    let Some((ownership, owner)) =
        ownership.and_then(|o| Some((o, o.owner(own.header().node_id)?)))
    else {
        return Ok(OldLog::Ours);
    };
    let owner_name = owner
        .node
        .and_then(|n| ownership.control.header().nodes.get(n as usize).cloned())
        .unwrap_or_else(|| "nobody".to_owned());
    let (_, head) = own.log_cursors().map_err(AgentError::Discard)?;
    if flushed.flushed() == head {
        log::info!(
            "identity held by {owner_name} (epoch {}); log empty",
            owner.epoch
        );
        return Ok(OldLog::Ours);
    }
    let node_id = own.header().node_id;
    // The holder replayed it, or, after the holder died too, the node that took over from
    // it applied it first (see the failover monitor's chained takeover).
    let peers: Vec<&NodeRegion> = peers.iter().collect();
    let replayed = old_log_replayed(&peers, node_id, owner.epoch, owner.epoch, head.seq);
    if !replayed {
        log::warn!(
            "identity held by {owner_name} (epoch {}), which has not said it finished replaying this log: keeping seq {}..={} until it does",
            owner.epoch,
            flushed.flushed().seq + 1,
            head.seq
        );
        return Ok(OldLog::Quarantined {
            flushed_seq: flushed.flushed().seq,
            through_seq: head.seq,
            owner_epoch: owner.epoch,
            holder: owner.node,
        });
    }
    let from = flushed.flushed().seq;
    flushed.advance(head).map_err(AgentError::Discard)?;
    log::info!(
        "identity held by {owner_name} (epoch {}), which replayed this log: discarded seq {from}..{}",
        owner.epoch,
        head.seq
    );
    Ok(OldLog::Ours)
}

/// Starts again the replays this node had not finished when it stopped: for each
/// identity it holds with records in the dead holder's log it was still replaying, the
/// layer is rebuilt from that log and the replay runs again (replaying twice is harmless).
/// This node's own records for the identity are newer, so its flusher is held from its
/// flushed cursor on.
pub(crate) fn resume_replays(
    nvram: &Arc<Nvram>,
    dead: &NodeRegion,
    identities: &BTreeMap<u32, Identity>,
    book: &ReplayBook,
    flushed_seq: u64,
) -> Result<(), AgentError> {
    let dead_id = dead.header().node_id;
    let Some(mark) = nvram.region().replay_of(dead_id) else {
        return Ok(());
    };
    if mark.status != shm::ReplayStatus::Replaying {
        return Ok(());
    }
    let mut served = false;
    for identity in identities.values() {
        let volume = identity.export.volume();
        if !volume.writable() {
            continue;
        }
        let scanned =
            replay::scan(dead, volume.export_id, volume.disk.size()).map_err(AgentError::Replay)?;
        // Only the identities taken over from this log have records in it (the dead node
        // flushed everything else it released).
        if scanned.records == 0 && scanned.stopped.is_none() {
            continue;
        }
        log::info!(
            "resuming the replay of {}'s log for {}: {} records, seq {}..={}",
            dead.header().name,
            volume.name,
            scanned.records,
            scanned.first_seq,
            scanned.last_seq
        );
        served = true;
        let hold = nvram.hold_flusher(flushed_seq);
        book.serve_layer(scanned, volume, mark.epoch, hold);
    }
    if served {
        ReplayJob {
            region: dead.clone(),
            book: book.clone(),
        }
        .start();
    } else {
        // Nothing of it is served here any more: the replay finished in all but its mark.
        book.record_replayed(
            dead_id,
            shm::Replay {
                status: shm::ReplayStatus::Replayed,
                ..mark
            },
        );
    }
    Ok(())
}

/// An exclusive lock on the region file for as long as this agent writes it: a second agent
/// for the same node (say, left over from a crashed hostd) fails here instead of writing
/// the region alongside the first.
fn lock_region(path: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, AgentError> {
    let lock_error = |source: std::io::Error| AgentError::RegionLock {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(lock_error)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => AgentError::RegionBusy {
                path: path.to_owned(),
            },
            other => lock_error(other.into()),
        },
    )
}

fn open_control(path: &std::path::Path) -> Result<ControlRegion, AgentError> {
    let mapping = Mapping::open(path, Access::ReadOnly).map_err(|source| AgentError::Map {
        path: path.to_owned(),
        source,
    })?;
    ControlRegion::open(mapping).map_err(|source| AgentError::Control {
        path: path.to_owned(),
        source,
    })
}

fn open_node(path: &std::path::Path, access: Access) -> Result<NodeRegion, AgentError> {
    let mapping = Mapping::open(path, access).map_err(|source| AgentError::Map {
        path: path.to_owned(),
        source,
    })?;
    NodeRegion::open(mapping).map_err(|source| AgentError::Node {
        path: path.to_owned(),
        source,
    })
}

/// Tries to write where a peer must not be able to. The verdict is the host's: it
/// reads both region files and finds the marker in ours only.
fn selftest_write_partner(node: &str, found: &regions::Found) {
    let Some((peer_name, peer)) = found.peers.first() else {
        log::warn!("selftest: no peer region to try");
        return;
    };
    for (name, path) in [(node, &found.own), (peer_name.as_str(), peer)] {
        let result = Mapping::open(path, Access::ReadWrite)
            .map_err(|e| wire::error_chain::one_line(&e))
            .and_then(|m| {
                m.probe_store(node_live::WRITE_PROBE, WRITE_PROBE_MARKER)
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => log::info!("selftest: stored the probe marker into node {name}'s region"),
            Err(error) => {
                log::info!("selftest: could not store into node {name}'s region: {error}")
            }
        }
    }
}

/// A random id for this run of the agent, so the host can tell restarts apart.
fn boot_id() -> u64 {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    match random {
        Ok(()) => u64::from_le_bytes(bytes).max(1),
        // Never 0 (which means "never started"); time and pid are unique enough here.
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (now ^ u64::from(std::process::id()) << 32).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm::control::Owner;
    use shm::{BackPressure, Entry, Replay, ReplayStatus};

    /// A restarted node whose identity the partner holds forgets its log only once the
    /// partner's region says its replay of it has finished, for that takeover or a later one;
    /// until then it keeps the log aside, whole.
    #[test]
    fn a_restarted_node_keeps_its_log_until_the_replay_of_it_has_finished() {
        let dir = tempfile::tempdir().unwrap();
        let own_path = dir.path().join("a.region");
        let own =
            NodeRegion::format(Mapping::create_file(&own_path, 1 << 20).unwrap(), 0, "a").unwrap();
        let partner = NodeRegion::format(
            Mapping::create_file(&dir.path().join("b.region"), 1 << 20).unwrap(),
            1,
            "b",
        )
        .unwrap();
        let control = ControlRegion::format(
            Mapping::create_file(&dir.path().join("control"), 1 << 20).unwrap(),
            &["a", "b"],
            &["a", "b"],
        )
        .unwrap();
        let mut writer = own.writer(1).unwrap();
        for i in 0..3u64 {
            let entry = Entry::Write {
                export: 0,
                offset: i * 512,
                data: &[1; 512],
            };
            writer
                .appender
                .append(&entry, BackPressure::default())
                .unwrap();
        }
        let mut control_writer = control.writer().unwrap();
        control_writer
            .set_owner(
                0,
                Owner {
                    node: Some(1),
                    epoch: 5,
                },
            )
            .unwrap();
        let mut replays = partner.writer(2).unwrap().replays;
        let ownership = Ownership {
            control: control.clone(),
            node: 0,
            regions: vec![own.clone(), partner.clone()],
        };
        let mut decide = || {
            discard_replayed_log(
                &own,
                std::slice::from_ref(&partner),
                Some(&ownership),
                &mut writer.flushed,
            )
        };
        let kept = OldLog::Quarantined {
            flushed_seq: 0,
            through_seq: 3,
            owner_epoch: 5,
            holder: Some(1),
        };

        assert_eq!(decide().unwrap(), kept, "no replay said anything yet");
        let mut replay = Replay {
            epoch: 5,
            status: ReplayStatus::Replaying,
            first_seq: 1,
            last_seq: 3,
        };
        replays.publish(0, replay);
        assert_eq!(decide().unwrap(), kept, "the partner still reads the log");
        replay.status = ReplayStatus::Replayed;
        replay.epoch = 4;
        replay.last_seq = 2;
        replays.publish(0, replay);
        assert_eq!(
            decide().unwrap(),
            kept,
            "a replay from an earlier takeover, of an earlier part of the log"
        );
        // A replay at an earlier epoch that reached every old record: the identity moved on
        // from the node that replayed it (a chained takeover).
        replay.last_seq = 3;
        replays.publish(0, replay);
        assert_eq!(decide().unwrap(), OldLog::Ours);
        assert_eq!(
            own.flushed().unwrap(),
            own.head().unwrap(),
            "the replayed log is discarded"
        );
    }
}
