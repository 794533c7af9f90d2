//! One identity move as phases: what happened from the fault to the replay's end.

use plotters::style::RGBColor;
use wire::control::MoveReport;

use crate::style;

/// What kind of move a row shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// An identity moved away from its holder; `planned` when an operator asked for it.
    Takeover { planned: bool },
    /// An identity went back to its home node.
    Giveback,
}

/// A phase of a move; each one ends when hostd recorded its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// From the fault (when known) until hostd judged the node failed.
    Detect,
    /// A giveback booted the returning node.
    Restart,
    /// A planned move: the holder stopped writing and flushed its log.
    Release,
    /// The failed node was killed and reaped.
    Fence,
    /// The taker replayed the log before it acknowledged (hostd before background replay).
    Replay,
    /// The taker scanned the failed node's log and acknowledged.
    Scan,
    /// The identity's address moved to the taker; it serves from the end of this phase.
    Serve,
    /// The taker, already serving, put the log on the disk.
    BackgroundReplay,
}

impl Phase {
    /// Every phase, in the order a move takes them.
    pub const ALL: [Phase; 8] = [
        Phase::Detect,
        Phase::Restart,
        Phase::Release,
        Phase::Fence,
        Phase::Replay,
        Phase::Scan,
        Phase::Serve,
        Phase::BackgroundReplay,
    ];

    /// The phase's name in legends.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Detect => "detect",
            Phase::Restart => "restart",
            Phase::Release => "release",
            Phase::Fence => "fence",
            Phase::Replay => "replay",
            Phase::Scan => "scan log",
            Phase::Serve => "move address",
            Phase::BackgroundReplay => "replay (serving meanwhile)",
        }
    }

    /// The phase a timeline step (see [`wire::control::Timeline::steps`]) ends.
    fn ended_by(step: &str) -> Option<Phase> {
        match step {
            "restarted" => Some(Phase::Restart),
            "released" => Some(Phase::Release),
            "fenced" => Some(Phase::Fence),
            "replayed" => Some(Phase::Replay),
            "scanned" => Some(Phase::Scan),
            "serving" => Some(Phase::Serve),
            _ => None,
        }
    }

    /// Whether clients wait for this phase (everything up to serving).
    pub fn clients_wait(self) -> bool {
        self != Phase::BackgroundReplay
    }

    pub(crate) fn color(self) -> RGBColor {
        match self {
            Phase::Detect => style::GREY,
            Phase::Restart => style::PURPLE,
            Phase::Release => style::SKY_BLUE,
            Phase::Fence => style::VERMILLION,
            Phase::Replay => style::ORANGE,
            Phase::Scan => style::GREEN,
            Phase::Serve => style::BLUE,
            Phase::BackgroundReplay => style::YELLOW,
        }
    }
}

/// A phase on a row, in milliseconds after detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseSpan {
    pub phase: Phase,
    pub start_ms: f64,
    pub end_ms: f64,
}

/// A moment on a row that is not a phase, such as a client's first good read.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMark {
    pub label: String,
    /// Milliseconds after detection.
    pub at_ms: f64,
}

/// One move: a row of the timeline figure.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveRow {
    /// The row's label (callers usually put a time or a trial number in front).
    pub label: String,
    pub kind: MoveKind,
    /// The identity that moved, the node that held it and the node that serves it now.
    pub identity: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// When the move started (failure detected, or command received).
    pub detected_unix_ms: u64,
    /// Phases in the order they happened.
    pub phases: Vec<PhaseSpan>,
    pub marks: Vec<RowMark>,
}

impl MoveRow {
    /// The row of a move hostd reported; its phases come from the report's timeline.
    pub fn from_report(report: &MoveReport, kind: MoveKind) -> Self {
        let mut steps: Vec<(&str, f64)> = report.timeline_ms.steps().collect();
        // Steps of one millisecond keep the order a move takes them (a stable sort).
        steps.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut phases = Vec::new();
        let mut previous = 0.0_f64;
        for (step, at) in steps {
            if let Some(phase) = Phase::ended_by(step) {
                phases.push(PhaseSpan {
                    phase,
                    start_ms: previous,
                    end_ms: at.max(previous),
                });
                previous = at.max(previous);
            }
        }
        let moved = if report.from.is_empty() || report.from == report.node {
            report.node.clone()
        } else {
            format!("{} (held by {})", report.node, report.from)
        };
        let label = match kind {
            MoveKind::Takeover { planned: false } => format!("takeover {moved} → {}", report.to),
            MoveKind::Takeover { planned: true } => {
                format!("planned takeover {moved} → {}", report.to)
            }
            MoveKind::Giveback => format!("giveback {} → {}", report.from, report.node),
        };
        let mut row = MoveRow {
            label,
            kind,
            identity: report.node.clone(),
            from: report.from.clone(),
            to: report.to.clone(),
            epoch: report.epoch,
            detected_unix_ms: report.detected_unix_ms,
            phases,
            marks: Vec::new(),
        };
        if !report.replay_complete {
            row.label.push_str(" (replay INCOMPLETE)");
        }
        row
    }

