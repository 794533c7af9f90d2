//! The interconnect end to end, through the real `hostd` and real agents: a numbered control
//! stream runs between the nodes while `hostd link` cuts each link in turn, then the
//! network links together (the mailbox carries the stream), then every link (the stream
//! waits), then restores them. Every message must arrive exactly once and in order, the
//! stream must move on while any link lives, and no link failure may move an identity.
//! A planned takeover first asks the holder over the interconnect (negotiation).
//! With the process backend (Unix datagram sockets and the region mailbox) and with real
//! QEMU guests (virtio-net NICs over `-netdev dgram`, cut with QMP `set_link`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{PROCESS, Pair, agent_prerequisite, one_pair, prerequisites};
use serde_json::Value;
use wire::events::Event;

const STREAM: &str = "[interconnect]\nstream_ms = 1\nping_ms = 20\n";

fn link<'a>(status: &'a Value, node: &str, peer: &str, link: u64) -> &'a Value {
    Pair::node(status, node)["links"]
        .as_array()
        .and_then(|links| {
            links
                .iter()
                .find(|l| l["peer"] == peer && l["link"].as_u64() == Some(link))
        })
        .unwrap_or(&Value::Null)
}

/// `(received, errors, longest gap in the last seconds, in µs)` of `node`'s stream from
/// `peer`.
fn stream(status: &Value, node: &str, peer: &str) -> (u64, u64, u64) {
    let clients = Pair::node(status, node)["link_clients"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["peer"] == peer).cloned())
        .unwrap_or(Value::Null);
    let field = |name: &str| clients[name].as_u64().unwrap_or(0);
    (
        field("stream_received"),
        field("stream_errors"),
        field("stream_recent_gap_us"),
    )
}

fn hostd_ok(pair: &Pair, args: &[&str]) -> String {
    let (code, out, err) = pair.hostd(args);
    assert_eq!(code, 0, "hostd {args:?}: {out}{err}");
    out
}

/// Waits until both directions' stream got `more` messages past what they had.
fn stream_moves(pair: &Pair, more: u64, what: &str) {
    let start = pair.status();
    let before = [stream(&start, "a", "b").0, stream(&start, "b", "a").0];
    pair.wait_for(what, Duration::from_secs(60), |status| {
        stream(status, "a", "b").0 >= before[0] + more
            && stream(status, "b", "a").0 >= before[1] + more
    });
}

fn no_stream_errors(pair: &Pair, when: &str) {
    let status = pair.status();
    for (node, peer) in [("a", "b"), ("b", "a")] {
        let (received, errors, gap) = stream(&status, node, peer);
        assert_eq!(
            errors, 0,
            "{when}: {node}'s stream from {peer} lost, repeated or reordered a message ({received} received)"
        );
        eprintln!(
            "{when}: {node} <- {peer}: {received} received in order, longest gap of the last 5 s {:.1} ms",
            gap as f64 / 1000.0
        );
    }
}

fn links_are(pair: &Pair, links: &[(u64, &str)], what: &str) {
    pair.wait_for(what, Duration::from_secs(60), |status| {
        links.iter().all(|&(index, state)| {
            [("a", "b"), ("b", "a")].iter().all(|(node, peer)| {
                let now = &link(status, node, peer, index)["state"];
                // The cutting side of an agent-cut link says so.
                now == state || (state == "down" && now == "cut")
            })
        })
    });
}

