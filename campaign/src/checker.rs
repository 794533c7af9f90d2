//! The checker: proves from a history and the final disk contents that nothing acknowledged
//! was lost, or lists the anomalies that show otherwise.
//!
//! Every block is owned by one writer, and a writer has one operation in flight, so each
//! block's history is a single sequential client's (apart from writes whose outcome is
//! unknown, which may still land later). Times come from several threads, so anything that
//! needs time order sorts by `t` rather than trusting file order.
//!
//! The checks of ownership from what the agents published and what the clients saw, not
//! from hostd's record, are in [`ownership`].

mod ownership;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::block::{self, BLOCK_SIZE, BlockValue};
use crate::history::{Action, Entry, History, Invoke, WriterSpec};

/// How many anomalies of one kind the human summary lists before "and N more".
pub const LISTED_PER_KIND: usize = 50;

/// The final contents of each identity's export: raw bytes from offset 0, covering at least
/// every writer's blocks.
#[derive(Debug, Clone, Default)]
pub struct FinalContents {
    images: BTreeMap<String, Vec<u8>>,
}

impl FinalContents {
    /// No images yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the final image of `identity`.
    pub fn insert(&mut self, identity: impl Into<String>, bytes: Vec<u8>) {
        self.images.insert(identity.into(), bytes);
    }

    /// The final image of `identity`, if given.
    pub fn image(&self, identity: &str) -> Option<&[u8]> {
        self.images.get(identity).map(Vec::as_slice)
    }

    /// Reads the final image files, `(identity, path)`, each only as far as the history's
    /// writers need. Errors if a file is unreadable, shorter than needed, or given twice.
    pub fn load(history: &History, files: &[(String, PathBuf)]) -> Result<Self, CheckError> {
        let mut finals = FinalContents::new();
        for (identity, path) in files {
            if finals.images.contains_key(identity) {
                return Err(CheckError::FinalGivenTwice {
                    identity: identity.clone(),
                });
            }
            let needed = needed_bytes(history, identity);
            let read_error = |source| CheckError::ReadFinal {
                identity: identity.clone(),
                path: path.clone(),
                source,
            };
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|file| file.take(needed).read_to_end(&mut bytes))
                .map_err(read_error)?;
            if (bytes.len() as u64) < needed {
                return Err(CheckError::FinalFileTooShort {
                    identity: identity.clone(),
                    path: path.clone(),
                    len: bytes.len() as u64,
                    needed,
                });
            }
            finals.insert(identity.clone(), bytes);
        }
        Ok(finals)
    }
}

/// Bytes of `identity`'s export that its writers' blocks cover (0 if it has no writers).
pub fn needed_bytes(history: &History, identity: &str) -> u64 {
    writers_needed_bytes(&history.run().writers, identity)
}

/// Bytes of `identity`'s export that the blocks of `writers` on it cover (0 if none).
pub fn writers_needed_bytes(writers: &[WriterSpec], identity: &str) -> u64 {
    writers
        .iter()
        .filter(|spec| spec.identity == identity && spec.blocks > 0)
        .filter_map(|spec| spec.end_block()?.checked_mul(BLOCK_SIZE as u64))
        .max()
        .unwrap_or(0)
}

/// The checker could not judge: its input is incomplete.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// An identity with writers has no final image.
    #[error("no final image of identity {identity}, which has writers")]
    MissingFinal {
        /// The identity.
        identity: String,
    },
    /// A final image does not cover every writer's blocks.
    #[error(
        "the final image of identity {identity} is {len} bytes, shorter than the {needed} bytes its writers' blocks cover"
    )]
    FinalTooShort {
        /// The identity.
        identity: String,
        /// The image's length.
        len: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// A final image file does not cover every writer's blocks.
    #[error(
        "final image {path} of identity {identity} is {len} bytes, shorter than the {needed} bytes its writers' blocks cover"
    )]
    FinalFileTooShort {
        /// The identity.
        identity: String,
        /// The file.
        path: PathBuf,
        /// The file's length.
        len: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// A final image file could not be read.
    #[error("cannot read final image {path} of identity {identity}")]
    ReadFinal {
        /// The identity.
        identity: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Two final images for one identity.
    #[error("two final images given for identity {identity}")]
    FinalGivenTwice {
        /// The identity.
        identity: String,
    },
}

/// The checker's conclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Faults fired, operations were acknowledged, and no anomaly was found.
    Valid,
    /// At least one anomaly.
    Invalid,
    /// No anomaly, but the run proves nothing: nothing was acknowledged or no fault fired.
    Unknown,
}

