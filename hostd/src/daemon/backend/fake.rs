//! A backend for unit tests of the cluster's state machine: no processes, no guests. Each
//! node's "agent" is a thread that writes the node's real region (heartbeats, what it reads
//! of the nodes it watches, acknowledgements of hostd's commands) as a real agent would,
//! and does what the test tells it to. Every backend call is logged with the cluster
//! epoch at that moment, so tests can check the order of fence, epoch and commands.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use shm::node::{Ack, PeerObservation, ack_status};
use shm::{Access, CommandKind, ControlRegion, Mapping, NodeRegion};
use wire::records::RunRecord;

use super::{Adopted, BackendError, NodeBackend, Polled, Scheduling, Signal, SpawnPlan, Stopped};
use crate::daemon::topology::NodeId;

/// How a fake agent answers hostd's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Fail,
    Never,
    /// The process dies when the command arrives.
    Die,
}

/// What a fake agent does; tests change it while the cluster runs.
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Whether it beats (false: a guest that never finishes booting).
    pub beats: bool,
    pub answer: Answer,
    /// Whether its process dies as soon as it starts (a crash loop).
    pub dies_at_start: bool,
    /// Asked to negotiate a takeover, it answers that the holder refused, for this reason.
    pub holder_refuses: Option<shm::Refusal>,
    /// It ejects itself for this reason (as a real agent does while hostd is away).
    pub ejects: Option<shm::EjectReason>,
}

/// One logged call or command, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Spawn {
        node: usize,
        ports: Vec<u16>,
    },
    Fence {
        node: usize,
        epoch: u64,
    },
    Forward {
        node: usize,
        port: u16,
    },
    Unforward {
        node: usize,
        port: u16,
    },
    Signal {
        node: usize,
    },
    /// A command an agent received from the control region.
    Command {
        node: usize,
        kind: CommandKind,
        identity: u64,
        epoch: u64,
    },
    /// The storage registered the node's keys ([`FakeStorage`]).
    Register {
        node: usize,
    },
    /// The storage preempted the node's keys ([`FakeStorage`]).
    Preempt {
        node: usize,
    },
    /// hostd asked the coordinator to move an identity ([`FakeCoordinator`]).
    Assign {
        identity: u32,
        node: Option<u32>,
        generation: u64,
        /// Whether it was refused as stale.
        stale: bool,
    },
    /// hostd seeded the coordinator from the control region.
    Sync {
        generation: u64,
    },
    /// A node rejoined at the coordinator.
    Rejoin {
        node: usize,
    },
}

/// The test's side of the fake: the call log and each node's behaviour.
#[derive(Debug, Clone)]
pub struct FakeHandle {
    log: Arc<Mutex<Vec<Call>>>,
    behaviours: Vec<Arc<Mutex<Behaviour>>>,
}

