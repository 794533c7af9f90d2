//! A QEMU (or any) child process owned through a pidfd.
//!
//! The pidfd is opened right after spawning, while the child is still our unreaped child,
//! so it can never refer to a recycled pid. Signals go through `pidfd_send_signal`, and the
//! pidfd becomes readable the moment the process exits, so callers can poll it alongside
//! sockets. Dropping a [`QemuChild`] kills and reaps the process: no QEMU outlives its
//! handle.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, pidfd_open, pidfd_send_signal};

/// How long [`Drop`] waits for a killed child to be reaped.
const DROP_REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an operation on a child process failed.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The process could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program that failed to start.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The stdout/stderr log file could not be opened.
    #[error("cannot open the log file {}: {source}", path.display())]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `pidfd_open` failed (e.g. a kernel older than 5.3).
    #[error("cannot open a pidfd for process {pid}: {source}")]
    Pidfd {
        /// The process id.
        pid: u32,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process has already exited and been reaped, so it cannot be signalled.
    #[error("process {pid} has already exited{}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Exited {
        /// The process id.
        pid: u32,
        /// Its exit status, when it was reaped through this handle.
        status: Option<ExitStatus>,
    },
    /// `pidfd_send_signal` failed for a reason other than the process being gone.
    #[error("cannot send {signal} to process {pid}: {source}")]
    Signal {
        /// The process id.
        pid: u32,
        /// The signal.
        signal: Signal,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Waiting for or polling the process failed.
    #[error("cannot wait for process {pid}: {source}")]
    Wait {
        /// The process id.
        pid: u32,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process got SIGKILL but was not reaped in time (stuck in the kernel).
    #[error("process {pid} got SIGKILL but did not exit within {timeout:?}")]
    KillTimeout {
        /// The process id.
        pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
}

/// The signals a guest's QEMU process can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: the fence.
    Kill,
    /// SIGSTOP: freeze the guest (a hung guest, for fault injection).
    Stop,
    /// SIGCONT: resume a stopped guest.
    Cont,
    /// SIGTERM: ask QEMU to shut down.
    Term,
}

impl Signal {
    fn to_rustix(self) -> rustix::process::Signal {
        match self {
            Signal::Kill => rustix::process::Signal::KILL,
            Signal::Stop => rustix::process::Signal::STOP,
            Signal::Cont => rustix::process::Signal::CONT,
            Signal::Term => rustix::process::Signal::TERM,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Kill => "SIGKILL",
            Signal::Stop => "SIGSTOP",
            Signal::Cont => "SIGCONT",
            Signal::Term => "SIGTERM",
        })
    }
}

/// A running child process with a pidfd. Killed and reaped on drop.
#[derive(Debug)]
pub struct QemuChild {
    child: Child,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    log_path: Option<PathBuf>,
}

impl QemuChild {
    /// Starts `command` with stdin from `/dev/null`; stdout and stderr stay as the command
    /// has them (inherited unless set).
    pub fn spawn(mut command: Command) -> Result<QemuChild, ChildError> {
        command.stdin(Stdio::null());
        Self::spawn_inner(command, None)
    }