impl Verdict {
    /// The `ivha-campaign check` exit code: 0 valid, 1 invalid, 2 unknown.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Valid => 0,
            Verdict::Invalid => 1,
            Verdict::Unknown => 2,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Valid => "valid",
            Verdict::Invalid => "invalid",
            Verdict::Unknown => "unknown",
        })
    }
}

/// The kinds of anomaly the checker finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// An acknowledged write is not in the final contents.
    LostWrite,
    /// A value no invoke wrote there (or a read of a value from the future).
    NeverInvoked,
    /// A block holds corrupt data.
    CorruptBlock,
    /// A write or op seen twice, or a write found in a block it was not aimed at.
    Duplicate,
    /// A read older than what was acknowledged or read before it.
    OrderViolation,
    /// A write that definitely failed is visible.
    FailedWriteLanded,
    /// A write acknowledged while no node was serving its identity.
    WriteAfterFence,
    /// Two nodes served the same identity at once.
    DualServing,
    /// A write acknowledged by a node after another node's ownership of its identity was
    /// published (a claim or hostd's record), with nothing giving it back in between.
    AckWithoutOwnership,
    /// Two owners of one identity at one generation, or two nodes' claims at one
    /// generation.
    SplitClaim,
    /// A claim by a node that had lost its membership (it was claimed from, or ejected
    /// itself) in the same life.
    ClaimByNonMember,
    /// An identity moved during a fault that kills nothing.
    UnexpectedMove,
}

impl AnomalyKind {
    /// Every kind, in report order.
    pub const ALL: [AnomalyKind; 12] = [
        AnomalyKind::LostWrite,
        AnomalyKind::NeverInvoked,
        AnomalyKind::CorruptBlock,
        AnomalyKind::Duplicate,
        AnomalyKind::OrderViolation,
        AnomalyKind::FailedWriteLanded,
        AnomalyKind::WriteAfterFence,
        AnomalyKind::DualServing,
        AnomalyKind::AckWithoutOwnership,
        AnomalyKind::SplitClaim,
        AnomalyKind::ClaimByNonMember,
        AnomalyKind::UnexpectedMove,
    ];

    /// The kind's name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::LostWrite => "lost_write",
            AnomalyKind::NeverInvoked => "never_invoked",
            AnomalyKind::CorruptBlock => "corrupt_block",
            AnomalyKind::Duplicate => "duplicate",
            AnomalyKind::OrderViolation => "order_violation",
            AnomalyKind::FailedWriteLanded => "failed_write_landed",
            AnomalyKind::WriteAfterFence => "write_after_fence",
            AnomalyKind::DualServing => "dual_serving",
            AnomalyKind::AckWithoutOwnership => "ack_without_ownership",
            AnomalyKind::SplitClaim => "split_claim",
            AnomalyKind::ClaimByNonMember => "claim_by_non_member",
            AnomalyKind::UnexpectedMove => "unexpected_move",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When two nodes both served one identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServingWindow {
    /// Start of the overlap (µs since the epoch).
    pub from: u64,
    /// End of the overlap; None if both intervals are still open.
    pub until: Option<u64>,
    /// The two nodes.
    pub nodes: [String; 2],
}

/// One thing the checker found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    /// What kind of anomaly.
    pub kind: AnomalyKind,
    /// The identity (export) concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The block concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    /// The writer of the write concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer: Option<u32>,
    /// The seq of the write concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The operation concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<u64>,
    /// The node concerned: the one that acknowledged or claimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For `dual_serving`, when and who.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<ServingWindow>,
    /// One sentence for humans.
    pub explanation: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(identity) = &self.identity {
            write!(f, " identity {identity}")?;
        }
        if let Some(block) = self.block {
            write!(f, " block {block}")?;
        }
        if let Some(writer) = self.writer {
            write!(f, " writer {writer}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " seq {seq}")?;
        }
        if let Some(op) = self.op {
            write!(f, " op {op}")?;
        }
        if let Some(node) = &self.node {
            write!(f, " node {node}")?;
        }
        write!(f, ": {}", self.explanation)
    }
}

/// Operation counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    /// Acknowledged.
    pub ok: usize,
    /// Definitely not done.
    pub fail: usize,
    /// Maybe done (including ops that never completed).
    pub unknown: usize,
}

/// Operation counts by action and outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    /// Reads.
    pub reads: OutcomeCounts,
    /// Writes.
    pub writes: OutcomeCounts,
}

