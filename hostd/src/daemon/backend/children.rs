//! The node processes both real backends own: one pidfd-backed child per node, how it
//! ended, and stopping them all on one deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use qemu::QemuChild;
use wire::records::RunRecord;

use super::{BackendError, NodePaths, Scheduling, Signal, Stopped};
use crate::daemon::topology::NodeId;

/// How often a QEMU whose vCPU threads were not found is searched again (they appear
/// after it starts; one started by an older hostd has no thread names at all).
const VCPU_SEARCH_INTERVAL: Duration = Duration::from_secs(1);

/// Which threads of a node's process run the node, for their CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestThreads {
    /// QEMU's vCPU threads (named `CPU 0/TCG`, `CPU 1/KVM`...).
    Vcpus,
    /// The main thread (an agent process: it beats).
    Main,
}

/// The threads of one process whose CPU time is read, found once per process.
#[derive(Debug, Default)]
struct WatchedThreads {
    pid: u32,
    tids: Vec<u32>,
    next_search: Option<Instant>,
}

/// One child process per node.
#[derive(Debug)]
pub struct Children {
    paths: Vec<NodePaths>,
    children: Vec<Option<QemuChild>>,
    /// How each node's current process ended, once seen.
    exits: Vec<Option<String>>,
    threads: Vec<WatchedThreads>,
}

impl Children {
    pub fn new(paths: Vec<NodePaths>) -> Self {
        let n = paths.len();
        Self {
            paths,
            children: (0..n).map(|_| None).collect(),
            exits: vec![None; n],
            threads: (0..n).map(|_| WatchedThreads::default()).collect(),
        }
    }

    pub fn name(&self, node: NodeId) -> &str {
        &self.paths[node.index()].name
    }

    pub fn paths(&self, node: NodeId) -> &NodePaths {
        &self.paths[node.index()]
    }

