//! The checker against hand-made histories: one per anomaly kind (each caught, and its legal
//! near-miss not), valid and unknown runs, malformed input, and the binary's exit codes.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use campaign::block::{self, BLOCK_SIZE, BlockValue};
use campaign::checker::{self, AnomalyKind, CheckError, CheckOutcome, FinalContents, Verdict};
use campaign::history::{
    Action, End, Entry, EntryProblem, ErrorCompletion, Fault, History, HistoryError, Invoke,
    OkCompletion, RunInfo, ServeEnd, ServeStart, Takeover, WriterSpec,
};
use campaign::report::Report;

const RUN_ID: u64 = 0xfeed_beef_0123_4567;
const BLOCKS: u64 = 4;
const RUN_T: u64 = 1_000_000;

/// Writer 0 owns blocks 0..4 of identity a, writer 1 blocks 0..4 of identity b.
fn writer_identity(writer: u32) -> &'static str {
    if writer == 0 { "a" } else { "b" }
}

/// Builds a history and the final images in memory. Every entry is 10 µs after the previous
/// one unless [`Builder::at`] sets the time.
struct Builder {
    entries: Vec<Entry>,
    t: u64,
    next_op: u64,
    next_seq: HashMap<u32, u64>,
    images: HashMap<&'static str, Vec<u8>>,
}

impl Builder {
    /// A run with both writers, each identity served by its home node.
    fn new() -> Self {
        let mut builder = Builder {
            entries: vec![Entry::Run(RunInfo {
                t: RUN_T,
                seed: 42,
                run_id: RUN_ID,
                block_size: BLOCK_SIZE as u64,
                writers: vec![
                    WriterSpec {
                        writer: 0,
                        identity: "a".into(),
                        first_block: 0,
                        blocks: BLOCKS,
                    },
                    WriterSpec {
                        writer: 1,
                        identity: "b".into(),
                        first_block: 0,
                        blocks: BLOCKS,
                    },
                ],
            })],
            t: RUN_T,
            next_op: 1,
            next_seq: HashMap::new(),
            images: ["a", "b"]
                .into_iter()
                .map(|identity| (identity, vec![0u8; BLOCKS as usize * BLOCK_SIZE]))
                .collect(),
        };
        builder.serve_start("a", "a");
        builder.serve_start("b", "b");
        builder
    }

    fn at(&mut self, t: u64) -> &mut Self {
        self.t = t;
        self
    }

    fn tick(&mut self) -> u64 {
        self.t += 10;
        self.t
    }

    fn push(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    /// Invokes a write of the writer's next seq; returns (op, seq).
    fn write(&mut self, writer: u32, block: u64) -> (u64, u64) {
        let seq = self.next_seq.entry(writer).or_insert(0);
        *seq += 1;
        let seq = *seq;
        let op = self.invoke(writer, Action::Write, block, Some(seq));
        (op, seq)
    }

    fn read(&mut self, writer: u32, block: u64) -> u64 {
        self.invoke(writer, Action::Read, block, None)
    }

    fn invoke(&mut self, writer: u32, action: Action, block: u64, seq: Option<u64>) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        let t = self.tick();
        self.push(Entry::Invoke(Invoke {
            t,
            op,
            writer,
            action,
            block,
            seq,
            server: None,
        }));
        op
    }

    fn ok(&mut self, op: u64) {
        let t = self.tick();
        self.push(Entry::Ok(OkCompletion { t, op, value: None }));
    }

    fn ok_read(&mut self, op: u64, value: BlockValue) {
        let t = self.tick();
        self.push(Entry::Ok(OkCompletion {
            t,
            op,
            value: Some(value),
        }));
    }

    fn fail(&mut self, op: u64) {
        let t = self.tick();
        self.push(Entry::Fail(ErrorCompletion {
            t,
            op,
            error: "EPERM".into(),
        }));
    }

    fn unknown(&mut self, op: u64) {
        let t = self.tick();
        self.push(Entry::Unknown(ErrorCompletion {
            t,
            op,
            error: "timed out after 3 s".into(),
        }));
    }

    /// Puts writer's write `seq` into the final image at `block` (where it was aimed).
    fn land(&mut self, writer: u32, block: u64, seq: u64) {
        let bytes = block::encode(RUN_ID, writer, seq, block);
        self.put(writer_identity(writer), block, &bytes);
    }

    fn put(&mut self, identity: &'static str, block: u64, bytes: &[u8]) {
        let start = block as usize * BLOCK_SIZE;
        self.images.get_mut(identity).unwrap()[start..start + BLOCK_SIZE].copy_from_slice(bytes);
    }

