//! Helpers shared by this crate's unit tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Writes an executable shell script named `fake-qemu` standing in for QEMU.
///
/// A child process writes the file, so this test process never holds a
/// writable descriptor to it. Had it written the file itself, another test
/// thread forking at that moment could inherit the descriptor and make
/// executing the script fail with `ETXTBSY` ("Text file busy").
pub(crate) fn fake_qemu(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-qemu");
    let mut writer = Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(&path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh starts");
    writer
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(format!("#!/bin/sh\n{body}\n").as_bytes())
        .expect("script written");
    let status = writer.wait().expect("sh finishes");
    assert!(
        status.success(),
        "writing {} failed: {status}",
        path.display()
    );
    path
}
