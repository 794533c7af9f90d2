//! Sessions bound both ways: a restarted peer is known at once even when its Hello is lost;
//! a late Hello of an earlier start is no restart; acknowledgements meant for an earlier
//! start of this node, or past what it sent, are not taken.

use super::*;

/// The first frame `from` put on the wire of `kind` that `pick` accepts.
fn on_wire(net: &Net, from: From, pick: impl Fn(&Frame) -> bool) -> (usize, Vec<u8>) {
    net.wire
        .iter()
        .find(|(who, _, bytes)| *who == from && pick(&Frame::decode(bytes).unwrap()))
        .map(|(_, link, bytes)| (*link, bytes.clone()))
        .unwrap()
}

/// a and b talking, five control messages through; then a starts again as session 0xa2.
fn restarted() -> Net {
    let mut net = Net::new();
    net.run(30);
    for n in 1..=5 {
        net.a.send(CONTROL, numbered(n)).unwrap();
    }
    net.run(20);
    assert_eq!(numbers(&net.at_b, CONTROL), vec![1, 2, 3, 4, 5]);
    net.at_b.clear();
    net.a = manager(0, 0xa2, config(), net.now);
    net
}

fn restart_seen(net: &mut Net) -> bool {
    net.b.take_events().contains(&Event::PeerRestarted)
}

/// Before, b knew a's restart only by its Hello: with that lost, b took a's new frames for
/// stale, and a, hearing b, never said Hello again. Now a takes none of b's frames that
/// name its earlier start, so its links stay opening and it says Hello again at the next
/// heartbeat.
#[test]
fn a_restarted_peer_whose_hello_is_lost_is_known_within_a_heartbeat() {
    let mut net = restarted();
    let mut lost = [false; 2];
    net.lose = Box::new(move |from, link, frame| {
        let first_hello = from == From::A && frame.kind == Kind::Hello && !lost[link];
        lost[link] |= first_hello;
        first_hello
    });
    net.a.send(CONTROL, numbered(1)).unwrap();
    let known = net.run_until(100, restart_seen);
    let delivered = known + net.run_until(100, |net| !net.at_b.is_empty());
    eprintln!("restart known after {known} ms, first message after {delivered} ms");
    let heartbeat = HEARTBEAT.as_millis() as usize;
    assert!(known <= heartbeat + 1, "known after {known} ms");
    assert!(delivered <= heartbeat + 2, "delivered after {delivered} ms");
    assert_eq!(numbers(&net.at_b, CONTROL), vec![1]);
    assert!(
        net.a.dropped.not_ours > 0,
        "b's frames for a's earlier start"
    );
    assert_eq!(net.b.dropped.stale, 0);
    assert_eq!(net.a.peer_session(), Some(0xb1));
    assert_eq!(net.b.peer_session(), Some(0xa2));
}

/// A Hello of a's earlier start that arrives after the restart (late, or left in a
/// mailbox) was taken for another restart, and started every channel over. Now it is
/// stale: dropped, and the stream goes on.
#[test]
fn a_late_hello_of_the_peer_s_earlier_start_is_no_restart() {
    let mut net = restarted();
    let (link, old_hello) = on_wire(&net, From::A, |f| f.kind == Kind::Hello);
    assert_eq!(Frame::decode(&old_hello).unwrap().session, 0xa1);
    net.run_until(100, restart_seen);
    for n in 1..=20 {
        net.a.send(CONTROL, numbered(n)).unwrap();
        net.step();
        if n == 10 {
            assert!(net.b.receive(link, &old_hello, net.now).is_empty());
        }
    }
    net.run(50);
    assert!(!net.b.take_events().contains(&Event::PeerRestarted));
    assert_eq!(net.b.dropped.stale, 1);
    assert_eq!(net.b.peer_session(), Some(0xa2));
    assert_eq!(
        numbers(&net.at_b, CONTROL),
        (1..=20).collect::<Vec<_>>(),
        "once each, in order, through the late Hello"
    );
}

