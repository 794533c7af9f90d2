//! Shared harness for tests that run a real pair through the real `hostd` binary.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shm::{Access, Mapping, NodeRegion};
use wire::events::EventLine;

pub mod ack_checker;
pub mod blocks;
pub mod bridge;

/// One pair at a time: two TCG pairs on a small machine starve each other's heartbeats.
static ONE_PAIR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the one-pair lock of this test binary.
pub fn one_pair() -> std::sync::MutexGuard<'static, ()> {
    ONE_PAIR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Node names of [`Pair::up_n`]'s clusters, in order.
pub const NODE_NAMES: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// Config fragments for [`Pair::up_with`].
pub const NODE_B: &str = "[[node]]\nname = \"b\"\n";
pub const FLUSH_DELAY: &str = "[flusher]\ndelay_ms = 200\n";
/// Agents as host processes.
pub const PROCESS: &str = "backend = \"process\"\n";

pub const MARKER: u64 = u64::from_le_bytes(*b"IVHAPROB");
pub const WRITE_PROBE_OFFSET: u64 = 3072;

/// The profile directory this test was built into (`<target>/debug`, wherever
/// `CARGO_TARGET_DIR` puts `<target>`): the test executable is `<profile>/deps/NAME`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in <profile>/deps/", exe.display()))
        .to_owned()
}

/// The guest image, which `scripts/build-guest-image.sh` builds into `<target>/guest`.
/// Cargo names `<target>/tmp` to integration tests at build time, wherever
/// `CARGO_TARGET_DIR` puts `<target>`.
pub fn image_dir() -> PathBuf {
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    target_tmp.parent().unwrap_or(target_tmp).join("guest")
}