impl FakeHandle {
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.log).clone()
    }

    pub fn set(&self, node: usize, change: impl FnOnce(&mut Behaviour)) {
        change(&mut lock(&self.behaviours[node]));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct FakeNode {
    name: String,
    agent: Option<FakeAgent>,
    pid: u32,
    /// How the process ended; `reported` once `poll` said so.
    exit: Option<String>,
    reported: bool,
}

#[derive(Debug)]
struct FakeAgent {
    stop: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    /// Set by the agent itself when it dies (`Answer::Die`).
    died: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn end(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Fake nodes over real regions.
#[derive(Debug)]
pub struct FakeBackend {
    nodes: Vec<FakeNode>,
    control: ControlRegion,
    handle: FakeHandle,
    /// Each start gets its own boot id, as a real agent picks one.
    next_boot: u32,
}

impl FakeBackend {
    /// Nodes named `names` (in order), in a cluster whose control region is `control`.
    pub fn new(names: &[&str], control: &Path) -> (Self, FakeHandle) {
        let handle = FakeHandle {
            log: Arc::default(),
            behaviours: names
                .iter()
                .map(|_| {
                    Arc::new(Mutex::new(Behaviour {
                        beats: true,
                        answer: Answer::Ok,
                        dies_at_start: false,
                        holder_refuses: None,
                        ejects: None,
                    }))
                })
                .collect(),
        };
        let control = open_control(control);
        let backend = FakeBackend {
            nodes: names
                .iter()
                .map(|name| FakeNode {
                    name: (*name).to_owned(),
                    agent: None,
                    pid: 0,
                    exit: None,
                    reported: false,
                })
                .collect(),
            control,
            handle: handle.clone(),
            next_boot: 0,
        };
        (backend, handle)
    }

    fn log(&self, call: Call) {
        lock(&self.handle.log).push(call);
    }

    fn node(&mut self, node: NodeId) -> &mut FakeNode {
        &mut self.nodes[node.index()]
    }

    /// An agent that died by itself is a process that exited.
    fn note_death(&mut self, node: NodeId) {
        let fake = self.node(node);
        let died = fake
            .agent
            .as_ref()
            .is_some_and(|agent| agent.died.load(Ordering::SeqCst));
        if died && fake.exit.is_none() {
            fake.exit = Some("signal: 9 (SIGKILL)".into());
        }
    }

    fn running(&self, node: NodeId) -> bool {
        let fake = &self.nodes[node.index()];
        fake.agent.is_some() && fake.exit.is_none()
    }
}

impl NodeBackend for FakeBackend {
    fn accel(&self) -> (String, String) {
        ("fake".into(), "unit test".into())
    }

    fn process_name(&self) -> &'static str {
        "fake process"
    }

    fn spawn(&mut self, node: NodeId, plan: &SpawnPlan) -> Result<u32, BackendError> {
        self.log(Call::Spawn {
            node: node.index(),
            ports: plan.ports.clone(),
        });
        self.next_boot += 1;
        // The run record needs a live process: the test's own.
        let pid = std::process::id();
        let agent = start_agent(
            node.index(),
            self.next_boot,
            &plan.region,
            plan.watched.iter().map(|w| w.region.clone()).collect(),
            &plan.control_region,
            Arc::clone(&self.handle.behaviours[node.index()]),
            Arc::clone(&self.handle.log),
        );
        let fake = self.node(node);
        if let Some(mut old) = fake.agent.take() {
            old.end();
        }
        fake.agent = Some(agent);
        fake.pid = pid;
        fake.exit = None;
        fake.reported = false;
        if lock(&self.handle.behaviours[node.index()]).dies_at_start {
            let fake = self.node(node);
            if let Some(agent) = fake.agent.as_mut() {
                agent.end();
            }
            fake.exit = Some("exit status: 1".into());
        }
        Ok(pid)
    }

    fn connect(&mut self, _node: NodeId) -> Result<(), BackendError> {
        Ok(())
    }

    fn adopt(&mut self, node: NodeId, _record: &RunRecord) -> Result<Adopted, BackendError> {
        Err(BackendError::NotRunning {
            node: self.node(node).name.clone(),
        })
    }

    fn poll(&mut self, node: NodeId) -> Polled {
        self.note_death(node);
        let fake = self.node(node);
        let exited = match (&fake.exit, fake.reported) {
            (Some(exit), false) => {
                fake.reported = true;
                Some(exit.clone())
            }
            _ => None,
        };
        Polled {
            exited,
            events: Vec::new(),
            scheduling: None,
        }
    }

    fn scheduling(&mut self, node: NodeId) -> Option<Scheduling> {
        // A SIGSTOP freezes the fake agent's thread: its "process" is all stopped.
        if !self.running(node) {
            return None;
        }
        let agent = self.nodes[node.index()].agent.as_ref()?;
        // Its "vCPUs" neither run nor wait: an idle guest, as a guest whose agent stopped
        // beating looks, so the phi detector decides between its floor and the ceiling.
        Some(Scheduling {
            all_stopped: agent.frozen.load(Ordering::SeqCst),
            cpu: Some(::qemu::child::SchedStat {
                ran: Duration::ZERO,
                waited: Duration::ZERO,
            }),
        })
    }

    fn has_exited(&mut self, node: NodeId) -> bool {
        self.note_death(node);
        self.node(node).exit.is_some()
    }

    fn pid(&self, node: NodeId) -> Option<u32> {
        self.running(node).then(|| self.nodes[node.index()].pid)
    }

    fn signal(&mut self, node: NodeId, signal: Signal) -> Result<(), BackendError> {
        if !self.running(node) {
            return Err(BackendError::NotRunning {
                node: self.node(node).name.clone(),
            });
        }
        self.log(Call::Signal { node: node.index() });
        let fake = self.node(node);
        match signal {
            Signal::Kill => {
                if let Some(agent) = fake.agent.as_mut() {
                    agent.end();
                }
                fake.exit = Some("signal: 9 (SIGKILL)".into());
            }
            Signal::Stop => {
                if let Some(agent) = &fake.agent {
                    agent.frozen.store(true, Ordering::SeqCst);
                }
            }
        }
        Ok(())
    }

    fn fence(&mut self, node: NodeId, _timeout: Duration) -> Result<String, BackendError> {
        let epoch = self.control.epoch();
        self.log(Call::Fence {
            node: node.index(),
            epoch,
        });
        let fake = self.node(node);
        if let Some(agent) = fake.agent.as_mut() {
            agent.end();
        }
        let how = fake
            .exit
            .get_or_insert_with(|| "signal: 9 (SIGKILL)".into())
            .clone();
        fake.reported = true;
        Ok(how)
    }

    fn forward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError> {
        self.log(Call::Forward {
            node: node.index(),
            port,
        });
        Ok(())
    }

    fn unforward(&mut self, node: NodeId, port: u16) -> Result<(), BackendError> {
        self.log(Call::Unforward {
            node: node.index(),
            port,
        });
        Ok(())
    }

    fn forwarded_ports(&mut self, _node: NodeId) -> Option<Result<Vec<u16>, BackendError>> {
        None
    }

    fn agents_listen(&self) -> bool {
        false
    }

    fn panic(&mut self, _node: NodeId) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: "fake",
            what: "panic a kernel",
        })
    }

    fn kill_agent(&mut self, node: NodeId) -> Result<String, BackendError> {
        self.signal(node, Signal::Kill)?;
        Ok("killed".into())
    }

    fn stop_all(&mut self, _timeout: Duration) -> Stopped {
        (0..self.nodes.len())
            .map(|index| {
                let fake = &mut self.nodes[index];
                if let Some(agent) = fake.agent.as_mut() {
                    agent.end();
                }
                (NodeId::from_index(index), "stopped".to_owned())
            })
            .collect()
    }

    fn kill_all(&mut self) {
        self.stop_all(Duration::ZERO);
    }

    fn disown_all(&mut self) {}
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        for fake in &mut self.nodes {
            if let Some(agent) = fake.agent.as_mut() {
                agent.end();
            }
        }
    }
}

