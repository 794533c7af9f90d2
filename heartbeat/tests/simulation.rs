//! A seeded simulation of the monitor over thousands of schedules.
//!
//! Each schedule is a node that beats with jitter, sometimes stalls (shorter than the
//! timeout), sometimes runs slow-but-working (heartbeat stalled, log still moving, for less
//! than the hard limit), sometimes is paused and resumed, and then meets one fate: none,
//! process exit, guest panic, a hang, or a pause that lasts. A sampler reads the evidence at
//! random intervals the way hostd does. The monitor must never call a living node Down, must
//! call a dead one Down within its bounds, and must never leave Down.
//!
//! The monitor only judges a node once it has seen a heartbeat: a node that dies before its
//! first one is left to hostd's boot timeout, and the simulation expects exactly that.
//!
//! `IVHA_SIM_SEEDS=N` runs more schedules; a failure prints its seed.

use std::time::Duration;

use heartbeat::{Config, DownReason, Evidence, Health, Monitor};

const MS: u64 = 1;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Survives,
    Exits,
    Panics,
    Hangs,
    StaysPaused,
}

/// What the node does at each millisecond, decided up front from the seed.
struct Schedule {
    /// Times (ms) at which the agent beats.
    beats: Vec<u64>,
    /// Times at which the log or disk moves.
    activity: Vec<u64>,
    /// (stop, resume) pauses; resume None = never.
    pauses: Vec<(u64, Option<u64>)>,
    fate: Fate,
    /// When the fate strikes (for Exits, Panics, Hangs, StaysPaused).
    fate_at: u64,
    end: u64,
}

