//! One node's health as hostd judges it: its heartbeat in its region, what its backend
//! reports (exit, QMP events, a stopped process, the CPU its guest gets), and the liveness
//! monitor fed by both. Once a minute it logs each node's heartbeat figures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use heartbeat::{
    DownReason, Evidence, Health, Monitor, Silence, SilenceCause, SuspectReason, Transition,
};
use shm::NodeRegion;
use wire::control::NodeState;

use super::backend::{Polled, VmEvent};
use super::heartbeat_figures::HeartbeatFigures;

/// A node of the cluster, apart from its process (which its backend owns).
#[derive(Debug)]
pub struct NodeHealth {
    pub name: String,
    /// The host port of this node's identity (its NBD address).
    pub nbd_port: u16,
    pub console: PathBuf,
    /// What the node's process is, in words ("QEMU", "agent process").
    process: &'static str,
    /// The node's region, mapped read-only: hostd never writes a node region.
    pub region: NodeRegion,
    /// Whether a process was ever started (or adopted) for this node.
    pub started: bool,
    /// Boot id found in the region before launch: a new one means the agent started.
    boot_id_before_launch: u64,
    /// How the node's process ended, once it has.
    pub exit: Option<String>,
    pub paused: bool,
    /// Set once hostd has killed and reaped this node to take it over.
    pub fenced: bool,
    /// Whether this node's process serves its own identity's port (false while another
    /// node holds the identity).
    pub forwards_own_port: bool,
    monitor: Monitor,
    /// When the node went Down (for the takeover timeline).
    pub down_at: Option<Instant>,
    /// Fenced at the storage only (`hostd fence --keep-running`): its process still runs.
    pub kept_running: bool,
    /// Milliseconds from Down to the confirmed fence.
    pub fenced_ms: Option<f64>,
    /// Whether a takeover of this fenced node's identity was reported as waiting.
    pub orphan_reported: bool,
    heartbeat: u64,
    heartbeat_moved: Option<Instant>,
    /// The heartbeat's figures since they were last logged.
    figures: HeartbeatFigures,
}

impl NodeHealth {
    pub fn new(
        name: String,
        nbd_port: u16,
        console: PathBuf,
        process: &'static str,
        region: NodeRegion,
        monitor: Monitor,
    ) -> Self {
        let heartbeat = heartbeat_counter(&region);
        Self {
            boot_id_before_launch: region.boot_id(),
            name,
            nbd_port,
            console,
            process,
            region,
            started: false,
            exit: None,
            paused: false,
            fenced: false,
            forwards_own_port: true,
            monitor,
            down_at: None,
            kept_running: false,
            fenced_ms: None,
            orphan_reported: false,
            heartbeat,
            heartbeat_moved: None,
            figures: HeartbeatFigures::new(Instant::now()),
        }
    }

    /// The region's boot id and heartbeat counter now: taken before a start, since the
    /// new agent may write its own before hostd looks again.
    pub fn before_start(&self) -> (u64, u64) {
        (self.region.boot_id(), heartbeat_counter(&self.region))
    }

    /// Forgets the previous boot: hostd has started this node's process (again).
    pub fn restarted(&mut self, before: (u64, u64)) {
        let (boot_id_before, heartbeat_before) = before;
        self.heartbeat = heartbeat_before;
        self.started = true;
        self.boot_id_before_launch = boot_id_before;
        self.exit = None;
        self.paused = false;
        self.fenced = false;
        self.kept_running = false;
        self.monitor.reset();
        self.down_at = None;
        self.fenced_ms = None;
        self.orphan_reported = false;
        self.heartbeat_moved = None;
        self.figures = HeartbeatFigures::new(Instant::now());
    }