/// Everything the checker concluded.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    /// The verdict.
    pub verdict: Verdict,
    /// Why the verdict is `unknown`, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_reason: Option<String>,
    /// Anomaly counts by kind (every kind, zeros included).
    pub anomaly_counts: BTreeMap<AnomalyKind, usize>,
    /// Operation counts.
    pub operations: OpCounts,
    /// Every anomaly, sorted by kind.
    pub anomalies: Vec<Anomaly>,
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "verdict: {}", self.verdict)?;
        if let Some(reason) = &self.unknown_reason {
            write!(f, " ({reason})")?;
        }
        writeln!(f)?;
        let ops = &self.operations;
        writeln!(
            f,
            "writes: {} ok, {} fail, {} unknown; reads: {} ok, {} fail, {} unknown",
            ops.writes.ok,
            ops.writes.fail,
            ops.writes.unknown,
            ops.reads.ok,
            ops.reads.fail,
            ops.reads.unknown
        )?;
        writeln!(f, "anomalies: {}", join_counts(&self.anomaly_counts))?;
        for kind in AnomalyKind::ALL {
            let mut of_kind = self.anomalies.iter().filter(|a| a.kind == kind);
            for anomaly in of_kind.by_ref().take(LISTED_PER_KIND) {
                writeln!(f, "  {anomaly}")?;
            }
            let more = of_kind.count();
            if more > 0 {
                writeln!(f, "  {kind}: and {more} more")?;
            }
        }
        Ok(())
    }
}

/// Checks `history` against the final contents of the exports.
pub fn check(history: &History, finals: &FinalContents) -> Result<CheckOutcome, CheckError> {
    for spec in &history.run().writers {
        let Some(image) = finals.image(&spec.identity) else {
            return Err(CheckError::MissingFinal {
                identity: spec.identity.clone(),
            });
        };
        let needed = needed_bytes(history, &spec.identity);
        if (image.len() as u64) < needed {
            return Err(CheckError::FinalTooShort {
                identity: spec.identity.clone(),
                len: image.len() as u64,
                needed,
            });
        }
    }

    let mut checker = Checker::new(history);
    checker.check_final_contents(finals);
    checker.check_reads();
    // A claim starts its node's serving while hostd is away, when hostd records nothing:
    // no identity is unserved from it on (hostd's own record alone judges dual serving).
    checker.check_fences(&checker.serve_intervals(true));
    checker.check_dual_serving(&checker.serve_intervals(false));
    checker.anomalies.extend(ownership::check(history));

    let operations = checker.op_counts();
    let mut anomalies = checker.anomalies;
    anomalies.sort_by(|x, y| {
        (x.kind, &x.identity, x.block, x.op).cmp(&(y.kind, &y.identity, y.block, y.op))
    });
    let mut anomaly_counts: BTreeMap<AnomalyKind, usize> =
        AnomalyKind::ALL.iter().map(|&kind| (kind, 0)).collect();
    for anomaly in &anomalies {
        *anomaly_counts.entry(anomaly.kind).or_default() += 1;
    }
    let any_ok = operations.reads.ok + operations.writes.ok > 0;
    let any_fault = history
        .entries()
        .iter()
        .any(|entry| matches!(entry, Entry::Fault(_)));
    let (verdict, unknown_reason) = if !anomalies.is_empty() {
        (Verdict::Invalid, None)
    } else if !any_ok {
        (
            Verdict::Unknown,
            Some("no operation was acknowledged".to_owned()),
        )
    } else if !any_fault {
        (Verdict::Unknown, Some("no fault fired".to_owned()))
    } else {
        (Verdict::Valid, None)
    };
    Ok(CheckOutcome {
        verdict,
        unknown_reason,
        anomaly_counts,
        operations,
        anomalies,
    })
}

/// How an operation ended.
#[derive(Debug, Clone, Copy)]
enum Outcome<'h> {
    Ok {
        t: u64,
        value: Option<&'h BlockValue>,
    },
    Fail,
    Unknown,
}

impl Outcome<'_> {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        }
    }
}

#[derive(Debug)]
struct OpRecord<'h> {
    invoke: &'h Invoke,
    identity: &'h str,
    /// None until a completion is seen; no completion at all means unknown.
    outcome: Option<Outcome<'h>>,
}

impl<'h> OpRecord<'h> {
    fn outcome(&self) -> Outcome<'h> {
        self.outcome.unwrap_or(Outcome::Unknown)
    }

    fn seq(&self) -> u64 {
        self.invoke.seq.unwrap_or(0)
    }
}

/// Where a block value was seen.
#[derive(Debug, Clone, Copy)]
enum Seen {
    Final,
    Read { op: u64, completed_t: u64 },
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Final => f.write_str("the final image"),
            Seen::Read { op, .. } => write!(f, "read op {op}"),
        }
    }
}

