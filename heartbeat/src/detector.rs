//! The phi accrual failure detector (Hayashibara et al., 2004; as in Akka and Cassandra)
//! over a node's observed heartbeat intervals.
//!
//! Instead of a fixed timeout, it answers "how unlikely is a silence this long, given the
//! intervals seen so far?" as phi = -log10(P(interval > silence)), with the intervals taken
//! as normally distributed (Akka's logistic approximation of the normal tail). Phi 8 means
//! one chance in 10^8 that a live node is this late. A steady guest thus gets a short
//! deadline and a jittery one (a TCG guest on a busy host) a longer one, learned from what
//! it actually does. The monitor clamps the result between a floor and the configured
//! timeout (`monitor::Config`).

use std::collections::VecDeque;
use std::time::Duration;

/// How many intervals the detector remembers: about 100 s at 100 ms, long enough to keep
/// the memory of a burst of jitter, short enough to follow a change of load.
pub const WINDOW: usize = 1000;

/// The observed heartbeat intervals of one node, and phi over them.
#[derive(Debug, Clone)]
pub struct Intervals {
    /// Intervals in microseconds, oldest first.
    samples: VecDeque<u64>,
    capacity: usize,
    // Exact sums (integers), so a long run does not drift.
    sum: u128,
    sum_of_squares: u128,
    /// The interval the node is configured to beat at: the estimate until there are samples.
    nominal: Duration,
    /// The least standard deviation used: a perfectly regular stream would otherwise make
    /// any lateness infinitely unlikely. Also covers the sampling period of the reader.
    min_std_dev: Duration,
}

