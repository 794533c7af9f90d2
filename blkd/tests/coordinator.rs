//! The `ivha-blkd` binary running a coordinator: a node's claim over its own socket fences
//! the victim on every disk (or, where the disks cannot fence, kills its process), the
//! loser of a race hears it is no member, and the state and the claim's answer survive a
//! SIGKILL and a restart.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wire::coordinator::{IdentityOwner, LostReason, NodeAnswer, NodeRequest};
use wire::storage::{
    Attachment, CoordinatorNode, CoordinatorPlan, PlannedDisk, RegisteredKey, StoragePlan,
    StorageRequest, StorageResponse, call,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Nodes a (0) and b (1), each the other's taker, and the disks `disks`, each attached by
/// both.
fn plan(dir: &Path, disks: &[&str]) -> StoragePlan {
    let disk = |name: &&str| {
        let path = dir.join(format!("{name}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        PlannedDisk {
            name: (*name).to_owned(),
            path,
            serial: format!("ivha-{name}"),
            attachments: (0..2)
                .map(|node| Attachment {
                    node,
                    socket: dir.join(format!("{name}-{node}.sock")),
                })
                .collect(),
        }
    };
    StoragePlan {
        control_socket: dir.join("control.sock"),
        reservations: dir.join("reservations.json"),
        disks: disks.iter().map(disk).collect(),
        coordinator: Some(CoordinatorPlan {
            state: dir.join("coordinator.json"),
            identities: 2,
            nodes: ["a", "b"]
                .iter()
                .zip(0..)
                .map(|(name, node)| CoordinatorNode {
                    node,
                    socket: dir.join(wire::coordinator::socket_name(name)),
                    takers: vec![1 - node],
                })
                .collect(),
            kill_victims: false,
        }),
    }
}

/// A running daemon, killed when the test ends (a failing one too).
struct Daemon(Child);

impl Daemon {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `plan` and starts the daemon on it.
fn start(dir: &Path, plan: &StoragePlan) -> Daemon {
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(plan).unwrap()).unwrap();
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_ivha-blkd"))
            .arg("--plan")
            .arg(&plan_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits until the daemon answers; returns its pid.
fn ready(plan: &StoragePlan) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(StorageResponse::Status { pid, .. }) =
            call(&plan.control_socket, &StorageRequest::Status, TIMEOUT)
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn control(plan: &StoragePlan, request: &StorageRequest) -> StorageResponse {
    call(&plan.control_socket, request, TIMEOUT).unwrap()
}

/// One node's connection to its coordinator socket, kept open as QEMU keeps it.
struct NodeConnection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl NodeConnection {
    fn open(plan: &StoragePlan, node: usize) -> Self {
        let socket = &plan.coordinator.as_ref().unwrap().nodes[node].socket;
        let writer = UnixStream::connect(socket).unwrap();
        writer.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        }
    }

    fn send(&mut self, line: &[u8]) -> NodeAnswer {
        self.writer.write_all(line).unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    fn ask(&mut self, request: &NodeRequest) -> NodeAnswer {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.send(&line)
    }
}

fn claim(victim: u32, number: u64) -> NodeRequest {
    NodeRequest::Claim { victim, number }
}

#[test]
fn a_claim_fences_the_victim_everywhere_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &["a", "b"]);
    let daemon = start(dir.path(), &plan);
    assert_eq!(ready(&plan), daemon.id());
    // As hostd starts the nodes: each registered on every disk it attaches.
    for disk in ["a", "b"] {
        for node in [0, 1] {
            let done = control(
                &plan,
                &StorageRequest::Register {
                    disk: disk.into(),
                    node,
                },
            );
            assert!(matches!(done, StorageResponse::Done { .. }), "{done:?}");
        }
    }

    let mut b = NodeConnection::open(&plan, 1);
    let won = b.ask(&claim(0, 11));
    assert_eq!(
        won,
        NodeAnswer::Won {
            number: 11,
            generation: 1,
            identities: vec![0],
            preempted: vec!["a".into(), "b".into()],
            not_preempted: vec![],
        }
    );
    let StorageResponse::Status { disks, .. } = control(&plan, &StorageRequest::Status) else {
        panic!("no status");
    };
    for disk in &disks {
        assert_eq!(
            disk.registered,
            [RegisteredKey {
                node: 1,
                generation: 1
            }],
            "a's key is gone from disk {}",
            disk.name
        );
    }
    // a woke too late: it is no member, and b owns both identities.
    let mut a = NodeConnection::open(&plan, 0);
    let NodeAnswer::Lost { reason, state, .. } = a.ask(&claim(1, 1)) else {
        panic!("both won");
    };
    assert_eq!(reason, LostReason::NotMember);
    assert_eq!(state.owned_by(1), vec![0, 1]);

    drop(daemon);
    let daemon = start(dir.path(), &plan);
    assert_eq!(ready(&plan), daemon.id());
    let StorageResponse::Coordinator { state } = control(&plan, &StorageRequest::Coordinator)
    else {
        panic!("no coordinator state");
    };
    assert_eq!(state.generation, 1);
    assert!(!state.node(0).unwrap().member);
    assert!(state.node(1).unwrap().member);
    assert_eq!(
        state.owners,
        [
            IdentityOwner {
                identity: 0,
                node: Some(1),
                generation: 1
            },
            IdentityOwner {
                identity: 1,
                node: Some(1),
                generation: 0
            }
        ]
    );
    // b asks again after reconnecting (it never saw the answer, say): the same answer.
    let mut b = NodeConnection::open(&plan, 1);
    assert_eq!(b.ask(&claim(0, 11)), won);
    let NodeAnswer::State { state: after } = b.ask(&NodeRequest::State) else {
        panic!("no state");
    };
    assert_eq!(after, state, "the retry claimed nothing again");
    drop(daemon);
}

#[test]
fn garbage_on_a_node_socket_gets_an_error_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // No disks: the daemon runs the coordinator only (the process backend).
    let plan = plan(dir.path(), &[]);
    let daemon = start(dir.path(), &plan);
    assert_eq!(ready(&plan), daemon.id());
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        let socket = &plan.coordinator.as_ref().unwrap().nodes[0].socket;
        std::fs::metadata(socket).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    let mut a = NodeConnection::open(&plan, 0);
    let answer = a.send(b"\x00\xffgarbage{{{\n");
    assert!(
        matches!(&answer, NodeAnswer::Error { message } if message.starts_with("malformed request")),
        "{answer:?}"
    );
    let NodeAnswer::State { state } = a.ask(&NodeRequest::State) else {
        panic!("no state after the garbage");
    };
    assert_eq!(state.generation, 0);
    assert_eq!(state.owned_by(0), vec![0]);
    // Another connection of the same node meanwhile, and a claim with no disk to fence.
    let mut a_again = NodeConnection::open(&plan, 0);
    let won = a_again.ask(&claim(1, 1));
    assert!(
        matches!(&won, NodeAnswer::Won { generation: 1, identities, preempted, .. } if identities == &[1] && preempted.is_empty()),
        "{won:?}"
    );
    assert!(
        matches!(a.ask(&NodeRequest::State), NodeAnswer::State { state } if state.generation == 1)
    );
    drop(daemon);
}

#[test]
fn a_damaged_coordinator_state_stops_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), &[]);
    let state = &plan.coordinator.as_ref().unwrap().state;
    std::fs::write(state, b"{\"version\": 1, \"state\": ").unwrap();
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ivha-blkd"))
        .arg("--plan")
        .arg(&plan_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{} is not a coordinator state file",
            state.display()
        )),
        "{stderr}"
    );
}