    /// A write that is invoked, acknowledged and lands; returns its seq.
    fn acked_write(&mut self, writer: u32, block: u64) -> u64 {
        let (op, seq) = self.write(writer, block);
        self.ok(op);
        self.land(writer, block, seq);
        seq
    }

    /// A read that returns `value`.
    fn read_returns(&mut self, writer: u32, block: u64, value: BlockValue) -> u64 {
        let op = self.read(writer, block);
        self.ok_read(op, value);
        op
    }

    /// A read that returns `writer`'s write `seq`.
    fn read_seq(&mut self, writer: u32, block: u64, seq: u64) -> u64 {
        self.read_returns(writer, block, BlockValue::Write { writer, seq })
    }

    fn fault(&mut self, node: &str) {
        let t = self.tick();
        self.push(Entry::Fault(Fault {
            t,
            cycle: 1,
            fault: "kill".into(),
            node: node.into(),
            detail: "SIGKILL qemu".into(),
            node_t: None,
        }));
    }

    fn serve_start(&mut self, identity: &str, node: &str) {
        let t = self.tick();
        self.push(Entry::ServeStart(ServeStart {
            t,
            identity: identity.into(),
            node: node.into(),
        }));
    }

    fn serve_end(&mut self, identity: &str, node: &str) {
        let t = self.tick();
        self.push(Entry::ServeEnd(ServeEnd {
            t,
            identity: identity.into(),
            node: node.into(),
            reason: "fenced".into(),
        }));
    }

    fn end(&mut self) {
        let t = self.tick();
        self.push(Entry::End(End { t }));
    }

    fn history(&self) -> History {
        History::from_entries(self.entries.clone()).unwrap()
    }

    fn finals(&self) -> FinalContents {
        let mut finals = FinalContents::new();
        for (identity, image) in &self.images {
            finals.insert(*identity, image.clone());
        }
        finals
    }

    fn check(&self) -> CheckOutcome {
        checker::check(&self.history(), &self.finals()).unwrap()
    }

    fn jsonl(&self) -> String {
        self.entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect()
    }
}

/// A run that proves something: a fault fired and something was acknowledged, on both
/// identities.
fn baseline() -> Builder {
    let mut b = Builder::new();
    b.acked_write(0, 0);
    b.acked_write(1, 0);
    b.fault("b");
    b
}

fn count(outcome: &CheckOutcome, kind: AnomalyKind) -> usize {
    outcome.anomalies.iter().filter(|a| a.kind == kind).count()
}

/// The outcome is invalid, and `kind` is among its anomalies.
fn assert_caught(outcome: &CheckOutcome, kind: AnomalyKind) {
    assert_eq!(outcome.verdict, Verdict::Invalid, "{outcome}");
    assert!(count(outcome, kind) > 0, "no {kind} in:\n{outcome}");
    assert_eq!(outcome.anomaly_counts[&kind], count(outcome, kind));
}

fn assert_valid(outcome: &CheckOutcome) {
    assert!(outcome.anomalies.is_empty(), "{outcome}");
    assert_eq!(outcome.verdict, Verdict::Valid, "{outcome}");
}

#[test]
fn valid_history_with_a_takeover_is_valid() {
    let mut b = baseline();
    // Node a dies mid-write; b takes over identity a; the writer carries on.
    b.fault("a");
    let (in_flight, in_flight_seq) = b.write(0, 1);
    b.serve_end("a", "a");
    b.unknown(in_flight);
    b.land(0, 1, in_flight_seq); // It happened after all: fine.
    let (lost_in_flight, _) = b.write(0, 2);
    b.unknown(lost_in_flight); // It did not happen: also fine.
    b.serve_start("a", "b");
    let t = b.tick();
    b.push(Entry::Takeover(Takeover {
        t,
        cycle: 1,
        identity: "a".into(),
        from: "a".into(),
        to: "b".into(),
        fault_to_serving_ms: 150.0,
        detect_to_serving_ms: 120.0,
    }));
    let seq = b.acked_write(0, 3);
    b.read_seq(0, 3, seq);
    b.read_seq(0, 1, in_flight_seq);
    b.read_returns(0, 2, BlockValue::Zero);
    let (failed, _) = b.write(0, 2);
    b.fail(failed); // Never landed: fine.
    b.read_returns(0, 2, BlockValue::Zero);
    // Writer 1's entries appended late with earlier times: file order across writers is not
    // time order.
    let late = b.t;
    b.at(late - 15);
    let seq = b.acked_write(1, 1);
    b.read_seq(1, 1, seq);
    b.at(late + 100);
    b.end();

    let history = b.history();
    let outcome = checker::check(&history, &b.finals()).unwrap();
    assert_valid(&outcome);
    assert_eq!(outcome.operations.writes.ok, 4);
    assert_eq!(outcome.operations.writes.unknown, 2);
    assert_eq!(outcome.operations.writes.fail, 1);
    assert_eq!(outcome.operations.reads.ok, 5);

    let report = Report::build(&history, &outcome);
    assert_eq!(report.verdict, Verdict::Valid);
    assert_eq!(report.faults["kill"], 2);
    assert_eq!(report.takeovers.count, 1);
    assert_eq!(report.takeovers.fault_to_serving_ms.p99, Some(150.0));
    assert!(report.finished);
    assert!(report.to_string().contains("verdict: valid"));
}

