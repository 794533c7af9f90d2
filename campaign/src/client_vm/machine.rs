//! The client VM: a QEMU booted from the project's kernel and the client initramfs, whose
//! virtio disk is an ivha export through QEMU's NBD block driver. Its console (kernel log)
//! goes to a file; its second serial port is the control port, a Unix socket the host reads
//! the workload's reports from and writes `stop` to.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use client_load::record::{Line, LineError};
use qemu::child::{ChildError, Exit, QemuChild};

/// How the client VM is started.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub qemu: PathBuf,
    /// "kvm" or "tcg".
    pub accel: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub nbd_host: String,
    pub nbd_port: u16,
    pub export: String,
    /// QEMU NBD driver: how long requests wait for a lost server to come back before they
    /// fail (seconds).
    pub reconnect_delay_s: u32,
    /// QEMU NBD driver: how long the first connection is retried at start (seconds).
    pub open_timeout_s: u32,
    /// The workload's settings, `ivha_client.KEY=VALUE` on the kernel command line.
    pub workload: Vec<(String, String)>,
    /// The console (ttyS0: kernel and /init) file.
    pub console: PathBuf,
    /// QEMU's own output.
    pub qemu_log: PathBuf,
    /// The control port's socket (ttyS1); short, a socket path has at most 107 bytes.
    pub control_socket: PathBuf,
}

