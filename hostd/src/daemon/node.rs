//! One node as the daemon sees it: its QEMU, its QMP connection, its region, its health.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use heartbeat::{DownReason, Evidence, Health, Monitor, SuspectReason, Transition};
use qemu::{QemuChild, QmpClient, QmpEvent};
use shm::NodeRegion;

use crate::protocol::NodeState;

/// After QEMU exited, how long its last QMP events may take to arrive (the channel ends
/// sooner, when the reader sees the connection close).
const EVENTS_AFTER_EXIT: Duration = Duration::from_millis(100);

/// A launched node.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub partner: String,
    /// The host port of this node's identity (its NBD address).
    pub nbd_port: u16,
    pub console: std::path::PathBuf,
    pub child: Option<QemuChild>,
    pub qmp: Option<QmpClient>,
    pub events: Option<Receiver<QmpEvent>>,
    /// The node's region, mapped read-only: hostd never writes a node region.
    pub region: NodeRegion,
    /// Boot id found in the region before launch: a new one means the agent started.
    pub boot_id_before_launch: u64,
    /// How QEMU ended, once it has.
    pub exit: Option<String>,
    pub paused: bool,
    /// Set once hostd has killed and reaped this node to take it over.
    pub fenced: bool,
    /// Whether this node's QEMU forwards its own identity's port (false while the partner
    /// holds it).
    pub forwards_own_port: bool,
    pub monitor: Monitor,
    /// When the node went Down (for the takeover timeline).
    pub down_at: Option<Instant>,
    /// Milliseconds from Down to the confirmed fence.
    pub fenced_ms: Option<f64>,
    /// Whether a takeover of this fenced node's identity was reported as waiting.
    pub orphan_reported: bool,
    heartbeat: u64,
    heartbeat_moved: Option<Instant>,
}

impl Node {
    pub fn new(
        name: String,
        partner: String,
        nbd_port: u16,
        console: std::path::PathBuf,
        region: NodeRegion,
        monitor: Monitor,
    ) -> Self {
        let heartbeat = heartbeat_counter(&region);
        Self {
            boot_id_before_launch: region.boot_id(),
            name,
            partner,
            nbd_port,
            console,
            child: None,
            qmp: None,
            events: None,
            region,
            exit: None,
            paused: false,
            fenced: false,
            forwards_own_port: true,
            monitor,
            down_at: None,
            fenced_ms: None,
            orphan_reported: false,
            heartbeat,
            heartbeat_moved: None,
        }
    }

    /// Forgets the previous boot: called when hostd has started this node's QEMU (again).
    /// `before` is the region's boot id and heartbeat counter read before the start: the
    /// new agent may have written its own already.
    pub fn restarted(&mut self, child: QemuChild, before: (u64, u64)) {
        let (boot_id_before, heartbeat_before) = before;
        self.heartbeat = heartbeat_before;
        self.child = Some(child);
        self.qmp = None;
        self.events = None;
        self.boot_id_before_launch = boot_id_before;
        self.exit = None;
        self.paused = false;
        self.fenced = false;
        self.monitor.reset();
        self.down_at = None;
        self.fenced_ms = None;
        self.orphan_reported = false;
        self.heartbeat_moved = None;
    }

    /// Takes over a node process an earlier hostd started; `before` is the region's boot id
    /// and heartbeat counter from before that process started (its run record). Returns
    /// whether the node is still booting. A running agent may have been up for long
    /// already: its heartbeat counts from the first sample, and it gets a whole heartbeat
    /// timeout from now before it can be judged down.
    pub fn adopted(
        &mut self,
        child: QemuChild,
        before: (u64, u64),
        now: Instant,
        clock: Duration,
    ) -> bool {
        let boot_id = self.region.boot_id();
        self.child = Some(child);
        self.monitor.reset();
        if boot_id == before.0 {
            // The region still shows the previous boot: this boot's agent has not started.
            // Wait for its first beat as after a launch.
            self.boot_id_before_launch = before.0;
            self.heartbeat = before.1;
            return true;
        }
        let counter = heartbeat_counter(&self.region);
        // Any boot id but the running one: a later restart of the agent still counts.
        self.boot_id_before_launch = !boot_id;
        self.heartbeat = counter;
        self.heartbeat_moved = Some(now);
        self.monitor.observe(Evidence::Heartbeat { counter }, clock);
        false
    }

