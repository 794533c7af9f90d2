//! `hostd events --svg FILE`: the timeline of the selected takeovers as an SVG picture, a
//! row per takeover with its phases (detect, fence, scan, move the address, and the replay
//! that goes on while the taker serves).

use std::path::Path;

use wire::events::EventLine;

use super::zone::Zone;
use super::{EventsArgs, EventsError, NumberedLine};

/// Draws the takeovers among the events `args` selects from `lines` (the log at
/// `log_path`) into `file`; returns how many were drawn.
pub(super) fn write_timeline(
    log_path: &Path,
    lines: &[NumberedLine],
    args: &EventsArgs,
    zone: &Zone,
    file: &Path,
) -> Result<usize, EventsError> {
    // The whole log gives each takeover its fault and its replay's end; the filters choose
    // which takeovers are drawn, as they choose which events are printed.
    let log: Vec<EventLine> = lines
        .iter()
        .filter_map(|(_, text)| EventLine::parse(std::str::from_utf8(text).ok()?).ok())
        .collect();
    let mut selected: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, line)| {
            args.node
                .as_ref()
                .is_none_or(|wanted| line.event.node() == Some(wanted.as_str()))
        })
        .map(|(index, _)| index)
        .collect();
    if let Some(last) = args.last {
        selected.drain(..selected.len().saturating_sub(last));
    }
    let rows: Vec<figures::MoveRow> = figures::moves_in_log(&log)
        .into_iter()
        .filter(|(index, row)| {
            selected.binary_search(index).is_ok()
                && matches!(row.kind, figures::MoveKind::Takeover { .. })
        })
        .map(|(_, mut row)| {
            let at = zone.clock(i64::try_from(row.detected_unix_ms).unwrap_or(i64::MAX));
            row.label = format!("{at}  {}", row.label);
            row
        })
        .collect();
    if rows.is_empty() {
        return Err(EventsError::NothingToDraw {
            path: log_path.to_owned(),
        });
    }
    let title = match &args.node {
        Some(node) => format!("Takeovers of {node}: phases in ms after detection"),
        None => "Takeovers: phases in ms after detection".to_owned(),
    };
    let svg = figures::draw_timeline(&title, &rows).map_err(EventsError::Draw)?;
    std::fs::write(file, svg).map_err(|source| EventsError::WriteSvg {
        path: file.to_owned(),
        source,
    })?;
    Ok(rows.len())
}
