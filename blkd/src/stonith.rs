//! STONITH for nodes whose disks cannot fence them (the process backend: each agent opens
//! its disk images itself, so no key of the daemon's stops its writes). A won claim kills
//! the victim's process, known from the peer credentials of its coordinator connection,
//! and waits until it is gone before the claim is answered: a stopped victim must never
//! wake to write its old log over the taker's replay, nor keep its listening port.
//!
//! A process is known by its pid and its start time, so a pid the kernel gave to another
//! process since is never killed.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;

/// How long a killed victim may take to be gone before the claim is answered anyway.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// How often a killed victim is looked for while it is waited for.
const POLL: Duration = Duration::from_millis(10);

/// A process seen at a node socket: its pid and its start time (clock ticks after boot,
/// field 22 of `/proc/PID/stat`), which tells it from a later process with the same pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProcess {
    pub pid: i32,
    pub start_time: u64,
}

/// What the process table says of a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    /// No such process.
    Gone,
    /// Exited and not reaped yet (state Z or X): it runs nothing and holds no socket.
    Exited,
    /// Running or stopped, started at `start_time`.
    Alive { start_time: u64 },
}

/// The host's processes, as the daemon reads and kills them (a double in unit tests).
pub trait Processes: Send + Sync + std::fmt::Debug {
    /// What `pid` is now; an error says why it cannot be told.
    fn status(&self, pid: i32) -> Result<ProcessStatus, String>;
    /// Sends SIGKILL to `pid`.
    fn kill(&self, pid: i32) -> Result<(), Errno>;
}

/// The real process table: `/proc` and kill(2).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostProcesses;

impl Processes for HostProcesses {
    fn status(&self, pid: i32) -> Result<ProcessStatus, String> {
        let path = format!("/proc/{pid}/stat");
        match std::fs::read_to_string(&path) {
            Ok(stat) => parse_stat(&stat).ok_or_else(|| format!("cannot parse {path}: {stat:?}")),
            // ESRCH: the process went while its file was read.
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound
                    || error.raw_os_error() == Some(Errno::ESRCH as i32) =>
            {
                Ok(ProcessStatus::Gone)
            }
            Err(error) => Err(format!("cannot read {path}: {error}")),
        }
    }

    fn kill(&self, pid: i32) -> Result<(), Errno> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
    }
}

/// A process's state and start time from its `/proc/PID/stat` line. The command name
/// (field 2, in parentheses) may hold spaces and parentheses, so the fields are counted
/// after the last ')': state is field 3, start time field 22.
pub fn parse_stat(stat: &str) -> Option<ProcessStatus> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let state = *fields.first()?;
    let start_time: u64 = fields.get(22 - 3)?.parse().ok()?;
    Some(match state {
        "Z" | "X" | "x" => ProcessStatus::Exited,
        _ => ProcessStatus::Alive { start_time },
    })
}

/// Why the process at the other end of a connection is not known.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the peer's credentials")]
    Credentials(#[source] Errno),
    #[error("cannot tell the peer's process {pid}: {why}")]
    Status { pid: i32, why: String },
    #[error("the peer's process {pid} is gone already")]
    Gone { pid: i32 },
}

/// The process at the other end of `stream` (its credentials are those of when it
/// connected).
pub fn peer_process(
    stream: &UnixStream,
    processes: &dyn Processes,
) -> Result<PeerProcess, PeerError> {
    let credentials =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(PeerError::Credentials)?;
    let pid = credentials.pid();
    match processes
        .status(pid)
        .map_err(|why| PeerError::Status { pid, why })?
    {
        ProcessStatus::Alive { start_time } => Ok(PeerProcess { pid, start_time }),
        ProcessStatus::Gone | ProcessStatus::Exited => Err(PeerError::Gone { pid }),
    }
}

