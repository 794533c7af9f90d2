//! The guest's shell on its second serial port (a Unix socket QEMU serves): how hostd runs a
//! command inside a guest without any network, e.g. to kill only the agent.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a command in a guest's shell may take.
const SHELL_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `command` in a guest's shell (its second serial port, a Unix socket QEMU serves)
/// and waits up to [`SHELL_TIMEOUT`] for it to finish. The connection stays open until
/// then: QEMU feeds the guest's UART a few bytes at a time and drops the rest of the input
/// when its client hangs up.
pub fn run_in_shell(socket: &std::path::Path, command: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(SHELL_TIMEOUT))?;
    // The shell prints the marker only after the command ran; the typed line (echoed by
    // the terminal) has the unexpanded `$((...))` instead.
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let marker = format!("ivha-done-{}", nonce + 1);
    // A fresh line first: whatever a previous client left half typed is discarded.
    // `&&`: the marker comes only if the command succeeded.
    stream.write_all(format!("\n{command} && echo ivha-done-$(({nonce}+1))\n").as_bytes())?;
    let deadline = Instant::now() + SHELL_TIMEOUT;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(&marker) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the guest shell did not finish the command within {SHELL_TIMEOUT:?}"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buffer) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the guest shell hung up",
                ));
            }
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
