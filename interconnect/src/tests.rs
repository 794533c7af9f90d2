//! Two managers over simulated links that a test can cut: failover, exactly-once delivery,
//! placement, refusals and bad input. Sessions and restarts are in `sessions`, flapping
//! links in `flapping`, a randomised run with `next_wakeup` checked in `chaos`.

#![allow(clippy::unwrap_used)]

mod chaos;
mod flapping;
mod sessions;

use std::time::{Duration, Instant};

use crate::frame::{Frame, Kind};
use crate::link::{LinkConfig, LinkState};
use crate::manager::{Class, Event, Manager, ManagerConfig};

const CONTROL: u16 = 1;
const BULK: u16 = 2;
const HEARTBEAT: Duration = Duration::from_millis(10);
const TICK: Duration = Duration::from_millis(1);

fn config() -> ManagerConfig {
    ManagerConfig {
        link: LinkConfig {
            heartbeat: HEARTBEAT,
            degraded_after: 2,
            down_after: 3,
            return_after: 3,
        },
        retransmit: Duration::from_millis(40),
        window: 4096,
        flight: 32,
        heavy_bytes_per_s: 200_000,
    }
}

/// A manager of node `me` (0 or 1) with the two channels open.
fn manager(me: u16, session: u64, config: ManagerConfig, now: Instant) -> Manager {
    let mut manager = Manager::new(me, 1 - me, session, 2, config, now);
    manager.open(CONTROL, Class::Control, now);
    manager.open(BULK, Class::Bulk, now);
    manager
}

/// Which side put a frame on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    A,
    B,
}

/// Says whether a frame is lost: (who sent it, link, the frame).
type Lose = Box<dyn FnMut(From, usize, &Frame) -> bool>;

/// Nodes 0 and 1 over two links; the test cuts and restores links, loses chosen frames and
/// steps time.
struct Net {
    a: Manager,
    b: Manager,
    cut: [bool; 2],
    lose: Lose,
    now: Instant,
    start: Instant,
    /// What b delivered: (channel, payload, when).
    at_b: Vec<(u16, Vec<u8>, Duration)>,
    /// What a delivered.
    at_a: Vec<(u16, Vec<u8>, Duration)>,
    /// Every frame put on a link, lost or not: (who, link, bytes), for replays.
    wire: Vec<(From, usize, Vec<u8>)>,
}

impl Net {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(config: ManagerConfig) -> Self {
        let start = Instant::now();
        Self {
            a: manager(0, 0xa1, config, start),
            b: manager(1, 0xb1, config, start),
            cut: [false; 2],
            lose: Box::new(|_, _, _| false),
            now: start,
            start,
            at_b: Vec::new(),
            at_a: Vec::new(),
            wire: Vec::new(),
        }
    }

    /// One millisecond: both sides send what is due, and what crosses an uncut link and is
    /// not lost arrives.
    fn step(&mut self) {
        self.now += TICK;
        let at = self.now - self.start;
        for (link, bytes) in self.a.poll(self.now) {
            if self.crosses(From::A, link, &bytes) {
                for (channel, message) in self.b.receive(link, &bytes, self.now) {
                    self.at_b.push((channel, message, at));
                }
            }
        }
        for (link, bytes) in self.b.poll(self.now) {
            if self.crosses(From::B, link, &bytes) {
                for (channel, message) in self.a.receive(link, &bytes, self.now) {
                    self.at_a.push((channel, message, at));
                }
            }
        }
    }

    fn crosses(&mut self, from: From, link: usize, bytes: &[u8]) -> bool {
        self.wire.push((from, link, bytes.to_vec()));
        let frame = Frame::decode(bytes).unwrap();
        !self.cut[link] && !(self.lose)(from, link, &frame)
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step();
        }
    }

    /// Steps until `done` holds, at most `limit` steps; returns the steps taken.
    fn run_until(&mut self, limit: usize, mut done: impl FnMut(&mut Self) -> bool) -> usize {
        for steps in 1..=limit {
            self.step();
            if done(self) {
                return steps;
            }
        }
        panic!("not done after {limit} steps");
    }

    fn link_of(manager: &Manager, channel: u16) -> Option<u16> {
        manager
            .channels()
            .into_iter()
            .find(|c| c.id == channel)
            .and_then(|c| c.link)
    }

    fn report(manager: &Manager, channel: u16) -> crate::manager::ChannelReport {
        manager
            .channels()
            .into_iter()
            .find(|c| c.id == channel)
            .unwrap()
    }
}

