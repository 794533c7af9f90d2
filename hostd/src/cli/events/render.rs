//! Events as text: a line per event, and a small timeline under takeovers and givebacks.
//! Lines that are not an event this version knows (an older or newer hostd's) are shown
//! as `kind  key=value ...`, so nothing in the log is hidden.

use serde_json::Value;
use wire::control::MoveReport;
use wire::events::{Event, EventLine};

use super::zone::Zone;

/// One event as text (several lines for takeovers and givebacks, no final newline).
pub fn render_event(line: &EventLine, zone: &Zone) -> String {
    let stamp = zone.clock(i64::try_from(line.time_unix_ms).unwrap_or(i64::MAX));
    // Timeline lines are indented past the time stamp.
    let indent = " ".repeat(stamp.chars().count() + 4);
    let body = match &line.event {
        Event::NodeState {
            node,
            from,
            to,
            detail,
        } => with_note(
            format!("node {node}: {} → {}", from.as_str(), to.as_str()),
            detail,
        ),
        Event::PairStarting {
            accel,
            accel_reason,
        } => with_note(format!("pair starting  accel {accel}"), accel_reason),
        Event::PairStopped { stopped } if stopped.is_empty() => "pair stopped".to_owned(),
        Event::PairStopped { stopped } => format!("pair stopped  {}", node_pairs(stopped)),
        Event::PairAdopted { nodes } => {
            format!("pair adopted by a restarted hostd  {}", node_pairs(nodes))
        }
        Event::Takeover(report) => takeover(report, &indent),
        Event::Giveback(report) => giveback(report, &indent),
        Event::MoveFailed {
            node,
            to,
            reason,
            error,
        } => {
            let mut text = with_note(format!("move failed  {node} → {to}"), reason);
            if !error.is_empty() {
                text.push_str(&format!(": {error}"));
            }
            text
        }
        Event::FaultInjected { node, signal } => format!("fault injected  node {node}: {signal}"),
        Event::ServingStarted {
            identity,
            node,
            epoch,
        } => format!("node {node} starts serving {identity} (epoch {epoch})"),
        Event::ServingEnded {
            identity,
            node,
            reason,
        } => with_note(format!("node {node} stops serving {identity}"), reason),
        Event::NodeRestarted {
            node,
            attempt,
            reason,
        } => with_note(
            format!("node {node} restarted by hostd (attempt {attempt})"),
            reason,
        ),
        Event::Replayed {
            node,
            by,
            from,
            epoch,
            after_ms,
            first_seq,
            last_seq,
            complete,
        } => format!(
            "replayed  {node}: {by} put {from}'s log (seq {first_seq}..={last_seq}) on the disk, {} after detection (epoch {epoch}){}",
            milliseconds(*after_ms).trim_start_matches('+'),
            if *complete {
                ""
            } else {
                "; stopped at a bad record"
            }
        ),
        Event::RestartsExhausted { node, restarts } => format!(
            "node {node}: {restarts} restarts, no more by hostd (`hostd giveback {node}` restarts it)"
        ),
        Event::StorageStarted { pid, adopted } => format!(
            "storage daemon {} (pid {pid})",
            if *adopted { "adopted" } else { "started" }
        ),
        Event::DiskRegistered {
            disk,
            node,
            generation,
            holder,
        } => format!(
            "disk {disk}: node {node} registered (generation {generation}), may write; reservation held by {}",
            holder.as_deref().unwrap_or("nobody")
        ),
        Event::DiskPreempted {
            disk,
            node,
            by,
            holder,
            reason,
        } => with_note(
            format!(
                "disk {disk}: node {node} preempted by {by}, its writes fail; reservation held by {}",
                holder.as_deref().unwrap_or("nobody")
            ),
            reason,
        ),
        Event::InterconnectLink {
            node,
            peer,
            link,
            state,
            reachable,
        } => format!(
            "interconnect {node} -> {peer}: link {link} {}{}",
            state.as_str(),
            if *reachable {
                ""
            } else {
                "; no link to the peer is up (interconnect down)"
            }
        ),
        Event::ClaimAdopted {
            node,
            by,
            from,
            generation,
            published,
        } => format!(
            "claim adopted  {node}: {by} holds it, claimed from {from} while hostd was away (generation {generation}){}",
            if *published {
                ""
            } else {
                "; the coordinator's record, no claim in its region"
            }
        ),
        Event::MembershipLost {
            node,
            by,
            generation,
        } => format!(
            "node {node}: no member since generation {generation}{}; fenced, to be restarted as a standby",
            by.as_deref()
                .map(|by| format!(" ({by} claimed what it held while hostd was away)"))
                .unwrap_or_default()
        ),
    };
    format!("{stamp}  {body}")
}

