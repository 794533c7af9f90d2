//! What happens to the node serving the client's export: a kill, a hang, a planned
//! takeover, and a giveback after each, in rounds.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;
use wire::control::{ClusterStatus, MoveReport, NodeState};
use wire::events::Event;

use crate::hostd::{Hostd, HostdError};

/// The kinds of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// SIGKILL the serving node's QEMU (`hostd kill`); its partner takes over.
    Kill,
    /// SIGSTOP the serving node's QEMU (`hostd kill --signal stop`); hostd finds it stopped,
    /// fences it, and its partner takes over.
    Hang,
    /// `hostd takeover`: the node releases its identity and its partner serves it.
    Takeover,
    /// `hostd giveback`: the identity goes home (restarting its node first when it is dead).
    Giveback,
}

impl EventKind {
    /// Every kind, in report order.
    pub const ALL: [EventKind; 4] = [
        EventKind::Kill,
        EventKind::Hang,
        EventKind::Takeover,
        EventKind::Giveback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Kill => "kill",
            EventKind::Hang => "hang",
            EventKind::Takeover => "takeover",
            EventKind::Giveback => "giveback",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `rounds` rounds of kill, giveback, hang, giveback, takeover, giveback: `rounds` events
/// of each of the first three kinds and three times as many givebacks.
pub fn schedule(rounds: u64) -> Vec<EventKind> {
    use EventKind::*;
    (0..rounds)
        .flat_map(|_| [Kill, Giveback, Hang, Giveback, Takeover, Giveback])
        .collect()
}

/// Errors injecting an event or waiting for the pair to settle after it.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("hostd refused or failed the {kind}")]
    Hostd {
        kind: EventKind,
        #[source]
        source: HostdError,
    },
    #[error("the pair did not settle after the {kind}")]
    Settle {
        kind: EventKind,
        #[source]
        source: HostdError,
    },
}

/// One event as it happened.
#[derive(Debug, Clone)]
pub struct Injected {
    pub kind: EventKind,
    /// Just before hostd was asked.
    pub at: Instant,
    pub at_unix_us: u64,
    /// When the identity was served again as the event intends (seen in `hostd status`).
    pub settled: Instant,
    /// What hostd said (its first line).
    pub detail: String,
    /// hostd's record of the identity's move.
    pub moved: Option<MoveReport>,
}

impl Injected {
    /// How long the identity had no server, by hostd's timeline: from the kill (unplanned)
    /// or from the start of the move, after any restart (planned), to serving again.
    pub fn unserved_ms(&self) -> Option<f64> {
        let moved = self.moved.as_ref()?;
        let serving = moved.timeline_ms.serving?;
        Some(match self.kind {
            EventKind::Kill | EventKind::Hang => {
                let detected_us = moved.detected_unix_ms as f64 * 1000.0;
                (detected_us - self.at_unix_us as f64) / 1000.0 + serving
            }
            EventKind::Takeover => serving,
            EventKind::Giveback => serving - moved.timeline_ms.restarted.unwrap_or(0.0),
        })
    }
}

/// Runs `kind` against node `node` (which must serve its own identity for all but a
/// giveback) and waits until the identity is served again as intended.
pub fn inject(hostd: &Hostd, kind: EventKind, node: &str) -> Result<Injected, EventError> {
    let hostd_err = |source| EventError::Hostd { kind, source };
    let at = Instant::now();
    let at_unix_us = wire::time::now_unix_us();
    let said = match kind {
        EventKind::Kill => hostd.run(&["kill", node]),
        EventKind::Hang => hostd.run(&["kill", node, "--signal", "stop"]),
        EventKind::Takeover => hostd.run(&["takeover", node]),
        EventKind::Giveback => hostd.run(&["giveback", node]),
    }
    .map_err(hostd_err)?;
    let settle = |what: &str, timeout, check: &dyn Fn(&ClusterStatus) -> bool| {
        hostd
            .wait_for(what, timeout, check)
            .map_err(|source| EventError::Settle { kind, source })
    };
    match kind {
        EventKind::Giveback => settle("a healthy pair", Duration::from_secs(180), &Hostd::healthy)?,
        _ => settle(
            &format!("{node}'s identity served by its live partner"),
            Duration::from_secs(60),
            &|status| served_by_partner(status, node),
        )?,
    };
    let settled = Instant::now();
    let moved = hostd
        .events()
        .ok()
        .and_then(|events| last_move(&events, node, at_unix_us));
    Ok(Injected {
        kind,
        at,
        at_unix_us,
        settled,
        detail: said.lines().next().unwrap_or_default().to_owned(),
        moved,
    })
}

/// Whether `node`'s identity is served by another node that is up.
fn served_by_partner(status: &ClusterStatus, node: &str) -> bool {
    Hostd::node(status, node).is_some_and(|n| {
        n.served_by.as_deref().is_some_and(|holder| holder != node)
            && n.served_by_state == Some(NodeState::Up)
    })
}

/// The last takeover or giveback of identity `node` that started at `since_us` or later
/// (less a millisecond: hostd stamps the start in whole milliseconds).
fn last_move(events: &[wire::events::EventLine], node: &str, since_us: u64) -> Option<MoveReport> {
    events.iter().rev().find_map(|line| match &line.event {
        Event::Takeover(report) | Event::Giveback(report)
            if report.node == node
                && report.detected_unix_ms.saturating_add(1) * 1000 >= since_us =>
        {
            Some(report.clone())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wire::events::EventLine;

    #[test]
    fn a_round_has_each_kind_and_a_giveback_after_each() {
        let plan = schedule(2);
        assert_eq!(plan.len(), 12);
        for kind in [EventKind::Kill, EventKind::Hang, EventKind::Takeover] {
            assert_eq!(plan.iter().filter(|k| **k == kind).count(), 2);
        }
        for pair in plan.chunks(2) {
            assert_ne!(pair[0], EventKind::Giveback);
            assert_eq!(pair[1], EventKind::Giveback);
        }
    }

    fn move_line(event: &str, detected_ms: u64, timeline: &str) -> EventLine {
        EventLine::parse(&format!(
            r#"{{"time_unix_ms":{detected_ms},"event":"{event}","node":"a","from":"a","to":"b","planned":false,"reason":"","epoch":1,"detected_unix_ms":{detected_ms},"timeline_ms":{timeline},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}}"#
        ))
        .unwrap()
    }

    #[test]
    fn the_unserved_time_comes_from_hostds_timeline() {
        let events = [
            move_line("takeover", 1_000, r#"{"serving":5.0}"#),
            move_line("takeover", 2_000, r#"{"fenced":1.0,"serving":30.0}"#),
        ];
        // The kill came 20 ms before hostd detected it.
        let moved = last_move(&events, "a", 1_980_000);
        assert_eq!(moved.as_ref().map(|m| m.detected_unix_ms), Some(2_000));
        let now = Instant::now();
        let mut event = Injected {
            kind: EventKind::Kill,
            at: now,
            at_unix_us: 1_980_000,
            settled: now,
            detail: String::new(),
            moved,
        };
        assert_eq!(event.unserved_ms(), Some(50.0));
        assert!(last_move(&events, "a", 2_500_000).is_none());
        assert!(last_move(&events, "b", 0).is_none());

        let giveback = move_line(
            "giveback",
            3_000,
            r#"{"restarted":4000.0,"released":4100.0,"serving":4150.0}"#,
        );
        event.kind = EventKind::Giveback;
        event.moved = last_move(&[giveback], "a", 3_000_000);
        assert_eq!(event.unserved_ms(), Some(150.0));
    }
}
