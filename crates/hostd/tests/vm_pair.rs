//! VM tests: a real pair of QEMU guests, booted by the real `hostd`.
//!
//! They need `qemu-system-x86_64` and the guest image (`scripts/build-guest-image.sh`).
//! Without them the tests say so and pass, except under CI (`CI=true`), where a missing
//! prerequisite is a failure: CI must never silently skip the VM tests.
//!
//! Every test kills its QEMU children (`hostd down`, then SIGKILL to any pid left) and, when
//! it fails, prints both guest consoles and the daemon log.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shm::{Access, Mapping, NodeRegion};

const MARKER: u64 = u64::from_le_bytes(*b"IVHAPROB");
const WRITE_PROBE_OFFSET: u64 = 3072;

fn image_dir() -> PathBuf {
    // CARGO_MANIFEST_DIR is crates/hostd; the image is built into the workspace target dir.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest")
}

/// Whether the VM tests can run here; under CI a missing prerequisite fails the test.
fn prerequisites() -> bool {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pair started with `hostd up --detach` in its own state directory.
struct Pair {
    state: tempfile::TempDir,
    pids: Vec<u32>,
}

impl Pair {
    fn up(node_b_kernel_args: &str) -> Pair {
        let state = tempfile::Builder::new()
            .prefix("ivha-vmtest-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let config = format!(
            "[regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n\
             [[node]]\nname = \"a\"\nnbd_port = {}\n\
             [[node]]\nname = \"b\"\nnbd_port = {}\nkernel_args = \"{}\"\n",
            free_port(),
            free_port(),
            node_b_kernel_args
        );
        std::fs::write(state.path().join("ivha.toml"), config).unwrap();
        let mut pair = Pair {
            state,
            pids: Vec::new(),
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
        pair.pids = pair.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["pid"].as_u64())
            .map(|p| p as u32)
            .collect();
        assert_eq!(pair.pids.len(), 2, "both QEMUs have pids");
        pair
    }

    fn hostd(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hostd"))
            .args(args)
            .env("IVHA_STATE_DIR", self.state.path())
            .env("IVHA_GUEST_DIR", image_dir())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn status(&self) -> Value {
        let (code, stdout, stderr) = self.hostd(&["status", "--json"]);
        assert_eq!(code, 0, "hostd status failed: {stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()
    }

    fn region(&self, name: &str) -> NodeRegion {
        let path = self.state.path().join(format!("regions/{name}.region"));
        NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap()
    }

    /// Polls until `check` holds or the time is up.
    fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Value) -> bool) {
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

    fn print_diagnostics(&self) {
        for file in [
            "consoles/a.log",
            "consoles/b.log",
            "consoles/a.qemu.log",
            "consoles/b.qemu.log",
            "hostd.log",
        ] {
            let text = std::fs::read_to_string(self.state.path().join(file)).unwrap_or_default();
            eprintln!("===== {file} =====\n{text}");
        }
    }
}

fn alive(pid: u32) -> bool {
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

#[test]
fn the_pair_boots_and_each_guest_reads_its_partner() {
    if !prerequisites() {
        return;
    }
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
    let events: Vec<Value> = std::fs::read_to_string(pair.state.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e["event"].as_str().unwrap() {
            "node_state" => format!(
                "{} {}->{}",
                e["node"].as_str().unwrap(),
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            ),
            other => other.to_owned(),
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
    assert!(events.iter().all(|e| e["time_unix_ms"].as_u64() > Some(0)));

    // State was kept (no --purge): a region still has its header and the agent's boot id.
    assert_ne!(pair.region("a").boot_id(), 0);
    let (code, _, stderr) = pair.hostd(&["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no hostd is running"), "{stderr}");
}
