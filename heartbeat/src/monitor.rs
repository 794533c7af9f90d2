//! The liveness monitor of one node: Up, Suspect, Down, with the reason for each.
//!
//! It is fed evidence from several sources and a clock it does not own (`now` is passed in,
//! as time since any fixed origin), so it can be driven by a simulation as well as by hostd:
//!
//! - the heartbeat counter in the node's region (moving = alive). How long a silence may
//!   last before the node is Down is either fixed ([`Detector::Fixed`]) or learned from the
//!   node's own intervals ([`Detector::Phi`], see [`crate::detector`]), between a floor and
//!   the configured timeout;
//! - the node's process (exit = dead, at once; every thread stopped = dead, at once: a
//!   SIGSTOPped process never beats again by itself, and SIGKILL still fences it);
//! - the CPU its guest got during a silence: a guest whose vCPUs ran most of the silence and
//!   still did not beat is hung (Down at the floor); one that waited for a host CPU instead
//!   is starved, not hung (it gets up to the timeout);
//! - QMP events (`GUEST_PANICKED`, `SHUTDOWN` = dead at once; `STOP`/`RESUME` noted);
//! - indirect evidence: the node's log head or disk I/O still moving. A node whose heartbeat
//!   is late but which is still doing work is slow, not dead (a TCG guest on a busy host
//!   can stall its heartbeat thread while the rest runs): it stays Suspect up to a hard
//!   limit instead of going Down.
//!
//! Down is final for a boot: only [`Monitor::reset`] (a new boot of the node) leaves it.

use std::time::Duration;

use crate::detector::{Intervals, WINDOW};

/// A silence during which the guest's threads were on a CPU at least this share of the
/// time is a hang: a live agent needs a sliver of that to beat.
const BURNING_SHARE: f64 = 0.5;
/// A silence during which the guest's threads waited for a host CPU at least this share of
/// the time is starvation: the host kept the guest off the CPU a good part of the time, so
/// its silence says little. (An idle guest on a busy host waits a little at every wakeup:
/// that is not it. A live TCG guest was seen silent for 990 ms while it waited 58 % of the
/// time; the margin is kept wide.)
const STARVED_SHARE: f64 = 0.25;

/// Timing of the monitor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// How often the agent beats.
    pub interval: Duration,
    /// A heartbeat older than this makes the node Suspect.
    pub suspect_after: Duration,
    /// A heartbeat older than this makes the node Down whatever the detector says (the
    /// ceiling), unless indirect evidence shows the node still working.
    pub timeout: Duration,
    /// Even with indirect evidence, a heartbeat older than this makes the node Down.
    pub hard_limit: Duration,
    /// How a silence shorter than the timeout is judged.
    pub detector: Detector,
}

/// How a heartbeat silence is judged before the timeout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    /// Down at the timeout, never before.
    Fixed,
    /// Down once phi over the node's own intervals reaches the threshold, but never before
    /// the floor.
    Phi(PhiConfig),
}

/// Settings of the phi accrual detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhiConfig {
    /// Phi at which a silence means Down (8: one chance in 10^8 that a live node is late).
    pub threshold: f64,
    /// No heartbeat silence shorter than this makes a node Down.
    pub floor: Duration,
    /// The least standard deviation of the intervals assumed.
    pub min_std_dev: Duration,
    /// How many intervals are remembered.
    pub window: usize,
}

impl Config {
    /// A fixed timeout: Suspect after three missed beats (or the timeout, if shorter), Down
    /// at the timeout, and a hard limit of twice the timeout for a node that is late but
    /// still working.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            suspect_after: (interval * 3).min(timeout),
            timeout,
            hard_limit: timeout * 2,
            detector: Detector::Fixed,
        }
    }

    /// The phi accrual detector at `threshold`, Down no sooner than `floor` and no later
    /// than `timeout` (times as in [`Config::new`]). The least standard deviation is a
    /// quarter of the interval: a perfectly regular node is still allowed the jitter of
    /// whoever samples its counter.
    pub fn phi(interval: Duration, floor: Duration, timeout: Duration, threshold: f64) -> Self {
        let floor = floor.min(timeout);
        Self {
            suspect_after: (interval * 3).min(floor),
            detector: Detector::Phi(PhiConfig {
                threshold,
                floor,
                min_std_dev: interval / 4,
                window: WINDOW,
            }),
            ..Self::new(interval, timeout)
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
    /// Every thread of the node's process is stopped (SIGSTOP, or held by a debugger).
    ThreadsStopped,
    /// How much CPU the threads that run the node (a guest's vCPUs) have had, and how long
    /// they waited for one, in total since they started.
    Cpu { ran: Duration, waited: Duration },
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
    /// Its heartbeat is late enough to be Down, but its log or disk is still moving.
    LateButActive,
    /// Its heartbeat is late enough to be Down, but its guest has been waiting for a host
    /// CPU: it gets up to the timeout.
    Starved,
    /// QEMU reported the VM paused.
    Paused,
}

/// Why a node is Down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    /// Its heartbeat is older than the timeout (the ceiling).
    HeartbeatTimeout,
    /// The detector judged its heartbeat silence before the timeout.
    HeartbeatSilent(Silence),
    ProcessExited {
        status: String,
    },
    /// Every thread of its process is stopped.
    ProcessStopped,
    GuestPanicked,
    Shutdown,
}

