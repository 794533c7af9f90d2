//! A QEMU (or any) child process owned through a pidfd.
//!
//! The pidfd is opened right after spawning, while the child is still our unreaped child,
//! so it can never refer to a recycled pid. Signals go through `pidfd_send_signal`, and the
//! pidfd becomes readable the moment the process exits, so callers can poll it alongside
//! sockets. Dropping a [`QemuChild`] kills and reaps the process: no QEMU outlives its
//! handle.
//!
//! A process started by an earlier hostd can be *adopted* ([`QemuChild::adopt`]): it is not
//! our child, so its exit is seen through the pidfd but its exit status is not ours to
//! collect (its new parent, init, reaps it).

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
    #[error("cannot start {program}")]
    Spawn {
        /// The program that failed to start.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The stdout/stderr log file could not be opened.
    #[error("cannot open the log file {}", path.display())]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `pidfd_open` failed (e.g. a kernel older than 5.3).
    #[error("cannot open a pidfd for process {pid}")]
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
        /// How it ended, when this handle saw it end.
        status: Option<Exit>,
    },
    /// The process to adopt is not there, or its pid now belongs to another process.
    #[error("cannot adopt process {pid}: {reason}")]
    Adopt {
        /// The process id.
        pid: u32,
        /// Why not.
        reason: String,
    },
    /// `pidfd_send_signal` failed for a reason other than the process being gone.
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        /// The process id.
        pid: u32,
        /// The signal.
        signal: Signal,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Waiting for or polling the process failed.
    #[error("cannot wait for process {pid}")]
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

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Reaped through this handle: the real exit status.
    Status(ExitStatus),
    /// An adopted process ended; only its parent (init) learns how.
    Unobserved,
}

impl Exit {
    /// The exit status, when it could be observed.
    pub fn status(self) -> Option<ExitStatus> {
        match self {
            Exit::Status(status) => Some(status),
            Exit::Unobserved => None,
        }
    }

    /// Whether the process is known to have exited with status 0.
    pub fn success(self) -> bool {
        self.status().is_some_and(|s| s.success())
    }

    /// The signal that ended the process, when known.
    pub fn signal(self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.status().and_then(|s| s.signal())
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Status(status) => status.fmt(f),
            Exit::Unobserved => f.write_str("status unknown: adopted process"),
        }
    }
}

/// A running child process with a pidfd. Killed and reaped on drop.
#[derive(Debug)]
pub struct QemuChild {
    /// `None` for an adopted process (not our child).
    child: Option<Child>,
    pid: u32,
    pidfd: OwnedFd,
    status: Option<Exit>,
    log_path: Option<PathBuf>,
    /// Cleared by [`QemuChild::disown`].
    kill_on_drop: bool,
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
                pid: child.id(),
                child: Some(child),
                pidfd,
                status: None,
                log_path: None,
                kill_on_drop: true,
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