    pub fn child_mut(&mut self, node: NodeId) -> Option<&mut QemuChild> {
        self.children[node.index()].as_mut()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Starts `command` for `node`, its output appended to the node's log.
    pub fn spawn(&mut self, node: NodeId, command: Command) -> Result<u32, BackendError> {
        let log = &self.paths[node.index()].log;
        let child =
            QemuChild::spawn_with_log(command, log).map_err(|source| BackendError::Spawn {
                node: self.name(node).to_owned(),
                source: Box::new(source),
            })?;
        let pid = child.pid();
        self.children[node.index()] = Some(child);
        self.exits[node.index()] = None;
        Ok(pid)
    }

    /// Takes over the process `record` names.
    pub fn adopt(&mut self, node: NodeId, record: &RunRecord) -> Result<(), BackendError> {
        let log = self.paths[node.index()].log.clone();
        let child =
            QemuChild::adopt(record.pid, record.start_time, Some(log)).map_err(|source| {
                BackendError::Adopt {
                    node: self.name(node).to_owned(),
                    source: Box::new(source),
                }
            })?;
        self.children[node.index()] = Some(child);
        self.exits[node.index()] = None;
        Ok(())
    }

    /// How the node's process ended, the first time that is seen.
    pub fn poll_exit(&mut self, node: NodeId) -> Option<String> {
        if self.exits[node.index()].is_some() {
            return None;
        }
        let child = self.children[node.index()].as_mut()?;
        match child.try_wait() {
            Ok(Some(exit)) => {
                let how = exit.to_string();
                self.exits[node.index()] = Some(how.clone());
                Some(how)
            }
            Ok(None) => None,
            Err(error) => {
                log::warn!(
                    "node {}: cannot check its process: {}",
                    self.paths[node.index()].name,
                    wire::error_chain::one_line(&error)
                );
                None
            }
        }
    }

    /// Whether the process has ended; `poll_exit` still reports it once.
    pub fn has_exited(&mut self, node: NodeId) -> bool {
        if self.exits[node.index()].is_some() {
            return true;
        }
        self.children[node.index()]
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// The pid while the process runs.
    pub fn pid(&self, node: NodeId) -> Option<u32> {
        if self.exits[node.index()].is_some() {
            return None;
        }
        self.children[node.index()].as_ref().map(QemuChild::pid)
    }

    /// How the node's process runs: whether all its threads are stopped (one read of its
    /// stat file while it runs) and, if asked, the CPU time of `which` threads. None once
    /// the process is gone.
    pub fn scheduling(&mut self, node: NodeId, which: Option<GuestThreads>) -> Option<Scheduling> {
        let pid = self.pid(node)?;
        // An error means the process has just gone: its exit is reported by `poll_exit`.
        if qemu::child::all_threads_stopped(pid).ok()? {
            return Some(Scheduling {
                all_stopped: true,
                cpu: None,
            });
        }
        Some(Scheduling {
            all_stopped: false,
            cpu: which.and_then(|which| self.cpu(node, pid, which)),
        })
    }

    /// The summed CPU time of process `pid`'s `which` threads.
    fn cpu(
        &mut self,
        node: NodeId,
        pid: u32,
        which: GuestThreads,
    ) -> Option<qemu::child::SchedStat> {
        if which == GuestThreads::Main {
            return qemu::child::thread_schedstat(pid, pid).ok();
        }
        let watched = &mut self.threads[node.index()];
        if watched.pid != pid {
            *watched = WatchedThreads {
                pid,
                ..WatchedThreads::default()
            };
        }
        if watched.tids.is_empty() {
            let now = Instant::now();
            if watched.next_search.is_some_and(|next| now < next) {
                return None;
            }
            watched.next_search = Some(now + VCPU_SEARCH_INTERVAL);
            watched.tids = qemu::child::threads_named(pid, is_vcpu_thread).unwrap_or_default();
        }
        let mut total = qemu::child::SchedStat::default();
        for &tid in &watched.tids {
            match qemu::child::thread_schedstat(pid, tid) {
                Ok(stat) => {
                    total.ran += stat.ran;
                    total.waited += stat.waited;
                }
                Err(_) => {
                    // A vCPU thread went (a hot-unplug, or the process is ending): search
                    // again, and give no reading that would mix two sets of threads.
                    watched.tids.clear();
                    return None;
                }
            }
        }
        (!watched.tids.is_empty()).then_some(total)
    }

    pub fn signal(&mut self, node: NodeId, signal: Signal) -> Result<(), BackendError> {
        let name = self.name(node).to_owned();
        let child = self.children[node.index()]
            .as_mut()
            .filter(|_| self.exits[node.index()].is_none())
            .ok_or(BackendError::NotRunning { node: name.clone() })?;
        let signal = match signal {
            Signal::Kill => qemu::Signal::Kill,
            Signal::Stop => qemu::Signal::Stop,
        };
        child.signal(signal).map_err(|source| BackendError::Signal {
            node: name,
            source: Box::new(source),
        })
    }

    /// Sends SIGTERM (a request to stop).
    pub fn terminate(&mut self, node: NodeId) -> Result<(), BackendError> {
        let name = self.name(node).to_owned();
        match self.children[node.index()].as_mut() {
            Some(child) => {
                child
                    .signal(qemu::Signal::Term)
                    .map_err(|source| BackendError::Signal {
                        node: name,
                        source: Box::new(source),
                    })
            }
            None => Err(BackendError::NotRunning { node: name }),
        }
    }

    /// Kills and reaps the node's process (an exited one is only reaped).
    pub fn fence(&mut self, node: NodeId, timeout: Duration) -> Result<String, BackendError> {
        let name = self.name(node).to_owned();
        let Some(child) = self.children[node.index()].as_mut() else {
            return Ok("never started".to_owned());
        };
        let exit = child
            .kill_and_reap(timeout)
            .map_err(|source| BackendError::Fence {
                node: name,
                source: Box::new(source),
            })?;
        let how = exit.to_string();
        self.exits[node.index()].get_or_insert_with(|| how.clone());
        Ok(how)
    }

    /// Whether the node has a process that has not been seen to end.
    pub fn running(&self, node: NodeId) -> bool {
        self.children[node.index()].is_some() && self.exits[node.index()].is_none()
    }

    /// After each running node was asked to stop (`asked`: Ok with how a clean stop is
    /// called, or why asking failed), waits for all of them until one deadline and kills
    /// what is left.
    pub fn finish_stop(
        &mut self,
        asked: Vec<(NodeId, Result<&'static str, String>)>,
        timeout: Duration,
    ) -> Stopped {
        let deadline = Instant::now() + timeout;
        let mut stopped = Vec::new();
        for index in 0..self.paths.len() {
            let node = NodeId::from_index(index);
            let request = asked
                .iter()
                .find(|(n, _)| *n == node)
                .map(|(_, r)| r.clone());
            let how = match (self.children[index].as_mut(), &self.exits[index]) {
                (None, _) => "never started".to_owned(),
                (Some(_), Some(exit)) => format!("had already {exit}"),
                (Some(child), None) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match (child.wait_timeout(left), request) {
                        (Ok(Some(_)), Some(Ok(clean))) => clean.to_owned(),
                        _ => match child.kill_and_reap(timeout) {
                            Ok(_) => "killed (did not stop in time)".to_owned(),
                            Err(error) => format!(
                                "could not be killed: {}",
                                wire::error_chain::one_line(&error)
                            ),
                        },
                    }
                }
            };
            stopped.push((node, how));
        }
        stopped
    }

    pub fn kill_all(&mut self, timeout: Duration) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill_and_reap(timeout);
        }
    }

