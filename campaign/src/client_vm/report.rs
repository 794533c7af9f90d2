//! The client VM run's report: per event and per kind of event, the client's longest stall,
//! and every violation found; as JSON and as a table.

use std::fmt;

use serde::Serialize;

use super::events::EventKind;
use crate::report::Percentiles;

/// The report of one client VM run.
#[derive(Debug, Clone, Serialize)]
pub struct ClientVmReport {
    pub seed: u64,
    /// Rounds of kill, hang and takeover, each followed by a giveback.
    pub rounds: u64,
    /// The pair's backend.
    pub backend: String,
    /// The client VM's accelerator.
    pub accel: String,
    /// The client's QEMU NBD driver settings.
    pub reconnect_delay_s: u32,
    pub open_timeout_s: u32,
    /// From the workload's start to the stop.
    pub duration_s: f64,
    /// Files the client reported fsynced.
    pub ops: usize,
    /// Operations before the first event: what an operation takes without one.
    pub baseline_op_ms: Percentiles,
    /// Per kind of event.
    pub kinds: Vec<KindSummary>,
    pub events: Vec<EventRecord>,
    /// Lines of the client's kernel log that report an I/O or filesystem error.
    pub client_io_errors: usize,
    pub fsck_clean: bool,
    /// Files compared with their last fsynced version, and how many matched.
    pub files_checked: usize,
    pub files_matching: usize,
    pub journal_records: usize,
    /// ext4's journal had to be replayed before the checks (the client did not unmount
    /// cleanly).
    pub journal_recovered: bool,
    /// Everything that went wrong, one sentence each; empty when the run passed.
    pub violations: Vec<String>,
    /// Why the events stopped before the last, if they did.
    pub aborted: Option<String>,
    /// What the nodes' agents and the client's QEMU logged about errors (warnings, errors,
    /// NBD connections that ended with failed requests): where to look when the run fails.
    pub server_notes: Vec<String>,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// From 1, in the order they happened.
    pub number: usize,
    pub kind: EventKind,
    pub at_unix_us: u64,
    /// From the request to hostd until `hostd status` showed the identity served again.
    pub settled_ms: f64,
    /// How long the identity had no server, by hostd's own timeline.
    pub unserved_ms: Option<f64>,
    /// Operations the client finished from this event to the next.
    pub ops: usize,
    /// The longest of them (ms) and its seq: the client's stall.
    pub stall_ms: Option<f64>,
    pub stall_seq: Option<u64>,
    /// Error lines of the client's kernel log in this event's time.
    pub console_errors: Vec<String>,
    /// What hostd said.
    pub detail: String,
}

/// One kind of event over the run.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    pub kind: EventKind,
    pub events: usize,
    pub stall_ms: Percentiles,
    pub unserved_ms: Percentiles,
}

impl ClientVmReport {
    /// Whether the run passed: every event ran, and nothing was violated.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.aborted.is_none()
    }

    /// Sums up `events` per kind.
    pub fn summarize(events: &[EventRecord]) -> Vec<KindSummary> {
        EventKind::ALL
            .into_iter()
            .map(|kind| {
                let of_kind: Vec<&EventRecord> = events.iter().filter(|e| e.kind == kind).collect();
                let stalls: Vec<f64> = of_kind.iter().filter_map(|e| e.stall_ms).collect();
                let unserved: Vec<f64> = of_kind.iter().filter_map(|e| e.unserved_ms).collect();
                KindSummary {
                    kind,
                    events: of_kind.len(),
                    stall_ms: Percentiles::of(&stalls),
                    unserved_ms: Percentiles::of(&unserved),
                }
            })
            .collect()
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec_pretty(self)
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

impl fmt::Display for ClientVmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "client VM ({}, pair backend {}), QEMU NBD reconnect-delay={} open-timeout={}: \
             {} files fsynced in {:.0} s, {} events",
            self.accel,
            self.backend,
            self.reconnect_delay_s,
            self.open_timeout_s,
            self.ops,
            self.duration_s,
            self.events.len()
        )?;
        writeln!(
            f,
            "longest client I/O stall per event (ms; the longest fsynced-file operation from the \
             event to the next), and hostd's own time without a server:"
        )?;
        writeln!(
            f,
            "  {:<10} {:>4} {:>8} {:>8} {:>8}   {:>13} {:>13}",
            "event", "n", "p50", "p99", "max", "unserved p50", "unserved max"
        )?;
        for kind in &self.kinds {
            writeln!(
                f,
                "  {:<10} {:>4} {:>8} {:>8} {:>8}   {:>13} {:>13}",
                kind.kind.name(),
                kind.events,
                ms(kind.stall_ms.p50),
                ms(kind.stall_ms.p99),
                ms(kind.stall_ms.max),
                ms(kind.unserved_ms.p50),
                ms(kind.unserved_ms.max)
            )?;
        }
        writeln!(
            f,
            "  {:<10} {:>4} {:>8} {:>8} {:>8}   (one operation, before the first event)",
            "no event",
            "-",
            ms(self.baseline_op_ms.p50),
            ms(self.baseline_op_ms.p99),
            ms(self.baseline_op_ms.max)
        )?;
        writeln!(
            f,
            "client I/O errors (kernel log): {}; e2fsck -fn: {}{}; files matching their last \
             fsynced version: {} of {}; journal records: {}",
            self.client_io_errors,
            if self.fsck_clean { "clean" } else { "ERRORS" },
            if self.journal_recovered {
                " (after replaying ext4's journal)"
            } else {
                ""
            },
            self.files_matching,
            self.files_checked,
            self.journal_records
        )?;
        if let Some(why) = &self.aborted {
            writeln!(f, "the events stopped early: {why}")?;
        }
        if self.passed() {
            writeln!(f, "result: PASS")
        } else {
            writeln!(f, "result: FAIL ({} violations)", self.violations.len())?;
            for violation in &self.violations {
                writeln!(f, "  - {violation}")?;
            }
            if !self.server_notes.is_empty() {
                writeln!(f, "what the nodes' agents and the client's QEMU logged:")?;
                for note in &self.server_notes {
                    writeln!(f, "  | {note}")?;
                }
            }
            Ok(())
        }
    }
}
