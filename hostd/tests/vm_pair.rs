//! VM tests: a real pair of QEMU guests, booted by the real `hostd`.
//!
//! They need `qemu-system-x86_64` and the guest image (`scripts/build-guest-image.sh`).
//! Without them the tests say so and pass, except under CI (`CI=true`), where a missing
//! prerequisite is a failure: CI must never silently skip the VM tests.
//!
//! Every test kills its QEMU children (`hostd down`, then SIGKILL to any pid left) and, when
//! it fails, prints both guest consoles and the daemon log.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{MARKER, Pair, WRITE_PROBE_OFFSET, alive, prerequisites};
use serde_json::Value;
use wire::events::Event;

#[test]
fn the_pair_boots_and_each_guest_reads_its_partner() {
    if !prerequisites() {
        return;
    }
    let _one = common::one_pair();
    let pair = Pair::up("ivha.selftest=write-partner");

    // Both heartbeats advance, as hostd sees them.
    let first = pair.status();
    let beats = |s: &Value, n: &str| Pair::node(s, n)["heartbeat"].as_u64().unwrap();
    pair.wait_for("both heartbeats to advance", Duration::from_secs(30), |s| {
        beats(s, "a") > beats(&first, "a") + 2 && beats(s, "b") > beats(&first, "b") + 2
    });
    let status = pair.status();
    for name in ["a", "b"] {
        let node = Pair::node(&status, name);
        assert_eq!(node["state"], "up", "{node:#}");
        assert_eq!(node["served_by"], name);
        assert!(
            node["nbd"]
                .as_str()
                .unwrap()
                .starts_with("nbd://127.0.0.1:")
        );
    }
    assert_eq!(status["epoch"], 0);

    // What A publishes in its region (boot id, heartbeat), B reads through its read-only
    // mapping and reports in its own region; and the other way round.
    pair.wait_for(
        "each node to report its partner",
        Duration::from_secs(30),
        |s| {
            let (a, b) = (Pair::node(s, "a"), Pair::node(s, "b"));
            a["peer_boot_id"] == b["boot_id"]
                && b["peer_boot_id"] == a["boot_id"]
                && b["peer_heartbeat"].as_u64() > Some(0)
                && a["peer_heartbeat"].as_u64() > Some(0)
        },
    );
    let seen_before = Pair::node(&pair.status(), "b")["peer_heartbeat"]
        .as_u64()
        .unwrap();
    pair.wait_for(
        "b to see a's heartbeat move",
        Duration::from_secs(30),
        |s| Pair::node(s, "b")["peer_heartbeat"].as_u64().unwrap() > seen_before,
    );

    // B tried to store a marker into A's region and into its own. QEMU maps A's region
    // read-only into B: the store into its own region lands, the one into A's does not.
    let (a, b) = (pair.region("a"), pair.region("b"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.write_probe() != MARKER && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        b.write_probe(),
        MARKER,
        "the probe store into b's own region never landed"
    );
    assert_eq!(
        a.write_probe(),
        0,
        "b wrote into a's region at byte {WRITE_PROBE_OFFSET} through its read-only mapping"
    );
    // And B survived the attempt: its heartbeat still advances.
    let beat = b.heartbeat().unwrap().counter;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        b.heartbeat().unwrap().counter > beat,
        "b stopped beating after the probe"
    );
}

#[test]
fn down_leaves_no_qemu_behind() {
    if !prerequisites() {
        return;
    }
    let _one = common::one_pair();
    let pair = Pair::up("");
    let pids = pair.pids.clone();
    assert!(pids.iter().all(|p| alive(*p)), "both QEMUs run before down");
    let (code, stdout, stderr) = pair.hostd(&["down"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("node a: quit cleanly"), "{stdout}");
    assert!(stdout.contains("node b: quit cleanly"), "{stdout}");
    for pid in pids {
        assert!(!alive(pid), "QEMU {pid} is still running after hostd down");
    }
    // The event log tells the story: both nodes came up, then the pair stopped.
    let events = pair.events();
    let kinds: Vec<String> = events
        .iter()
        .map(|line| match &line.event {
            Event::NodeState { node, from, to, .. } => {
                format!("{node} {}->{}", from.as_str(), to.as_str())
            }
            Event::PairStarting { .. } => "pair_starting".to_owned(),
            Event::PairStopped { .. } => "pair_stopped".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("pair_starting"),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"a booting->up".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"b booting->up".to_owned()), "{kinds:?}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("pair_stopped"),
        "{kinds:?}"
    );
    assert!(events.iter().all(|line| line.time_unix_ms > 0));

    // State was kept (no --purge): a region still has its header and the agent's boot id.
    assert_ne!(pair.region("a").boot_id(), 0);
    let (code, _, stderr) = pair.hostd(&["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no hostd is running"), "{stderr}");
}

/// Clients that connect and idle cannot cut a guest off (an adversarial pass found 340 of
/// them exhausted the agent's descriptors). In a real guest, 400 idle clients of node a:
/// the export's limit (128 by default) are served, the rest are refused with the reason
/// and counted, node a stays up, and a's data and b's export stay reachable.
#[test]
fn idle_clients_cannot_cut_a_guest_off() {
    if !prerequisites() {
        return;
    }
    const CLIENTS: usize = 400;
    const LIMIT: usize = 128;
    let _one = common::one_pair();
    let pair = Pair::up("");
    let mut a = pair.connect(0, "a");
    let blocks = common::blocks::random_blocks(8, 41, a.size());
    common::blocks::write_blocks(&mut a, &blocks);
    a.disconnect();

    let mut idle = Vec::new();
    let mut refused = 0;
    for i in 0..CLIENTS {
        match campaign::nbd_client::NbdClient::connect(pair.addr(0), "a", Duration::from_secs(20)) {
            Ok(client) => idle.push(client),
            Err(error) => {
                let text = error.to_string();
                assert!(
                    text.contains("its limit"),
                    "client {i} failed otherwise: {text}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(idle.len(), LIMIT, "{refused} refused");
    // The agent publishes its counters with each heartbeat.
    pair.wait_for("a's refusals counted", Duration::from_secs(10), |status| {
        Pair::node(status, "a")["nbd_refused"].as_u64() >= Some(refused as u64)
    });
    let status = pair.status();
    assert_eq!(Pair::node(&status, "a")["state"], "up", "{status}");
    pair.connect(1, "b").disconnect();
    drop(idle);
    // The served ones close; a new client gets in and reads what was written.
    common::blocks::verify_blocks(&mut pair.connect(0, "a"), &blocks, "after 400 idle clients");
}
