//! Structured events: one JSON object per line in `STATE_DIR/events.jsonl`.
//!
//! Every state transition hostd observes is recorded here, with a wall-clock timestamp, so
//! operators and tools (`hostd events`, the fault campaign's checker) can reconstruct what
//! happened without parsing logs.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::protocol::MoveReport;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The daemon launched the pair.
    PairStarting { accel: String, accel_reason: String },
    /// A node's state changed (see [`crate::protocol::NodeState`]).
    NodeState {
        node: String,
        from: String,
        to: String,
        /// What hostd saw: e.g. the QEMU exit status, or the heartbeat counter.
        detail: String,
    },
    /// A node's identity moved to its partner (a takeover).
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
    /// A restarted hostd found the pair running and adopted it instead of launching one.
    PairAdopted { nodes: Vec<(String, String)> },
    /// The pair was stopped.
    PairStopped { stopped: Vec<(String, String)> },
}

/// Appends events to the log; a failure to write is logged, never fatal.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
}

#[derive(Serialize)]
struct Line<'a> {
    time_unix_ms: u64,
    /// The same time in microseconds, for tools that order events against client
    /// operations (the fault campaign's checker).
    time_unix_us: u64,
    #[serde(flatten)]
    event: &'a Event,
}

impl EventLog {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn record(&self, event: &Event) {
        let time_unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let line = Line {
            time_unix_ms: time_unix_us / 1000,
            time_unix_us,
            event,
        };
        let written = serde_json::to_string(&line)
            .map_err(std::io::Error::other)
            .and_then(|mut text| {
                text.push('\n');
                // One write per line with O_APPEND: concurrent readers never see half a line.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?
                    .write_all(text.as_bytes())
            });
        match written {
            Ok(()) => log::info!(
                "event: {}",
                serde_json::to_string(event).unwrap_or_default()
            ),
            Err(error) => log::warn!("cannot record event in {}: {error}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(&dir.path().join("events.jsonl"));
        log.record(&Event::NodeState {
            node: "a".into(),
            from: "booting".into(),
            to: "up".into(),
            detail: "heartbeat 1".into(),
        });
        log.record(&Event::PairStopped {
            stopped: vec![("a".into(), "quit cleanly".into())],
        });
        let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "node_state");
        assert_eq!(lines[0]["node"], "a");
        assert_eq!(lines[0]["to"], "up");
        let ms = lines[0]["time_unix_ms"].as_u64().unwrap();
        assert!(ms > 0);
        assert_eq!(lines[0]["time_unix_us"].as_u64().unwrap() / 1000, ms);
        assert_eq!(lines[1]["event"], "pair_stopped");
    }
}
