//! The failover monitor: carries out hostd's commands from the control region.
//!
//! hostd writes one command slot per node in the control region; this node polls its slot
//! every [`POLL`] (every [`IDLE_POLL`] while nothing goes on) and answers in its own
//! region's ack slot:
//!
//! - `TakeOver(identity)`: with the replay flag (the holder was fenced), scan the holder's
//!   log and serve the identity at once over a layer that reads the holder's records in
//!   place, while they are replayed onto the disks in the background ([`replay`]); without
//!   it (a planned move or a giveback: the log was flushed), serve it. New writes go
//!   through this node's own log.
//! - `Release(identity)`: stop taking writes for it, disconnect its clients, have the
//!   flusher write and sync everything logged, acknowledge with the flushed seq.
//! - `StopWriting(identity)`: stop taking writes for it and disconnect its clients.
//! - `Negotiate(identity, holder)`: before a planned takeover, ask the holder over the
//!   interconnect whether it gives the identity up; acknowledge with its answer (a
//!   holder's own answer comes from its [`veto`]).
//!
//! Independently of commands, an identity whose owner is no longer this node is fenced at
//! once (and every write checks the owner before it is logged and after). The owner is the
//! newest word of the control region and of the claims published in the regions this node
//! maps ([`shm::newest_owner`]): a peer that took an identity over while hostd was away
//! ([`without_hostd`]) says so in its own region.

pub mod quarantine;
pub mod replay;
pub mod veto;
pub mod without_hostd;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm::node::{Ack, AckWriter, ack_status};

use crate::interconnect::negotiation::{Answer, NegotiationClient};
use shm::{
    Command, CommandKind, ControlRegion, NodeRegion, Owner, StopReason, StoppedServing,
    StoppedServingWriter, TakeOverArgument,
};

use crate::export::ExportRegistry;
use crate::nbd::{Server, ServerConfig};
use crate::nvram::volume::Volume;
use crate::nvram::{Nvram, NvramExport};
use crate::service_ip::ServiceAddresses;
use quarantine::{Quarantine, old_log_replayed};
use replay::{ReplayBook, ReplayJob};

/// How often the command slot is read while something is going on: for 2 s after a
/// command, and while a peer's heartbeat stands still (a takeover may come). A read is
/// two cache lines; polling keeps takeover latency independent of the heartbeat interval.
pub const POLL: Duration = Duration::from_millis(2);
/// How often it is read otherwise. Each wakeup of an idle TCG guest costs the host a
/// quarter of a millisecond of CPU or more: polling every 2 ms took 12 % of a core per guest.
pub const IDLE_POLL: Duration = Duration::from_millis(25);
/// How long a negotiation waits for the holder's answer (the connection manager gives up
/// on it a little before).
const NEGOTIATION_WAIT: Duration = Duration::from_secs(3);
/// How long the monitor polls at [`POLL`] after a command.
const BUSY_FOR: Duration = Duration::from_secs(2);
/// A peer heartbeat that has not moved for this long (2.5 default intervals) makes the
/// monitor poll at [`POLL`] until it moves again.
const PEER_QUIET: Duration = Duration::from_millis(250);
/// For how long a quiet peer keeps the monitor polling fast: a takeover follows within
/// the heartbeat timeout, or not at all (a peer that stays dead must not cost this node
/// the fast polling's CPU for good).
const QUIET_WATCH: Duration = Duration::from_secs(30);
/// How long a release may wait for the flusher to write the log.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// An identity this node can serve: its own, or a peer's.
#[derive(Debug)]
pub struct Identity {
    pub export: Arc<NvramExport>,
    /// Process mode: the listener serving the identity's own address, while held here.
    listener: Option<Server>,
}

impl Identity {
    pub fn new(export: Arc<NvramExport>) -> Self {
        Self {
            export,
            listener: None,
        }
    }

    /// Process mode: the server listening on this identity's address.
    pub fn with_listener(export: Arc<NvramExport>, listener: Server) -> Self {
        Self {
            export,
            listener: Some(listener),
        }
    }
}

/// Everything the monitor acts on.
#[derive(Debug)]
pub struct FailoverMonitor {
    pub node_id: u32,
    pub control: ControlRegion,
    /// The regions of the nodes whose identities this node may take over, by node id.
    pub peers: BTreeMap<u32, NodeRegion>,
    pub nvram: Arc<Nvram>,
    pub registry: Arc<ExportRegistry>,
    /// The server on the guest's NBD port, which serves whatever the registry holds
    /// (in process mode, listeners belong to identities instead).
    pub server: Option<Arc<Server>>,
    /// By identity index (= the export id).
    pub identities: BTreeMap<u32, Identity>,
    pub ack: AckWriter,
    /// Seq of the last command handled (from the ack slot, so a restart does not redo it).
    pub handled: u64,
    /// Process mode: the address to listen on when a command names a port to take over.
    pub listen_ip: Option<IpAddr>,
    /// How servers started for a taken-over identity run.
    pub server_config: ServerConfig,
    /// This node's replays of other nodes' logs.
    pub replays: ReplayBook,
    /// This node's own old records, while another node may still be replaying them.
    pub quarantine: Option<Quarantine>,
    /// A replay to start once the command that needs it is acknowledged: the client waits
    /// for the acknowledgement, not for the replay.
    pub pending_replay: Option<ReplayJob>,
    /// A released volume whose cached pages go once the release is acknowledged (see
    /// [`FailoverMonitor::release`]).
    pub pending_cache_drop: Option<Arc<Volume>>,
    /// The identities' service IPs (bridge mode): held while served here.
    pub addresses: Box<dyn ServiceAddresses>,
    /// Where the monitor says why it stopped serving an identity (hostd shows it).
    pub stopped: StoppedServingWriter,
    /// Asks holders over the interconnect before a planned takeover; None: no interconnect.
    pub negotiation: Option<NegotiationClient>,
    /// Takeovers while hostd is away; None: no coordinator (`--coordinator`).
    pub without_hostd: Option<without_hostd::WithoutHostd>,
}

