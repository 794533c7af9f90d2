//! The ownership checks over hand-made histories of failovers without hostd: what the agents
//! published (claims, ejections, hostd's records, as the sampler read them) and which node
//! accepted each write's connection. Each anomaly is caught, and its legal near miss is not.

#![allow(clippy::unwrap_used)]

use campaign::block::{self, BLOCK_SIZE};
use campaign::checker::{self, AnomalyKind, CheckOutcome, FinalContents, Verdict};
use campaign::history::{
    Action, ClaimSeen, EjectionSeen, End, Entry, Fault, FaultStart, History, Invoke, OkCompletion,
    OwnerSeen, RunInfo, ServeEnd, ServeStart, WriterSpec,
};
use campaign::report::Report;

const RUN_ID: u64 = 0x5eed_0019_0000_0001;
const BLOCKS: u64 = 4;
/// Boot ids of the first lives of a and b.
const A_LIFE: u64 = 100;
const B_LIFE: u64 = 200;

/// A pair's history: writer 0 writes identity a, writer 1 identity b. Every entry is 1 ms
/// after the previous one.
struct Run {
    entries: Vec<Entry>,
    t: u64,
    op: u64,
    seqs: [u64; 2],
    images: [Vec<u8>; 2],
}

impl Run {
    /// Each node serves its own identity; the sampler's first read saw hostd's records.
    fn new() -> Self {
        let writers = (0..2)
            .map(|writer| WriterSpec {
                writer,
                identity: ["a", "b"][writer as usize].into(),
                first_block: 0,
                blocks: BLOCKS,
            })
            .collect();
        let mut run = Run {
            entries: vec![Entry::Run(RunInfo {
                t: 1_000_000,
                seed: 19,
                run_id: RUN_ID,
                block_size: BLOCK_SIZE as u64,
                writers,
            })],
            t: 1_000_000,
            op: 0,
            seqs: [0; 2],
            images: [
                vec![0; BLOCKS as usize * BLOCK_SIZE],
                vec![0; BLOCKS as usize * BLOCK_SIZE],
            ],
        };
        for node in ["a", "b"] {
            let t = run.tick();
            run.entries.push(Entry::ServeStart(ServeStart {
                t,
                identity: node.into(),
                node: node.into(),
            }));
        }
        run.owner("a", "a", 0, None);
        run.owner("b", "b", 0, None);
        run
    }

    fn tick(&mut self) -> u64 {
        self.t += 1000;
        self.t
    }

    /// hostd's record, read now (published after the read before, `since`).
    fn owner(&mut self, identity: &str, node: &str, epoch: u64, since: Option<u64>) {
        let t = self.tick();
        self.entries.push(Entry::Owner(OwnerSeen {
            t,
            since,
            identity: identity.into(),
            node: Some(node.into()),
            epoch,
        }));
    }

    /// `node` (in life `life`) claimed `identity` from `victim` (in life `victim_life`) at
    /// `generation`; published in the last sampling interval. Returns when it was read.
    fn claim(
        &mut self,
        node: &str,
        life: u64,
        identity: &str,
        victim: &str,
        victim_life: u64,
        generation: u64,
    ) -> u64 {
        let t = self.tick();
        self.entries.push(Entry::Claim(ClaimSeen {
            t,
            since: Some(t - 20),
            node: node.into(),
            identity: identity.into(),
            generation,
            victim: victim.into(),
            boot_id: Some(life),
            victim_boot_id: Some(victim_life),
        }));
        t
    }

    fn ejected(&mut self, node: &str, life: u64, generation: u64) -> u64 {
        let t = self.tick();
        self.entries.push(Entry::Ejected(EjectionSeen {
            t,
            since: Some(t - 20),
            node: node.into(),
            generation,
            reason: "not_member".into(),
            boot_id: Some(life),
        }));
        t
    }

    fn fault(&mut self, fault: &str, node: &str, node_t: Option<u64>) -> u64 {
        let t = self.tick();
        self.entries.push(Entry::Fault(Fault {
            t,
            cycle: 0,
            fault: fault.into(),
            node: node.into(),
            detail: String::new(),
            node_t,
        }));
        t
    }

    /// The nemesis starts `fault` of `cycle` (before it acts); returns when.
    fn fault_start(&mut self, cycle: u64, fault: &str, node: &str) -> u64 {
        let t = self.tick();
        self.entries.push(Entry::FaultStart(FaultStart {
            t,
            cycle,
            fault: fault.into(),
            node: node.into(),
        }));
        t
    }