/// The numbers of the messages delivered on `channel`, in delivery order.
fn numbers(delivered: &[(u16, Vec<u8>, Duration)], channel: u16) -> Vec<u64> {
    delivered
        .iter()
        .filter(|m| m.0 == channel)
        .map(|m| u64::from_le_bytes(m.1[..8].try_into().unwrap()))
        .collect()
}

fn numbered(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

/// A control stream of one message per millisecond keeps flowing while each link in turn is
/// cut, then both, then both come back: every message arrives once, in order, and the
/// longest gap while one link lives is under three heartbeat intervals.
#[test]
fn a_control_stream_rides_through_cut_links_exactly_once_in_order() {
    let mut net = Net::new();
    net.run(30);
    assert_eq!(Net::link_of(&net.a, BULK), Some(0));
    assert_eq!(Net::link_of(&net.a, CONTROL), Some(1));
    let mut sent = 0u64;
    let mut longest_gap_one_link = Duration::ZERO;
    let phases: [(&str, [bool; 2], usize); 6] = [
        ("both up", [false, false], 100),
        ("control's link cut", [false, true], 200),
        ("both up again", [false, false], 200),
        ("bulk's link cut", [true, false], 200),
        ("both cut", [true, true], 100),
        ("both back", [false, false], 300),
    ];
    for (what, cut, steps) in phases {
        net.cut = cut;
        let first = net.at_b.len();
        for _ in 0..steps {
            sent += 1;
            net.a.send(CONTROL, numbered(sent)).unwrap();
            net.step();
        }
        if cut != [true, true] && what != "both back" {
            // From the last delivery before the phase: the cut's own gap counts.
            let times: Vec<Duration> = net.at_b[first.saturating_sub(1)..]
                .iter()
                .map(|m| m.2)
                .collect();
            let gap = times
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default();
            longest_gap_one_link = longest_gap_one_link.max(gap);
        }
        if what == "both up again" {
            assert_eq!(Net::link_of(&net.a, CONTROL), Some(1), "control went back");
        }
    }
    net.run(300);
    let got = numbers(&net.at_b, CONTROL);
    assert_eq!(got, (1..=sent).collect::<Vec<_>>(), "once each, in order");
    eprintln!(
        "{sent} messages, 1 per ms; longest gap while a link lived: {longest_gap_one_link:?} \
         (heartbeat {HEARTBEAT:?})"
    );
    assert!(
        longest_gap_one_link < HEARTBEAT * 3,
        "gap {longest_gap_one_link:?} with a link alive"
    );
    let report = net.a.channels();
    assert!(report.iter().any(|c| c.retransmissions > 0), "{report:?}");
    assert!(net.a.take_events().contains(&Event::Link {
        link: 1,
        state: LinkState::Down
    }));
}

/// Bulk and control get a link each; a control channel that sends like bulk is moved off
/// the control link, and back only once its rate is well under the mark; with one link
/// left everything shares it.
#[test]
fn placement_by_class_and_by_measured_load() {
    let mut net = Net::new();
    net.run(30);
    assert_eq!(Net::link_of(&net.a, BULK), Some(0));
    assert_eq!(Net::link_of(&net.a, CONTROL), Some(1));
    // 1 KiB per millisecond on control: 1 MB/s, past the heavy mark.
    for _ in 0..1100 {
        net.a.send(CONTROL, vec![7; 1024]).unwrap();
        net.step();
    }
    assert_eq!(
        Net::link_of(&net.a, CONTROL),
        Some(0),
        "a heavy client leaves"
    );
    // The second second carried the last 130 messages: 133 KB/s, under the mark (200 KB/s)
    // but over half of it, so the channel stays bulk: no flapping around the mark.
    net.run(1100);
    let report = net.a.channels();
    let control = report.iter().find(|c| c.id == CONTROL).unwrap();
    assert!((100_000..200_000).contains(&control.rate), "{control:?}");
    assert_eq!(control.link, Some(0));
    // Quiet a whole second: back to the control link.
    net.run(1000);
    assert_eq!(Net::link_of(&net.a, CONTROL), Some(1));
    net.cut = [true, false];
    net.run(40);
    assert_eq!(Net::link_of(&net.a, BULK), Some(1));
    assert_eq!(Net::link_of(&net.a, CONTROL), Some(1));
}

/// A peer of another version is refused, and told why; the link comes back when the peer
/// speaks this version again.
#[test]
fn a_peer_of_another_version_is_refused_with_the_reason() {
    let mut net = Net::new();
    net.run(30);
    let mut hello = Frame::new(Kind::Hello, 1, 0, 0, 0xb1).encode().unwrap();
    hello[4] = 3;
    net.a.receive(0, &hello, net.now);
    let events = net.a.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Refused { link: 0, why } if why.contains("version 3"))),
        "{events:?}"
    );
    assert_eq!(net.a.links()[0].state(), LinkState::Down);
    assert_eq!(net.a.dropped.version, 1);
    // a answered with a Refuse; b hears why.
    let refuse = net
        .a
        .poll(net.now)
        .into_iter()
        .find(|(link, bytes)| {
            *link == 0 && Frame::decode(bytes).is_ok_and(|f| f.kind == Kind::Refuse)
        })
        .unwrap();
    net.b.receive(0, &refuse.1, net.now);
    let events = net.b.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Refused { why, .. } if why.contains("not 3"))),
        "{events:?}"
    );
    // Speaking this version again, they find each other.
    net.run(60);
    assert_eq!(net.a.links()[0].state(), LinkState::Up);
    assert_eq!(net.b.links()[0].state(), LinkState::Up);
}