impl Seen {
    fn op(self) -> Option<u64> {
        match self {
            Seen::Final => None,
            Seen::Read { op, .. } => Some(op),
        }
    }

    /// When the read completed; None for the final image.
    fn completed_t(self) -> Option<u64> {
        match self {
            Seen::Final => None,
            Seen::Read { completed_t, .. } => Some(completed_t),
        }
    }
}

/// A read's value for humans, formatted only when shown: "zeros" or "seq N".
#[derive(Debug, Clone, Copy)]
struct ReadValue(u64);

impl fmt::Display for ReadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("zeros"),
            seq => write!(f, "seq {seq}"),
        }
    }
}

/// What a seen value turned out to be.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Never written.
    Zero,
    /// A write aimed at this block (op, its seq).
    Write { op: u64, seq: u64 },
    /// Not a value this block may hold; already reported.
    Bad,
}

struct Checker<'h> {
    history: &'h History,
    ops: BTreeMap<u64, OpRecord<'h>>,
    /// (writer, seq) to the op that first invoked that write.
    write_ops: HashMap<(u32, u64), u64>,
    /// (identity, block) to the ops on it, in op-id order.
    block_ops: BTreeMap<(&'h str, u64), Vec<u64>>,
    anomalies: Vec<Anomaly>,
}

impl<'h> Checker<'h> {
    fn new(history: &'h History) -> Self {
        let mut checker = Checker {
            history,
            ops: BTreeMap::new(),
            write_ops: HashMap::new(),
            block_ops: BTreeMap::new(),
            anomalies: Vec::new(),
        };
        for entry in history.entries() {
            match entry {
                Entry::Invoke(invoke) => checker.add_invoke(invoke),
                Entry::Ok(ok) => checker.complete(
                    ok.op,
                    Outcome::Ok {
                        t: ok.t,
                        value: ok.value.as_ref(),
                    },
                ),
                Entry::Fail(fail) => checker.complete(fail.op, Outcome::Fail),
                Entry::Unknown(unknown) => checker.complete(unknown.op, Outcome::Unknown),
                _ => {}
            }
        }
        for (&op, record) in &checker.ops {
            checker
                .block_ops
                .entry((record.identity, record.invoke.block))
                .or_default()
                .push(op);
        }
        checker
    }

    fn add_invoke(&mut self, invoke: &'h Invoke) {
        // History validation guarantees a declared writer; skip rather than panic anyway.
        let Some(spec) = self.history.writer(invoke.writer) else {
            return;
        };
        if let Some(first) = self.ops.get(&invoke.op) {
            let explanation = format!(
                "op {} was invoked twice (first at t={}, again at t={}).",
                invoke.op, first.invoke.t, invoke.t
            );
            self.report(AnomalyKind::Duplicate, explanation, |a| {
                a.identity = Some(spec.identity.clone());
                a.block = Some(invoke.block);
                a.writer = Some(invoke.writer);
                a.op = Some(invoke.op);
            });
            return;
        }
        if let (Action::Write, Some(seq)) = (invoke.action, invoke.seq) {
            if let Some(&first_op) = self.write_ops.get(&(invoke.writer, seq)) {
                let explanation = format!(
                    "writer {} invoked write seq {seq} twice, as op {first_op} and op {}.",
                    invoke.writer, invoke.op
                );
                self.report(AnomalyKind::Duplicate, explanation, |a| {
                    a.identity = Some(spec.identity.clone());
                    a.block = Some(invoke.block);
                    a.writer = Some(invoke.writer);
                    a.seq = Some(seq);
                    a.op = Some(invoke.op);
                });
            } else {
                self.write_ops.insert((invoke.writer, seq), invoke.op);
            }
        }
        self.ops.insert(
            invoke.op,
            OpRecord {
                invoke,
                identity: &spec.identity,
                outcome: None,
            },
        );
    }

    fn complete(&mut self, op: u64, outcome: Outcome<'h>) {
        let Some(record) = self.ops.get_mut(&op) else {
            return;
        };
        let Some(first) = record.outcome else {
            record.outcome = Some(outcome);
            return;
        };
        let explanation = format!(
            "op {op} was completed twice, first {} then {}.",
            first.name(),
            outcome.name()
        );
        let (identity, block, writer) = (
            record.identity.to_owned(),
            record.invoke.block,
            record.invoke.writer,
        );
        self.report(AnomalyKind::Duplicate, explanation, |a| {
            a.identity = Some(identity);
            a.block = Some(block);
            a.writer = Some(writer);
            a.op = Some(op);
        });
    }