impl FailoverMonitor {
    /// Polls the command slot and the owners until the process ends.
    pub fn run(mut self) {
        let mut busy_since = Instant::now();
        // Per peer: its last heartbeat counter and since when it has stood there.
        let mut peer_beats: BTreeMap<u32, (Option<u64>, Instant)> = BTreeMap::new();
        loop {
            for (id, peer) in &self.peers {
                let beat = peer.heartbeat().map(|h| h.counter);
                let seen = peer_beats.entry(*id).or_insert((beat, Instant::now()));
                if beat != seen.0 {
                    *seen = (beat, Instant::now());
                }
            }
            if let Some(command) = self.control.command(self.node_id as usize)
                && command.seq > self.handled
            {
                busy_since = Instant::now();
                let started = Instant::now();
                log::info!("command {}: {:?}", command.seq, command.kind);
                let ack = self.handle(&command);
                log::info!(
                    "command {} done in {:?}: status {}, seq {}..={}",
                    command.seq,
                    started.elapsed(),
                    ack.status,
                    ack.first_seq,
                    ack.last_seq
                );
                self.ack.acknowledge(ack);
                self.handled = command.seq;
                // Whatever became of the command: the layers it put in place go only when
                // their replay ends.
                if let Some(job) = self.pending_replay.take() {
                    job.start();
                }
                if let Some(volume) = self.pending_cache_drop.take() {
                    drop_cache(&volume);
                }
            }
            self.fence_lost_identities();
            self.end_quarantine_if_replayed();
            self.act_without_hostd(Instant::now());
            let peer_quiet = peer_beats.values().any(|(beat, since)| {
                beat.is_some() && (PEER_QUIET..PEER_QUIET + QUIET_WATCH).contains(&since.elapsed())
            });
            let busy = busy_since.elapsed() < BUSY_FOR || peer_quiet;
            std::thread::sleep(if busy { POLL } else { IDLE_POLL });
        }
    }

    fn handle(&mut self, command: &Command) -> Ack {
        let mut ack = Ack {
            command_seq: command.seq,
            epoch: command.epoch,
            status: ack_status::OK,
            first_seq: 0,
            last_seq: 0,
        };
        let identity = command.identity as u32;
        if !self.identities.contains_key(&identity) {
            log::error!(
                "command {} names identity {identity}, which this node has no disk for",
                command.seq
            );
            ack.status = ack_status::UNKNOWN;
            return ack;
        }
        if command.kind == CommandKind::TakeOver {
            if let Some(ejection) = self.ejection() {
                log::warn!(
                    "command {} (take over identity {identity}) refused: this node ejected itself ({}) and waits for hostd to restart it",
                    command.seq,
                    ejection.reason.describe()
                );
                ack.status = ack_status::FAILED;
                return ack;
            }
            // A command hostd gave an earlier run of this agent, or a claim hostd withdrew
            // since: the newest owner is not this node (at this command's epoch or before).
            let owner = self.owner(identity);
            let current =
                owner.is_some_and(|o| o.node == Some(self.node_id) && o.epoch <= command.epoch);
            if !current {
                log::warn!(
                    "command {} (take over identity {identity} at epoch {}) is stale: the owner is {owner:?}; not acting on it",
                    command.seq,
                    command.epoch
                );
                ack.status = ack_status::FAILED;
                return ack;
            }
        }
        let result = match command.kind {
            CommandKind::TakeOver => self.take_over(
                identity,
                TakeOverArgument::from_word(command.argument),
                command.epoch,
                &mut ack,
            ),
            CommandKind::Release => self.release(identity, &mut ack),
            CommandKind::StopWriting => self.stop_writing(identity),
            CommandKind::Negotiate => {
                self.negotiate(identity, command.argument, &mut ack);
                Ok(())
            }
            CommandKind::None | CommandKind::Unknown(_) => {
                ack.status = ack_status::UNKNOWN;
                Ok(())
            }
        };
        if let Err(error) = result {
            log::error!(
                "command {} ({:?}) failed: {error}",
                command.seq,
                command.kind
            );
            ack.status = ack_status::FAILED;
        }
        ack
    }