fn links_cut_and_restored(pair: &Pair) {
    links_are(
        pair,
        &[(0, "up"), (1, "up"), (2, "up")],
        "every link up both ways",
    );
    stream_moves(pair, 200, "the stream flowing both ways");
    let status = pair.status();
    assert_eq!(link(&status, "a", "b", 0)["kind"], "network");
    assert_eq!(link(&status, "a", "b", 2)["kind"], "mailbox");
    // Each link in turn: the stream goes on over the others.
    for index in 0..3u64 {
        let n = index.to_string();
        hostd_ok(pair, &["link", "a", &n, "down"]);
        pair.wait_for(
            &format!("b's link {index} to a down"),
            Duration::from_secs(30),
            |s| {
                link(s, "b", "a", index)["state"] == "down"
                    && link(s, "a", "b", index)["cut"] == true
            },
        );
        stream_moves(pair, 300, &format!("the stream with link {index} cut"));
        hostd_ok(pair, &["link", "a", &n, "up"]);
        links_are(pair, &[(index, "up")], &format!("link {index} back up"));
        no_stream_errors(pair, &format!("link {index} cut and restored"));
    }
    // Both network links: the mailbox carries everything.
    hostd_ok(pair, &["link", "a", "0", "down"]);
    hostd_ok(pair, &["link", "a", "1", "down"]);
    links_are(pair, &[(0, "down"), (1, "down")], "both network links down");
    stream_moves(pair, 300, "the stream over the mailbox alone");
    // Every link: the stream waits, and the nodes only say the interconnect is down.
    hostd_ok(pair, &["link", "a", "2", "down"]);
    links_are(pair, &[(2, "down")], "every link down");
    pair.wait_for(
        "an interconnect-down event",
        Duration::from_secs(30),
        |_| {
            pair.events().iter().any(|e| {
                matches!(
                    &e.event,
                    Event::InterconnectLink {
                        reachable: false,
                        ..
                    }
                )
            })
        },
    );
    let stalled = pair.status();
    std::thread::sleep(Duration::from_millis(500));
    let later = pair.status();
    assert!(
        stream(&later, "b", "a").0 <= stream(&stalled, "b", "a").0 + 5,
        "b still receives a's stream with every link of a cut"
    );
    for index in ["0", "1", "2"] {
        hostd_ok(pair, &["link", "a", index, "up"]);
    }
    links_are(pair, &[(0, "up"), (1, "up"), (2, "up")], "every link back");
    stream_moves(pair, 300, "the stream after every link came back");
    no_stream_errors(pair, "every link cut and restored");
    let text = hostd_ok(pair, &["status"]);
    assert!(text.contains("interconnect a -> b: network 0 "), "{text}");
    // A dead link is no dead node: nothing moved.
    let moved = pair
        .events()
        .into_iter()
        .filter(|e| matches!(e.event, Event::Takeover(_)))
        .count();
    assert_eq!(moved, 0, "a link failure moved an identity");
    let status = pair.status();
    for name in ["a", "b"] {
        assert_eq!(Pair::node(&status, name)["served_by"], name);
    }
    // Bad link numbers get a clear error.
    let (code, _, err) = pair.hostd(&["link", "a", "3", "down"]);
    assert_ne!(code, 0);
    assert!(err.contains("there is no link 3"), "{err}");
    negotiated_takeovers(pair);
}

/// The reason of the last takeover of `identity` in the event log.
fn last_takeover_reason(pair: &Pair, identity: &str) -> String {
    pair.events()
        .into_iter()
        .rev()
        .find_map(|e| match e.event {
            Event::Takeover(report) if report.node == identity => Some(report.reason),
            _ => None,
        })
        .unwrap_or_default()
}

/// A planned takeover asks the holder over the interconnect first; with every link cut it
/// goes on unnegotiated and says so.
fn negotiated_takeovers(pair: &Pair) {
    hostd_ok(pair, &["takeover", "a"]);
    let reason = last_takeover_reason(pair, "a");
    assert!(
        reason.contains("agreed by a over the interconnect"),
        "{reason}"
    );
    hostd_ok(pair, &["giveback", "a"]);
    for link in ["0", "1", "2"] {
        hostd_ok(pair, &["link", "b", link, "down"]);
    }
    links_are(pair, &[(0, "down"), (1, "down"), (2, "down")], "b cut off");
    hostd_ok(pair, &["takeover", "a"]);
    let reason = last_takeover_reason(pair, "a");
    assert!(
        reason.contains("not negotiated (b could not reach a over the interconnect)"),
        "{reason}"
    );
    hostd_ok(pair, &["giveback", "a"]);
    for link in ["0", "1", "2"] {
        hostd_ok(pair, &["link", "b", link, "up"]);
    }
}

#[test]
fn process_links_fail_over_exactly_once_and_move_nothing() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(common::NODE_B, &format!("{PROCESS}{STREAM}"));
    let started = Instant::now();
    links_cut_and_restored(&pair);
    eprintln!("process backend: {:.1} s", started.elapsed().as_secs_f64());
    hostd_ok(&pair, &["down", "--purge"]);
}

#[test]
fn vm_links_fail_over_exactly_once_and_move_nothing() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(common::NODE_B, STREAM);
    let started = Instant::now();
    links_cut_and_restored(&pair);
    // A node killed: its peer's links to it go down, and its identity moves as ever.
    hostd_ok(&pair, &["kill", "a"]);
    pair.wait_for("b serving a", Duration::from_secs(60), |s| {
        Pair::node(s, "a")["served_by"] == "b"
    });
    eprintln!("QEMU pair: {:.1} s", started.elapsed().as_secs_f64());
    hostd_ok(&pair, &["down", "--purge"]);
}
