//! The connection manager of one node for one peer: its links, its channels, and which
//! channel travels on which link.
//!
//! Sessions: each frame carries this node's session and the peer's as this node knows it;
//! [`crate::session`] says which frames to take, which are stale, and when the peer
//! started again (every channel then starts over).
//!
//! Placement (the module `placement`): a channel has a class. With two links or more in
//! service, bulk channels take the first and control channels the second, so a bulk
//! transfer never queues a control message behind it; with one link, every channel shares
//! it. A channel leaves a link as soon as the link is no longer up (degraded: two heartbeat
//! intervals of silence) if another is up, and everything it had not got acknowledged goes
//! again on the new link; the receiver drops what it has seen, so each message arrives
//! once, in order. Channels go back when a link that returned has settled (carried frames
//! for `return_after` intervals), so a flapping link does not pull them to and fro. A
//! control channel that sends more than `heavy_bytes_per_s` is treated as bulk until its
//! rate falls to half that (the adaptive balancing: a heavy client leaves the control
//! link, and does not flap around the mark).
//!
//! Bad input (bytes that are not a frame, another version, frames for another node, a
//! peer claiming another node's id or link, a stale session's frames, frames meant for an
//! earlier start of this node, acknowledgements of messages never sent) is dropped and
//! counted; another version is also answered with a Refuse that says why.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::channel::{Full, Receiver, Sender};
use crate::frame::{DecodeError, Frame, Kind, MAX_PAYLOAD, VERSION};
use crate::link::{Beat, CAPABILITIES, Link, LinkConfig, LinkState, REQUIRED};
use crate::placement::Placement;
use crate::session::{self, Verdict};

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
    /// Messages of a channel on the way at once (sent, neither acknowledged nor timed
    /// out): a resend of the whole window goes out this many at a time, oldest first.
    pub flight: usize,
    /// A control channel sending more than this is placed as bulk (until it sends half
    /// this or less).
    pub heavy_bytes_per_s: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            link: LinkConfig::default(),
            retransmit: Duration::from_millis(200),
            window: 1024,
            flight: 32,
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
    /// Frames naming another session of this node: meant for an earlier start of it.
    pub not_ours: u64,
    /// Frames of a later session of the peer before its Hello: answered with a Hello.
    pub unannounced: u64,
    /// Data for a channel that is not open here.
    pub unknown_channel: u64,
    /// Acknowledgements of messages not sent yet: ignored (a Data frame's message is still
    /// taken).
    pub ack_beyond_sent: u64,
}

#[derive(Debug)]
struct ChannelState {
    class: Class,
    sender: Sender,
    receiver: Receiver,
    link: Option<usize>,
    /// Times it was placed on a link after its first placement.
    moves: u64,
    /// The receiver's acknowledgement moved and has not been sent.
    ack_due: bool,
    /// The link the peer's last message of this channel came on: a lone acknowledgement
    /// goes back that way, which is known to work from the peer, whatever link this side
    /// has placed the channel on (it may not have found that link dead yet, and the peer's
    /// messages could not leave its window meanwhile).
    ack_link: Option<usize>,
    /// Bytes queued in the current second, and the rate of the last whole one.
    bytes_this_second: u64,
    second_started: Instant,
    rate: u64,
    /// Placed as bulk for its rate (see `ManagerConfig::heavy_bytes_per_s`).
    heavy: bool,
}

impl ChannelState {
    fn new(class: Class, window: usize, flight: usize, now: Instant) -> Self {
        Self {
            class,
            sender: Sender::paced(window, flight),
            receiver: Receiver::new(window as u64),
            link: None,
            moves: 0,
            ack_due: false,
            ack_link: None,
            bytes_this_second: 0,
            second_started: now,
            rate: 0,
            heavy: false,
        }
    }

    /// The class placement uses: a heavy control channel counts as bulk.
    fn placed_as(&self) -> Class {
        if self.heavy { Class::Bulk } else { self.class }
    }

    /// Closes the current second's rate once it is whole; heavy above `heavy`, light
    /// again at half of it, so a rate near the mark does not flap.
    fn measure(&mut self, now: Instant, heavy: u64) {
        let elapsed = now.saturating_duration_since(self.second_started);
        if elapsed < Duration::from_secs(1) {
            return;
        }
        self.rate = self.bytes_this_second * 1000 / (elapsed.as_millis().max(1) as u64);
        self.bytes_this_second = 0;
        self.second_started = now;
        if self.rate > heavy {
            self.heavy = true;
        } else if self.rate <= heavy / 2 {
            self.heavy = false;
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
    /// Times it moved to a link after its first placement.
    pub moves: u64,
}

/// Who a frame is from and for: what every outgoing frame carries.
#[derive(Debug, Clone, Copy)]
struct Ends {
    me: u16,
    peer: u16,
    session: u64,
    peer_session: u64,
}

impl Ends {
    fn frame(self, kind: Kind, link: usize) -> Frame {
        Frame {
            to_session: self.peer_session,
            ..Frame::new(kind, self.me, self.peer, link as u16, self.session)
        }
    }
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
    placement: Placement,
    channels: BTreeMap<u16, ChannelState>,
    peer_session: Option<u64>,
    outbox: Vec<(usize, Frame)>,
    events: Vec<Event>,
    pub dropped: Dropped,
}

impl Manager {
    /// A manager over `links` links. `session` is this start's id: it must be larger at
    /// each start of this node (the peer takes a smaller one for a late frame of an earlier
    /// start), e.g. [`session::session_id`]: nanoseconds since the Unix epoch. 0 means
    /// "not known" on the wire, so it is taken as 1.
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
            session: session.max(1),
            config,
            start: now,
            links: (0..links)
                .map(|i| Link::new(i as u16, config.link))
                .collect(),
            placement: Placement::new(links),
            channels: BTreeMap::new(),
            peer_session: None,
            outbox: Vec::new(),
            events: Vec::new(),
            dropped: Dropped::default(),
        }
    }

