//! VM tests of the storage daemon: the guests' disks over vhost-user-blk from `ivha-blkd`,
//! with a reservation per disk. A node fenced at the storage cannot write its disk; its
//! identity moves with every acknowledged write; a kill preempts before the takeover; and
//! the daemon killed under a write load comes back with nothing lost.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::blocks::{random_blocks, verify_blocks, write_blocks};
use common::{Pair, alive, prerequisites, wait_served_by};
use serde_json::Value;
use wire::events::Event;

/// Records stay in the log a while, so a fence finds some unflushed.
const SLOW_FLUSHER: &str = "[flusher]\ndelay_ms = 1500\n";

fn disk<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {status:#}"))
}

fn registered(status: &Value, name: &str) -> Vec<String> {
    disk(status, name)["registered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

fn console(pair: &Pair, name: &str) -> String {
    std::fs::read_to_string(pair.state.path().join(format!("consoles/{name}.log")))
        .unwrap_or_default()
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_fenced_at_the_storage_cannot_write_and_its_identity_moves_whole() {
    if !prerequisites() {
        return;
    }
    let _one = common::one_pair();
    let pair = Pair::up_with("[[node]]\nname = \"b\"\n", SLOW_FLUSHER);
    let status = pair.status();
    let blkd = status["storage_pid"].as_u64().unwrap() as u32;
    assert!(alive(blkd));
    for name in ["a", "b"] {
        assert_eq!(registered(&status, name), ["a", "b"], "{status:#}");
        assert_eq!(disk(&status, name)["holder"], name, "{status:#}");
    }

    // Acknowledged writes, some still in a's log when it is fenced.
    let blocks = random_blocks(48, 16, 64 << 20);
    let mut client = pair.connect(0, "a");
    write_blocks(&mut client, &blocks);
    drop(client);
    let a_pid = pair.pids[0];

    let (code, stdout, stderr) = pair.hostd(&["fence", "a", "--keep-running"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("keeps running"), "{stdout}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(60));
    let status = pair.status();
    assert!(alive(a_pid), "a's QEMU must keep running");
    assert_eq!(Pair::node(&status, "a")["state"], "fenced");
    for name in ["a", "b"] {
        assert_eq!(registered(&status, name), ["b"], "{status:#}");
        assert_eq!(disk(&status, name)["holder"], "b", "{status:#}");
    }
    // Every acknowledged write, through a's address, now served by b.
    let mut client = pair.connect(0, "a");
    verify_blocks(&mut client, &blocks, "after the fence, through b");
    drop(client);

    // a's flusher still holds records; the daemon refuses them at the device.
    wait_until(
        "a's write to its disk to fail at the device",
        Duration::from_secs(30),
        || console(&pair, "a").contains("I/O error"),
    );
    assert!(alive(a_pid));
    // Its agent stopped serving a, and says why in its region; status shows it.
    pair.wait_for(
        "a's agent to say it stopped serving a",
        Duration::from_secs(30),
        |s| {
            Pair::node(s, "a")["stopped_serving"]
                .as_str()
                .is_some_and(|why| why.starts_with("stopped serving a at epoch 1"))
        },
    );
    let events = pair.events();
    let preempted = events
        .iter()
        .filter(|e| matches!(&e.event, Event::DiskPreempted { node, by, .. } if node == "a" && by == "b"))
        .count();
    assert_eq!(preempted, 2, "one preemption per disk: {events:#?}");

    // unfence stops the stale node; giveback restarts it and it serves again.
    let (code, stdout, stderr) = pair.hostd(&["unfence", "a"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    wait_until(
        "a's old QEMU to be stopped",
        Duration::from_secs(10),
        || !alive(a_pid),
    );
    let (code, stdout, stderr) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    wait_served_by(&pair, "a", "a", Duration::from_secs(60));
    let status = pair.status();
    assert_eq!(registered(&status, "a"), ["a", "b"], "{status:#}");
    let mut client = pair.connect(0, "a");
    verify_blocks(&mut client, &blocks, "after the giveback, through a");
    // And a writes its disk again.
    let more = random_blocks(8, 17, 64 << 20);
    write_blocks(&mut client, &more);
    verify_blocks(&mut client, &more, "new writes after the giveback");
}

#[test]
fn a_kill_preempts_before_the_takeover_and_the_daemon_restarts_under_load() {
    if !prerequisites() {
        return;
    }
    let _one = common::one_pair();
    let pair = Pair::up_with("[[node]]\nname = \"b\"\n", SLOW_FLUSHER);
    let blocks = random_blocks(32, 18, 64 << 20);
    let mut client = pair.connect(0, "a");
    write_blocks(&mut client, &blocks);
    drop(client);

    let (code, _, stderr) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "{stderr}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(60));
    let events = pair.events();
    let position = |found: &dyn Fn(&Event) -> bool| {
        events
            .iter()
            .position(|e| found(&e.event))
            .unwrap_or_else(|| panic!("missing event in {events:#?}"))
    };
    let preempted = position(
        &|e| matches!(e, Event::DiskPreempted { node, disk, .. } if node == "a" && disk == "a"),
    );
    let serving = position(
        &|e| matches!(e, Event::ServingStarted { identity, node, .. } if identity == "a" && node == "b"),
    );
    assert!(
        preempted < serving,
        "the fence preempts before b serves: {events:#?}"
    );
    let mut client = pair.connect(0, "a");
    verify_blocks(&mut client, &blocks, "after the kill, through b");
    drop(client);

    // The storage daemon SIGKILLed while b writes and flushes: hostd starts it again, QEMU
    // reconnects, and the guest's disk I/O resumes without an error.
    let writer = common::ack_checker::AckedWriter::start(pair.addr(1), "b", 7, 0, 256);
    std::thread::sleep(Duration::from_secs(2));
    let old = pair.status()["storage_pid"].as_u64().unwrap() as u32;
    let errors_before = console(&pair, "b").matches("I/O error").count();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-KILL", &old.to_string()])
            .status()
            .unwrap()
            .success()
    );
    pair.wait_for(
        "hostd to start the storage daemon again",
        Duration::from_secs(30),
        |s| s["storage_pid"].as_u64().is_some_and(|p| p as u32 != old),
    );
    let restarted = killed.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    let history = writer.stop();
    assert!(history.gave_up.is_none(), "{:?}", history.gave_up);
    assert_eq!(
        history
            .ops
            .iter()
            .filter(|op| op.outcome != common::ack_checker::Outcome::Acked)
            .count(),
        0,
        "no client error across the daemon's restart"
    );
    // b's flusher catches up through the new daemon.
    wait_until("b's log to be flushed", Duration::from_secs(60), || {
        let region = pair.region("b");
        region.head().map(|h| h.seq) == region.flushed().map(|f| f.seq)
    });
    assert_eq!(
        console(&pair, "b").matches("I/O error").count(),
        errors_before,
        "the guest saw an I/O error across the daemon's restart"
    );
    let mut client = pair.connect(1, "b");
    let report = history
        .verify(|offset| client.read(offset, 4096).unwrap())
        .unwrap();
    eprintln!(
        "storage daemon restarted {restarted:?} after its kill; {} writes acknowledged, longest gap {:?}",
        report.acked,
        history.max_gap()
    );
    let events = pair.events();
    assert!(
        events.iter().any(
            |e| matches!(&e.event, Event::StorageStarted { pid, adopted: false } if *pid != old)
        )
    );
}