    /// Adopts a running process that is not our child (started by an earlier hostd), if
    /// process `pid` still exists and started at `start_time` (see [`process_start_time`]),
    /// so a recycled pid is never mistaken for it. Its stdout and stderr stay where they
    /// were; `log_path` only says where that is.
    pub fn adopt(
        pid: u32,
        start_time: u64,
        log_path: Option<PathBuf>,
    ) -> Result<QemuChild, ChildError> {
        let adopt_err = |reason: String| ChildError::Adopt { pid, reason };
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| adopt_err("not a valid pid".into()))?;
        let same_process = || match process_start_time(pid) {
            Ok(found) if found == start_time => Ok(()),
            Ok(found) => Err(adopt_err(format!(
                "the pid now belongs to another process (started at tick {found}, not {start_time})"
            ))),
            Err(e) => Err(adopt_err(format!("it is gone ({e})"))),
        };
        same_process()?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| ChildError::Pidfd {
            pid,
            source: e.into(),
        })?;
        // Checked again now that the pidfd pins the process: the pid may have been
        // recycled between the first check and the open.
        same_process()?;
        let mut this = QemuChild {
            child: None,
            pid,
            pidfd,
            status: None,
            log_path,
            kill_on_drop: true,
        };
        if this.try_wait()?.is_some() {
            return Err(adopt_err("it has exited".into()));
        }
        Ok(this)
    }

    /// Lets go of the process without killing it: for a caller that adopted it and then
    /// could not take charge of it after all (the next hostd may).
    pub fn disown(mut self) {
        self.kill_on_drop = false;
    }

    /// Whether this process was adopted rather than started by this handle.
    pub fn is_adopted(&self) -> bool {
        self.child.is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
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
        self.child.as_mut()?.stdin.take()
    }

    /// Takes the child's stdout pipe, if it was spawned with one.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// Takes the child's stderr pipe, if it was spawned with one.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.as_mut()?.stderr.take()
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
    pub fn try_wait(&mut self) -> Result<Option<Exit>, ChildError> {
        if self.status.is_none() {
            self.status = self.collect(Duration::ZERO)?;
        }
        Ok(self.status)
    }

    /// Sees whether the process has ended, waiting at most `timeout` on the pidfd, and
    /// reaps our own child. Does not retry on EINTR: callers loop.
    fn collect(&mut self, timeout: Duration) -> Result<Option<Exit>, ChildError> {
        let pid = self.pid;
        let wait_err = |source| ChildError::Wait { pid, source };
        let ts = Timespec::try_from(timeout)
            .map_err(|e| wait_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => Ok(None),
            Ok(_) => match &mut self.child {
                Some(child) => Ok(Some(Exit::Status(child.wait().map_err(wait_err)?))),
                None => Ok(Some(Exit::Unobserved)),
            },
            Err(e) => Err(wait_err(e.into())),
        }
    }

    /// Waits up to `timeout` for the child to exit, by polling the pidfd, and reaps it.
    /// `None` if it is still running at the deadline.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Exit>, ChildError> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            // Poll in slices of at most an hour so the timespec never overflows.
            let slice = remaining.min(Duration::from_secs(3600));
            if let Some(status) = self.collect(slice)? {
                self.status = Some(status);
                return Ok(Some(status));
            }
            if remaining.is_zero() {
                return Ok(None);
            }
        }
    }

    /// The fence: SIGKILL through the pidfd, then wait until the process is reaped.
    /// Returns the exit status (also when the child had exited already). Fails only if the
    /// kernel does not let the process die within `timeout`.
    pub fn kill_and_reap(&mut self, timeout: Duration) -> Result<Exit, ChildError> {
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

/// A `/proc/.../stat` line from field 3 (the state) on. The command name before it (field 2)
/// is in parentheses and may itself contain ") ", so the line is split at the last one.
fn stat_from_state(path: &str) -> std::io::Result<String> {
    let stat = std::fs::read_to_string(path)?;
    stat.rsplit_once(") ")
        .map(|(_, after_name)| after_name.to_owned())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed stat line"))
}

/// The first character of `stat` (from [`stat_from_state`]): the state.
fn state_of(stat: &str) -> std::io::Result<char> {
    stat.chars()
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "empty stat line"))
}

/// Field 22 of `stat` (from [`stat_from_state`]): the start time.
fn start_time_of(stat: &str) -> std::io::Result<u64> {
    stat.split_whitespace()
        .nth(22 - 3)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed stat line"))
}

/// When process `pid` started, in clock ticks after boot (field 22 of `/proc/PID/stat`):
/// with the pid, it names one process for the life of the machine.
pub fn process_start_time(pid: u32) -> std::io::Result<u64> {
    start_time_of(&stat_from_state(&format!("/proc/{pid}/stat"))?)
}