impl Intervals {
    /// An empty history for a node that beats every `nominal`, remembering `capacity`
    /// intervals (at least 1), with a standard deviation of at least `min_std_dev`.
    pub fn new(nominal: Duration, min_std_dev: Duration, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            samples: VecDeque::with_capacity(capacity.min(WINDOW)),
            capacity,
            sum: 0,
            sum_of_squares: 0,
            nominal,
            min_std_dev: min_std_dev.max(Duration::from_micros(1)),
        }
    }

    /// Forgets every interval (a new boot).
    pub fn clear(&mut self) {
        self.samples.clear();
        self.sum = 0;
        self.sum_of_squares = 0;
    }

    /// Records one interval between two heartbeats.
    pub fn push(&mut self, interval: Duration) {
        let micros = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        if self.samples.len() == self.capacity
            && let Some(old) = self.samples.pop_front()
        {
            self.sum -= u128::from(old);
            self.sum_of_squares -= u128::from(old) * u128::from(old);
        }
        self.samples.push_back(micros);
        self.sum += u128::from(micros);
        self.sum_of_squares += u128::from(micros) * u128::from(micros);
    }

    /// How many intervals are remembered.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The mean interval (the nominal one until two intervals were seen: a single sample
    /// says nothing about the spread).
    pub fn mean(&self) -> Duration {
        Duration::from_secs_f64(self.mean_micros() / 1e6)
    }

    /// The standard deviation, at least the minimum.
    pub fn std_dev(&self) -> Duration {
        Duration::from_secs_f64(self.std_dev_micros() / 1e6)
    }

    fn mean_micros(&self) -> f64 {
        if self.samples.len() < 2 {
            return self.nominal.as_secs_f64() * 1e6;
        }
        self.sum as f64 / self.samples.len() as f64
    }

    fn std_dev_micros(&self) -> f64 {
        let min = self.min_std_dev.as_secs_f64() * 1e6;
        let n = self.samples.len();
        if n < 2 {
            return min;
        }
        // Population variance from exact sums: n·Σx² - (Σx)², never negative.
        let n = n as u128;
        let spread = (n * self.sum_of_squares).saturating_sub(self.sum * self.sum);
        let variance = spread as f64 / (n * n) as f64;
        variance.sqrt().max(min)
    }

    /// Phi of a silence of `elapsed` since the last heartbeat: -log10 of the probability
    /// that a live node's next interval is at least that long. Near 0 for a silence shorter
    /// than usual (about 0.3 at the mean); grows without bound (to infinity) as the silence
    /// lengthens.
    pub fn phi(&self, elapsed: Duration) -> f64 {
        let mean = self.mean_micros();
        let std_dev = self.std_dev_micros();
        let t = elapsed.as_secs_f64() * 1e6;
        let y = (t - mean) / std_dev;
        // Akka's logistic approximation of the normal distribution's tail: 1 / (1 + e^(...)).
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let phi = if t > mean {
            -(e / (1.0 + e)).log10()
        } else {
            -(1.0 - 1.0 / (1.0 + e)).log10()
        };
        // -0.0 and NaN (e = inf / inf cannot happen with std_dev > 0, but be sure) read as 0.
        if phi.is_nan() { 0.0 } else { phi.max(0.0) }
    }

    /// The silence at which phi reaches `threshold` (to within a millisecond): the
    /// detector's own deadline before any floor or ceiling.
    pub fn deadline(&self, threshold: f64) -> Duration {
        // Phi grows with the silence: bisect between the mean and a silence surely past it.
        let mut low = 0.0_f64;
        let mut high = self.mean_micros() + self.std_dev_micros() * 64.0;
        while high - low > 1000.0 {
            let mid = (low + high) / 2.0;
            if self.phi(Duration::from_secs_f64(mid / 1e6)) >= threshold {
                high = mid;
            } else {
                low = mid;
            }
        }
        Duration::from_secs_f64(high / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn history(intervals: impl IntoIterator<Item = u64>) -> Intervals {
        let mut h = Intervals::new(100 * MS, 25 * MS, WINDOW);
        for ms in intervals {
            h.push(Duration::from_millis(ms));
        }
        h
    }

    /// A deterministic pseudo-random stream (splitmix64), so the tests need no crate.
    fn jitter(seed: u64, n: usize, base_ms: u64, spread_ms: u64) -> Vec<u64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                base_ms + z % (spread_ms + 1)
            })
            .collect()
    }

    #[test]
    fn phi_is_near_zero_before_the_mean_and_grows_after_it() {
        let h = history([100; 50]);
        assert!(h.phi(Duration::ZERO) < 0.001);
        assert!(h.phi(50 * MS) < 0.1);
        assert!(
            (h.phi(100 * MS) - 0.301).abs() < 0.01,
            "half the intervals are longer"
        );
        let mut last = 0.0;
        for ms in (100..600).step_by(10) {
            let phi = h.phi(ms * MS);
            assert!(phi >= last, "phi fell at {ms} ms: {phi} < {last}");
            last = phi;
        }
        assert!(h.phi(10_000 * MS).is_infinite() || h.phi(10_000 * MS) > 100.0);
    }

    #[test]
    fn a_steady_stream_has_a_short_deadline_and_a_jittery_one_a_long_one() {
        // Regular beats: the deviation is the minimum (25 ms), phi 8 at about mean + 5.2 sd.
        let steady = history([100; 200]);
        assert_eq!(steady.mean(), 100 * MS);
        assert_eq!(steady.std_dev(), 25 * MS);
        let d = steady.deadline(8.0);
        assert!(d > 220 * MS && d < 240 * MS, "{d:?}");
        // 50-350 ms intervals: the deadline moves out by itself.
        let jittery = history(jitter(7, 1000, 50, 300));
        let d = jittery.deadline(8.0);
        assert!(d > 600 * MS && d < 800 * MS, "{d:?}");
        assert!(jittery.phi(400 * MS) < 3.0);
    }

    #[test]
    fn the_deadline_is_where_phi_crosses_the_threshold() {
        let h = history(jitter(3, 300, 80, 60));
        for threshold in [1.0, 4.0, 8.0, 12.0] {
            let d = h.deadline(threshold);
            assert!(
                h.phi(d) >= threshold,
                "{threshold}: phi({d:?}) = {}",
                h.phi(d)
            );
            assert!(h.phi(d.saturating_sub(2 * MS)) < threshold);
        }
    }

    #[test]
    fn the_window_forgets_old_intervals_exactly() {
        let mut h = Intervals::new(100 * MS, MS, 10);
        for _ in 0..10 {
            h.push(1000 * MS);
        }
        assert_eq!(h.mean(), 1000 * MS);
        for _ in 0..10 {
            h.push(100 * MS);
        }
        assert_eq!(h.len(), 10);
        assert_eq!(h.mean(), 100 * MS);
        assert_eq!(h.std_dev(), MS, "all equal: the minimum");
    }

    #[test]
    fn without_samples_the_nominal_interval_is_the_estimate() {
        let mut h = Intervals::new(100 * MS, 25 * MS, WINDOW);
        assert!(h.is_empty());
        assert_eq!(h.mean(), 100 * MS);
        h.push(400 * MS);
        assert_eq!(h.mean(), 100 * MS, "one interval says nothing yet");
        h.push(400 * MS);
        assert_eq!(h.mean(), 400 * MS);
        h.clear();
        assert_eq!(h.mean(), 100 * MS);
    }
}
