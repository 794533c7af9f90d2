//! `hostd events`: the event history from `STATE_DIR/events.jsonl`, optionally followed, or
//! its takeovers drawn as a timeline (`--svg`, in `svg.rs`).
//!
//! The file is read directly, so this works with or without a running daemon. Each line
//! is read as a typed [`EventLine`]; known events get a readable line (takeovers and
//! givebacks a small timeline), and a line this version does not know (an older or newer
//! hostd's) a generic `key=value` line, so nothing is hidden.

mod reader;
mod render;
mod svg;
mod zone;

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;
use shm::{Access, ControlRegion, Mapping};
use wire::events::EventLine;

use self::reader::LogReader;
use self::render::{render_event, render_unknown};
pub use self::zone::Zone;
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

    /// Draw the takeovers among the selected events (with --node and --last) as a timeline
    /// into FILE, an SVG picture, instead of printing the events. Givebacks are left out.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["follow", "json"])]
    pub svg: Option<PathBuf>,
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
    #[error("no node {name:?} in this state directory (its nodes: {known})")]
    UnknownNode { name: String, known: String },
    #[error("no takeover among the selected events of {path}: there is nothing to draw")]
    NothingToDraw { path: PathBuf },
    #[error("cannot draw the takeover timeline")]
    Draw(#[source] figures::DrawError),
    #[error("cannot write the timeline to {path}")]
    WriteSvg {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A line of the log with its number (1-based), as the reader returns it.
type NumberedLine = (usize, Vec<u8>);

/// How often `--follow` looks for new lines.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

pub fn run(state: &StateDir, args: &EventsArgs) -> CommandResult {
    let path = state.event_log();
    let zone = Zone::local();
    let (mut reader, lines) = open_and_read(&path, args.follow)?;
    let read_error = |source| EventsError::Read {
        path: path.clone(),
        source,
    };
    if let Some(name) = &args.node {
        check_node(state, name, &lines)?;
    }
    if let Some(file) = &args.svg {
        let drawn = svg::write_timeline(&path, &lines, args, &zone, file)?;
        let plural = if drawn == 1 { "" } else { "s" };
        println!(
            "{}: the timeline of {drawn} takeover{plural}",
            file.display()
        );
        return Ok(ExitCode::SUCCESS);
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

/// Opens the log and reads the lines it holds; unless `follow`ing (when the writer may be
/// mid-line), also a last line without its newline.
fn open_and_read(path: &Path, follow: bool) -> Result<(LogReader, Vec<NumberedLine>), EventsError> {
    let mut reader = LogReader::open(path)?;
    let mut lines = reader
        .read_complete_lines()
        .map_err(|source| EventsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if !follow {
        // Lines are written whole, so a last line without its newline is unusual (a writer
        // that died mid-line); show what can be shown of it.
        lines.extend(reader.take_partial_line());
    }
    Ok((reader, lines))
}

/// A `--node` filter that names no node of this state directory would print nothing, as
/// if nothing had happened to it: refuse it instead. The nodes are those the control region
/// names, and those the events name.
fn check_node(state: &StateDir, name: &str, lines: &[NumberedLine]) -> Result<(), EventsError> {
    let mut known: BTreeSet<String> = Mapping::open(&state.control_region(), Access::ReadOnly)
        .ok()
        .and_then(|mapping| ControlRegion::open(mapping).ok())
        .map(|control| control.header().nodes.iter().cloned().collect())
        .unwrap_or_default();
    for (_, text) in lines {
        if let Ok(text) = std::str::from_utf8(text)
            && let Ok(line) = EventLine::parse(text)
            && let Some(node) = line.event.node()
        {
            known.insert(node.to_owned());
        }
    }
    if known.is_empty() || known.contains(name) {
        return Ok(());
    }
    Err(EventsError::UnknownNode {
        name: name.to_owned(),
        known: known.into_iter().collect::<Vec<_>>().join(", "),
    })
}

/// Reads the event log at `path` as `hostd events` does (whole lines, then the partial
/// last one) and renders every line as text and as JSON, in UTC and in a zone with daylight
/// saving time. For the fuzz targets (`fuzz/`); not part of the API.
#[doc(hidden)]
pub fn render_log_for_fuzzing(path: &Path) -> Result<Vec<String>, EventsError> {
    let (_, lines) = open_and_read(path, false)?;
    let mut zones = vec![Zone::Utc];
    zones.extend(
        jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3")
            .ok()
            .map(Zone::Local),
    );
    let mut shown = Vec::new();
    for zone in &zones {
        for json in [false, true] {
            let args = EventsArgs {
                follow: false,
                json,
                node: None,
                last: None,
                svg: None,
            };
            shown.extend(
                lines
                    .iter()
                    .filter_map(|(number, text)| select(path, *number, text, &args, zone)),
            );
        }
    }
    Ok(shown)
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
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    let (node, rendered) = match EventLine::parse(text) {
        Ok(line) => (
            line.event.node().map(str::to_owned),
            render_event(&line, zone),
        ),
        Err(_) => match serde_json::from_str::<Value>(text) {
            Ok(value) if value.is_object() => (
                value.get("node").and_then(Value::as_str).map(str::to_owned),
                render_unknown(&value, zone),
            ),
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
        },
    };
    if args
        .node
        .as_ref()
        .is_some_and(|wanted| node.as_ref() != Some(wanted))
    {
        return None;
    }
    Some(if args.json { text.to_owned() } else { rendered })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc_unlabelled() -> Zone {
        Zone::Local(jiff::tz::TimeZone::UTC)
    }

    #[test]
    fn selection() {
        let args = |node: Option<&str>, json| EventsArgs {
            follow: false,
            json,
            node: node.map(str::to_owned),
            last: None,
            svg: None,
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
        // Known events are selected by their node field too: the serving node.
        let serving =
            br#"{"time_unix_ms":0,"event":"serving_started","identity":"a","node":"b","epoch":2}"#;
        assert_eq!(
            select(path, 1, serving, &args(Some("b"), false), &zone).as_deref(),
            Some("00:00:00.000  node b starts serving a (epoch 2)")
        );
        assert_eq!(
            select(path, 1, serving, &args(Some("a"), false), &zone),
            None
        );
        assert_eq!(select(path, 1, b"{oops", &args(None, false), &zone), None);
        assert_eq!(select(path, 1, b"[1]", &args(None, false), &zone), None);
        assert_eq!(select(path, 1, b"  ", &args(None, false), &zone), None);
    }
}
