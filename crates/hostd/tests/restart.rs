//! A hostd killed with SIGKILL and started again adopts the running pair: the guests serve
//! throughout, the restart alone moves nothing, and the new hostd monitors and fences as
//! the old one did. Process backend (fast) and real QEMU guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::ack_checker::AckedWriter;
use common::{Pair, agent_prerequisite, alive, prerequisites};
use serde_json::Value;

/// One pair at a time: two TCG pairs on a small machine starve each other's heartbeats.
static ONE_PAIR: Mutex<()> = Mutex::new(());

fn one_pair() -> std::sync::MutexGuard<'static, ()> {
    ONE_PAIR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const NODE_B: &str = "[[node]]\nname = \"b\"\n";
const FLUSH_DELAY: &str = "[flusher]\ndelay_ms = 200\n";

fn events(pair: &Pair) -> Vec<Value> {
    std::fs::read_to_string(pair.state.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

/// Waits until `writer` has `more` acknowledgements beyond what it had.
fn wait_for_acks(writer: &AckedWriter, more: u64, what: &str) {
    let target = writer.acked() + more;
    let deadline = Instant::now() + Duration::from_secs(60);
    while writer.acked() < target {
        assert!(
            Instant::now() < deadline && !writer.finished(),
            "{what}: the writer stalled at {} acknowledgements",
            writer.acked()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hostd_sigkill_then_adopt(pair: &Pair) {
    let before = pair.status();
    let old_hostd = before["hostd_pid"].as_u64().unwrap() as u32;
    let epoch = before["epoch"].as_u64().unwrap();
    let takeovers = count(&events(pair), "takeover");
    let writer = AckedWriter::start(
        SocketAddr::from(([127, 0, 0, 1], pair.ports[0])),
        "a",
        1,
        0,
        8192,
    );
    wait_for_acks(&writer, 100, "before the kill");

    let killed = std::process::Command::new("kill")
        .args(["-KILL", &old_hostd.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(old_hostd) {
        assert!(
            Instant::now() < deadline,
            "hostd {old_hostd} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // No hostd: the guests serve on their own.
    wait_for_acks(&writer, 100, "while no hostd ran");
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
    let pids: Vec<u32> = after["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert_eq!(pids, pair.pids, "the same processes, adopted: {after:#}");
    pair.wait_for("both nodes up", Duration::from_secs(10), |status| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up")
    });
    // Past a whole heartbeat timeout (3 s by default): still nothing moved.
    wait_for_acks(&writer, 100, "after the adoption");
    std::thread::sleep(Duration::from_millis(3500));
    let settled = pair.status();
    assert_eq!(settled["epoch"].as_u64().unwrap(), epoch, "{settled:#}");
    for node in ["a", "b"] {
        assert_eq!(Pair::node(&settled, node)["served_by"], node);
        assert_eq!(Pair::node(&settled, node)["state"], "up");
    }
    let recorded = events(pair);
    assert_eq!(count(&recorded, "takeover"), takeovers, "{recorded:#?}");
    assert_eq!(count(&recorded, "pair_adopted"), 1);

    // The new hostd watches: a kill of a is a takeover by b, as before.
    let (code, out, err) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    pair.wait_for("a served by b", Duration::from_secs(30), |status| {
        Pair::node(status, "a")["served_by"] == "b"
    });
    wait_for_acks(&writer, 100, "after the takeover");
    let history = writer.stop();
    let mut reader = loop {
        match campaign::nbd_client::NbdClient::connect(
            SocketAddr::from(([127, 0, 0, 1], pair.ports[0])),
            "a",
            Duration::from_secs(5),
        ) {
            Ok(client) => break client,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let report = history
        .verify(|offset| reader.read(offset, 4096).unwrap())
        .unwrap_or_else(|e| panic!("acknowledged writes lost: {e}"));
    eprintln!("hostd restart: {report:?}");
}

fn kill_hostd(pair: &Pair) {
    let pid = pair.status()["hostd_pid"].as_u64().unwrap() as u32;
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "hostd {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
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
    let state = pair.state.path().to_owned();
    let giveback = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
            .args(["giveback", "a"])
            .env("IVHA_STATE_DIR", state)
            .output()
            .unwrap()
    });
    pair.wait_for("a booting", Duration::from_secs(10), |status| {
        Pair::node(status, "a")["state"] == "booting"
    });
    let booting_pid = Pair::node(&pair.status(), "a")["pid"].as_u64().unwrap();
    kill_hostd(&pair);
    let _ = giveback.join();
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
