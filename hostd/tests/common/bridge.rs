//! A client in a bridge-mode test's network namespace: qemu-io through a service IP, and
//! who answers ARP for it.

use std::process::Command;
use std::time::{Duration, Instant};

use super::Pair;

/// Whether a bridge-mode VM test can run here: a guest image, qemu-io, and root (CI runs as
/// root, so a skip there is a failure).
pub fn prerequisites() -> bool {
    if !super::prerequisites() || !super::tool("qemu-io") {
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root"
        );
        eprintln!("SKIPPED: bridge mode needs root");
        return false;
    }
    true
}

/// A client in the test's namespace.
pub struct Client {
    pub netns: String,
}

impl Client {
    /// Runs qemu-io commands on export `name` at `ip`, retrying the connection while the
    /// address moves; panics if a command fails (a write not acknowledged, a pattern that
    /// does not read back).
    pub fn qemu_io(&self, ip: &str, name: &str, commands: &[String]) -> String {
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
    pub fn holders(&self, bridge: &str, ip: &str) -> Vec<String> {
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
    pub fn bridge_mac(&self, bridge: &str) -> String {
        let out = super::run("ip", &["-n", &self.netns, "link", "show", "dev", bridge]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "link/ether").unwrap();
        words[at + 1].to_owned()
    }

    /// After a move: the client's entry for `ip` and every answer to ARP for it give `mac`
    /// alone (`why`: who must have dropped it).
    pub fn held_by(&self, bridge: &str, ip: &str, mac: &str, why: &str) {
        assert_eq!(self.neighbour(ip).as_deref(), Some(mac));
        assert_eq!(self.holders(bridge, ip), vec![mac.to_owned()], "{why}");
    }

    /// The MAC the namespace's ARP table holds for `ip`.
    pub fn neighbour(&self, ip: &str) -> Option<String> {
        let out = super::run("ip", &["-n", &self.netns, "neigh", "show", ip]);
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "lladdr")
            .map(|w| w[1].to_owned())
    }
}

/// Writes acknowledged so far, as (offset, pattern) of 64 KiB blocks.
#[derive(Default)]
pub struct Written(pub Vec<(u64, u8)>);

impl Written {
    pub fn write(&mut self, client: &Client, ip: &str, name: &str, patterns: &[u8]) {
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

    pub fn verify(&self, client: &Client, ip: &str, name: &str) {
        let commands: Vec<String> = self
            .0
            .iter()
            .map(|(offset, p)| format!("read -P {p} {offset} 64k"))
            .collect();
        let text = client.qemu_io(ip, name, &commands);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
}

pub fn mac_of(pair: &Pair, name: &str) -> String {
    let status = pair.status();
    Pair::node(&status, name)["service_mac"]
        .as_str()
        .unwrap()
        .to_owned()
}