/// Garbage, frames for another node, a peer claiming another node's id or link, replays of
/// an old session and duplicates: dropped and counted, nothing delivered twice.
#[test]
fn bad_frames_are_dropped_and_counted() {
    let mut net = Net::new();
    net.run(30);
    let now = net.now;
    assert!(net.b.receive(0, b"not a frame at all", now).is_empty());
    assert!(net.b.receive(0, &[], now).is_empty());
    let data = |from: u16, to: u16, link: u16, session: u64, seq: u64| {
        let mut frame = Frame::new(Kind::Data, from, to, link, session);
        frame.channel = CONTROL;
        frame.seq = seq;
        frame.payload = b"hello".to_vec();
        frame.encode().unwrap()
    };
    assert!(net.b.receive(0, &data(0, 5, 0, 0xa1, 1), now).is_empty());
    assert!(net.b.receive(0, &data(7, 1, 0, 0xa1, 1), now).is_empty());
    assert!(net.b.receive(0, &data(0, 1, 1, 0xa1, 1), now).is_empty());
    assert_eq!(net.b.dropped.malformed, 2);
    assert_eq!(net.b.dropped.misaddressed, 3);
    // A real message, then its replay: delivered once.
    let first = net.b.receive(0, &data(0, 1, 0, 0xa1, 1), now);
    assert_eq!(first, vec![(CONTROL, b"hello".to_vec())]);
    assert!(net.b.receive(1, &data(0, 1, 1, 0xa1, 1), now).is_empty());
    // A frame of an earlier session of a is stale.
    assert!(net.b.receive(0, &data(0, 1, 0, 0x01d, 2), now).is_empty());
    assert_eq!(net.b.dropped.stale, 1);
    let mut unknown = Frame::new(Kind::Data, 0, 1, 0, 0xa1);
    unknown.channel = 99;
    unknown.seq = 1;
    net.b.receive(0, &unknown.encode().unwrap(), now);
    assert_eq!(net.b.dropped.unknown_channel, 1);
    let duplicates: u64 = net.b.channels().iter().map(|c| c.duplicates).sum();
    assert_eq!(duplicates, 1);
}

/// A peer that starts again (a new session, announced by Hello) starts every channel over.
#[test]
fn a_restarted_peer_starts_the_channels_over() {
    let mut net = Net::new();
    net.run(30);
    for n in 1..=5 {
        net.a.send(CONTROL, numbered(n)).unwrap();
    }
    net.run(20);
    assert_eq!(net.at_b.len(), 5);
    let start = net.now;
    net.a = manager(0, 0xa2, config(), start);
    net.run(50);
    assert!(net.b.take_events().contains(&Event::PeerRestarted));
    net.a.send(CONTROL, numbered(1)).unwrap();
    net.run(20);
    assert_eq!(net.at_b.len(), 6, "the new session's first message arrives");
}

