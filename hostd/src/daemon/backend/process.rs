//! Nodes as agent processes on the host (`--backend process`): no guest, no hypervisor.
//! The regions are the same files; each agent listens on its identities' host ports
//! itself, so moving an address is part of the agent's takeover command.

use std::path::PathBuf;
use std::time::Duration;

use wire::records::RunRecord;

use super::children::Children;
use super::{
    Adopted, BackendError, NodeBackend, NodePaths, Polled, Scheduling, Signal, SpawnPlan, Stopped,
};
use crate::daemon::topology::NodeId;

/// How long a killed agent may take to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent binary was not found.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest-agent not found at {}: build it (`cargo build -p guest-agent`) or set IVHA_AGENT_BINARY",
    path.display()
)]
pub struct NoAgent {
    pub path: PathBuf,
}

/// One agent process per node.
#[derive(Debug)]
pub struct ProcessBackend {
    agent: PathBuf,
    children: Children,
}

impl ProcessBackend {
    /// Agents from `IVHA_AGENT_BINARY`, else `guest-agent` beside this binary.
    pub fn new(paths: Vec<NodePaths>) -> Result<Self, NoAgent> {
        let path = crate::programs::beside_hostd("IVHA_AGENT_BINARY", "guest-agent");
        if !path.exists() {
            return Err(NoAgent { path });
        }
        Ok(Self {
            agent: path,
            children: Children::new(paths),
        })
    }

    fn command(&self, plan: &SpawnPlan) -> std::process::Command {
        let mut command = std::process::Command::new(&self.agent);
        command
            .arg("--node")
            .arg(&plan.name)
            .arg("--region-dir")
            .arg(&plan.regions_dir)
            .arg("--disk")
            .arg(&plan.disk);
        // Every node it may take over: their disks by name (the regions are in the directory).
        for watched in &plan.watched {
            let mut peer_disk = std::ffi::OsString::from(format!("{}=", watched.name));
            peer_disk.push(&watched.disk);
            command.arg("--peer-disk").arg(peer_disk);
        }
        // While another node holds this node's identity, it holds its address too.
        let listen = match plan.ports.first() {
            Some(port) => format!("127.0.0.1:{port}"),
            None => "127.0.0.1:0".to_owned(),
        };
        command.arg("--listen").arg(listen);
        if plan.options.interconnect.enabled() {
            command.arg("--ic-socket-dir").arg(&plan.interconnect_dir);
        }
        command.args(plan.options.to_args());
        command
    }
}

impl NodeBackend for ProcessBackend {
    fn accel(&self) -> (String, String) {
        (
            "process".to_owned(),
            "agents run as host processes (--backend process)".to_owned(),
        )
    }

    fn process_name(&self) -> &'static str {
        "agent process"
    }

    fn spawn(&mut self, node: NodeId, plan: &SpawnPlan) -> Result<u32, BackendError> {
        let command = self.command(plan);
        self.children.spawn(node, command)
    }

    fn connect(&mut self, _node: NodeId) -> Result<(), BackendError> {
        Ok(())
    }

    fn adopt(&mut self, node: NodeId, record: &RunRecord) -> Result<Adopted, BackendError> {
        self.children.adopt(node, record)?;
        Ok(Adopted {
            paused: false,
            note: format!("agent process {} adopted", record.pid),
        })
    }

    fn poll(&mut self, node: NodeId) -> Polled {
        Polled {
            exited: self.children.poll_exit(node),
            events: Vec::new(),
            scheduling: None,
        }
    }

    fn scheduling(&mut self, node: NodeId) -> Option<Scheduling> {
        // Only whether the agent is stopped: its main thread, which beats, sleeps between
        // beats whether it is well or blocked (a loaded host was seen to keep it silent for
        // over a second), so its CPU time says nothing about a silence, and the heartbeat's
        // ceiling decides.
        self.children.scheduling(node, None)
    }

    fn pid(&self, node: NodeId) -> Option<u32> {
        self.children.pid(node)
    }

    fn has_exited(&mut self, node: NodeId) -> bool {
        self.children.has_exited(node)
    }

    fn signal(&mut self, node: NodeId, signal: Signal) -> Result<(), BackendError> {
        self.children.signal(node, signal)
    }

    fn fence(&mut self, node: NodeId, timeout: Duration) -> Result<String, BackendError> {
        self.children.fence(node, timeout)
    }

    fn forward(&mut self, _node: NodeId, _port: u16) -> Result<(), BackendError> {
        Ok(())
    }

    fn unforward(&mut self, _node: NodeId, _port: u16) -> Result<(), BackendError> {
        Ok(())
    }

    fn forwarded_ports(&mut self, _node: NodeId) -> Option<Result<Vec<u16>, BackendError>> {
        None
    }

    fn agents_listen(&self) -> bool {
        true
    }

    fn panic(&mut self, _node: NodeId) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: "process",
            what: "panic a kernel (there is none)",
        })
    }

    fn kill_agent(&mut self, node: NodeId) -> Result<String, BackendError> {
        // The agent is the node's process.
        let pid = self.children.pid(node);
        self.children.signal(node, Signal::Kill)?;
        Ok(format!(
            "SIGKILL sent to node {} (pid {})",
            self.children.name(node),
            pid.unwrap_or_default()
        ))
    }

    fn stop_all(&mut self, timeout: Duration) -> Stopped {
        let mut asked = Vec::new();
        for index in 0..self.children.len() {
            let node = NodeId::from_index(index);
            if self.children.running(node) {
                let request = self
                    .children
                    .terminate(node)
                    .map(|()| "stopped (SIGTERM)")
                    .map_err(|e| wire::error_chain::one_line(&e));
                asked.push((node, request));
            }
        }
        self.children.finish_stop(asked, timeout)
    }

    fn kill_all(&mut self) {
        self.children.kill_all(KILL_TIMEOUT);
    }

    fn disown_all(&mut self) {
        self.children.disown_all();
    }
}