#[test]
fn no_fault_is_unknown() {
    let mut b = Builder::new();
    b.acked_write(0, 0);
    b.end();
    let outcome = b.check();
    assert!(outcome.anomalies.is_empty());
    assert_eq!(outcome.verdict, Verdict::Unknown);
    assert_eq!(outcome.unknown_reason.as_deref(), Some("no fault fired"));
}

#[test]
fn nothing_acknowledged_is_unknown() {
    let mut b = Builder::new();
    b.fault("a");
    let (op, _) = b.write(0, 0);
    b.unknown(op);
    let op = b.read(0, 0);
    b.fail(op);
    // No completion at all: unknown too.
    b.write(0, 1);
    let outcome = b.check();
    assert!(outcome.anomalies.is_empty());
    assert_eq!(outcome.verdict, Verdict::Unknown);
    assert_eq!(outcome.operations.writes.unknown, 2);
    assert_eq!(
        outcome.unknown_reason.as_deref(),
        Some("no operation was acknowledged")
    );
}

#[test]
fn lost_write_is_caught() {
    // The final contents hold an older write than the last acknowledged one.
    let mut b = baseline();
    let first = b.acked_write(0, 1);
    let (op, _) = b.write(0, 1);
    b.ok(op);
    b.land(0, 1, first);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::LostWrite);
    let lost = &outcome.anomalies[0];
    assert_eq!(
        (lost.identity.as_deref(), lost.block, lost.op),
        (Some("a"), Some(1), Some(op))
    );

    // An acknowledged write that never reached the disk at all.
    let mut b = baseline();
    let (op, _) = b.write(0, 2);
    b.ok(op);
    assert_caught(&b.check(), AnomalyKind::LostWrite);
}

#[test]
fn later_unknown_write_over_an_acked_one_is_not_lost() {
    let mut b = baseline();
    b.acked_write(0, 1);
    let (op, seq) = b.write(0, 1);
    b.unknown(op);
    b.land(0, 1, seq);
    assert_valid(&b.check());

    // And if it did not land, the acknowledged one must still be there: it is.
    let mut b = baseline();
    b.acked_write(0, 1);
    let (op, _) = b.write(0, 1);
    b.unknown(op);
    assert_valid(&b.check());
}

#[test]
fn never_invoked_value_is_caught() {
    // The final contents hold a write no invoke made.
    let mut b = baseline();
    b.land(0, 3, 99);
    assert_caught(&b.check(), AnomalyKind::NeverInvoked);

    // A read returns a write invoked only after the read completed.
    let mut b = baseline();
    let read = b.read_seq(0, 1, 2);
    let seq = b.acked_write(0, 1);
    assert_eq!(seq, 2);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::NeverInvoked);
    assert!(
        outcome
            .anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::NeverInvoked && a.op == Some(read))
    );
}

#[test]
fn read_of_a_later_unknown_write_is_fine() {
    let mut b = baseline();
    b.acked_write(0, 1);
    let (op, seq) = b.write(0, 1);
    b.unknown(op);
    b.land(0, 1, seq);
    b.read_seq(0, 1, seq);
    assert_valid(&b.check());
}