/// A runtime sleeps until `next_wakeup`: idle, that is the next heartbeat; with a message
/// queued or an answer due, now.
#[test]
fn the_next_wakeup_is_the_next_heartbeat_when_idle_and_now_with_work() {
    let mut net = Net::new();
    net.run(30);
    let now = net.now;
    assert_eq!(net.a.poll(now), vec![]);
    let wake = net.a.next_wakeup(now);
    assert!(now < wake && wake <= now + HEARTBEAT, "{:?}", wake - now);
    net.a.send(CONTROL, numbered(1)).unwrap();
    assert_eq!(net.a.next_wakeup(now), now);
    assert_eq!(net.a.poll(now).len(), 1);
    // The retransmission waits for the timeout, unless a heartbeat comes first.
    assert!(net.a.next_wakeup(now) > now);
    assert_eq!(net.a.me(), 0);
    assert_eq!(net.a.peer(), 1);
}

/// A link that holds few frames and keeps the newest (the region mailbox: a ring of slots
/// its reader empties now and then) gets a burst paced by the flight: the oldest messages,
/// which the receiver waits for, are not overwritten by later ones round after round.
#[test]
fn a_burst_on_a_link_that_keeps_only_its_newest_frames_is_paced_and_delivered() {
    const SLOTS: usize = 48;
    let start = Instant::now();
    let mut config = config();
    config.flight = 32;
    let one_link = |me: u16, session: u64| {
        let mut m = Manager::new(me, 1 - me, session, 1, config, start);
        m.open(CONTROL, Class::Control, start);
        m
    };
    let (mut a, mut b) = (one_link(0, 0xa1), one_link(1, 0xb1));
    for n in 0..1000u32 {
        a.send(CONTROL, n.to_le_bytes().to_vec()).unwrap();
    }
    let mut delivered = Vec::new();
    let mut now = start;
    for _ in 0..5000 {
        now += TICK;
        let frames = a.poll(now);
        // Of one poll's frames, only the newest SLOTS are still there when b reads.
        let kept = frames.len().saturating_sub(SLOTS);
        for (link, bytes) in &frames[kept..] {
            for (_, message) in b.receive(*link, bytes, now) {
                delivered.push(message);
            }
        }
        for (link, bytes) in b.poll(now) {
            a.receive(link, &bytes, now);
        }
        if delivered.len() == 1000 {
            break;
        }
    }
    let expected: Vec<Vec<u8>> = (0..1000u32).map(|n| n.to_le_bytes().to_vec()).collect();
    assert_eq!(
        delivered.len(),
        1000,
        "the oldest messages never got through"
    );
    assert_eq!(delivered, expected);
    assert!(
        now - start < Duration::from_secs(2),
        "1000 messages took {:?}",
        now - start
    );
}

/// Two builds of different versions do not refuse each other forever: a Refuse of another
/// version is never answered, and other frames of it at most once an interval.
#[test]
fn refusals_between_versions_do_not_echo() {
    let mut net = Net::new();
    net.run(30);
    let mut foreign_refuse = Frame::new(Kind::Refuse, 1, 0, 0, 0xb1).encode().unwrap();
    foreign_refuse[4] = 3;
    net.a.receive(0, &foreign_refuse, net.now);
    let answered = |frames: Vec<(usize, Vec<u8>)>| {
        frames
            .iter()
            .filter(|(link, bytes)| {
                *link == 0 && Frame::decode(bytes).is_ok_and(|f| f.kind == Kind::Refuse)
            })
            .count()
    };
    assert_eq!(answered(net.a.poll(net.now)), 0, "a Refuse is not answered");
    let mut foreign_hello = Frame::new(Kind::Hello, 1, 0, 0, 0xb1).encode().unwrap();
    foreign_hello[4] = 3;
    for _ in 0..20 {
        net.a.receive(0, &foreign_hello, net.now);
    }
    assert_eq!(answered(net.a.poll(net.now)), 1, "one answer an interval");
    assert_eq!(net.a.dropped.version, 21);
}