    /// The `fault` entry of `cycle`, recorded once it hit, with `t` its start.
    fn fault_hit(&mut self, cycle: u64, fault: &str, node: &str, start: u64) {
        self.tick();
        self.entries.push(Entry::Fault(Fault {
            t: start,
            cycle,
            fault: fault.into(),
            node: node.into(),
            detail: String::new(),
            node_t: None,
        }));
    }

    /// Invokes a write by `writer` on a connection `server` accepted; returns (op, seq).
    fn write(&mut self, writer: u32, block: u64, server: Option<&str>) -> (u64, u64) {
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
            server: server.map(str::to_owned),
        }));
        (op, seq)
    }

    /// The write is acknowledged and lands.
    fn ack(&mut self, writer: u32, block: u64, (op, seq): (u64, u64)) {
        let t = self.tick();
        self.entries
            .push(Entry::Ok(OkCompletion { t, op, value: None }));
        let bytes = block::encode(RUN_ID, writer, seq, block);
        let start = block as usize * BLOCK_SIZE;
        self.images[writer as usize][start..start + BLOCK_SIZE].copy_from_slice(&bytes);
    }

    /// A write through `server`, acknowledged at once.
    fn acked(&mut self, writer: u32, block: u64, server: &str) {
        let write = self.write(writer, block, Some(server));
        self.ack(writer, block, write);
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

    fn check(mut self) -> (CheckOutcome, Report) {
        let t = self.tick();
        self.entries.push(Entry::End(End { t }));
        let history = History::from_entries(self.entries).unwrap();
        let mut finals = FinalContents::new();
        for (identity, image) in ["a", "b"].into_iter().zip(self.images) {
            finals.insert(identity, image);
        }
        let outcome = checker::check(&history, &finals).unwrap();
        let report = Report::build(&history, &outcome);
        (outcome, report)
    }
}

fn count(outcome: &CheckOutcome, kind: AnomalyKind) -> usize {
    outcome.anomalies.iter().filter(|a| a.kind == kind).count()
}

fn assert_only(outcome: &CheckOutcome, kind: AnomalyKind, expected: usize) {
    assert_eq!(outcome.verdict, Verdict::Invalid, "{outcome}");
    assert_eq!(count(outcome, kind), expected, "{outcome}");
    assert_eq!(outcome.anomalies.len(), expected, "{outcome}");
}

fn assert_valid(outcome: &CheckOutcome) {
    assert!(outcome.anomalies.is_empty(), "{outcome}");
    assert_eq!(outcome.verdict, Verdict::Valid, "{outcome}");
}

/// The zombie fault done right: hostd killed, a stopped; b claims a at generation 1 and
/// serves it; a wakes and ejects itself (its write after the claim fails); hostd back adopts
/// b's claim (its record at the same generation), ends a's serving, then a is restarted and
/// given a back at generation 2.
fn zombie_run() -> Run {
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.acked(1, 0, "b");
    let hit = run.fault("zombie", "a", None);
    if let Some(Entry::Fault(fault)) = run.entries.last_mut() {
        fault.node_t = Some(hit + 10);
    }
    // In flight when a stopped: a acknowledged it, before the claim.
    let straddling = run.write(0, 1, Some("a"));
    run.ack(0, 1, straddling);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    run.acked(0, 2, "b");
    run.acked(1, 1, "b");
    run.ejected("a", A_LIFE, 1);
    // hostd is back: it adopts the claim and ends a's serving.
    run.owner("a", "b", 1, Some(run.t));
    run.serve("a", "a", false);
    run.serve("a", "b", true);
    run.acked(0, 3, "b");
    // Giveback: b releases, a (restarted, a new life) owns a again at generation 2.
    run.serve("a", "b", false);
    let since = run.t;
    run.owner("a", "a", 2, Some(since));
    run.serve("a", "a", true);
    run.acked(0, 0, "a");
    run
}

#[test]
fn a_failover_without_hostd_done_right_is_valid() {
    let (outcome, report) = zombie_run().check();
    assert_valid(&outcome);
    let away = &report.takeovers_without_hostd;
    assert_eq!(away.count, 1);
    // Hit 10 µs after the fault's entry; claim read 2 ms after the fault (three entries,
    // 1 ms apart); first acknowledged op invoked after the hit: the straddling write's ack.
    assert_eq!(away.hit_to_claim_ms.max, Some(2.99));
    assert_eq!(away.hit_to_first_ok_ms.max, Some(1.99));
    assert!(report.to_string().contains("takeovers without hostd: 1"));
}

