//! The figures hostd reads from its nodes and their regions every 100 ms (state,
//! heartbeat, log cursors, the agents' counters, who serves each identity), kept as one
//! snapshot that a scrape encodes.
//!
//! The daemon replaces the snapshot with `try_lock`, and a scrape only copies it under the
//! lock: the daemon never waits for a scrape (it skips one tick's figures instead).

use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use shm::node::{NodeStats, ServiceCounters};
use wire::control::NodeState;

use super::labels::{NODE_STATES, NodeLabels, NodeStateLabels, ServedByLabels};

/// The cluster as the last tick saw it.
#[derive(Debug, Clone, Default)]
pub struct ClusterFigures {
    pub epoch: u64,
    pub nodes: Vec<NodeFigures>,
    /// Each identity with the node that holds it, as (identity, node).
    pub served_by: Vec<(String, String)>,
}

/// One node.
#[derive(Debug, Clone)]
pub struct NodeFigures {
    pub node: String,
    pub state: NodeState,
    /// Since hostd last saw the heartbeat counter move; None before the first beat.
    pub heartbeat_age: Option<Duration>,
    /// The log's cursors, when they could be read together.
    pub log: Option<LogFigures>,
    /// Seq up to which the disk's media holds the log.
    pub synced_seq: Option<u64>,
    /// Size of the log's ring.
    pub capacity_bytes: u64,
    pub stats: NodeStats,
    /// What the agent last published; None when unreadable.
    pub service: Option<ServiceCounters>,
}

#[derive(Debug, Clone, Copy)]
pub struct LogFigures {
    pub head_seq: u64,
    pub flushed_seq: u64,
    /// Log bytes (record headers, payloads, padding) between the flushed cursor and head.
    pub unflushed_bytes: u64,
}

impl NodeFigures {
    /// Whether the node's process runs: a dead agent's gauges (connections, waiting
    /// writes) are no longer true, its counters still are.
    fn running(&self) -> bool {
        !matches!(self.state, NodeState::Down | NodeState::Fenced)
    }

    fn labels(&self) -> NodeLabels {
        NodeLabels {
            node: self.node.clone(),
        }
    }
}

/// The latest figures, replaced by the daemon and read by scrapes.
#[derive(Debug, Clone, Default)]
pub struct LatestFigures(Arc<Mutex<ClusterFigures>>);

impl LatestFigures {
    /// Replaces the figures, unless a scrape is copying them right now: the next tick
    /// replaces them then.
    pub fn replace(&self, figures: ClusterFigures) {
        match self.0.try_lock() {
            Ok(mut latest) => *latest = figures,
            Err(TryLockError::Poisoned(poisoned)) => *poisoned.into_inner() = figures,
            Err(TryLockError::WouldBlock) => {}
        }
    }