/// Starts node `index`'s fake agent on its region.
fn start_agent(
    index: usize,
    boot_id: u32,
    region: &Path,
    watched: Vec<PathBuf>,
    control: &Path,
    behaviour: Arc<Mutex<Behaviour>>,
    log: Arc<Mutex<Vec<Call>>>,
) -> FakeAgent {
    let open = |path: &Path, access| {
        let mapping = Mapping::open(path, access)
            .unwrap_or_else(|e| panic!("fake agent: {}: {e}", path.display()));
        NodeRegion::open(mapping).unwrap_or_else(|e| panic!("fake agent: {}: {e}", path.display()))
    };
    let own = open(region, Access::ReadWrite);
    let watched: Vec<NodeRegion> = watched.iter().map(|p| open(p, Access::ReadOnly)).collect();
    let control = open_control(control);
    let stop = Arc::new(AtomicBool::new(false));
    let frozen = Arc::new(AtomicBool::new(false));
    let died = Arc::new(AtomicBool::new(false));
    let (thread_stop, thread_frozen, thread_died) =
        (Arc::clone(&stop), Arc::clone(&frozen), Arc::clone(&died));
    // A boot id per start, as a real agent picks one.
    let boot_id = 0x00fa_ce00_0000_0000 | u64::from(boot_id);
    let mut writer = own
        .writer(boot_id)
        .unwrap_or_else(|e| panic!("fake agent: {e}"));
    // Commands issued before this start are not for this agent.
    let mut last_seq = control.command(index).map_or(0, |c| c.seq);
    let identities = control.header().identities.len();
    let owns = move |control: &ControlRegion, identity: usize| {
        control
            .owner(identity)
            .is_some_and(|o| o.node == Some(index as u32))
    };
    let mut served: Vec<bool> = (0..identities).map(|i| owns(&control, i)).collect();
    let mut ejected = false;
    let thread = std::thread::spawn(move || {
        while !thread_stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
            if thread_frozen.load(Ordering::SeqCst) {
                continue;
            }
            let behaviour = *lock(&behaviour);
            if !behaviour.beats {
                continue;
            }
            writer.heartbeat.beat();
            if let Some(reason) = behaviour.ejects.filter(|_| !ejected) {
                ejected = true;
                writer.claims.eject(shm::Ejection {
                    generation: control.epoch(),
                    reason,
                    unix_ns: 0,
                });
            }
            // An identity owned elsewhere now is no longer served here, and the agent says
            // so, as a real one does.
            for (identity, serving) in served.iter_mut().enumerate() {
                let owned = owns(&control, identity);
                if *serving && !owned {
                    writer.stopped.publish(shm::StoppedServing {
                        identity: identity as u32,
                        reason: shm::StopReason::Reassigned,
                        epoch: control.epoch(),
                        unix_ns: 0,
                    });
                }
                *serving = owned;
            }
            for region in &watched {
                writer.peer.observe(PeerObservation {
                    node_id: Some(region.header().node_id),
                    boot_id: region.boot_id(),
                    heartbeat: region.heartbeat().map_or(0, |h| h.counter),
                });
            }
            let Some(command) = control.command(index) else {
                continue;
            };
            if command.seq <= last_seq {
                continue;
            }
            last_seq = command.seq;
            lock(&log).push(Call::Command {
                node: index,
                kind: command.kind,
                identity: command.identity,
                epoch: command.epoch,
            });
            let mut first_seq = 1;
            let status = match behaviour.answer {
                Answer::Ok if command.kind == CommandKind::Negotiate => {
                    match behaviour.holder_refuses {
                        Some(refusal) => {
                            first_seq = refusal.to_word();
                            ack_status::REFUSED
                        }
                        None => ack_status::OK,
                    }
                }
                Answer::Ok => ack_status::OK,
                Answer::Fail => ack_status::FAILED,
                Answer::Never => continue,
                Answer::Die => {
                    thread_died.store(true, Ordering::SeqCst);
                    return;
                }
            };
            writer.ack.acknowledge(Ack {
                command_seq: command.seq,
                epoch: command.epoch,
                status,
                first_seq,
                last_seq: 0,
            });
        }
    });
    FakeAgent {
        stop,
        frozen,
        died,
        thread: Some(thread),
    }
}