/// b acknowledged a's first five messages; a starts again and sends six that are lost. A
/// late copy of b's acknowledgement would have dropped five of them, never delivered. Now
/// it names a's earlier start and is not taken; an acknowledgement of the current
/// sessions past what a sent is ignored too. The six arrive.
#[test]
fn acknowledgements_meant_for_an_earlier_start_or_past_what_was_sent_are_ignored() {
    let mut net = restarted();
    let (link, old_ack) = on_wire(&net, From::B, |f| {
        f.kind == Kind::Ack && f.channel == CONTROL && f.ack == 5
    });
    assert_eq!(Frame::decode(&old_ack).unwrap().to_session, 0xa1);
    net.run_until(100, restart_seen);
    net.cut = [true, true];
    for n in 1..=6 {
        net.a.send(CONTROL, numbered(n)).unwrap();
    }
    net.run(2);
    assert_eq!(Net::report(&net.a, CONTROL).in_flight, 6);
    assert!(net.a.receive(link, &old_ack, net.now).is_empty());
    assert_eq!(net.a.dropped.not_ours, 1);
    assert_eq!(Net::report(&net.a, CONTROL).in_flight, 6);
    let beyond = Frame {
        to_session: 0xa2,
        channel: CONTROL,
        ack: 100,
        ..Frame::new(Kind::Ack, 1, 0, 1, 0xb1)
    };
    net.a.receive(1, &beyond.encode().unwrap(), net.now);
    assert_eq!(net.a.dropped.ack_beyond_sent, 1);
    assert_eq!(Net::report(&net.a, CONTROL).in_flight, 6);
    net.cut = [false, false];
    net.run(200);
    assert_eq!(numbers(&net.at_b, CONTROL), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(Net::report(&net.a, CONTROL).in_flight, 0);
}

/// A frame of a later session of the peer that is not a Hello is dropped and answered with
/// a Hello naming the new session; the peer's HelloAck completes the restart. (It takes
/// two losses and a late frame: a's Hellos are lost, and a Hello b said before it knew a,
/// naming no session of a, arrives late and gets a's link up.)
#[test]
fn a_frame_of_a_new_session_before_its_hello_is_answered_with_a_hello() {
    let mut net = restarted();
    let first_hello = Frame {
        seq: crate::link::CAPABILITIES,
        ..Frame::new(Kind::Hello, 1, 0, 0, 0xb1)
    };
    let now = net.now;
    net.a.receive(0, &first_hello.encode().unwrap(), now);
    assert_eq!(net.a.links()[0].state(), LinkState::Up);
    // a's HelloAck and Hellos are lost; its heartbeat on link 0 gets through, twice.
    let heartbeat = net
        .a
        .poll(now)
        .into_iter()
        .find(|(link, bytes)| *link == 0 && Frame::decode(bytes).unwrap().kind == Kind::Heartbeat)
        .unwrap()
        .1;
    net.b.receive(0, &heartbeat, now);
    net.b.receive(0, &heartbeat, now);
    assert_eq!(net.b.dropped.unannounced, 2);
    assert_eq!(net.b.peer_session(), Some(0xa1));
    assert_eq!(net.b.next_wakeup(now), now, "the answer is due");
    let hellos: Vec<(usize, Vec<u8>)> = net
        .b
        .poll(now)
        .into_iter()
        .filter(|(_, bytes)| Frame::decode(bytes).unwrap().kind == Kind::Hello)
        .collect();
    assert_eq!(hellos.len(), 1, "one answer an interval");
    let hello = Frame::decode(&hellos[0].1).unwrap();
    assert_eq!((hellos[0].0, hello.to_session), (0, 0xa2));
    net.a.receive(0, &hellos[0].1, now);
    for (link, bytes) in net.a.poll(now) {
        net.b.receive(link, &bytes, now);
    }
    assert!(restart_seen(&mut net));
    assert_eq!(net.b.peer_session(), Some(0xa2));
    net.a.send(CONTROL, numbered(1)).unwrap();
    net.run(20);
    assert_eq!(numbers(&net.at_b, CONTROL), vec![1]);
}