    /// Asks node `holder` whether it gives `identity` up; the answer goes in `ack`.
    fn negotiate(&mut self, identity: u32, holder: u64, ack: &mut Ack) {
        let answer = match (&self.negotiation, u16::try_from(holder)) {
            (Some(client), Ok(holder)) => client.ask(holder, identity, NEGOTIATION_WAIT),
            (None, _) => Answer::Unreachable("this node runs no interconnect".into()),
            (_, Err(_)) => Answer::Unreachable(format!("node {holder} is no node")),
        };
        match answer {
            Answer::Agreed => log::info!("node {holder} gives identity {identity} up"),
            Answer::Refused(refusal) => {
                log::warn!(
                    "node {holder} refuses to give identity {identity} up: {}",
                    refusal.describe()
                );
                ack.status = ack_status::REFUSED;
                ack.first_seq = refusal.to_word();
            }
            Answer::Unreachable(why) => {
                log::warn!("cannot ask node {holder} about identity {identity}: {why}");
                ack.status = ack_status::UNREACHABLE;
            }
        }
    }

    fn take_over(
        &mut self,
        identity: u32,
        argument: TakeOverArgument,
        epoch: u64,
        ack: &mut Ack,
    ) -> Result<(), String> {
        let volume = Arc::clone(self.export(identity)?.volume());
        let dead = match argument.replay_from {
            Some(node) => Some(self.peers.get(&node).cloned().ok_or_else(|| {
                format!("node {node}'s region is not mapped here, so its log cannot be replayed")
            })?),
            None => None,
        };
        // This node's old log, kept since it started, is settled first.
        let mut drain_own_log = false;
        if let Some(quarantine) = self.quarantine.take() {
            if self.quarantine_replayed(&quarantine) {
                quarantine.discard(&self.nvram);
                drain_own_log = true;
            } else if argument.replay_from.is_some() && argument.replay_from == quarantine.holder {
                // The node that took this node's identity over died before it finished
                // replaying this node's log: no one else will apply it, and it is older
                // than anything in the dead holder's log, for every identity.
                quarantine.keep();
                drain_own_log = true;
            } else if identity != self.node_id && volume.overlay.read().is_ok_and(|o| o.is_empty())
            {
                // Another identity, of which the old log holds nothing: the quarantine
                // concerns only the old records, which stay aside.
                self.quarantine = Some(quarantine);
            } else {
                self.quarantine = Some(quarantine);
                return Err(format!(
                    "this node's log up to seq {} waits for the node that took its identity over to finish replaying it",
                    self.quarantine.as_ref().map_or(0, |q| q.through_seq)
                ));
            }
        }
        // This node's own unflushed records for the export are older than the dead
        // holder's (it held the identity before): they go to the disk first.
        drain_own_log |= dead.is_some() && !volume.overlay.read().map_or(true, |o| o.is_empty());
        if drain_own_log {
            // Also makes a discard durable (the flushed cursor passes the discarded
            // records) before this node serves: else a crash of it would have the next
            // taker replay them again.
            self.nvram
                .drain(DRAIN_TIMEOUT)
                .map_err(|e| wire::error_chain::one_line(&e))?;
        }
        // Pages cached while the other node owned this disk are stale (few are left: a
        // release drops them too).
        volume.disk.drop_cache().map_err(|e| {
            format!(
                "cannot drop the cache of {}: {e}",
                volume.disk.path().display()
            )
        })?;
        if let Some(dead) = &dead {
            self.apply_older_logs(dead, epoch)?;
            let scanned = self.serve_dead_log(dead, &volume, epoch)?;
            if scanned.stopped {
                ack.status = ack_status::PARTIAL_REPLAY;
            }
            ack.first_seq = scanned.first_seq;
            ack.last_seq = scanned.last_seq;
        }
        if let (Some(ip), port @ 1..) = (self.listen_ip, argument.port) {
            let registry = Arc::clone(&self.registry);
            let config = self.server_config.clone();
            let entry = self.entry(identity)?;
            if entry.listener.is_none() {
                entry.listener = Some(listen(SocketAddr::new(ip, port), &registry, &config)?);
            }
        }
        // The replay and the drain above may have taken long: hostd may have given the
        // identity to another node meanwhile (its wait for this acknowledgement ended).
        // Serving it, or holding its address, now would make two holders.
        let owner = self.owner(identity);
        if !owner.is_some_and(|o| o.node == Some(self.node_id) && o.epoch <= epoch) {
            return Err(format!(
                "identity {identity} went to another owner ({owner:?}) while this node was taking it over"
            ));
        }
        self.nvram
            .set_writable(&volume, true)
            .map_err(|e| e.to_string())?;
        let export = Arc::clone(self.export(identity)?);
        self.registry.insert(export);
        // Clients find the identity here once its address is: it is served by then.
        if let Err(error) = self.addresses.hold(&volume.name) {
            if let Err(undo) = self.stop_writing(identity) {
                log::error!("cannot stop serving {} again: {undo}", volume.name);
            }
            return Err(format!(
                "cannot hold {}'s service IP: {}",
                volume.name,
                wire::error_chain::one_line(&error)
            ));
        }
        log::info!("serving export {}", volume.name);
        Ok(())
    }