/// Each node's process as last seen asking the coordinator, and the means to kill it.
#[derive(Debug)]
pub struct Stonith {
    processes: Box<dyn Processes>,
    known: Mutex<BTreeMap<u32, PeerProcess>>,
    patience: Duration,
}

/// What a kill did, as a claim's answer lists it: `Ok` goes to `preempted` as is, `Err`
/// to `not_preempted` as "what: why".
pub type Killed = (String, Result<(), String>);

impl Stonith {
    pub fn new(processes: Box<dyn Processes>) -> Self {
        Self::with_patience(processes, PATIENCE)
    }

    /// As [`Stonith::new`], waiting `patience` for a killed process to be gone.
    pub fn with_patience(processes: Box<dyn Processes>, patience: Duration) -> Self {
        Self {
            processes,
            known: Mutex::new(BTreeMap::new()),
            patience,
        }
    }

    /// The process at the other end of `stream`, read from the host's process table.
    pub fn peer(&self, stream: &UnixStream) -> Result<PeerProcess, PeerError> {
        peer_process(stream, self.processes.as_ref())
    }

    /// Node `node`'s process asked the coordinator something: it is the one to kill.
    pub fn note(&self, node: u32, process: PeerProcess) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.insert(node, process) != Some(process) {
            log::info!(
                "node {node}'s process is {} (started at tick {})",
                process.pid,
                process.start_time
            );
        }
    }

    /// Node `node`'s process as last seen.
    pub fn known(&self, node: u32) -> Option<PeerProcess> {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&node)
            .copied()
    }

    /// Kills node `victim`'s process for node `by`'s won claim and waits until it is gone
    /// (at most the patience). Only a process that still has the start time it was seen
    /// with is killed; one gone already counts as killed.
    pub fn kill(&self, victim: u32, by: u32) -> Killed {
        let Some(process) = self.known(victim) else {
            return (
                format!("node {victim}'s process"),
                Err("not known: it asked this daemon nothing".into()),
            );
        };
        let pid = process.pid;
        let what = format!("process {pid}");
        let own = i32::try_from(std::process::id()).unwrap_or(0);
        if pid <= 1 || pid == own || self.known(by).is_some_and(|p| p.pid == pid) {
            return (
                what,
                Err(format!(
                    "not killed: it is also node {by}'s or the daemon's"
                )),
            );
        }
        match self.processes.status(pid) {
            Err(why) => return (what, Err(why)),
            Ok(status) if !runs(status, process) => {
                return (format!("{what} gone already"), Ok(()));
            }
            Ok(_) => {}
        }
        match self.processes.kill(pid) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return (format!("{what} gone already"), Ok(())),
            Err(error) => return (what, Err(format!("cannot kill it: {error}"))),
        }
        log::warn!("node {by}'s claim: node {victim}'s process {pid} sent SIGKILL");
        let deadline = Instant::now() + self.patience;
        loop {
            let status = self.processes.status(pid);
            if matches!(status, Ok(status) if !runs(status, process)) {
                return (format!("{what} killed"), Ok(()));
            }
            if Instant::now() >= deadline {
                let why = match status {
                    Err(why) => why,
                    Ok(_) => format!("killed, but still there after {:?}", self.patience),
                };
                return (what, Err(why));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Whether `status` is `process` still running (not gone, not exited, not another
/// process with its pid).
fn runs(status: ProcessStatus, process: PeerProcess) -> bool {
    matches!(status, ProcessStatus::Alive { start_time } if start_time == process.start_time)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A process table in memory: kills are recorded, and a killed process exits unless
    /// told to linger.
    #[derive(Debug, Default)]
    struct FakeProcesses {
        table: Mutex<BTreeMap<i32, ProcessStatus>>,
        kills: Mutex<Vec<i32>>,
        linger: bool,
    }

    impl Processes for Arc<FakeProcesses> {
        fn status(&self, pid: i32) -> Result<ProcessStatus, String> {
            Ok(self
                .table
                .lock()
                .unwrap()
                .get(&pid)
                .copied()
                .unwrap_or(ProcessStatus::Gone))
        }

        fn kill(&self, pid: i32) -> Result<(), Errno> {
            self.kills.lock().unwrap().push(pid);
            let mut table = self.table.lock().unwrap();
            match table.get_mut(&pid) {
                None => Err(Errno::ESRCH),
                Some(status) => {
                    if !self.linger {
                        *status = ProcessStatus::Exited;
                    }
                    Ok(())
                }
            }
        }
    }

    fn killer(linger: bool, table: &[(i32, u64)]) -> (Arc<FakeProcesses>, Stonith) {
        let fake = Arc::new(FakeProcesses {
            linger,
            ..FakeProcesses::default()
        });
        for &(pid, start_time) in table {
            fake.table
                .lock()
                .unwrap()
                .insert(pid, ProcessStatus::Alive { start_time });
        }
        let stonith =
            Stonith::with_patience(Box::new(Arc::clone(&fake)), Duration::from_millis(50));
        (fake, stonith)
    }

    fn process(pid: i32, start_time: u64) -> PeerProcess {
        PeerProcess { pid, start_time }
    }

    #[test]
    fn the_start_time_is_field_22_counted_after_the_last_parenthesis() {
        let stat = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 105 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000000 200 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(ProcessStatus::Alive { start_time: 987654 })
        );
        let zombie = stat.replace(") S ", ") Z ");
        assert_eq!(parse_stat(&zombie), Some(ProcessStatus::Exited));
        assert_eq!(parse_stat("4242 (short) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
        // This very process, read for real.
        let own = i32::try_from(std::process::id()).unwrap();
        assert!(matches!(
            HostProcesses.status(own),
            Ok(ProcessStatus::Alive { start_time }) if start_time > 0
        ));
    }

    #[test]
    fn the_peer_of_a_connection_is_this_process() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = peer_process(&ours, &HostProcesses).unwrap();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
    }

    #[test]
    fn the_victims_process_is_killed_and_waited_for() {
        let (fake, stonith) = killer(false, &[(100, 7), (200, 9)]);
        stonith.note(0, process(100, 7));
        stonith.note(1, process(200, 9));
        assert_eq!(stonith.kill(0, 1), ("process 100 killed".into(), Ok(())));
        assert_eq!(*fake.kills.lock().unwrap(), [100]);
    }

    #[test]
    fn a_recycled_pid_is_never_killed() {
        // Node 0's process 100 started at 7; pid 100 is now a process started at 8.
        let (fake, stonith) = killer(false, &[(100, 8)]);
        stonith.note(0, process(100, 7));
        assert_eq!(
            stonith.kill(0, 1),
            ("process 100 gone already".into(), Ok(()))
        );
        assert!(fake.kills.lock().unwrap().is_empty());
        // Gone from the table altogether: nothing to kill either.
        let (fake, stonith) = killer(false, &[]);
        stonith.note(0, process(100, 7));
        assert_eq!(
            stonith.kill(0, 1),
            ("process 100 gone already".into(), Ok(()))
        );
        assert!(fake.kills.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unknown_or_undying_victim_is_listed_as_not_fenced() {
        let (fake, stonith) = killer(true, &[(100, 7), (200, 9)]);
        let (what, result) = stonith.kill(0, 1);
        assert_eq!(what, "node 0's process");
        assert!(result.unwrap_err().starts_with("not known"));
        stonith.note(0, process(100, 7));
        let (what, result) = stonith.kill(0, 1);
        assert_eq!(what, "process 100");
        assert!(result.unwrap_err().starts_with("killed, but still there"));
        // A process that is the claimer's too (or the daemon's) is not killed.
        stonith.note(1, process(100, 7));
        let (_, result) = stonith.kill(0, 1);
        assert!(result.unwrap_err().starts_with("not killed"));
        assert_eq!(*fake.kills.lock().unwrap(), [100]);
    }
}
