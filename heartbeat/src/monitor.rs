//! The liveness monitor of one node: Up, Suspect, Down, with the reason for each.
//!
//! It is fed evidence from several sources and a clock it does not own (`now` is passed in,
//! as time since any fixed origin), so it can be driven by a simulation as well as by hostd:
//!
//! - the heartbeat counter in the node's region (moving = alive);
//! - the QEMU process (exit = dead, at once);
//! - QMP events (`GUEST_PANICKED`, `SHUTDOWN` = dead at once; `STOP`/`RESUME` noted);
//! - indirect evidence: the node's log head or disk I/O still moving. A node whose heartbeat
//!   is late but which is still doing work is slow, not dead (a TCG guest on a busy host
//!   can stall its heartbeat thread while the rest runs): it stays Suspect up to a hard
//!   limit instead of going Down at the timeout.
//!
//! Down is final for a boot: only [`Monitor::reset`] (a new boot of the node) leaves it.

use std::time::Duration;

/// Timing of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How often the agent beats.
    pub interval: Duration,
    /// A heartbeat older than this makes the node Suspect.
    pub suspect_after: Duration,
    /// A heartbeat older than this makes the node Down, unless indirect evidence moved
    /// within the timeout.
    pub timeout: Duration,
    /// Even with indirect evidence, a heartbeat older than this makes the node Down.
    pub hard_limit: Duration,
}

impl Config {
    /// Derives the thresholds from an interval and a timeout: Suspect after three missed
    /// beats (or the timeout, if shorter), Down at the timeout, and a hard limit of twice
    /// the timeout for a node that is late but still working.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            suspect_after: (interval * 3).min(timeout),
            timeout,
            hard_limit: timeout * 2,
        }
    }
}

/// Evidence about a node, from any source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// The heartbeat counter read from the node's region.
    Heartbeat { counter: u64 },
    /// The node's log head or disk I/O counters, read from wherever they are observed.
    Activity { counter: u64 },
    /// The node's QEMU process exited.
    ProcessExited { status: String },
    /// QMP `GUEST_PANICKED`.
    GuestPanicked,
    /// QMP `SHUTDOWN` (the guest powered off or QEMU was told to quit).
    Shutdown,
    /// QMP `STOP`: the VM is paused; its heartbeat will stop.
    Stopped,
    /// QMP `RESUME`.
    Resumed,
}

/// Why a node is Suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectReason {
    /// Its heartbeat is older than `suspect_after`.
    LateHeartbeat,
    /// Its heartbeat is past the timeout, but its log or disk is still moving.
    LateButActive,
    /// QEMU reported the VM paused.
    Paused,
}

/// Why a node is Down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    HeartbeatTimeout,
    ProcessExited { status: String },
    GuestPanicked,
    Shutdown,
}

/// A node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not yet heard from in this boot.
    Unknown,
    Up,
    Suspect(SuspectReason),
    Down(DownReason),
}

/// A change of health, with when it was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    pub at: Duration,
}

/// The monitor of one node.
#[derive(Debug, Clone)]
pub struct Monitor {
    config: Config,
    health: Health,
    heartbeat: Option<u64>,
    last_beat: Option<Duration>,
    activity: Option<u64>,
    last_activity: Option<Duration>,
    paused: bool,
}

impl Monitor {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            health: Health::Unknown,
            heartbeat: None,
            last_beat: None,
            activity: None,
            last_activity: None,
            paused: false,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// When the heartbeat last moved (on the monitor's clock).
    pub fn last_beat(&self) -> Option<Duration> {
        self.last_beat
    }

    /// Starts over for a new boot of the node.
    pub fn reset(&mut self) {
        *self = Self::new(self.config);
    }

    /// Takes in one piece of evidence observed at `now`.
    pub fn observe(&mut self, evidence: Evidence, now: Duration) -> Option<Transition> {
        if matches!(self.health, Health::Down(_)) {
            return None;
        }
        match evidence {
            Evidence::Heartbeat { counter } => {
                // The first non-zero reading counts as a beat (the agent has started and beat
                // at least once); after that, only movement proves life.
                let moved = self.heartbeat.is_some_and(|last| last != counter);
                if moved || (self.heartbeat.is_none() && counter > 0 && self.last_beat.is_none()) {
                    self.last_beat = Some(now);
                }
                self.heartbeat = Some(counter);
                if moved {
                    self.paused = false;
                }
            }
            Evidence::Activity { counter } => {
                if self.activity.is_some_and(|last| last != counter) {
                    self.last_activity = Some(now);
                }
                self.activity = Some(counter);
            }
            Evidence::ProcessExited { status } => {
                return self.set(Health::Down(DownReason::ProcessExited { status }), now);
            }
            Evidence::GuestPanicked => {
                return self.set(Health::Down(DownReason::GuestPanicked), now);
            }
            Evidence::Shutdown => return self.set(Health::Down(DownReason::Shutdown), now),
            Evidence::Stopped => self.paused = true,
            Evidence::Resumed => {
                self.paused = false;
                // The pause is not the node's fault: its heartbeat clock restarts now.
                if self.last_beat.is_some() {
                    self.last_beat = Some(now);
                }
            }
        }
        self.tick(now)
    }