/// A process of its own (python) that connects to `socket`, asks the state once and then
/// sleeps with the connection open: a stopped agent, as its coordinator knows it.
fn agent_process(socket: &Path) -> Child {
    let script = "import socket, sys, time\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(b'{\"request\":\"state\"}\\n')\n\
                  s.recv(65536)\n\
                  print('asked', flush=True)\n\
                  time.sleep(60)\n";
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it printed, the daemon answered its request: it knows the process.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "asked\n");
    child
}

/// Kills and reaps `child` when the test ends, should the daemon not have.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn without_disk_fences_a_claim_kills_the_victims_process_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = plan(dir.path(), &[]);
    plan.coordinator.as_mut().unwrap().kill_victims = true;
    let daemon = start(dir.path(), &plan);
    assert_eq!(ready(&plan), daemon.id());
    let socket_a = plan.coordinator.as_ref().unwrap().nodes[0].socket.clone();
    let mut victim = Reaped(agent_process(&socket_a));
    let pid = victim.0.id();
    // Stopped, as the fault campaign's zombie: SIGKILL ends it all the same.
    let stopped = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());

    let mut b = NodeConnection::open(&plan, 1);
    let won = b.ask(&claim(0, 1));
    assert_eq!(
        won,
        NodeAnswer::Won {
            number: 1,
            generation: 1,
            identities: vec![0],
            preempted: vec![format!("process {pid} killed")],
            not_preempted: vec![],
        }
    );
    // Dead when the answer came: the test (its parent) reaps it at once.
    let status = victim.0.try_wait().unwrap().expect("the victim still runs");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    // a back (hostd's rejoin) and claiming b from this test's process, which is b's too:
    // the claim wins, but the claimer's own process is never killed.
    assert!(matches!(
        control(&plan, &StorageRequest::Rejoin { node: 0 }),
        StorageResponse::Coordinator { .. }
    ));
    let mut a = NodeConnection::open(&plan, 0);
    let NodeAnswer::Won {
        preempted,
        not_preempted,
        ..
    } = a.ask(&claim(1, 1))
    else {
        panic!("a's claim of b lost");
    };
    assert!(preempted.is_empty(), "{preempted:?}");
    assert_eq!(not_preempted.len(), 1, "{not_preempted:?}");
    assert!(
        not_preempted[0].starts_with(&format!("process {}: not killed", std::process::id())),
        "{not_preempted:?}"
    );
    drop(daemon);
}

#[test]
fn without_disk_fences_a_node_never_seen_is_not_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = plan(dir.path(), &[]);
    plan.coordinator.as_mut().unwrap().kill_victims = true;
    let daemon = start(dir.path(), &plan);
    assert_eq!(ready(&plan), daemon.id());
    let mut b = NodeConnection::open(&plan, 1);
    // Nothing could fence a: no claim, and nothing changed.
    let NodeAnswer::Error { message } = b.ask(&claim(0, 1)) else {
        panic!("a node that cannot be fenced was claimed");
    };
    assert!(message.contains("not known"), "{message}");
    let NodeAnswer::State { state } = b.ask(&NodeRequest::State) else {
        panic!("no state");
    };
    assert_eq!(state.generation, 0);
    assert!(state.node(0).is_some_and(|m| m.member));
    drop(daemon);
}