#[test]
fn corrupt_block_is_caught() {
    // A torn final block.
    let mut b = baseline();
    let seq = b.acked_write(0, 1);
    let mut torn = block::encode(RUN_ID, 0, seq, 1);
    torn[2000] ^= 0x40;
    b.put("a", 1, &torn);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::CorruptBlock);
    // The acknowledged write is gone too.
    assert_eq!(count(&outcome, AnomalyKind::LostWrite), 1);

    // A block of another run in a never-written block.
    let mut b = baseline();
    b.put("b", 3, &block::encode(RUN_ID + 1, 1, 1, 3));
    assert_caught(&b.check(), AnomalyKind::CorruptBlock);

    // A read that returned garbage.
    let mut b = baseline();
    b.read_returns(
        0,
        2,
        BlockValue::Corrupt {
            reason: "bad magic".into(),
        },
    );
    assert_caught(&b.check(), AnomalyKind::CorruptBlock);
}

#[test]
fn never_written_zero_blocks_are_fine() {
    // The baseline leaves blocks 1..4 of both identities zero, and reads one of them.
    let mut b = baseline();
    b.read_returns(1, 2, BlockValue::Zero);
    let outcome = b.check();
    assert_valid(&outcome);
    assert_eq!(count(&outcome, AnomalyKind::CorruptBlock), 0);
}

#[test]
fn duplicate_op_invoke_is_caught() {
    let mut b = baseline();
    let (op, seq) = b.write(0, 1);
    b.ok(op);
    b.land(0, 1, seq);
    let t = b.tick();
    b.push(Entry::Invoke(Invoke {
        t,
        op,
        writer: 0,
        action: Action::Write,
        block: 1,
        seq: Some(seq + 1),
        server: None,
    }));
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::Duplicate);
    assert_eq!(outcome.anomalies[0].op, Some(op));
}

#[test]
fn duplicate_completion_is_caught() {
    let mut b = baseline();
    let (op, seq) = b.write(0, 1);
    b.ok(op);
    b.ok(op);
    b.land(0, 1, seq);
    assert_caught(&b.check(), AnomalyKind::Duplicate);
}

#[test]
fn duplicate_write_seq_is_caught() {
    let mut b = baseline();
    let seq = b.acked_write(0, 1);
    let op = b.invoke(0, Action::Write, 2, Some(seq));
    b.ok(op);
    b.land(0, 2, seq);
    assert_caught(&b.check(), AnomalyKind::Duplicate);
}

#[test]
fn misplaced_write_is_caught() {
    // Block 1's write landed in block 2 (as well).
    let mut b = baseline();
    let seq = b.acked_write(0, 1);
    b.put("a", 2, &block::encode(RUN_ID, 0, seq, 1));
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::Duplicate);
    assert_eq!(outcome.anomalies[0].block, Some(2));

    // Identity a's write landed in the same block of identity b's export.
    let mut b = baseline();
    let seq = b.acked_write(0, 2);
    b.put("b", 2, &block::encode(RUN_ID, 0, seq, 2));
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::Duplicate);
    assert_eq!(outcome.anomalies[0].identity.as_deref(), Some("b"));
}

#[test]
fn equal_seqs_of_different_writers_are_not_duplicates() {
    // The baseline's writers both wrote their seq 1 to their block 0.
    let outcome = baseline().check();
    assert_valid(&outcome);
    assert_eq!(count(&outcome, AnomalyKind::Duplicate), 0);
}

#[test]
fn stale_read_is_caught() {
    let mut b = baseline();
    let first = b.acked_write(0, 1);
    b.acked_write(0, 1);
    let read = b.read_seq(0, 1, first);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::OrderViolation);
    assert_eq!(outcome.anomalies[0].op, Some(read));
    assert!(outcome.anomalies[0].explanation.contains("stale"));

    // Zero after an acknowledged write is stale too.
    let mut b = baseline();
    b.acked_write(0, 1);
    b.read_returns(0, 1, BlockValue::Zero);
    assert_caught(&b.check(), AnomalyKind::OrderViolation);
}

#[test]
fn read_regression_is_caught() {
    // A read saw unknown write 3; a later read sees acked write 2 again: 3 cannot un-land.
    let mut b = baseline();
    let acked = b.acked_write(0, 1);
    let (op, seq) = b.write(0, 1);
    b.unknown(op);
    b.land(0, 1, seq);
    b.read_seq(0, 1, seq);
    let regressed = b.read_seq(0, 1, acked);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::OrderViolation);
    assert_eq!(outcome.anomalies[0].op, Some(regressed));
    assert!(outcome.anomalies[0].explanation.contains("regression"));
}

#[test]
fn stale_read_racing_an_unknown_write_is_fine() {
    // Acked 2, unknown 3 in flight: reading 2 is current as far as acknowledgements go.
    let mut b = baseline();
    let acked = b.acked_write(0, 1);
    let (op, seq) = b.write(0, 1);
    b.unknown(op);
    b.read_seq(0, 1, acked);
    // Then the late write lands and is read: also fine.
    b.land(0, 1, seq);
    b.read_seq(0, 1, seq);
    assert_valid(&b.check());
}

