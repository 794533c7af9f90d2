//! The connection manager of one node for one peer: its links, its channels, and which
//! channel travels on which link.
//!
//! Placement: a channel has a class. With two links or more up, bulk channels take the
//! first and control channels the second, so a bulk transfer never queues a control
//! message behind it; with one link up, every channel shares it. A channel leaves a link as
//! soon as the link is no longer up (degraded: two heartbeat intervals of silence) if
//! another is up, and everything it had not got acknowledged goes again on the new link;
//! the receiver drops what it has seen, so each message arrives once, in order. Channels go
//! back when links return. A control channel that sends more than `heavy_bytes_per_s` is
//! treated as bulk (the adaptive balancing: a heavy client leaves the control link).
//!
//! Bad input (bytes that are not a frame, another version, frames for another node, a
//! peer claiming another node's id or link, a stale session's frames) is dropped and
//! counted; another version is also answered with a Refuse that says why.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::channel::{Full, Receiver, Sender};
use crate::frame::{DecodeError, Frame, Kind, MAX_PAYLOAD, VERSION};
use crate::link::{Beat, CAPABILITIES, Link, LinkConfig, LinkState, REQUIRED};

/// What a channel carries, for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Small, latency-bound messages (heartbeats of services, takeover negotiation).
    Control,
    /// Throughput-bound transfers.
    Bulk,
}

/// The manager's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerConfig {
    pub link: LinkConfig,
    /// How long a sent message waits for its acknowledgement before it is sent again.
    pub retransmit: Duration,
    /// Unacknowledged messages a channel may have.
    pub window: usize,
    /// A control channel sending more than this is placed as bulk.
    pub heavy_bytes_per_s: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            link: LinkConfig::default(),
            retransmit: Duration::from_millis(200),
            window: 1024,
            heavy_bytes_per_s: 1 << 20,
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("channel {0} is not open")]
    NoChannel(u16),
    #[error("a message of {len} bytes is over the frame limit of {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("channel {channel}")]
    Full {
        channel: u16,
        #[source]
        source: Full,
    },
}

/// Something operators and clients should hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A link changed state.
    Link { link: u16, state: LinkState },
    /// The peer refused this node on a link, or this node the peer: why.
    Refused { link: u16, why: String },
    /// The peer started again (a new session): every channel starts over.
    PeerRestarted,
}

/// Frames dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Bytes that are not a frame (short, wrong magic or length, bad crc, unknown kind).
    pub malformed: u64,
    /// Frames of another interconnect version.
    pub version: u64,
    /// Frames addressed to another node, or from a node that is not the peer, or claiming
    /// another link than the one they came on.
    pub misaddressed: u64,
    /// Frames of an earlier session of the peer (replayed or late).
    pub stale: u64,
    /// Data for a channel that is not open here.
    pub unknown_channel: u64,
}

#[derive(Debug)]
struct ChannelState {
    class: Class,
    sender: Sender,
    receiver: Receiver,
    link: Option<usize>,
    /// The receiver's acknowledgement moved and has not been sent.
    ack_due: bool,
    /// Bytes queued in the current second, and the rate of the last whole one.
    bytes_this_second: u64,
    second_started: Instant,
    rate: u64,
}

impl ChannelState {
    fn new(class: Class, window: usize, now: Instant) -> Self {
        Self {
            class,
            sender: Sender::new(window),
            receiver: Receiver::new(window as u64),
            link: None,
            ack_due: false,
            bytes_this_second: 0,
            second_started: now,
            rate: 0,
        }
    }

    /// The class placement uses: a heavy control channel counts as bulk.
    fn placed_as(&self, heavy: u64) -> Class {
        if self.rate > heavy {
            Class::Bulk
        } else {
            self.class
        }
    }
}

/// One channel's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelReport {
    pub id: u16,
    pub class: Class,
    pub link: Option<u16>,
    pub in_flight: usize,
    pub retransmissions: u64,
    pub duplicates: u64,
    /// Bytes per second queued over the last whole second.
    pub rate: u64,
}

/// The connection manager of node `me` for peer `peer`.
#[derive(Debug)]
pub struct Manager {
    me: u16,
    peer: u16,
    session: u64,
    config: ManagerConfig,
    start: Instant,
    links: Vec<Link>,
    channels: BTreeMap<u16, ChannelState>,
    peer_session: Option<u64>,
    outbox: Vec<(usize, Frame)>,
    events: Vec<Event>,
    pub dropped: Dropped,
}

impl Manager {
    /// A manager over `links` links; `session` is this start's random id.
    pub fn new(
        me: u16,
        peer: u16,
        session: u64,
        links: usize,
        config: ManagerConfig,
        now: Instant,
    ) -> Self {
        Self {
            me,
            peer,
            session,
            config,
            start: now,
            links: (0..links)
                .map(|i| Link::new(i as u16, config.link))
                .collect(),
            channels: BTreeMap::new(),
            peer_session: None,
            outbox: Vec::new(),
            events: Vec::new(),
            dropped: Dropped::default(),
        }
    }

