//! Moving an identity between the nodes: takeover after a failure, planned takeover,
//! giveback, and the faults `hostd kill` injects.
//!
//! Unplanned takeover (a node went Down): fence first (SIGKILL through the pidfd, reap: no
//! takeover until the node is confirmed dead), then a new epoch and owner in the control
//! region, then the survivor's `TakeOver` command (it replays the dead node's log and
//! acknowledges), then the address. Planned moves (takeover, giveback) release first: the
//! old owner stops writing and flushes its log before the new one starts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use shm::node::{Ack, ack_status};
use shm::{Command, CommandKind, Owner, TakeOverArgument};

use super::launch::Cluster;
use super::send;
use crate::config::GUEST_NBD_PORT;
use crate::events::Event;
use crate::protocol::{KillSignal, MoveReport, NodeState, Response, Timeline};

/// How long a fenced node may take to die and be reaped.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent may take to acknowledge a takeover (a replay of a full log included).
const TAKEOVER_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a release may take (the old owner flushes its whole log).
const RELEASE_ACK_TIMEOUT: Duration = Duration::from_secs(150);
/// How long a command in a guest's shell may take.
const SHELL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a restarted node may take to boot for a giveback.
const GIVEBACK_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// A giveback waiting for its node to boot.
#[derive(Debug)]
pub struct PendingGiveback {
    pub node: usize,
    pub reply: Option<Sender<Response>>,
    pub started: Instant,
    pub started_unix_ms: u64,
    /// Whether this giveback started the node's QEMU again.
    pub restarted: bool,
}