/// A line of the log that is not a known event: `kind  key=value ...`.
pub fn render_unknown(value: &Value, zone: &Zone) -> String {
    let stamp = value
        .get("time_unix_ms")
        .and_then(Value::as_i64)
        .map_or_else(|| "--:--:--.---".to_owned(), |ms| zone.clock(ms));
    let Some(fields) = value.as_object() else {
        return format!("{stamp}  (not an event)  {value}");
    };
    let (name, skip_tag) = match fields.get("event") {
        Some(Value::String(name)) if !name.is_empty() => (name.as_str(), true),
        _ => ("(untagged)", false),
    };
    let pairs: Vec<String> = fields
        .iter()
        .filter(|(key, _)| {
            let stamp = matches!(key.as_str(), "time_unix_ms" | "time_unix_us");
            let tag = skip_tag && *key == "event";
            !stamp && !tag
        })
        .map(|(key, value)| format!("{key}={}", bare_or_json(value)))
        .collect();
    if pairs.is_empty() {
        format!("{stamp}  {name}")
    } else {
        format!("{stamp}  {name}  {}", pairs.join(" "))
    }
}

/// `text (note)`, or `text` when the note is empty.
fn with_note(text: String, note: &str) -> String {
    if note.is_empty() {
        text
    } else {
        format!("{text} ({note})")
    }
}