    /// Takes over a node process an earlier hostd started; `before` is the region's boot
    /// id and heartbeat counter from before that process started (its run record).
    /// Returns whether the node is still booting. A running agent may have been up for
    /// long already: its heartbeat counts from the first sample, and it gets a whole
    /// heartbeat timeout from now before it can be judged down.
    pub fn adopted(
        &mut self,
        before: (u64, u64),
        paused: bool,
        now: Instant,
        clock: Duration,
    ) -> bool {
        let boot_id = self.region.boot_id();
        self.started = true;
        self.monitor.reset();
        let booting = if boot_id == before.0 {
            // The region still shows the previous boot: this boot's agent has not started.
            // Wait for its first beat as after a launch.
            self.boot_id_before_launch = before.0;
            self.heartbeat = before.1;
            true
        } else {
            let counter = heartbeat_counter(&self.region);
            // Any boot id but the running one: a later restart of the agent still counts.
            self.boot_id_before_launch = !boot_id;
            self.heartbeat = counter;
            self.heartbeat_moved = Some(now);
            self.monitor.observe(Evidence::Heartbeat { counter }, clock);
            false
        };
        if paused {
            // QMP events sent while no hostd listened are lost: the VM's state says it.
            self.paused = true;
            self.monitor.observe(Evidence::Stopped, clock);
        }
        booting
    }

    /// The node had no process when its cluster was adopted: it died while no hostd
    /// watched. It counts as fenced, with `what` as the reason.
    pub fn gone(&mut self, what: &str, clock: Duration) {
        // So that its takeover gives this as the reason.
        self.monitor.observe(
            Evidence::ProcessExited {
                status: what.into(),
            },
            clock,
        );
        self.fenced = true;
        self.exit = Some(what.into());
        self.forwards_own_port = false;
    }

    /// Marks the node fenced: its process was killed and reaped (`how`).
    pub fn fenced(&mut self, how: &str) {
        self.fenced = true;
        if self.exit.is_none() {
            self.exit = Some(format!("fenced by hostd ({how})"));
        }
    }