    /// Starts `command` with stdin from `/dev/null` and stdout and stderr appended to
    /// `log_path` (created if missing), where QEMU's error messages end up.
    pub fn spawn_with_log(mut command: Command, log_path: &Path) -> Result<QemuChild, ChildError> {
        let log_err = |source| ChildError::LogFile {
            path: log_path.to_owned(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        command.stdin(Stdio::null()).stdout(log).stderr(log2);
        Self::spawn_inner(command, Some(log_path.to_owned()))
    }

    fn spawn_inner(
        mut command: Command,
        log_path: Option<PathBuf>,
    ) -> Result<QemuChild, ChildError> {
        let child = command.spawn().map_err(|source| ChildError::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let mut this = Self::from_child(child)?;
        this.log_path = log_path;
        log::debug!(
            "started {} as pid {}",
            command.get_program().to_string_lossy(),
            this.pid()
        );
        Ok(this)
    }

    /// Takes ownership of an already spawned child (e.g. one with piped stdio) and opens
    /// its pidfd. If that fails the child is killed and reaped.
    pub fn from_child(mut child: Child) -> Result<QemuChild, ChildError> {
        match pidfd_open(Pid::from_child(&child), PidfdFlags::empty()) {
            Ok(pidfd) => Ok(QemuChild {
                child,
                pidfd,
                status: None,
                log_path: None,
            }),
            Err(e) => {
                // std's kill() is safe here: the child is unreaped, so its pid is ours.
                let _ = child.kill();
                let _ = child.wait();
                Err(ChildError::Pidfd {
                    pid: child.id(),
                    source: e.into(),
                })
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pidfd: readable (`POLLIN`) once the process has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The file stdout and stderr go to, if started with [`Self::spawn_with_log`].
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// Takes the child's stdin pipe, if it was spawned with one.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Takes the child's stdout pipe, if it was spawned with one.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the child's stderr pipe, if it was spawned with one.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Sends `signal` through the pidfd.
    ///
    /// A child that has already exited gives [`ChildError::Exited`] (it is reaped first if
    /// needed). In the narrow race where it exits between that check and the signal, the
    /// signal reaches a zombie and is harmless.
    pub fn signal(&mut self, signal: Signal) -> Result<(), ChildError> {
        if let Some(status) = self.try_wait()? {
            return Err(ChildError::Exited {
                pid: self.pid(),
                status: Some(status),
            });
        }
        self.send(signal)
    }

    fn send(&self, signal: Signal) -> Result<(), ChildError> {
        match pidfd_send_signal(&self.pidfd, signal.to_rustix()) {
            Ok(()) => Ok(()),
            Err(Errno::SRCH) => Err(ChildError::Exited {
                pid: self.pid(),
                status: self.status,
            }),
            Err(e) => Err(ChildError::Signal {
                pid: self.pid(),
                signal,
                source: e.into(),
            }),
        }
    }

    /// Reaps the child if it has exited; `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ChildError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ChildError::Wait {
                pid: self.child.id(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit, by polling the pidfd, and reaps it.
    /// `None` if it is still running at the deadline.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ChildError> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let pid = self.pid();
        let wait_err = |source| ChildError::Wait { pid, source };
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            // Poll in slices of at most an hour so the timespec never overflows.
            let slice = remaining.min(Duration::from_secs(3600));
            let ts = Timespec::try_from(slice)
                .map_err(|e| wait_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(0) if remaining.is_zero() => return Ok(None),
                Ok(0) | Err(Errno::INTR) => continue,
                Ok(_) => {
                    let status = self.child.wait().map_err(wait_err)?;
                    self.status = Some(status);
                    return Ok(Some(status));
                }
                Err(e) => return Err(wait_err(e.into())),
            }
        }
    }

    /// The fence: SIGKILL through the pidfd, then wait until the process is reaped.
    /// Returns the exit status (also when the child had exited already). Fails only if the
    /// kernel does not let the process die within `timeout`.
    pub fn kill_and_reap(&mut self, timeout: Duration) -> Result<ExitStatus, ChildError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        match self.send(Signal::Kill) {
            Ok(()) | Err(ChildError::Exited { .. }) => {}
            Err(e) => return Err(e),
        }
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => Err(ChildError::KillTimeout {
                pid: self.pid(),
                timeout,
            }),
        }
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        match self.kill_and_reap(DROP_REAP_TIMEOUT) {
            Ok(status) => log::debug!("process {} killed on drop: {status}", self.pid()),
            Err(e) => log::error!("dropping process {}: {e}", self.pid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn sleeper() -> QemuChild {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        QemuChild::spawn(cmd).unwrap()
    }

    /// Polls a pidfd with a timeout; true if readable.
    fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let ts = Timespec::try_from(timeout).unwrap();
        poll(&mut fds, Some(&ts)).unwrap() == 1
    }

    /// The state letter from /proc/PID/stat (R, S, T, Z, ...).
    fn proc_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(") ").unwrap().1;
        after.chars().next().unwrap()
    }

    #[test]
    fn running_child_is_not_readable_and_wait_times_out() {
        let mut c = sleeper();
        assert!(c.pid() > 0);
        assert_eq!(c.try_wait().unwrap(), None);
        assert!(!readable(c.pidfd(), Duration::ZERO));
        let started = Instant::now();
        assert_eq!(c.wait_timeout(Duration::from_millis(100)).unwrap(), None);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn pidfd_readable_promptly_after_sigkill() {
        let mut c = sleeper();
        let started = Instant::now();
        c.signal(Signal::Kill).unwrap();
        assert!(readable(c.pidfd(), Duration::from_secs(5)));
        let elapsed = started.elapsed();
        eprintln!("pidfd readable {elapsed:?} after SIGKILL");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
        let status = c.wait_timeout(Duration::ZERO).unwrap().unwrap();
        assert_eq!(status.signal(), Some(9));
    }

    #[test]
    fn kill_and_reap_fences_a_stopped_process() {
        let mut c = sleeper();
        c.signal(Signal::Stop).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_state(c.pid()) != 'T' {
            assert!(Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.signal(Signal::Cont).unwrap();
        while proc_state(c.pid()) == 'T' {
            assert!(Instant::now() < deadline, "never continued");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.signal(Signal::Stop).unwrap();
        let status = c.kill_and_reap(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(9));
        // Reaped: the pid is gone.
        assert!(!Path::new(&format!("/proc/{}", c.pid())).exists());
        // Fencing twice is harmless and returns the same status.
        assert_eq!(c.kill_and_reap(Duration::from_secs(1)).unwrap(), status);
    }

    #[test]
    fn sigterm_ends_the_process() {
        let mut c = sleeper();
        c.signal(Signal::Term).unwrap();
        let status = c.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(status.signal(), Some(15));
    }

    #[test]
    fn signal_after_exit_is_a_clear_error() {
        let mut c = QemuChild::spawn(Command::new("true")).unwrap();
        let status = c.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert!(status.success());
        let err = c.signal(Signal::Term).unwrap_err();
        assert!(
            matches!(
                err,
                ChildError::Exited {
                    status: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("already exited"), "{err}");
        assert_eq!(c.kill_and_reap(Duration::from_secs(1)).unwrap(), status);
    }

    #[test]
    fn signal_to_unreaped_exited_child_reports_exited() {
        let mut c = QemuChild::spawn(Command::new("true")).unwrap();
        // Wait for exit without reaping, then signal: signal() reaps and reports.
        assert!(readable(c.pidfd(), Duration::from_secs(5)));
        let err = c.signal(Signal::Kill).unwrap_err();
        assert!(
            matches!(err, ChildError::Exited { status: Some(s), .. } if s.success()),
            "{err:?}"
        );
    }

    #[test]
    fn drop_kills_and_reaps() {
        let c = sleeper();
        let pid = c.pid();
        let watcher = pidfd_open(
            Pid::from_raw(pid.try_into().unwrap()).unwrap(),
            PidfdFlags::empty(),
        )
        .unwrap();
        assert!(!readable(watcher.as_fd(), Duration::ZERO));
        drop(c);
        assert!(readable(watcher.as_fd(), Duration::ZERO));
        // Reaped, not a zombie: signalling through our own pidfd finds no process.
        assert_eq!(
            pidfd_send_signal(&watcher, rustix::process::Signal::KILL),
            Err(Errno::SRCH)
        );
    }

    #[test]
    fn spawn_with_log_captures_stdout_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("child.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo to-out; echo to-err >&2; read x || echo stdin-is-null",
        ]);
        let mut c = QemuChild::spawn_with_log(cmd, &log).unwrap();
        assert_eq!(c.log_path(), Some(log.as_path()));
        assert!(
            c.wait_timeout(Duration::from_secs(5))
                .unwrap()
                .unwrap()
                .success()
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("to-out") && text.contains("to-err"), "{text}");
        assert!(text.contains("stdin-is-null"), "{text}");
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let err = QemuChild::spawn(Command::new("/nonexistent/qemu")).unwrap_err();
        assert!(matches!(err, ChildError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
