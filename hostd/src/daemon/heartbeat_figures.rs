//! A node's heartbeat figures since they were last logged: the spread of its intervals and
//! how close the detector came to calling it Down, logged once a minute so that a soak
//! (`scripts/soak-detector.sh`) can read the margin the detector had.

use std::time::{Duration, Instant};

use ::qemu::child::SchedStat;
use heartbeat::{Detector, Monitor, SuspectReason};

/// How often each node's heartbeat figures are logged.
const FIGURES_PERIOD: Duration = Duration::from_secs(60);
/// Upper edges of the logged interval histogram, in multiples of the heartbeat interval.
const BUCKET_EDGES: [f64; 7] = [1.1, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0];

/// A node's heartbeat since the figures were last logged: the spread of its intervals and
/// how close the detector came to calling it Down. Logged once a minute, so that a soak
/// (`scripts/soak-detector.sh`) can read the margin the detector had.
#[derive(Debug)]
pub struct HeartbeatFigures {
    since: Instant,
    intervals: Vec<Duration>,
    max_phi: f64,
    /// The first and the latest CPU reading of the period.
    cpu: Option<((Instant, SchedStat), (Instant, SchedStat))>,
    /// Silences given more time because the guest was starved or still working.
    starved: usize,
    working: usize,
}

impl HeartbeatFigures {
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            intervals: Vec::new(),
            max_phi: 0.0,
            cpu: None,
            starved: 0,
            working: 0,
        }
    }

    pub fn cpu(&mut self, now: Instant, reading: SchedStat) {
        let first = self.cpu.map_or((now, reading), |(first, _)| first);
        self.cpu = Some((first, (now, reading)));
    }

    pub fn extended(&mut self, reason: SuspectReason) {
        match reason {
            SuspectReason::Starved => self.starved += 1,
            _ => self.working += 1,
        }
    }

    /// The shares of the period the guest's threads ran and waited for a CPU, in percent.
    fn cpu_percent(&self) -> Option<(f64, f64)> {
        let ((t0, first), (t1, last)) = self.cpu?;
        let span = t1.saturating_duration_since(t0).as_secs_f64();
        (span > 0.0).then(|| {
            let percent =
                |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() / span * 100.0;
            (
                percent(last.ran, first.ran),
                percent(last.waited, first.waited),
            )
        })
    }

    pub fn interval(&mut self, interval: Duration) {
        self.intervals.push(interval);
    }

    pub fn phi(&mut self, phi: f64) {
        self.max_phi = self.max_phi.max(phi);
    }

    pub fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= FIGURES_PERIOD
    }

    /// The figures in one line (`key=value` words, for scripts), starting over.
    pub fn take(&mut self, now: Instant, monitor: &Monitor) -> String {
        let mut intervals = std::mem::take(&mut self.intervals);
        intervals.sort_unstable();
        let ms = |d: Option<&Duration>| d.map_or(0, Duration::as_millis);
        let at = |q: f64| intervals.get(((intervals.len() as f64 - 1.0) * q).round() as usize);
        let config = monitor.config();
        let nominal = config.interval.as_secs_f64();
        let mut buckets = vec![0usize; BUCKET_EDGES.len() + 1];
        for interval in &intervals {
            let ratio = interval.as_secs_f64() / nominal;
            let bucket = BUCKET_EDGES
                .iter()
                .position(|&edge| ratio <= edge)
                .unwrap_or(BUCKET_EDGES.len());
            buckets[bucket] += 1;
        }
        let histogram: Vec<String> = BUCKET_EDGES
            .iter()
            .map(|edge| format!("le{:.0}", edge * nominal * 1000.0))
            .chain(["inf".to_owned()])
            .zip(&buckets)
            .map(|(edge, count)| format!("{edge}:{count}"))
            .collect();
        let threshold = match config.detector {
            Detector::Phi(phi) => format!("{:.1}", phi.threshold),
            Detector::Fixed => "fixed".to_owned(),
        };
        let (ran, waited) = self
            .cpu_percent()
            .map_or(("-".to_owned(), "-".to_owned()), |(r, w)| {
                (format!("{r:.0}"), format!("{w:.0}"))
            });
        let line = format!(
            "heartbeat figures: period_s={} intervals={} p50_ms={} p99_ms={} max_ms={} max_phi={:.2} phi_threshold={threshold} deadline_ms={} starved={} working={} guest_cpu_ran_pct={ran} guest_cpu_waited_pct={waited} histogram={}",
            now.saturating_duration_since(self.since).as_secs(),
            intervals.len(),
            ms(at(0.5)),
            ms(at(0.99)),
            ms(intervals.last()),
            self.max_phi,
            monitor.deadline().as_millis(),
            self.starved,
            self.working,
            histogram.join(",")
        );
        *self = Self::new(now);
        line
    }
}