    /// Re-evaluates health at `now` (call it at least every `interval`).
    pub fn tick(&mut self, now: Duration) -> Option<Transition> {
        if matches!(self.health, Health::Down(_)) {
            return None;
        }
        let Some(last_beat) = self.last_beat else {
            return None; // Still booting: hostd decides how long a boot may take.
        };
        let age = now.saturating_sub(last_beat);
        let active = self
            .last_activity
            .is_some_and(|t| now.saturating_sub(t) <= self.config.timeout);
        let health = if age < self.config.suspect_after {
            Health::Up
        } else if self.paused {
            // A paused VM is not dead yet, but it does not serve either: it is Down once its
            // heartbeat is past the timeout, exactly like a hung one.
            if age >= self.config.timeout {
                Health::Down(DownReason::HeartbeatTimeout)
            } else {
                Health::Suspect(SuspectReason::Paused)
            }
        } else if age < self.config.timeout {
            Health::Suspect(SuspectReason::LateHeartbeat)
        } else if active && age < self.config.hard_limit {
            Health::Suspect(SuspectReason::LateButActive)
        } else {
            Health::Down(DownReason::HeartbeatTimeout)
        };
        self.set(health, now)
    }

    fn set(&mut self, health: Health, now: Duration) -> Option<Transition> {
        if health == self.health {
            return None;
        }
        let from = std::mem::replace(&mut self.health, health.clone());
        Some(Transition {
            from,
            to: health,
            at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn monitor() -> Monitor {
        Monitor::new(Config::new(100 * MS, 1000 * MS))
    }

    fn beat(m: &mut Monitor, counter: u64, at_ms: u64) -> Option<Transition> {
        m.observe(
            Evidence::Heartbeat { counter },
            Duration::from_millis(at_ms),
        )
    }

    #[test]
    fn beats_make_a_node_up_and_silence_makes_it_suspect_then_down() {
        let mut m = monitor();
        assert_eq!(m.tick(Duration::ZERO), None);
        assert_eq!(beat(&mut m, 1, 0).map(|t| t.to), Some(Health::Up));
        beat(&mut m, 2, 100);
        assert_eq!(m.tick(350 * MS), None);
        assert_eq!(
            m.tick(400 * MS).map(|t| t.to),
            Some(Health::Suspect(SuspectReason::LateHeartbeat))
        );
        assert_eq!(beat(&mut m, 3, 500).map(|t| t.to), Some(Health::Up));
        assert_eq!(
            m.tick(1500 * MS).map(|t| t.to),
            Some(Health::Down(DownReason::HeartbeatTimeout))
        );
        // Down is final for this boot.
        assert_eq!(beat(&mut m, 4, 1600), None);
        m.reset();
        assert_eq!(beat(&mut m, 1, 2000).map(|t| t.to), Some(Health::Up));
    }

    #[test]
    fn process_exit_and_panic_are_down_at_once() {
        let mut m = monitor();
        beat(&mut m, 1, 0);
        let t = m.observe(Evidence::GuestPanicked, 10 * MS).unwrap();
        assert_eq!(t.to, Health::Down(DownReason::GuestPanicked));
        assert_eq!(t.at, 10 * MS);
        let mut m = monitor();
        beat(&mut m, 1, 0);
        let t = m
            .observe(
                Evidence::ProcessExited {
                    status: "signal 9".into(),
                },
                5 * MS,
            )
            .unwrap();
        assert!(matches!(
            t.to,
            Health::Down(DownReason::ProcessExited { .. })
        ));
    }

    #[test]
    fn a_late_but_working_node_is_suspect_until_the_hard_limit() {
        let mut m = monitor();
        beat(&mut m, 1, 0);
        for ms in (0..=1500).step_by(100) {
            m.observe(
                Evidence::Activity { counter: ms },
                Duration::from_millis(ms),
            );
        }
        assert_eq!(m.health(), &Health::Suspect(SuspectReason::LateButActive));
        for ms in (1600..=2000).step_by(100) {
            m.observe(
                Evidence::Activity { counter: ms },
                Duration::from_millis(ms),
            );
        }
        assert_eq!(m.health(), &Health::Down(DownReason::HeartbeatTimeout));
    }

    #[test]
    fn a_paused_vm_is_suspect_then_down_and_resume_restarts_the_clock() {
        let mut m = monitor();
        beat(&mut m, 1, 0);
        m.observe(Evidence::Stopped, 50 * MS);
        assert_eq!(
            m.tick(400 * MS).map(|t| t.to),
            Some(Health::Suspect(SuspectReason::Paused))
        );
        // Resuming restarts the heartbeat clock: Up until the agent is late again.
        assert_eq!(
            m.observe(Evidence::Resumed, 900 * MS).map(|t| t.to),
            Some(Health::Up)
        );
        assert_eq!(m.tick(1100 * MS), None);
        assert_eq!(beat(&mut m, 2, 1150), None);
        assert_eq!(
            m.tick(1500 * MS).map(|t| t.to),
            Some(Health::Suspect(SuspectReason::LateHeartbeat))
        );
    }

    #[test]
    fn the_first_reading_is_a_baseline_and_a_frozen_counter_is_no_life() {
        let mut m = monitor();
        // A region left over from an earlier boot: counter 40, never moving.
        assert_eq!(beat(&mut m, 40, 0).map(|t| t.to), Some(Health::Up));
        for ms in (100..=1000).step_by(100) {
            beat(&mut m, 40, ms);
        }
        assert_eq!(m.health(), &Health::Down(DownReason::HeartbeatTimeout));
    }
}
