//! What the clients of a run did, from its history: operations per second and latency per
//! identity in time buckets, with the faults and the takeovers as marks.

use std::collections::HashMap;

use figures::{ClientActivity, Mark, MarkKind, Series, SeriesStyle};

use crate::history::{Entry, History};
use crate::report::nearest_rank;

/// Bucket widths to choose from, in seconds: the narrowest that gives at most
/// [`MAX_BUCKETS`] (more would be finer than the figure's pixels).
const BUCKET_WIDTHS_S: [f64; 9] = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
const MAX_BUCKETS: f64 = 400.0;

/// Operations that completed in one bucket, per identity.
#[derive(Debug, Clone, Default)]
struct Bucket {
    ok: u32,
    /// Latency (ms) of every completion: success, failure or unknown.
    latencies_ms: Vec<f64>,
}

/// The client activity of `history`.
pub fn client_activity(history: &History) -> ClientActivity {
    let run = history.run();
    let start = run.t;
    let seconds = |t: u64| t.saturating_sub(start) as f64 / 1e6;
    let duration_s = seconds(history.last_t());
    let width = BUCKET_WIDTHS_S
        .into_iter()
        .find(|width| duration_s / width <= MAX_BUCKETS)
        .unwrap_or(60.0);
    // Whole buckets only: a last, partial one would show a rate too low. What completed
    // after the last whole bucket (less than one bucket's time) is left out.
    let bucket_count = ((duration_s / width) as usize).max(1);
    let bucket_of = |t: u64| Some((seconds(t) / width) as usize).filter(|b| *b < bucket_count);

    let mut identities: Vec<&str> = Vec::new();
    for spec in &run.writers {
        if !identities.contains(&spec.identity.as_str()) {
            identities.push(&spec.identity);
        }
    }
    let mut buckets = vec![vec![Bucket::default(); bucket_count]; identities.len()];
    let mut errors = vec![0_u32; bucket_count];
    let mut invoked: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut marks = Vec::new();
    for entry in history.entries() {
        let (op, t, ok) = match entry {
            Entry::Invoke(invoke) => {
                let identity = history.writer(invoke.writer).and_then(|spec| {
                    identities
                        .iter()
                        .position(|identity| *identity == spec.identity)
                });
                if let Some(identity) = identity {
                    invoked.insert(invoke.op, (invoke.t, identity));
                }
                continue;
            }
            Entry::Ok(done) => (done.op, done.t, true),
            Entry::Fail(done) | Entry::Unknown(done) => (done.op, done.t, false),
            Entry::Fault(fault) => {
                marks.push(Mark {
                    at_s: seconds(fault.t),
                    kind: MarkKind::Fault,
                    label: format!("{} {} {}", fault.cycle, fault.fault, fault.node),
                });
                continue;
            }
            Entry::Takeover(takeover) => {
                marks.push(Mark {
                    at_s: seconds(takeover.t),
                    kind: MarkKind::Takeover,
                    label: format!("{} → {}", takeover.identity, takeover.to),
                });
                continue;
            }
            _ => continue,
        };
        let Some((invoked_t, identity)) = invoked.remove(&op) else {
            continue;
        };
        let Some(index) = bucket_of(t) else {
            continue;
        };
        let bucket = &mut buckets[identity][index];
        bucket
            .latencies_ms
            .push(t.saturating_sub(invoked_t) as f64 / 1000.0);
        if ok {
            bucket.ok += 1;
        } else {
            errors[index] += 1;
        }
    }

    let centre = |index: usize| (index as f64 + 0.5) * width;
    let mut ops_per_s = Vec::new();
    let mut latency_ms = Vec::new();
    for (palette_index, (identity, buckets)) in identities.iter().zip(&buckets).enumerate() {
        ops_per_s.push(Series {
            name: format!("{identity}: ok/s"),
            points: buckets
                .iter()
                .enumerate()
                .map(|(index, bucket)| (centre(index), f64::from(bucket.ok) / width))
                .collect(),
            palette_index,
            style: SeriesStyle::Bold,
        });
        let mut max = Vec::new();
        let mut median = Vec::new();
        for (index, bucket) in buckets.iter().enumerate() {
            let mut sorted = bucket.latencies_ms.clone();
            sorted.sort_by(f64::total_cmp);
            // No completion in the bucket: a break in the lines, not a bridge over it.
            let high = sorted.last().copied().unwrap_or(f64::NAN);
            let middle = nearest_rank(&sorted, 50.0).unwrap_or(f64::NAN);
            max.push((centre(index), high));
            median.push((centre(index), middle));
        }
        latency_ms.push(Series {
            name: format!("{identity}: max"),
            points: max,
            palette_index,
            style: SeriesStyle::Bold,
        });
        latency_ms.push(Series {
            name: format!("{identity}: median"),
            points: median,
            palette_index,
            style: SeriesStyle::Thin,
        });
    }
    let error_points: Vec<(f64, f64)> = errors
        .iter()
        .enumerate()
        .filter(|(_, count)| **count > 0)
        .map(|(index, count)| (centre(index), f64::from(*count) / width))
        .collect();
    if !error_points.is_empty() {
        ops_per_s.push(Series {
            name: "fail or unknown/s".to_owned(),
            points: error_points,
            palette_index: 5,
            style: SeriesStyle::Dots,
        });
    }
    ClientActivity {
        title: format!(
            "Clients of campaign seed {} ({} s buckets, by completion time)",
            run.seed, width
        ),
        ops_per_s,
        latency_ms,
        marks,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::history::{
        Action, End, ErrorCompletion, Fault, Invoke, OkCompletion, RunInfo, Takeover, WriterSpec,
    };

    const T0: u64 = 1_000_000_000;

    fn history() -> History {
        let writer = |writer, identity: &str| WriterSpec {
            writer,
            identity: identity.into(),
            first_block: 0,
            blocks: 4,
        };
        let invoke = |t, op, writer| {
            Entry::Invoke(Invoke {
                t: T0 + t,
                op,
                writer,
                action: Action::Read,
                block: 0,
                seq: None,
                server: None,
            })
        };
        let ok = |t, op| {
            Entry::Ok(OkCompletion {
                t: T0 + t,
                op,
                value: Some(crate::block::BlockValue::Zero),
            })
        };
        History::from_entries(vec![
            Entry::Run(RunInfo {
                t: T0,
                seed: 7,
                run_id: 1,
                block_size: crate::block::BLOCK_SIZE as u64,
                writers: vec![writer(0, "a"), writer(1, "b")],
            }),
            invoke(0, 1, 0),
            ok(2_000, 1),
            invoke(0, 2, 1),
            ok(3_000, 2),
            invoke(10_000_000, 3, 0),
            Entry::Fault(Fault {
                t: T0 + 10_100_000,
                cycle: 0,
                fault: "kill".into(),
                node: "a".into(),
                detail: String::new(),
                node_t: None,
            }),
            Entry::Unknown(ErrorCompletion {
                t: T0 + 13_000_000,
                op: 3,
                error: "timed out".into(),
            }),
            Entry::Takeover(Takeover {
                t: T0 + 10_150_000,
                cycle: 0,
                identity: "a".into(),
                from: "a".into(),
                to: "b".into(),
                fault_to_serving_ms: 50.0,
                detect_to_serving_ms: 40.0,
            }),
            Entry::End(End { t: T0 + 14_000_000 }),
        ])
        .unwrap()
    }

    #[test]
    fn operations_and_latency_by_identity_and_bucket() {
        let activity = client_activity(&history());
        assert!(activity.title.contains("seed 7"), "{}", activity.title);
        assert!(
            activity.title.contains("0.1 s buckets"),
            "{}",
            activity.title
        );
        let names: Vec<&str> = activity.ops_per_s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a: ok/s", "b: ok/s", "fail or unknown/s"]);
        // One ok in the first 0.1 s bucket: 10/s.
        assert_eq!(activity.ops_per_s[0].points[0], (0.05, 10.0));
        assert_eq!(activity.ops_per_s[2].points, [(13.05, 10.0)]);
        let a_max = &activity.latency_ms[0];
        assert_eq!(a_max.name, "a: max");
        let with_data: Vec<(f64, f64)> = a_max
            .points
            .iter()
            .copied()
            .filter(|(_, v)| !v.is_nan())
            .collect();
        assert_eq!(with_data, [(0.05, 2.0), (13.05, 3000.0)]);
        assert_eq!(
            a_max.points.len(),
            140,
            "a point per bucket, NaN where none completed"
        );
        let marks: Vec<(&str, MarkKind)> = activity
            .marks
            .iter()
            .map(|m| (m.label.as_str(), m.kind))
            .collect();
        assert_eq!(
            marks,
            [("0 kill a", MarkKind::Fault), ("a → b", MarkKind::Takeover)]
        );
        figures::draw_activity(&activity).unwrap();
    }
}
