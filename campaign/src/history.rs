//! The campaign history: what the workload, the nemesis and hostd did, one JSON object per
//! line, tagged by `"kind"`. [`HistoryWriter`] appends entries from many threads;
//! [`History`] reads a history back and checks its structure (errors name the line).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize};

use crate::block::{BLOCK_SIZE, BlockValue};

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// The run's parameters; exactly one, first.
    Run(RunInfo),
    /// A writer started an operation.
    Invoke(Invoke),
    /// An operation succeeded.
    Ok(OkCompletion),
    /// An operation definitely did not happen.
    Fail(ErrorCompletion),
    /// An operation may or may not have happened.
    Unknown(ErrorCompletion),
    /// The nemesis starts injecting a fault (recorded before it does; the `fault` entry
    /// follows once it hit, none if it could not be injected).
    FaultStart(FaultStart),
    /// The nemesis injected a fault.
    Fault(Fault),
    /// A node started serving an identity (from hostd's event log).
    ServeStart(ServeStart),
    /// A node stopped serving an identity (from hostd's event log).
    ServeEnd(ServeEnd),
    /// A takeover completed, with its timings.
    Takeover(Takeover),
    /// hostd's owner record of an identity in the control region changed (the sampler).
    Owner(OwnerSeen),
    /// A node's region published a claim of an identity (the sampler).
    Claim(ClaimSeen),
    /// A node's region published that the node ejected itself (the sampler).
    Ejected(EjectionSeen),
    /// The run finished; last if present.
    End(End),
}

impl Entry {
    /// The entry's time, in microseconds since the Unix epoch.
    pub fn t(&self) -> u64 {
        match self {
            Entry::Run(e) => e.t,
            Entry::Invoke(e) => e.t,
            Entry::Ok(e) => e.t,
            Entry::Fail(e) | Entry::Unknown(e) => e.t,
            Entry::FaultStart(e) => e.t,
            Entry::Fault(e) => e.t,
            Entry::ServeStart(e) => e.t,
            Entry::ServeEnd(e) => e.t,
            Entry::Takeover(e) => e.t,
            Entry::Owner(e) => e.t,
            Entry::Claim(e) => e.t,
            Entry::Ejected(e) => e.t,
            Entry::End(e) => e.t,
        }
    }

    /// The entry's `"kind"` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Run(_) => "run",
            Entry::Invoke(_) => "invoke",
            Entry::Ok(_) => "ok",
            Entry::Fail(_) => "fail",
            Entry::Unknown(_) => "unknown",
            Entry::FaultStart(_) => "fault_start",
            Entry::Fault(_) => "fault",
            Entry::ServeStart(_) => "serve_start",
            Entry::ServeEnd(_) => "serve_end",
            Entry::Takeover(_) => "takeover",
            Entry::Owner(_) => "owner",
            Entry::Claim(_) => "claim",
            Entry::Ejected(_) => "ejected",
            Entry::End(_) => "end",
        }
    }
}

/// The `run` entry: the run's parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Start of the run.
    pub t: u64,
    /// The nemesis seed.
    pub seed: u64,
    /// Random per run; stamped into every block so blocks of other runs are foreign.
    pub run_id: u64,
    /// Must be [`BLOCK_SIZE`].
    pub block_size: u64,
    /// The writers and the blocks each one owns.
    pub writers: Vec<WriterSpec>,
}

/// One writer and the blocks it owns: `first_block .. first_block + blocks` of its identity's
/// export. No other writer touches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterSpec {
    /// The writer's id.
    pub writer: u32,
    /// The NBD export (node identity, "a" or "b") it writes to.
    pub identity: String,
    /// Its first block index.
    pub first_block: u64,
    /// How many blocks it owns.
    pub blocks: u64,
}

impl WriterSpec {
    /// One past the writer's last block index, or None if that overflows (a malformed run
    /// entry, which [`History`] rejects).
    pub fn end_block(&self) -> Option<u64> {
        self.first_block.checked_add(self.blocks)
    }

