//! The figures of a campaign run, in `OUT/figures/`: `clients.svg` (operations per second
//! and latency over time, faults and takeovers marked) and `takeovers.svg` (a timeline per
//! unplanned takeover). See docs/figures.md.

mod activity;
mod moves;

use std::path::{Path, PathBuf};

use wire::events::EventLine;

use crate::history::{History, HistoryError};

pub use activity::client_activity;
pub use moves::takeover_rows;

/// Drawing or writing a run's figures failed.
#[derive(Debug, thiserror::Error)]
pub enum FiguresError {
    #[error("cannot read the run's history")]
    History(#[source] HistoryError),
    #[error("cannot read hostd's events {path}")]
    Events {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw {figure}")]
    Draw {
        figure: &'static str,
        #[source]
        source: figures::DrawError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the figures of a run with `history` and hostd's `events` into `out/figures`;
/// returns the files written. A run without takeovers has no timeline.
pub fn write_run_figures(
    out: &Path,
    history: &History,
    events: &[EventLine],
) -> Result<Vec<PathBuf>, FiguresError> {
    let dir = out.join("figures");
    std::fs::create_dir_all(&dir).map_err(|source| FiguresError::Write {
        path: dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    let clients =
        figures::draw_activity(&client_activity(history)).map_err(|source| FiguresError::Draw {
            figure: "the clients' operations and latency",
            source,
        })?;
    written.push(write(&dir.join("clients.svg"), &clients)?);
    let rows = takeover_rows(history, events);
    if !rows.is_empty() {
        let title = format!(
            "Takeovers of campaign seed {}: phases in ms after detection",
            history.run().seed
        );
        let timeline =
            figures::draw_timeline(&title, &rows).map_err(|source| FiguresError::Draw {
                figure: "the takeover timeline",
                source,
            })?;
        written.push(write(&dir.join("takeovers.svg"), &timeline)?);
    }
    Ok(written)
}

/// Draws the figures of the finished run in `run_dir` (the `--out` of `run`) again, from
/// its `history.jsonl` and `logs/events.jsonl`.
pub fn redraw_run_figures(run_dir: &Path) -> Result<Vec<PathBuf>, FiguresError> {
    let history = History::read(&run_dir.join("history.jsonl")).map_err(FiguresError::History)?;
    let events_path = run_dir.join("logs").join("events.jsonl");
    let text = std::fs::read_to_string(&events_path).map_err(|source| FiguresError::Events {
        path: events_path.clone(),
        source,
    })?;
    let (events, bad) = wire::events::parse_log(&text);
    if !bad.is_empty() {
        log::warn!(
            "{}: {} lines are not events this version knows; left out",
            events_path.display(),
            bad.len()
        );
    }
    write_run_figures(run_dir, &history, &events)
}

fn write(path: &Path, svg: &str) -> Result<PathBuf, FiguresError> {
    std::fs::write(path, svg).map_err(|source| FiguresError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}