/// A heartbeat silence the detector judged to be a failure, with what it was judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    /// How long the heartbeat had been silent.
    pub silent: Duration,
    /// The node's intervals so far: mean and standard deviation.
    pub mean: Duration,
    pub std_dev: Duration,
    /// How much of the silence the guest's threads were on a CPU, in percent, when known.
    pub busy_percent: Option<u8>,
    pub cause: SilenceCause,
}

/// What made a silence a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilenceCause {
    /// Phi over the node's intervals reached the threshold (and the silence the floor).
    Phi,
    /// The guest's threads ran most of a silence as long as the floor: hung, not slow.
    Busy,
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

/// A cumulative CPU reading and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuReading {
    at: Duration,
    ran: Duration,
    waited: Duration,
}

/// What the CPU readings say about the current silence.
#[derive(Debug, Clone, Copy)]
struct CpuShares {
    ran: f64,
    waited: f64,
}

/// What a silence of some length means, before indirect evidence is weighed.
enum Verdict {
    /// Not long enough to be Down: Suspect for this reason.
    Wait(SuspectReason),
    Down(DownReason),
}

/// The monitor of one node.
#[derive(Debug, Clone)]
pub struct Monitor {
    config: Config,
    health: Health,
    heartbeat: Option<u64>,
    last_beat: Option<Duration>,
    /// The intervals between this boot's heartbeats.
    intervals: Intervals,
    /// Whether the next interval is not the node's doing (the clock restarted at a resume).
    skip_interval: bool,
    activity: Option<u64>,
    last_activity: Option<Duration>,
    /// The latest CPU reading, and the one at the last heartbeat.
    cpu: Option<CpuReading>,
    cpu_at_beat: Option<CpuReading>,
    paused: bool,
}