#[test]
fn a_write_acknowledged_by_the_zombie_after_the_claim_is_caught() {
    // a woke and acknowledged a write invoked after b's claim was read.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    let late = run.write(0, 1, Some("a"));
    run.ack(0, 1, late);
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::AckWithoutOwnership, 1);
    let anomaly = &outcome.anomalies[0];
    assert_eq!(anomaly.node.as_deref(), Some("a"));
    assert_eq!(anomaly.identity.as_deref(), Some("a"));
    assert_eq!((anomaly.op, anomaly.seq), (Some(2), Some(2)));
    assert!(
        anomaly
            .explanation
            .contains("owned by b (generation 1, its claim"),
        "{}",
        anomaly.explanation
    );
}

#[test]
fn near_misses_of_an_acknowledgement_without_ownership_are_not_caught() {
    // Invoked before the claim was read, acknowledged after: a may have checked before the
    // claim was published.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    let straddling = run.write(0, 1, Some("a"));
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    run.ack(0, 1, straddling);
    assert_valid(&run.check().0);

    // A record giving a back may have been published before the acknowledgement.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    let write = run.write(0, 1, Some("a"));
    run.owner("a", "a", 2, Some(run.t - 500));
    run.ack(0, 1, write);
    assert_valid(&run.check().0);

    // Which node answered is not known: nothing is claimed.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    run.acked(0, 1, "b");
    let unknown_server = run.write(0, 2, None);
    run.ack(0, 2, unknown_server);
    assert_valid(&run.check().0);

    // hostd's own moves count too: after hostd gave a to b at epoch 1, a write a
    // acknowledges is caught; one b acknowledges is not.
    let mut run = Run::new();
    run.fault("kill", "a", None);
    run.owner("a", "b", 1, Some(run.t));
    run.acked(0, 0, "b");
    assert_valid(&run.check().0);
    let mut run = Run::new();
    run.fault("kill", "a", None);
    run.owner("a", "b", 1, Some(run.t));
    run.acked(0, 0, "a");
    assert_only(&run.check().0, AnomalyKind::AckWithoutOwnership, 1);
}

#[test]
fn split_claims_are_caught() {
    // b and a both claimed identity a at generation 3 (two winners of one claim).
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("both_stop", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.claim("a", A_LIFE, "b", "b", B_LIFE, 3);
    let (outcome, _) = run.check();
    // Two identities, two claimants, one generation: one split (neither claim is older, so
    // neither was made by a node that had already lost).
    assert_only(&outcome, AnomalyKind::SplitClaim, 1);
    assert!(outcome.anomalies[0].explanation.contains("generation 3"));

    // Two claims of one identity at one generation.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.claim("a", A_LIFE, "a", "b", B_LIFE, 3);
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::SplitClaim, 1);
    assert_eq!(outcome.anomalies[0].identity.as_deref(), Some("a"));

    // hostd's record and a claim name different owners at one generation.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("hostd_down_kill", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.owner("a", "a", 3, Some(run.t));
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::SplitClaim, 1);
    assert_eq!(outcome.anomalies[0].node.as_deref(), Some("b"));
}

#[test]
fn one_claim_of_several_identities_and_its_adoption_are_no_split() {
    // In a larger cluster a claim moves every identity of the victim at one generation;
    // hostd adopts it at that generation.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("hostd_down_kill", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.claim("b", B_LIFE, "b", "a", A_LIFE, 3);
    run.owner("a", "b", 3, Some(run.t));
    assert_valid(&run.check().0);
}

#[test]
fn a_claim_by_a_node_that_lost_is_caught() {
    // Both woke; b won a at generation 3, then a (same life, no longer a member) won b.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("both_stop", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.claim("a", A_LIFE, "b", "b", B_LIFE, 4);
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::ClaimByNonMember, 1);
    assert_eq!(outcome.anomalies[0].node.as_deref(), Some("a"));

    // A claim after its own ejection, in the same life.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.ejected("a", A_LIFE, 2);
    run.claim("a", A_LIFE, "b", "b", B_LIFE, 4);
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::ClaimByNonMember, 1);
    assert!(outcome.anomalies[0].explanation.contains("ejected itself"));
}

#[test]
fn a_node_restarted_after_losing_may_claim_again() {
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("zombie", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 3);
    run.ejected("a", A_LIFE, 3);
    // hostd restarted a (a new life) and later, away again, a took b over.
    run.claim("a", A_LIFE + 1, "b", "b", B_LIFE, 5);
    assert_valid(&run.check().0);
}