/// The state and the start time of process `pid` (see [`process_state`] and
/// [`process_start_time`]), from one read of `/proc/PID/stat`.
pub fn process_state_and_start_time(pid: u32) -> std::io::Result<(char, u64)> {
    let stat = stat_from_state(&format!("/proc/{pid}/stat"))?;
    // The start time first: on a malformed line, the error is `process_start_time`'s.
    let start_time = start_time_of(&stat)?;
    Ok((state_of(&stat)?, start_time))
}

/// The state of process `pid` (field 3 of `/proc/PID/stat`): `R`, `S`, `D`, `T` (stopped),
/// `t`, `Z` (exited, not reaped), `X`...
pub fn process_state(pid: u32) -> std::io::Result<char> {
    state_of(&stat_from_state(&format!("/proc/{pid}/stat"))?)
}

/// The state of every thread of process `pid`.
pub fn thread_states(pid: u32) -> std::io::Result<Vec<char>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))?
        .map(|task| {
            let path = task?.path().join("stat");
            state_of(&stat_from_state(&path.to_string_lossy())?)
        })
        .collect()
}

/// Whether every thread of process `pid` is stopped: `T` (by a signal such as SIGSTOP) or
/// `t` (held by a tracer). Such a process does nothing until someone continues it, and
/// SIGKILL still ends it. The main thread is read first and the others only when it is
/// stopped, so a running process costs one read.
pub fn all_threads_stopped(pid: u32) -> std::io::Result<bool> {
    let stopped = |state: char| matches!(state, 'T' | 't');
    if !stopped(process_state(pid)?) {
        return Ok(false);
    }
    Ok(thread_states(pid)?.into_iter().all(stopped))
}

/// The ids of process `pid`'s threads whose name (`/proc/PID/task/TID/comm`) `wanted`
/// accepts, e.g. QEMU's vCPU threads (`CPU 0/TCG`, `CPU 1/KVM`).
pub fn threads_named(pid: u32, wanted: impl Fn(&str) -> bool) -> std::io::Result<Vec<u32>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        match std::fs::read_to_string(task.path().join("comm")) {
            Ok(name) if wanted(name.trim_end()) => found.push(tid),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// What the scheduler says about one thread since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time on a CPU.
    pub ran: Duration,
    /// Time runnable but waiting on a run queue for a CPU.
    pub waited: Duration,
}

