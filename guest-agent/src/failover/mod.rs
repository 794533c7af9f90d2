//! The failover monitor: carries out hostd's commands from the control region.
//!
//! hostd writes one command slot per node in the control region; this node polls its slot
//! every [`POLL`] and answers in its own region's ack slot:
//!
//! - `TakeOver(identity)`: for the partner's identity, replay the partner's log (flushed to
//!   head) onto the disks, sync, then serve the partner's export; for this node's own
//!   identity (a giveback), serve it again. New writes go through this node's own log.
//! - `Release(identity)`: stop taking writes for it, disconnect its clients, have the
//!   flusher write and sync everything logged, acknowledge with the flushed seq.
//! - `StopWriting(identity)`: stop taking writes for it and disconnect its clients.
//!
//! Independently of commands, an identity whose owner in the control region is no longer
//! this node is fenced at once (and every write checks the owner before it is logged).

pub mod replay;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm::node::{Ack, AckWriter, ack_status};
use shm::{Command, CommandKind, ControlRegion, NodeRegion, TakeOverArgument};

use crate::export::ExportRegistry;
use crate::nbd::{Server, ServerConfig};
use crate::nvram::{Nvram, NvramExport};

/// How often the command slot is read. A read is two cache lines; polling keeps takeover
/// latency independent of the heartbeat interval.
pub const POLL: Duration = Duration::from_millis(2);
/// How long a release may wait for the flusher to write the log.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// An identity this node can serve: its own, or its partner's.
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
    pub partner: Option<NodeRegion>,
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
}

impl FailoverMonitor {
    /// Polls the command slot and the owners until the process ends.
    pub fn run(mut self) {
        loop {
            if let Some(command) = self.control.command(self.node_id as usize)
                && command.seq > self.handled
            {
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
            }
            self.fence_lost_identities();
            std::thread::sleep(POLL);
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
            // A command hostd gave an earlier run of this agent, or a claim hostd withdrew
            // since: the control region's owner is the newest word, and it is not this
            // node (at this command's epoch or before).
            let owner = self.control.owner(identity as usize);
            let current =
                owner.is_some_and(|o| o.node == Some(self.node_id) && o.epoch <= command.epoch);
            if !current {
                log::warn!(
                    "command {} (take over identity {identity} at epoch {}) is stale: the control region says {owner:?}; not acting on it",
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
                &mut ack,
            ),
            CommandKind::Release => self.release(identity, &mut ack),
            CommandKind::StopWriting => self.stop_writing(identity),
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

    fn take_over(
        &mut self,
        identity: u32,
        argument: TakeOverArgument,
        ack: &mut Ack,
    ) -> Result<(), String> {
        let volume = Arc::clone(self.export(identity)?.volume());
        // Pages cached while the other node owned this disk are stale.
        volume.disk.drop_cache().map_err(|e| {
            format!(
                "cannot drop the cache of {}: {e}",
                volume.disk.path().display()
            )
        })?;
        if argument.replay_partner_log {
            let partner = self
                .partner
                .as_ref()
                .ok_or("there is no partner region to replay")?;
            let volumes = self
                .identities
                .iter()
                .map(|(id, i)| (*id, Arc::clone(i.export.volume())))
                .collect();
            // What this node serves already must not get the partner's older records.
            let served = self
                .identities
                .iter()
                .filter(|(id, i)| **id != identity && i.export.volume().writable())
                .map(|(id, _)| *id)
                .collect();
            let replayed = replay::replay(partner, &volumes, &served).map_err(|e| e.to_string())?;
            log::info!(
                "replayed {} records ({} bytes) of {}'s log, seq {}..={}",
                replayed.records,
                replayed.bytes,
                partner.header().name,
                replayed.first_seq,
                replayed.last_seq
            );
            if let Some(why) = &replayed.stopped {
                log::error!(
                    "replay of {}'s log incomplete: {why}",
                    partner.header().name
                );
                ack.status = ack_status::PARTIAL_REPLAY;
            }
            ack.first_seq = replayed.first_seq;
            ack.last_seq = replayed.last_seq;
        }
        if let (Some(ip), port @ 1..) = (self.listen_ip, argument.port) {
            let registry = Arc::clone(&self.registry);
            let config = self.server_config.clone();
            let entry = self.entry(identity)?;
            if entry.listener.is_none() {
                entry.listener = Some(listen(SocketAddr::new(ip, port), &registry, &config)?);
            }
        }
        self.nvram
            .set_writable(&volume, true)
            .map_err(|e| e.to_string())?;
        let export = Arc::clone(self.export(identity)?);
        self.registry.insert(export);
        log::info!("serving export {}", volume.name);
        Ok(())
    }

    fn release(&mut self, identity: u32, ack: &mut Ack) -> Result<(), String> {
        self.stop_writing(identity)?;
        let flushed = self
            .nvram
            .drain(DRAIN_TIMEOUT)
            .map_err(|e| wire::error_chain::one_line(&e))?;
        // Its listener goes last: clients still connected were cut off above.
        self.entry(identity)?.listener = None;
        ack.last_seq = flushed.seq;
        log::info!(
            "released identity {identity}: log flushed to seq {}",
            flushed.seq
        );
        Ok(())
    }

    fn stop_writing(&mut self, identity: u32) -> Result<(), String> {
        let export = Arc::clone(self.export(identity)?);
        let volume = export.volume();
        self.nvram
            .set_writable(volume, false)
            .map_err(|e| e.to_string())?;
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
        log::info!(
            "stopped writing for {}: {cut} client connection(s) closed",
            volume.name
        );
        Ok(())
    }

    /// Fences every identity this node serves but no longer owns.
    fn fence_lost_identities(&mut self) {
        let lost: Vec<u32> = self
            .identities
            .iter()
            .filter(|(id, entry)| {
                entry.export.volume().writable()
                    && self
                        .control
                        .owner(**id as usize)
                        .is_some_and(|o| o.node != Some(self.node_id))
            })
            .map(|(id, _)| *id)
            .collect();
        for identity in lost {
            log::warn!(
                "identity {identity} is owned by another node now (epoch {}): fencing it here",
                self.control.epoch()
            );
            if let Err(error) = self.stop_writing(identity) {
                log::error!("cannot fence identity {identity}: {error}");
            }
            if let Some(entry) = self.identities.get_mut(&identity) {
                entry.listener = None;
            }
        }
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
