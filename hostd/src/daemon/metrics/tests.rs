//! What the metrics count and how they read as Prometheus text.

use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use shm::node::{NodeStats, ServiceCounters};
use wire::control::{MoveReport, NodeState, Timeline};
use wire::events::Event;

use super::*;

fn scrape(metrics: &Metrics) -> String {
    let mut text = String::new();
    prometheus_text::encode(&mut text, &metrics.registry()).unwrap();
    text
}

/// The value of the sample `name{labels}` (labels as the text has them), if present.
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn report(planned: bool, serving_ms: f64) -> MoveReport {
    MoveReport {
        node: "a".into(),
        from: "a".into(),
        to: "b".into(),
        planned,
        reason: "QEMU exited (signal 9)".into(),
        epoch: 2,
        detected_unix_ms: 1,
        timeline_ms: Timeline {
            serving: Some(serving_ms),
            ..Timeline::default()
        },
        replayed_records: if planned { 0 } else { 16 },
        replayed_first_seq: 1,
        replayed_last_seq: 16,
        replay_complete: true,
    }
}

#[test]
fn moves_are_counted_by_kind_and_cause_and_timed() {
    let metrics = Metrics::default();
    let facts = MoveFacts {
        cause: Some(MoveCause::ProcessExited),
        replay_log_bytes: Some(4096),
    };
    metrics.observe(&Event::Takeover(report(false, 30.0)), &facts);
    metrics.observe(&Event::Takeover(report(true, 700.0)), &MoveFacts::default());
    metrics.observe(
        &Event::Giveback(report(true, 4000.0)),
        &MoveFacts::default(),
    );
    let text = scrape(&metrics);
    let moves = |kind: &str, cause: &str| {
        value(
            &text,
            &format!("ivha_takeovers_total{{identity=\"a\",kind=\"{kind}\",cause=\"{cause}\"}}"),
        )
    };
    assert_eq!(moves("unplanned", "process_exited"), Some(1.0), "{text}");
    assert_eq!(moves("planned", "operator"), Some(1.0), "{text}");
    assert_eq!(moves("giveback", "operator"), Some(1.0), "{text}");
    let bucket = |kind: &str, le: &str| {
        value(
            &text,
            &format!(
                "ivha_takeover_duration_seconds_bucket{{identity=\"a\",kind=\"{kind}\",le=\"{le}\"}}"
            ),
        )
    };
    assert_eq!(bucket("unplanned", "0.025"), Some(0.0), "{text}");
    assert_eq!(bucket("unplanned", "0.05"), Some(1.0), "{text}");
    assert_eq!(bucket("giveback", "2.5"), Some(0.0), "{text}");
    assert_eq!(bucket("giveback", "5"), Some(1.0), "{text}");
    assert_eq!(
        value(
            &text,
            "ivha_takeover_duration_seconds_sum{identity=\"a\",kind=\"unplanned\"}"
        ),
        Some(0.03)
    );
    // Only the unplanned move replayed.
    assert_eq!(
        value(&text, "ivha_replay_records_total{identity=\"a\"}"),
        Some(16.0)
    );
    assert_eq!(
        value(&text, "ivha_replay_log_bytes_total{identity=\"a\"}"),
        Some(4096.0)
    );
}

#[test]
fn replays_fences_failures_and_restarts_are_counted() {
    let metrics = Metrics::default();
    let none = MoveFacts::default();
    metrics.observe(
        &Event::Replayed {
            node: "a".into(),
            by: "b".into(),
            from: "a".into(),
            epoch: 2,
            after_ms: 120.0,
            first_seq: 1,
            last_seq: 16,
            complete: true,
        },
        &none,
    );
    metrics.observe(
        &Event::MoveFailed {
            node: "a".into(),
            to: "b".into(),
            reason: "r".into(),
            error: "e".into(),
        },
        &none,
    );
    metrics.observe(
        &Event::NodeRestarted {
            node: "b".into(),
            attempt: 1,
            reason: "r".into(),
        },
        &none,
    );
    metrics.fenced("a", true);
    metrics.fenced("a", false);
    let text = scrape(&metrics);
    for (sample, expected) in [
        (
            "ivha_replays_total{identity=\"a\",result=\"complete\"}",
            1.0,
        ),
        ("ivha_replay_finished_seconds_count{identity=\"a\"}", 1.0),
        ("ivha_replay_finished_seconds_sum{identity=\"a\"}", 0.12),
        ("ivha_move_failures_total{identity=\"a\"}", 1.0),
        ("ivha_node_restarts_total{node=\"b\"}", 1.0),
        ("ivha_fences_total{node=\"a\",result=\"done\"}", 1.0),
        ("ivha_fences_total{node=\"a\",result=\"failed\"}", 1.0),
    ] {
        assert_eq!(value(&text, sample), Some(expected), "{sample} in\n{text}");
    }
}

