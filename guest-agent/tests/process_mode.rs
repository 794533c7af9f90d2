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

#[test]
fn a_second_agent_for_a_node_leaves_the_region_alone() {
    let dir = tempfile::tempdir().unwrap();
    regions(dir.path());
    let mut first = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args([
            "--node",
            "a",
            "--heartbeat-ms",
            "5",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--region-dir")
        .arg(dir.path())
        .arg("--disk")
        .arg(dir.path().join("a.img"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let region = open(&dir.path().join("x.region"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while region.heartbeat().unwrap().counter < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first agent never beat"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let boot_id = region.boot_id();
    // Same node, another port: it gets past the bind, and must stop at the region lock.
    let out = agent(dir.path(), &["--node", "a", "--beats", "1"]);
    let _ = first.kill();
    let _ = first.wait();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another agent already writes region"),
        "{stderr}"
    );
    assert_eq!(
        region.boot_id(),
        boot_id,
        "the second agent took the region over"
    );
}

/// A takeover command that the control region no longer backs (hostd withdrew the claim,
/// or the command was for an earlier run of this agent) is refused, not acted on; one the
/// owner backs is carried out.
#[test]
fn a_takeover_the_control_region_does_not_back_is_refused() {
    use shm::{Command as ControlCommand, CommandKind, Owner, TakeOverArgument};
    let dir = tempfile::tempdir().unwrap();
    regions(dir.path());
    let mut agent = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args([
            "--node",
            "a",
            "--heartbeat-ms",
            "5",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--region-dir")
        .arg(dir.path())
        .arg("--disk")
        .arg(dir.path().join("a.img"))
        .arg("--peer-disk")
        .arg(format!("b={}", dir.path().join("b.img").display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let region = open(&dir.path().join("x.region"));
    let control = ControlRegion::open(
        Mapping::open(&dir.path().join("z.region"), Access::ReadWrite).unwrap(),
    )
    .unwrap();
    let mut writer = control.writer().unwrap();
    let ack_of = |seq: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(ack) = region.ack().filter(|a| a.command_seq == seq) {
                return ack.status;
            }
            assert!(std::time::Instant::now() < deadline, "no ack for {seq}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    let take_b = |seq: u64, epoch: u64| ControlCommand {
        seq,
        kind: CommandKind::TakeOver,
        identity: 1,
        epoch,
        argument: TakeOverArgument {
            replay_from: Some(1),
            port: 0,
        }
        .to_word(),
    };
    // b still owns its identity (epoch 1): a command to take it over is stale.
    writer.set_epoch(1);
    writer
        .set_owner(
            1,
            Owner {
                node: Some(1),
                epoch: 1,
            },
        )
        .unwrap();
    writer.issue(0, take_b(1, 1)).unwrap();
    let stale = ack_of(1);
    // Now hostd names a the owner at epoch 2, and says so.
    writer.set_epoch(2);
    writer
        .set_owner(
            1,
            Owner {
                node: Some(0),
                epoch: 2,
            },
        )
        .unwrap();
    writer.issue(0, take_b(2, 2)).unwrap();
    let current = ack_of(2);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(stale, shm::node::ack_status::FAILED);
    assert_eq!(current, shm::node::ack_status::OK);
}

/// hostd is away (its presence stood still) and node a died with a write in its log: b,
/// a's taker, claims a at its coordinator socket, says so in its region, replays a's
/// record onto a's disk and listens on a's port.
#[test]
fn a_dead_peer_is_taken_over_without_hostd() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};

    use shm::{BackPressure, Claim, Entry, ReplayStatus};
    use wire::coordinator::{
        CoordinatorState, IdentityOwner, MemberRecord, NodeAnswer, NodeRequest,
    };

    let dir = tempfile::tempdir().unwrap();
    let a = NodeRegion::format(
        Mapping::create_file(&dir.path().join("a.region"), 1 << 20).unwrap(),
        0,
        "a",
    )
    .unwrap();
    NodeRegion::format(
        Mapping::create_file(&dir.path().join("b.region"), 1 << 20).unwrap(),
        1,
        "b",
    )
    .unwrap();
    let control = ControlRegion::format(
        Mapping::create_file(&dir.path().join("control.region"), 65536).unwrap(),
        &["a", "b"],
        &["a", "b"],
    )
    .unwrap();
    for disk in ["a.img", "b.img"] {
        std::fs::File::create(dir.path().join(disk))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let mut a_writer = a.writer(1).unwrap();
    let entry = Entry::Write {
        export: 0,
        offset: 0,
        data: &[5; 4096],
    };
    a_writer
        .appender
        .append(&entry, BackPressure::default())
        .unwrap();
    drop(a_writer);
    control.writer().unwrap().beat(200, 200);

    // The coordinator: both members, each the other's taker; b's claim of a is won.
    let socket = dir.path().join("coord-b.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let state = CoordinatorState {
            generation: 0,
            nodes: (0..2)
                .map(|node| MemberRecord {
                    node,
                    member: true,
                    since: 0,
                    takers: vec![1 - node],
                })
                .collect(),
            owners: (0..2)
                .map(|identity| IdentityOwner {
                    identity,
                    node: Some(identity),
                    generation: 0,
                })
                .collect(),
        };
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut writer = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let answer = match serde_json::from_str::<NodeRequest>(&line).unwrap() {
                    NodeRequest::State => NodeAnswer::State {
                        state: state.clone(),
                    },
                    NodeRequest::Claim { number, .. } => NodeAnswer::Won {
                        number,
                        generation: 1,
                        identities: vec![0],
                        preempted: vec![],
                        not_preempted: vec![],
                    },
                };
                let mut text = serde_json::to_string(&answer).unwrap();
                text.push('\n');
                if writer.write_all(text.as_bytes()).is_err() {
                    break;
                }
            }
        }
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("b.log")).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args([
            "--node",
            "b",
            "--heartbeat-ms",
            "10",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--region-dir")
        .arg(dir.path())
        .arg("--disk")
        .arg(dir.path().join("b.img"))
        .arg("--peer-disk")
        .arg(format!("a={}", dir.path().join("a.img").display()))
        .arg("--coordinator")
        .arg(&socket)
        .arg("--identity-ports")
        .arg(format!("a={port}"))
        .stderr(log)
        .spawn()
        .unwrap();
    let b = open(&dir.path().join("b.region"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        let replayed = b
            .replay_of(0)
            .is_some_and(|r| r.status == ReplayStatus::Replayed);
        if replayed && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = agent.kill();
    let _ = agent.wait();
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(taken, "b did not take a over:\n{log}");
    assert_eq!(
        b.claim(0),
        Some(Claim {
            generation: 1,
            victim: 0
        }),
        "{log}"
    );
    let disk = std::fs::read(dir.path().join("a.img")).unwrap();
    assert!(disk[..4096].iter().all(|b| *b == 5), "a's write replayed");
}