/// QEMU's arguments for `config`.
pub fn qemu_args(config: &MachineConfig) -> Vec<String> {
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    for (key, value) in &config.workload {
        cmdline.push_str(&format!(" ivha_client.{key}={value}"));
    }
    let blockdev = format!(
        "driver=nbd,node-name=export,server.type=inet,server.host={},server.port={},export={},reconnect-delay={},open-timeout={}",
        option_value(&config.nbd_host),
        config.nbd_port,
        option_value(&config.export),
        config.reconnect_delay_s,
        config.open_timeout_s
    );
    let control = format!(
        "socket,id=control,path={},server=on,wait=on",
        option_value(&config.control_socket.display().to_string())
    );
    [
        "-name",
        "ivha-client,debug-threads=on",
        "-accel",
        &config.accel,
        "-machine",
        "q35",
        "-m",
        &config.memory_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &config.kernel.display().to_string(),
        "-initrd",
        &config.initrd.display().to_string(),
        "-append",
        &cmdline,
        "-serial",
        &format!(
            "file:{}",
            option_value(&config.console.display().to_string())
        ),
        // wait=on: the guest starts only once the host listens, so no report is lost.
        "-chardev",
        &control,
        "-serial",
        "chardev:control",
        "-blockdev",
        &blockdev,
        "-device",
        "virtio-blk-pci,drive=export",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A value inside a QEMU option list, where a comma is written twice.
fn option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// Errors running the client VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot start the client VM's QEMU")]
    Spawn(#[source] ChildError),
    #[error("the client VM's QEMU exited ({exit}) while waiting for {what}; see {log}")]
    Exited {
        what: String,
        exit: String,
        log: PathBuf,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("cannot connect to the client VM's control port {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the client VM's control port")]
    Control(#[source] std::io::Error),
    #[error("cannot watch the client VM's QEMU")]
    Child(#[source] ChildError),
}

/// One line from the control port and when it arrived.
#[derive(Debug, Clone)]
pub struct ControlLine {
    pub at: Instant,
    pub text: String,
    pub parsed: Result<Line, LineError>,
}

#[derive(Debug, Default)]
struct Received {
    lines: Vec<ControlLine>,
    /// The control port closed (QEMU exited).
    closed: bool,
}

type Shared = Arc<(Mutex<Received>, Condvar)>;

/// A running client VM; dropping it kills the QEMU.
#[derive(Debug)]
pub struct ClientVm {
    child: QemuChild,
    control: UnixStream,
    received: Shared,
    qemu_log: PathBuf,
    control_socket: PathBuf,
}

impl Drop for ClientVm {
    fn drop(&mut self) {
        // QEMU removes its socket only when it exits by itself.
        let _ = std::fs::remove_file(&self.control_socket);
    }
}

impl ClientVm {
    /// Starts the QEMU and connects to its control port (the guest starts then).
    pub fn launch(config: &MachineConfig) -> Result<Self, MachineError> {
        let _ = std::fs::remove_file(&config.control_socket);
        let mut command = Command::new(&config.qemu);
        command.args(qemu_args(config));
        let mut child =
            QemuChild::spawn_with_log(command, &config.qemu_log).map_err(MachineError::Spawn)?;
        let control = connect(&mut child, config)?;
        let received: Shared = Arc::default();
        let reader = control.try_clone().map_err(MachineError::Control)?;
        let sink = received.clone();
        std::thread::Builder::new()
            .name("client-control".into())
            .spawn(move || read_lines(reader, &sink))
            .map_err(MachineError::Control)?;
        Ok(ClientVm {
            child,
            control,
            received,
            qemu_log: config.qemu_log.clone(),
            control_socket: config.control_socket.clone(),
        })
    }

    /// Waits until `done` holds for the lines so far; an error if the control port closes
    /// (QEMU exited) first or `timeout` passes.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ControlLine]) -> bool,
    ) -> Result<(), MachineError> {
        let deadline = Instant::now() + timeout;
        loop {
            let closed = {
                let (lock, changed) = &*self.received;
                let received = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let (received, _) = changed
                    .wait_timeout_while(received, Duration::from_millis(200), |r| {
                        !done(&r.lines) && !r.closed
                    })
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if done(&received.lines) {
                    return Ok(());
                }
                received.closed
            };
            if closed {
                let exit = self
                    .child
                    .wait_timeout(Duration::from_secs(5))
                    .map_err(MachineError::Child)?;
                return Err(MachineError::Exited {
                    what: what.to_owned(),
                    exit: exit.map_or_else(|| "still running".to_owned(), |e| e.to_string()),
                    log: self.qemu_log.clone(),
                });
            }
            if Instant::now() >= deadline {
                return Err(MachineError::Timeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
        }
    }

    /// Every control line so far.
    pub fn lines(&self) -> Vec<ControlLine> {
        self.lock().lines.clone()
    }

    /// Asks the workload to stop and waits for the VM to power off; its exit.
    pub fn stop(&mut self, timeout: Duration) -> Result<Exit, MachineError> {
        self.control
            .write_all(b"stop\n")
            .map_err(MachineError::Control)?;
        let exit = self
            .child
            .wait_timeout(timeout)
            .map_err(MachineError::Child)?
            .ok_or_else(|| MachineError::Timeout {
                what: "the client VM to stop its workload and power off".into(),
                timeout,
            })?;
        // The reader has the last lines once the socket closes.
        let _ = self.wait_closed(Duration::from_secs(5));
        Ok(exit)
    }

    fn wait_closed(&self, timeout: Duration) -> bool {
        let (lock, changed) = &*self.received;
        let received = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (received, _) = changed
            .wait_timeout_while(received, timeout, |r| !r.closed)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        received.closed
    }

    fn lock(&self) -> MutexGuard<'_, Received> {
        self.received
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Connects to the control socket once QEMU listens on it (QEMU waits for this before it
/// runs the guest).
fn connect(child: &mut QemuChild, config: &MachineConfig) -> Result<UnixStream, MachineError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(&config.control_socket) {
            Ok(stream) => return Ok(stream),
            Err(source) => {
                if let Some(exit) = child.try_wait().map_err(MachineError::Child)? {
                    return Err(MachineError::Exited {
                        what: "its control port".into(),
                        exit: exit.to_string(),
                        log: config.qemu_log.clone(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(MachineError::Connect {
                        path: config.control_socket.clone(),
                        source,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Reads control lines until the socket closes, stamping each with its arrival.
fn read_lines(stream: UnixStream, received: &Shared) {
    let mut reader = BufReader::new(stream);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        let read = reader.read_until(b'\n', &mut bytes);
        let at = Instant::now();
        let (lock, changed) = &**received;
        let mut state = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match read {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&bytes)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if !text.is_empty() {
                    let parsed = text.parse();
                    state.lines.push(ControlLine { at, text, parsed });
                }
            }
            // End of the stream or an error: either way nothing more will come.
            _ => {
                state.closed = true;
                changed.notify_all();
                return;
            }
        }
        changed.notify_all();
    }
}

/// Where the control socket goes: a short path of its own (see `control_socket`).
pub fn control_socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ivha-client-{tag}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_is_the_export_through_qemus_nbd_driver() {
        let config = MachineConfig {
            qemu: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/client-initramfs.cpio.gz".into(),
            memory_mib: 256,
            nbd_host: "127.0.0.1".into(),
            nbd_port: 10809,
            export: "a".into(),
            reconnect_delay_s: 30,
            open_timeout_s: 20,
            workload: vec![("seed".into(), "7".into())],
            console: "/out/client,console.log".into(),
            qemu_log: "/out/client-qemu.log".into(),
            control_socket: "/tmp/c.sock".into(),
        };
        let args = qemu_args(&config);
        let after = |flag: &str| {
            let index = args.iter().position(|a| a == flag);
            index
                .and_then(|i| args.get(i + 1))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(
            after("-blockdev"),
            "driver=nbd,node-name=export,server.type=inet,server.host=127.0.0.1,server.port=10809,export=a,reconnect-delay=30,open-timeout=20"
        );
        assert_eq!(after("-device"), "virtio-blk-pci,drive=export");
        assert_eq!(
            after("-append"),
            "console=ttyS0 panic=-1 ivha_client.seed=7"
        );
        // The console comes first (ttyS0), the control port second (ttyS1); commas doubled.
        let serials: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-serial")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(
            serials,
            ["file:/out/client,,console.log", "chardev:control"]
        );
        assert_eq!(
            after("-chardev"),
            "socket,id=control,path=/tmp/c.sock,server=on,wait=on"
        );
    }
}