#[test]
fn failed_write_landed_is_caught() {
    // In the final contents.
    let mut b = baseline();
    let (op, seq) = b.write(0, 1);
    b.fail(op);
    b.land(0, 1, seq);
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::FailedWriteLanded);
    assert_eq!(outcome.anomalies[0].op, Some(op));

    // In a read.
    let mut b = baseline();
    let (op, seq) = b.write(0, 2);
    b.fail(op);
    b.read_seq(0, 2, seq);
    assert_caught(&b.check(), AnomalyKind::FailedWriteLanded);
}

#[test]
fn unknown_write_landing_is_fine() {
    let mut b = baseline();
    let (op, seq) = b.write(0, 1);
    b.unknown(op);
    b.land(0, 1, seq);
    b.read_seq(0, 1, seq);
    assert_valid(&b.check());
}

#[test]
fn write_after_fence_is_caught() {
    // a is fenced; a write invoked afterwards is acknowledged before b serves a.
    let mut b = baseline();
    b.serve_end("a", "a");
    let (op, seq) = b.write(0, 1);
    b.ok(op);
    b.land(0, 1, seq);
    b.serve_start("a", "b");
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::WriteAfterFence);
    assert_eq!(outcome.anomalies[0].op, Some(op));

    // The same with no new server at all before the history ends.
    let mut b = baseline();
    b.serve_end("a", "a");
    b.acked_write(0, 1);
    assert_caught(&b.check(), AnomalyKind::WriteAfterFence);
}

#[test]
fn writes_around_a_fence_are_fine() {
    let mut b = baseline();
    // Invoked while a served, acknowledged after a was fenced: a answered before it died.
    let (before, seq) = b.write(0, 1);
    b.serve_end("a", "a");
    b.ok(before);
    b.land(0, 1, seq);
    // Invoked during the gap, acknowledged once b serves a.
    let (during, seq) = b.write(0, 2);
    b.serve_start("a", "b");
    b.ok(during);
    b.land(0, 2, seq);
    // Identity b's writer is untouched by a's gap.
    b.acked_write(1, 1);
    let outcome = b.check();
    assert_valid(&outcome);
    assert_eq!(count(&outcome, AnomalyKind::WriteAfterFence), 0);
}

#[test]
fn dual_serving_is_caught() {
    // b starts serving a before a's end is recorded.
    let mut b = baseline();
    b.serve_start("a", "b");
    let from = b.t;
    b.serve_end("a", "a");
    let until = b.t;
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::DualServing);
    let window = outcome.anomalies[0].window.clone().unwrap();
    assert_eq!((window.from, window.until), (from, Some(until)));
    assert_eq!(window.nodes, ["a".to_owned(), "b".to_owned()]);

    // Two servers, neither ever stopped.
    let mut b = baseline();
    b.serve_start("b", "a");
    let outcome = b.check();
    assert_caught(&outcome, AnomalyKind::DualServing);
    assert_eq!(outcome.anomalies[0].window.clone().unwrap().until, None);
}

#[test]
fn handover_that_touches_is_not_dual_serving() {
    // a's end and b's start at the same microsecond, b's start logged first.
    let mut b = baseline();
    let t = b.tick();
    b.at(t - 10);
    b.serve_start("a", "b");
    b.at(t - 10);
    b.serve_end("a", "a");
    // And a giveback later, in order.
    b.serve_end("a", "b");
    b.serve_start("a", "a");
    let outcome = b.check();
    assert_valid(&outcome);
    assert_eq!(count(&outcome, AnomalyKind::DualServing), 0);
}