#[test]
fn a_move_during_links_down_is_caught() {
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("links_down", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    let (outcome, _) = run.check();
    assert_only(&outcome, AnomalyKind::UnexpectedMove, 1);
    assert!(
        outcome.anomalies[0]
            .explanation
            .contains("during links_down on a"),
        "{}",
        outcome.anomalies[0].explanation
    );

    // hostd's moves count as well, after hostd_restart.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("hostd_restart", "a", None);
    run.owner("a", "b", 1, Some(run.t));
    assert_only(&run.check().0, AnomalyKind::UnexpectedMove, 1);
}

#[test]
fn a_move_of_the_next_fault_is_not_blamed_on_links_down() {
    // links_down (cycle 0) hit and returned; zombie (cycle 1) started, b claimed a, and the
    // zombie could not be injected (no `fault` entry): hostd, back, adopted the claim.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    let start = run.fault_start(0, "links_down", "a");
    run.acked(0, 1, "a");
    run.fault_hit(0, "links_down", "a", start);
    run.acked(0, 2, "a");
    run.fault_start(1, "zombie", "a");
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    run.owner("a", "b", 1, Some(run.t));
    run.acked(0, 3, "b");
    assert_valid(&run.check().0);
}

#[test]
fn a_move_during_links_down_is_caught_before_the_next_fault_starts() {
    // b claimed a during links_down, while the nemesis was still injecting it (before its
    // `fault` entry), and the next fault started later.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    let start = run.fault_start(0, "links_down", "a");
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    run.fault_hit(0, "links_down", "a", start);
    run.owner("a", "b", 1, Some(run.t));
    run.fault_start(1, "zombie", "b");
    let (outcome, _) = run.check();
    // The claim and hostd's adoption of it.
    assert_only(&outcome, AnomalyKind::UnexpectedMove, 2);
    assert!(
        outcome.anomalies[0]
            .explanation
            .contains("during links_down on a (cycle 0"),
        "{}",
        outcome.anomalies[0].explanation
    );

    // A links_down that could not be injected (no `fault` entry) still owns its moves.
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault_start(0, "links_down", "a");
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    assert_only(&run.check().0, AnomalyKind::UnexpectedMove, 1);
}

#[test]
fn moves_of_faults_that_kill_and_earlier_moves_are_expected() {
    let mut run = Run::new();
    run.acked(0, 0, "a");
    run.fault("hostd_down_kill", "a", None);
    run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
    // Published before links_down hit (its since is before the fault), read after it.
    run.fault("links_down", "b", None);
    if let Some(Entry::Fault(fault)) = run.entries.last_mut() {
        fault.t -= 500;
    }
    run.owner("a", "b", 1, Some(run.t - 900));
    run.acked(0, 1, "b");
    assert_valid(&run.check().0);
}

#[test]
fn claims_close_the_gaps_in_hostds_record() {
    // hostd, back, ended a's serving before it started b's: writes b acknowledged between
    // are fine when b's claim was published before, as a `write_after_fence` otherwise.
    let build = |with_claim: bool| {
        let mut run = Run::new();
        run.acked(0, 0, "a");
        run.fault("hostd_down_kill", "a", None);
        if with_claim {
            run.claim("b", B_LIFE, "a", "a", A_LIFE, 1);
        }
        run.serve("a", "a", false);
        // Which node answered is not known here.
        let write = run.write(0, 1, None);
        run.ack(0, 1, write);
        run.serve("a", "b", true);
        run.check().0
    };
    assert_valid(&build(true));
    assert_only(&build(false), AnomalyKind::WriteAfterFence, 1);
}

#[test]
fn the_new_entries_round_trip_through_json() {
    let run = zombie_run();
    let text: String = run
        .entries
        .iter()
        .map(|entry| serde_json::to_string(entry).unwrap() + "\n")
        .collect();
    assert!(text.contains(r#""kind":"claim""#), "{text}");
    assert!(text.contains(r#""server":"b""#), "{text}");
    assert!(text.contains(r#""node_t":"#), "{text}");
    let parsed = History::parse(text.as_bytes(), "test").unwrap();
    assert_eq!(parsed.entries(), &run.entries[..]);
    // Older histories (no server, no node_t, no sampler) still read.
    let old = concat!(
        r#"{"kind":"run","t":1,"seed":1,"run_id":2,"block_size":4096,"writers":[]}"#,
        "\n",
        r#"{"kind":"fault","t":2,"cycle":0,"fault":"kill","node":"a"}"#,
        "\n"
    );
    assert!(History::parse(old.as_bytes(), "old").is_ok());
}
