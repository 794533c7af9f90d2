//! The client's longest stall per event, from the workload's own timestamps.
//!
//! The workload reports each file as soon as it is durable, one at a time, so the reports
//! arrive at the host in order. Every event owns the reports that arrive after it began
//! and up to the next event: the first of them is the operation that was in flight when the
//! event hit, the rest ran while the identity moved and after. An event's stall is the
//! longest of its operations (write, fsyncs, rename, journal), as the client timed it; the
//! host's clock only decides which event an operation belongs to.

use std::time::Instant;

use client_load::record::Fsynced;

/// One report and when it reached the host.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub at: Instant,
    pub op: Fsynced,
}

/// The operations of one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventOps {
    pub ops: usize,
    /// The longest operation's duration in ms, and its seq.
    pub longest: Option<(f64, u64)>,
}

/// Splits `arrived` (in arrival order) at the events' start times `starts` (ascending):
/// the durations of the operations before the first event (the baseline), and each
/// event's operations.
pub fn per_event(arrived: &[Arrived], starts: &[Instant]) -> (Vec<f64>, Vec<EventOps>) {
    let mut baseline = Vec::new();
    let mut events = vec![EventOps::default(); starts.len()];
    for report in arrived {
        // The last event that began before this report arrived.
        let owner = starts.partition_point(|start| *start < report.at);
        let duration = report.op.duration_ms();
        match owner.checked_sub(1) {
            None => baseline.push(duration),
            Some(index) => {
                let event = &mut events[index];
                event.ops += 1;
                if event.longest.is_none_or(|(longest, _)| duration > longest) {
                    event.longest = Some((duration, report.op.record.seq));
                }
            }
        }
    }
    (baseline, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use client_load::record::FileRecord;
    use std::time::Duration;

    fn arrived(t0: Instant, at_ms: u64, seq: u64, duration_ms: f64) -> Arrived {
        Arrived {
            at: t0 + Duration::from_millis(at_ms),
            op: Fsynced {
                record: FileRecord {
                    seq,
                    file: "f".into(),
                    len: 1,
                    crc32c: 0,
                },
                start_ms: 1000.0,
                end_ms: 1000.0 + duration_ms,
            },
        }
    }

    #[test]
    fn each_event_owns_the_reports_until_the_next_one() {
        let t0 = Instant::now();
        let reports = [
            arrived(t0, 10, 1, 5.0),
            arrived(t0, 20, 2, 6.0),
            // Event 0 at 100 ms: the op in flight ends at 900 ms.
            arrived(t0, 900, 3, 810.0),
            arrived(t0, 910, 4, 7.0),
            // Event 1 at 1000 ms; event 2 at 2000 ms has no reports yet.
            arrived(t0, 1500, 5, 480.0),
            arrived(t0, 1600, 6, 1200.0),
        ];
        let starts = [
            t0 + Duration::from_millis(100),
            t0 + Duration::from_millis(1000),
            t0 + Duration::from_millis(2000),
        ];
        let (baseline, events) = per_event(&reports, &starts);
        assert_eq!(baseline, vec![5.0, 6.0]);
        assert_eq!(
            events,
            vec![
                EventOps {
                    ops: 2,
                    longest: Some((810.0, 3))
                },
                EventOps {
                    ops: 2,
                    longest: Some((1200.0, 6))
                },
                EventOps::default(),
            ]
        );
    }
}