    /// Feeds what the backend saw and what the region shows to the monitor; returns
    /// whether the node went Down in this sample. `clock` is the monitor's time for `now`.
    pub fn sample(&mut self, polled: Polled, now: Instant, clock: Duration) -> bool {
        let mut evidence = Vec::new();
        for event in polled.events {
            match event {
                VmEvent::Stopped => {
                    self.paused = true;
                    evidence.push(Evidence::Stopped);
                }
                VmEvent::Resumed => {
                    self.paused = false;
                    evidence.push(Evidence::Resumed);
                }
                VmEvent::Panicked(data) => {
                    log::warn!("node {}: guest panicked {data}", self.name);
                    evidence.push(Evidence::GuestPanicked);
                }
                VmEvent::Shutdown(data) => {
                    log::warn!("node {}: shutdown {data}", self.name);
                    evidence.push(Evidence::Shutdown);
                }
            }
        }
        if let Some(status) = polled.exited {
            log::warn!("node {}: its process exited ({status})", self.name);
            self.exit = Some(format!("exited: {status}"));
            evidence.push(Evidence::ProcessExited { status });
        }
        if let Some(scheduling) = polled.scheduling {
            if scheduling.all_stopped {
                evidence.push(Evidence::ThreadsStopped);
            }
            // Before the heartbeat: a beat seen in this sample takes this reading as the
            // start of the next silence.
            if let Some(cpu) = scheduling.cpu {
                self.figures.cpu(now, cpu);
                evidence.push(Evidence::Cpu {
                    ran: cpu.ran,
                    waited: cpu.waited,
                });
            }
        }
        // Only this boot's agent counts, and only once it beats: a new agent takes the
        // region (new boot id) before it has recovered its log and serves, and its counter
        // resumes from the previous boot's last value.
        let counter = heartbeat_counter(&self.region);
        if self.region.boot_id() != self.boot_id_before_launch && counter != self.heartbeat {
            if let Some(before) = self.heartbeat_moved {
                self.figures.interval(now.saturating_duration_since(before));
            }
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
        for transition in &transitions {
            // These do not change the node's state (Suspect either way), so no event
            // says them: the log does.
            if let Health::Suspect(
                reason @ (SuspectReason::Starved | SuspectReason::LateButActive),
            ) = transition.to
            {
                self.figures.extended(reason);
                log::info!(
                    "node {}: {}: judged Down no sooner than {} ms of silence",
                    self.name,
                    health_reason(&transition.to, self.process),
                    match reason {
                        SuspectReason::Starved => self.monitor.config().timeout,
                        _ => self.monitor.config().hard_limit,
                    }
                    .as_millis()
                );
            }
        }
        let went_down = transitions
            .iter()
            .any(|transition| matches!(transition.to, Health::Down(_)));
        if went_down && self.down_at.is_none() {
            self.down_at = Some(now);
        }
        if !matches!(self.monitor.health(), Health::Down(_)) {
            if let Some(phi) = self.monitor.phi(clock) {
                self.figures.phi(phi);
            }
        }
        if self.figures.due(now) {
            log::info!(
                "node {}: {}",
                self.name,
                self.figures.take(now, &self.monitor)
            );
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
        if !self.started {
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

    /// The monitor's verdict (kept after a fence, until the node starts again).
    pub fn verdict(&self) -> &Health {
        self.monitor.health()
    }

    /// Why the node is not Up, in words ("" when it is).
    pub fn health_reason(&self) -> String {
        health_reason(self.monitor.health(), self.process)
    }

    pub fn vm_description(&self) -> String {
        match (&self.exit, self.paused) {
            (Some(exit), _) => exit.clone(),
            (None, true) => "paused".into(),
            (None, false) if self.started => "running".into(),
            (None, false) => "not started".into(),
        }
    }
}

/// The heartbeat counter in `region` (0 before the first beat).
fn heartbeat_counter(region: &NodeRegion) -> u64 {
    region.heartbeat().map_or(0, |h| h.counter)
}

/// A health in words, for status and events.
fn health_reason(health: &Health, process: &str) -> String {
    match health {
        Health::Unknown => "no heartbeat yet".into(),
        Health::Up => String::new(),
        Health::Suspect(SuspectReason::LateHeartbeat) => "heartbeat late".into(),
        Health::Suspect(SuspectReason::LateButActive) => {
            "heartbeat late, but its log still moves".into()
        }
        Health::Suspect(SuspectReason::Starved) => {
            format!("heartbeat late, but its {process} is waiting for a host CPU")
        }
        Health::Suspect(SuspectReason::Paused) => "VM paused".into(),
        Health::Down(DownReason::HeartbeatTimeout) => "heartbeat timed out".into(),
        Health::Down(DownReason::HeartbeatSilent(silence)) => silence_reason(silence, process),
        Health::Down(DownReason::ProcessExited { status }) => {
            format!("{process} exited ({status})")
        }
        Health::Down(DownReason::ProcessStopped) => {
            format!("every thread of its {process} is stopped (SIGSTOP or a debugger)")
        }
        Health::Down(DownReason::GuestPanicked) => "guest kernel panicked".into(),
        Health::Down(DownReason::Shutdown) => "guest shut down".into(),
    }
}

/// A heartbeat silence judged a failure, in words.
fn silence_reason(silence: &Silence, process: &str) -> String {
    let silent = silence.silent.as_millis();
    match (silence.cause, silence.busy_percent) {
        (SilenceCause::Busy, busy) => format!(
            "heartbeat silent for {silent} ms while its {process} ran its guest {}% of the time: hung, not slow",
            busy.unwrap_or(100)
        ),
        (SilenceCause::Phi, busy) => format!(
            "heartbeat silent for {silent} ms, past what its intervals allow (mean {} ms, sd {} ms){}",
            silence.mean.as_millis(),
            silence.std_dev.as_millis(),
            busy.map(|b| format!("; its guest ran {b}% of the silence"))
                .unwrap_or_default()
        ),
    }
}
