//! The `ivha-blkd` binary as hostd runs it: it reads a plan, answers its control socket,
//! keeps every fence across a SIGKILL and a restart, and refuses a bad plan clearly.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wire::storage::{
    Attachment, PlannedDisk, RegisteredKey, StoragePlan, StorageRequest, StorageResponse, call,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn plan(dir: &Path) -> StoragePlan {
    let disk = |name: &str| {
        let path = dir.join(format!("{name}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        PlannedDisk {
            name: name.to_owned(),
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
        disks: vec![disk("a"), disk("b")],
        coordinator: None,
    }
}

fn start(plan_path: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ivha-blkd"))
        .arg("--plan")
        .arg(plan_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
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

fn done(plan: &StoragePlan, request: StorageRequest) -> wire::storage::DiskReservationStatus {
    match call(&plan.control_socket, &request, TIMEOUT).unwrap() {
        StorageResponse::Done { disk, .. } => disk,
        other => panic!("{request:?} got {other:?}"),
    }
}

fn key(node: u32, generation: u64) -> RegisteredKey {
    RegisteredKey { node, generation }
}

#[test]
fn fences_survive_a_kill_and_a_restart_of_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path());
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();

    let mut daemon = start(&plan_path);
    assert_eq!(ready(&plan), daemon.id());
    // Every attachment has its socket.
    for disk in &plan.disks {
        for attachment in &disk.attachments {
            let deadline = Instant::now() + TIMEOUT;
            while !attachment.socket.exists() {
                assert!(Instant::now() < deadline, "{:?}", attachment.socket);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for node in [0, 1] {
        done(
            &plan,
            StorageRequest::Register {
                disk: "a".into(),
                node,
            },
        );
    }
    done(
        &plan,
        StorageRequest::Reserve {
            disk: "a".into(),
            node: 0,
        },
    );
    let preempted = done(
        &plan,
        StorageRequest::Preempt {
            disk: "a".into(),
            victim: 0,
            by: 1,
        },
    );
    assert_eq!(preempted.registered, [key(1, 1)]);
    assert_eq!(preempted.holder, Some(1));

    // A second daemon for the same plan is refused while the first runs.
    let second = Command::new(env!("CARGO_BIN_EXE_ivha-blkd"))
        .arg("--plan")
        .arg(&plan_path)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another storage daemon holds"));
    assert_eq!(ready(&plan), daemon.id());

    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let mut daemon = start(&plan_path);
    assert_eq!(ready(&plan), daemon.id());
    let StorageResponse::Status { disks, .. } =
        call(&plan.control_socket, &StorageRequest::Status, TIMEOUT).unwrap()
    else {
        panic!("no status");
    };
    assert_eq!(disks[0].name, "a");
    assert_eq!(disks[0].registered, [key(1, 1)], "the fence survived");
    assert_eq!(disks[0].holder, Some(1));
    // The fenced node comes back only with a newer key.
    let back = done(
        &plan,
        StorageRequest::Register {
            disk: "a".into(),
            node: 0,
        },
    );
    assert_eq!(back.registered, [key(0, 2), key(1, 1)]);
    // Bad requests get errors, and the daemon goes on.
    let refused = call(
        &plan.control_socket,
        &StorageRequest::Preempt {
            disk: "zz".into(),
            victim: 0,
            by: 1,
        },
        TIMEOUT,
    )
    .unwrap();
    assert!(
        matches!(refused, StorageResponse::Error { .. }),
        "{refused:?}"
    );
    assert_eq!(ready(&plan), daemon.id());
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[test]
fn a_bad_plan_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, b"{ \"disks\": 3 }").unwrap();
    let mut no_image = plan(dir.path());
    no_image.disks[0].path = PathBuf::from("/nonexistent/a.img");
    let no_image_path = dir.path().join("no-image.json");
    std::fs::write(&no_image_path, serde_json::to_vec(&no_image).unwrap()).unwrap();
    for (path, expected) in [
        (&missing, "cannot read the plan"),
        (&garbage, "is not a storage plan"),
        (&no_image_path, "cannot open disk a"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ivha-blkd"))
            .arg("--plan")
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}