/// `a: quit cleanly, b: killed`.
fn node_pairs(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(node, how)| format!("{node}: {how}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One step of a takeover or giveback: its name, milliseconds after detection, and a note.
type Step = (&'static str, f64, String);

/// `detected` at 0, then the report's steps by time (steps at the same time keep the order
/// in which a move takes them).
fn steps(report: &MoveReport) -> Vec<Step> {
    let mut steps: Vec<Step> = std::iter::once(("detected", 0.0))
        .chain(report.timeline_ms.steps())
        .map(|(name, ms)| (name, ms, String::new()))
        .collect();
    steps[1..].sort_by(|a, b| a.1.total_cmp(&b.1));
    steps
}

/// `+12 ms`, or `+12.3 ms` for a fractional time.
fn milliseconds(ms: f64) -> String {
    if ms.fract() == 0.0 {
        format!("+{ms:.0} ms")
    } else {
        format!("+{ms:.1} ms")
    }
}

/// The steps as aligned lines under the event's first line.
fn timeline(steps: &[Step], indent: &str) -> String {
    let times: Vec<String> = steps.iter().map(|(_, ms, _)| milliseconds(*ms)).collect();
    let name_width = steps.iter().map(|(name, ..)| name.len()).max().unwrap_or(0);
    let time_width = times.iter().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for ((name, _, note), time) in steps.iter().zip(&times) {
        let line = format!("{indent}{name:<name_width$}  {time:<time_width$}   {note}");
        out.push('\n');
        out.push_str(line.trim_end());
    }
    out
}

/// What was replayed: `64 records (seq 10..=73)`, marked when incomplete; None when there
/// is nothing to say.
fn replay_note(report: &MoveReport, has_step: bool) -> Option<String> {
    let (n, first, last) = (
        report.replayed_records,
        report.replayed_first_seq,
        report.replayed_last_seq,
    );
    if n == 0 && !has_step && report.replay_complete {
        return None;
    }
    let mut note = match n {
        1 if first == last => format!("1 record (seq {first})"),
        0 => "0 records".to_owned(),
        1 => "1 record".to_owned(),
        n => format!("{n} records (seq {first}..={last})"),
    };
    if !report.replay_complete {
        note.push_str(", INCOMPLETE");
    }
    Some(note)
}

/// Puts the replay note on the `scanned` step (the taker serves the records from then on
/// and replays them in the background), on the `replayed` step of older logs, or on the
/// first line if there is neither.
fn attach_replay(report: &MoveReport, head: &mut String, steps: &mut [Step]) {
    let step = steps
        .iter_mut()
        .find(|(name, ..)| *name == "scanned" || *name == "replayed");
    if let Some(note) = replay_note(report, step.is_some()) {
        match step {
            Some(step) => step.2 = note,
            None => {
                head.push_str(", replayed ");
                head.push_str(&note);
            }
        }
    }
}

/// ```text
/// takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2
///     detected  +0 ms
///     fenced    +12 ms
///     replayed  +80 ms   64 records (seq 10..=73)
///     serving   +95 ms
/// ```
fn takeover(report: &MoveReport, indent: &str) -> String {
    let how = if report.planned {
        "planned"
    } else {
        "unplanned"
    };
    let why = if report.reason.is_empty() {
        how.to_owned()
    } else {
        format!("{how}: {}", report.reason)
    };
    // An identity held away from home moves from its holder: name both, so that a node
    // taking its own identity back reads "a (held by b) → a", not "a → a".
    let identity = if report.from.is_empty() || report.from == report.node {
        report.node.clone()
    } else {
        format!("{} (held by {})", report.node, report.from)
    };
    let mut head = format!(
        "takeover  {identity} → {} ({why}), epoch {}",
        report.to, report.epoch
    );
    let mut steps = steps(report);
    attach_replay(report, &mut head, &mut steps);
    head + &timeline(&steps, indent)
}

/// ```text
/// giveback  b → a (giveback: hostd giveback), epoch 3
///     detected   +0 ms
///     restarted  +4100 ms
///     released   +4130 ms
///     serving    +4160 ms
/// ```
/// `node` is the identity going home; `from` the node that served it.
fn giveback(report: &MoveReport, indent: &str) -> String {
    let why = if report.reason.is_empty() {
        "giveback".to_owned()
    } else {
        format!("giveback: {}", report.reason)
    };
    let mut head = format!(
        "giveback  {} → {} ({why}), epoch {}",
        report.from, report.node, report.epoch
    );
    let mut steps = steps(report);
    attach_replay(report, &mut head, &mut steps);
    head + &timeline(&steps, indent)
}

/// A string bare when that is unambiguous, JSON otherwise.
fn bare_or_json(value: &Value) -> String {
    match value {
        Value::String(s)
            if !s.is_empty()
                && !s
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=')) =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::control::{NodeState, Timeline};

    fn utc_unlabelled() -> Zone {
        Zone::Local(jiff::tz::TimeZone::UTC)
    }

    fn at(ms: u64, event: Event) -> String {
        render_event(&EventLine::new(event, ms * 1000), &utc_unlabelled())
    }

    fn takeover_report() -> MoveReport {
        MoveReport {
            node: "a".into(),
            from: "a".into(),
            to: "b".into(),
            planned: false,
            reason: "QEMU exited (signal 9)".into(),
            epoch: 2,
            detected_unix_ms: 1_699_963_199_900,
            timeline_ms: Timeline {
                fenced: Some(12.0),
                replayed: Some(80.0),
                serving: Some(95.0),
                ..Timeline::default()
            },
            replayed_records: 64,
            replayed_first_seq: 10,
            replayed_last_seq: 73,
            replay_complete: true,
        }
    }

    /// 2023-11-14 12:00:00 UTC.
    const NOON: u64 = 1_699_963_200_000;

    #[test]
    fn takeover_is_a_timeline() {
        assert_eq!(
            at(NOON, Event::Takeover(takeover_report())),
            "12:00:00.000  takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2\n\
             \x20               detected  +0 ms\n\
             \x20               fenced    +12 ms\n\
             \x20               replayed  +80 ms   64 records (seq 10..=73)\n\
             \x20               serving   +95 ms"
        );
    }

    #[test]
    fn a_takeover_that_serves_before_its_replay_notes_the_scan() {
        let mut report = takeover_report();
        report.timeline_ms.replayed = None;
        report.timeline_ms.scanned = Some(20.0);
        report.timeline_ms.serving = Some(21.5);
        assert_eq!(
            at(NOON, Event::Takeover(report)),
            "12:00:00.000  takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2\n\
             \x20               detected  +0 ms\n\
             \x20               fenced    +12 ms\n\
             \x20               scanned   +20 ms     64 records (seq 10..=73)\n\
             \x20               serving   +21.5 ms"
        );
        let replayed = Event::Replayed {
            node: "a".into(),
            by: "b".into(),
            from: "a".into(),
            epoch: 2,
            after_ms: 850.0,
            first_seq: 10,
            last_seq: 73,
            complete: true,
        };
        assert_eq!(
            at(NOON, replayed),
            "12:00:00.000  replayed  a: b put a's log (seq 10..=73) on the disk, 850 ms after detection (epoch 2)"
        );
    }

    #[test]
    fn claims_adopted_from_the_coordinator_say_who_claimed_what() {
        let adopted = Event::ClaimAdopted {
            node: "a".into(),
            by: "b".into(),
            from: "a".into(),
            generation: 3,
            published: true,
        };
        assert_eq!(
            at(NOON, adopted),
            "12:00:00.000  claim adopted  a: b holds it, claimed from a while hostd was away (generation 3)"
        );
        let lost = Event::MembershipLost {
            node: "a".into(),
            by: Some("b".into()),
            generation: 3,
        };
        assert_eq!(
            at(NOON, lost),
            "12:00:00.000  node a: no member since generation 3 (b claimed what it held while hostd was away); fenced, to be restarted as a standby"
        );
    }

    #[test]
    fn a_node_taking_its_identity_back_names_the_holder() {
        let report = MoveReport {
            from: "b".into(),
            to: "a".into(),
            reason: "no live node could serve it".into(),
            ..takeover_report()
        };
        let text = at(NOON, Event::Takeover(report));
        assert!(
            text.starts_with(
                "12:00:00.000  takeover  a (held by b) → a (unplanned: no live node could serve it)"
            ),
            "{text}"
        );
    }

    #[test]
    fn takeover_variants() {
        let report = MoveReport {
            planned: true,
            reason: "operator request".into(),
            replay_complete: false,
            timeline_ms: Timeline {
                serving: Some(1500.0),
                replayed: Some(900.0),
                fenced: Some(900.0),
                ..Timeline::default()
            },
            ..takeover_report()
        };
        let text = at(NOON, Event::Takeover(report.clone()));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "12:00:00.000  takeover  a → b (planned: operator request), epoch 2"
        );
        // Same millisecond: fenced before replayed; times padded to the widest.
        assert_eq!(lines[1].trim(), "detected  +0 ms");
        assert_eq!(lines[2].trim(), "fenced    +900 ms");
        assert_eq!(
            lines[3].trim(),
            "replayed  +900 ms    64 records (seq 10..=73), INCOMPLETE"
        );
        assert_eq!(lines[4].trim(), "serving   +1500 ms");

        // No replay step in the timeline: the replay goes on the first line.
        let report = MoveReport {
            replay_complete: true,
            replayed_records: 1,
            replayed_last_seq: 10,
            timeline_ms: Timeline {
                serving: Some(7.0),
                ..Timeline::default()
            },
            ..report
        };
        assert_eq!(
            at(NOON, Event::Takeover(report)).lines().next().unwrap(),
            "12:00:00.000  takeover  a → b (planned: operator request), epoch 2, replayed 1 record (seq 10)"
        );
    }

    #[test]
    fn fractional_times_and_givebacks() {
        let report = MoveReport {
            reason: "heartbeat timed out".into(),
            timeline_ms: Timeline {
                fenced: Some(12.4),
                replayed: Some(80.0),
                serving: Some(95.3),
                ..Timeline::default()
            },
            replayed_records: 0,
            replayed_first_seq: 0,
            replayed_last_seq: 0,
            ..takeover_report()
        };
        assert_eq!(
            at(NOON, Event::Takeover(report)),
            "12:00:00.000  takeover  a → b (unplanned: heartbeat timed out), epoch 2\n\
             \x20               detected  +0 ms\n\
             \x20               fenced    +12.4 ms\n\
             \x20               replayed  +80 ms     0 records\n\
             \x20               serving   +95.3 ms"
        );
        let giveback = MoveReport {
            node: "a".into(),
            from: "b".into(),
            to: "a".into(),
            planned: true,
            reason: "hostd giveback".into(),
            epoch: 3,
            detected_unix_ms: NOON - 10_000,
            timeline_ms: Timeline {
                restarted: Some(4100.0),
                released: Some(4130.5),
                serving: Some(4160.0),
                ..Timeline::default()
            },
            replayed_records: 0,
            replayed_first_seq: 0,
            replayed_last_seq: 0,
            replay_complete: true,
        };
        assert_eq!(
            at(NOON, Event::Giveback(giveback)),
            "12:00:00.000  giveback  b → a (giveback: hostd giveback), epoch 3\n\
             \x20               detected   +0 ms\n\
             \x20               restarted  +4100 ms\n\
             \x20               released   +4130.5 ms\n\
             \x20               serving    +4160 ms"
        );
    }

    #[test]
    fn one_line_events() {
        let cases = [
            (
                Event::NodeState {
                    node: "a".into(),
                    from: NodeState::Booting,
                    to: NodeState::Up,
                    detail: "heartbeat 1".into(),
                },
                "node a: booting → up (heartbeat 1)",
            ),
            (
                Event::NodeState {
                    node: "b".into(),
                    from: NodeState::Up,
                    to: NodeState::Down,
                    detail: String::new(),
                },
                "node b: up → down",
            ),
            (
                Event::PairStarting {
                    accel: "tcg".into(),
                    accel_reason: "no vmx/svm".into(),
                },
                "pair starting  accel tcg (no vmx/svm)",
            ),
            (
                Event::PairStopped {
                    stopped: vec![
                        ("a".into(), "quit cleanly".into()),
                        ("b".into(), "killed".into()),
                    ],
                },
                "pair stopped  a: quit cleanly, b: killed",
            ),
            (Event::PairStopped { stopped: vec![] }, "pair stopped"),
            (
                Event::MoveFailed {
                    node: "a".into(),
                    to: "b".into(),
                    reason: "QEMU exited".into(),
                    error: "fence timed out".into(),
                },
                "move failed  a → b (QEMU exited): fence timed out",
            ),
            (
                Event::FaultInjected {
                    node: "b".into(),
                    signal: "stop".into(),
                },
                "fault injected  node b: stop",
            ),
            (
                Event::ServingStarted {
                    identity: "a".into(),
                    node: "b".into(),
                    epoch: 3,
                },
                "node b starts serving a (epoch 3)",
            ),
            (
                Event::ServingEnded {
                    identity: "a".into(),
                    node: "a".into(),
                    reason: "fenced".into(),
                },
                "node a stops serving a (fenced)",
            ),
            (
                Event::PairAdopted {
                    nodes: vec![("a".into(), "pid 12".into()), ("b".into(), "pid 13".into())],
                },
                "pair adopted by a restarted hostd  a: pid 12, b: pid 13",
            ),
        ];
        for (event, text) in cases {
            assert_eq!(
                at(1_700_000_000_000, event),
                format!("22:13:20.000  {text}")
            );
        }
    }

    #[test]
    fn unknown_lines_are_key_value() {
        let render =
            |line: &str| render_unknown(&serde_json::from_str(line).unwrap(), &utc_unlabelled());
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000000,"event":"fence_failed","node":"a","reason":"QMP timed out","attempt":2,"ok":false,"extra":{"x":[1]}}"#
            ),
            r#"22:13:20.000  fence_failed  attempt=2 extra={"x":[1]} node=a ok=false reason="QMP timed out""#
        );
        assert_eq!(
            render(r#"{"event":"pair_stopped","stopped":[["a"]]}"#),
            r#"--:--:--.---  pair_stopped  stopped=[["a"]]"#
        );
        assert_eq!(
            render(r#"{"time_unix_ms":5,"x":""}"#),
            r#"00:00:00.005  (untagged)  x="""#
        );
        assert_eq!(
            render(r#"{"time_unix_ms":5,"event":"tick"}"#),
            "00:00:00.005  tick"
        );
        assert_eq!(render("3"), "--:--:--.---  (not an event)  3");
    }
}