/// Why a move failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("no node is called {0:?}")]
    NoSuchNode(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot fence node {node}: {detail}")]
    Fence { node: String, detail: String },
    #[error("cannot write the control region")]
    Control(#[from] shm::ControlError),
    #[error("node {node} did not acknowledge command {seq} within {timeout:?}")]
    AckTimeout {
        node: String,
        seq: u64,
        timeout: Duration,
    },
    #[error("node {node} failed command {seq} (status {status}; see its console)")]
    AckFailed { node: String, seq: u64, status: u64 },
    #[error("cannot move the address of {identity} to node {node}: {detail}")]
    Address {
        identity: String,
        node: String,
        detail: String,
    },
    #[error("cannot restart node {node}")]
    Restart {
        node: String,
        #[source]
        source: super::launch::LaunchError,
    },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms_since(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

impl Cluster {
    pub(super) fn node_index(&self, name: &str) -> Result<usize, MoveError> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| MoveError::NoSuchNode(name.to_owned()))
    }

    /// Which node holds identity `identity` now, from the control region.
    pub(super) fn owner_of(&self, identity: usize) -> Option<usize> {
        self.control
            .owner(identity)
            .and_then(|o| o.node)
            .map(|n| n as usize)
    }

    /// Acts on a node that went Down: fences it, then moves every identity it held to
    /// its partner. Records the outcome as events; never panics the daemon.
    pub fn fail_over(&mut self, victim: usize) {
        let detected = self.nodes[victim].down_at.unwrap_or_else(Instant::now);
        if let Err(error) = self.fence(victim) {
            // No takeover without a confirmed fence: two writers would be worse than none.
            let reason = self.nodes[victim].health_reason();
            self.record_failure(victim, 1 - victim, &reason, &error);
            return;
        }
        self.nodes[victim].fenced_ms = Some(ms_since(detected));
        self.adopt_orphans();
    }

    /// Moves each identity held by a fenced node to the other node, as soon as that one
    /// can serve (called after every fence and on every tick, so a takeover refused while
    /// the survivor was booting or suspect happens once it is up).
    pub fn adopt_orphans(&mut self) {
        for identity in 0..self.nodes.len() {
            let Some(owner) = self.owner_of(identity) else {
                continue;
            };
            if owner >= self.nodes.len() || !self.nodes[owner].fenced {
                continue;
            }
            let survivor = 1 - owner;
            let reason = self.nodes[owner].health_reason();
            if !matches!(
                self.nodes[survivor].state(),
                NodeState::Up | NodeState::Suspect
            ) {
                if !self.nodes[owner].orphan_reported {
                    self.nodes[owner].orphan_reported = true;
                    let error = MoveError::Refused(format!(
                        "partner {} is {}; the takeover waits until it is up",
                        self.nodes[survivor].name,
                        self.nodes[survivor].state().as_str()
                    ));
                    self.record_failure(identity, survivor, &reason, &error);
                }
                continue;
            }
            let detected = self.nodes[owner].down_at.unwrap_or_else(Instant::now);
            let detected_unix_ms = unix_ms().saturating_sub(detected.elapsed().as_millis() as u64);
            let timeline = Timeline {
                fenced: self.nodes[owner].fenced_ms,
                ..Timeline::default()
            };
            let report = self.move_identity(
                identity,
                survivor,
                Move::Unplanned {
                    reason: reason.clone(),
                },
                (detected, detected_unix_ms),
                timeline,
            );
            match report {
                Ok(report) => self.events.record(&Event::Takeover(report)),
                Err(error) => self.record_failure(identity, survivor, &reason, &error),
            }
        }
    }

    /// `hostd takeover NODE`: the partner takes NODE's identity over; NODE keeps running.
    pub fn planned_takeover(&mut self, name: &str) -> Result<MoveReport, MoveError> {
        let node = self.node_index(name)?;
        let partner = 1 - node;
        if self.owner_of(node) != Some(node) {
            return Err(MoveError::Refused(format!(
                "{name} does not hold its identity now (use `hostd giveback {name}` to return it)"
            )));
        }
        for index in [node, partner] {
            if self.nodes[index].state() != NodeState::Up {
                return Err(MoveError::Refused(format!(
                    "node {} is {}: a planned takeover needs both nodes up",
                    self.nodes[index].name,
                    self.nodes[index].state().as_str()
                )));
            }
        }
        let report = self.move_identity(
            node,
            partner,
            Move::Planned {
                from: node,
                reason: "planned takeover (hostd takeover)".into(),
            },
            (Instant::now(), unix_ms()),
            Timeline::default(),
        )?;
        self.events.record(&Event::Takeover(report.clone()));
        Ok(report)
    }

    /// `hostd giveback NODE`: starts NODE again if it is not running; the move itself
    /// happens once it is up (see [`Cluster::continue_giveback`]).
    pub fn start_giveback(&mut self, name: &str, reply: Option<Sender<Response>>) {
        match self.begin_giveback(name) {
            Ok(pending) => {
                self.pending_giveback = Some(PendingGiveback { reply, ..pending });
                // It may be up already.
                self.continue_giveback();
            }
            Err(error) => {
                send(
                    reply,
                    Response::Error {
                        message: shm::inspect::error_chain(&error),
                    },
                );
            }
        }
    }

    fn begin_giveback(&mut self, name: &str) -> Result<PendingGiveback, MoveError> {
        let node = self.node_index(name)?;
        let partner = 1 - node;
        if self.pending_giveback.is_some() {
            return Err(MoveError::Refused(
                "a giveback is already in progress".into(),
            ));
        }
        if self.owner_of(node) != Some(partner) {
            return Err(MoveError::Refused(format!(
                "{name} holds its own identity already: nothing to give back"
            )));
        }
        if self.nodes[partner].state() != NodeState::Up {
            return Err(MoveError::Refused(format!(
                "partner {} is {}: it cannot release {name}'s identity",
                self.nodes[partner].name,
                self.nodes[partner].state().as_str()
            )));
        }
        let started = Instant::now();
        // A fenced node has an exit status too: no pid means nothing runs.
        let restart =
            self.nodes[node].pid().is_none() || self.nodes[node].state() == NodeState::Down;
        if restart {
            if let Some(child) = self.nodes[node].child.as_mut() {
                let _ = child.kill_and_reap(FENCE_TIMEOUT);
            }
            // Its address stays with the partner until the move.
            self.nodes[node].forwards_own_port = false;
            self.spawn_node(node)
                .and_then(|()| self.connect_node(node))
                .map_err(|source| MoveError::Restart {
                    node: name.to_owned(),
                    source,
                })?;
            log::info!("giveback: node {name} restarted; waiting for its agent");
        }
        Ok(PendingGiveback {
            node,
            reply: None,
            started,
            started_unix_ms: unix_ms(),
            restarted: restart,
        })
    }

    /// Completes a pending giveback once its node is up; gives up after a boot timeout.
    pub fn continue_giveback(&mut self) {
        let Some(pending) = self.pending_giveback.take() else {
            return;
        };
        let node = pending.node;
        let state = self.nodes[node].state();
        if state != NodeState::Up {
            if pending.started.elapsed() > GIVEBACK_BOOT_TIMEOUT
                || matches!(state, NodeState::Down | NodeState::Fenced)
            {
                let error = MoveError::Refused(format!(
                    "node {} did not come up for the giveback (it is {})",
                    self.nodes[node].name,
                    state.as_str()
                ));
                send(
                    pending.reply,
                    Response::Error {
                        message: error.to_string(),
                    },
                );
            } else {
                self.pending_giveback = Some(pending);
            }
            return;
        }
        let timeline = Timeline {
            restarted: pending.restarted.then(|| ms_since(pending.started)),
            ..Timeline::default()
        };
        let partner = 1 - node;
        let result = self.move_identity(
            node,
            node,
            Move::Planned {
                from: partner,
                reason: "giveback (hostd giveback)".into(),
            },
            (pending.started, pending.started_unix_ms),
            timeline,
        );
        let response = match result {
            Ok(report) => {
                self.events.record(&Event::Giveback(report.clone()));
                Response::Moved(report)
            }
            Err(error) => {
                let name = self.nodes[node].name.clone();
                self.record_failure(node, node, "giveback", &error);
                Response::Error {
                    message: format!("giveback of {name} failed: {error}"),
                }
            }
        };
        send(pending.reply, response);
    }

    /// `hostd kill NODE --signal ...`.
    pub fn inject(&mut self, name: &str, signal: KillSignal) -> Result<String, MoveError> {
        let index = self.node_index(name)?;
        if self.nodes[index].pid().is_none() {
            return Err(MoveError::Refused(format!("node {name} is not running")));
        }
        let process_backend = self.is_process_backend();
        let shell = self.state.shell_socket(name);
        let node = &mut self.nodes[index];
        let done = match signal {
            KillSignal::Agent if !process_backend => {
                // The guest runs a shell on its second serial port; the agent's respawn
                // loop in the guest's init starts it again.
                run_in_shell(&shell, "pid=$(pidof guest-agent) && kill -9 $pid").map_err(|e| {
                    MoveError::Refused(format!(
                        "cannot reach node {name}'s guest shell at {}: {e}",
                        shell.display()
                    ))
                })?;
                format!("SIGKILL sent to the guest agent inside node {name} (from its shell)")
            }
            KillSignal::Kill | KillSignal::Stop | KillSignal::Agent => {
                let child = node
                    .child
                    .as_mut()
                    .ok_or_else(|| MoveError::Refused(format!("node {name} is not running")))?;
                let (sig, what) = match signal {
                    KillSignal::Stop => (qemu::Signal::Stop, "SIGSTOP sent"),
                    // With the process backend the agent is the node's process.
                    _ => (qemu::Signal::Kill, "SIGKILL sent"),
                };
                child
                    .signal(sig)
                    .map_err(|e| MoveError::Refused(e.to_string()))?;
                format!("{what} to node {name} (pid {})", child.pid())
            }
            KillSignal::Panic => {
                let qmp = node.qmp.as_mut().ok_or_else(|| {
                    MoveError::Refused(format!(
                        "node {name} has no QMP connection (the process backend cannot panic a kernel)"
                    ))
                })?;
                qmp.execute("inject-nmi", None)
                    .map_err(|e| MoveError::Refused(format!("inject-nmi failed: {e}")))?;
                format!("NMI injected into node {name}: its kernel panics on it")
            }
        };
        self.events.record(&Event::FaultInjected {
            node: name.to_owned(),
            signal: format!("{signal:?}").to_lowercase(),
        });
        Ok(done)
    }

    /// Kills and reaps node `index`; only a confirmed death counts.
    fn fence(&mut self, index: usize) -> Result<(), MoveError> {
        let node = &mut self.nodes[index];
        let name = node.name.clone();
        // Its QMP connection dies with it; drop it first so nothing waits on it.
        node.qmp = None;
        node.events = None;
        let status = match node.child.as_mut() {
            Some(child) => child
                .kill_and_reap(FENCE_TIMEOUT)
                .map_err(|e| MoveError::Fence {
                    node: name.clone(),
                    detail: e.to_string(),
                })?
                .to_string(),
            None => "never started".to_owned(),
        };
        node.fenced = true;
        if node.exit.is_none() {
            node.exit = Some(format!("fenced by hostd ({status})"));
        }
        log::info!("node {name} fenced: {status}");
        self.record_serving_ended_all(index, "fenced");
        Ok(())
    }

    /// Moves identity `identity` to node `to`. The caller has fenced the old owner
    /// (unplanned) or names it for a release (planned).
    fn move_identity(
        &mut self,
        identity: usize,
        to: usize,
        how: Move,
        (started, started_unix_ms): (Instant, u64),
        mut timeline: Timeline,
    ) -> Result<MoveReport, MoveError> {
        let port = self.nodes[identity].nbd_port;
        let identity_name = self.nodes[identity].name.clone();
        let from = match &how {
            Move::Unplanned { .. } => 1 - to,
            Move::Planned { from, .. } => *from,
        };
        let argument = TakeOverArgument {
            replay_partner_log: matches!(how, Move::Unplanned { .. }),
            port: if self.is_process_backend() { port } else { 0 },
        };
        if let Move::Planned { from, .. } = how {
            // New clients must not reach the old owner while it flushes.
            self.unforward(from, identity)?;
            let released = self
                .issue(
                    from,
                    CommandKind::Release,
                    identity,
                    self.control.epoch(),
                    0,
                )
                .and_then(|seq| self.await_ack(from, seq, RELEASE_ACK_TIMEOUT));
            if let Err(error) = released {
                // The old owner keeps the identity: give its address back.
                if let Err(undo) = self.forward(from, identity) {
                    log::error!("cannot restore the address after a failed release: {undo}");
                }
                return Err(error);
            }
            timeline.released = Some(ms_since(started));
            self.record_serving_ended(identity, from, "released");
        } else {
            // The fenced node's QEMU is gone and with it its forward.
            self.nodes[from].forwards_own_port = false;
        }
        let epoch = self.control.epoch() + 1;
        // Before the owner changes: the agent may start serving as soon as it does.
        self.events.record(&Event::ServingStarted {
            identity: identity_name.clone(),
            node: self.nodes[to].name.clone(),
            epoch,
        });
        self.control_writer.set_epoch(epoch);
        self.control_writer.set_owner(
            identity,
            Owner {
                node: Some(to as u32),
                epoch,
            },
        )?;
        let seq = self.issue(
            to,
            CommandKind::TakeOver,
            identity,
            epoch,
            argument.to_word(),
        )?;
        let ack = self.await_ack(to, seq, TAKEOVER_ACK_TIMEOUT)?;
        timeline.replayed = Some(ms_since(started));
        self.forward(to, identity)?;
        timeline.serving = Some(ms_since(started));
        let replayed = argument.replay_partner_log;
        let report = MoveReport {
            node: identity_name,
            from: self.nodes[from].name.clone(),
            to: self.nodes[to].name.clone(),
            planned: !replayed,
            reason: match how {
                Move::Unplanned { reason } | Move::Planned { reason, .. } => reason,
            },
            epoch,
            detected_unix_ms: started_unix_ms,
            timeline_ms: timeline,
            replayed_records: if replayed {
                (ack.last_seq + 1).saturating_sub(ack.first_seq)
            } else {
                0
            },
            replayed_first_seq: ack.first_seq,
            replayed_last_seq: ack.last_seq,
            replay_complete: ack.status != ack_status::PARTIAL_REPLAY,
        };
        log::info!(
            "identity {} moved {} → {} in {:.1} ms (epoch {epoch})",
            report.node,
            report.from,
            report.to,
            report.timeline_ms.serving.unwrap_or_default()
        );
        Ok(report)
    }

    /// Issues a command to node `node`; returns its seq.
    fn issue(
        &mut self,
        node: usize,
        kind: CommandKind,
        identity: usize,
        epoch: u64,
        argument: u64,
    ) -> Result<u64, MoveError> {
        self.command_seq += 1;
        let seq = self.command_seq;
        self.control_writer.issue(
            node,
            Command {
                seq,
                kind,
                identity: identity as u64,
                epoch,
                argument,
            },
        )?;
        log::info!(
            "command {seq} to {}: {kind:?} identity {} (epoch {epoch})",
            self.nodes[node].name,
            self.nodes[identity].name
        );
        Ok(seq)
    }

    /// Polls node `node`'s ack slot until it names command `seq`.
    fn await_ack(&self, node: usize, seq: u64, timeout: Duration) -> Result<Ack, MoveError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ack) = self.nodes[node].region.ack()
                && ack.command_seq == seq
            {
                return match ack.status {
                    ack_status::OK | ack_status::PARTIAL_REPLAY => Ok(ack),
                    status => Err(MoveError::AckFailed {
                        node: self.nodes[node].name.clone(),
                        seq,
                        status,
                    }),
                };
            }
            if Instant::now() >= deadline {
                return Err(MoveError::AckTimeout {
                    node: self.nodes[node].name.clone(),
                    seq,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Points identity `identity`'s host port at node `node`'s guest (QEMU backend; with
    /// the process backend the agent listens itself, told by the command's argument).
    pub(super) fn forward(&mut self, node: usize, identity: usize) -> Result<(), MoveError> {
        let port = self.nodes[identity].nbd_port;
        if !self.is_process_backend() {
            self.hostfwd(
                node,
                identity,
                &format!("hostfwd_add n0 tcp:127.0.0.1:{port}-:{GUEST_NBD_PORT}"),
            )?;
        }
        if node == identity {
            self.nodes[identity].forwards_own_port = true;
        }
        Ok(())
    }

    /// Removes identity `identity`'s host port from node `node`'s QEMU.
    pub(super) fn unforward(&mut self, node: usize, identity: usize) -> Result<(), MoveError> {
        let port = self.nodes[identity].nbd_port;
        if !self.is_process_backend() {
            self.hostfwd(
                node,
                identity,
                &format!("hostfwd_remove n0 tcp:127.0.0.1:{port}"),
            )?;
        }
        if node == identity {
            self.nodes[identity].forwards_own_port = false;
        }
        Ok(())
    }

    fn hostfwd(&mut self, node: usize, identity: usize, command: &str) -> Result<(), MoveError> {
        let (identity_name, node_name) = (
            self.nodes[identity].name.clone(),
            self.nodes[node].name.clone(),
        );
        let error = |detail: String| MoveError::Address {
            identity: identity_name.clone(),
            node: node_name.clone(),
            detail,
        };
        let Some(qmp) = self.nodes[node].qmp.as_mut() else {
            return Err(error("it has no QMP connection".into()));
        };
        // HMP answers in text inside a successful reply: `hostfwd_add` says nothing when
        // it works, `hostfwd_remove` says "... removed" (or "... not found": gone already).
        match qmp.human_monitor_command(command) {
            Ok(text) if hostfwd_succeeded(&text) => Ok(()),
            Ok(text) => Err(error(format!("{command}: {}", text.trim()))),
            Err(e) => Err(error(format!("{command}: {e}"))),
        }
    }

    pub(super) fn record_serving_ended(&self, identity: usize, node: usize, reason: &str) {
        self.events.record(&Event::ServingEnded {
            identity: self.nodes[identity].name.clone(),
            node: self.nodes[node].name.clone(),
            reason: reason.to_owned(),
        });
    }

    /// Records the end of serving for every identity node `node` holds now.
    pub(super) fn record_serving_ended_all(&self, node: usize, reason: &str) {
        for identity in 0..self.nodes.len() {
            if self.owner_of(identity) == Some(node) {
                self.record_serving_ended(identity, node, reason);
            }
        }
    }

    fn record_failure(&mut self, identity: usize, to: usize, reason: &str, error: &MoveError) {
        log::error!(
            "moving {} to {} failed: {}",
            self.nodes[identity].name,
            self.nodes[to].name,
            shm::inspect::error_chain(error)
        );
        self.events.record(&Event::MoveFailed {
            node: self.nodes[identity].name.clone(),
            to: self.nodes[to].name.clone(),
            reason: reason.to_owned(),
            error: shm::inspect::error_chain(error),
        });
    }
}

/// Runs `command` in a guest's shell (its second serial port, a Unix socket QEMU serves)
/// and waits up to [`SHELL_TIMEOUT`] for it to finish. The connection stays open until
/// then: QEMU feeds the guest's UART a few bytes at a time and drops the rest of the input
/// when its client hangs up.
fn run_in_shell(socket: &std::path::Path, command: &str) -> std::io::Result<()> {
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

/// Whether an HMP `hostfwd_add` / `hostfwd_remove` reply means it worked.
fn hostfwd_succeeded(reply: &str) -> bool {
    let reply = reply.trim();
    reply.is_empty() || reply.ends_with(" removed") || reply.ends_with(" not found")
}

/// How an identity moves.
#[derive(Debug, Clone)]
enum Move {
    /// Its owner was fenced; the new owner replays its log.
    Unplanned { reason: String },
    /// Its owner `from` is alive and releases it first.
    Planned { from: usize, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_replies() {
        assert!(hostfwd_succeeded(""));
        assert!(hostfwd_succeeded(
            "host forwarding rule for tcp:127.0.0.1:24809 removed\r\n"
        ));
        assert!(hostfwd_succeeded(
            "host forwarding rule for tcp:127.0.0.1:24809 not found\r\n"
        ));
        assert!(!hostfwd_succeeded(
            "Could not set up host forwarding rule 'tcp:127.0.0.1:1-:2'"
        ));
        assert!(!hostfwd_succeeded("invalid format"));
    }
}