    /// A chained takeover: `dead` had taken identities over from other nodes and died
    /// before its replay of their logs had finished (its region's replay mark for such a
    /// log is not `replayed`). Those logs are older than `dead`'s own records, so they go
    /// to the disks first, here and now, for every identity `dead` held (those this node
    /// takes over next, too: nobody serves them meanwhile); `dead`'s records are then
    /// served on top. This node then says in its region that it replayed those logs, so
    /// their nodes, once restarted, may forget them.
    fn apply_older_logs(&mut self, dead: &NodeRegion, epoch: u64) -> Result<(), String> {
        let dead_id = dead.header().node_id;
        let older: Vec<(NodeRegion, shm::Replay)> = self
            .peers
            .iter()
            .filter(|(id, _)| **id != dead_id)
            .filter_map(|(id, region)| {
                let mark = dead.replay_of(*id)?;
                (mark.status == shm::ReplayStatus::Replaying).then(|| (region.clone(), mark))
            })
            .collect();
        for (region, mark) in older {
            // Its node flushed that far since (it came back and its log was settled): the
            // mark is stale, and there is nothing to apply or to vouch for.
            if region.flushed().is_some_and(|f| f.seq >= mark.last_seq) {
                continue;
            }
            let volumes: Vec<Arc<Volume>> = self
                .identities
                .iter()
                .filter(|(id, entry)| {
                    !entry.export.volume().writable()
                        && self.owner(**id).is_some_and(|o| {
                            o.node == Some(dead_id) || o.node == Some(self.node_id)
                        })
                })
                .map(|(_, entry)| Arc::clone(entry.export.volume()))
                .collect();
            let name = &region.header().name;
            let replayed = replay::replay(&region, &replay::Disks::of(&volumes), mark.last_seq)
                .map_err(|e| {
                    format!(
                        "cannot apply {name}'s log, which {} had not finished replaying: {}",
                        dead.header().name,
                        wire::error_chain::one_line(&e)
                    )
                })?;
            log::warn!(
                "{} died before it finished replaying {name}'s log: applied {} records ({} bytes) of it up to seq {} first{}",
                dead.header().name,
                replayed.records,
                replayed.bytes,
                replayed.last_seq,
                replayed
                    .stopped
                    .as_ref()
                    .map_or(String::new(), |why| format!(" ({why})"))
            );
            let status = if replayed.stopped.is_some() {
                shm::ReplayStatus::Stopped
            } else {
                shm::ReplayStatus::Replayed
            };
            self.replays.record_replayed(
                region.header().node_id,
                shm::Replay {
                    epoch,
                    status,
                    ..mark
                },
            );
        }
        Ok(())
    }

    /// Serves `dead`'s records for `volume` from its region at once and starts replaying
    /// them onto the disk in the background (see [`replay`]).
    fn serve_dead_log(
        &mut self,
        dead: &NodeRegion,
        volume: &Arc<Volume>,
        epoch: u64,
    ) -> Result<ScanSummary, String> {
        let head = self.nvram.region().head().map_or(0, |h| h.seq);
        // Everything this node logs from now on is newer than the dead node's records.
        let hold = self.nvram.hold_flusher(head);
        let scanned =
            replay::scan(dead, volume.export_id, volume.disk.size()).map_err(|e| e.to_string())?;
        let dead_name = &dead.header().name;
        log::info!(
            "serving {} over {} records ({} bytes) of {dead_name}'s log, seq {}..={}, while they are replayed",
            volume.name,
            scanned.records,
            scanned.bytes,
            scanned.first_seq,
            scanned.last_seq
        );
        if let Some(why) = &scanned.stopped {
            log::error!("{dead_name}'s log is served and replayed only in part: {why}");
        }
        let summary = ScanSummary {
            first_seq: scanned.first_seq,
            last_seq: scanned.last_seq,
            stopped: scanned.stopped.is_some(),
        };
        if self.replays.serve_layer(scanned, volume, epoch, hold) {
            self.pending_replay = Some(ReplayJob {
                region: dead.clone(),
                book: self.replays.clone(),
            });
        }
        Ok(summary)
    }

    /// Ends the quarantine of this node's old records once the node holding its identity
    /// says it has replayed them.
    fn end_quarantine_if_replayed(&mut self) {
        if let Some(quarantine) = self.quarantine.take() {
            if self.quarantine_replayed(&quarantine) {
                quarantine.discard(&self.nvram);
                // Durable before anything else happens: the discarded records are only
                // skipped, so this is quick.
                if let Err(error) = self.nvram.drain(DRAIN_TIMEOUT) {
                    log::error!(
                        "cannot release the discarded log: {}",
                        wire::error_chain::one_line(&error)
                    );
                }
            } else {
                self.quarantine = Some(quarantine);
            }
        }
    }