    /// Whether `block` is one of the writer's blocks.
    pub fn owns(&self, block: u64) -> bool {
        block >= self.first_block && self.end_block().is_some_and(|end| block < end)
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Write one whole block.
    Write,
    /// Read one whole block.
    Read,
}

/// The `invoke` entry: a writer started operation `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    /// When the operation was started.
    pub t: u64,
    /// Unique per run.
    pub op: u64,
    /// The writer doing it.
    pub writer: u32,
    /// Read or write.
    pub action: Action,
    /// The block index, within the writer's identity's export.
    pub block: u64,
    /// For writes, the writer's write sequence number (1, 2, 3... in invocation order);
    /// None for reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The node that accepted the connection the operation is sent on, when the campaign
    /// could tell (see `attribution`): only that node can answer it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// The `ok` entry: operation `op` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkCompletion {
    /// When the success was seen.
    pub t: u64,
    /// The operation.
    pub op: u64,
    /// For reads, what the block held (`null` is [`BlockValue::Zero`]); absent for writes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub value: Option<BlockValue>,
}

/// `value: null` is a read of a zero block, not a missing value; serde's `Option` would read
/// it as None.
fn present_value<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BlockValue>, D::Error> {
    BlockValue::deserialize(deserializer).map(Some)
}

/// The `fail` and `unknown` entries: operation `op` ended with an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCompletion {
    /// When the error was seen.
    pub t: u64,
    /// The operation.
    pub op: u64,
    /// The error, for humans.
    pub error: String,
}

/// The `fault_start` entry: the nemesis starts injecting a fault. A fault's effects begin
/// after it; the `fault` entry (same cycle) comes once the fault hit, which may be long
/// after (the faults made while hostd is away return once hostd is back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStart {
    /// When, before anything was done.
    pub t: u64,
    /// The nemesis cycle.
    pub cycle: u64,
    /// The fault's kind, as in the `fault` entry.
    pub fault: String,
    /// The node it hits.
    pub node: String,
}

/// The `fault` entry: the nemesis injected a fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// When it was injected.
    pub t: u64,
    /// The nemesis cycle.
    pub cycle: u64,
    /// `kill`, `stop`, `panic`, `agent_kill`, `hostd_restart`, `torn_tail`, ... (open set).
    pub fault: String,
    /// The node it hit.
    pub node: String,
    /// What exactly was done, for humans.
    #[serde(default)]
    pub detail: String,
    /// The faults that kill hostd first (`hostd_down_kill`, `zombie`, `both_stop`): when
    /// the node itself was hit (killed and gone, or stopped), `t` being hostd's kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_t: Option<u64>,
}

/// The `serve_start` entry. `t` is a lower bound: recorded before the node could serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeStart {
    /// When.
    pub t: u64,
    /// The identity (export) served.
    pub identity: String,
    /// The node serving it.
    pub node: String,
}

/// The `serve_end` entry. `t` is an upper bound: recorded after the node provably could not
/// serve (fence reaped, or release acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeEnd {
    /// When.
    pub t: u64,
    /// The identity (export) no longer served.
    pub identity: String,
    /// The node that stopped serving it.
    pub node: String,
    /// Why, e.g. `fenced`.
    #[serde(default)]
    pub reason: String,
}

/// The `takeover` entry: `to` serves `identity` after `from` failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Takeover {
    /// When the takeover completed.
    pub t: u64,
    /// The nemesis cycle.
    pub cycle: u64,
    /// The identity taken over.
    pub identity: String,
    /// The node that lost it.
    pub from: String,
    /// The node that serves it now.
    pub to: String,
    /// From fault injection to the identity being served again.
    pub fault_to_serving_ms: f64,
    /// From hostd detecting the failure to the identity being served again.
    pub detect_to_serving_ms: f64,
}

/// The `owner` entry: the sampler saw hostd's owner record of `identity` (control region)
/// change. It was published after `since` (the start of the sampler's previous read, None
/// for what the first read found) and by `t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerSeen {
    /// When the sampler had read it.
    pub t: u64,
    /// Published after this; None if it was there at the first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The identity.
    pub identity: String,
    /// Its owner; None while nobody serves it.
    pub node: Option<String>,
    /// The epoch (a coordinator generation) at which this ownership began.
    pub epoch: u64,
}

/// The `claim` entry: the sampler saw `node`'s region publish a claim of `identity`, won at
/// the coordinator at `generation` while hostd was away. Published after `since` and by `t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimSeen {
    /// When the sampler had read it.
    pub t: u64,
    /// Published after this; None if it was there at the first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The claiming node.
    pub node: String,
    /// The identity claimed.
    pub identity: String,
    /// The coordinator's generation of the claim (one sequence with hostd's epochs).
    pub generation: u64,
    /// The node it was claimed from.
    pub victim: String,
    /// The claiming node's boot id (its agent's life), when it was the same at both reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<u64>,
    /// The victim's boot id when it was the same at both reads: the life that lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub victim_boot_id: Option<u64>,
}