fn schedule(rng: &mut Rng, config: &Config) -> Schedule {
    let interval = config.interval.as_millis() as u64;
    let timeout = config.timeout.as_millis() as u64;
    let hard = config.hard_limit.as_millis() as u64;
    let fate = match rng.range(0, 4) {
        0 => Fate::Survives,
        1 => Fate::Exits,
        2 => Fate::Panics,
        3 => Fate::Hangs,
        _ => Fate::StaysPaused,
    };
    let end = rng.range(6_000, 20_000);
    let fate_at = rng.range(500, end - 2 * hard - 500);
    let alive_until = if fate == Fate::Survives { end } else { fate_at };
    let (mut beats, mut activity, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
    let mut t = rng.range(0, interval);
    while t < alive_until {
        match rng.range(0, 99) {
            // A stall of the heartbeat alone, shorter than the timeout minus sampling slack.
            0..=2 => t += rng.range(interval, timeout - 2 * interval - 60),
            // Slow but working: heartbeat stalled past the timeout, log moving.
            3 => {
                let stall = rng.range(timeout, hard - 2 * interval - 60);
                let mut a = t;
                while a < (t + stall).min(alive_until) {
                    activity.push(a);
                    a += rng.range(20, 200);
                }
                t += stall;
            }
            // Paused and resumed before the timeout: the monitor restarts its clock on resume.
            4 => {
                let stop = t;
                let resume = t + rng.range(50, timeout - 2 * interval);
                if resume < alive_until {
                    pauses.push((stop, Some(resume)));
                    t = resume;
                }
            }
            _ => {}
        }
        if t < alive_until {
            beats.push(t);
            if rng.range(0, 3) == 0 {
                activity.push(t);
            }
        }
        // Jitter: a TCG guest beats late, never early.
        t += interval + rng.range(0, interval / 2);
    }
    if fate == Fate::StaysPaused {
        pauses.push((fate_at, None));
    }
    Schedule {
        beats,
        activity,
        pauses,
        fate,
        fate_at,
        end,
    }
}

/// Runs one seed; returns an error describing the first violated property.
fn run(seed: u64) -> Result<(), String> {
    let config = Config::new(Duration::from_millis(100), Duration::from_millis(1000));
    let mut rng = Rng(seed);
    let plan = schedule(&mut rng, &config);
    let mut monitor = Monitor::new(config);
    let (mut counter, mut activity, mut next_beat, mut next_activity) = (0u64, 0u64, 0, 0);
    let mut now = 0;
    let mut down_at: Option<(u64, DownReason)> = None;
    let mut last_beat_seen = None;
    let mut pause_idx = 0;
    let mut reported_fate = false;
    while now <= plan.end {
        let mut transitions = Vec::new();
        // Everything that happened since the last sample.
        while next_beat < plan.beats.len() && plan.beats[next_beat] <= now {
            counter += 1;
            next_beat += 1;
        }
        while next_activity < plan.activity.len() && plan.activity[next_activity] <= now {
            activity += 1;
            next_activity += 1;
        }
        while pause_idx < plan.pauses.len() && plan.pauses[pause_idx].0 <= now {
            transitions.push(monitor.observe(Evidence::Stopped, Duration::from_millis(now)));
            if let Some(resume) = plan.pauses[pause_idx].1 {
                if resume <= now {
                    transitions
                        .push(monitor.observe(Evidence::Resumed, Duration::from_millis(now)));
                    pause_idx += 1;
                    continue;
                }
                break;
            }
            pause_idx += 1;
        }
        if pause_idx < plan.pauses.len() {
            if let (stop, Some(resume)) = plan.pauses[pause_idx] {
                if stop <= now && resume <= now {
                    transitions
                        .push(monitor.observe(Evidence::Resumed, Duration::from_millis(now)));
                    pause_idx += 1;
                }
            }
        }
        if !reported_fate && now >= plan.fate_at {
            let evidence = match plan.fate {
                Fate::Exits => Some(Evidence::ProcessExited {
                    status: "signal 9".into(),
                }),
                Fate::Panics => Some(Evidence::GuestPanicked),
                _ => None,
            };
            if let Some(evidence) = evidence {
                transitions.push(monitor.observe(evidence, Duration::from_millis(now)));
                reported_fate = true;
            }
        }
        transitions
            .push(monitor.observe(Evidence::Heartbeat { counter }, Duration::from_millis(now)));
        transitions.push(monitor.observe(
            Evidence::Activity { counter: activity },
            Duration::from_millis(now),
        ));
        transitions.push(monitor.tick(Duration::from_millis(now)));
        if monitor.last_beat().is_some() {
            last_beat_seen = monitor.last_beat();
        }
        for t in transitions.into_iter().flatten() {
            if matches!(t.from, Health::Down(_)) {
                return Err(format!("left Down at {now} ms: {t:?}"));
            }
            if let Health::Down(reason) = &t.to {
                down_at = Some((now, reason.clone()));
                let alive = plan.fate == Fate::Survives || now < plan.fate_at;
                if alive {
                    return Err(format!(
                        "a living node was called Down ({reason:?}) at {now} ms (fate {:?} at {} ms)",
                        plan.fate, plan.fate_at
                    ));
                }
            }
        }
        // hostd samples every 10 to 60 ms.
        now += rng.range(10, 60) * MS;
    }
    let bound = |extra: u64| plan.fate_at + extra;
    // A node that hangs before its first heartbeat never booted, as far as the monitor
    // knows: that is hostd's boot timeout's business, not the monitor's.
    let never_beat = plan.beats.first().is_none_or(|first| *first > plan.fate_at);
    match (plan.fate, &down_at) {
        (Fate::Survives, None) => Ok(()),
        (Fate::Hangs | Fate::StaysPaused, None) if never_beat => Ok(()),
        (Fate::Exits | Fate::Panics, Some((at, _))) if *at <= bound(60) => Ok(()),
        (Fate::Hangs | Fate::StaysPaused, Some((at, DownReason::HeartbeatTimeout))) => {
            // Down within the timeout (or, if the log kept moving, the hard limit) of the
            // last beat, plus one sampling period.
            let last = last_beat_seen.map_or(0, |d| d.as_millis() as u64);
            let limit = last + config.hard_limit.as_millis() as u64 + 60;
            if *at <= limit {
                Ok(())
            } else {
                Err(format!(
                    "hang detected at {at} ms, after the bound {limit} ms"
                ))
            }
        }
        (fate, down) => Err(format!(
            "fate {fate:?} at {} ms ended with {down:?}",
            plan.fate_at
        )),
    }
}

#[test]
fn thousands_of_schedules_keep_the_monitor_honest() {
    let seeds: u64 = std::env::var("IVHA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut failures = Vec::new();
    for seed in 0..seeds {
        if let Err(error) = run(seed) {
            failures.push(format!("seed {seed}: {error}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {seeds} schedules failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("simulation: {seeds} schedules, all properties held");
}
