//! Takeover end to end, through the real `hostd` and real NBD traffic: kill, hang and
//! panic a node, check that its partner serves every acknowledged write at the node's
//! unchanged address, then give it back. Each scenario runs with the process backend
//! (fast) and, where it needs a guest kernel or a QEMU, with real QEMU guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::ack_checker::AckedWriter;
use common::blocks::{random_blocks, verify_blocks, write_blocks};
use common::{
    FLUSH_DELAY, NODE_B, PROCESS, Pair, agent_prerequisite, one_pair, prerequisites, served_by,
    wait_served_by,
};
use wire::control::MoveReport;
use wire::events::Event;

const PAUSED: &str = "[flusher]\npaused = true\n";
/// The last takeover of identity `node`.
fn last_takeover(pair: &Pair, node: &str) -> MoveReport {
    pair.events()
        .into_iter()
        .rev()
        .find_map(|line| match line.event {
            Event::Takeover(report) if report.node == node => Some(report),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no takeover event for {node}: {:#?}", pair.events()))
}

fn unflushed(pair: &Pair, node: &str) -> u64 {
    let status = pair.status();
    let n = Pair::node(&status, node);
    n["head_seq"].as_u64().unwrap() - n["flushed_seq"].as_u64().unwrap()
}

/// Kill: with the flusher paused, 64 random blocks to a; SIGKILL a's QEMU; every block
/// reads back through a's unchanged address (served by b), and b's own export is intact.
/// Then a comes back, takes its identity back, and serves everything, including what was
/// written to it while b held it.
fn kill_then_giveback(pair: &Pair) {
    let mut a = pair.connect(0, "a");
    let size = a.size();
    let before = random_blocks(64, 1, size);
    write_blocks(&mut a, &before);
    let mut b = pair.connect(1, "b");
    let b_blocks = random_blocks(16, 2, size);
    write_blocks(&mut b, &b_blocks);
    assert!(
        unflushed(pair, "a") >= 64,
        "a's writes are still in its log"
    );

    let (code, out, err) = pair.hostd(&["kill", "a", "--signal", "kill"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    wait_served_by(pair, "a", "b", Duration::from_secs(30));
    let takeover = last_takeover(pair, "a");
    assert_eq!(takeover.to, "b");
    // "QEMU exited (...)" or "agent process exited (...)", by backend.
    assert!(takeover.reason.contains(" exited ("), "{takeover:?}");
    assert!(takeover.replayed_records >= 64, "{takeover:?}");
    assert!(takeover.replay_complete);

    let mut a = pair.connect(0, "a");
    verify_blocks(&mut a, &before, "a's blocks through a's address");
    verify_blocks(&mut pair.connect(1, "b"), &b_blocks, "b's own blocks");
    // Writes to a while b holds it go through b's log.
    let during = random_blocks(32, 3, size);
    write_blocks(&mut a, &during);
    a.disconnect();

    // b served a's log from a's region first and replayed it in the background; hostd
    // records when that replay ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    let replayed = loop {
        let found = pair.events().into_iter().find_map(|line| match line.event {
            Event::Replayed {
                node,
                by,
                from,
                after_ms,
                complete,
                last_seq,
                ..
            } if node == "a" => Some((by, from, after_ms, complete, last_seq)),
            _ => None,
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no replayed event for a");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((replayed.0.as_str(), replayed.1.as_str()), ("b", "a"));
    assert!(replayed.3, "the replay is complete");
    assert_eq!(replayed.4, takeover.replayed_last_seq);
    assert!(
        replayed.2 >= takeover.timeline_ms.scanned.unwrap(),
        "the replay ends after the scan: {replayed:?} {takeover:?}"
    );

    let (code, out, err) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "hostd giveback: {out}{err}");
    assert_eq!(served_by(pair, "a"), "a");
    let mut a = pair.connect(0, "a");
    verify_blocks(&mut a, &before, "a's first blocks after giveback");
    let later: Vec<_> = during
        .iter()
        .filter(|(o, _)| before.iter().all(|(p, _)| p != o))
        .cloned()
        .collect();
    verify_blocks(
        &mut a,
        &later,
        "blocks written while b held a, after giveback",
    );
    verify_blocks(
        &mut pair.connect(1, "b"),
        &b_blocks,
        "b's own blocks after giveback",
    );
}

/// Continuous writes while a is killed: every write whose reply reached the client is
/// readable after the takeover.
///
/// The slots outnumber the writes, so no later write can hide a lost one; the pair runs
/// with a flush delay, so the writes just before the kill are only in a's log.
fn continuous_writes_during_kill(pair: &Pair) {
    let writer = AckedWriter::start(pair.addr(0), "a", 1, 0, 8192);
    let deadline = Instant::now() + Duration::from_secs(30);
    while writer.acked() < 200 {
        assert!(Instant::now() < deadline, "the writer makes no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, out, err) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    wait_served_by(pair, "a", "b", Duration::from_secs(30));
    // Keep writing through the takeover until the writer is well past it.
    let acked_at_takeover = writer.acked();
    let deadline = Instant::now() + Duration::from_secs(60);
    while writer.acked() < acked_at_takeover + 200 {
        assert!(
            Instant::now() < deadline && !writer.finished(),
            "the writer did not resume after the takeover"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let history = writer.stop();
    let mut reader = pair.connect(0, "a");
    let report = history
        .verify(|offset| reader.read(offset, 4096).unwrap())
        .unwrap_or_else(|e| panic!("acknowledged writes lost: {e}"));
    eprintln!(
        "continuous writes: {report:?}, longest gap between acks {:?}",
        history.max_gap()
    );
    assert!(report.acked >= 400);
}

#[test]
fn process_kill_then_giveback() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("{PROCESS}{PAUSED}"));
    kill_then_giveback(&pair);
}

#[test]
fn process_continuous_writes_during_kill() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("{PROCESS}{FLUSH_DELAY}"));
    continuous_writes_during_kill(&pair);
}

#[test]
fn process_planned_takeover_loses_nothing() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("{PROCESS}{PAUSED}"));
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(64, 4, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();
    let (code, out, err) = pair.hostd(&["takeover", "a"]);
    assert_eq!(code, 0, "hostd takeover: {out}{err}");
    assert_eq!(served_by(&pair, "a"), "b");
    assert_eq!(
        unflushed(&pair, "a"),
        0,
        "a flushed its log when it released"
    );
    let status = pair.status();
    assert_eq!(Pair::node(&status, "a")["state"], "up", "a keeps running");
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after planned takeover");
    let (code, out, err) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "hostd giveback: {out}{err}");
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after giveback");
}

#[test]
fn process_refuses_what_makes_no_sense() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PROCESS);
    for (args, message) in [
        (&["giveback", "a"][..], "nothing to give back"),
        (&["takeover", "z"][..], "no node is called"),
        (&["kill", "a", "--signal", "panic"][..], "cannot panic"),
    ] {
        let (code, out, err) = pair.hostd(args);
        assert_ne!(code, 0, "{args:?} should fail: {out}");
        assert!(err.contains(message), "{args:?}: {err}");
    }
    assert_eq!(served_by(&pair, "a"), "a");
}

#[test]
fn vm_kill_then_giveback() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PAUSED);
    kill_then_giveback(&pair);
}