fn open_control(path: &Path) -> ControlRegion {
    Mapping::open(path, Access::ReadOnly)
        .ok()
        .and_then(|m| ControlRegion::open(m).ok())
        .unwrap_or_else(|| panic!("fake: cannot open the control region {}", path.display()))
}

/// The coordinator of a [`FakeStorage`], in memory, following the rules of the real one
/// (docs/takeover.md): the test's handle on it claims as an agent would.
#[derive(Debug, Clone)]
pub struct FakeCoordinator {
    state: Arc<Mutex<wire::coordinator::CoordinatorState>>,
}

impl FakeCoordinator {
    /// The initial state of a cluster of `takers.len()` nodes: generation 0, identity `i`
    /// owned by node `i`, every node a member with its takers.
    pub fn new(takers: &[Vec<u32>]) -> Self {
        use wire::coordinator::{CoordinatorState, IdentityOwner, MemberRecord};
        let count = takers.len() as u32;
        let state = CoordinatorState {
            generation: 0,
            nodes: (0..count)
                .map(|node| MemberRecord {
                    node,
                    member: true,
                    since: 0,
                    takers: takers[node as usize].clone(),
                })
                .collect(),
            owners: (0..count)
                .map(|identity| IdentityOwner {
                    identity,
                    node: Some(identity),
                    generation: 0,
                })
                .collect(),
        };
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    pub fn state(&self) -> wire::coordinator::CoordinatorState {
        lock(&self.state).clone()
    }

    /// Replaces the state (a coordinator whose state was lost, say).
    pub fn set_state(&self, state: wire::coordinator::CoordinatorState) {
        *lock(&self.state) = state;
    }

    /// `by` claims everything `victim` owns, as an agent does while hostd is away; returns
    /// the claim's generation.
    pub fn claim(&self, by: u32, victim: u32) -> u64 {
        let mut state = lock(&self.state);
        state.generation += 1;
        let generation = state.generation;
        for member in state.nodes.iter_mut().filter(|m| m.node == victim) {
            member.member = false;
            member.since = generation;
        }
        for owner in state.owners.iter_mut().filter(|o| o.node == Some(victim)) {
            owner.node = Some(by);
            owner.generation = generation;
        }
        generation
    }
}

/// A storage double for the cluster's unit tests: every node attaches every disk, keys
/// live in memory, and registrations and preemptions go into the fake backend's call log
/// (so tests see them in order with fences and commands).
#[derive(Debug)]
pub struct FakeStorage {
    log: Arc<Mutex<Vec<Call>>>,
    disks: Vec<String>,
    /// Per disk, the registered nodes.
    registered: Mutex<Vec<std::collections::BTreeSet<u32>>>,
    running: bool,
    coordinator: Option<FakeCoordinator>,
}

impl FakeStorage {
    /// One disk per name in `disks`, logging into `handle`'s call log.
    pub fn new(handle: &FakeHandle, disks: &[&str]) -> Self {
        Self {
            log: Arc::clone(&handle.log),
            disks: disks.iter().map(|d| (*d).to_owned()).collect(),
            registered: Mutex::new(vec![Default::default(); disks.len()]),
            running: false,
            coordinator: None,
        }
    }