/// The `ejected` entry: the sampler saw `node`'s region say that its agent ejected itself
/// (it serves nothing until hostd restarts it). Published after `since` and by `t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectionSeen {
    /// When the sampler had read it.
    pub t: u64,
    /// Published after this; None if it was there at the first read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The node.
    pub node: String,
    /// The newest generation the agent knew of.
    pub generation: u64,
    /// Why, as the agent said (`not_member`, `claimed`, ...).
    pub reason: String,
    /// The node's boot id when it was the same at both reads: the life that ejected itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<u64>,
}

/// The `end` entry: the run finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// When.
    pub t: u64,
}

/// Reading, writing or validating a history failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The history file could not be created.
    #[error("cannot create history file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The history file could not be opened.
    #[error("cannot open history file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading a line failed.
    #[error("cannot read {origin} line {line}")]
    Read {
        /// The file (or "in-memory history").
        origin: String,
        /// 1-based line number.
        line: usize,
        /// Why.
        source: io::Error,
    },
    /// A line is not a valid JSON history entry.
    #[error("{origin} line {line}: malformed history entry")]
    Malformed {
        /// The file (or "in-memory history").
        origin: String,
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A well-formed entry breaks the history's structure.
    #[error("{origin} line {line}: invalid history entry")]
    Invalid {
        /// The file (or "in-memory history").
        origin: String,
        /// 1-based line number (entry number for in-memory histories).
        line: usize,
        /// What is wrong with it.
        source: EntryProblem,
    },
    /// The history has no entries at all.
    #[error("{origin} has no run entry: it is empty")]
    Empty {
        /// The file (or "in-memory history").
        origin: String,
    },
    /// An entry could not be turned into JSON.
    #[error("cannot serialize a {kind} history entry")]
    Serialize {
        /// The entry's kind.
        kind: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// Appending an entry failed.
    #[error("cannot append a {kind} entry to the history")]
    Write {
        /// The entry's kind.
        kind: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// What is wrong with a well-formed history entry in its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// The first entry is not the run entry.
    #[error("the history starts with a {kind} entry, not the run entry")]
    RunNotFirst {
        /// The first entry's kind.
        kind: &'static str,
    },
    /// A second run entry.
    #[error("a second run entry")]
    SecondRun,
    /// An entry after the end entry.
    #[error("a {kind} entry after the end entry")]
    AfterEnd {
        /// The entry's kind.
        kind: &'static str,
    },
    /// The run's block size is not the campaign's.
    #[error("the run's block size is {block_size}, not {}", BLOCK_SIZE)]
    BlockSize {
        /// The run entry's block size.
        block_size: u64,
    },
    /// Two writer specs share an id.
    #[error("writer {writer} is declared twice")]
    DuplicateWriter {
        /// The writer.
        writer: u32,
    },
    /// A writer's block range does not fit in u64 bytes.
    #[error("writer {writer}'s blocks reach past the largest possible export")]
    WriterRangeOverflow {
        /// The writer.
        writer: u32,
    },
    /// Two writers own overlapping blocks of the same export.
    #[error("writers {first} and {second} own overlapping blocks of identity {identity}")]
    OverlappingWriters {
        /// The export.
        identity: String,
        /// One writer.
        first: u32,
        /// The other.
        second: u32,
    },
    /// An operation by a writer the run entry does not declare.
    #[error("op {op} is by writer {writer}, which the run entry does not declare")]
    UnknownWriter {
        /// The operation.
        op: u64,
        /// The writer.
        writer: u32,
    },
    /// An operation on a block its writer does not own.
    #[error("op {op} of writer {writer} targets block {block}, outside its blocks {first}..{end}")]
    BlockOutsideRange {
        /// The operation.
        op: u64,
        /// The writer.
        writer: u32,
        /// The block targeted.
        block: u64,
        /// The writer's first block.
        first: u64,
        /// One past the writer's last block.
        end: u64,
    },
    /// A write without a sequence number.
    #[error("write op {op} has no seq")]
    WriteWithoutSeq {
        /// The operation.
        op: u64,
    },
    /// A read with a sequence number.
    #[error("read op {op} has a seq; only writes have one")]
    ReadWithSeq {
        /// The operation.
        op: u64,
    },
    /// A completion for an op no earlier entry invoked.
    #[error("a completion for op {op}, which no earlier entry invoked")]
    CompletionForUnknownOp {
        /// The operation.
        op: u64,
    },
    /// A successful read without the value it read.
    #[error("the ok of read op {op} carries no value")]
    ReadWithoutValue {
        /// The operation.
        op: u64,
    },
}

/// Appends entries to a history as JSON lines. Thread-safe: each entry is one `write_all` of a
/// whole line, then a flush, under a lock, so lines from different threads never interleave
/// and a crash loses at most the line being written.
pub struct HistoryWriter {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for HistoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryWriter").finish_non_exhaustive()
    }
}

impl HistoryWriter {
    /// Creates (or truncates) the history file at `path`.
    pub fn create(path: &Path) -> Result<Self, HistoryError> {
        let file = File::create(path).map_err(|source| HistoryError::Create {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::new(file))
    }

    /// Writes the history to `out`.
    pub fn new(out: impl Write + Send + 'static) -> Self {
        HistoryWriter {
            out: Mutex::new(Box::new(out)),
        }
    }

    /// Appends one entry as one line.
    pub fn append(&self, entry: &Entry) -> Result<(), HistoryError> {
        let kind = entry.kind();
        let mut line =
            serde_json::to_vec(entry).map_err(|source| HistoryError::Serialize { kind, source })?;
        line.push(b'\n');
        // A thread that panicked while holding the lock left no partial line (the write is a
        // single call), so the writer is still usable.
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|source| HistoryError::Write { kind, source })
    }
}

/// A history, read back and structurally checked: a run entry first, every operation by a
/// declared writer on one of its blocks, every completion after its invoke, nothing after
/// `end`. (Duplicate ops are left for the checker to report as anomalies.)
#[derive(Debug, Clone)]
pub struct History {
    run: RunInfo,
    entries: Vec<Entry>,
}

impl History {
    /// Reads and checks the history file at `path`.
    pub fn read(path: &Path) -> Result<Self, HistoryError> {
        let file = File::open(path).map_err(|source| HistoryError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(BufReader::new(file), &path.display().to_string())
    }

    /// Reads and checks a history from JSON lines; `origin` names it in errors. Blank lines
    /// are skipped.
    pub fn parse(input: impl BufRead, origin: &str) -> Result<Self, HistoryError> {
        let mut validator = Validator::default();
        let mut entries = Vec::new();
        for (index, line) in input.lines().enumerate() {
            let line_number = index + 1;
            let line = line.map_err(|source| HistoryError::Read {
                origin: origin.to_owned(),
                line: line_number,
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry =
                serde_json::from_str(&line).map_err(|source| HistoryError::Malformed {
                    origin: origin.to_owned(),
                    line: line_number,
                    source,
                })?;
            validator
                .accept(&entry)
                .map_err(|source| HistoryError::Invalid {
                    origin: origin.to_owned(),
                    line: line_number,
                    source,
                })?;
            entries.push(entry);
        }
        Self::finish(entries, origin)
    }

    /// Checks a history built in memory; errors name the entry's 1-based position as its line.
    pub fn from_entries(entries: Vec<Entry>) -> Result<Self, HistoryError> {
        const ORIGIN: &str = "in-memory history";
        let mut validator = Validator::default();
        for (index, entry) in entries.iter().enumerate() {
            validator
                .accept(entry)
                .map_err(|source| HistoryError::Invalid {
                    origin: ORIGIN.to_owned(),
                    line: index + 1,
                    source,
                })?;
        }
        Self::finish(entries, ORIGIN)
    }

    fn finish(entries: Vec<Entry>, origin: &str) -> Result<Self, HistoryError> {
        match entries.first() {
            Some(Entry::Run(run)) => Ok(History {
                run: run.clone(),
                entries,
            }),
            // The validator rejects a first entry that is not the run entry.
            _ => Err(HistoryError::Empty {
                origin: origin.to_owned(),
            }),
        }
    }

    /// The run entry.
    pub fn run(&self) -> &RunInfo {
        &self.run
    }

    /// All entries in file order, the run entry first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The writer spec of `writer`.
    pub fn writer(&self, writer: u32) -> Option<&WriterSpec> {
        self.run.writers.iter().find(|w| w.writer == writer)
    }

    /// Whether the run finished (has an `end` entry).
    pub fn finished(&self) -> bool {
        matches!(self.entries.last(), Some(Entry::End(_)))
    }

    /// The latest `t` of any entry.
    pub fn last_t(&self) -> u64 {
        self.entries
            .iter()
            .map(Entry::t)
            .max()
            .unwrap_or(self.run.t)
    }
}

/// Checks entries one at a time, in file order.
#[derive(Default)]
struct Validator {
    writers: HashMap<u32, WriterSpec>,
    seen_run: bool,
    seen_end: bool,
    invoked: HashMap<u64, Action>,
}

impl Validator {
    fn accept(&mut self, entry: &Entry) -> Result<(), EntryProblem> {
        if self.seen_end {
            return Err(EntryProblem::AfterEnd { kind: entry.kind() });
        }
        if !self.seen_run {
            let Entry::Run(run) = entry else {
                return Err(EntryProblem::RunNotFirst { kind: entry.kind() });
            };
            self.seen_run = true;
            return self.accept_run(run);
        }
        match entry {
            Entry::Run(_) => return Err(EntryProblem::SecondRun),
            Entry::Invoke(invoke) => self.accept_invoke(invoke)?,
            Entry::Ok(ok) => match self.invoked.get(&ok.op) {
                None => return Err(EntryProblem::CompletionForUnknownOp { op: ok.op }),
                Some(Action::Read) if ok.value.is_none() => {
                    return Err(EntryProblem::ReadWithoutValue { op: ok.op });
                }
                Some(_) => {}
            },
            Entry::Fail(c) | Entry::Unknown(c) => {
                if !self.invoked.contains_key(&c.op) {
                    return Err(EntryProblem::CompletionForUnknownOp { op: c.op });
                }
            }
            Entry::End(_) => self.seen_end = true,
            Entry::FaultStart(_)
            | Entry::Fault(_)
            | Entry::ServeStart(_)
            | Entry::ServeEnd(_)
            | Entry::Takeover(_)
            | Entry::Owner(_)
            | Entry::Claim(_)
            | Entry::Ejected(_) => {}
        }
        Ok(())
    }

    fn accept_run(&mut self, run: &RunInfo) -> Result<(), EntryProblem> {
        if run.block_size != BLOCK_SIZE as u64 {
            return Err(EntryProblem::BlockSize {
                block_size: run.block_size,
            });
        }
        let mut ids = HashSet::new();
        for spec in &run.writers {
            if !ids.insert(spec.writer) {
                return Err(EntryProblem::DuplicateWriter {
                    writer: spec.writer,
                });
            }
            // The checker reads the writer's blocks at byte offsets; those must fit in u64.
            let fits = spec
                .end_block()
                .and_then(|end| end.checked_mul(BLOCK_SIZE as u64))
                .is_some();
            if !fits {
                return Err(EntryProblem::WriterRangeOverflow {
                    writer: spec.writer,
                });
            }
        }
        for (i, first) in run.writers.iter().enumerate() {
            for second in &run.writers[i + 1..] {
                let overlap = first.identity == second.identity
                    && first.blocks > 0
                    && second.blocks > 0
                    && (first.owns(second.first_block) || second.owns(first.first_block));
                if overlap {
                    return Err(EntryProblem::OverlappingWriters {
                        identity: first.identity.clone(),
                        first: first.writer,
                        second: second.writer,
                    });
                }
            }
        }
        self.writers = run
            .writers
            .iter()
            .map(|spec| (spec.writer, spec.clone()))
            .collect();
        Ok(())
    }

    fn accept_invoke(&mut self, invoke: &Invoke) -> Result<(), EntryProblem> {
        let op = invoke.op;
        let Some(spec) = self.writers.get(&invoke.writer) else {
            return Err(EntryProblem::UnknownWriter {
                op,
                writer: invoke.writer,
            });
        };
        if !spec.owns(invoke.block) {
            return Err(EntryProblem::BlockOutsideRange {
                op,
                writer: invoke.writer,
                block: invoke.block,
                first: spec.first_block,
                end: spec.end_block().unwrap_or(u64::MAX),
            });
        }
        match (invoke.action, invoke.seq) {
            (Action::Write, None) => return Err(EntryProblem::WriteWithoutSeq { op }),
            (Action::Read, Some(_)) => return Err(EntryProblem::ReadWithSeq { op }),
            _ => {}
        }
        // A second invoke of the same op is the checker's `duplicate` anomaly, not bad input;
        // the first one's action decides what its completion must carry.
        self.invoked.entry(op).or_insert(invoke.action);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run_line() -> &'static str {
        r#"{"kind":"run","t":1,"seed":42,"run_id":123,"block_size":4096,"writers":[{"writer":0,"identity":"a","first_block":0,"blocks":4}]}"#
    }

    #[test]
    fn spec_example_lines_parse() {
        let text = [
            run_line(),
            r#"{"kind":"invoke","t":2,"op":1,"writer":0,"action":"write","block":1,"seq":1}"#,
            r#"{"kind":"invoke","t":3,"op":2,"writer":0,"action":"read","block":1}"#,
            r#"{"kind":"ok","t":4,"op":1}"#,
            r#"{"kind":"ok","t":5,"op":2,"value":{"writer":0,"seq":1}}"#,
            r#"{"kind":"invoke","t":6,"op":3,"writer":0,"action":"read","block":2}"#,
            r#"{"kind":"ok","t":7,"op":3,"value":null}"#,
            r#"{"kind":"invoke","t":8,"op":4,"writer":0,"action":"write","block":2,"seq":2}"#,
            r#"{"kind":"fail","t":9,"op":4,"error":"EPERM"}"#,
            r#"{"kind":"fault","t":10,"cycle":3,"fault":"kill","node":"a","detail":"SIGKILL qemu pid 1234"}"#,
            r#"{"kind":"serve_start","t":11,"identity":"a","node":"b"}"#,
            r#"{"kind":"serve_end","t":12,"identity":"a","node":"a","reason":"fenced"}"#,
            r#"{"kind":"takeover","t":13,"cycle":3,"identity":"a","from":"a","to":"b","fault_to_serving_ms":152.3,"detect_to_serving_ms":140.1}"#,
            r#"{"kind":"end","t":14}"#,
        ]
        .join("\n");
        let history = History::parse(text.as_bytes(), "test").unwrap();
        assert_eq!(history.entries().len(), 14);
        assert!(history.finished());
        assert_eq!(
            history.entries()[6],
            Entry::Ok(OkCompletion {
                t: 7,
                op: 3,
                value: Some(BlockValue::Zero)
            })
        );
        assert_eq!(
            history.entries()[3],
            Entry::Ok(OkCompletion {
                t: 4,
                op: 1,
                value: None
            })
        );
    }

    #[test]
    fn writer_output_reads_back() {
        let path = tempfile::NamedTempFile::new().unwrap();
        let writer = std::sync::Arc::new(HistoryWriter::create(path.path()).unwrap());
        let run: Entry = serde_json::from_str(run_line()).unwrap();
        writer.append(&run).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        writer
                            .append(&Entry::Fault(Fault {
                                t: wire::time::now_unix_us(),
                                cycle: thread * 100 + i,
                                fault: "kill".into(),
                                node: "a".into(),
                                detail: "x".repeat(500),
                                node_t: None,
                            }))
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let history = History::read(path.path()).unwrap();
        assert_eq!(history.entries().len(), 201);
    }

    #[test]
    fn structure_errors_name_the_line() {
        let cases: [(String, EntryProblem); 4] = [
            (
                r#"{"kind":"end","t":1}"#.to_owned(),
                EntryProblem::RunNotFirst { kind: "end" },
            ),
            (
                format!("{}\n{}", run_line(), r#"{"kind":"ok","t":2,"op":9}"#),
                EntryProblem::CompletionForUnknownOp { op: 9 },
            ),
            (
                format!(
                    "{}\n{}",
                    run_line(),
                    r#"{"kind":"invoke","t":2,"op":1,"writer":0,"action":"write","block":4,"seq":1}"#
                ),
                EntryProblem::BlockOutsideRange {
                    op: 1,
                    writer: 0,
                    block: 4,
                    first: 0,
                    end: 4,
                },
            ),
            (
                format!("{}\n{}", run_line(), run_line()),
                EntryProblem::SecondRun,
            ),
        ];
        for (text, expected) in cases {
            let error = History::parse(text.as_bytes(), "h.jsonl").unwrap_err();
            let HistoryError::Invalid { line, source, .. } = error else {
                panic!("unexpected error {error:?}");
            };
            assert_eq!(source, expected);
            assert_eq!(line, text.lines().count());
        }
    }
}