    fn report(
        &mut self,
        kind: AnomalyKind,
        explanation: String,
        details: impl FnOnce(&mut Anomaly),
    ) {
        let mut anomaly = Anomaly {
            kind,
            identity: None,
            block: None,
            writer: None,
            seq: None,
            op: None,
            node: None,
            window: None,
            explanation,
        };
        details(&mut anomaly);
        self.anomalies.push(anomaly);
    }

    fn op_counts(&self) -> OpCounts {
        let mut counts = OpCounts::default();
        for record in self.ops.values() {
            let by_action = match record.invoke.action {
                Action::Read => &mut counts.reads,
                Action::Write => &mut counts.writes,
            };
            match record.outcome() {
                Outcome::Ok { .. } => by_action.ok += 1,
                Outcome::Fail => by_action.fail += 1,
                Outcome::Unknown => by_action.unknown += 1,
            }
        }
        counts
    }

    /// Works out where `value`, seen in `block` of `identity`, came from, reporting a value
    /// that block should never hold.
    fn trace_origin(
        &mut self,
        identity: &str,
        block: u64,
        value: &BlockValue,
        seen: Seen,
    ) -> Origin {
        match *value {
            BlockValue::Zero => Origin::Zero,
            BlockValue::Corrupt { ref reason } => {
                let explanation = format!("block {block} holds corrupt data in {seen}: {reason}.");
                self.report(AnomalyKind::CorruptBlock, explanation, |a| {
                    a.identity = Some(identity.to_owned());
                    a.block = Some(block);
                    a.op = seen.op();
                });
                Origin::Bad
            }
            BlockValue::Misplaced {
                writer,
                seq,
                aimed_at,
            } => {
                let invoked = self.write_op(writer, seq);
                let aimed_right = invoked.is_some_and(|r| r.invoke.block == aimed_at);
                let (kind, explanation) = if aimed_right {
                    (
                        AnomalyKind::Duplicate,
                        format!(
                            "block {block} holds writer {writer} seq {seq} in {seen}, which was aimed at block {aimed_at}."
                        ),
                    )
                } else {
                    (
                        AnomalyKind::NeverInvoked,
                        format!(
                            "block {block} holds writer {writer} seq {seq} aimed at block {aimed_at} in {seen}, but no invoke wrote that."
                        ),
                    )
                };
                self.report_value(kind, explanation, identity, block, writer, seq, seen.op());
                Origin::Bad
            }
            BlockValue::Write { writer, seq } => {
                self.trace_write(identity, block, writer, seq, seen)
            }
        }
    }

    fn trace_write(
        &mut self,
        identity: &str,
        block: u64,
        writer: u32,
        seq: u64,
        seen: Seen,
    ) -> Origin {
        let found = self.write_op(writer, seq).map(|record| {
            (
                record.invoke.op,
                record.invoke.t,
                record.invoke.block,
                record.identity,
                record.outcome(),
            )
        });
        let (kind, explanation) = match found {
            None => (
                AnomalyKind::NeverInvoked,
                format!(
                    "block {block} holds writer {writer} seq {seq} in {seen}, which no invoke wrote."
                ),
            ),
            Some((write_op, _, write_block, ..)) if write_block != block => (
                AnomalyKind::NeverInvoked,
                format!(
                    "block {block} holds writer {writer} seq {seq} in {seen} claiming block {block}, but op {write_op} aimed it at block {write_block}."
                ),
            ),
            Some((write_op, _, _, write_identity, _)) if write_identity != identity => (
                AnomalyKind::Duplicate,
                format!(
                    "block {block} of identity {identity} holds writer {writer} seq {seq} in {seen}, which op {write_op} wrote to identity {write_identity}."
                ),
            ),
            Some((write_op, write_t, ..)) if seen.completed_t().is_some_and(|t| write_t > t) => (
                AnomalyKind::NeverInvoked,
                format!(
                    "{seen} of block {block} returned writer {writer} seq {seq}, but write op {write_op} was invoked only after the read completed."
                ),
            ),
            Some((write_op, .., outcome)) => {
                if let Outcome::Fail = outcome {
                    let explanation = format!(
                        "block {block} holds writer {writer} seq {seq} in {seen}, whose write op {write_op} failed."
                    );
                    self.report_value(
                        AnomalyKind::FailedWriteLanded,
                        explanation,
                        identity,
                        block,
                        writer,
                        seq,
                        seen.op().or(Some(write_op)),
                    );
                }
                return Origin::Write { op: write_op, seq };
            }
        };
        self.report_value(kind, explanation, identity, block, writer, seq, seen.op());
        Origin::Bad
    }

