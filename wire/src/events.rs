//! hostd's structured events: one JSON object per line in `STATE_DIR/events.jsonl`.
//!
//! Every state transition hostd observes is recorded, with a wall-clock time, so operators
//! and tools (`hostd events`, the fault campaign's checker, the takeover measurement) can
//! reconstruct what happened without parsing logs. hostd writes [`EventLine`]s and every
//! reader parses them back into the same types: a renamed field is a parse error, not a
//! silently missing value.

use serde::{Deserialize, Serialize};

use crate::control::{MoveReport, NodeState};

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The daemon launched the pair.
    PairStarting { accel: String, accel_reason: String },
    /// A node's state changed.
    NodeState {
        node: String,
        from: NodeState,
        to: NodeState,
        /// What hostd saw: e.g. the QEMU exit status, or the heartbeat counter.
        detail: String,
    },
    /// A node's identity moved to another node (a takeover).
    Takeover(MoveReport),
    /// A node took its identity back.
    Giveback(MoveReport),
    /// A takeover or giveback could not be completed.
    MoveFailed {
        node: String,
        to: String,
        reason: String,
        error: String,
    },
    /// hostd injected a fault (`hostd kill`).
    FaultInjected { node: String, signal: String },
    /// Node `node` may serve identity `identity` from now on. Recorded before the node is
    /// told to, so the time is a lower bound of when it starts.
    ServingStarted {
        identity: String,
        node: String,
        epoch: u64,
    },
    /// Node `node` no longer serves identity `identity`: it was fenced (killed and reaped),
    /// released the identity, or stopped. Recorded once that is certain, so the time is an
    /// upper bound of when it stopped.
    ServingEnded {
        identity: String,
        node: String,
        reason: String,
    },
    /// The replay that began with a takeover has finished: the dead holder's records are
    /// on the disk and synced, and the taker no longer reads them from the dead node's
    /// region (it served them from there since the takeover).
    Replayed {
        /// The identity taken over.
        node: String,
        /// The node that took it over and replayed.
        by: String,
        /// The dead node whose log was replayed.
        from: String,
        epoch: u64,
        /// Milliseconds from the failure's detection (as in the takeover's timeline).
        after_ms: f64,
        first_seq: u64,
        last_seq: u64,
        /// False when the replay stopped at a bad record (see the taker's console).
        complete: bool,
    },
    /// hostd restarted a fenced node by itself: no live node could serve an identity.
    NodeRestarted {
        node: String,
        /// The restart's number within the configured window.
        attempt: u32,
        reason: String,
    },
    /// hostd stopped restarting a node by itself: it reached the configured limit.
    /// `hostd giveback NODE` restarts it and resets the count.
    RestartsExhausted { node: String, restarts: u32 },
    /// A restarted hostd found the pair running and adopted it instead of launching one:
    /// each node with what was found.
    PairAdopted { nodes: Vec<(String, String)> },
    /// The pair was stopped: each node with how it ended.
    PairStopped { stopped: Vec<(String, String)> },
    /// The storage daemon was started (or, `adopted`, found running by a restarted hostd).
    StorageStarted { pid: u32, adopted: bool },
    /// Node `node` registered its key on disk `disk` and may write it (at its start, or
    /// after `hostd unfence`); `holder`: the node holding the disk's reservation.
    DiskRegistered {
        disk: String,
        node: String,
        generation: u64,
        holder: Option<String>,
    },
    /// `by` removed node `node`'s key from disk `disk` (preempt and abort): `node`'s writes
    /// to it fail from now on. `reason`: the fence it was part of.
    DiskPreempted {
        disk: String,
        node: String,
        by: String,
        holder: Option<String>,
        reason: String,
    },
    /// Node `node`'s agent saw its interconnect link `link` to `peer` change state (as
    /// published in its region; hostd reads it each tick). `reachable`: whether any link
    /// to that peer is still up.
    InterconnectLink {
        node: String,
        peer: String,
        link: u16,
        state: crate::control::LinkState,
        reachable: bool,
    },
    /// hostd adopted an owner the coordinator had newer than the control region: a claim
    /// an agent won while hostd was away (or a move of an earlier hostd's that it did not
    /// finish writing). The control region names `by` owner of identity `node` at
    /// `generation` from now on.
    ClaimAdopted {
        /// The identity.
        node: String,
        /// Its owner now.
        by: String,
        /// The node it was claimed from (the claim's victim, else the former owner).
        from: String,
        generation: u64,
        /// Whether `by` published the claim in its region (an agent's claim); false: the
        /// coordinator's record alone.
        published: bool,
    },
    /// The coordinator says node `node` is no member since `generation`: `by` claimed
    /// what it held while hostd was away. hostd fenced it (if it still ran) and restarts
    /// it as a standby.
    MembershipLost {
        node: String,
        by: Option<String>,
        generation: u64,
    },
}

