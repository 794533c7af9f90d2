//! Helpers shared by the tests that run a real QEMU.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::{QemuChild, QmpClient, QmpEvent};

/// The QEMU binary these tests run.
pub const QEMU: &str = "qemu-system-x86_64";

/// Finds `qemu-system-x86_64` in `PATH`. Without it: panics when `CI=true` (a missing
/// prerequisite must fail CI), otherwise prints a skip notice and returns `None`.
pub fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(QEMU))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: {QEMU} is not in PATH and CI=true; install Debian's qemu-system-x86")
        }
        None => {
            eprintln!("SKIP {test}: {QEMU} is not in PATH (install qemu-system-x86 to run it)");
            None
        }
    }
}

/// QEMU's stdout/stderr log, for failure messages.
pub fn log_of(child: &QemuChild) -> String {
    child
        .log_path()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_else(|e| format!("<cannot read {}: {e}>", p.display()))
        })
        .unwrap_or_default()
}

/// Connects to QMP; if QEMU refuses to start or QMP cannot be reached, panics with
/// QEMU's own output.
pub fn connect_or_explain(child: &mut QemuChild, sock: &Path) -> QmpClient {
    match qemu::connect_qmp(child, sock, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => panic!("QEMU did not come up: {e}\nQEMU output:\n{}", log_of(child)),
    }
}

/// Receives events until one named `name` arrives, returning it (others are skipped).
pub fn wait_event(
    events: &crossbeam_channel::Receiver<QmpEvent>,
    name: &str,
    timeout: Duration,
) -> QmpEvent {
    let deadline = Instant::now() + timeout;
    loop {
        match events.recv_deadline(deadline) {
            Ok(ev) if ev.name == name => return ev,
            Ok(_) => continue,
            Err(e) => panic!("no {name} event within {timeout:?}: {e}"),
        }
    }
}

/// Polls a pidfd; true if readable within `timeout`.
pub fn pidfd_readable(child: &QemuChild, timeout: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::from_borrowed_fd(child.pidfd(), PollFlags::IN)];
    let ts = Timespec::try_from(timeout).unwrap();
    poll(&mut fds, Some(&ts)).unwrap() == 1
}
