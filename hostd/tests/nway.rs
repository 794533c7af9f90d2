//! N-way clusters end to end, through the real `hostd` and real NBD traffic: in clusters of
//! three and four nodes, kill a node, then the node that took its identity over; every
//! acknowledged write reads back through each identity's unchanged address; then every
//! identity goes home. With the process backend (fast) and with real QEMU guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::blocks::random_blocks;
use common::{NODE_NAMES, PROCESS, Pair, agent_prerequisite, one_pair, prerequisites};
use wire::events::Event;

/// Keeps the writes in the logs, so each takeover has a log to replay.
const PAUSED: &str = "[flusher]\npaused = true\n";

/// What each identity's clients were told was written: offset → block, newest last.
struct Model {
    blocks: Vec<BTreeMap<u64, Vec<u8>>>,
    size: u64,
    seed: u64,
}

impl Model {
    fn new(pair: &Pair, n: usize) -> Self {
        Self {
            blocks: vec![BTreeMap::new(); n],
            size: pair.connect(0, "a").size(),
            seed: 1,
        }
    }

    /// Writes `count` random blocks through identity `index`'s address.
    fn write(&mut self, pair: &Pair, index: usize, count: usize) {
        self.seed += 1;
        let mut client = pair.connect(index, NODE_NAMES[index]);
        for (offset, data) in random_blocks(count, self.seed, self.size) {
            client.write(offset, &data, false).unwrap();
            self.blocks[index].insert(offset, data);
        }
        client.disconnect();
    }

    /// Reads every acknowledged block of every identity through its own address.
    fn verify(&self, pair: &Pair, when: &str) {
        for (index, blocks) in self.blocks.iter().enumerate() {
            let name = NODE_NAMES[index];
            let mut client = pair.connect(index, name);
            for (offset, data) in blocks {
                let read = client.read(*offset, data.len() as u32).unwrap();
                assert!(
                    read == *data,
                    "{when}: identity {name} at offset {offset} does not read back what was acknowledged"
                );
            }
            client.disconnect();
        }
    }
}

fn hostd_ok(pair: &Pair, args: &[&str]) -> String {
    let (code, out, err) = pair.hostd(args);
    assert_eq!(code, 0, "hostd {args:?}: {out}{err}");
    out
}

fn served_by_all(pair: &Pair, expected: &[(&str, &str)], timeout: Duration) {
    let what = format!("{expected:?}");
    pair.wait_for(&what, timeout, |status| {
        expected
            .iter()
            .all(|(identity, by)| Pair::node(status, identity)["served_by"] == *by)
    });
}

/// Kill a (b takes it over), then kill b, which holds a's identity and its own (c takes
/// both, replaying b's log for each); every write reads back at every step; then a and b
/// take their identities back.
fn node_then_its_taker(pair: &Pair, n: usize, timeout: Duration) {
    let mut model = Model::new(pair, n);
    for index in 0..n {
        model.write(pair, index, 24);
    }

    hostd_ok(pair, &["kill", "a", "--signal", "kill"]);
    served_by_all(pair, &[("a", "b")], timeout);
    model.verify(pair, "after a was killed");
    // Written to a while b holds it: these are in b's log only.
    model.write(pair, 0, 24);
    model.write(pair, 1, 8);

    hostd_ok(pair, &["kill", "b", "--signal", "kill"]);
    served_by_all(pair, &[("a", "c"), ("b", "c")], timeout);
    model.verify(pair, "after a's taker b was killed");
    let from_b: Vec<(String, u64)> = pair
        .events()
        .into_iter()
        .filter_map(|line| match line.event {
            Event::Takeover(report) if report.from == "b" && report.to == "c" => {
                Some((report.node, report.replayed_records))
            }
            _ => None,
        })
        .collect();
    let replayed_for_a = from_b.iter().find(|(node, _)| node == "a");
    assert!(
        replayed_for_a.is_some_and(|(_, records)| *records >= 24),
        "c took a over from b, replaying b's records for a: {from_b:?}"
    );
    assert!(
        from_b.iter().any(|(node, _)| node == "b"),
        "c took b over from b: {from_b:?}"
    );
    model.write(pair, 0, 8);
    model.write(pair, 1, 8);
    if n > 3 {
        model.write(pair, 3, 8);
    }

    for home in ["a", "b"] {
        hostd_ok(pair, &["giveback", home]);
    }
    let home: Vec<(&str, &str)> = NODE_NAMES[..n].iter().map(|name| (*name, *name)).collect();
    served_by_all(pair, &home, timeout);
    model.verify(pair, "after the givebacks");
    for index in 0..n {
        model.write(pair, index, 4);
    }
    model.verify(pair, "after writes at home");
}

/// A planned takeover to a chosen node, and back.
fn takeover_to(pair: &Pair, timeout: Duration) {
    let mut model = Model::new(pair, 3);
    model.write(pair, 0, 16);
    hostd_ok(pair, &["takeover", "a", "--to", "c"]);
    served_by_all(pair, &[("a", "c")], timeout);
    model.verify(pair, "after a was moved to c");
    model.write(pair, 0, 8);
    hostd_ok(pair, &["giveback", "a"]);
    served_by_all(pair, &[("a", "a")], timeout);
    model.verify(pair, "after a came home");
}

#[test]
fn process_three_nodes_survive_a_node_and_then_its_taker() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_n(3, &format!("{PROCESS}{PAUSED}"));
    node_then_its_taker(&pair, 3, Duration::from_secs(30));
    takeover_to(&pair, Duration::from_secs(30));
}

#[test]
fn process_four_nodes_survive_a_node_and_then_its_taker() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_n(4, &format!("{PROCESS}{PAUSED}"));
    node_then_its_taker(&pair, 4, Duration::from_secs(30));
}

#[test]
fn vm_three_guests_survive_a_guest_and_then_its_taker() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_n(3, PAUSED);
    node_then_its_taker(&pair, 3, Duration::from_secs(120));
    takeover_to(&pair, Duration::from_secs(120));
}

#[test]
fn vm_four_guests_survive_a_guest_and_then_its_taker() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_n(4, PAUSED);
    node_then_its_taker(&pair, 4, Duration::from_secs(180));
}