fn node(name: &str, state: NodeState) -> NodeFigures {
    NodeFigures {
        node: name.into(),
        state,
        heartbeat_age: Some(Duration::from_millis(250)),
        log: Some(LogFigures {
            head_seq: 20,
            flushed_seq: 4,
            unflushed_bytes: 65536,
        }),
        synced_seq: Some(3),
        capacity_bytes: 1 << 20,
        stats: NodeStats {
            backpressure_waits: 7,
            backpressure_wait_ns: 1_500_000_000,
            log_full_since_unix_ns: 0,
        },
        service: Some(ServiceCounters {
            nbd_connections: 2,
            nbd_refused: 5,
            nbd_idle_closed: 1,
            writes_waiting: 3,
        }),
    }
}

#[test]
fn node_figures_read_as_one_sample_per_node() {
    let metrics = Metrics::default();
    metrics.replace_figures(ClusterFigures {
        epoch: 3,
        nodes: vec![node("a", NodeState::Fenced), node("b", NodeState::Up)],
        served_by: vec![("a".into(), "b".into()), ("b".into(), "b".into())],
    });
    let text = scrape(&metrics);
    for (sample, expected) in [
        ("ivha_node_state{node=\"a\",state=\"fenced\"}", 1.0),
        ("ivha_node_state{node=\"a\",state=\"up\"}", 0.0),
        ("ivha_node_state{node=\"b\",state=\"up\"}", 1.0),
        ("ivha_heartbeat_age_seconds{node=\"b\"}", 0.25),
        ("ivha_log_head_seq{node=\"b\"}", 20.0),
        ("ivha_log_flushed_seq{node=\"b\"}", 4.0),
        ("ivha_log_synced_seq{node=\"b\"}", 3.0),
        ("ivha_log_unflushed_bytes{node=\"b\"}", 65536.0),
        ("ivha_log_capacity_bytes{node=\"b\"}", 1048576.0),
        ("ivha_log_backpressure_waits_total{node=\"b\"}", 7.0),
        ("ivha_log_backpressure_wait_seconds_total{node=\"b\"}", 1.5),
        ("ivha_log_writes_waiting{node=\"b\"}", 3.0),
        ("ivha_nbd_connections{node=\"b\"}", 2.0),
        ("ivha_nbd_refused_total{node=\"b\"}", 5.0),
        ("ivha_nbd_idle_closed_total{node=\"b\"}", 1.0),
        // A fenced agent has no connections, but what it counted stays counted.
        ("ivha_nbd_connections{node=\"a\"}", 0.0),
        ("ivha_log_writes_waiting{node=\"a\"}", 0.0),
        ("ivha_nbd_refused_total{node=\"a\"}", 5.0),
        ("ivha_identity_served_by{identity=\"a\",node=\"b\"}", 1.0),
        ("ivha_epoch", 3.0),
    ] {
        assert_eq!(value(&text, sample), Some(expected), "{sample} in\n{text}");
    }
    // Each node is in exactly one state.
    let states: f64 = text
        .lines()
        .filter(|l| l.starts_with("ivha_node_state{node=\"a\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(states, 1.0);
}

#[test]
fn every_family_has_help_and_type_even_before_any_figures() {
    let text = scrape(&Metrics::default());
    for family in [
        "ivha_node_state",
        "ivha_heartbeat_age_seconds",
        "ivha_epoch",
    ] {
        assert!(text.contains(&format!("# TYPE {family} gauge\n")), "{text}");
        assert!(text.contains(&format!("# HELP {family} ")), "{text}");
    }
}

#[test]
fn a_cause_is_named_by_the_monitor_s_verdict() {
    use heartbeat::{DownReason, Health, Silence, SilenceCause};
    let silence = |cause| Silence {
        silent: Duration::from_secs(1),
        mean: Duration::from_millis(100),
        std_dev: Duration::from_millis(10),
        busy_percent: None,
        cause,
    };
    for (health, cause) in [
        (
            Health::Down(DownReason::ProcessExited {
                status: "signal 9".into(),
            }),
            "process_exited",
        ),
        (Health::Down(DownReason::ProcessStopped), "process_stopped"),
        (Health::Down(DownReason::GuestPanicked), "guest_panicked"),
        (Health::Down(DownReason::Shutdown), "guest_shutdown"),
        (
            Health::Down(DownReason::HeartbeatTimeout),
            "heartbeat_timeout",
        ),
        (
            Health::Down(DownReason::HeartbeatSilent(silence(SilenceCause::Phi))),
            "heartbeat_silent",
        ),
        (
            Health::Down(DownReason::HeartbeatSilent(silence(SilenceCause::Busy))),
            "hung",
        ),
        (Health::Up, "unknown"),
    ] {
        assert_eq!(MoveCause::of(&health).as_str(), cause, "{health:?}");
    }
}