    /// Opens channel `id` of `class` (the peer opens the same id).
    pub fn open(&mut self, id: u16, class: Class, now: Instant) {
        self.channels
            .entry(id)
            .or_insert_with(|| ChannelState::new(class, self.config.window, now));
    }

    /// Queues `payload` on channel `id`; returns its number there.
    pub fn send(&mut self, id: u16, payload: Vec<u8>) -> Result<u64, SendError> {
        let channel = self.channels.get_mut(&id).ok_or(SendError::NoChannel(id))?;
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLong { len: payload.len() });
        }
        let len = payload.len() as u64;
        let seq = channel
            .sender
            .push(payload)
            .map_err(|source| SendError::Full {
                channel: id,
                source,
            })?;
        channel.bytes_this_second += len;
        Ok(seq)
    }

    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Each open channel's figures.
    pub fn channels(&self) -> Vec<ChannelReport> {
        self.channels
            .iter()
            .map(|(&id, c)| ChannelReport {
                id,
                class: c.class,
                link: c.link.map(|l| l as u16),
                in_flight: c.sender.in_flight(),
                retransmissions: c.sender.retransmissions,
                duplicates: c.receiver.duplicates,
                rate: c.rate,
            })
            .collect()
    }

    fn micros(&self, now: Instant) -> u64 {
        // Never 0: 0 means "nothing to echo" in a heartbeat.
        now.saturating_duration_since(self.start).as_micros() as u64 + 1
    }

    fn frame(&self, kind: Kind, link: usize) -> Frame {
        Frame::new(kind, self.me, self.peer, link as u16, self.session)
    }

    fn link_event(&mut self, link: usize, change: Option<LinkState>) {
        if let Some(state) = change {
            self.events.push(Event::Link {
                link: link as u16,
                state,
            });
        }
    }

    /// Holds `link` down because of a refusal (the peer's or this node's), saying why.
    fn hold_refused(&mut self, link: usize, why: String) {
        let change = self.links[link].refuse(why.clone());
        self.link_event(link, change);
        self.events.push(Event::Refused {
            link: link as u16,
            why,
        });
    }

    /// Takes the bytes that arrived on `link` at `now`; returns the messages delivered,
    /// in order, by channel.
    pub fn receive(&mut self, link: usize, bytes: &[u8], now: Instant) -> Vec<(u16, Vec<u8>)> {
        let mut delivered = Vec::new();
        if link >= self.links.len() {
            self.dropped.misaddressed += 1;
            return delivered;
        }
        self.links[link].counters.bytes_in += bytes.len() as u64;
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(DecodeError::Version { version }) => {
                self.dropped.version += 1;
                self.links[link].counters.dropped += 1;
                let why = format!(
                    "the peer speaks interconnect version {version}; this node speaks {VERSION}"
                );
                let mut refuse = self.frame(Kind::Refuse, link);
                refuse.payload = format!(
                    "node {} speaks interconnect version {VERSION}, not {version}",
                    self.me
                )
                .into_bytes();
                self.outbox.push((link, refuse));
                self.hold_refused(link, why);
                return delivered;
            }
            Err(_) => {
                self.dropped.malformed += 1;
                self.links[link].counters.dropped += 1;
                return delivered;
            }
        };
        if frame.to != self.me || frame.from != self.peer || usize::from(frame.link) != link {
            self.dropped.misaddressed += 1;
            self.links[link].counters.dropped += 1;
            return delivered;
        }
        match self.peer_session {
            Some(known) if known != frame.session => {
                if frame.kind == Kind::Hello {
                    // The peer started again: its channels start over, and so do ours.
                    self.peer_session = Some(frame.session);
                    let window = self.config.window;
                    for channel in self.channels.values_mut() {
                        *channel = ChannelState::new(channel.class, window, now);
                    }
                    self.events.push(Event::PeerRestarted);
                } else {
                    self.dropped.stale += 1;
                    self.links[link].counters.dropped += 1;
                    return delivered;
                }
            }
            Some(_) => {}
            None => self.peer_session = Some(frame.session),
        }
        self.links[link].counters.frames_in += 1;
        if frame.kind == Kind::Refuse {
            let why = String::from_utf8_lossy(&frame.payload).into_owned();
            self.hold_refused(link, why);
            return delivered;
        }
        // A refused link stays down until the peer says a Hello it can accept: nothing
        // else from it counts as hearing it.
        let refused_here = self.links[link].refused.is_some();
        let acceptable_hello = frame.kind == Kind::Hello && frame.seq & REQUIRED == REQUIRED;
        if !refused_here || acceptable_hello || frame.kind == Kind::HelloAck {
            let change = self.links[link].heard(now);
            self.link_event(link, change);
        }
        match frame.kind {
            Kind::Hello => {
                if frame.seq & REQUIRED == REQUIRED {
                    let mut ack = self.frame(Kind::HelloAck, link);
                    ack.seq = CAPABILITIES;
                    self.outbox.push((link, ack));
                } else {
                    let mut refuse = self.frame(Kind::Refuse, link);
                    refuse.payload = format!(
                        "node {} needs capabilities {REQUIRED:#x}; the peer offers {:#x}",
                        self.me, frame.seq
                    )
                    .into_bytes();
                    self.outbox.push((link, refuse));
                    let why = format!("the peer offers capabilities {:#x} only", frame.seq);
                    self.hold_refused(link, why);
                }
            }
            Kind::Heartbeat => {
                let us = self.micros(now);
                self.links[link].heartbeat_arrived(&frame.payload, now, us);
            }
            Kind::Data | Kind::Ack => match self.channels.get_mut(&frame.channel) {
                Some(channel) => {
                    channel.sender.acknowledged(frame.ack);
                    if frame.kind == Kind::Data {
                        let mut out = Vec::new();
                        channel.receiver.arrive(frame.seq, frame.payload, &mut out);
                        // A duplicate is acknowledged again: the first ack may be lost.
                        channel.ack_due = true;
                        delivered.extend(out.into_iter().map(|m| (frame.channel, m)));
                    }
                }
                None => self.dropped.unknown_channel += 1,
            },
            Kind::HelloAck | Kind::Refuse => {}
        }
        delivered
    }

    /// Moves channels to the links placement wants (see the module documentation).
    fn place(&mut self) {
        let up: Vec<usize> = (0..self.links.len())
            .filter(|&l| self.links[l].state() == LinkState::Up)
            .collect();
        let usable: Vec<usize> = if up.is_empty() {
            (0..self.links.len())
                .filter(|&l| self.links[l].usable())
                .collect()
        } else {
            up
        };
        let heavy = self.config.heavy_bytes_per_s;
        for channel in self.channels.values_mut() {
            let target = match (usable.len(), channel.placed_as(heavy)) {
                (0, _) => None,
                (1, _) | (_, Class::Bulk) => Some(usable[0]),
                (_, Class::Control) => Some(usable[1]),
            };
            if target == channel.link {
                continue;
            }
            // Off a link that is no longer up, what it carried may be lost: all again.
            let left_dead = channel
                .link
                .is_some_and(|l| self.links[l].state() != LinkState::Up);
            if left_dead {
                channel.sender.resend_all();
            }
            channel.link = target;
        }
    }

    /// What to send now, by link: hellos, heartbeats, acknowledgements and due messages.
    pub fn poll(&mut self, now: Instant) -> Vec<(usize, Vec<u8>)> {
        for link in 0..self.links.len() {
            let (beat, change) = self.links[link].tick(now);
            self.link_event(link, change);
            match beat {
                Some(Beat::Hello) => {
                    let mut hello = self.frame(Kind::Hello, link);
                    hello.seq = CAPABILITIES;
                    self.outbox.push((link, hello));
                }
                Some(Beat::Heartbeat) => {
                    let mut beat = self.frame(Kind::Heartbeat, link);
                    let us = self.micros(now);
                    beat.payload = self.links[link].heartbeat_payload(now, us);
                    self.outbox.push((link, beat));
                }
                None => {}
            }
        }
        for channel in self.channels.values_mut() {
            let elapsed = now.saturating_duration_since(channel.second_started);
            if elapsed >= Duration::from_secs(1) {
                channel.rate =
                    channel.bytes_this_second * 1000 / (elapsed.as_millis().max(1) as u64);
                channel.bytes_this_second = 0;
                channel.second_started = now;
            }
        }
        self.place();
        let (me, peer, session, retransmit) =
            (self.me, self.peer, self.session, self.config.retransmit);
        for (&id, channel) in &mut self.channels {
            let Some(link) = channel.link else { continue };
            let due = channel.sender.due(now, retransmit);
            let ack = channel.receiver.ack();
            if due.is_empty() && channel.ack_due {
                let mut frame = Frame::new(Kind::Ack, me, peer, link as u16, session);
                frame.channel = id;
                frame.ack = ack;
                self.outbox.push((link, frame));
            }
            for (seq, payload) in due {
                let mut frame = Frame::new(Kind::Data, me, peer, link as u16, session);
                frame.channel = id;
                frame.seq = seq;
                frame.ack = ack;
                frame.payload = payload;
                self.outbox.push((link, frame));
            }
            channel.ack_due = false;
        }
        let mut out = Vec::new();
        for (link, frame) in std::mem::take(&mut self.outbox) {
            // `send` bounds payloads by the frame limit, so every frame encodes.
            if let Ok(bytes) = frame.encode() {
                let counters = &mut self.links[link].counters;
                counters.frames_out += 1;
                counters.bytes_out += bytes.len() as u64;
                out.push((link, bytes));
            }
        }
        out
    }
}
