//! The connection manager's thread: one [`Manager`] per peer over the node's links, fed
//! from the transports, with the test clients on top and the links' state published.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use interconnect::link::LinkState;
use interconnect::manager::{Event, Manager, ManagerConfig};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use shm::{LinkStateCode, LinkStatus};

use super::clients::{ClientConfig, ClientStats, Clients};
use super::negotiation::{NEGOTIATION_CHANNEL, Negotiator};
use super::transport::Transport;

/// A link as the runtime drives it.
pub struct LinkSlot {
    pub transport: Box<dyn Transport>,
    /// Whether hostd cut this link of this node (process mode's fault injection; a guest's
    /// links are cut at the NIC, which the heartbeats see).
    pub cut: Box<dyn Fn() -> bool + Send>,
}

impl std::fmt::Debug for LinkSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSlot")
            .field("kind", &self.transport.kind())
            .field("cut", &(self.cut)())
            .finish()
    }
}

/// Where the runtime publishes what it sees (the node region; a recording double in tests).
pub trait StatusSink: Send + std::fmt::Debug {
    /// Once at start: how many links, their heartbeat, this start's session.
    fn config(&mut self, links: u16, heartbeat_ms: u64, session: u64);
    fn link(&mut self, peer: u16, link: u16, status: &LinkStatus);
    fn clients(&mut self, peer: u16, stats: &ClientStats);
}

/// The runtime's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub me: u16,
    pub peers: Vec<u16>,
    pub manager: ManagerConfig,
    pub clients: ClientConfig,
    /// How often links without a descriptor (the mailbox) are read.
    pub timer_poll: Duration,
    /// How often the links' state is published.
    pub publish_every: Duration,
}

#[derive(Debug)]
struct Peer {
    manager: Manager,
    clients: Clients,
    /// Each link's state as last seen, and since when (Unix ms).
    since: Vec<(LinkState, u64)>,
}

/// The interconnect of one node.
#[derive(Debug)]
pub struct Runtime {
    settings: Settings,
    links: Vec<LinkSlot>,
    peers: BTreeMap<u16, Peer>,
    sink: Box<dyn StatusSink>,
    next_publish: Instant,
    /// Frames from a node that is not a peer of this one.
    pub strangers: u64,
    inbox: Vec<(u16, Vec<u8>)>,
    /// Takeover negotiation: the failover monitor's questions and the peers'.
    negotiator: Option<Negotiator>,
}

impl Runtime {
    /// A runtime over `links` (network links first, then the mailbox); `session` must grow
    /// with each start of the agent (Unix time in ns).
    pub fn new(
        settings: Settings,
        links: Vec<LinkSlot>,
        mut sink: Box<dyn StatusSink>,
        negotiator: Option<Negotiator>,
        session: u64,
        now: Instant,
    ) -> Self {
        let count = links.len();
        // The mailbox holds little: no bulk on it while another link can carry it.
        let timed: Vec<usize> = (0..count)
            .filter(|&index| links[index].transport.kind() == "mailbox")
            .collect();
        sink.config(
            count as u16,
            settings.manager.link.heartbeat.as_millis() as u64,
            session,
        );
        let unix_ms = wire::time::now_unix_ms();
        let peers = settings
            .peers
            .iter()
            .filter(|&&peer| peer != settings.me)
            .map(|&peer| {
                let mut manager =
                    Manager::new(settings.me, peer, session, count, settings.manager, now);
                manager.open(
                    NEGOTIATION_CHANNEL,
                    interconnect::manager::Class::Control,
                    now,
                );
                for &index in &timed {
                    manager.set_bulk_allowed(index, false);
                }
                let clients = Clients::new(settings.clients, &mut manager, now);
                let since = vec![(LinkState::Opening, unix_ms); count];
                (
                    peer,
                    Peer {
                        manager,
                        clients,
                        since,
                    },
                )
            })
            .collect();
        Self {
            settings,
            links,
            peers,
            sink,
            next_publish: now,
            strangers: 0,
            inbox: Vec::new(),
            negotiator,
        }
    }

