//! The per-run report: what the run did (faults, operations, takeover times) and what the
//! checker concluded, as JSON and for humans.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Takeovers the agents made while hostd was away.
    pub takeovers_without_hostd: AgentTakeoverStats,
}

/// The takeovers of the faults that hit a node while hostd was away (`hostd_down_kill`,
/// `zombie`): from the node's kill or stop (the fault's `node_t`) to the first claim of its
/// identity by another node the sampler read (an upper bound: read within one sampling
/// interval of its publication), and to the first acknowledgement of an operation on it
/// invoked after the hit (what a client sees).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentTakeoverStats {
    /// Faults whose node's identity was claimed.
    pub count: usize,
    pub hit_to_claim_ms: Percentiles,
    pub hit_to_first_ok_ms: Percentiles,
}

impl AgentTakeoverStats {
    /// The statistics of `history`.
    pub fn of(history: &History) -> Self {
        let mut faults: Vec<(u64, &str, Option<u64>)> = Vec::new();
        // Only these take a node over as soon as it is hit: `both_stop`'s claims wait
        // until the nodes are continued, so its stop time would count as takeover time.
        const TIMED: [&str; 2] = ["hostd_down_kill", "zombie"];
        let mut claims: Vec<(u64, &str, &str)> = Vec::new();
        let mut invoked: HashMap<u64, (u64, &str)> = HashMap::new();
        let mut acked: Vec<(u64, u64, &str)> = Vec::new();
        for entry in history.entries() {
            match entry {
                Entry::Fault(fault) => {
                    let node_t = fault
                        .node_t
                        .filter(|_| TIMED.contains(&fault.fault.as_str()));
                    faults.push((fault.t, fault.node.as_str(), node_t));
                }
                Entry::Claim(claim) => claims.push((claim.t, &claim.identity, &claim.node)),
                Entry::Invoke(invoke) => {
                    if let Some(spec) = history.writer(invoke.writer) {
                        invoked.insert(invoke.op, (invoke.t, spec.identity.as_str()));
                    }
                }
                Entry::Ok(ok) => {
                    if let Some(&(t, identity)) = invoked.get(&ok.op) {
                        acked.push((t, ok.t, identity));
                    }
                }
                _ => {}
            }
        }
        faults.sort_unstable();
        let mut to_claim = Vec::new();
        let mut to_ok = Vec::new();
        for (index, &(_, node, node_t)) in faults.iter().enumerate() {
            let Some(hit) = node_t else { continue };
            // Within the fault's cycle: before the next fault.
            let until = faults.get(index + 1).map_or(u64::MAX, |next| next.0);
            let claimed = claims
                .iter()
                .filter(|(t, identity, by)| {
                    *identity == node && *by != node && (hit..until).contains(t)
                })
                .map(|(t, ..)| *t)
                .min();
            let Some(claimed) = claimed else { continue };
            to_claim.push(ms_between(hit, claimed));
            let first_ok = acked
                .iter()
                .filter(|(invoked, done, identity)| {
                    *identity == node && *invoked >= hit && *done < until
                })
                .map(|(_, done, _)| *done)
                .min();
            if let Some(done) = first_ok {
                to_ok.push(ms_between(hit, done));
            }
        }
        AgentTakeoverStats {
            count: to_claim.len(),
            hit_to_claim_ms: Percentiles::of(&to_claim),
            hit_to_first_ok_ms: Percentiles::of(&to_ok),
        }
    }
}

fn ms_between(from_us: u64, to_us: u64) -> f64 {
    to_us.saturating_sub(from_us) as f64 / 1000.0
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
            takeovers_without_hostd: AgentTakeoverStats::of(history),
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
        let away = &self.takeovers_without_hostd;
        if away.count > 0 {
            writeln!(f, "takeovers without hostd: {}", away.count)?;
            writeln!(f, "  node hit to claim: {}", away.hit_to_claim_ms)?;
            writeln!(f, "  node hit to first ok: {}", away.hit_to_first_ok_ms)?;
        }
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