/// Thread `tid` of process `pid` as the scheduler accounts it (`/proc/PID/task/TID/schedstat`:
/// nanoseconds run, nanoseconds waited, time slices).
pub fn thread_schedstat(pid: u32, tid: u32) -> std::io::Result<SchedStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(ran)), Some(Ok(waited))) => Ok(SchedStat {
            ran: Duration::from_nanos(ran),
            waited: Duration::from_nanos(waited),
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed schedstat line {text:?}"),
        )),
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        if self.status.is_some() || !self.kill_on_drop {
            return;
        }
        match self.kill_and_reap(DROP_REAP_TIMEOUT) {
            Ok(status) => log::debug!("process {} killed on drop: {status}", self.pid()),
            Err(e) => log::error!(
                "dropping process {}: {}",
                self.pid(),
                wire::error_chain::one_line(&e)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        while process_state(c.pid()).unwrap() != 'T' {
            assert!(Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.signal(Signal::Cont).unwrap();
        while process_state(c.pid()).unwrap() == 'T' {
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

    /// Starts `sleep 30` as a grandchild (its shell parent exits at once), so it is not
    /// our child, like a QEMU left behind by a hostd that died.
    fn orphan_sleeper() -> u32 {
        let out = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn adopts_a_process_that_is_not_our_child_and_fences_it() {
        let pid = orphan_sleeper();
        let start = process_start_time(pid).unwrap();
        let mut adopted = QemuChild::adopt(pid, start, None).unwrap();
        assert!(adopted.is_adopted());
        assert_eq!(adopted.pid(), pid);
        assert_eq!(adopted.try_wait().unwrap(), None);
        adopted.signal(Signal::Stop).unwrap();
        // The fence works on a process we cannot reap: its pidfd says when it is gone.
        let exit = adopted.kill_and_reap(Duration::from_secs(5)).unwrap();
        assert_eq!(exit, Exit::Unobserved);
        assert!(exit.to_string().contains("adopted"), "{exit}");
        let again = adopted.signal(Signal::Kill).unwrap_err();
        assert!(matches!(again, ChildError::Exited { .. }), "{again:?}");
    }

    #[test]
    fn a_disowned_process_keeps_running() {
        let pid = orphan_sleeper();
        let start = process_start_time(pid).unwrap();
        QemuChild::adopt(pid, start, None).unwrap().disown();
        assert_eq!(process_start_time(pid).unwrap(), start, "still there");
        drop(QemuChild::adopt(pid, start, None).unwrap());
    }

    #[test]
    fn adopt_refuses_a_recycled_or_missing_pid() {
        let pid = orphan_sleeper();
        let start = process_start_time(pid).unwrap();
        let err = QemuChild::adopt(pid, start + 1, None).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        // Clean up through a correct adoption (drop kills it).
        drop(QemuChild::adopt(pid, start, None).unwrap());
        let err = QemuChild::adopt(pid, start, None).unwrap_err();
        assert!(matches!(err, ChildError::Adopt { .. }), "{err:?}");
        // Gone, or a zombie its new parent has not reaped yet.
        let text = err.to_string();
        assert!(text.contains("gone") || text.contains("exited"), "{text}");
    }

    #[test]
    fn start_time_reads_our_own_process() {
        let ours = process_start_time(std::process::id()).unwrap();
        assert!(ours > 0);
        assert_eq!(process_start_time(std::process::id()).unwrap(), ours);
        assert!(process_start_time(u32::MAX).is_err());
        assert!(matches!(
            process_state(std::process::id()).unwrap(),
            'R' | 'S'
        ));
        let threads = thread_states(std::process::id()).unwrap();
        assert!(
            !threads.is_empty() && threads.iter().all(|s| *s != 'Z'),
            "{threads:?}"
        );
    }

    #[test]
    fn a_stopped_process_has_every_thread_stopped_and_a_running_one_not() {
        let mut c = sleeper();
        assert!(!all_threads_stopped(c.pid()).unwrap());
        c.signal(Signal::Stop).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(c.pid()).unwrap() {
            assert!(Instant::now() < deadline, "never seen stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.kill_and_reap(Duration::from_secs(5)).unwrap();
        assert!(all_threads_stopped(u32::MAX).is_err());
    }

    #[test]
    fn threads_are_found_by_name_and_their_cpu_time_read() {
        let pid = std::process::id();
        let (ready, spun) = std::sync::mpsc::channel::<()>();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("CPU 0/TCG".into())
            .spawn(move || {
                let started = Instant::now();
                while started.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
                let _ = ready.send(());
                let _ = stopped.recv();
            })
            .unwrap();
        spun.recv().unwrap();
        let found = threads_named(pid, |name| name.starts_with("CPU ")).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let stat = thread_schedstat(pid, found[0]).unwrap();
        assert!(stat.ran >= Duration::from_millis(20), "{stat:?}");
        drop(stop);
        thread.join().unwrap();
        assert!(thread_schedstat(pid, u32::MAX).is_err());
    }

    #[test]
    fn state_and_start_time_come_from_one_read() {
        let pid = std::process::id();
        let (state, start_time) = process_state_and_start_time(pid).unwrap();
        assert!(matches!(state, 'R' | 'S'), "{state}");
        assert_eq!(start_time, process_start_time(pid).unwrap());
        assert!(process_state_and_start_time(u32::MAX).is_err());
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let err = QemuChild::spawn(Command::new("/nonexistent/qemu")).unwrap_err();
        assert!(matches!(err, ChildError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