    pub fn disown_all(&mut self) {
        for child in &mut self.children {
            if let Some(child) = child.take() {
                child.disown();
            }
        }
    }
}

/// Whether a thread name is a QEMU vCPU's: `CPU <n>/<accelerator>` (with `debug-threads=on`).
fn is_vcpu_thread(name: &str) -> bool {
    name.strip_prefix("CPU ")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(index, _)| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_told_by_name() {
        assert!(is_vcpu_thread("CPU 0/TCG"));
        assert!(is_vcpu_thread("CPU 12/KVM"));
        assert!(!is_vcpu_thread("qemu-system-x86"));
        assert!(!is_vcpu_thread("CPU /TCG"));
        assert!(!is_vcpu_thread("CPU 0"));
        assert!(!is_vcpu_thread("worker"));
    }

    #[test]
    fn a_stopped_child_is_seen_stopped_and_a_running_one_has_cpu_time() {
        let paths = vec![NodePaths {
            name: "a".into(),
            log: std::env::temp_dir().join(format!("ivha-children-{}.log", std::process::id())),
            qmp_socket: "/nonexistent/qmp".into(),
            shell_socket: "/nonexistent/shell".into(),
        }];
        let mut children = Children::new(paths.clone());
        let node = NodeId::from_index(0);
        let mut command = Command::new("sleep");
        command.arg("30");
        children.spawn(node, command).unwrap();
        let running = children.scheduling(node, Some(GuestThreads::Main)).unwrap();
        assert!(!running.all_stopped);
        assert!(running.cpu.is_some());
        // No thread of `sleep` is a vCPU: no reading, and no second search at once.
        let vcpus = children
            .scheduling(node, Some(GuestThreads::Vcpus))
            .unwrap();
        assert_eq!(vcpus.cpu, None);
        children.signal(node, Signal::Stop).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !children
            .scheduling(node, Some(GuestThreads::Vcpus))
            .is_some_and(|s| s.all_stopped)
        {
            assert!(Instant::now() < deadline, "never seen stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        children.fence(node, Duration::from_secs(5)).unwrap();
        assert_eq!(children.scheduling(node, Some(GuestThreads::Main)), None);
        let _ = std::fs::remove_file(&paths[0].log);
    }
}