    /// One round: what arrived is delivered, what is due is sent. Returns when the next
    /// round is due at the latest.
    pub fn step(&mut self, now: Instant) -> Instant {
        for (index, slot) in self.links.iter_mut().enumerate() {
            if let Some(revived) = slot.transport.revive() {
                log::info!("interconnect: link {index} opened ({})", revived.kind());
                slot.transport = revived;
            }
        }
        for (index, slot) in self.links.iter_mut().enumerate() {
            self.inbox.clear();
            slot.transport.receive(&mut self.inbox);
            if (slot.cut)() {
                continue;
            }
            for (from, bytes) in self.inbox.drain(..) {
                let Some(peer) = self.peers.get_mut(&from) else {
                    self.strangers += 1;
                    continue;
                };
                for (channel, message) in peer.manager.receive(index, &bytes, now) {
                    match (&mut self.negotiator, channel) {
                        (Some(negotiator), NEGOTIATION_CHANNEL) => {
                            negotiator.deliver(from, &mut peer.manager, &message);
                        }
                        _ => peer
                            .clients
                            .deliver(&mut peer.manager, channel, &message, now),
                    }
                }
            }
        }
        let mut next = now + self.settings.manager.link.heartbeat;
        if let Some(negotiator) = &mut self.negotiator {
            for ask in negotiator.take_questions() {
                let manager = self.peers.get_mut(&ask.peer).map(|peer| {
                    let reachable = peer
                        .manager
                        .links()
                        .iter()
                        .any(|link| link.state() == LinkState::Up);
                    (&mut peer.manager, reachable)
                });
                negotiator.send(ask, manager, now);
            }
            negotiator.expire(now);
            if let Some(deadline) = negotiator.next_deadline() {
                next = next.min(deadline);
            }
        }
        for (&id, peer) in &mut self.peers {
            for event in peer.manager.take_events() {
                match event {
                    Event::Link { link, state } => {
                        log::info!(
                            "interconnect: link {link} to node {id} is {}",
                            state.as_str()
                        );
                        if let Some(since) = peer.since.get_mut(usize::from(link)) {
                            *since = (state, wire::time::now_unix_ms());
                        }
                    }
                    Event::Refused { link, why } => {
                        log::warn!("interconnect: link {link} to node {id} refused: {why}");
                    }
                    Event::PeerRestarted => {
                        log::info!("interconnect: node {id} started again");
                        peer.clients.peer_restarted();
                    }
                }
            }
            if let Some(due) = peer.clients.tick(&mut peer.manager, now) {
                next = next.min(due);
            }
            for (link, bytes) in peer.manager.poll(now) {
                if let Some(slot) = self.links.get_mut(link)
                    && !(slot.cut)()
                {
                    slot.transport.send(id, &bytes);
                }
            }
            next = next.min(peer.manager.next_wakeup(now));
        }
        if now >= self.next_publish {
            self.publish();
            self.next_publish = now + self.settings.publish_every;
        }
        // A link without a descriptor (the mailbox) is read on a timer: often while a
        // channel is placed on it, else twice a heartbeat interval, which is enough to
        // keep it up and costs an idle guest little.
        let timed = |index: &usize| self.links[*index].transport.fd().is_none();
        if (0..self.links.len()).any(|index| timed(&index)) {
            let carrying = (0..self.links.len())
                .filter(timed)
                .any(|index| self.peers.values().any(|peer| peer.manager.carries(index)));
            let every = if carrying {
                self.settings.timer_poll
            } else {
                self.settings.manager.link.heartbeat / 2
            };
            next = next.min(now + every);
        }
        next.min(self.next_publish)
    }

    fn publish(&mut self) {
        for (&id, peer) in &self.peers {
            let channels = peer.manager.channels();
            for (index, link) in peer.manager.links().iter().enumerate() {
                let placed = channels.iter().filter(|c| c.link == Some(index as u16));
                let slot = &self.links[index];
                let lost = slot.transport.counters();
                let state = if (slot.cut)() {
                    LinkStateCode::Cut
                } else if link.refused.is_some() {
                    LinkStateCode::Refused
                } else {
                    match link.state() {
                        LinkState::Opening => LinkStateCode::Opening,
                        LinkState::Up => LinkStateCode::Up,
                        LinkState::Degraded => LinkStateCode::Degraded,
                        LinkState::Down => LinkStateCode::Down,
                    }
                };
                let report = LinkStatus {
                    state,
                    rtt_us: link.rtt.map_or(0, |rtt| rtt.as_micros() as u64),
                    bytes_out: link.counters.bytes_out,
                    bytes_in: link.counters.bytes_in,
                    dropped: link.counters.dropped + lost.lost + lost.unknown_source,
                    retransmissions: placed.clone().map(|c| c.retransmissions).sum(),
                    channels: placed.count() as u64,
                    since_unix_ms: peer.since.get(index).map_or(0, |s| s.1),
                };
                self.sink.link(id, index as u16, &report);
            }
            self.sink.clients(id, &peer.clients.stats());
        }
    }

    /// Runs until the process ends: waits for frames or the next round, then steps.
    pub fn run(mut self) {
        let mut next = Instant::now();
        loop {
            let now = Instant::now();
            if now < next {
                let woken = self.negotiator.as_ref().map(Negotiator::fd);
                wait(&self.links, woken, next - now);
            }
            next = self.step(Instant::now());
        }
    }
}

/// Waits until a link's descriptor (or `woken`) is readable or `timeout` passes.
fn wait(links: &[LinkSlot], woken: Option<BorrowedFd<'_>>, timeout: Duration) {
    let fds: Vec<BorrowedFd<'_>> = links
        .iter()
        .filter_map(|slot| slot.transport.fd())
        .chain(woken)
        .collect();
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    // poll(2) counts whole milliseconds: round up, so a round is never early.
    let ms = timeout.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
    if polled.is_empty() {
        std::thread::sleep(timeout);
    } else {
        let _ = poll(&mut polled, PollTimeout::from(ms));
    }
}