impl Event {
    /// The event's `node` field: the node whose state changed or that was hurt, the
    /// identity that moved, the node that starts or stops serving. None for pair-wide
    /// events.
    pub fn node(&self) -> Option<&str> {
        match self {
            Event::NodeState { node, .. }
            | Event::MoveFailed { node, .. }
            | Event::FaultInjected { node, .. }
            | Event::ServingStarted { node, .. }
            | Event::ServingEnded { node, .. }
            | Event::NodeRestarted { node, .. }
            | Event::RestartsExhausted { node, .. }
            | Event::DiskRegistered { node, .. }
            | Event::DiskPreempted { node, .. }
            | Event::InterconnectLink { node, .. }
            | Event::ClaimAdopted { node, .. }
            | Event::MembershipLost { node, .. }
            | Event::Replayed { node, .. } => Some(node),
            Event::Takeover(report) | Event::Giveback(report) => Some(&report.node),
            Event::PairStarting { .. }
            | Event::PairAdopted { .. }
            | Event::PairStopped { .. }
            | Event::StorageStarted { .. } => None,
        }
    }
}

/// One line of `events.jsonl`: an event and when hostd recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLine {
    pub time_unix_ms: u64,
    /// The same time in microseconds, for tools that order events against client
    /// operations (the fault campaign's checker). Absent in logs of early versions.
    #[serde(default)]
    pub time_unix_us: u64,
    #[serde(flatten)]
    pub event: Event,
}

impl EventLine {
    /// An event recorded at `time_unix_us`.
    pub fn new(event: Event, time_unix_us: u64) -> Self {
        Self {
            time_unix_ms: time_unix_us / 1000,
            time_unix_us,
            event,
        }
    }

    /// When the event was recorded, in microseconds since the epoch.
    pub fn time_us(&self) -> u64 {
        if self.time_unix_us == 0 {
            // A line's milliseconds are untrusted: far-future ones saturate, not overflow.
            self.time_unix_ms.saturating_mul(1000)
        } else {
            self.time_unix_us
        }
    }

    /// Parses one line of `events.jsonl`.
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// The line as `events.jsonl` holds it (without the newline).
    pub fn to_json(&self) -> String {
        // A derived Serialize of strings, numbers and lists cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A line of an event log that is not an event this version knows, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub number: usize,
    pub text: String,
    pub error: String,
}

/// Parses a whole event log; lines that are not events are returned apart, in order.
pub fn parse_log(text: &str) -> (Vec<EventLine>, Vec<BadLine>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match EventLine::parse(line) {
            Ok(event) => events.push(event),
            Err(error) => bad.push(BadLine {
                number: index + 1,
                text: line.to_owned(),
                error: error.to_string(),
            }),
        }
    }
    (events, bad)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::control::Timeline;

    fn report() -> MoveReport {
        MoveReport {
            node: "a".into(),
            from: "a".into(),
            to: "b".into(),
            planned: false,
            reason: "QEMU exited".into(),
            epoch: 2,
            detected_unix_ms: 1000,
            timeline_ms: Timeline {
                fenced: Some(1.5),
                serving: Some(20.25),
                ..Timeline::default()
            },
            replayed_records: 3,
            replayed_first_seq: 1,
            replayed_last_seq: 3,
            replay_complete: true,
        }
    }

    #[test]
    fn every_event_round_trips_through_its_line() {
        let events = [
            Event::PairStarting {
                accel: "tcg".into(),
                accel_reason: "no vmx".into(),
            },
            Event::NodeState {
                node: "a".into(),
                from: NodeState::Booting,
                to: NodeState::Up,
                detail: "heartbeat 1".into(),
            },
            Event::Takeover(report()),
            Event::Giveback(MoveReport {
                planned: true,
                ..report()
            }),
            Event::MoveFailed {
                node: "a".into(),
                to: "b".into(),
                reason: "r".into(),
                error: "e".into(),
            },
            Event::FaultInjected {
                node: "a".into(),
                signal: "kill".into(),
            },
            Event::ServingStarted {
                identity: "a".into(),
                node: "b".into(),
                epoch: 2,
            },
            Event::ServingEnded {
                identity: "a".into(),
                node: "a".into(),
                reason: "fenced".into(),
            },
            Event::PairAdopted {
                nodes: vec![("a".into(), "adopted".into())],
            },
            Event::NodeRestarted {
                node: "b".into(),
                attempt: 2,
                reason: "no live node".into(),
            },
            Event::RestartsExhausted {
                node: "b".into(),
                restarts: 5,
            },
            Event::PairStopped {
                stopped: vec![("a".into(), "quit cleanly".into())],
            },
            Event::StorageStarted {
                pid: 42,
                adopted: false,
            },
            Event::DiskRegistered {
                disk: "a".into(),
                node: "b".into(),
                generation: 3,
                holder: Some("a".into()),
            },
            Event::DiskPreempted {
                disk: "a".into(),
                node: "a".into(),
                by: "b".into(),
                holder: Some("b".into()),
                reason: "fenced: its QEMU exited".into(),
            },
            Event::InterconnectLink {
                node: "a".into(),
                peer: "b".into(),
                link: 1,
                state: crate::control::LinkState::Down,
                reachable: true,
            },
            Event::ClaimAdopted {
                node: "a".into(),
                by: "b".into(),
                from: "a".into(),
                generation: 3,
                published: true,
            },
            Event::MembershipLost {
                node: "a".into(),
                by: Some("b".into()),
                generation: 3,
            },
        ];
        for (n, event) in events.into_iter().enumerate() {
            let line = EventLine::new(event, 1_700_000_000_123_456 + n as u64);
            let text = line.to_json();
            assert_eq!(EventLine::parse(&text).unwrap(), line, "{text}");
        }
    }

