//! Two managers over simulated links that a test can cut: failover, exactly-once delivery,
//! placement, refusals and bad input.

#![allow(clippy::unwrap_used)]

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
        },
        retransmit: Duration::from_millis(40),
        window: 4096,
        heavy_bytes_per_s: 200_000,
    }
}

/// Nodes 0 and 1 over two links; the test cuts and restores links and steps time.
struct Net {
    a: Manager,
    b: Manager,
    cut: [bool; 2],
    now: Instant,
    start: Instant,
    /// What b delivered: (channel, payload, when).
    at_b: Vec<(u16, Vec<u8>, Duration)>,
}

impl Net {
    fn new() -> Self {
        let start = Instant::now();
        let mut a = Manager::new(0, 1, 0xa1, 2, config(), start);
        let mut b = Manager::new(1, 0, 0xb1, 2, config(), start);
        for m in [&mut a, &mut b] {
            m.open(CONTROL, Class::Control, start);
            m.open(BULK, Class::Bulk, start);
        }
        Self {
            a,
            b,
            cut: [false; 2],
            now: start,
            start,
            at_b: Vec::new(),
        }
    }

    /// One millisecond: both sides send what is due, and what crosses an uncut link arrives.
    fn step(&mut self) {
        self.now += TICK;
        let at = self.now - self.start;
        for (link, bytes) in self.a.poll(self.now) {
            if !self.cut[link] {
                for (channel, message) in self.b.receive(link, &bytes, self.now) {
                    self.at_b.push((channel, message, at));
                }
            }
        }
        for (link, bytes) in self.b.poll(self.now) {
            if !self.cut[link] {
                self.a.receive(link, &bytes, self.now);
            }
        }
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step();
        }
    }

    fn link_of(manager: &Manager, channel: u16) -> Option<u16> {
        manager
            .channels()
            .into_iter()
            .find(|c| c.id == channel)
            .and_then(|c| c.link)
    }
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
    let got: Vec<u64> = net
        .at_b
        .iter()
        .filter(|m| m.0 == CONTROL)
        .map(|m| u64::from_le_bytes(m.1[..8].try_into().unwrap()))
        .collect();
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
/// the control link; with one link left everything shares it.
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
    // Quiet again: back to the control link after its rate is measured low.
    net.run(1100);
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
    hello[4] = 2;
    net.a.receive(0, &hello, net.now);
    let events = net.a.take_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Refused { link: 0, why } if why.contains("version 2"))),
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
            .any(|e| matches!(e, Event::Refused { why, .. } if why.contains("not 2"))),
        "{events:?}"
    );
    // Speaking version 1 again, they find each other.
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
    net.a = Manager::new(0, 1, 0xa2, 2, config(), start);
    net.a.open(CONTROL, Class::Control, start);
    net.a.open(BULK, Class::Bulk, start);
    net.run(50);
    assert!(net.b.take_events().contains(&Event::PeerRestarted));
    net.a.send(CONTROL, numbered(1)).unwrap();
    net.run(20);
    assert_eq!(net.at_b.len(), 6, "the new session's first message arrives");
}