    /// The same, keeping `coordinator`.
    pub fn with_coordinator(mut self, coordinator: &FakeCoordinator) -> Self {
        self.coordinator = Some(coordinator.clone());
        self
    }

    fn coordinator_state(
        &self,
    ) -> Result<MutexGuard<'_, wire::coordinator::CoordinatorState>, crate::storage::StorageError>
    {
        self.coordinator
            .as_ref()
            .map(|c| lock(&c.state))
            .ok_or(crate::storage::StorageError::NoCoordinator)
    }

    fn statuses(&self) -> Vec<wire::storage::DiskReservationStatus> {
        let registered = lock(&self.registered);
        self.disks
            .iter()
            .zip(registered.iter())
            .map(|(name, nodes)| wire::storage::DiskReservationStatus {
                name: name.clone(),
                holder: nodes.iter().next().copied(),
                registered: nodes
                    .iter()
                    .map(|&node| wire::storage::RegisteredKey {
                        node,
                        generation: 1,
                    })
                    .collect(),
                generation: 0,
            })
            .collect()
    }
}

impl crate::storage::Storage for FakeStorage {
    fn ensure_running(&mut self) -> Result<crate::storage::Ensured, crate::storage::StorageError> {
        let was = std::mem::replace(&mut self.running, true);
        Ok(if was {
            crate::storage::Ensured::Running
        } else {
            crate::storage::Ensured::Started { pid: 1 }
        })
    }