/// Whether the VM tests can run here; under CI a missing prerequisite fails the test.
pub fn prerequisites() -> bool {
    let mut missing = Vec::new();
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        missing.push("qemu-system-x86_64 (apt-get install qemu-system-x86)".to_owned());
    }
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        if !image_dir().join(file).exists() {
            missing.push(format!(
                "{} (run scripts/build-guest-image.sh)",
                image_dir().join(file).display()
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!("VM test prerequisites missing: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pair started with `hostd up --detach` in its own state directory.
pub struct Pair {
    pub state: tempfile::TempDir,
    pub pids: Vec<u32>,
    /// Per node, the host port of its NBD export.
    pub ports: Vec<u16>,
}

impl Pair {
    /// A QEMU pair; `node_b_kernel_args` go to b's kernel command line.
    pub fn up(node_b_kernel_args: &str) -> Pair {
        Self::up_with(
            &format!("[[node]]\nname = \"b\"\nkernel_args = \"{node_b_kernel_args}\"\n"),
            "",
        )
    }

    /// A pair with extra config text: `node_b` is the second [[node]] table (without its port),
    /// `extra` is prepended (top-level keys and tables such as [flusher]).
    pub fn up_with(node_b: &str, extra: &str) -> Pair {
        Self::up_nodes(&["[[node]]\nname = \"a\"\n", node_b], extra)
    }

    /// A cluster of `n` nodes named a, b, c, … with default settings and `extra` config.
    pub fn up_n(n: usize, extra: &str) -> Pair {
        let tables: Vec<String> = NODE_NAMES[..n]
            .iter()
            .map(|name| format!("[[node]]\nname = \"{name}\"\n"))
            .collect();
        let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
        Self::up_nodes(&tables, extra)
    }

    /// A cluster whose nodes are `tables` ([[node]] tables without their ports), with
    /// `extra` prepended (top-level keys and tables such as [flusher]).
    pub fn up_nodes(tables: &[&str], extra: &str) -> Pair {
        let state = tempfile::Builder::new()
            .prefix("ivha-vmtest-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let ports: Vec<u16> = tables.iter().map(|_| free_port()).collect();
        let mut config = format!("{extra}\n[regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n");
        for (table, port) in tables.iter().zip(&ports) {
            config.push_str(&format!("{table}nbd_port = {port}\n"));
        }
        std::fs::write(state.path().join("ivha.toml"), config).unwrap();
        let mut pair = Pair {
            state,
            pids: Vec::new(),
            ports,
        };
        let config_path = pair.state.path().join("ivha.toml");
        let (code, stdout, stderr) = pair.hostd(&[
            "up",
            "--detach",
            "--timeout",
            "180",
            "--config",
            config_path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "hostd up failed:\n{stdout}\n{stderr}");
        pair.pids = Self::node_pids(&pair.status());
        assert_eq!(
            pair.pids.len(),
            tables.len(),
            "every node process has a pid"
        );
        pair
    }

    /// The node processes' pids in a status, in node order.
    pub fn node_pids(status: &Value) -> Vec<u32> {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }

    /// The events recorded so far, oldest first; every line must be an event.
    pub fn events(&self) -> Vec<EventLine> {
        let text =
            std::fs::read_to_string(self.state.path().join("events.jsonl")).unwrap_or_default();
        let (events, bad) = wire::events::parse_log(&text);
        assert!(
            bad.is_empty(),
            "events.jsonl has lines that are not events: {bad:#?}"
        );
        events
    }

    /// SIGKILLs the daemon and waits until it is gone; returns its pid.
    pub fn kill_hostd(&self) -> u32 {
        let pid = self.status()["hostd_pid"].as_u64().unwrap() as u32;
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "hostd {pid} survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
        pid
    }

    /// The address of node `index`'s identity.
    pub fn addr(&self, index: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[index]))
    }

    /// Connects to node `index`'s export `export`, retrying while the address moves.
    pub fn connect(&self, index: usize, export: &str) -> campaign::nbd_client::NbdClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match campaign::nbd_client::NbdClient::connect(
                self.addr(index),
                export,
                Duration::from_secs(5),
            ) {
                Ok(client) => return client,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => panic!(
                    "cannot reach export {export} at {}: {error}",
                    self.addr(index)
                ),
            }
        }
    }

    pub fn hostd(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hostd"))
            .args(args)
            .env("IVHA_STATE_DIR", self.state.path())
            .env("IVHA_GUEST_DIR", image_dir())
            .env("IVHA_AGENT_BINARY", agent_binary())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn status(&self) -> Value {
        let (code, stdout, stderr) = self.hostd(&["status", "--json"]);
        assert_eq!(code, 0, "hostd status failed: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    pub fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()
    }

    pub fn region(&self, name: &str) -> NodeRegion {
        let path = self.state.path().join(format!("regions/{name}.region"));
        NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap()
    }

    /// Polls until `check` holds or the time is up.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if check(&status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn print_diagnostics(&self) {
        let consoles = NODE_NAMES[..self.ports.len()].iter().flat_map(|name| {
            [
                format!("consoles/{name}.log"),
                format!("consoles/{name}.qemu.log"),
            ]
        });
        for file in consoles.chain(["hostd.log".to_owned()]) {
            let text = std::fs::read_to_string(self.state.path().join(&file)).unwrap_or_default();
            eprintln!("===== {file} =====\n{text}");
        }
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie is not alive for our purposes: it has been killed, not yet reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        let _ = self.hostd(&["down", "--purge"]);
        for pid in &self.pids {
            if alive(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The guest-agent binary for the process backend. `cargo test --workspace` builds it
/// (the agent's own tests need it); a lone `cargo test -p hostd` may not.
pub fn agent_binary() -> PathBuf {
    profile_dir().join("guest-agent")
}

/// Whether the process backend can run; under CI a missing agent fails the test.
pub fn agent_prerequisite() -> bool {
    if agent_binary().exists() {
        return true;
    }
    let message = format!(
        "{} is missing: run `cargo build -p guest-agent` (or cargo test --workspace)",
        agent_binary().display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// The NBD URI of node `index`'s export.
pub fn nbd_uri(pair: &Pair, index: usize, name: &str) -> String {
    format!("nbd://127.0.0.1:{}/{name}", pair.ports[index])
}

/// Whether a tool is installed; under CI a missing one fails the test.
pub fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let message = format!("{name} is not installed (scripts/install-deps.sh installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// Runs a command; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The node serving identity `node` now (its `served_by`).
pub fn served_by(pair: &Pair, node: &str) -> String {
    let status = pair.status();
    Pair::node(&status, node)["served_by"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

pub fn wait_served_by(pair: &Pair, node: &str, by: &str, timeout: Duration) {
    pair.wait_for(&format!("{node} served by {by}"), timeout, |status| {
        Pair::node(status, node)["served_by"] == by
    });
}
