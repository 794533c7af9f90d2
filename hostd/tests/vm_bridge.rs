//! Bridge mode end to end: two QEMU guests with NICs on a bridge in a network namespace the
//! test has hostd create, and a real NBD client (qemu-io) in that namespace writing through
//! a's service IP. a is killed: the same IP serves every acknowledged byte through b, and the
//! client's ARP entry for it now holds b's MAC. The giveback moves the IP (and the MAC) back;
//! a planned takeover moves it again; a restarted hostd adopts the guests without moving
//! anything. After every move exactly one MAC answers for each service IP. `hostd down
//! --purge` removes the namespace.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pair, one_pair, prerequisites, tool, wait_served_by};

/// A client in the test's namespace.
struct Client {
    netns: String,
}

impl Client {
    /// Runs qemu-io commands on export `name` at `ip`, retrying the connection while the
    /// address moves; panics if a command fails (a write not acknowledged, a pattern that
    /// does not read back).
    fn qemu_io(&self, ip: &str, name: &str, commands: &[String]) -> String {
        let uri = format!("nbd://{ip}:10809/{name}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &self.netns, "qemu-io", "-f", "raw", &uri]);
            for c in commands {
                command.args(["-c", c]);
            }
            let out = command.output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let connected = !text.contains("Could not open") && !text.contains("Failed to");
            if !connected && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            assert!(
                out.status.success() && !text.contains("failed") && !text.contains("error"),
                "qemu-io {uri} {commands:?}:\n{text}"
            );
            return text;
        }
    }

    /// The MACs that answer ARP requests for `ip` on the bridge (busybox arping, broadcast
    /// every time, so every holder answers): exactly one node may hold an address.
    fn holders(&self, bridge: &str, ip: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "busybox",
                "arping",
                "-b",
                "-c",
                "3",
            ])
            .args(["-w", "3", "-I", bridge, ip])
            .output()
            .unwrap();
        let mut macs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains("reply from"))
            .filter_map(|line| {
                let start = line.find('[')? + 1;
                let end = line.find(']')?;
                Some(line.get(start..end)?.to_lowercase())
            })
            .collect();
        macs.sort();
        macs.dedup();
        macs
    }

    /// The MAC of the bridge (the clients' side of every exchange here).
    fn bridge_mac(&self, bridge: &str) -> String {
        let out = common::run("ip", &["-n", &self.netns, "link", "show", "dev", bridge]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "link/ether").unwrap();
        words[at + 1].to_owned()
    }

    /// After a move: the client's entry for `ip` and every answer to ARP for it give `mac`
    /// alone (`why`: who must have dropped it).
    fn held_by(&self, bridge: &str, ip: &str, mac: &str, why: &str) {
        assert_eq!(self.neighbour(ip).as_deref(), Some(mac));
        assert_eq!(self.holders(bridge, ip), vec![mac.to_owned()], "{why}");
    }

    /// The MAC the namespace's ARP table holds for `ip`.
    fn neighbour(&self, ip: &str) -> Option<String> {
        let out = common::run("ip", &["-n", &self.netns, "neigh", "show", ip]);
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "lladdr")
            .map(|w| w[1].to_owned())
    }
}

/// Writes acknowledged so far, as (offset, pattern) of 64 KiB blocks.
#[derive(Default)]
struct Written(Vec<(u64, u8)>);

impl Written {
    fn write(&mut self, client: &Client, ip: &str, name: &str, patterns: &[u8]) {
        let start = self.0.len() as u64;
        let writes: Vec<(u64, u8)> = patterns
            .iter()
            .enumerate()
            .map(|(n, p)| ((start + n as u64) * 65536, *p))
            .collect();
        let commands: Vec<String> = writes
            .iter()
            .map(|(offset, p)| format!("write -P {p} {offset} 64k"))
            .collect();
        client.qemu_io(ip, name, &commands);
        self.0.extend(writes);
    }

    fn verify(&self, client: &Client, ip: &str, name: &str) {
        let commands: Vec<String> = self
            .0
            .iter()
            .map(|(offset, p)| format!("read -P {p} {offset} 64k"))
            .collect();
        let text = client.qemu_io(ip, name, &commands);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
}

fn mac_of(pair: &Pair, name: &str) -> String {
    let status = pair.status();
    Pair::node(&status, name)["service_mac"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn hostd_ok(pair: &Pair, args: &[&str]) {
    let (code, stdout, stderr) = pair.hostd(args);
    assert_eq!(code, 0, "hostd {args:?}: {stdout}{stderr}");
}

#[test]
fn vm_bridge_service_ip_follows_its_identity() {
    if !prerequisites() || !tool("qemu-io") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root"
        );
        eprintln!("SKIPPED: bridge mode needs root");
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
