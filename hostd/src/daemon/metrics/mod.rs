//! Prometheus metrics: what hostd knows of the pair, served as text over HTTP (`[metrics]`
//! in the configuration; docs/metrics.md describes every metric).
//!
//! The daemon's loop is the only writer. It counts events as it records them (moves,
//! replays, fences, restarts) in prometheus-client's atomic metrics, and on every tick
//! replaces a snapshot of its nodes' figures ([`cluster_figures`]). The server thread
//! ([`server`]) only reads: it encodes into memory, then writes to the socket, so a slow
//! scraper never holds anything the daemon needs.
//!
//! - `labels`: label sets and the bounded values of `kind` and `cause`;
//! - `cluster_figures`: the per-tick snapshot and how it is encoded;
//! - `gather`: reads the snapshot and a move's facts from the cluster;
//! - `server`: the HTTP endpoint.

mod cluster_figures;
mod gather;
mod labels;
pub mod server;

#[cfg(test)]
mod tests;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use wire::control::MoveReport;
use wire::events::Event;

pub use cluster_figures::{ClusterFigures, LatestFigures, LogFigures, NodeFigures};
pub use gather::{move_facts, publish};
use labels::{FenceLabels, IdentityLabels, MoveKindLabels, MoveLabels, NodeLabels, ReplayLabels};
pub use labels::{MoveCause, MoveKind};

/// Bucket bounds of the duration histograms, in seconds: a takeover takes milliseconds,
/// a giveback that restarts a TCG guest seconds, a release that flushes a full log more.
const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

type DurationFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What hostd knows of a move beyond its report: why its holder went down and how many
/// log bytes the taker took over to replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveFacts {
    /// For an unplanned move: the fenced holder's monitor verdict.
    pub cause: Option<MoveCause>,
    /// For a move that replays: the bytes between the fenced holder's flushed cursor and
    /// its head, when they are exactly the records the taker scanned.
    pub replay_log_bytes: Option<u64>,
}

/// The metrics of one daemon; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics {
    takeovers: Family<MoveLabels, Counter>,
    takeover_seconds: DurationFamily<MoveKindLabels>,
    move_failures: Family<IdentityLabels, Counter>,
    replays: Family<ReplayLabels, Counter>,
    replay_seconds: DurationFamily<IdentityLabels>,
    replay_records: Family<IdentityLabels, Counter>,
    replay_log_bytes: Family<IdentityLabels, Counter>,
    fences: Family<FenceLabels, Counter>,
    restarts: Family<NodeLabels, Counter>,
    figures: LatestFigures,
    /// Where `/metrics` is served, in words for `hostd status`.
    endpoint: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            takeovers: Family::default(),
            takeover_seconds: Family::new_with_constructor(duration_histogram),
            move_failures: Family::default(),
            replays: Family::default(),
            replay_seconds: Family::new_with_constructor(duration_histogram),
            replay_records: Family::default(),
            replay_log_bytes: Family::default(),
            fences: Family::default(),
            restarts: Family::default(),
            figures: LatestFigures::default(),
            endpoint: "off".into(),
        }
    }
}

