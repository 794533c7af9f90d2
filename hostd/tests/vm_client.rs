//! The client VM test: a third QEMU, booted from the project's kernel and the client
//! initramfs, with an ext4 filesystem on export a as its virtio disk through QEMU's own NBD
//! driver, writes and fsyncs files while node a is killed, hung, moved by a planned takeover,
//! and given back after each (the short version of `scripts/client-vm.sh`; see
//! docs/clients.md). No I/O error may reach the client's kernel log, the filesystem must
//! pass `e2fsck -fn`, and every fsynced file must match its checksum.
//!
//! It needs what the VM tests need plus the client initramfs (`scripts/build-guest-image.sh`
//! builds both), e2fsprogs and qemu-img; without them it says so and passes, except under CI
//! (`CI=true`), where a missing prerequisite is a failure.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use campaign::client_vm::{self, ClientVmConfig, EventKind};
use common::{free_port, image_dir, prerequisites};

/// The client image and host tools, on top of [`prerequisites`].
fn client_prerequisites() -> bool {
    let mut missing = client_vm::missing_tools();
    let initrd = image_dir().join("client-initramfs.cpio.gz");
    if !initrd.exists() {
        missing.push(format!(
            "{} (run scripts/build-guest-image.sh)",
            initrd.display()
        ));
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "client VM test prerequisites missing: {}",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

fn print_tail(path: &Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    eprintln!("===== {} (last {lines} lines)", path.display());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

fn print_logs(out: &Path) {
    for name in [
        "client-console.log",
        "client-control.log",
        "client-qemu.log",
    ] {
        print_tail(&out.join(name), 40);
    }
    for name in ["hostd.log", "a.log", "b.log"] {
        print_tail(&out.join("logs").join(name), 30);
    }
}

#[test]
fn a_client_vm_rides_through_kill_hang_takeover_and_giveback() {
    if !prerequisites() || !client_prerequisites() {
        return;
    }
    let _one = common::one_pair();
    let out = tempfile::Builder::new()
        .prefix("ivha-client-vm-test")
        .tempdir()
        .unwrap();
    let image = image_dir();
    let config = ClientVmConfig {
        seed: 20,
        rounds: 1,
        backend: "qemu".into(),
        out_dir: out.path().to_owned(),
        hostd: PathBuf::from(env!("CARGO_BIN_EXE_hostd")),
        ports: [free_port(), free_port()],
        kernel: image.join("vmlinuz"),
        initrd: image.join("client-initramfs.cpio.gz"),
        reconnect_delay_s: 30,
        open_timeout_s: 30,
        dwell: Duration::from_millis(1500),
        disk_mib: 128,
        max_kib: 64,
        slots: 32,
    };
    let report = match client_vm::run(&config) {
        Ok(report) => report,
        Err(error) => {
            print_logs(out.path());
            panic!("{}", wire::error_chain::one_line(&error));
        }
    };
    eprint!("{report}");
    if !report.passed() {
        print_logs(out.path());
    }
    assert!(report.passed(), "{report}");

    // One event of each kind (a giveback after each), and the client worked through each.
    for kind in [EventKind::Kill, EventKind::Hang, EventKind::Takeover] {
        assert_eq!(report.events.iter().filter(|e| e.kind == kind).count(), 1);
    }
    assert_eq!(
        report
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Giveback)
            .count(),
        3
    );
    for event in &report.events {
        assert!(event.ops > 0, "no client operation after {event:?}");
        assert!(event.stall_ms.is_some(), "{event:?}");
        assert!(event.console_errors.is_empty(), "{event:?}");
    }
    assert_eq!(report.client_io_errors, 0);
    assert!(report.fsck_clean);
    assert!(report.files_checked > 0);
    assert_eq!(report.files_matching, report.files_checked);
    assert_eq!(report.journal_records, report.ops);
    assert!(out.path().join("report.json").exists());
}
