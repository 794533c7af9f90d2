//! Placement's hysteresis: a link that flaps does not pull channels to and fro.

use super::*;

/// What a flapping run did to the control channel.
#[derive(Debug)]
struct Flapped {
    /// Moves of the control channel while its link flapped.
    moves_while_flapping: u64,
    /// Moves in all.
    moves: u64,
    /// The longest a message waited from its send to its delivery.
    longest_wait: Duration,
}

/// A control stream of one message per millisecond while the control channel's link is cut
/// for `cut_ms`, then restored for `up_ms`, `cycles` times; then it stays up. Checks that
/// every message arrives once, in order.
fn flap(return_after: u32, cut_ms: usize, up_ms: usize, cycles: usize) -> Flapped {
    let mut config = config();
    config.link.return_after = return_after;
    let mut net = Net::with(config);
    net.run(30);
    assert_eq!(Net::link_of(&net.a, CONTROL), Some(1));
    let mut sent_at = Vec::new();
    let mut send_for = |net: &mut Net, steps: usize| {
        for _ in 0..steps {
            sent_at.push(net.now - net.start);
            net.a.send(CONTROL, numbered(sent_at.len() as u64)).unwrap();
            net.step();
        }
    };
    for _ in 0..cycles {
        net.cut = [false, true];
        send_for(&mut net, cut_ms);
        net.cut = [false, false];
        send_for(&mut net, up_ms);
    }
    let moves_while_flapping = Net::report(&net.a, CONTROL).moves;
    send_for(&mut net, 300);
    net.run(300);
    assert_eq!(
        Net::link_of(&net.a, CONTROL),
        Some(1),
        "back once it settled"
    );
    assert_eq!(
        numbers(&net.at_b, CONTROL),
        (1..=sent_at.len() as u64).collect::<Vec<_>>(),
        "once each, in order"
    );
    let longest_wait = net
        .at_b
        .iter()
        .zip(&sent_at)
        .map(|(delivered, &sent)| delivered.2 - sent)
        .max()
        .unwrap();
    Flapped {
        moves_while_flapping,
        moves: Net::report(&net.a, CONTROL).moves,
        longest_wait,
    }
}

/// Cut long enough to go down (40 ms: down after 30), back for 15 ms, ten times; and cut
/// long enough to degrade only (24 ms), back for 7 (a cycle of 31 ms, so the heartbeats
/// fall in the window now and then). The channel leaves the link once, and
/// comes back once it has carried frames for three intervals after the flapping. Without
/// the hysteresis (`return_after` 0) it follows the flaps.
#[test]
fn a_flapping_link_does_not_pull_channels_to_and_fro() {
    for (cut_ms, up_ms) in [(40, 15), (24, 7)] {
        let steady = flap(3, cut_ms, up_ms, 10);
        let jumpy = flap(0, cut_ms, up_ms, 10);
        eprintln!("cut {cut_ms} ms, up {up_ms} ms: {steady:?}; without hysteresis {jumpy:?}");
        assert_eq!(steady.moves_while_flapping, 1, "{steady:?}");
        assert_eq!(steady.moves, 2, "{steady:?}");
        assert!(steady.longest_wait < HEARTBEAT * 3, "{steady:?}");
        assert!(jumpy.moves_while_flapping >= 10, "{jumpy:?}");
    }
}