    #[allow(clippy::too_many_arguments)]
    fn report_value(
        &mut self,
        kind: AnomalyKind,
        explanation: String,
        identity: &str,
        block: u64,
        writer: u32,
        seq: u64,
        op: Option<u64>,
    ) {
        self.report(kind, explanation, |a| {
            a.identity = Some(identity.to_owned());
            a.block = Some(block);
            a.writer = Some(writer);
            a.seq = Some(seq);
            a.op = op;
        });
    }

    fn write_op(&self, writer: u32, seq: u64) -> Option<&OpRecord<'h>> {
        let op = self.write_ops.get(&(writer, seq))?;
        self.ops.get(op)
    }

    fn ops_on(&self, identity: &str, block: u64) -> Vec<&OpRecord<'h>> {
        self.block_ops
            .get(&(identity, block))
            .into_iter()
            .flatten()
            .filter_map(|op| self.ops.get(op))
            .collect()
    }

    /// The acknowledged write of `block` with the highest seq: (op, seq).
    fn last_acked_write(&self, identity: &str, block: u64) -> Option<(u64, u64)> {
        self.ops_on(identity, block)
            .into_iter()
            .filter(|r| r.invoke.action == Action::Write)
            .filter(|r| matches!(r.outcome(), Outcome::Ok { .. }))
            .map(|r| (r.invoke.op, r.seq()))
            .max_by_key(|&(_, seq)| seq)
    }

    fn check_final_contents(&mut self, finals: &FinalContents) {
        let run_id = self.history.run().run_id;
        for spec in &self.history.run().writers {
            let (Some(image), Some(end)) = (finals.image(&spec.identity), spec.end_block()) else {
                continue;
            };
            for block in spec.first_block..end {
                let bytes = usize::try_from(block)
                    .ok()
                    .and_then(|b| b.checked_mul(BLOCK_SIZE))
                    .and_then(|start| image.get(start..start.checked_add(BLOCK_SIZE)?));
                // `check` made sure every image covers its writers' blocks.
                let Some(bytes) = bytes else {
                    continue;
                };
                let value = block::decode(bytes, run_id, block);
                self.check_final_block(&spec.identity, block, &value);
            }
        }
    }

    fn check_final_block(&mut self, identity: &str, block: u64, value: &BlockValue) {
        let origin = self.trace_origin(identity, block, value, Seen::Final);
        let Some((acked_op, acked_seq)) = self.last_acked_write(identity, block) else {
            return;
        };
        let kept = match origin {
            Origin::Write { seq, .. } if seq == acked_seq => true,
            // A later write that may or may not have happened can overwrite the acked one.
            Origin::Write { op, seq } if seq > acked_seq => {
                matches!(
                    self.ops.get(&op).map(OpRecord::outcome),
                    Some(Outcome::Unknown)
                )
            }
            _ => false,
        };
        if !kept {
            let writer = self.ops.get(&acked_op).map(|r| r.invoke.writer);
            let explanation = format!(
                "write op {acked_op} (seq {acked_seq}) to block {block} was acknowledged, but the final contents hold {value}."
            );
            self.report(AnomalyKind::LostWrite, explanation, |a| {
                a.identity = Some(identity.to_owned());
                a.block = Some(block);
                a.writer = writer;
                a.seq = Some(acked_seq);
                a.op = Some(acked_op);
            });
        }
    }

    /// Checks every successful read: where its value came from, and that it is not older than
    /// what was acknowledged or read before the read was invoked.
    fn check_reads(&mut self) {
        let blocks: Vec<(&'h str, u64)> = self.block_ops.keys().copied().collect();
        for (identity, block) in blocks {
            self.check_reads_of_block(identity, block);
        }
    }

    fn check_reads_of_block(&mut self, identity: &str, block: u64) {
        // (t, seq, op): acked writes by completion time, usable reads by completion time, and
        // the same reads by invocation time. Zero reads as seq 0.
        let mut acked = Vec::new();
        let mut reads_done = Vec::new();
        let mut reads_started = Vec::new();
        let mut reads = Vec::new();
        for record in self.ops_on(identity, block) {
            match (record.invoke.action, record.outcome()) {
                (Action::Write, Outcome::Ok { t, .. }) => {
                    acked.push((t, record.seq(), record.invoke.op));
                }
                (
                    Action::Read,
                    Outcome::Ok {
                        t,
                        value: Some(value),
                    },
                ) => {
                    reads.push((record.invoke.op, record.invoke.t, t, value));
                }
                _ => {}
            }
        }
        for (op, invoke_t, completed_t, value) in reads {
            let seen = Seen::Read { op, completed_t };
            let seq = match self.trace_origin(identity, block, value, seen) {
                Origin::Zero => 0,
                Origin::Write { seq, .. } => seq,
                Origin::Bad => continue,
            };
            reads_done.push((completed_t, seq, op));
            reads_started.push((invoke_t, seq, op));
        }
        acked.sort_unstable();
        reads_done.sort_unstable();
        reads_started.sort_unstable();

        // Same-block ops are one writer's, which completes one before invoking the next, so
        // equal times mean "before".
        let (mut next_ack, mut next_done) = (0, 0);
        let mut newest_acked: Option<(u64, u64)> = None;
        let mut newest_read: Option<(u64, u64)> = None;
        for &(invoke_t, seq, op) in &reads_started {
            while let Some(&(t, s, o)) = acked.get(next_ack)
                && t <= invoke_t
            {
                if newest_acked.is_none_or(|(best, _)| s > best) {
                    newest_acked = Some((s, o));
                }
                next_ack += 1;
            }
            while let Some(&(t, s, o)) = reads_done.get(next_done)
                && t <= invoke_t
            {
                if o != op && newest_read.is_none_or(|(best, _)| s > best) {
                    newest_read = Some((s, o));
                }
                next_done += 1;
            }
            let read_value = ReadValue(seq);
            let violation = match (newest_acked, newest_read) {
                (Some((acked_seq, acked_op)), _) if seq < acked_seq => Some(format!(
                    "read op {op} of block {block} returned {read_value}, older than seq {acked_seq} that write op {acked_op} acknowledged before the read began (stale read)."
                )),
                (_, Some((read_seq, read_op))) if seq < read_seq => Some(format!(
                    "read op {op} of block {block} returned {read_value}, older than seq {read_seq} that read op {read_op} returned before it began (regression)."
                )),
                _ => None,
            };
            if let Some(explanation) = violation {
                let writer = self.ops.get(&op).map(|r| r.invoke.writer);
                self.report(AnomalyKind::OrderViolation, explanation, |a| {
                    a.identity = Some(identity.to_owned());
                    a.block = Some(block);
                    a.writer = writer;
                    a.seq = (seq > 0).then_some(seq);
                    a.op = Some(op);
                });
            }
        }
    }

    /// Serving intervals per identity, from `serve_start`/`serve_end` in time order; with
    /// `claims`, a claim also starts its node's serving (it serves after publishing it, so
    /// the read before it was seen is a lower bound, as hostd's starts are).
    fn serve_intervals(&self, claims: bool) -> BTreeMap<&'h str, Vec<ServeInterval<'h>>> {
        let mut events: Vec<(u64, usize, &'h str, &'h str, bool)> = Vec::new();
        let run_t = self.history.run().t;
        for (index, entry) in self.history.entries().iter().enumerate() {
            match entry {
                Entry::ServeStart(s) => events.push((s.t, index, &s.identity, &s.node, true)),
                Entry::ServeEnd(e) => events.push((e.t, index, &e.identity, &e.node, false)),
                Entry::Claim(c) if claims => {
                    let start = c.since.unwrap_or(run_t);
                    events.push((start, index, &c.identity, &c.node, true));
                }
                _ => {}
            }
        }
        // Ties keep file order: hostd logs one node's events in the order they happened.
        events.sort_unstable_by_key(|&(t, index, ..)| (t, index));
        let mut open: HashMap<(&str, &str), u64> = HashMap::new();
        let mut intervals: BTreeMap<&'h str, Vec<ServeInterval<'h>>> = BTreeMap::new();
        for (t, _, identity, node, is_start) in events {
            if is_start {
                // A repeated start keeps the earlier one: starts are lower bounds.
                open.entry((identity, node)).or_insert(t);
            } else if let Some(start) = open.remove(&(identity, node)) {
                intervals.entry(identity).or_default().push(ServeInterval {
                    node,
                    start,
                    end: Some(t),
                });
            } else {
                log::warn!("serve_end of {identity} on {node} at t={t} without a serve_start");
            }
        }
        for ((identity, node), start) in open {
            intervals.entry(identity).or_default().push(ServeInterval {
                node,
                start,
                end: None,
            });
        }
        for list in intervals.values_mut() {
            list.sort_by_key(|i| (i.start, i.end.is_none(), i.end, i.node));
        }
        intervals
    }

    /// Reports writes acknowledged within a gap when no node served their identity: invoked
    /// after the gap began (a `serve_end`) and acknowledged before it ended (a `serve_start`).
    fn check_fences(&mut self, intervals: &BTreeMap<&'h str, Vec<ServeInterval<'h>>>) {
        let mut findings = Vec::new();
        for (identity, list) in intervals {
            let gaps = unserved_gaps(list);
            if gaps.is_empty() {
                continue;
            }
            for record in self.ops.values() {
                let Outcome::Ok { t: acked_t, .. } = record.outcome() else {
                    continue;
                };
                if record.identity != *identity || record.invoke.action != Action::Write {
                    continue;
                }
                let invoke_t = record.invoke.t;
                // The last gap starting before the invoke is the only one that can hold it.
                let index = gaps.partition_point(|g| g.0 < invoke_t);
                let Some(&(gap_start, gap_end)) = index.checked_sub(1).and_then(|i| gaps.get(i))
                else {
                    continue;
                };
                if gap_end.is_none_or(|end| acked_t < end) {
                    let until = gap_end.map_or("the end of the history".to_owned(), |end| {
                        format!("t={end}")
                    });
                    findings.push((
                        identity.to_string(),
                        record.invoke.block,
                        record.invoke.writer,
                        record.seq(),
                        record.invoke.op,
                        format!(
                            "write op {} was invoked at t={invoke_t} and acknowledged at t={acked_t}, while no node served identity {identity} (from t={gap_start} until {until}).",
                            record.invoke.op
                        ),
                    ));
                }
            }
        }
        for (identity, block, writer, seq, op, explanation) in findings {
            self.report(AnomalyKind::WriteAfterFence, explanation, |a| {
                a.identity = Some(identity);
                a.block = Some(block);
                a.writer = Some(writer);
                a.seq = Some(seq);
                a.op = Some(op);
            });
        }
    }

    /// Reports every overlap of two serving intervals of one identity on different nodes.
    fn check_dual_serving(&mut self, intervals: &BTreeMap<&'h str, Vec<ServeInterval<'h>>>) {
        for (identity, list) in intervals {
            for (i, first) in list.iter().enumerate() {
                // Sorted by start: once one starts at or after `first` ends, all later do too.
                for second in &list[i + 1..] {
                    if first.end.is_some_and(|end| second.start >= end) {
                        break;
                    }
                    if first.node == second.node {
                        continue;
                    }
                    let from = second.start;
                    let until = match (first.end, second.end) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (Some(a), None) | (None, Some(a)) => Some(a),
                        (None, None) => None,
                    };
                    if until.is_some_and(|until| until <= from) {
                        continue;
                    }
                    let until_text =
                        until.map_or("the end of the history".to_owned(), |u| format!("t={u}"));
                    let explanation = format!(
                        "nodes {} and {} both served identity {identity} from t={from} until {until_text}.",
                        first.node, second.node
                    );
                    let window = ServingWindow {
                        from,
                        until,
                        nodes: [first.node.to_owned(), second.node.to_owned()],
                    };
                    self.report(AnomalyKind::DualServing, explanation, |a| {
                        a.identity = Some(identity.to_string());
                        a.window = Some(window);
                    });
                }
            }
        }
    }
}