#[test]
fn vm_continuous_writes_during_kill() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, FLUSH_DELAY);
    continuous_writes_during_kill(&pair);
}

/// Hang: SIGSTOP a's QEMU. hostd sees every thread of the QEMU stopped at its next sample,
/// long before the heartbeat could time out; a is fenced (killed and reaped, so it never
/// serves again) and b takes over.
#[test]
fn vm_hang_is_detected_from_the_stopped_process() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(
        NODE_B,
        "[heartbeat]\ninterval_ms = 100\ntimeout_ms = 2000\n",
    );
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(16, 5, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();
    let a_pid = pair.pids[0];
    let (code, out, err) = pair.hostd(&["kill", "a", "--signal", "stop"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(30));
    let takeover = last_takeover(&pair, "a");
    assert_eq!(
        takeover.reason, "every thread of its QEMU is stopped (SIGSTOP or a debugger)",
        "{takeover:?}"
    );
    assert!(!common::alive(a_pid), "the hung QEMU was killed and reaped");
    let status = pair.status();
    assert_eq!(Pair::node(&status, "a")["state"], "fenced");
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after a hang");
}

/// Panic: the guest kernel panics (NMI); QEMU's GUEST_PANICKED event triggers the
/// takeover, long before the (deliberately long) heartbeat timeout could.
#[test]
fn vm_panic_is_detected_from_the_qmp_event() {
    if !prerequisites() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(
        NODE_B,
        &format!("{PAUSED}[heartbeat]\ninterval_ms = 100\ntimeout_ms = 30000\n"),
    );
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(16, 6, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();
    let started = Instant::now();
    let (code, out, err) = pair.hostd(&["kill", "a", "--signal", "panic"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(20));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "detected by the event, not the 30 s timeout"
    );
    let takeover = last_takeover(&pair, "a");
    assert_eq!(takeover.reason, "guest kernel panicked", "{takeover:?}");
    // (a's console may not show the panic message: hostd fences the guest as soon as
    // QEMU reports the panic, before the kernel has flushed its console.)
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after a panic");
}