impl Monitor {
    pub fn new(config: Config) -> Self {
        let (min_std_dev, window) = match config.detector {
            Detector::Phi(phi) => (phi.min_std_dev, phi.window),
            Detector::Fixed => (config.interval / 4, WINDOW),
        };
        Self {
            config,
            health: Health::Unknown,
            heartbeat: None,
            last_beat: None,
            intervals: Intervals::new(config.interval, min_std_dev, window),
            skip_interval: false,
            activity: None,
            last_activity: None,
            cpu: None,
            cpu_at_beat: None,
            paused: false,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// When the heartbeat last moved (on the monitor's clock).
    pub fn last_beat(&self) -> Option<Duration> {
        self.last_beat
    }

    /// The intervals seen between this boot's heartbeats.
    pub fn intervals(&self) -> &Intervals {
        &self.intervals
    }

    /// Phi of the heartbeat's silence at `now` (whichever detector decides), once the node
    /// has beaten.
    pub fn phi(&self, now: Duration) -> Option<f64> {
        self.last_beat
            .map(|beat| self.intervals.phi(now.saturating_sub(beat)))
    }

    /// How long a silence may last before the node is Down, as the intervals stand now
    /// (CPU and indirect evidence aside).
    pub fn deadline(&self) -> Duration {
        match self.config.detector {
            Detector::Fixed => self.config.timeout,
            Detector::Phi(phi) => self
                .intervals
                .deadline(phi.threshold)
                .clamp(phi.floor, self.config.timeout),
        }
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
                if moved {
                    if let Some(last) = self.last_beat
                        && !self.skip_interval
                    {
                        self.intervals.push(now.saturating_sub(last));
                    }
                    self.skip_interval = false;
                }
                if moved || (self.heartbeat.is_none() && counter > 0 && self.last_beat.is_none()) {
                    self.last_beat = Some(now);
                    self.cpu_at_beat = self.cpu;
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
            Evidence::ThreadsStopped => {
                return self.set(Health::Down(DownReason::ProcessStopped), now);
            }
            Evidence::Cpu { ran, waited } => {
                self.cpu = Some(CpuReading {
                    at: now,
                    ran,
                    waited,
                });
            }
            Evidence::GuestPanicked => {
                return self.set(Health::Down(DownReason::GuestPanicked), now);
            }
            Evidence::Shutdown => return self.set(Health::Down(DownReason::Shutdown), now),
            Evidence::Stopped => self.paused = true,
            Evidence::Resumed => {
                self.paused = false;
                // The pause is not the node's fault: its heartbeat clock restarts now, and
                // the interval that spans the pause is not one of its own.
                if self.last_beat.is_some() {
                    self.last_beat = Some(now);
                    self.cpu_at_beat = self.cpu;
                    self.skip_interval = true;
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
        let health = if age < self.config.suspect_after {
            Health::Up
        } else if self.paused {
            // A paused VM is not dead yet, but it does not serve either: it is Down once its
            // heartbeat is past the timeout, exactly like a hung one. Its threads idle by
            // order, so neither the detector nor the CPU says anything about it.
            if age >= self.config.timeout {
                Health::Down(DownReason::HeartbeatTimeout)
            } else {
                Health::Suspect(SuspectReason::Paused)
            }
        } else {
            match self.judge(age) {
                Verdict::Wait(reason) => Health::Suspect(reason),
                Verdict::Down(_)
                    if self.working(now, last_beat) && age < self.config.hard_limit =>
                {
                    Health::Suspect(SuspectReason::LateButActive)
                }
                Verdict::Down(reason) => Health::Down(reason),
            }
        };
        self.set(health, now)
    }

    /// Judges a heartbeat silence of `age` (at least `suspect_after`).
    fn judge(&self, age: Duration) -> Verdict {
        if age >= self.config.timeout {
            return Verdict::Down(DownReason::HeartbeatTimeout);
        }
        let Detector::Phi(phi) = self.config.detector else {
            return Verdict::Wait(SuspectReason::LateHeartbeat);
        };
        if age < phi.floor {
            return Verdict::Wait(SuspectReason::LateHeartbeat);
        }
        let shares = self.cpu_since_beat();
        let silence = |cause| Silence {
            silent: age,
            mean: self.intervals.mean(),
            std_dev: self.intervals.std_dev(),
            busy_percent: shares.map(|s| (s.ran * 100.0).round().clamp(0.0, 255.0) as u8),
            cause,
        };
        let Some(shares) = shares else {
            // Without the guest's CPU figures (an agent process, whose main thread sleeps
            // between beats whether it is well or blocked; a QEMU whose threads have no
            // names) a silence cannot be told from a starved or blocked node: only the
            // ceiling decides, as with the fixed detector.
            return Verdict::Wait(SuspectReason::LateHeartbeat);
        };
        // A guest that ran most of the silence had every chance to beat.
        if shares.ran >= BURNING_SHARE {
            return Verdict::Down(DownReason::HeartbeatSilent(silence(SilenceCause::Busy)));
        }
        if shares.waited >= STARVED_SHARE {
            return Verdict::Wait(SuspectReason::Starved);
        }
        if self.intervals.phi(age) >= phi.threshold {
            Verdict::Down(DownReason::HeartbeatSilent(silence(SilenceCause::Phi)))
        } else {
            Verdict::Wait(SuspectReason::LateHeartbeat)
        }
    }

    /// Whether the node's log or disk moved after its last heartbeat, and recently: then it
    /// works, only its heartbeat is late.
    fn working(&self, now: Duration, last_beat: Duration) -> bool {
        let recent = match self.config.detector {
            Detector::Fixed => self.config.timeout,
            Detector::Phi(phi) => phi.floor,
        };
        self.last_activity
            .is_some_and(|t| t > last_beat && now.saturating_sub(t) <= recent)
    }

    /// The shares of the time since the last heartbeat that the guest's threads ran and
    /// waited for a CPU, once readings span at least an interval.
    fn cpu_since_beat(&self) -> Option<CpuShares> {
        let (base, latest) = (self.cpu_at_beat?, self.cpu?);
        let window = latest.at.checked_sub(base.at)?;
        if window < self.config.interval {
            return None;
        }
        let share = |later: Duration, earlier: Duration| {
            later.saturating_sub(earlier).as_secs_f64() / window.as_secs_f64()
        };
        Some(CpuShares {
            ran: share(latest.ran, base.ran),
            waited: share(latest.waited, base.waited),
        })
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

    // --- The phi accrual detector -------------------------------------------------------

    /// Settings close to hostd's defaults: 100 ms beats, floor 800 ms (hostd: 1 s), ceiling 3 s, phi 8.
    fn phi_monitor() -> Monitor {
        Monitor::new(Config::phi(100 * MS, 800 * MS, 3000 * MS, 8.0))
    }

    /// Drives `m` as hostd does: a sample every 10 ms, a beat after each of `intervals`
    /// (ms), CPU readings from `cpu` (ran, waited per 10 ms) if given. Returns the time of
    /// the last beat and every transition.
    fn drive(
        m: &mut Monitor,
        start_ms: u64,
        intervals: &[u64],
        cpu: Option<(u64, u64)>,
    ) -> (u64, Vec<Transition>) {
        let mut transitions = Vec::new();
        let mut counter = m.heartbeat.unwrap_or(0);
        let mut next_beat = start_ms;
        let mut now = start_ms;
        let (mut ran, mut waited) = (0, 0);
        let mut pending = intervals.iter();
        let end = start_ms + intervals.iter().sum::<u64>();
        let mut last_beat = start_ms;
        while now <= end {
            if let Some((r, w)) = cpu {
                ran += r;
                waited += w;
                transitions.extend(m.observe(
                    Evidence::Cpu {
                        ran: Duration::from_millis(ran),
                        waited: Duration::from_millis(waited),
                    },
                    Duration::from_millis(now),
                ));
            }
            if now >= next_beat {
                counter += 1;
                last_beat = now;
                transitions.extend(beat(m, counter, now));
                match pending.next() {
                    Some(interval) => next_beat += interval,
                    None => break,
                }
            }
            transitions.extend(m.tick(Duration::from_millis(now)));
            now += 10;
        }
        (last_beat, transitions)
    }

    /// Ticks `m` every 10 ms from `from_ms` with no beat until it goes Down or `until_ms`;
    /// returns when it went Down.
    fn silence(m: &mut Monitor, from_ms: u64, until_ms: u64) -> Option<u64> {
        (from_ms..=until_ms).step_by(10).find(|&ms| {
            m.tick(Duration::from_millis(ms));
            matches!(m.health(), Health::Down(_))
        })
    }

    /// Like [`silence`], with CPU readings of a guest that neither runs nor waits (idle: a
    /// hung agent in a live kernel).
    fn idle_silence(m: &mut Monitor, from_ms: u64, until_ms: u64) -> Option<u64> {
        let (ran, waited) = m
            .cpu
            .map_or((Duration::ZERO, Duration::ZERO), |c| (c.ran, c.waited));
        (from_ms..=until_ms).step_by(10).find(|&ms| {
            m.observe(Evidence::Cpu { ran, waited }, Duration::from_millis(ms));
            m.tick(Duration::from_millis(ms));
            matches!(m.health(), Health::Down(_))
        })
    }

    fn downs(transitions: &[Transition]) -> usize {
        transitions
            .iter()
            .filter(|t| matches!(t.to, Health::Down(_)))
            .count()
    }

    #[test]
    fn a_steady_node_that_goes_silent_is_down_at_the_floor() {
        let mut m = phi_monitor();
        let (last, transitions) = drive(&mut m, 0, &[100; 300], Some((1, 0)));
        assert_eq!(downs(&transitions), 0);
        assert_eq!(m.health(), &Health::Up);
        assert_eq!(m.deadline(), 800 * MS, "phi alone would say about 230 ms");
        let down = idle_silence(&mut m, last + 10, last + 5000).unwrap();
        assert_eq!(down - last, 800);
        match m.health() {
            Health::Down(DownReason::HeartbeatSilent(s)) => {
                assert_eq!(s.cause, SilenceCause::Phi);
                assert_eq!(s.silent, 800 * MS);
                assert_eq!(s.mean, 100 * MS);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_jittery_node_is_not_taken_for_dead_and_its_deadline_moves_out() {
        // A TCG guest on a busy host: mostly 100 ms, often 300-600 ms, now and then 900 ms.
        let pattern = [100, 100, 350, 100, 60, 600, 100, 100, 450, 900, 100, 40];
        let intervals: Vec<u64> = pattern.iter().copied().cycle().take(600).collect();
        let mut m = phi_monitor();
        let (last, transitions) = drive(&mut m, 0, &intervals, None);
        assert_eq!(downs(&transitions), 0, "{transitions:?}");
        let deadline = m.deadline();
        assert!(
            deadline > 1200 * MS && deadline < 3000 * MS,
            "{deadline:?}: beyond the longest interval seen, under the ceiling"
        );
        let down = silence(&mut m, last + 10, last + 5000).unwrap();
        assert!(
            down - last >= 1200 && down - last <= 3000,
            "{}",
            down - last
        );
    }

    #[test]
    fn a_pause_shorter_than_the_floor_is_survived_once_and_learned() {
        let mut m = phi_monitor();
        let mut intervals = vec![100; 200];
        intervals.push(700); // a GC-like pause: phi is huge, but under the floor
        intervals.extend([100; 100]);
        let (_, transitions) = drive(&mut m, 0, &intervals, None);
        assert_eq!(downs(&transitions), 0);
        let suspects = transitions
            .iter()
            .filter(|t| t.to == Health::Suspect(SuspectReason::LateHeartbeat))
            .count();
        assert_eq!(suspects, 1, "suspect during the pause, Up after it");
        assert_eq!(m.health(), &Health::Up);
        assert!(
            m.intervals().std_dev() > 25 * MS,
            "the pause widened the spread"
        );
    }

    #[test]
    fn the_timeout_is_the_ceiling_whatever_the_intervals() {
        // Beats 2.5 s apart: phi would wait far longer than the timeout allows.
        let mut m = phi_monitor();
        let (last, transitions) =
            drive(&mut m, 0, &[2500, 100, 2500, 100, 2500, 100], Some((1, 0)));
        // The first long gap comes before the detector has learned it: under the 3 s
        // ceiling, the floor decides, and it counts as a failure.
        assert_eq!(downs(&transitions), 1);
        let mut m = phi_monitor();
        for n in 0..40 {
            m.intervals
                .push(if n % 2 == 0 { 2500 * MS } else { 100 * MS });
        }
        assert_eq!(m.deadline(), 3000 * MS);
        beat(&mut m, 1, last);
        beat(&mut m, 2, last + 100);
        assert_eq!(silence(&mut m, last + 110, last + 9000), Some(last + 3100));
        assert_eq!(m.health(), &Health::Down(DownReason::HeartbeatTimeout));
    }

    #[test]
    fn a_stopped_process_is_down_at_once() {
        let mut m = phi_monitor();
        drive(&mut m, 0, &[100; 20], None);
        let t = m.observe(Evidence::ThreadsStopped, 2005 * MS).unwrap();
        assert_eq!(t.to, Health::Down(DownReason::ProcessStopped));
        assert_eq!(t.at, 2005 * MS);
        // Also while booting, before any beat.
        let mut m = phi_monitor();
        let t = m.observe(Evidence::ThreadsStopped, MS).unwrap();
        assert_eq!(t.to, Health::Down(DownReason::ProcessStopped));
    }

    #[test]
    fn a_silent_guest_that_burns_cpu_is_down_at_the_floor() {
        // Jittery history: phi alone would wait well past the floor.
        let pattern = [100, 100, 350, 100, 60, 600, 100, 100, 450, 900, 100, 40];
        let intervals: Vec<u64> = pattern.iter().copied().cycle().take(300).collect();
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &intervals, Some((2, 0)));
        assert!(m.deadline() > 1200 * MS);
        // Silent, its vCPU running 9 ms in every 10.
        let (mut ran, base) = (0, m.cpu.unwrap().ran);
        let down = (last + 10..last + 5000).step_by(10).find(|&ms| {
            ran += 9;
            m.observe(
                Evidence::Cpu {
                    ran: base + Duration::from_millis(ran),
                    waited: Duration::ZERO,
                },
                Duration::from_millis(ms),
            );
            matches!(m.health(), Health::Down(_))
        });
        assert_eq!(down.map(|d| d - last), Some(800));
        match m.health() {
            Health::Down(DownReason::HeartbeatSilent(s)) => {
                assert_eq!(s.cause, SilenceCause::Busy);
                assert_eq!(s.busy_percent, Some(90));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_guest_starved_of_cpu_gets_the_timeout() {
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &[100; 300], Some((2, 0)));
        let base = m.cpu.unwrap();
        let mut states = Vec::new();
        let down = (last + 10..last + 5000).step_by(10).find(|&ms| {
            let waited = base.waited + Duration::from_millis(ms - last) * 6 / 10;
            let t = m.observe(
                Evidence::Cpu {
                    ran: base.ran + MS,
                    waited,
                },
                Duration::from_millis(ms),
            );
            states.extend(t.map(|t| t.to));
            matches!(m.health(), Health::Down(_))
        });
        assert_eq!(down.map(|d| d - last), Some(3000));
        assert_eq!(
            states,
            [
                Health::Suspect(SuspectReason::LateHeartbeat),
                Health::Suspect(SuspectReason::Starved),
                Health::Down(DownReason::HeartbeatTimeout)
            ]
        );
    }

    #[test]
    fn a_silent_but_idle_guest_is_judged_by_phi() {
        // Its vCPU ran 5% and waited 15% of the silence (an idle guest on a busy host):
        // neither hung nor starved.
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &[100; 300], Some((1, 0)));
        let base = m.cpu.unwrap();
        let down = (last + 10..last + 5000).step_by(10).find(|&ms| {
            let elapsed = Duration::from_millis(ms - last);
            m.observe(
                Evidence::Cpu {
                    ran: base.ran + elapsed / 20,
                    waited: base.waited + elapsed * 3 / 20,
                },
                Duration::from_millis(ms),
            );
            matches!(m.health(), Health::Down(_))
        });
        assert_eq!(down.map(|d| d - last), Some(800));
        assert!(matches!(
            m.health(),
            Health::Down(DownReason::HeartbeatSilent(Silence {
                cause: SilenceCause::Phi,
                busy_percent: Some(5),
                ..
            }))
        ));
    }

    #[test]
    fn a_working_node_with_a_late_heartbeat_stays_suspect_under_phi() {
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &[100; 100], None);
        // Its log keeps moving after the last beat.
        for ms in (last + 10..last + 5900).step_by(10) {
            m.observe(
                Evidence::Activity { counter: ms },
                Duration::from_millis(ms),
            );
        }
        assert_eq!(m.health(), &Health::Suspect(SuspectReason::LateButActive));
        // The hard limit (twice the timeout) still holds.
        m.observe(
            Evidence::Activity { counter: 1 },
            Duration::from_millis(last + 6000),
        );
        assert_eq!(m.health(), &Health::Down(DownReason::HeartbeatTimeout));
        // Activity that stopped with the heartbeat is no evidence of work.
        let mut m = phi_monitor();
        let mut counter = 0;
        for ms in (0..=1000).step_by(100) {
            counter += 1;
            beat(&mut m, counter, ms);
            m.observe(Evidence::Activity { counter }, Duration::from_millis(ms));
        }
        assert_eq!(silence(&mut m, 1010, 5000), Some(4000));
    }

    #[test]
    fn without_cpu_figures_only_the_ceiling_decides() {
        // An agent process, or a QEMU whose threads have no names: a silence cannot be
        // told from a blocked or starved node.
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &[100; 300], None);
        assert_eq!(silence(&mut m, last + 10, last + 5000), Some(last + 3000));
        assert!(matches!(
            m.health(),
            Health::Down(DownReason::HeartbeatTimeout)
        ));
    }

    #[test]
    fn the_interval_across_a_pause_is_not_learned() {
        let mut m = phi_monitor();
        let (last, _) = drive(&mut m, 0, &[100; 50], None);
        let before = m.intervals().len();
        m.observe(Evidence::Stopped, Duration::from_millis(last + 50));
        m.observe(Evidence::Resumed, Duration::from_millis(last + 2000));
        let counter = m.heartbeat.unwrap();
        beat(&mut m, counter + 1, last + 2100);
        assert_eq!(
            m.intervals().len(),
            before,
            "neither the pause nor the resume"
        );
        beat(&mut m, counter + 2, last + 2200);
        assert_eq!(m.intervals().len(), before + 1);
        assert_eq!(m.intervals().mean(), 100 * MS);
    }

    #[test]
    fn phi_is_reported_once_the_node_beats() {
        let mut m = phi_monitor();
        assert_eq!(m.phi(Duration::from_secs(5)), None);
        let (last, _) = drive(&mut m, 0, &[100; 100], None);
        let at = |ms: u64| m.phi(Duration::from_millis(last + ms)).unwrap();
        assert!(at(50) < 0.1);
        assert!(at(300) > 8.0, "a steady stream: 300 ms is very late");
    }
}
