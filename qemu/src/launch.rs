//! Starts QEMU and connects to its QMP socket, reporting QEMU's own words when it refuses
//! to start.
//!
//! QEMU rejecting its command line exits within milliseconds, before or just after it
//! creates the QMP socket. Waiting for the socket alone would then run into the full
//! timeout with a vague error; [`connect_qmp`] watches the process through its pidfd and
//! returns [`LaunchError::Exited`] with the tail of QEMU's output instead.

use crate::child::Exit;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::child::{ChildError, QemuChild};
use crate::cmdline::{CmdlineError, QemuCommand};
use crate::qmp::{QmpClient, QmpError};

/// How much of QEMU's output an [`LaunchError::Exited`] carries.
const OUTPUT_TAIL: u64 = 8 << 10;

/// How long to wait for QEMU to exit after its QMP connection failed.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Why QEMU could not be started and reached over QMP.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The command line is invalid.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// The command has no QMP socket to connect to.
    #[error("the QEMU command has no QMP socket: call .qmp_socket()")]
    NoQmpSocket,
    /// Spawning or watching the process failed.
    #[error(transparent)]
    Child(#[from] ChildError),
    /// QEMU exited while starting, usually because it rejected the command line.
    #[error("QEMU exited during start-up ({status}): {output}")]
    Exited {
        /// QEMU's exit status.
        status: Exit,
        /// The end of QEMU's stdout/stderr, or a note that it was not captured.
        output: String,
    },
    /// QEMU runs but QMP could not be reached.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Builds `command`, starts it with stdout and stderr appended to `log_path`, and connects
/// to its QMP socket within `timeout`. On any failure the process is killed and reaped.
pub fn launch(
    command: &QemuCommand,
    log_path: &Path,
    timeout: Duration,
) -> Result<(QemuChild, QmpClient), LaunchError> {
    let sock = command
        .qmp_socket_path()
        .ok_or(LaunchError::NoQmpSocket)?
        .to_owned();
    let mut child = QemuChild::spawn_with_log(command.build()?, log_path)?;
    let qmp = connect_qmp(&mut child, &sock, timeout)?;
    Ok((child, qmp))
}

/// Connects to the QMP socket `sock` of the already started `child` within `timeout`,
/// failing early with [`LaunchError::Exited`] if the process ends first.
pub fn connect_qmp(
    child: &mut QemuChild,
    sock: &Path,
    timeout: Duration,
) -> Result<QmpClient, LaunchError> {
    let deadline = Instant::now() + timeout;
    // Wait for the socket to appear while QEMU lives; the pidfd wakes us if it dies.
    while sock.symlink_metadata().is_err() {
        if let Some(status) = child.try_wait()? {
            return Err(exited(child, status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::ConnectTimeout {
                path: sock.to_owned(),
                timeout,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "QEMU never created the socket",
                ),
            }
            .into());
        }
        if let Some(status) = child.wait_timeout(left.min(Duration::from_millis(10)))? {
            return Err(exited(child, status));
        }
    }
    // In slices: a QEMU that fails after binding the socket leaves the file behind, and a
    // connect would be refused until the deadline; between slices its exit is noticed.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match QmpClient::connect(sock, left.min(CONNECT_SLICE)) {
            Ok(qmp) => return Ok(qmp),
            Err(e) => {
                // Its own message is the better error.
                if let Some(status) = child.wait_timeout(EXIT_GRACE)? {
                    return Err(exited(child, status));
                }
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
            }
        }
    }
}

/// The longest a single connect (and greeting) attempt to QMP takes before the child's exit
/// is checked again.
const CONNECT_SLICE: Duration = Duration::from_secs(1);

fn exited(child: &QemuChild, status: Exit) -> LaunchError {
    let output = match child.log_path() {
        Some(path) => match read_tail(path, OUTPUT_TAIL) {
            Ok(text) if text.trim().is_empty() => "(no output)".to_owned(),
            Ok(text) => text.trim().to_owned(),
            Err(e) => format!("(cannot read {}: {e})", path.display()),
        },
        None => "(output not captured: use spawn_with_log)".to_owned(),
    };
    LaunchError::Exited { status, output }
}

/// The last `max` bytes of a file, lossily decoded.
fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fake_qemu;

    #[test]
    fn rejected_command_line_reports_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(
            dir.path(),
            "echo \"qemu-system-x86_64: -device nope: 'nope' is not a valid device model name\" >&2; exit 1",
        );
        let cmd = QemuCommand::new(&fake).qmp_socket(dir.path().join("qmp.sock"));
        let started = Instant::now();
        let err = launch(&cmd, &dir.path().join("qemu.log"), Duration::from_secs(10)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, LaunchError::Exited { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("not a valid device model name"), "{text}");
        assert!(text.contains("exit status: 1"), "{text}");
    }

    #[test]
    fn exit_after_binding_the_socket_reports_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        // The socket path exists but nobody listens: connect is refused until QEMU is gone.
        std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let fake = fake_qemu(dir.path(), "sleep 0.2; echo 'failed late' >&2; exit 3");
        let cmd = QemuCommand::new(&fake).qmp_socket(&sock);
        let err = launch(
            &cmd,
            &dir.path().join("qemu.log"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(err.to_string().contains("failed late"), "{err}");
    }

    #[test]
    fn silent_hang_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu(dir.path(), "exec sleep 30");
        let cmd = QemuCommand::new(&fake).qmp_socket(dir.path().join("qmp.sock"));
        let err = launch(
            &cmd,
            &dir.path().join("qemu.log"),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(
            matches!(err, LaunchError::Qmp(QmpError::ConnectTimeout { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn command_without_qmp_socket_is_refused() {
        let err = launch(
            &QemuCommand::new("qemu-system-x86_64"),
            Path::new("/nonexistent/log"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, LaunchError::NoQmpSocket), "{err:?}");
    }

    #[test]
    fn tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, format!("{}END", "x".repeat(100))).unwrap();
        assert_eq!(read_tail(&p, 5).unwrap(), "xxEND");
        assert_eq!(read_tail(&p, 1000).unwrap().len(), 103);
    }
}