    /// Feeds everything that may have changed since the last sample to the monitor;
    /// returns whether the node went Down in it. `clock` is the monitor's time for `now`.
    pub fn sample(&mut self, now: Instant, clock: Duration) -> bool {
        let mut evidence = Vec::new();
        let mut exited = None;
        if let (Some(child), None) = (&mut self.child, &self.exit) {
            match child.try_wait() {
                Ok(Some(status)) => exited = Some(status.to_string()),
                Ok(None) => {}
                Err(error) => log::warn!("node {}: cannot check QEMU: {error}", self.name),
            }
        }
        if let Some(events) = &self.events {
            // QEMU says why it stops (GUEST_PANICKED, SHUTDOWN) before it exits, but the
            // event may still be on its way through the QMP reader when the exit is seen:
            // after an exit, take every event up to the end of the connection, so the
            // cause is judged before the bare exit.
            let pending: Vec<QmpEvent> = if exited.is_some() {
                let deadline = Instant::now() + EVENTS_AFTER_EXIT;
                std::iter::from_fn(|| events.recv_deadline(deadline).ok()).collect()
            } else {
                events.try_iter().collect()
            };
            for event in pending {
                log::debug!(
                    "node {}: QMP event {} {}",
                    self.name,
                    event.name,
                    event.data
                );
                match event.name.as_str() {
                    "STOP" => {
                        self.paused = true;
                        evidence.push(Evidence::Stopped);
                    }
                    "RESUME" => {
                        self.paused = false;
                        evidence.push(Evidence::Resumed);
                    }
                    "GUEST_PANICKED" => {
                        log::warn!("node {}: guest panicked {}", self.name, event.data);
                        evidence.push(Evidence::GuestPanicked);
                    }
                    "SHUTDOWN" => {
                        log::warn!("node {}: shutdown {}", self.name, event.data);
                        evidence.push(Evidence::Shutdown);
                    }
                    _ => {}
                }
            }
        }
        if let Some(status) = exited {
            log::warn!("node {}: QEMU exited ({status})", self.name);
            self.exit = Some(format!("exited: {status}"));
            evidence.push(Evidence::ProcessExited { status });
        }
        // Only this boot's agent counts, and only once it beats: a new agent takes the
        // region (new boot id) before it has recovered its log and serves, and its counter
        // resumes from the previous boot's last value.
        let counter = heartbeat_counter(&self.region);
        if self.region.boot_id() != self.boot_id_before_launch && counter != self.heartbeat {
            self.heartbeat = counter;
            self.heartbeat_moved = Some(now);
        }
        if self.heartbeat_moved.is_some() {
            evidence.push(Evidence::Heartbeat { counter });
            // The log head moving proves the agent still works even if its heartbeat
            // thread is starved.
            if let Some(head) = self.region.head() {
                evidence.push(Evidence::Activity { counter: head.seq });
            }
        }
        let mut transitions: Vec<Transition> = evidence
            .into_iter()
            .filter_map(|e| self.monitor.observe(e, clock))
            .collect();
        transitions.extend(self.monitor.tick(clock));
        let went_down = transitions
            .iter()
            .any(|transition| matches!(transition.to, Health::Down(_)));
        if went_down && self.down_at.is_none() {
            self.down_at = Some(now);
        }
        went_down
    }

    pub fn heartbeat(&self) -> u64 {
        self.heartbeat
    }

    pub fn heartbeat_age(&self, now: Instant) -> Option<Duration> {
        self.heartbeat_moved
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn state(&self) -> NodeState {
        if self.fenced {
            return NodeState::Fenced;
        }
        if self.child.is_none() {
            return NodeState::Down;
        }
        match self.monitor.health() {
            Health::Unknown if self.exit.is_some() => NodeState::Down,
            Health::Unknown => NodeState::Booting,
            Health::Up => NodeState::Up,
            Health::Suspect(SuspectReason::Paused) => NodeState::Paused,
            Health::Suspect(_) => NodeState::Suspect,
            Health::Down(_) => NodeState::Down,
        }
    }

    /// Why the node is not Up, in words ("" when it is).
    pub fn health_reason(&self) -> String {
        health_reason(self.monitor.health())
    }

    pub fn vm_description(&self) -> String {
        match (&self.exit, self.paused) {
            (Some(exit), _) => exit.clone(),
            (None, true) => "paused".into(),
            (None, false) if self.child.is_some() => "running".into(),
            (None, false) => "not started".into(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child
            .as_ref()
            .filter(|_| self.exit.is_none())
            .map(QemuChild::pid)
    }
}

/// The heartbeat counter in `region` (0 before the first beat).
pub(super) fn heartbeat_counter(region: &NodeRegion) -> u64 {
    region.heartbeat().map_or(0, |h| h.counter)
}

/// A health in words, for status and events.
fn health_reason(health: &Health) -> String {
    match health {
        Health::Unknown => "no heartbeat yet".into(),
        Health::Up => String::new(),
        Health::Suspect(SuspectReason::LateHeartbeat) => "heartbeat late".into(),
        Health::Suspect(SuspectReason::LateButActive) => {
            "heartbeat late, but its log still moves".into()
        }
        Health::Suspect(SuspectReason::Paused) => "VM paused".into(),
        Health::Down(DownReason::HeartbeatTimeout) => "heartbeat timed out".into(),
        Health::Down(DownReason::ProcessExited { status }) => format!("QEMU exited ({status})"),
        Health::Down(DownReason::GuestPanicked) => "guest kernel panicked".into(),
        Health::Down(DownReason::Shutdown) => "guest shut down".into(),
    }
}
