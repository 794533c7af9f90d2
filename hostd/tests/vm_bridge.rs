//! Bridge mode end to end: two QEMU guests with NICs on a bridge in a network namespace the
//! test has hostd create, and a real NBD client (qemu-io) in that namespace writing through
//! a's service IP. a is killed: the same IP serves every acknowledged byte through b, and the
//! client's ARP entry for it now holds b's MAC. The giveback moves the IP (and the MAC) back;
//! a planned takeover moves it again; a restarted hostd adopts the guests without moving
//! anything. After every move exactly one MAC answers for each service IP. `hostd down
//! --purge` removes the namespace.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::bridge::{Client, Written, mac_of};
use common::{Pair, one_pair, wait_served_by};

fn hostd_ok(pair: &Pair, args: &[&str]) {
    let (code, stdout, stderr) = pair.hostd(args);
    assert_eq!(code, 0, "hostd {args:?}: {stdout}{stderr}");
}

#[test]
fn vm_bridge_service_ip_follows_its_identity() {
    if !common::bridge::prerequisites() {
        return;
    }
    let _one = one_pair();
    let tag = std::process::id() % 100_000;
    let netns = format!("ivha-test-{tag}");
    let bridge = format!("ivt{tag}");
    let extra = format!(
        "[network]\nmode = \"bridge\"\nbridge = \"{bridge}\"\nnetns = \"{netns}\"\nbridge_address = \"10.78.0.1/24\"\n[flusher]\ndelay_ms = 500\n"
    );
    let (ip_a, ip_b) = ("10.78.0.11", "10.78.0.12");
    let pair = Pair::up_nodes(
        &[
            &format!(
                "[[node]]\nname = \"a\"\naddress = \"10.78.0.2/24\"\nservice_ip = \"{ip_a}/24\"\n"
            ),
            &format!(
                "[[node]]\nname = \"b\"\naddress = \"10.78.0.3/24\"\nservice_ip = \"{ip_b}/24\"\n"
            ),
        ],
        &extra,
    );
    let status = pair.status();
    assert_eq!(
        Pair::node(&status, "a")["nbd"],
        format!("nbd://{ip_a}:10809/a"),
        "status names the service IP"
    );
    let client = Client {
        netns: netns.clone(),
    };
    let (mac_a, mac_b) = (mac_of(&pair, "a"), mac_of(&pair, "b"));
    assert_ne!(mac_a, mac_b);

    let mut written = Written::default();
    written.write(&client, ip_a, "a", &[0x11, 0x12, 0x13]);
    written.verify(&client, ip_a, "a");
    assert_eq!(client.neighbour(ip_a), Some(mac_a.clone()));
    let mut written_b = Written::default();
    written_b.write(&client, ip_b, "b", &[0x21]);

    // hostd killed and started again adopts the guests: the addresses and MACs stay.
    pair.kill_hostd();
    written.verify(&client, ip_a, "a");
    let (code, out, err) = pair.hostd(&["up", "--detach", "--timeout", "60"]);
    assert_eq!(code, 0, "hostd up after the kill: {out}{err}");
    assert!(out.contains("adopted"), "{out}");
    assert_eq!(
        (mac_of(&pair, "a"), mac_of(&pair, "b")),
        (mac_a.clone(), mac_b.clone())
    );
    // Nothing on the bridge changed: the client's entry is still there, unflushed.
    assert_eq!(client.neighbour(ip_a), Some(mac_a.clone()));
    assert_eq!(client.holders(&bridge, ip_a), vec![mac_a.clone()]);
    written.verify(&client, ip_a, "a");

    // A crash: the same IP, every acknowledged byte, b's MAC. The bridge keeps its own MAC
    // while a's tap goes (else b would answer the client at a MAC gone stale).
    let bridge_mac = client.bridge_mac(&bridge);
    hostd_ok(&pair, &["kill", "a"]);
    wait_served_by(&pair, "a", "b", Duration::from_secs(60));
    // No traffic yet: only b's gratuitous ARPs can have changed the entry.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.neighbour(ip_a) != Some(mac_b.clone()) {
        assert!(
            Instant::now() < deadline,
            "b's announcement did not reach the client: its entry is {:?}",
            client.neighbour(ip_a)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    written.verify(&client, ip_a, "a");
    assert_eq!(mac_of(&pair, "a"), mac_b, "status: b holds a's IP");
    assert_eq!(client.holders(&bridge, ip_a), vec![mac_b.clone()]);
    assert_eq!(client.bridge_mac(&bridge), bridge_mac);
    assert_eq!(
        client.neighbour(ip_a),
        Some(mac_b.clone()),
        "the client's ARP entry follows the address"
    );
    written.write(&client, ip_a, "a", &[0x14, 0x15]);
    written_b.verify(&client, ip_b, "b");

    // The giveback moves the IP home.
    hostd_ok(&pair, &["giveback", "a"]);
    wait_served_by(&pair, "a", "a", Duration::from_secs(60));
    written.verify(&client, ip_a, "a");
    client.held_by(&bridge, ip_a, &mac_a, "b dropped it");

    // A planned takeover: the old owner drops the address first.
    hostd_ok(&pair, &["takeover", "a"]);
    wait_served_by(&pair, "a", "b", Duration::from_secs(60));
    written.verify(&client, ip_a, "a");
    client.held_by(&bridge, ip_a, &mac_b, "a dropped it");
    written.write(&client, ip_a, "a", &[0x16]);
    hostd_ok(&pair, &["giveback", "a"]);
    wait_served_by(&pair, "a", "a", Duration::from_secs(60));
    written.verify(&client, ip_a, "a");
    written_b.verify(&client, ip_b, "b");
    client.held_by(&bridge, ip_a, &mac_a, "b dropped it");
    assert_eq!(client.holders(&bridge, ip_b), [mac_b]);

    drop(pair);
    assert!(
        !std::path::Path::new("/run/netns").join(&netns).exists(),
        "down --purge removes the namespace hostd made"
    );
}