    /// This node.
    pub fn me(&self) -> u16 {
        self.me
    }

    /// The peer.
    pub fn peer(&self) -> u16 {
        self.peer
    }

    /// This start's session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The peer's session, once heard.
    pub fn peer_session(&self) -> Option<u64> {
        self.peer_session
    }

    /// Opens channel `id` of `class` (the peer opens the same id).
    pub fn open(&mut self, id: u16, class: Class, now: Instant) {
        self.channels.entry(id).or_insert_with(|| {
            ChannelState::new(class, self.config.window, self.config.flight, now)
        });
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

    /// Messages of channel `id` waiting for the peer's acknowledgement (0: no such channel).
    pub fn in_flight(&self, id: u16) -> usize {
        self.channels.get(&id).map_or(0, |c| c.sender.in_flight())
    }

    /// Whether any channel is placed on `link`.
    pub fn carries(&self, link: usize) -> bool {
        self.channels.values().any(|c| c.link == Some(link))
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
                moves: c.moves,
            })
            .collect()
    }

    fn micros(&self, now: Instant) -> u64 {
        // Never 0: 0 means "nothing to echo" in a heartbeat.
        now.saturating_duration_since(self.start).as_micros() as u64 + 1
    }

    fn ends(&self) -> Ends {
        Ends {
            me: self.me,
            peer: self.peer,
            session: self.session,
            peer_session: self.peer_session.unwrap_or(0),
        }
    }

    fn frame(&self, kind: Kind, link: usize) -> Frame {
        self.ends().frame(kind, link)
    }

    fn hello(&self, link: usize) -> Frame {
        Frame {
            seq: CAPABILITIES,
            ..self.frame(Kind::Hello, link)
        }
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

    /// Counts a frame dropped on `link`.
    fn drop_on(&mut self, link: usize, reason: fn(&mut Dropped) -> &mut u64) {
        *reason(&mut self.dropped) += 1;
        self.links[link].counters.dropped += 1;
    }

    /// The peer started again as `session`: its channels start over, and so do ours.
    fn restart(&mut self, session: u64, now: Instant) {
        self.peer_session = Some(session);
        let window = self.config.window;
        for channel in self.channels.values_mut() {
            *channel = ChannelState::new(channel.class, window, self.config.flight, now);
        }
        self.events.push(Event::PeerRestarted);
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
                self.drop_on(link, |d| &mut d.version);
                let why = format!(
                    "the peer speaks interconnect version {version}; this node speaks {VERSION}"
                );
                // Answered at most once an interval, and never a Refuse itself.
                if !Kind::is_refuse(bytes) && self.links[link].may_answer_hello(now) {
                    let mut refuse = self.frame(Kind::Refuse, link);
                    refuse.payload = format!(
                        "node {} speaks interconnect version {VERSION}, not {version}",
                        self.me
                    )
                    .into_bytes();
                    self.outbox.push((link, refuse));
                }
                self.hold_refused(link, why);
                return delivered;
            }
            Err(_) => {
                self.drop_on(link, |d| &mut d.malformed);
                return delivered;
            }
        };
        if frame.to != self.me || frame.from != self.peer || usize::from(frame.link) != link {
            self.drop_on(link, |d| &mut d.misaddressed);
            return delivered;
        }
        match session::judge(self.session, self.peer_session, &frame) {
            Verdict::Current => {}
            Verdict::First => self.peer_session = Some(frame.session),
            Verdict::Restart => self.restart(frame.session, now),
            Verdict::Unannounced => {
                self.drop_on(link, |d| &mut d.unannounced);
                if self.links[link].may_answer_hello(now) {
                    // Naming the new session: the peer drops a Hello that names its old one.
                    let hello = Frame {
                        to_session: frame.session,
                        ..self.hello(link)
                    };
                    self.outbox.push((link, hello));
                }
                return delivered;
            }
            Verdict::Stale => {
                self.drop_on(link, |d| &mut d.stale);
                return delivered;
            }
            Verdict::NotOurs => {
                self.drop_on(link, |d| &mut d.not_ours);
                return delivered;
            }
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
                    let ack = Frame {
                        seq: CAPABILITIES,
                        ..self.frame(Kind::HelloAck, link)
                    };
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
                    if channel.sender.acknowledged(frame.ack).is_err() {
                        self.dropped.ack_beyond_sent += 1;
                    }
                    if frame.kind == Kind::Data {
                        let mut out = Vec::new();
                        channel.receiver.arrive(frame.seq, frame.payload, &mut out);
                        // A duplicate is acknowledged again: the first ack may be lost.
                        channel.ack_due = true;
                        channel.ack_link = Some(link);
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
        let usable = self.placement.usable(&self.links);
        let classes: Vec<Class> = self.channels.values().map(|c| c.placed_as()).collect();
        let targets = self.placement.assign(&usable, &classes);
        for (channel, target) in self.channels.values_mut().zip(targets) {
            if target == channel.link {
                continue;
            }
            // Off a link that is no longer up, what it carried may be lost: all again.
            // Between two links that are up, the retransmission timeout covers a loss.
            let left_dead = channel
                .link
                .is_some_and(|l| self.links[l].state() != LinkState::Up);
            if left_dead {
                channel.sender.resend_all();
            }
            if channel.link.is_some() && target.is_some() {
                channel.moves += 1;
            }
            channel.link = target;
        }
    }

    /// Whether placement would move a channel now.
    fn placement_due(&self) -> bool {
        let mut placement = self.placement.clone();
        let usable = placement.usable(&self.links);
        let classes: Vec<Class> = self.channels.values().map(|c| c.placed_as()).collect();
        placement
            .assign(&usable, &classes)
            .into_iter()
            .zip(self.channels.values())
            .any(|(target, c)| target != c.link)
    }

    /// Says whether `link` may carry bulk channels while another link can (a link that
    /// holds little, such as the region mailbox, should not).
    pub fn set_bulk_allowed(&mut self, link: usize, allowed: bool) {
        self.placement.set_bulk_allowed(link, allowed);
    }

    /// How long a message sent on `link` waits for its acknowledgement before it goes
    /// again: the configured time, or three of the link's round trips if longer (at most
    /// ten times the configured time). A link
    /// slowed by load (a guest short of CPU) then gets time to answer instead of a resend
    /// of everything in flight, which would only load it more.
    fn retransmit_timeout(&self, link: usize) -> Duration {
        let rtt = self.links.get(link).and_then(|l| l.rtt).unwrap_or_default();
        // Capped: the round trip is the peer's word (its echo), and a lying or confused
        // peer must not stop retransmission on the link.
        self.config
            .retransmit
            .max(rtt * 3)
            .min(self.config.retransmit * 10)
    }

    /// The earliest time [`Manager::poll`] has something to do: a frame to send (a Hello or
    /// heartbeat, an answer, an acknowledgement, a message new or due again), a link whose
    /// silence changes its state, a channel to place, a rate to measure. `now` when
    /// something is due already. A runtime sleeps until then, or until bytes arrive or a
    /// client sends; call it again after each `receive`, `send` and `poll`.
    pub fn next_wakeup(&self, now: Instant) -> Instant {
        if !self.outbox.is_empty() || self.placement_due() {
            return now;
        }
        let mut next = now + self.config.link.heartbeat;
        for link in &self.links {
            next = next.min(link.next_due(now));
        }
        for channel in self.channels.values() {
            // An idle channel's rate stays 0: no need to wake to measure it.
            if channel.bytes_this_second > 0 || channel.rate > 0 {
                next = next.min(channel.second_started + Duration::from_secs(1));
            }
            if channel.link.is_none() {
                continue;
            }
            if channel.ack_due {
                return now;
            }
            let Some(link) = channel.link else { continue };
            if let Some(due) = channel.sender.next_due(now, self.retransmit_timeout(link)) {
                next = next.min(due);
            }
        }
        next.max(now)
    }

    /// What to send now, by link: hellos, heartbeats, acknowledgements and due messages.
    pub fn poll(&mut self, now: Instant) -> Vec<(usize, Vec<u8>)> {
        for link in 0..self.links.len() {
            let (beat, change) = self.links[link].tick(now);
            self.link_event(link, change);
            match beat {
                Some(Beat::Hello) => {
                    let hello = self.hello(link);
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
        let heavy = self.config.heavy_bytes_per_s;
        for channel in self.channels.values_mut() {
            channel.measure(now, heavy);
        }
        self.place();
        let ends = self.ends();
        let timeouts: Vec<Duration> = (0..self.links.len())
            .map(|link| self.retransmit_timeout(link))
            .collect();
        for (&id, channel) in &mut self.channels {
            let Some(link) = channel.link else { continue };
            let due = channel.sender.due(now, timeouts[link]);
            let ack = channel.receiver.ack();
            if due.is_empty() && channel.ack_due {
                let back = channel.ack_link.unwrap_or(link);
                let frame = Frame {
                    channel: id,
                    ack,
                    ..ends.frame(Kind::Ack, back)
                };
                self.outbox.push((back, frame));
            }
            for (seq, payload) in due {
                let frame = Frame {
                    channel: id,
                    seq,
                    ack,
                    payload,
                    ..ends.frame(Kind::Data, link)
                };
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
