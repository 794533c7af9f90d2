//! The checker over histories of a 3-node cluster: the same rules as for a pair. A node and
//! then its taker die (`kill_taker`); the third node serves both identities, then gives
//! them back.

#![allow(clippy::unwrap_used)]

use campaign::block::{self, BLOCK_SIZE};
use campaign::checker::{self, AnomalyKind, CheckOutcome, FinalContents, Verdict};
use campaign::history::{
    Action, End, Entry, Fault, History, Invoke, OkCompletion, RunInfo, ServeEnd, ServeStart,
    WriterSpec,
};
use campaign::report::Report;

const RUN_ID: u64 = 0x0123_4567_89ab_cdef;
const BLOCKS: u64 = 2;
const IDENTITIES: [&str; 3] = ["a", "b", "c"];

/// A history in which writer `i` writes identity `IDENTITIES[i]`.
struct Run {
    entries: Vec<Entry>,
    t: u64,
    op: u64,
    seqs: [u64; 3],
    images: Vec<Vec<u8>>,
}

impl Run {
    fn new() -> Self {
        let writers = (0..3)
            .map(|writer| WriterSpec {
                writer,
                identity: IDENTITIES[writer as usize].into(),
                first_block: 0,
                blocks: BLOCKS,
            })
            .collect();
        let mut run = Run {
            entries: vec![Entry::Run(RunInfo {
                t: 1_000,
                seed: 3,
                run_id: RUN_ID,
                block_size: BLOCK_SIZE as u64,
                writers,
            })],
            t: 1_000,
            op: 0,
            seqs: [0; 3],
            images: vec![vec![0; BLOCKS as usize * BLOCK_SIZE]; 3],
        };
        for identity in IDENTITIES {
            run.serve(identity, identity, true);
        }
        run
    }

    fn tick(&mut self) -> u64 {
        self.t += 10;
        self.t
    }

    fn serve(&mut self, identity: &str, node: &str, start: bool) {
        let t = self.tick();
        let (identity, node) = (identity.to_owned(), node.to_owned());
        self.entries.push(if start {
            Entry::ServeStart(ServeStart { t, identity, node })
        } else {
            Entry::ServeEnd(ServeEnd {
                t,
                identity,
                node,
                reason: "fenced".into(),
            })
        });
    }

    fn fault(&mut self, node: &str) {
        let t = self.tick();
        self.entries.push(Entry::Fault(Fault {
            t,
            cycle: 0,
            fault: "kill_taker".into(),
            node: node.into(),
            detail: "SIGKILL a; b took it over; SIGKILL b; c took a and b over".into(),
            node_t: None,
        }));
    }

    /// An acknowledged write by `writer` to `block`; lands in the final image if `lands`.
    fn write(&mut self, writer: u32, block: u64, lands: bool) {
        self.op += 1;
        self.seqs[writer as usize] += 1;
        let (op, seq) = (self.op, self.seqs[writer as usize]);
        let t = self.tick();
        self.entries.push(Entry::Invoke(Invoke {
            t,
            op,
            writer,
            action: Action::Write,
            block,
            seq: Some(seq),
            server: None,
        }));
        let t = self.tick();
        self.entries
            .push(Entry::Ok(OkCompletion { t, op, value: None }));
        if lands {
            let at = block as usize * BLOCK_SIZE;
            self.images[writer as usize][at..at + BLOCK_SIZE]
                .copy_from_slice(&block::encode(RUN_ID, writer, seq, block));
        }
    }

    /// Writes to both blocks of every identity.
    fn write_all(&mut self) {
        for writer in 0..3 {
            for block in 0..BLOCKS {
                self.write(writer, block, true);
            }
        }
    }

    fn history(&mut self) -> History {
        let t = self.tick();
        let mut entries = self.entries.clone();
        entries.push(Entry::End(End { t }));
        History::from_entries(entries).unwrap()
    }

    fn check(&mut self) -> CheckOutcome {
        let history = self.history();
        let mut finals = FinalContents::new();
        for (identity, image) in IDENTITIES.iter().zip(&self.images) {
            finals.insert(*identity, image.clone());
        }
        checker::check(&history, &finals).unwrap()
    }
}

/// a dies, b takes a over, b dies, c takes a and b over; both go home again.
fn kill_taker() -> Run {
    let mut run = Run::new();
    run.write_all();
    run.fault("a");
    run.serve("a", "a", false);
    run.serve("a", "b", true);
    run.write_all();
    run.serve("a", "b", false);
    run.serve("b", "b", false);
    run.serve("a", "c", true);
    run.serve("b", "c", true);
    run.write_all();
    for identity in ["a", "b"] {
        run.serve(identity, "c", false);
        run.serve(identity, identity, true);
    }
    run.write_all();
    run
}

#[test]
fn a_double_fault_in_three_nodes_is_valid() {
    let mut run = kill_taker();
    let outcome = run.check();
    assert_eq!(outcome.verdict, Verdict::Valid, "{outcome}");
    assert!(outcome.anomalies.is_empty(), "{outcome}");
    let report = Report::build(&run.history(), &outcome);
    assert_eq!(report.faults.get("kill_taker").copied(), Some(1));
}

#[test]
fn a_write_lost_on_the_third_identity_is_caught() {
    let mut run = kill_taker();
    run.write(2, 1, false);
    let outcome = run.check();
    assert_eq!(outcome.verdict, Verdict::Invalid);
    assert_eq!(outcome.anomalies.len(), 1, "{outcome}");
    let anomaly = &outcome.anomalies[0];
    assert_eq!(anomaly.kind, AnomalyKind::LostWrite);
    assert_eq!(anomaly.identity.as_deref(), Some("c"));
}

#[test]
fn two_takers_serving_one_identity_are_caught() {
    let mut run = kill_taker();
    // b serves a again while a, back home, serves it too.
    run.serve("a", "b", true);
    let outcome = run.check();
    assert_eq!(outcome.verdict, Verdict::Invalid);
    assert!(
        outcome
            .anomalies
            .iter()
            .any(|a| a.kind == AnomalyKind::DualServing && a.identity.as_deref() == Some("a")),
        "{outcome}"
    );
}
