//! The node processes both real backends own: one pidfd-backed child per node, how it
//! ended, and stopping them all on one deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use qemu::QemuChild;
use wire::records::RunRecord;

use super::{BackendError, NodePaths, Signal, Stopped};
use crate::daemon::topology::NodeId;

/// One child process per node.
#[derive(Debug)]
pub struct Children {
    paths: Vec<NodePaths>,
    children: Vec<Option<QemuChild>>,
    /// How each node's current process ended, once seen.
    exits: Vec<Option<String>>,
}

impl Children {
    pub fn new(paths: Vec<NodePaths>) -> Self {
        let n = paths.len();
        Self {
            paths,
            children: (0..n).map(|_| None).collect(),
            exits: vec![None; n],
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
