//! The moves of an event log as timeline rows, each with the fault that caused it and the
//! end of its background replay when the log has them.

use std::collections::HashMap;

use wire::events::{Event, EventLine};

use super::row::{MoveKind, MoveRow};

/// A fault counts for a takeover detected at most this long after it.
const FAULT_WINDOW_US: u64 = 60_000_000;

/// Every takeover and giveback in `log`, in order, with the index of its line in `log`.
/// An unplanned takeover gets a detection phase from the last fault injected into the
/// node that held the identity (each fault counts once); a move whose replay ended gets
/// its background replay (the `replayed` event of the same identity and epoch).
pub fn moves_in_log(log: &[EventLine]) -> Vec<(usize, MoveRow)> {
    let mut faults: HashMap<&str, u64> = HashMap::new();
    let mut rows = Vec::new();
    for (index, line) in log.iter().enumerate() {
        let (report, kind) = match &line.event {
            Event::FaultInjected { node, .. } => {
                faults.insert(node, line.time_us());
                continue;
            }
            Event::Takeover(report) => (
                report,
                MoveKind::Takeover {
                    planned: report.planned,
                },
            ),
            Event::Giveback(report) => (report, MoveKind::Giveback),
            _ => continue,
        };
        let mut row = MoveRow::from_report(report, kind);
        let detected_us = report.detected_unix_ms.saturating_mul(1000);
        if kind == (MoveKind::Takeover { planned: false })
            && let Some(fault_us) = faults.remove(report.from.as_str())
            // Detection is stamped in whole milliseconds: allow for the rounding.
            && fault_us <= detected_us.saturating_add(1000)
            && fault_us.saturating_add(FAULT_WINDOW_US) >= detected_us
        {
            row = row.with_fault_at(fault_us);
        }
        let replayed = log[index + 1..]
            .iter()
            .find_map(|later| match &later.event {
                Event::Replayed {
                    node,
                    epoch,
                    after_ms,
                    complete,
                    ..
                } if *node == report.node && *epoch == report.epoch => Some((*after_ms, *complete)),
                _ => None,
            });
        if let Some((after_ms, complete)) = replayed {
            row = row.with_background_replay(after_ms);
            if !complete && report.replay_complete {
                row.label.push_str(" (replay INCOMPLETE)");
            }
        }
        rows.push((index, row));
    }
    rows
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::timeline::Phase;

    const LOG: &str = concat!(
        r#"{"time_unix_ms":1,"time_unix_us":1000,"event":"fault_injected","node":"b","signal":"kill"}"#,
        "\n",
        r#"{"time_unix_ms":9985,"time_unix_us":9985000,"event":"fault_injected","node":"a","signal":"kill"}"#,
        "\n",
        r#"{"time_unix_ms":10012,"time_unix_us":10012000,"event":"takeover","node":"a","from":"a","to":"b","planned":false,"reason":"QEMU exited","epoch":2,"detected_unix_ms":10000,"timeline_ms":{"fenced":0.7,"scanned":9.6,"serving":11.5},"replayed_records":3,"replayed_first_seq":1,"replayed_last_seq":3,"replay_complete":true}"#,
        "\n",
        r#"{"time_unix_ms":10820,"time_unix_us":10820000,"event":"replayed","node":"a","by":"b","from":"a","epoch":2,"after_ms":820.0,"first_seq":1,"last_seq":3,"complete":true}"#,
        "\n",
        r#"{"time_unix_ms":20000,"time_unix_us":20000000,"event":"giveback","node":"a","from":"b","to":"a","planned":true,"reason":"hostd giveback","epoch":3,"detected_unix_ms":15000,"timeline_ms":{"restarted":4100,"released":4130,"serving":4160},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#,
        "\n",
    );

    #[test]
    fn moves_get_their_fault_and_replay() {
        let (log, bad) = wire::events::parse_log(LOG);
        assert!(bad.is_empty(), "{bad:?}");
        let rows = moves_in_log(&log);
        let indices: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [2, 4]);
        let takeover = &rows[0].1;
        assert_eq!(takeover.phases[0].phase, Phase::Detect);
        assert_eq!(takeover.phases[0].start_ms, -15.0);
        let last = takeover.phases.last().unwrap();
        assert_eq!((last.phase, last.end_ms), (Phase::BackgroundReplay, 820.0));
        let giveback = &rows[1].1;
        assert_eq!(giveback.kind, MoveKind::Giveback);
        assert!(giveback.phases.iter().all(|s| s.phase != Phase::Detect));
    }

    #[test]
    fn a_fault_long_before_the_detection_is_not_its_cause() {
        let log = LOG.replace(r#""detected_unix_ms":10000"#, r#""detected_unix_ms":99000"#);
        let (log, _) = wire::events::parse_log(&log);
        let rows = moves_in_log(&log);
        assert!(rows[0].1.phases.iter().all(|s| s.phase != Phase::Detect));
    }
}
