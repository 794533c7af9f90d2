//! The per-run report: what the run did (faults, operations, takeover times) and what the
//! checker concluded, as JSON and for humans.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::checker::{AnomalyKind, CheckOutcome, OpCounts, Verdict, join_counts};
use crate::history::{Entry, History};

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The nemesis seed.
    pub seed: u64,
    /// The run's id.
    pub run_id: u64,
    /// From the run entry to the last entry, in seconds.
    pub duration_s: f64,
    /// Whether the history has an `end` entry.
    pub finished: bool,
    /// Distinct nemesis cycles seen in `fault` and `takeover` entries.
    pub cycles: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Operations by action and outcome.
    pub operations: OpCounts,
    /// Anomalies by kind.
    pub anomalies: BTreeMap<AnomalyKind, usize>,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Takeover timings.
    pub takeovers: TakeoverStats,
}

/// Takeover timings from the `takeover` entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TakeoverStats {
    /// How many takeovers.
    pub count: usize,
    /// From fault injection to serving again, in ms.
    pub fault_to_serving_ms: Percentiles,
    /// From failure detection to serving again, in ms.
    pub detect_to_serving_ms: Percentiles,
}

/// Nearest-rank percentiles of a sample; None when the sample is empty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

impl Percentiles {
    /// The percentiles of `sample` (any order).
    pub fn of(sample: &[f64]) -> Self {
        let mut sorted = sample.to_vec();
        sorted.sort_by(f64::total_cmp);
        Percentiles {
            p50: nearest_rank(&sorted, 50.0),
            p99: nearest_rank(&sorted, 99.0),
            max: sorted.last().copied(),
        }
    }
}

/// The nearest-rank `percent` percentile of an ascending `sorted` sample: the smallest value
/// with at least `percent`% of the sample at or below it. None for an empty sample.
pub fn nearest_rank(sorted: &[f64], percent: f64) -> Option<f64> {
    // Ranks are small integers, so the float round trip is exact.
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

impl Report {
    /// The report of `history`, given the checker's `outcome` for it.
    pub fn build(history: &History, outcome: &CheckOutcome) -> Self {
        let run = history.run();
        let mut faults: BTreeMap<String, usize> = BTreeMap::new();
        let mut cycles = BTreeSet::new();
        let mut fault_to_serving = Vec::new();
        let mut detect_to_serving = Vec::new();
        for entry in history.entries() {
            match entry {
                Entry::Fault(fault) => {
                    *faults.entry(fault.fault.clone()).or_default() += 1;
                    cycles.insert(fault.cycle);
                }
                Entry::Takeover(takeover) => {
                    cycles.insert(takeover.cycle);
                    fault_to_serving.push(takeover.fault_to_serving_ms);
                    detect_to_serving.push(takeover.detect_to_serving_ms);
                }
                _ => {}
            }
        }
        Report {
            seed: run.seed,
            run_id: run.run_id,
            duration_s: history.last_t().saturating_sub(run.t) as f64 / 1e6,
            finished: history.finished(),
            cycles: cycles.len(),
            faults,
            operations: outcome.operations,
            anomalies: outcome.anomaly_counts.clone(),
            verdict: outcome.verdict,
            takeovers: TakeoverStats {
                count: fault_to_serving.len(),
                fault_to_serving_ms: Percentiles::of(&fault_to_serving),
                detect_to_serving_ms: Percentiles::of(&detect_to_serving),
            },
        }
    }

    /// The report as pretty JSON, with a final newline (the `report.json` file).
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        Ok(json)
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |value: Option<f64>| value.map_or("n/a".to_owned(), |v| format!("{v:.1} ms"));
        write!(
            f,
            "p50 {}, p99 {}, max {}",
            show(self.p50),
            show(self.p99),
            show(self.max)
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run {} (seed {})", self.run_id, self.seed)?;
        writeln!(
            f,
            "duration: {:.1} s{}",
            self.duration_s,
            if self.finished {
                ""
            } else {
                " (no end entry: the run did not finish)"
            }
        )?;
        writeln!(f, "cycles: {}", self.cycles)?;
        let faults = if self.faults.is_empty() {
            "none".to_owned()
        } else {
            join_counts(&self.faults)
        };
        writeln!(f, "faults: {faults}")?;
        let ops = &self.operations;
        writeln!(
            f,
            "writes: {} ok, {} fail, {} unknown",
            ops.writes.ok, ops.writes.fail, ops.writes.unknown
        )?;
        writeln!(
            f,
            "reads: {} ok, {} fail, {} unknown",
            ops.reads.ok, ops.reads.fail, ops.reads.unknown
        )?;
        writeln!(f, "anomalies: {}", join_counts(&self.anomalies))?;
        writeln!(f, "takeovers: {}", self.takeovers.count)?;
        writeln!(
            f,
            "  fault to serving: {}",
            self.takeovers.fault_to_serving_ms
        )?;
        writeln!(
            f,
            "  detect to serving: {}",
            self.takeovers.detect_to_serving_ms
        )?;
        writeln!(f, "verdict: {}", self.verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sample: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&sample, 50.0), Some(50.0));
        assert_eq!(nearest_rank(&sample, 99.0), Some(99.0));
        assert_eq!(nearest_rank(&[], 50.0), None);
        assert_eq!(nearest_rank(&[7.0], 99.0), Some(7.0));
        // Rank ceil(0.5 * 3) = 2.
        assert_eq!(Percentiles::of(&[30.0, 10.0, 20.0]).p50, Some(20.0));
        assert_eq!(Percentiles::of(&[30.0, 10.0, 20.0]).max, Some(30.0));
        assert_eq!(
            Percentiles::of(&[]).to_string(),
            "p50 n/a, p99 n/a, max n/a"
        );
    }
}
