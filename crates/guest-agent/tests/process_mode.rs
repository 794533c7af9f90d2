//! The agent as a host process over region files (process mode).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use shm::{Access, ControlRegion, Mapping, NodeRegion};

fn regions(dir: &Path) {
    NodeRegion::format(
        Mapping::create_file(&dir.join("x.region"), 65536).unwrap(),
        0,
        "a",
    )
    .unwrap();
    NodeRegion::format(
        Mapping::create_file(&dir.join("y.region"), 65536).unwrap(),
        1,
        "b",
    )
    .unwrap();
    ControlRegion::format(
        Mapping::create_file(&dir.join("z.region"), 65536).unwrap(),
        &["a", "b"],
        &["a", "b"],
    )
    .unwrap();
    for disk in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(disk))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
}

fn agent(dir: &Path, args: &[&str]) -> std::process::Output {
    let node = args[1];
    Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--region-dir")
        .arg(dir)
        .arg("--disk")
        .arg(dir.join(format!("{node}.img")))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(args)
        .output()
        .unwrap()
}

fn open(path: &Path) -> NodeRegion {
    NodeRegion::open(Mapping::open(path, Access::ReadOnly).unwrap()).unwrap()
}

#[test]
fn agents_beat_and_observe_each_other() {
    let dir = tempfile::tempdir().unwrap();
    regions(dir.path());
    let out = agent(
        dir.path(),
        &["--node", "b", "--beats", "3", "--heartbeat-ms", "5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = open(&dir.path().join("y.region"));
    assert_eq!(b.heartbeat().unwrap().counter, 3);
    let b_boot = b.boot_id();
    assert_ne!(b_boot, 0);

    // a starts after b: it reads b's boot id and heartbeat through its read-only mapping.
    let out = agent(
        dir.path(),
        &["--node", "a", "--beats", "4", "--heartbeat-ms", "5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = open(&dir.path().join("x.region"));
    assert_eq!(a.heartbeat().unwrap().counter, 4);
    let peer = a.peer().unwrap();
    assert_eq!(peer.node_id, Some(1));
    assert_eq!(peer.boot_id, b_boot);
    assert_eq!(peer.heartbeat, 3);
    // Neither agent wrote into the other's region.
    assert_eq!(
        open(&dir.path().join("y.region"))
            .heartbeat()
            .unwrap()
            .counter,
        3
    );
}

#[test]
fn a_missing_region_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    regions(dir.path());
    let out = agent(dir.path(), &["--node", "c", "--beats", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no node region named \"c\""), "{stderr}");
}