impl Metrics {
    /// A registry of these metrics, all named `ivha_...`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("ivha");
        registry.register(
            "takeovers",
            "Identity moves that completed, by kind (unplanned, planned, giveback) and cause",
            self.takeovers.clone(),
        );
        registry.register_with_unit(
            "takeover_duration",
            "Time from a move's start (failure detected, or command received) until the identity's address led to its new holder",
            Unit::Seconds,
            self.takeover_seconds.clone(),
        );
        registry.register(
            "move_failures",
            "Moves of an identity that failed or had to wait for a taker",
            self.move_failures.clone(),
        );
        registry.register(
            "replays",
            "Background replays of a fenced node's log that finished, by result (complete, or stopped at a bad record)",
            self.replays.clone(),
        );
        registry.register_with_unit(
            "replay_finished",
            "Time from a failure's detection until the taker's background replay of the failed node's log finished",
            Unit::Seconds,
            self.replay_seconds.clone(),
        );
        registry.register(
            "replay_records",
            "Records of a fenced node's log that a taker took over to replay (counted when the move completes)",
            self.replay_records.clone(),
        );
        registry.register_with_unit(
            "replay_log",
            "Log bytes (record headers, payloads, padding) of a fenced node's log that a taker took over to replay",
            Unit::Bytes,
            self.replay_log_bytes.clone(),
        );
        registry.register(
            "fences",
            "Fences of a node (killed and reaped before a takeover), by result (done, failed)",
            self.fences.clone(),
        );
        registry.register(
            "node_restarts",
            "Restarts hostd made by itself of a fenced node, when no live node could serve an identity",
            self.restarts.clone(),
        );
        registry.register_collector(Box::new(self.figures.clone()));
        registry
    }

    /// Counts what `event` says happened; `facts` completes a move's report.
    pub fn observe(&self, event: &Event, facts: &MoveFacts) {
        match event {
            Event::Takeover(report) if report.planned => {
                self.moved(MoveKind::Planned, report, facts);
            }
            Event::Takeover(report) => self.moved(MoveKind::Unplanned, report, facts),
            Event::Giveback(report) => self.moved(MoveKind::Giveback, report, facts),
            // Its `node` is the identity that did not move.
            Event::MoveFailed { node, .. } => {
                self.move_failures
                    .get_or_create(&IdentityLabels {
                        identity: node.clone(),
                    })
                    .inc();
            }
            Event::Replayed {
                node,
                after_ms,
                complete,
                ..
            } => {
                let identity = node.clone();
                self.replays
                    .get_or_create(&ReplayLabels {
                        identity: identity.clone(),
                        result: if *complete { "complete" } else { "stopped" },
                    })
                    .inc();
                self.replay_seconds
                    .get_or_create(&IdentityLabels { identity })
                    .observe(after_ms / 1e3);
            }
            Event::NodeRestarted { node, .. } => {
                self.restarts
                    .get_or_create(&NodeLabels { node: node.clone() })
                    .inc();
            }
            _ => {}
        }
    }

    fn moved(&self, kind: MoveKind, report: &MoveReport, facts: &MoveFacts) {
        let cause = match kind {
            MoveKind::Unplanned => facts.cause.unwrap_or(MoveCause::Unknown),
            MoveKind::Planned | MoveKind::Giveback => MoveCause::Operator,
        };
        let identity = report.node.clone();
        self.takeovers
            .get_or_create(&MoveLabels {
                identity: identity.clone(),
                kind: kind.as_str(),
                cause: cause.as_str(),
            })
            .inc();
        if let Some(serving_ms) = report.timeline_ms.serving {
            self.takeover_seconds
                .get_or_create(&MoveKindLabels {
                    identity: identity.clone(),
                    kind: kind.as_str(),
                })
                .observe(serving_ms / 1e3);
        }
        // A move that was not planned replays its old holder's log.
        if !report.planned {
            let labels = IdentityLabels { identity };
            self.replay_records
                .get_or_create(&labels)
                .inc_by(report.replayed_records);
            if let Some(bytes) = facts.replay_log_bytes {
                self.replay_log_bytes.get_or_create(&labels).inc_by(bytes);
            }
        }
    }

    /// Counts a fence of `node`, done or failed.
    pub fn fenced(&self, node: &str, done: bool) {
        self.fences
            .get_or_create(&FenceLabels {
                node: node.to_owned(),
                result: if done { "done" } else { "failed" },
            })
            .inc();
    }

    /// Replaces the per-tick figures (see [`LatestFigures::replace`]).
    pub fn replace_figures(&self, figures: ClusterFigures) {
        self.figures.replace(figures);
    }

    /// Where `/metrics` is served, or why it is not, for `hostd status`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn set_endpoint(&mut self, endpoint: String) {
        self.endpoint = endpoint;
    }
}