    #[test]
    fn the_format_is_flat_json_with_the_kind_in_event() {
        let line = EventLine::new(Event::Takeover(report()), 2_000_000);
        let value: serde_json::Value = serde_json::from_str(&line.to_json()).unwrap();
        assert_eq!(value["event"], "takeover");
        assert_eq!(value["time_unix_ms"], 2000);
        assert_eq!(value["timeline_ms"]["serving"], 20.25);
        assert_eq!(value["planned"], false);
    }

    #[test]
    fn renamed_fields_and_unknown_kinds_are_reported_not_dropped() {
        let text = concat!(
            r#"{"time_unix_ms":1,"event":"serving_started","identity":"a","node":"b","epoch":1}"#,
            "\n",
            r#"{"time_unix_ms":2,"event":"serving_started","ident":"a","node":"b","epoch":1}"#,
            "\n\n",
            r#"{"time_unix_ms":3,"event":"from_the_future"}"#,
            "\nnot json\n"
        );
        let (events, bad) = parse_log(text);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].time_us(), 1000, "ms only: early logs");
        let numbers: Vec<usize> = bad.iter().map(|b| b.number).collect();
        assert_eq!(numbers, [2, 4, 5]);
        assert!(bad[0].error.contains("identity"), "{}", bad[0].error);
    }

    #[test]
    fn time_us_of_huge_milliseconds_saturates_instead_of_overflowing() {
        // Found by fuzzing (fuzz target events): an early-format line (no time_unix_us) whose
        // milliseconds times 1000 overflow u64 panicked in time_us.
        let line = br#"{"time_unix_ms":18446744073709552,"event":"pair_stopped","stopped":[]}"#;
        let line = EventLine::parse(std::str::from_utf8(line).unwrap()).unwrap();
        assert_eq!(line.time_us(), u64::MAX);
    }

    #[test]
    fn timeline_floats_read_back_exactly() {
        // Found by fuzzing (fuzz target events): a timeline value read from a line, written
        // again with to_json and read back came out one unit in the last place off (serde_json
        // parses floats exactly only with its float_roundtrip feature).
        let line = concat!(
            r#"{"time_unix_ms":1,"time_unix_us":1000,"event":"takeover","node":"a","from":"a","#,
            r#""to":"b","planned":false,"reason":"r","epoch":2,"detected_unix_ms":1,"#,
            r#""timeline_ms":{"fenced":1.66666666666666666666666666,"serving":20.25},"#,
            r#""replayed_records":1,"replayed_first_seq":1,"replayed_last_seq":1,"replay_complete":true}"#
        );
        let first = EventLine::parse(line).unwrap();
        let again = EventLine::parse(&first.to_json()).unwrap();
        assert_eq!(again, first);
        let Event::Takeover(report) = &again.event else {
            panic!("{again:?}")
        };
        assert_eq!(report.timeline_ms.fenced, Some(5.0 / 3.0));
    }

    #[test]
    fn the_node_field_is_what_the_json_calls_node() {
        let started = Event::ServingStarted {
            identity: "a".into(),
            node: "b".into(),
            epoch: 2,
        };
        let value: serde_json::Value =
            serde_json::from_str(&EventLine::new(started.clone(), 1).to_json()).unwrap();
        assert_eq!(started.node(), value["node"].as_str());
        let moved = Event::Takeover(report());
        let value: serde_json::Value =
            serde_json::from_str(&EventLine::new(moved.clone(), 1).to_json()).unwrap();
        assert_eq!(moved.node(), value["node"].as_str());
        let starting = Event::PairStarting {
            accel: "tcg".into(),
            accel_reason: String::new(),
        };
        assert_eq!(starting.node(), None);
    }
}