    /// Whether the peers say they replayed this node's old log: the holder of its identity,
    /// or the node that applied the log after the holder died (a chained takeover).
    fn quarantine_replayed(&self, quarantine: &Quarantine) -> bool {
        let peers: Vec<&NodeRegion> = self.peers.values().collect();
        let current_epoch = self
            .owner(self.node_id)
            .map_or(quarantine.owner_epoch, |o| o.epoch);
        old_log_replayed(
            &peers,
            self.node_id,
            quarantine.owner_epoch,
            current_epoch,
            quarantine.through_seq,
        )
    }

    fn release(&mut self, identity: u32, ack: &mut Ack) -> Result<(), String> {
        // An address this node cannot drop would have two nodes answer for it once the
        // next one takes it: the release fails instead, and this node goes on serving.
        self.drop_address(identity)?;
        self.cut_off(identity)?;
        let flushed = self
            .nvram
            .drain(DRAIN_TIMEOUT)
            .map_err(|e| wire::error_chain::one_line(&e))?;
        // Its listener goes last: clients still connected were cut off above.
        self.entry(identity)?.listener = None;
        ack.last_seq = flushed.seq;
        // A takeover drops the disk's cached pages before it serves, since the other node
        // may have written the disk meanwhile; a node that served the disk for long has many
        // (a TCG guest took about 100 ms for 64 MiB), so they go now, after the
        // acknowledgement, and not when a client waits for a takeover.
        self.pending_cache_drop = Some(Arc::clone(self.export(identity)?.volume()));
        log::info!(
            "released identity {identity}: log flushed to seq {}",
            flushed.seq
        );
        Ok(())
    }

    /// Drops the identity's address and stops serving it (a release, a fence).
    fn stop_writing(&mut self, identity: u32) -> Result<(), String> {
        // New clients must not reach this node while it flushes or after: the address
        // goes first (bridge mode), then the clients.
        if let Err(error) = self.drop_address(identity) {
            log::error!("{error}");
        }
        self.cut_off(identity)
    }

    /// Drops the identity's service IP (bridge mode).
    fn drop_address(&mut self, identity: u32) -> Result<(), String> {
        let name = self.export(identity)?.volume().name.clone();
        self.addresses.drop_address(&name).map_err(|error| {
            format!(
                "cannot drop {name}'s service IP: {}",
                wire::error_chain::one_line(&error)
            )
        })
    }

    /// Cuts the identity's clients off and refuses its writes (its address is gone).
    fn cut_off(&mut self, identity: u32) -> Result<(), String> {
        let export = Arc::clone(self.export(identity)?);
        let volume = export.volume();
        // Clients are cut off before writes are refused: a write refused now has no
        // connection to answer on, so the client sends it again to the new owner instead of
        // seeing an error (QEMU's NBD driver retries lost connections, not error replies).
        self.registry.remove(&volume.name);
        let mut cut = self
            .server
            .as_ref()
            .map_or(0, |server| server.disconnect_export(&volume.name));
        for entry in self.identities.values() {
            if let Some(listener) = &entry.listener {
                cut += listener.disconnect_export(&volume.name);
            }
        }
        self.nvram
            .set_writable(volume, false)
            .map_err(|e| e.to_string())?;
        log::info!(
            "stopped writing for {}: {cut} client connection(s) closed",
            volume.name
        );
        Ok(())
    }

    /// Fences every identity this node serves but no longer owns.
    fn fence_lost_identities(&mut self) {
        let lost: Vec<(u32, Owner)> = self
            .identities
            .iter()
            .filter(|(_, entry)| entry.export.volume().writable())
            .filter_map(|(id, _)| {
                let owner = self.owner(*id)?;
                (owner.node != Some(self.node_id)).then_some((*id, owner))
            })
            .collect();
        // The newest generation of a peer's claim that took an identity from this node.
        let mut claimed = None;
        for (identity, owner) in lost {
            let reason = if self.nvram.take_disk_error(identity) {
                StopReason::StorageRefused
            } else {
                StopReason::Reassigned
            };
            let by_claim = self.control.owner(identity as usize) != Some(owner);
            log::warn!(
                "identity {identity} is owned by node {} now ({} {}): fencing it here; {}",
                owner.node.map_or("none".to_owned(), |n| n.to_string()),
                if by_claim {
                    "its claim at generation"
                } else {
                    "hostd's record at epoch"
                },
                owner.epoch,
                reason.describe()
            );
            self.stopped.publish(StoppedServing {
                identity,
                reason,
                epoch: owner.epoch.max(self.control.epoch()),
                unix_ns: wire::time::now_unix_us().saturating_mul(1000),
            });
            if let Err(error) = self.stop_writing(identity) {
                log::error!("cannot fence identity {identity}: {error}");
            }
            if let Some(entry) = self.identities.get_mut(&identity) {
                entry.listener = None;
            }
            if by_claim {
                claimed = claimed.max(Some(owner.epoch));
            }
        }
        if let Some(generation) = claimed {
            self.ejected_by_claim(generation);
        }
    }

    /// Who owns `identity`: the newest of the control region's record and the claims in
    /// this node's region and its peers'.
    fn owner(&self, identity: u32) -> Option<Owner> {
        let regions = std::iter::once(self.nvram.region()).chain(self.peers.values());
        shm::newest_owner(&self.control, regions, identity)
    }