    fn copy(&self) -> ClusterFigures {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

static SECONDS: Unit = Unit::Seconds;
static BYTES: Unit = Unit::Bytes;

impl Collector for LatestFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = self.copy();
        let nodes = &figures.nodes;
        let (gauge, counter) = (MetricType::Gauge, MetricType::Counter);
        // One sample per node that has the value.
        let gauges = |value: fn(&NodeFigures) -> Option<u64>| {
            nodes
                .iter()
                .filter_map(move |n| Some((n.labels(), ConstGauge::new(value(n)?))))
        };
        let counters = |value: fn(&NodeFigures) -> Option<u64>| {
            nodes
                .iter()
                .filter_map(move |n| Some((n.labels(), ConstCounter::new(value(n)?))))
        };
        family(
            &mut encoder,
            (
                "node_state",
                "1 for the state the node is in, 0 for the others",
                None,
                gauge,
            ),
            nodes.iter().flat_map(|n| {
                NODE_STATES.iter().map(|&state| {
                    let labels = NodeStateLabels {
                        node: n.node.clone(),
                        state: state.as_str(),
                    };
                    (labels, ConstGauge::new(i64::from(n.state == state)))
                })
            }),
        )?;
        family(
            &mut encoder,
            (
                "heartbeat_age",
                "Time since hostd last saw the node's heartbeat counter move (absent before the first beat)",
                Some(&SECONDS),
                gauge,
            ),
            nodes.iter().filter_map(|n| {
                let age = n.heartbeat_age?;
                Some((n.labels(), ConstGauge::new(age.as_secs_f64())))
            }),
        )?;
        family(
            &mut encoder,
            (
                "log_head_seq",
                "Seq of the last record in the node's log",
                None,
                gauge,
            ),
            gauges(|n| Some(n.log?.head_seq)),
        )?;
        family(
            &mut encoder,
            (
                "log_flushed_seq",
                "Seq of the last record the node's flusher applied to its disk",
                None,
                gauge,
            ),
            gauges(|n| Some(n.log?.flushed_seq)),
        )?;
        family(
            &mut encoder,
            (
                "log_synced_seq",
                "Seq up to which the node's disk media is known to hold its log (0: never synced)",
                None,
                gauge,
            ),
            gauges(|n| n.synced_seq),
        )?;
        family(
            &mut encoder,
            (
                "log_unflushed",
                "Log bytes (record headers, payloads, padding) between the flushed cursor and the head",
                Some(&BYTES),
                gauge,
            ),
            gauges(|n| Some(n.log?.unflushed_bytes)),
        )?;
        family(
            &mut encoder,
            (
                "log_capacity",
                "Size of the node's log ring",
                Some(&BYTES),
                gauge,
            ),
            gauges(|n| Some(n.capacity_bytes)),
        )?;
        family(
            &mut encoder,
            (
                "log_backpressure_waits",
                "Appends that found the node's log full and waited for its flusher",
                None,
                counter,
            ),
            counters(|n| Some(n.stats.backpressure_waits)),
        )?;
        family(
            &mut encoder,
            (
                "log_backpressure_wait",
                "Time appends spent waiting for room in the node's log",
                Some(&SECONDS),
                counter,
            ),
            nodes.iter().map(|n| {
                let seconds = Duration::from_nanos(n.stats.backpressure_wait_ns).as_secs_f64();
                (n.labels(), ConstCounter::new(seconds))
            }),
        )?;
        // What the agent does now: nothing once its process is gone.
        family(
            &mut encoder,
            (
                "log_writes_waiting",
                "Writes waiting now to get into the node's log (it is full)",
                None,
                gauge,
            ),
            gauges(|n| Some(n.service?.writes_waiting * u64::from(n.running()))),
        )?;
        family(
            &mut encoder,
            (
                "nbd_connections",
                "NBD connections the node's agent has open now",
                None,
                gauge,
            ),
            gauges(|n| Some(n.service?.nbd_connections * u64::from(n.running()))),
        )?;
        // Counted since the agent started: a restarted agent counts from zero again.
        family(
            &mut encoder,
            (
                "nbd_refused",
                "NBD connections the node's agent refused (over a connection limit)",
                None,
                counter,
            ),
            counters(|n| Some(n.service?.nbd_refused)),
        )?;
        family(
            &mut encoder,
            (
                "nbd_idle_closed",
                "NBD connections the node's agent closed for idling",
                None,
                counter,
            ),
            counters(|n| Some(n.service?.nbd_idle_closed)),
        )?;
        family(
            &mut encoder,
            (
                "identity_served_by",
                "1 for the node that holds the identity (its owner in the control region)",
                None,
                gauge,
            ),
            figures.served_by.iter().map(|(identity, node)| {
                let labels = ServedByLabels {
                    identity: identity.clone(),
                    node: node.clone(),
                };
                (labels, ConstGauge::new(1i64))
            }),
        )?;
        let epoch = encoder.encode_descriptor(
            "epoch",
            "The cluster's epoch: it grows by one with every move of an identity",
            None,
            gauge,
        )?;
        ConstGauge::new(figures.epoch).encode(epoch)
    }
}

/// A family's name (without the `ivha_` prefix, the unit and `_total`), help, unit and
/// type.
type Descriptor<'a> = (&'a str, &'a str, Option<&'a Unit>, MetricType);

/// Encodes one family: its descriptor, then one sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    (name, help, unit, kind): Descriptor,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}
