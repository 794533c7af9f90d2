//! The unplanned takeovers of a run as timeline rows: hostd's events, with the nemesis's
//! faults from the history where hostd did not inject the fault itself.

use figures::{MoveKind, MoveRow, Phase};
use wire::events::EventLine;

use crate::history::{Entry, Fault, History};

/// A fault counts for a takeover detected at most this long after it (a double kill's
/// second node may be restarted and fail again well after the fault).
const FAULT_WINDOW_US: u64 = 120_000_000;

/// Every unplanned takeover in `events`, labelled with its time in seconds since the run
/// started (the axis of the client figure) and the fault that caused it.
pub fn takeover_rows(history: &History, events: &[EventLine]) -> Vec<MoveRow> {
    let start = history.run().t;
    let faults: Vec<&Fault> = history
        .entries()
        .iter()
        .filter_map(|entry| match entry {
            Entry::Fault(fault) => Some(fault),
            _ => None,
        })
        .collect();
    figures::moves_in_log(events)
        .into_iter()
        .map(|(_, row)| row)
        .filter(|row| row.kind == MoveKind::Takeover { planned: false })
        .map(|mut row| {
            let detected_us = row.detected_unix_ms.saturating_mul(1000);
            // Detection is stamped in whole milliseconds: allow for the rounding.
            let cause = faults
                .iter()
                .filter(|fault| {
                    fault.t <= detected_us.saturating_add(1000)
                        && fault.t.saturating_add(FAULT_WINDOW_US) >= detected_us
                })
                .max_by_key(|fault| fault.t);
            let at_s = detected_us.saturating_sub(start) as f64 / 1e6;
            let caused_by = cause.map_or_else(String::new, |fault| format!(" {}", fault.fault));
            row.label = format!("{at_s:.1} s{caused_by}: {}", row.label);
            let has_detection = row.phases.iter().any(|span| span.phase == Phase::Detect);
            match cause {
                Some(fault) if !has_detection => row.with_fault_at(fault.t),
                _ => row,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::history::RunInfo;

    #[test]
    fn takeovers_get_their_fault_and_time() {
        let history = History::from_entries(vec![
            Entry::Run(RunInfo {
                t: 1_000_000_000,
                seed: 1,
                run_id: 1,
                block_size: crate::block::BLOCK_SIZE as u64,
                writers: vec![],
            }),
            Entry::Fault(Fault {
                t: 1_009_990_000,
                cycle: 0,
                fault: "torn_tail".into(),
                node: "a".into(),
                detail: String::new(),
                node_t: None,
            }),
        ])
        .unwrap();
        let (events, bad) = wire::events::parse_log(concat!(
            r#"{"time_unix_ms":1010012,"time_unix_us":1010012000,"event":"takeover","node":"a","from":"a","to":"b","planned":false,"reason":"QEMU exited","epoch":2,"detected_unix_ms":1010000,"timeline_ms":{"fenced":0.7,"scanned":9.6,"serving":11.5},"replayed_records":3,"replayed_first_seq":1,"replayed_last_seq":3,"replay_complete":true}"#,
            "\n",
            r#"{"time_unix_ms":1020000,"time_unix_us":1020000000,"event":"giveback","node":"a","from":"b","to":"a","planned":true,"reason":"","epoch":3,"detected_unix_ms":1015000,"timeline_ms":{"serving":4160},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#,
        ));
        assert!(bad.is_empty());
        let rows = takeover_rows(&history, &events);
        assert_eq!(rows.len(), 1, "givebacks are left out");
        assert_eq!(rows[0].label, "10.0 s torn_tail: takeover a → b");
        assert_eq!(rows[0].phases[0].phase, Phase::Detect);
        assert_eq!(rows[0].phases[0].start_ms, -10.0);
    }
}