    fn entry(&mut self, identity: u32) -> Result<&mut Identity, String> {
        self.identities
            .get_mut(&identity)
            .ok_or_else(|| format!("identity {identity} has no disk here"))
    }

    fn export(&self, identity: u32) -> Result<&Arc<NvramExport>, String> {
        self.identities
            .get(&identity)
            .map(|i| &i.export)
            .ok_or_else(|| format!("identity {identity} has no disk here"))
    }
}

/// Drops a released volume's cached pages; a failure only costs the next takeover the time.
fn drop_cache(volume: &Volume) {
    if let Err(error) = volume.disk.drop_cache() {
        log::warn!(
            "cannot drop the cache of {}: {error}",
            volume.disk.path().display()
        );
    }
}

/// What a takeover's acknowledgement says of the scan.
#[derive(Debug, Clone, Copy)]
struct ScanSummary {
    first_seq: u64,
    last_seq: u64,
    stopped: bool,
}

/// Listens on a port just released by a fenced process (process mode), retrying briefly
/// while the kernel lets go of it.
fn listen(
    addr: SocketAddr,
    registry: &Arc<ExportRegistry>,
    config: &ServerConfig,
) -> Result<Server, String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => {
                return Server::spawn_with(listener, Arc::clone(registry), config.clone())
                    .map_err(|e| format!("cannot serve on {addr}: {e}"));
            }
            Err(error) if Instant::now() >= deadline => {
                return Err(format!("cannot listen on {addr}: {error}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use shm::control::Owner;

    use crate::service_ip::double::Recorded;
    use shm::{Access, BackPressure, Entry, Mapping, NodeWriter, Replay, ReplayStatus};

    use super::*;
    use crate::export::Export;
    use crate::nvram::flusher::{Flusher, FlusherConfig, Release};
    use crate::nvram::volume::Disk;

    const DISK: usize = 64 << 10;
    /// The identity taken over and given back: node a's.
    const A: u32 = 0;

    fn write(writer: &mut NodeWriter, offset: u64, byte: u8) {
        let data = [byte; 4096];
        let entry = Entry::Write {
            export: A,
            offset,
            data: &data,
        };
        writer
            .appender
            .append(&entry, BackPressure::default())
            .unwrap();
    }

    pub(super) fn region(dir: &Path, id: u32, name: &str) -> NodeRegion {
        let path = dir.join(format!("{name}.region"));
        NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), id, name).unwrap()
    }

    /// Node a restarted while b holds a's identity (epoch 5), with a's old records in its
    /// log: blocks 0 and 1 hold 1s in a's log; b's log (b died, or still replays) holds
    /// 2s for block 1 and 3s for block 2. Returns a's monitor (its flusher running) and b's
    /// replay writer.
    struct Restarted {
        dir: tempfile::TempDir,
        monitor: FailoverMonitor,
        b_replays: shm::ReplayWriter,
        /// What the monitor did with the service IPs.
        addresses: Recorded,
        _flusher: Flusher,
    }

    impl Restarted {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("a.img"), vec![0u8; DISK]).unwrap();
            std::fs::write(dir.path().join("b.img"), vec![0u8; DISK]).unwrap();
            let control = ControlRegion::format(
                Mapping::create_file(&dir.path().join("control"), 1 << 20).unwrap(),
                &["a", "b"],
                &["a", "b"],
            )
            .unwrap();
            let mut control_writer = control.writer().unwrap();
            control_writer.set_epoch(5);
            control_writer
                .set_owner(
                    A as usize,
                    Owner {
                        node: Some(1),
                        epoch: 5,
                    },
                )
                .unwrap();
            let own = region(dir.path(), 0, "a");
            let b = region(dir.path(), 1, "b");
            let mut a_writer = own.writer(1).unwrap();
            write(&mut a_writer, 0, 1);
            write(&mut a_writer, 4096, 1);
            let mut b_writer = b.writer(2).unwrap();
            write(&mut b_writer, 4096, 2);
            write(&mut b_writer, 8192, 3);
            drop(a_writer);
            // a's agent starts again on its region.
            let own = NodeRegion::open(
                Mapping::open(&dir.path().join("a.region"), Access::ReadWrite).unwrap(),
            )
            .unwrap();
            let partner = NodeRegion::open(
                Mapping::open(&dir.path().join("b.region"), Access::ReadOnly).unwrap(),
            )
            .unwrap();
            let writer = own.writer(3).unwrap();
            let nvram = Nvram::new(own.clone(), writer.appender, BackPressure::default());
            let mut identities = BTreeMap::new();
            for (id, name) in [(0, "a"), (1, "b")] {
                let disk = Disk::open(&dir.path().join(format!("{name}.img"))).unwrap();
                let export = nvram.add_volume(Volume::with_access(id, name, disk, false));
                identities.insert(id, Identity::new(export));
            }
            nvram.recover().unwrap();
            let (flushed, head) = own.log_cursors().unwrap();
            let quarantine = Quarantine {
                hold: nvram.hold_flusher(flushed.seq),
                through_seq: head.seq,
                owner_epoch: 5,
                holder: Some(1),
            };
            let flusher = Flusher::spawn(
                Arc::clone(&nvram),
                writer.flushed,
                writer.synced,
                FlusherConfig {
                    release: Release::Written,
                    ..FlusherConfig::default()
                },
            )
            .unwrap();
            let addresses = Recorded::default();
            let monitor = FailoverMonitor {
                node_id: 0,
                control,
                peers: [(1, partner)].into(),
                nvram,
                registry: Arc::new(ExportRegistry::new()),
                server: None,
                identities,
                ack: writer.ack,
                handled: 0,
                listen_ip: None,
                server_config: ServerConfig::default(),
                replays: ReplayBook::new(writer.replays),
                quarantine: Some(quarantine),
                pending_replay: None,
                pending_cache_drop: None,
                addresses: Box::new(addresses.clone()),
                stopped: writer.stopped,
                negotiation: None,
                without_hostd: None,
            };
            Self {
                dir,
                monitor,
                b_replays: b_writer.replays,
                addresses,
                _flusher: flusher,
            }
        }

        /// hostd moves identity a to b at `epoch` (this node finds it lost).
        fn hostd_gives_a_to_b_at(&self, epoch: u64) {
            let mut control = self.monitor.control.writer().unwrap();
            control.set_epoch(epoch);
            let owner = Owner {
                node: Some(1),
                epoch,
            };
            control.set_owner(A as usize, owner).unwrap();
        }

        /// b says where its replay of a's log stands.
        fn b_says(&mut self, status: ReplayStatus) {
            self.b_replays.publish(
                0,
                Replay {
                    epoch: 5,
                    status,
                    first_seq: 1,
                    last_seq: 2,
                },
            );
        }

        /// hostd gives identity a to node a at epoch 6 and tells it to take it over.
        fn take_over(&mut self, replay: bool) -> Ack {
            let mut control_writer = self.monitor.control.writer().unwrap();
            control_writer.set_epoch(6);
            control_writer
                .set_owner(
                    A as usize,
                    Owner {
                        node: Some(0),
                        epoch: 6,
                    },
                )
                .unwrap();
            let command = Command {
                seq: 1,
                kind: CommandKind::TakeOver,
                identity: u64::from(A),
                epoch: 6,
                argument: TakeOverArgument {
                    replay_from: replay.then_some(1),
                    port: 0,
                }
                .to_word(),
            };
            let ack = self.monitor.handle(&command);
            if let Some(job) = self.monitor.pending_replay.take() {
                job.start();
            }
            ack
        }

        /// Blocks 0, 1 and 2 of export a, as its clients read them.
        fn blocks(&self) -> Vec<u8> {
            let export = &self.monitor.identities[&A].export;
            (0..3)
                .map(|block| {
                    let mut buf = [0u8; 4096];
                    export.read(block * 4096, &mut buf).unwrap();
                    assert!(buf.iter().all(|b| *b == buf[0]), "block {block} is torn");
                    buf[0]
                })
                .collect()
        }

        fn disk_blocks(&self) -> Vec<u8> {
            let disk = std::fs::read(self.dir.path().join("a.img")).unwrap();
            (0..3).map(|block| disk[block * 4096]).collect()
        }

        fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// b finished replaying a's log (and may have written newer data over it since): a
    /// forgets its old records, and never writes them.
    #[test]
    fn an_old_log_replayed_by_the_taker_is_discarded() {
        let mut node = Restarted::start();
        node.monitor.end_quarantine_if_replayed();
        assert!(node.monitor.quarantine.is_some(), "b has said nothing yet");
        node.b_says(ReplayStatus::Replaying);
        node.monitor.end_quarantine_if_replayed();
        assert!(node.monitor.quarantine.is_some(), "b still reads a's log");
        node.b_says(ReplayStatus::Replayed);
        node.monitor.end_quarantine_if_replayed();
        assert!(node.monitor.quarantine.is_none());
        let region = node.monitor.nvram.region();
        assert_eq!(region.flushed(), region.head(), "the discard is durable");
        assert_eq!(
            node.disk_blocks(),
            [0, 0, 0],
            "a's old records never reach the disk"
        );
        // A giveback then serves what b left on the disk.
        let ack = node.take_over(false);
        assert_eq!(ack.status, ack_status::OK);
        assert_eq!(node.blocks(), [0, 0, 0]);
    }

    /// The node serving an identity holds its service IP; a release and a fence drop it,
    /// and a takeover that fails holds nothing.
    #[test]
    fn the_server_of_an_identity_holds_its_address() {
        let mut node = Restarted::start();
        node.b_says(ReplayStatus::Replaying);
        assert_eq!(node.take_over(false).status, ack_status::FAILED);
        assert!(node.addresses.take().is_empty(), "nothing held");
        node.b_says(ReplayStatus::Replayed);
        assert_eq!(node.take_over(false).status, ack_status::OK);
        assert_eq!(node.addresses.take(), ["hold a"]);
        let release = Command {
            seq: 2,
            kind: CommandKind::Release,
            identity: u64::from(A),
            epoch: 6,
            argument: 0,
        };
        assert_eq!(node.monitor.handle(&release).status, ack_status::OK);
        assert_eq!(node.addresses.take(), ["drop a"]);
        assert!(!node.monitor.identities[&A].export.volume().writable());
        // Another node owns it now: the fence drops the address too.
        assert_eq!(node.take_over(false).status, ack_status::OK);
        node.addresses.take();
        node.hostd_gives_a_to_b_at(7);
        node.monitor.fence_lost_identities();
        assert_eq!(node.addresses.take(), ["drop a"]);
    }

    /// A node that finds its identity owned elsewhere stops serving it and says why in its
    /// region: the storage's refusal when its disk refused a write first.
    #[test]
    fn a_lost_identity_is_fenced_with_its_reason_in_the_region() {
        let mut node = Restarted::start();
        node.b_says(ReplayStatus::Replayed);
        assert_eq!(node.take_over(false).status, ack_status::OK);
        assert_eq!(node.monitor.nvram.region().stopped_serving(), None);
        node.monitor.nvram.note_disk_error(A);
        node.hostd_gives_a_to_b_at(7);
        node.monitor.fence_lost_identities();
        assert!(!node.monitor.identities[&A].export.volume().writable());
        let stopped = node.monitor.nvram.region().stopped_serving().unwrap();
        assert_eq!(stopped.identity, A);
        assert_eq!(stopped.reason, shm::StopReason::StorageRefused);
        assert_eq!(stopped.epoch, 7);
        // The error was taken: the next loss without one is a plain reassignment.
        assert!(!node.monitor.nvram.take_disk_error(A));
    }

    /// A takeover whose address cannot be added fails and leaves the identity unserved
    /// here (hostd's next taker gets it).
    #[test]
    fn a_takeover_that_cannot_hold_the_address_serves_nothing() {
        let mut node = Restarted::start();
        node.b_says(ReplayStatus::Replayed);
        node.addresses
            .refuse_holds
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(node.take_over(false).status, ack_status::FAILED);
        assert_eq!(node.addresses.take(), ["hold a", "drop a"]);
        assert!(!node.monitor.identities[&A].export.volume().writable());
        assert!(node.monitor.registry.get("a").is_none());
    }

    /// A giveback that finds a's old log still waiting for b's replay fails, and changes
    /// nothing.
    #[test]
    fn a_giveback_before_the_replay_has_finished_fails() {
        let mut node = Restarted::start();
        node.b_says(ReplayStatus::Replaying);
        let ack = node.take_over(false);
        assert_eq!(ack.status, ack_status::FAILED);
        assert!(node.monitor.quarantine.is_some());
        assert!(!node.monitor.identities[&A].export.volume().writable());
    }

    /// b died before it finished replaying a's log, and a takes its identity back from b
    /// with a replay: a's old records go to the disk first, then b's newer ones on top.
    #[test]
    fn an_old_log_nobody_replayed_is_applied_before_the_dead_takers() {
        for b_started in [false, true] {
            let mut node = Restarted::start();
            if b_started {
                node.b_says(ReplayStatus::Replaying);
            }
            let ack = node.take_over(true);
            assert_eq!(ack.status, ack_status::OK, "b started: {b_started}");
            assert_eq!((ack.first_seq, ack.last_seq), (1, 2));
            assert_eq!(
                node.blocks(),
                [1, 2, 3],
                "served at once, b's records on top"
            );
            let region = node.monitor.nvram.region();
            node.wait_until("the replay and the flush", |n| {
                let replayed = n
                    .monitor
                    .nvram
                    .region()
                    .replay_of(1)
                    .is_some_and(|r| r.status == ReplayStatus::Replayed);
                replayed && region.flushed() == region.head()
            });
            assert_eq!(node.blocks(), [1, 2, 3]);
            assert_eq!(node.disk_blocks(), [1, 2, 3], "b started: {b_started}");
        }
    }

    /// b finished replaying a's log and flushed a newer write over it (4 in block 0), then
    /// died before a's monitor saw the replay end: the takeover from b must discard a's old
    /// records, not apply them over b's newer data.
    #[test]
    fn an_old_log_replayed_before_the_taker_died_is_not_applied_again() {
        let mut node = Restarted::start();
        let mut disk = std::fs::read(node.dir.path().join("a.img")).unwrap();
        disk[..4096].fill(4);
        disk[4096..8192].fill(1);
        std::fs::write(node.dir.path().join("a.img"), disk).unwrap();
        node.b_says(ReplayStatus::Replayed);
        let ack = node.take_over(true);
        assert_eq!(ack.status, ack_status::OK);
        assert_eq!(node.blocks(), [4, 2, 3]);
        let region = node.monitor.nvram.region();
        node.wait_until("the replay and the flush", |n| {
            n.monitor
                .nvram
                .region()
                .replay_of(1)
                .is_some_and(|r| r.status == ReplayStatus::Replayed)
                && region.flushed() == region.head()
        });
        assert_eq!(node.disk_blocks(), [4, 2, 3]);
    }
}

#[cfg(test)]
mod chained_tests;
