//! `hostd events`: the event history from `STATE_DIR/events.jsonl`, optionally followed.
//!
//! The file is read directly, so this works with or without a running daemon. Rendering
//! is done by pure functions over `serde_json::Value`s: known event kinds get a readable
//! line (takeovers and givebacks a small timeline), anything else, including known kinds
//! with missing or odd fields, a generic `key=value` line, so new kinds still print.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use super::CommandResult;
use crate::state_dir::StateDir;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing events as they are appended, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// Print the events as JSON lines, exactly as recorded.
    #[arg(long)]
    pub json: bool,

    /// Only events about this node (their `node` field).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Only the last N matching events (before following).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
}

/// Errors of `hostd events`.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(
        "no event log at {path}: no pair has run with this state directory (is --state-dir right?)"
    )]
    NoEventLog { path: PathBuf },
    #[error("cannot read the event log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the events to standard output")]
    Write(#[source] io::Error),
}

/// How often `--follow` looks for new lines.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub fn run(state: &StateDir, args: &EventsArgs) -> CommandResult {
    let path = state.event_log();
    let zone = Zone::local();
    let mut reader = LogReader::open(&path)?;
    let read_error = |source| EventsError::Read {
        path: path.clone(),
        source,
    };

    let mut lines = reader.read_complete_lines().map_err(read_error)?;
    if !args.follow {
        // Lines are written whole, so a last line without its newline is unusual (a writer
        // that died mid-line); show what can be shown of it.
        lines.extend(reader.take_partial_line());
    }
    let mut shown: Vec<String> = lines
        .iter()
        .filter_map(|(number, text)| select(&path, *number, text, args, &zone))
        .collect();
    if let Some(last) = args.last {
        shown.drain(..shown.len().saturating_sub(last));
    }
    let mut out = io::stdout().lock();
    if !emit(&mut out, &shown)? {
        return Ok(ExitCode::SUCCESS);
    }
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        std::thread::sleep(POLL_INTERVAL);
        if reader.reopen_if_replaced().map_err(read_error)? {
            eprintln!(
                "hostd: warning: {} was replaced or truncated; reading it from the start",
                path.display()
            );
        }
        let shown: Vec<String> = reader
            .read_complete_lines()
            .map_err(read_error)?
            .iter()
            .filter_map(|(number, text)| select(&path, *number, text, args, &zone))
            .collect();
        if !emit(&mut out, &shown)? {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Writes `lines`; `Ok(false)` when the reader went away (`hostd events | head`).
fn emit(out: &mut impl Write, lines: &[String]) -> Result<bool, EventsError> {
    let written = lines
        .iter()
        .try_for_each(|line| writeln!(out, "{line}"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(EventsError::Write(e)),
    }
}

/// What to print for line `number` of the log, if it is shown at all; warns about lines
/// that are not JSON objects.
fn select(
    path: &Path,
    number: usize,
    text: &[u8],
    args: &EventsArgs,
    zone: &Zone,
) -> Option<String> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let value = match serde_json::from_slice::<Value>(text) {
        Ok(value) if value.is_object() => value,
        Ok(_) => {
            eprintln!(
                "hostd: warning: {} line {number}: not a JSON object; skipped",
                path.display()
            );
            return None;
        }
        Err(error) => {
            eprintln!(
                "hostd: warning: {} line {number}: not valid JSON ({error}); skipped",
                path.display()
            );
            return None;
        }
    };
    if let Some(node) = &args.node {
        if value.get("node").and_then(Value::as_str) != Some(node.as_str()) {
            return None;
        }
    }
    Some(if args.json {
        String::from_utf8_lossy(text).trim().to_owned()
    } else {
        render_event(&value, zone)
    })
}

/// Reads a growing JSON-lines file: whole lines only, remembering a partial last line.
#[derive(Debug)]
struct LogReader {
    path: PathBuf,
    file: File,
    inode: (u64, u64),
    /// Bytes of the file consumed so far.
    position: u64,
    /// The start of a line whose newline has not been written yet.
    partial: Vec<u8>,
    /// Number of the last complete line returned (1-based).
    line_number: usize,
}

impl LogReader {
    fn open(path: &Path) -> Result<Self, EventsError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                EventsError::NoEventLog {
                    path: path.to_owned(),
                }
            } else {
                EventsError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let metadata = file.metadata().map_err(|source| EventsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            inode: (metadata.dev(), metadata.ino()),
            position: 0,
            partial: Vec::new(),
            line_number: 0,
        })
    }

    /// Every complete line appended since the last call, with its line number.
    fn read_complete_lines(&mut self) -> io::Result<Vec<(usize, Vec<u8>)>> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(self.position))?;
        let read = self.file.read_to_end(&mut bytes)?;
        self.position += read as u64;
        Ok(self.split(&bytes))
    }

    fn split(&mut self, bytes: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(newline);
            let mut whole = std::mem::take(&mut self.partial);
            whole.extend_from_slice(line);
            self.line_number += 1;
            lines.push((self.line_number, whole));
            rest = after.get(1..).unwrap_or_default();
        }
        self.partial.extend_from_slice(rest);
        lines
    }

    /// The partial last line, as if it were complete.
    fn take_partial_line(&mut self) -> Option<(usize, Vec<u8>)> {
        if self.partial.is_empty() {
            return None;
        }
        self.line_number += 1;
        Some((self.line_number, std::mem::take(&mut self.partial)))
    }

    /// Starts over when the file was truncated or replaced by a new one; true if it was.
    /// A deleted file is kept open: nothing more will be appended to it, but a new one
    /// under the same name is picked up when it appears.
    fn reopen_if_replaced(&mut self) -> io::Result<bool> {
        match std::fs::metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) != self.inode => {
                match File::open(&self.path) {
                    Ok(file) => {
                        let metadata = file.metadata()?;
                        self.file = file;
                        self.inode = (metadata.dev(), metadata.ino());
                    }
                    // Replaced again, or removed, between the two looks: next poll.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Ok(_) => {
                if self.file.metadata()?.len() >= self.position {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        self.position = 0;
        self.partial.clear();
        self.line_number = 0;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------
// Rendering.

/// One event as human-readable text (several lines for takeovers and givebacks, without
/// a final newline).
pub fn render_event(event: &Value, zone: &Zone) -> String {
    let stamp = event
        .get("time_unix_ms")
        .and_then(Value::as_i64)
        .map_or_else(|| "--:--:--.---".to_owned(), |ms| zone.clock(ms));
    // Timeline lines are indented past the time stamp.
    let indent = " ".repeat(stamp.chars().count() + 4);
    let fields = event.as_object();
    let special = fields.and_then(
        |fields| match fields.get("event").and_then(Value::as_str)? {
            "node_state" => node_state(fields),
            "pair_starting" => pair_starting(fields),
            "pair_stopped" => pair_stopped(fields),
            "takeover" => takeover(fields, &indent),
            "giveback" => giveback(fields, &indent),
            "move_failed" => move_failed(fields),
            "fault_injected" => fault_injected(fields),
            "serving_started" => serving(fields, "starts serving", None),
            "serving_ended" => serving(fields, "stops serving", Some("reason")),
            "pair_adopted" => pair_adopted(fields),
            _ => None,
        },
    );
    let body = special.unwrap_or_else(|| generic(event));
    format!("{stamp}  {body}")
}

fn text<'a>(fields: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    fields.get(key)?.as_str()
}

/// A field that may be absent, but must have the right type when present.
fn optional<'a, T>(
    fields: &'a Map<String, Value>,
    key: &str,
    convert: impl Fn(&'a Value) -> Option<T>,
) -> Option<Option<T>> {
    match fields.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(value) => convert(value).map(Some),
    }
}

/// `node a: booting → up (heartbeat 1)`
fn node_state(fields: &Map<String, Value>) -> Option<String> {
    let node = text(fields, "node")?;
    let from = text(fields, "from")?;
    let to = text(fields, "to")?;
    let detail = optional(fields, "detail", Value::as_str)?;
    Some(match detail {
        Some(detail) if !detail.is_empty() => format!("node {node}: {from} → {to} ({detail})"),
        _ => format!("node {node}: {from} → {to}"),
    })
}

/// `pair starting  accel kvm (reason)`
fn pair_starting(fields: &Map<String, Value>) -> Option<String> {
    let accel = text(fields, "accel")?;
    let reason = optional(fields, "accel_reason", Value::as_str)?;
    Some(match reason {
        Some(reason) if !reason.is_empty() => format!("pair starting  accel {accel} ({reason})"),
        _ => format!("pair starting  accel {accel}"),
    })
}

/// `a: quit cleanly, b: killed` from a list of `[node, what]` pairs under `key`.
fn node_pairs(fields: &Map<String, Value>, key: &str) -> Option<Vec<String>> {
    fields
        .get(key)?
        .as_array()?
        .iter()
        .map(|pair| match pair.as_array()?.as_slice() {
            [node, how] => Some(format!("{}: {}", node.as_str()?, how.as_str()?)),
            _ => None,
        })
        .collect()
}

/// `pair stopped  a: quit cleanly, b: killed`
fn pair_stopped(fields: &Map<String, Value>) -> Option<String> {
    let nodes = node_pairs(fields, "stopped")?;
    Some(if nodes.is_empty() {
        "pair stopped".to_owned()
    } else {
        format!("pair stopped  {}", nodes.join(", "))
    })
}

/// `move failed  a → b (reason): error`
fn move_failed(fields: &Map<String, Value>) -> Option<String> {
    let node = text(fields, "node")?;
    let to = text(fields, "to")?;
    let reason = optional(fields, "reason", Value::as_str)?.filter(|r| !r.is_empty());
    let error = optional(fields, "error", Value::as_str)?.filter(|e| !e.is_empty());
    let mut line = format!("move failed  {node} → {to}");
    if let Some(reason) = reason {
        line.push_str(&format!(" ({reason})"));
    }
    if let Some(error) = error {
        line.push_str(&format!(": {error}"));
    }
    Some(line)
}

/// `fault injected  node a: stop`
fn fault_injected(fields: &Map<String, Value>) -> Option<String> {
    let node = text(fields, "node")?;
    let signal = text(fields, "signal")?;
    Some(format!("fault injected  node {node}: {signal}"))
}

/// `node b starts serving a (epoch 3)` / `node a stops serving a (fenced)`
fn serving(fields: &Map<String, Value>, what: &str, note_key: Option<&str>) -> Option<String> {
    let identity = text(fields, "identity")?;
    let node = text(fields, "node")?;
    let note = match note_key {
        Some(key) => optional(fields, key, Value::as_str)?.map(str::to_owned),
        None => optional(fields, "epoch", Value::as_u64)?.map(|e| format!("epoch {e}")),
    };
    Some(match note {
        Some(note) if !note.is_empty() => format!("node {node} {what} {identity} ({note})"),
        _ => format!("node {node} {what} {identity}"),
    })
}

/// `pair adopted  a: pid 123, b: pid 456`
fn pair_adopted(fields: &Map<String, Value>) -> Option<String> {
    let nodes = node_pairs(fields, "nodes")?;
    Some(format!(
        "pair adopted by a restarted hostd  {}",
        nodes.join(", ")
    ))
}

/// One step of a takeover or giveback: its name, milliseconds after detection, and a note.
type Step = (String, f64, String);

/// The order of steps that happen at the same millisecond.
const STEP_ORDER: [&str; 7] = [
    "detected",
    "restarted",
    "released",
    "flushed",
    "fenced",
    "replayed",
    "serving",
];

/// `timeline_ms` as steps, `detected` first, then by time; None if it is not a map of
/// non-negative numbers (a step given as null was not needed, and is left out).
fn steps(fields: &Map<String, Value>) -> Option<Vec<Step>> {
    let timeline = fields.get("timeline_ms")?.as_object()?;
    let mut steps = vec![("detected".to_owned(), 0.0, String::new())];
    for (name, ms) in timeline {
        if name == "detected" || ms.is_null() {
            continue;
        }
        let ms = ms.as_f64().filter(|ms| ms.is_finite() && *ms >= 0.0)?;
        steps.push((name.clone(), ms, String::new()));
    }
    let rank = |name: &str| {
        STEP_ORDER
            .iter()
            .position(|known| *known == name)
            .unwrap_or(STEP_ORDER.len())
    };
    steps.sort_by(|a, b| {
        (a.0 != "detected")
            .cmp(&(b.0 != "detected"))
            .then(a.1.total_cmp(&b.1))
            .then(rank(&a.0).cmp(&rank(&b.0)))
    });
    Some(steps)
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
    let name_width = steps.iter().map(|(name, ..)| name.chars().count()).max();
    let time_width = times.iter().map(String::len).max();
    let mut out = String::new();
    for ((name, _, note), time) in steps.iter().zip(&times) {
        let line = format!(
            "{indent}{name:<nw$}  {time:<tw$}   {note}",
            nw = name_width.unwrap_or(0),
            tw = time_width.unwrap_or(0),
        );
        out.push('\n');
        out.push_str(line.trim_end());
    }
    out
}

/// What was replayed: `64 records (seq 10..=73)`, marked when incomplete; `Some(None)` when
/// there is nothing to say, None when a replay field has the wrong type.
fn replay_note(fields: &Map<String, Value>, has_step: bool) -> Option<Option<String>> {
    let records = optional(fields, "replayed_records", Value::as_u64)?;
    let first = optional(fields, "replayed_first_seq", Value::as_u64)?;
    let last = optional(fields, "replayed_last_seq", Value::as_u64)?;
    let complete = optional(fields, "replay_complete", Value::as_bool)?;
    let mut note = match (records, first, last) {
        // Nothing replayed and no replay step: nothing worth a word.
        (Some(0), ..) if !has_step && complete != Some(false) => return Some(None),
        (Some(1), Some(first), Some(last)) if first == last => format!("1 record (seq {first})"),
        (Some(n @ 1..), Some(first), Some(last)) => {
            format!("{n} {} (seq {first}..={last})", plural(n, "record"))
        }
        (Some(n), ..) => format!("{n} {}", plural(n, "record")),
        (None, ..) => String::new(),
    };
    if complete == Some(false) {
        note.push_str(if note.is_empty() {
            "INCOMPLETE"
        } else {
            ", INCOMPLETE"
        });
    }
    Some((!note.is_empty()).then_some(note))
}

/// Puts the replay note on the `replayed` step, or on the first line if there is none.
fn attach_replay(fields: &Map<String, Value>, head: &mut String, steps: &mut [Step]) -> Option<()> {
    let step = steps.iter_mut().find(|(name, ..)| name == "replayed");
    if let Some(note) = replay_note(fields, step.is_some())? {
        match step {
            Some(step) => step.2 = note,
            None => {
                head.push_str(", replayed ");
                head.push_str(&note);
            }
        }
    }
    Some(())
}

/// ```text
/// takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2
///     detected  +0 ms
///     fenced    +12 ms
///     replayed  +80 ms   64 records (seq 10..=73)
///     serving   +95 ms
/// ```
/// The new owner is `by` (or `to`).
fn takeover(fields: &Map<String, Value>, indent: &str) -> Option<String> {
    let node = text(fields, "node")?;
    let by = text(fields, "by").or_else(|| text(fields, "to"))?;
    let epoch = fields.get("epoch")?.as_u64()?;
    let planned = optional(fields, "planned", Value::as_bool)?;
    let reason = optional(fields, "reason", Value::as_str)?.filter(|r| !r.is_empty());
    let mut steps = steps(fields)?;

    let why = match (planned, reason) {
        (Some(true), Some(reason)) => format!("planned: {reason}"),
        (Some(true), None) => "planned".to_owned(),
        (Some(false), Some(reason)) => format!("unplanned: {reason}"),
        (Some(false), None) => "unplanned".to_owned(),
        (None, Some(reason)) => reason.to_owned(),
        (None, None) => String::new(),
    };
    let mut head = if why.is_empty() {
        format!("takeover  {node} → {by}, epoch {epoch}")
    } else {
        format!("takeover  {node} → {by} ({why}), epoch {epoch}")
    };
    attach_replay(fields, &mut head, &mut steps)?;
    Some(head + &timeline(&steps, indent))
}

/// ```text
/// giveback  b → a (giveback), epoch 3, flushed to seq 120
///     detected  +0 ms
///     released  +30 ms
///     serving   +60 ms
/// ```
/// `node` is the identity going home; `from` the partner that served it.
fn giveback(fields: &Map<String, Value>, indent: &str) -> Option<String> {
    let node = text(fields, "node")?;
    let from = text(fields, "from")?;
    let epoch = fields.get("epoch")?.as_u64()?;
    let reason = optional(fields, "reason", Value::as_str)?.filter(|r| !r.is_empty());
    let flushed = optional(fields, "flushed_seq", Value::as_u64)?;
    let mut steps = steps(fields)?;
    let mut head = match reason {
        Some(reason) => format!("giveback  {from} → {node} (giveback: {reason}), epoch {epoch}"),
        None => format!("giveback  {from} → {node} (giveback), epoch {epoch}"),
    };
    if let Some(seq) = flushed {
        head.push_str(&format!(", flushed to seq {seq}"));
    }
    attach_replay(fields, &mut head, &mut steps)?;
    Some(head + &timeline(&steps, indent))
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// `EVENT  key=value key=value`, for any event.
fn generic(event: &Value) -> String {
    let Some(fields) = event.as_object() else {
        return format!("(not an event)  {event}");
    };
    let (name, skip_tag) = match fields.get("event") {
        Some(Value::String(name)) if !name.is_empty() => (name.as_str(), true),
        _ => ("(untagged)", false),
    };
    let pairs: Vec<String> = fields
        .iter()
        .filter(|(key, _)| *key != "time_unix_ms" && !(skip_tag && *key == "event"))
        .map(|(key, value)| format!("{key}={}", generic_value(value)))
        .collect();
    if pairs.is_empty() {
        name.to_owned()
    } else {
        format!("{name}  {}", pairs.join(" "))
    }
}

/// A string bare when that is unambiguous, JSON otherwise.
fn generic_value(value: &Value) -> String {
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

// ---------------------------------------------------------------------------------------
// Time of day, in the local time zone.

/// The time zone time stamps are shown in.
#[derive(Debug, Clone)]
pub enum Zone {
    /// Local time is unknown: UTC, marked `Z`.
    Utc,
    /// The local time zone.
    Local(jiff::tz::TimeZone),
}

impl Zone {
    /// The local zone (`TZ`, else `/etc/localtime`), or UTC when it cannot be determined.
    pub fn local() -> Self {
        jiff::tz::TimeZone::try_system().map_or(Zone::Utc, Zone::Local)
    }

    /// `HH:MM:SS.mmm` of a Unix time in milliseconds (`Z` appended in UTC).
    pub fn clock(&self, unix_ms: i64) -> String {
        if let Zone::Local(zone) = self
            && let Ok(time) = jiff::Timestamp::from_millisecond(unix_ms)
        {
            return time
                .to_zoned(zone.clone())
                .strftime("%H:%M:%S%.3f")
                .to_string();
        }
        // UTC, also for times jiff cannot represent.
        let of_day = unix_ms.rem_euclid(86_400_000);
        format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            of_day / 3_600_000,
            of_day / 60_000 % 60,
            of_day / 1000 % 60,
            of_day % 1000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14 22:13:20 UTC.
    const T: i64 = 1_700_000_000_000;

    fn utc_unlabelled() -> Zone {
        Zone::Local(jiff::tz::TimeZone::UTC)
    }

    fn render(line: &str) -> String {
        render_event(&serde_json::from_str(line).unwrap(), &utc_unlabelled())
    }

    const TAKEOVER: &str = r#"{"time_unix_ms":1699963200000, "event":"takeover", "node":"a", "by":"b", "planned":false, "reason":"QEMU exited (signal 9)", "epoch":2, "detected_unix_ms":1700000000000, "timeline_ms":{"fenced":12,"replayed":80,"serving":95}, "replayed_records":64, "replayed_first_seq":10, "replayed_last_seq":73, "replay_complete":true}"#;

    #[test]
    fn takeover_is_a_timeline() {
        // 1699963200000 is 2023-11-14 12:00:00 UTC.
        assert_eq!(
            render(TAKEOVER),
            "12:00:00.000  takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2\n\
             \x20               detected  +0 ms\n\
             \x20               fenced    +12 ms\n\
             \x20               replayed  +80 ms   64 records (seq 10..=73)\n\
             \x20               serving   +95 ms"
        );
    }

    #[test]
    fn takeover_variants() {
        let mut v: Value = serde_json::from_str(TAKEOVER).unwrap();
        v["planned"] = true.into();
        v["reason"] = "operator request".into();
        v["replay_complete"] = false.into();
        v["timeline_ms"] = serde_json::json!({"serving": 1500, "replayed": 900, "fenced": 900});
        let text = render_event(&v, &utc_unlabelled());
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
        v["timeline_ms"] = serde_json::json!({"serving": 7});
        v.as_object_mut().unwrap().remove("planned");
        v["replay_complete"] = true.into();
        v["replayed_records"] = 1.into();
        v["replayed_last_seq"] = 10.into();
        let text = render_event(&v, &utc_unlabelled());
        assert_eq!(
            text.lines().next().unwrap(),
            "12:00:00.000  takeover  a → b (operator request), epoch 2, replayed 1 record (seq 10)"
        );
    }

    /// The shape hostd's `MoveReport` gives: `from`/`to`, fractional milliseconds.
    #[test]
    fn move_reports_render_too() {
        let takeover = r#"{"time_unix_ms":1699963200000,"event":"takeover","node":"a","from":"a","to":"b","planned":false,"reason":"heartbeat timed out","epoch":2,"detected_unix_ms":1699963199900,"timeline_ms":{"fenced":12.4,"replayed":80.0,"serving":95.3},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#;
        assert_eq!(
            render(takeover),
            "12:00:00.000  takeover  a → b (unplanned: heartbeat timed out), epoch 2\n\
             \x20               detected  +0 ms\n\
             \x20               fenced    +12.4 ms\n\
             \x20               replayed  +80 ms     0 records\n\
             \x20               serving   +95.3 ms"
        );
        let giveback = r#"{"time_unix_ms":1699963200000,"event":"giveback","node":"a","from":"b","to":"a","planned":true,"reason":"hostd giveback","epoch":3,"detected_unix_ms":1699963190000,"timeline_ms":{"restarted":4100.0,"released":4130.5,"serving":4160.0},"replayed_records":0,"replayed_first_seq":0,"replayed_last_seq":0,"replay_complete":true}"#;
        assert_eq!(
            render(giveback),
            "12:00:00.000  giveback  b → a (giveback: hostd giveback), epoch 3\n\
             \x20               detected   +0 ms\n\
             \x20               restarted  +4100 ms\n\
             \x20               released   +4130.5 ms\n\
             \x20               serving    +4160 ms"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":0,"event":"move_failed","node":"a","to":"b","reason":"QEMU exited","error":"fence timed out"}"#
            ),
            "00:00:00.000  move failed  a → b (QEMU exited): fence timed out"
        );
        assert_eq!(
            render(r#"{"time_unix_ms":0,"event":"fault_injected","node":"b","signal":"stop"}"#),
            "00:00:00.000  fault injected  node b: stop"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":0,"event":"serving_started","identity":"a","node":"b","epoch":3}"#
            ),
            "00:00:00.000  node b starts serving a (epoch 3)"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":0,"event":"serving_ended","identity":"a","node":"a","reason":"fenced"}"#
            ),
            "00:00:00.000  node a stops serving a (fenced)"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":0,"event":"pair_adopted","nodes":[["a","pid 12"],["b","pid 13"]]}"#
            ),
            "00:00:00.000  pair adopted by a restarted hostd  a: pid 12, b: pid 13"
        );
    }

    #[test]
    fn giveback_is_a_timeline() {
        let line = r#"{"time_unix_ms":1699963200123,"event":"giveback","node":"a","from":"b","epoch":3,"detected_unix_ms":1699963200100,"timeline_ms":{"released":30,"serving":60},"flushed_seq":120}"#;
        assert_eq!(
            render(line),
            "12:00:00.123  giveback  b → a (giveback), epoch 3, flushed to seq 120\n\
             \x20               detected  +0 ms\n\
             \x20               released  +30 ms\n\
             \x20               serving   +60 ms"
        );
    }

    #[test]
    fn odd_takeovers_and_givebacks_fall_back_to_generic() {
        for line in [
            r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":2}"#,
            r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":"2","timeline_ms":{}}"#,
            r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":2,"timeline_ms":{"fenced":-1}}"#,
            r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":2,"timeline_ms":[1]}"#,
            r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":2,"timeline_ms":{},"planned":"no"}"#,
            r#"{"time_unix_ms":0,"event":"takeover","node":7,"by":"b","epoch":2,"timeline_ms":{}}"#,
            r#"{"time_unix_ms":0,"event":"giveback","node":"a","epoch":3,"timeline_ms":{}}"#,
            r#"{"time_unix_ms":0,"event":"giveback","node":"a","from":"b","epoch":3,"timeline_ms":{},"flushed_seq":-5}"#,
        ] {
            let text = render(line);
            assert!(!text.contains('\n'), "{line} → {text}");
            assert!(text.contains("epoch="), "{line} → {text}");
        }
        // A minimal one still renders specially.
        assert_eq!(
            render(
                r#"{"time_unix_ms":0,"event":"takeover","node":"a","by":"b","epoch":2,"timeline_ms":{}}"#
            ),
            "00:00:00.000  takeover  a → b, epoch 2\n                detected  +0 ms"
        );
    }

    #[test]
    fn known_events() {
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000000,"event":"node_state","node":"a","from":"booting","to":"up","detail":"heartbeat 1"}"#
            ),
            "22:13:20.000  node a: booting → up (heartbeat 1)"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000001,"event":"node_state","node":"b","from":"up","to":"dead","detail":""}"#
            ),
            "22:13:20.001  node b: up → dead"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000000,"event":"pair_starting","accel":"tcg","accel_reason":"no vmx/svm"}"#
            ),
            "22:13:20.000  pair starting  accel tcg (no vmx/svm)"
        );
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000000,"event":"pair_stopped","stopped":[["a","quit cleanly"],["b","killed"]]}"#
            ),
            "22:13:20.000  pair stopped  a: quit cleanly, b: killed"
        );
        assert_eq!(
            render(r#"{"time_unix_ms":1700000000000,"event":"pair_stopped","stopped":[]}"#),
            "22:13:20.000  pair stopped"
        );
    }

    #[test]
    fn unknown_and_odd_events_are_generic() {
        assert_eq!(
            render(
                r#"{"time_unix_ms":1700000000000,"event":"fence_failed","node":"a","reason":"QMP timed out","attempt":2,"ok":false,"extra":{"x":[1]}}"#
            ),
            r#"22:13:20.000  fence_failed  attempt=2 extra={"x":[1]} node=a ok=false reason="QMP timed out""#
        );
        assert_eq!(
            render(r#"{"time_unix_ms":1700000000000,"event":"node_state","node":"a"}"#),
            "22:13:20.000  node_state  node=a"
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
            render(r#"{"time_unix_ms":5,"event":3}"#),
            "00:00:00.005  (untagged)  event=3"
        );
        assert_eq!(
            render(r#"{"time_unix_ms":5,"event":"tick"}"#),
            "00:00:00.005  tick"
        );
        assert_eq!(
            render_event(&Value::from(3), &Zone::Utc),
            "--:--:--.---  (not an event)  3"
        );
    }

    #[test]
    fn utc_clock_is_marked() {
        assert_eq!(Zone::Utc.clock(T + 42), "22:13:20.042Z");
        assert_eq!(Zone::Utc.clock(-1), "23:59:59.999Z");
        assert_eq!(Zone::Utc.clock(i64::MAX).len(), 13);
        // Timeline indentation follows the stamp's width.
        let text = render_event(&serde_json::from_str(TAKEOVER).unwrap(), &Zone::Utc);
        assert!(
            text.contains("\n                 detected  +0 ms"),
            "{text}"
        );
    }

    #[test]
    fn local_clock_follows_the_zone() {
        let berlin = Zone::Local(jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap());
        // 2023-11-14: winter (+1 h); 2023-07-01 12:00 UTC: summer (+2 h).
        assert_eq!(berlin.clock(T + 42), "23:13:20.042");
        assert_eq!(berlin.clock(1_688_212_800_000), "14:00:00.000");
        let sydney =
            Zone::Local(jiff::tz::TimeZone::posix("AEST-10AEDT,M10.1.0,M4.1.0/3").unwrap());
        assert_eq!(sydney.clock(T), "09:13:20.000");
        // Beyond what a calendar can hold: UTC arithmetic, marked.
        assert_eq!(berlin.clock(i64::MAX).len(), 13);
    }

    #[test]
    fn reader_waits_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut reader = LogReader::open(&path).unwrap();
        let lines = reader.read_complete_lines().unwrap();
        assert_eq!(lines, [(1, b"{\"a\":1}".to_vec())]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"2}\n\n{\"c\"").unwrap();
        let lines = reader.read_complete_lines().unwrap();
        assert_eq!(lines, [(2, b"{\"b\":2}".to_vec()), (3, Vec::new())]);
        assert!(!reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.take_partial_line(), Some((4, b"{\"c\"".to_vec())));

        // Truncated: start over.
        std::fs::write(&path, "{}\n").unwrap();
        assert!(reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.read_complete_lines().unwrap(), [(1, b"{}".to_vec())]);
        // Replaced by a new file: start over on the new one.
        let new = dir.path().join("new");
        std::fs::write(&new, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert!(reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.read_complete_lines().unwrap().len(), 2);

        assert!(matches!(
            LogReader::open(&dir.path().join("missing")),
            Err(EventsError::NoEventLog { .. })
        ));
    }

    #[test]
    fn selection() {
        let args = |node: Option<&str>, json| EventsArgs {
            follow: false,
            json,
            node: node.map(str::to_owned),
            last: None,
        };
        let path = Path::new("events.jsonl");
        let zone = utc_unlabelled();
        let line = br#" {"time_unix_ms":0,"event":"x","node":"a"} "#;
        assert_eq!(
            select(path, 1, line, &args(None, true), &zone).as_deref(),
            Some(r#"{"time_unix_ms":0,"event":"x","node":"a"}"#)
        );
        assert_eq!(
            select(path, 1, line, &args(Some("a"), false), &zone).as_deref(),
            Some("00:00:00.000  x  node=a")
        );
        assert_eq!(select(path, 1, line, &args(Some("b"), false), &zone), None);
        assert_eq!(select(path, 1, b"{oops", &args(None, false), &zone), None);
        assert_eq!(select(path, 1, b"[1]", &args(None, false), &zone), None);
        assert_eq!(select(path, 1, b"  ", &args(None, false), &zone), None);
    }
}
