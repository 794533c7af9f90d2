//! A hostd killed with SIGKILL and started again adopts the running pair: the guests serve
//! throughout, the restart alone moves nothing, and the new hostd monitors and fences as
//! the old one did. Process backend (fast) and real QEMU guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::ack_checker::AckedWriter;
use common::{FLUSH_DELAY, NODE_B, Pair, agent_prerequisite, alive, one_pair, prerequisites};
use wire::events::{Event, EventLine};

fn count(events: &[EventLine], kind: fn(&Event) -> bool) -> usize {
    events.iter().filter(|line| kind(&line.event)).count()
}

fn takeover(event: &Event) -> bool {
    matches!(event, Event::Takeover(_))
}

fn hostd_sigkill_then_adopt(pair: &Pair) {
    let epoch = pair.status()["epoch"].as_u64().unwrap();
    let takeovers = count(&pair.events(), takeover);
    let writer = AckedWriter::start(pair.addr(0), "a", 1, 0, 8192);
    writer.wait_for(100, "before the kill");

    let old_hostd = pair.kill_hostd();
    // No hostd: the guests serve on their own.
    writer.wait_for(100, "while no hostd ran");
    for pid in &pair.pids {
        assert!(alive(*pid), "node process {pid} died with hostd");
    }

    // No --config: the adopted pair keeps the configuration it was started with.
    let (code, out, err) = pair.hostd(&["up", "--detach", "--timeout", "60"]);
    assert_eq!(code, 0, "hostd up after the kill: {out}{err}");
    assert!(out.contains("adopted"), "{out}");
    let after = pair.status();
    assert_eq!(after["adopted"], true, "{after:#}");
    assert_ne!(after["hostd_pid"].as_u64().unwrap() as u32, old_hostd);
    assert_eq!(
        Pair::node_pids(&after),
        pair.pids,
        "the same processes, adopted: {after:#}"
    );
    pair.wait_for("both nodes up", Duration::from_secs(10), |status| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up")
    });
    // Past a whole heartbeat timeout (3 s by default): still nothing moved.
    writer.wait_for(100, "after the adoption");
    std::thread::sleep(Duration::from_millis(3500));
    let settled = pair.status();
    assert_eq!(settled["epoch"].as_u64().unwrap(), epoch, "{settled:#}");
    for node in ["a", "b"] {
        assert_eq!(Pair::node(&settled, node)["served_by"], node);
        assert_eq!(Pair::node(&settled, node)["state"], "up");
    }
    let recorded = pair.events();
    assert_eq!(count(&recorded, takeover), takeovers, "{recorded:#?}");
    assert_eq!(
        count(&recorded, |e| matches!(e, Event::PairAdopted { .. })),
        1
    );

    // The new hostd watches: a kill of a is a takeover by b, as before.
    let (code, out, err) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    pair.wait_for("a served by b", Duration::from_secs(30), |status| {
        Pair::node(status, "a")["served_by"] == "b"
    });
    writer.wait_for(100, "after the takeover");
    let history = writer.stop();
    let mut reader = pair.connect(0, "a");
    let report = history
        .verify(|offset| reader.read(offset, 4096).unwrap())
        .unwrap_or_else(|e| panic!("acknowledged writes lost: {e}"));
    eprintln!("hostd restart: {report:?}");
}

/// hostd dies while a node's QEMU boots (a giveback restarted it). The new hostd must see
/// a booting node, not an up one whose heartbeat then stops: the region still shows the
/// previous boot's heartbeat, and taking that for this boot's would fence the node.
#[test]
fn vm_hostd_killed_while_a_node_boots() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    // A heartbeat timeout shorter than a boot, so that mistaking the previous boot's
    // heartbeat for this one's would have the node judged down before its agent starts.
    let pair = Pair::up_with(NODE_B, "[heartbeat]\ntimeout_ms = 1500\n");
    let (code, out, err) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    pair.wait_for("a served by b", Duration::from_secs(30), |status| {
        Pair::node(status, "a")["served_by"] == "b"
    });
    // The giveback restarts a's QEMU; hostd dies during the boot.
    let booting_pid = std::thread::scope(|scope| {
        // The giveback's own command fails when hostd dies under it; that is the point.
        scope.spawn(|| pair.hostd(&["giveback", "a"]));
        pair.wait_for("a booting", Duration::from_secs(10), |status| {
            Pair::node(status, "a")["state"] == "booting"
        });
        let booting_pid = Pair::node(&pair.status(), "a")["pid"].as_u64().unwrap();
        pair.kill_hostd();
        booting_pid
    });
    let (code, out, err) = pair.hostd(&["up", "--detach", "--timeout", "60"]);
    assert_eq!(code, 0, "hostd up after the kill: {out}{err}");
    // Past a heartbeat timeout after the boot: a is up, the same process, never fenced.
    pair.wait_for("a up", Duration::from_secs(30), |status| {
        Pair::node(status, "a")["state"] == "up"
    });
    std::thread::sleep(Duration::from_millis(2000));
    let status = pair.status();
    let a = Pair::node(&status, "a");
    assert_eq!(a["state"], "up", "{status:#}");
    assert_eq!(a["pid"].as_u64(), Some(booting_pid), "{status:#}");
    assert_eq!(
        a["served_by"], "b",
        "the restart moved nothing back by itself"
    );
    let (code, out, err) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "giveback after the adoption: {out}{err}");
    assert_eq!(Pair::node(&pair.status(), "a")["served_by"], "a");
}

#[test]
fn process_hostd_sigkill_then_adopt() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("backend = \"process\"\n{FLUSH_DELAY}"));
    hostd_sigkill_then_adopt(&pair);
}

#[test]
fn vm_hostd_sigkill_then_adopt() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, FLUSH_DELAY);
    hostd_sigkill_then_adopt(&pair);
}
