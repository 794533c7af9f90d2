//! The QMP client and child handle against a real QEMU (`-machine none`, no guest).

// Test helpers outside #[test] functions may unwrap too: a panic is the assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{connect_or_explain, pidfd_readable, qemu_or_skip, wait_event};
use qemu::{Accel, QemuChild, QemuCommand, QmpError};

const T: Duration = Duration::from_secs(10);

#[test]
fn qmp_commands_events_and_quit() {
    let Some(bin) = qemu_or_skip("qmp_commands_events_and_quit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let cmd = QemuCommand::new(&bin)
        .name("qmp,test")
        .machine("none")
        .accel(Accel::Tcg)
        .qmp_socket(&sock)
        .build()
        .unwrap();
    let mut child = QemuChild::spawn_with_log(cmd, &dir.path().join("qemu.log")).unwrap();
    let mut qmp = connect_or_explain(&mut child, &sock);
    assert_eq!(
        qmp.greeting()["version"]["qemu"]["major"]
            .as_u64()
            .map(|m| m >= 7),
        Some(true)
    );
    let events = qmp.events();

    let status = qmp.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    // The comma in the name was escaped for QEMU and comes back intact.
    assert_eq!(qmp.execute("query-name", None).unwrap()["name"], "qmp,test");

    qmp.execute("stop", None).unwrap();
    let stop = wait_event(&events, "STOP", T);
    assert!(stop.timestamp.0 > 1_600_000_000, "{stop:?}");
    assert_eq!(
        qmp.execute("query-status", None).unwrap()["status"],
        "paused"
    );
    qmp.execute("cont", None).unwrap();
    wait_event(&events, "RESUME", T);

    let hmp = qmp.human_monitor_command("info status").unwrap();
    assert!(hmp.contains("running"), "{hmp:?}");

    let err = qmp.execute("no-such-command", None).unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );

    let started = Instant::now();
    qmp.quit().unwrap();
    let shutdown = wait_event(&events, "SHUTDOWN", T);
    assert_eq!(shutdown.data["reason"], "host-qmp-quit", "{shutdown:?}");
    assert!(pidfd_readable(&child, T), "QEMU did not exit after quit");
    let status = child.wait_timeout(T).unwrap().unwrap();
    assert!(status.success(), "{status}");
    eprintln!("QEMU exited {:?} after quit", started.elapsed());
    // The connection is gone: the event channel disconnects and commands fail cleanly.
    assert!(events.recv_timeout(T).is_err());
    let err = qmp.execute("query-status", None).unwrap_err();
    assert!(
        matches!(err, QmpError::Closed(_) | QmpError::Io { .. }),
        "{err:?}"
    );
}

#[test]
fn sigkill_of_real_qemu_is_seen_through_the_pidfd_and_qmp() {
    let Some(bin) = qemu_or_skip("sigkill_of_real_qemu_is_seen_through_the_pidfd_and_qmp") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let cmd = QemuCommand::new(&bin)
        .machine("none")
        .qmp_socket(&sock)
        .build()
        .unwrap();
    let mut child = QemuChild::spawn_with_log(cmd, &dir.path().join("qemu.log")).unwrap();
    let mut qmp = connect_or_explain(&mut child, &sock);
    qmp.execute("stop", None).unwrap();
    child.signal(qemu::Signal::Stop).unwrap();
    let started = Instant::now();
    let status = child.kill_and_reap(T).unwrap();
    eprintln!("stopped QEMU fenced in {:?}", started.elapsed());
    assert_eq!(status.signal(), Some(9));
    let err = qmp.execute("query-status", None).unwrap_err();
    assert!(
        matches!(err, QmpError::Closed(_) | QmpError::Io { .. }),
        "{err:?}"
    );
}

#[test]
fn accel_detection_on_this_host() {
    let Some(bin) = qemu_or_skip("accel_detection_on_this_host") else {
        return;
    };
    if std::env::var_os(qemu::accel::ACCEL_ENV).is_some() {
        eprintln!("SKIP accel_detection_on_this_host: IVHA_ACCEL is set");
        return;
    }
    let started = Instant::now();
    let choice = qemu::detect(&bin).unwrap();
    eprintln!("detect: {choice:?} in {:?}", started.elapsed());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    if qemu::accel::cpu_virt_flag(&cpuinfo).is_none() {
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("vmx/svm"), "{}", choice.reason);
    }
    // The probe itself must finish (or be killed) within its bound on any host.
    let started = Instant::now();
    let probe = qemu::accel::probe_kvm(&bin, Duration::from_secs(10));
    eprintln!("KVM probe: {probe:?} in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20));
}