#[test]
fn malformed_input_is_an_error() {
    let b = baseline();
    let good = b.jsonl();

    let bad_json = format!("{good}{{\"kind\":\"ok\",\"t\":\n");
    let error = History::parse(bad_json.as_bytes(), "h.jsonl").unwrap_err();
    let lines = good.lines().count();
    assert!(
        matches!(&error, HistoryError::Malformed { line, .. } if *line == lines + 1),
        "{error:?}"
    );
    assert!(error.to_string().contains("h.jsonl line"));

    let unknown_op = format!("{good}{{\"kind\":\"ok\",\"t\":5,\"op\":777}}\n");
    let error = History::parse(unknown_op.as_bytes(), "h.jsonl").unwrap_err();
    assert!(
        matches!(
            &error,
            HistoryError::Invalid {
                source: EntryProblem::CompletionForUnknownOp { op: 777 },
                ..
            }
        ),
        "{error:?}"
    );

    let no_run: String = good.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let error = History::parse(no_run.as_bytes(), "h.jsonl").unwrap_err();
    assert!(
        matches!(
            &error,
            HistoryError::Invalid {
                line: 1,
                source: EntryProblem::RunNotFirst { .. },
                ..
            }
        ),
        "{error:?}"
    );

    let error = History::parse("".as_bytes(), "h.jsonl").unwrap_err();
    assert!(matches!(error, HistoryError::Empty { .. }), "{error:?}");

    let unknown_kind = format!("{good}{{\"kind\":\"reboot\",\"t\":5}}\n");
    assert!(matches!(
        History::parse(unknown_kind.as_bytes(), "h.jsonl"),
        Err(HistoryError::Malformed { .. })
    ));
}

#[test]
fn missing_or_short_final_image_is_an_error() {
    let b = baseline();
    let history = b.history();

    let mut only_a = FinalContents::new();
    only_a.insert("a", b.images["a"].clone());
    let error = checker::check(&history, &only_a).unwrap_err();
    assert!(
        matches!(&error, CheckError::MissingFinal { identity } if identity == "b"),
        "{error:?}"
    );

    let mut short = b.finals();
    short.insert("b", vec![0u8; BLOCK_SIZE * BLOCKS as usize - 1]);
    let error = checker::check(&history, &short).unwrap_err();
    assert!(
        matches!(&error, CheckError::FinalTooShort { identity, .. } if identity == "b"),
        "{error:?}"
    );
}

#[test]
fn history_round_trips_through_the_writer() {
    let b = baseline();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let writer = campaign::history::HistoryWriter::create(&path).unwrap();
    for entry in &b.entries {
        writer.append(entry).unwrap();
    }
    let history = History::read(&path).unwrap();
    assert_eq!(history.entries(), b.entries.as_slice());
}

/// Writes `b`'s history and images into `dir` and runs `ivha-campaign check` on them.
fn run_binary(dir: &Path, b: &Builder, extra: &[&str]) -> (i32, String, String) {
    let history = dir.join("history.jsonl");
    std::fs::write(&history, b.jsonl()).unwrap();
    let mut args = vec!["check".to_owned(), history.display().to_string()];
    for (identity, image) in &b.images {
        let path = dir.join(format!("{identity}.img"));
        std::fs::write(&path, image).unwrap();
        args.push("--final".into());
        args.push(format!("{identity}={}", path.display()));
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let output = Command::new(env!("CARGO_BIN_EXE_ivha-campaign"))
        .args(&args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn binary_exit_codes() {
    let dir = tempfile::tempdir().unwrap();

    let mut valid = baseline();
    valid.end();
    let report = dir.path().join("report.json");
    let (code, stdout, _) = run_binary(dir.path(), &valid, &["--report", report.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("verdict: valid"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["verdict"], "valid");
    assert_eq!(report["faults"]["kill"], 1);

    let mut invalid = baseline();
    let (op, _) = invalid.write(0, 1);
    invalid.ok(op);
    let (code, stdout, _) = run_binary(dir.path(), &invalid, &["--json"]);
    assert_eq!(code, 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["verdict"], "invalid");
    assert_eq!(json["anomaly_counts"]["lost_write"], 1);
    assert_eq!(json["anomalies"][0]["kind"], "lost_write");

    let mut unknown = Builder::new();
    unknown.acked_write(0, 0);
    let (code, stdout, _) = run_binary(dir.path(), &unknown, &[]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("verdict: unknown"), "{stdout}");

    // Malformed history: exit 3, error names the file and line.
    let history = dir.path().join("broken.jsonl");
    std::fs::write(&history, format!("{}not json\n", valid.jsonl())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ivha-campaign"))
        .args(["check", history.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = valid.jsonl().lines().count() + 1;
    assert!(
        stderr.contains(&format!("broken.jsonl line {line}")),
        "{stderr}"
    );
    assert!(stderr.contains("caused by"), "{stderr}");

    // A missing final image: exit 3, not a pass.
    std::fs::write(&history, valid.jsonl()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ivha-campaign"))
        .args(["check", history.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no final image"));

    // A usage error is bad input too, not the verdict "unknown".
    let output = Command::new(env!("CARGO_BIN_EXE_ivha-campaign"))
        .args(["check", "--final", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
}