    fn pid(&self) -> Option<u32> {
        self.running.then_some(1)
    }

    fn socket(&self, disk: &str, node: NodeId) -> Option<PathBuf> {
        Some(PathBuf::from(format!("/fake/{disk}-{}.sock", node.index())))
    }

    fn status(
        &self,
    ) -> Result<Vec<wire::storage::DiskReservationStatus>, crate::storage::StorageError> {
        Ok(self.statuses())
    }

    fn register(
        &self,
        node: NodeId,
    ) -> Result<Vec<wire::storage::DiskReservationStatus>, crate::storage::StorageError> {
        lock(&self.log).push(Call::Register { node: node.index() });
        for nodes in lock(&self.registered).iter_mut() {
            nodes.insert(node.index() as u32);
        }
        Ok(self.statuses())
    }

    fn preempt(
        &self,
        victim: NodeId,
        by: Option<NodeId>,
    ) -> Result<Vec<(u32, wire::storage::DiskReservationStatus)>, crate::storage::StorageError>
    {
        lock(&self.log).push(Call::Preempt {
            node: victim.index(),
        });
        for nodes in lock(&self.registered).iter_mut() {
            nodes.remove(&(victim.index() as u32));
        }
        let by = by.map_or(0, |n| n.index() as u32);
        Ok(self.statuses().into_iter().map(|d| (by, d)).collect())
    }

    fn stop(&mut self) {
        self.running = false;
    }

    fn serves_disks(&self) -> bool {
        !self.disks.is_empty()
    }

    fn keeps_coordinator(&self) -> bool {
        self.coordinator.is_some()
    }

    fn coordinator_socket(&self, node: NodeId) -> Option<PathBuf> {
        self.coordinator
            .as_ref()
            .map(|_| PathBuf::from(format!("/fake/coord-{}.sock", node.index())))
    }

    fn coordinator(
        &self,
    ) -> Result<wire::coordinator::CoordinatorState, crate::storage::StorageError> {
        Ok(self.coordinator_state()?.clone())
    }

    fn assign(
        &self,
        identity: u32,
        node: Option<u32>,
        generation: u64,
    ) -> Result<crate::storage::Coordinated, crate::storage::StorageError> {
        let mut state = self.coordinator_state()?;
        let stale = generation <= state.generation;
        lock(&self.log).push(Call::Assign {
            identity,
            node,
            generation,
            stale,
        });
        if stale {
            return Ok(crate::storage::Coordinated::Stale(state.clone()));
        }
        state.generation = generation;
        for owner in state.owners.iter_mut().filter(|o| o.identity == identity) {
            owner.node = node;
            owner.generation = generation;
        }
        Ok(crate::storage::Coordinated::Accepted(state.clone()))
    }

    fn sync(
        &self,
        generation: u64,
        owners: Vec<wire::coordinator::IdentityOwner>,
    ) -> Result<crate::storage::Coordinated, crate::storage::StorageError> {
        let mut state = self.coordinator_state()?;
        lock(&self.log).push(Call::Sync { generation });
        if generation < state.generation {
            return Ok(crate::storage::Coordinated::Stale(state.clone()));
        }
        state.generation = generation;
        state.owners = owners;
        Ok(crate::storage::Coordinated::Accepted(state.clone()))
    }

    fn rejoin(
        &self,
        node: NodeId,
    ) -> Result<wire::coordinator::CoordinatorState, crate::storage::StorageError> {
        let mut state = self.coordinator_state()?;
        lock(&self.log).push(Call::Rejoin { node: node.index() });
        let generation = state.generation;
        for member in state
            .nodes
            .iter_mut()
            .filter(|m| m.node == node.index() as u32)
        {
            member.member = true;
            member.since = generation;
        }
        Ok(state.clone())
    }
}