    /// Adds the detection phase: from a fault injected at `fault_unix_us` until the move
    /// started. A fault recorded after the detection (clocks in whole milliseconds) is
    /// taken as at the detection.
    pub fn with_fault_at(mut self, fault_unix_us: u64) -> Self {
        let before_ms = (self.detected_unix_ms as f64 - fault_unix_us as f64 / 1000.0).max(0.0);
        self.phases.retain(|span| span.phase != Phase::Detect);
        self.phases.insert(
            0,
            PhaseSpan {
                phase: Phase::Detect,
                start_ms: -before_ms,
                end_ms: 0.0,
            },
        );
        self
    }

    /// Adds the background replay, which ended `after_ms` after detection.
    pub fn with_background_replay(mut self, after_ms: f64) -> Self {
        let start = self.serving_ms().unwrap_or(0.0);
        self.phases
            .retain(|span| span.phase != Phase::BackgroundReplay);
        self.phases.push(PhaseSpan {
            phase: Phase::BackgroundReplay,
            start_ms: start,
            end_ms: after_ms.max(start),
        });
        self
    }

    /// Adds a mark at `at_ms` after detection.
    pub fn with_mark(mut self, label: impl Into<String>, at_ms: f64) -> Self {
        self.marks.push(RowMark {
            label: label.into(),
            at_ms,
        });
        self
    }

    /// When the identity was served again, in ms after detection.
    pub fn serving_ms(&self) -> Option<f64> {
        self.phases
            .iter()
            .find(|span| span.phase == Phase::Serve)
            .map(|span| span.end_ms)
    }

    /// The end of the last phase clients wait for, in ms after detection.
    pub fn clients_wait_until_ms(&self) -> f64 {
        self.phases
            .iter()
            .filter(|span| span.phase.clients_wait())
            .map(|span| span.end_ms)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::control::Timeline;

    fn report() -> MoveReport {
        MoveReport {
            node: "a".into(),
            from: "a".into(),
            to: "b".into(),
            planned: false,
            reason: "QEMU exited".into(),
            epoch: 2,
            detected_unix_ms: 10_000,
            timeline_ms: Timeline {
                fenced: Some(0.7),
                scanned: Some(9.6),
                serving: Some(11.5),
                ..Timeline::default()
            },
            replayed_records: 64,
            replayed_first_seq: 1,
            replayed_last_seq: 64,
            replay_complete: true,
        }
    }

    #[test]
    fn phases_follow_the_steps_from_detection() {
        let row = MoveRow::from_report(&report(), MoveKind::Takeover { planned: false })
            .with_fault_at(9_985_500)
            .with_background_replay(820.0)
            .with_mark("first read", 30.0);
        let phases: Vec<(Phase, f64, f64)> = row
            .phases
            .iter()
            .map(|s| (s.phase, s.start_ms, s.end_ms))
            .collect();
        assert_eq!(
            phases,
            [
                (Phase::Detect, -14.5, 0.0),
                (Phase::Fence, 0.0, 0.7),
                (Phase::Scan, 0.7, 9.6),
                (Phase::Serve, 9.6, 11.5),
                (Phase::BackgroundReplay, 11.5, 820.0),
            ]
        );
        assert_eq!(row.label, "takeover a → b");
        assert_eq!(row.serving_ms(), Some(11.5));
        assert_eq!(row.clients_wait_until_ms(), 11.5);
    }

    #[test]
    fn givebacks_and_incomplete_replays_say_so() {
        let giveback = MoveReport {
            from: "b".into(),
            to: "a".into(),
            planned: true,
            timeline_ms: Timeline {
                restarted: Some(4100.0),
                released: Some(4130.0),
                serving: Some(4160.0),
                ..Timeline::default()
            },
            replay_complete: false,
            ..report()
        };
        let row = MoveRow::from_report(&giveback, MoveKind::Giveback);
        assert_eq!(row.label, "giveback b → a (replay INCOMPLETE)");
        let names: Vec<&str> = row.phases.iter().map(|s| s.phase.name()).collect();
        assert_eq!(names, ["restart", "release", "move address"]);
        // A fault stamped after the detection counts as at it.
        let row = row.with_fault_at(10_000_400);
        assert_eq!(row.phases[0].start_ms, 0.0);
    }
}