/// One node serving one identity from `start` (a lower bound) to `end` (an upper bound; None
/// if it never ended).
#[derive(Debug, Clone, Copy)]
struct ServeInterval<'h> {
    node: &'h str,
    start: u64,
    end: Option<u64>,
}

/// The times no interval covers, after the first interval began: `(start, end)`, end None if
/// the gap never closed. `intervals` is sorted by start.
fn unserved_gaps(intervals: &[ServeInterval<'_>]) -> Vec<(u64, Option<u64>)> {
    let mut gaps = Vec::new();
    let mut iter = intervals.iter();
    let Some(first) = iter.next() else {
        return gaps;
    };
    let mut covered_until = first.end;
    for interval in iter {
        let Some(until) = covered_until else {
            // Served forever from here on: no more gaps.
            return gaps;
        };
        if interval.start > until {
            gaps.push((until, Some(interval.start)));
        }
        covered_until = interval.end.map(|end| end.max(until));
    }
    if let Some(until) = covered_until {
        gaps.push((until, None));
    }
    gaps
}

/// Parses an `IDENTITY=PATH` final-image argument into the pair [`FinalContents::load`] takes.
pub fn parse_final_arg(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((identity, path)) if !identity.is_empty() && !path.is_empty() => {
            Ok((identity.to_owned(), Path::new(path).to_owned()))
        }
        _ => Err(format!("expected IDENTITY=PATH, got {arg:?}")),
    }
}

/// Counts as `key count, key count` (empty for no keys).
pub(crate) fn join_counts<K: fmt::Display>(counts: &BTreeMap<K, usize>) -> String {
    counts
        .iter()
        .map(|(key, count)| format!("{key} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
