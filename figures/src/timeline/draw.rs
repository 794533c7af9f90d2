//! Draws timeline rows: a bar per phase, a cross per mark, the time clients were served
//! again at the end of each row. When background replays run far beyond the moment clients
//! are served again, a second panel shows the whole move and the first one zooms in on
//! what clients wait for.

use std::collections::BTreeSet;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::row::{MoveRow, Phase};
use crate::DrawError;
use crate::legend::{self, Swatch};
use crate::style;

/// Pixels per row.
const ROW_HEIGHT: u32 = 26;
/// Space for the title and the axes.
const CHROME_HEIGHT: u32 = 120;
/// The whole move gets a panel of its own when it lasts this many times longer than what
/// clients wait for.
const ZOOM_FACTOR: f64 = 3.0;
/// A move clients waited for this many times longer than the median one is cut off in the
/// zoomed panel (and shown whole in the other).
const OUTLIER_FACTOR: f64 = 10.0;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The timeline of `rows` (first row on top) as an SVG document titled `title`.
pub fn draw_timeline(title: &str, rows: &[MoveRow]) -> Result<String, DrawError> {
    if rows.is_empty() {
        return Err(DrawError::Empty("no takeover or giveback"));
    }
    let row_count = u32::try_from(rows.len()).unwrap_or(u32::MAX);
    let legend = legend_items(rows);
    let legend_height = legend::lines(&legend, style::WIDTH) * legend::LINE_HEIGHT + 8;
    let height = CHROME_HEIGHT
        .saturating_add(legend_height)
        .saturating_add(row_count.saturating_mul(ROW_HEIGHT));
    let label_width = rows
        .iter()
        .map(|row| style::label_width(&row.label))
        .max()
        .unwrap_or(0)
        .clamp(60, 420);
    let whole = Extent::of_rows(rows.iter(), |_| true);
    let zoom = Extent::of_rows(typical_rows(rows), Phase::clients_wait);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (style::WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, style::title())?;
        let (charts, legend_area) = root.split_vertically(root.dim_in_pixel().1 - legend_height);
        if whole.end > ZOOM_FACTOR * zoom.end.max(f64::MIN_POSITIVE) {
            let split = label_width + (style::WIDTH - label_width) * 11 / 20;
            let (left, right) = charts.split_horizontally(split);
            let panel = Panel {
                caption: "until clients are served (ms after detection)",
                start: zoom.start,
                end: zoom.end,
                label_width,
                end_label: EndLabel::Served,
            };
            panel.draw(&left, rows)?;
            let panel = Panel {
                caption: "the whole move",
                start: whole.start,
                end: whole.end,
                label_width: 0,
                end_label: EndLabel::Last,
            };
            panel.draw(&right, rows)?;
        } else {
            let panel = Panel {
                caption: "ms after detection",
                start: whole.start,
                end: whole.end,
                label_width,
                end_label: EndLabel::Served,
            };
            panel.draw(&charts, rows)?;
        }
        legend::draw(&legend_area, &legend)?;
        root.present()?;
    }
    Ok(svg)
}

/// The time a set of rows covers, in ms after detection.
#[derive(Debug, Clone, Copy)]
struct Extent {
    start: f64,
    end: f64,
}

impl Extent {
    /// From the earliest phase that `counts` or mark (detection at the latest) to the
    /// latest one.
    fn of_rows<'a>(rows: impl Iterator<Item = &'a MoveRow>, counts: fn(Phase) -> bool) -> Self {
        rows.fold(
            Extent {
                start: 0.0,
                end: 0.0,
            },
            |extent, row| {
                let marks = row.marks.iter().map(|mark| mark.at_ms);
                let phases = row.phases.iter().filter(|span| counts(span.phase));
                let starts = phases
                    .clone()
                    .map(|span| span.start_ms)
                    .chain(marks.clone());
                let ends = phases.map(|span| span.end_ms).chain(marks);
                Extent {
                    start: starts.fold(extent.start, f64::min),
                    end: ends.fold(extent.end, f64::max),
                }
            },
        )
    }
}

/// The rows clients waited for no longer than [`OUTLIER_FACTOR`] times the median: the zoomed
/// panel shows them whole, and cuts the others off at its edges.
fn typical_rows(rows: &[MoveRow]) -> impl Iterator<Item = &MoveRow> {
    let wait = |row: &MoveRow| {
        let start = row
            .phases
            .iter()
            .map(|span| span.start_ms)
            .fold(0.0, f64::min);
        row.clients_wait_until_ms() - start
    };
    let mut waits: Vec<f64> = rows.iter().map(wait).collect();
    waits.sort_by(f64::total_cmp);
    let median = waits.get(waits.len() / 2).copied().unwrap_or(0.0).max(1.0);
    rows.iter()
        .filter(move |row| wait(row) <= OUTLIER_FACTOR * median)
}

/// What the text at the end of a row gives.
#[derive(Debug, Clone, Copy)]
enum EndLabel {
    /// When clients were served again.
    Served,
    /// When the last phase ended.
    Last,
}

/// One chart of rows over a range of milliseconds.
#[derive(Debug)]
struct Panel {
    caption: &'static str,
    start: f64,
    end: f64,
    /// Room for the row labels; 0 draws none.
    label_width: u32,
    end_label: EndLabel,
}

impl Panel {
    fn draw(&self, area: &Area<'_>, rows: &[MoveRow]) -> Result<(), DrawError> {
        let span = (self.end - self.start).max(1.0);
        // Room on the right for the longest text at the end of a row: its share of the
        // plot's width, as a share of the time axis.
        let text_width = rows
            .iter()
            .filter_map(|row| self.end_text(row))
            .map(|(_, text)| style::label_width(&text) + 10)
            .max()
            .unwrap_or(0);
        let plot_width = area
            .dim_in_pixel()
            .0
            .saturating_sub(self.label_width + 24)
            .max(1);
        let room = f64::from(text_width) / f64::from(plot_width.saturating_sub(text_width).max(50));
        let x_range = (self.start - span * 0.02)..(self.end + span * room);
        let count = rows.len();
        let y_top = count as f64 - 0.5;
        let centers: Vec<f64> = (0..count).map(|index| index as f64).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(self.caption, style::label(style::BLACK))
            .margin_left(8)
            .margin_right(16)
            .x_label_area_size(28)
            .y_label_area_size(self.label_width)
            .build_cartesian_2d(x_range, style::CentredAxis::new(-0.5..y_top, centers))?;
        let label_of = |y: &f64| {
            // Row i is drawn at y = count - 1 - i, so the first row is on top.
            let index = count as f64 - 1.0 - y.round();
            rows.get(index as usize)
                .filter(|_| index >= 0.0)
                .map_or_else(String::new, |row| row.label.clone())
        };
        let mut mesh = chart.configure_mesh();
        mesh.disable_y_mesh()
            .light_line_style(style::LIGHT_GREY.mix(0.6))
            .bold_line_style(style::LIGHT_GREY)
            .x_label_style(style::label(style::BLACK))
            .y_label_style(style::label(style::BLACK))
            .x_label_formatter(&|ms| format!("{ms:.0}"))
            // A tick per 60 pixels or so: more would run into each other.
            .x_labels(usize::try_from(plot_width / 60).unwrap_or(1).max(3))
            .y_label_formatter(&label_of);
        if self.label_width == 0 {
            mesh.y_labels(0);
        }
        mesh.draw()?;

        // Detection.
        chart.draw_series(LineSeries::new(
            [(0.0, -0.5), (0.0, y_top)],
            style::GREY.stroke_width(1),
        ))?;
        for (index, row) in rows.iter().enumerate() {
            let y = (count - 1 - index) as f64;
            chart.draw_series(row.phases.iter().map(|span| {
                Rectangle::new(
                    [(span.start_ms, y - 0.32), (span.end_ms, y + 0.32)],
                    span.phase.color().filled(),
                )
            }))?;
            chart.draw_series(
                row.marks
                    .iter()
                    .map(|mark| Cross::new((mark.at_ms, y), 5, style::BLACK.stroke_width(2))),
            )?;
            if let Some((at, text)) = self.end_text(row) {
                let text = Text::new(text, (6, 0), style::label_after(style::BLACK));
                chart.draw_series(std::iter::once(EmptyElement::at((at, y)) + text))?;
            }
        }
        Ok(())
    }
}

impl Panel {
    /// Where the text at the end of `row` goes, and the text: when clients were served
    /// again (after the row's marks, so that it does not cover them), or when the move
    /// ended. A row cut off at the panel's edge gets it there, with an arrow.
    fn end_text(&self, row: &MoveRow) -> Option<(f64, String)> {
        let (at, text) = match self.end_label {
            EndLabel::Served => {
                let served = row.serving_ms()?;
                let marks = row.marks.iter().map(|mark| mark.at_ms);
                let at = marks.fold(served, f64::max);
                (at, format!("served +{}", style::duration_ms(served)))
            }
            EndLabel::Last => {
                let ended = row.phases.last()?.end_ms;
                (ended, format!("+{}", style::duration_ms(ended)))
            }
        };
        Some(if at > self.end {
            (self.end, format!("{text} →"))
        } else {
            (at, text)
        })
    }
}

/// The colours of the phases (and the marks) the rows have, in the order of a move.
fn legend_items(rows: &[MoveRow]) -> Vec<legend::Item> {
    let phases: BTreeSet<Phase> = rows
        .iter()
        .flat_map(|row| row.phases.iter().map(|span| span.phase))
        .collect();
    let marks: BTreeSet<&str> = rows
        .iter()
        .flat_map(|row| row.marks.iter().map(|mark| mark.label.as_str()))
        .collect();
    let phases = Phase::ALL
        .into_iter()
        .filter(|phase| phases.contains(phase))
        .map(|phase| legend::Item {
            swatch: Swatch::Bar(phase.color()),
            name: phase.name().to_owned(),
        });
    let marks = marks.into_iter().map(|mark| legend::Item {
        swatch: Swatch::Cross,
        name: mark.to_owned(),
    });
    phases.chain(marks).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::svg_check::{assert_well_formed, texts};
    use crate::timeline::MoveKind;
    use wire::control::{MoveReport, Timeline};

    fn row(serving: f64, replayed: f64) -> MoveRow {
        let report = MoveReport {
            node: "a".into(),
            from: "a".into(),
            to: "b".into(),
            planned: false,
            reason: String::new(),
            epoch: 2,
            detected_unix_ms: 10_000,
            timeline_ms: Timeline {
                fenced: Some(0.7),
                scanned: Some(serving - 2.0),
                serving: Some(serving),
                ..Timeline::default()
            },
            replayed_records: 1,
            replayed_first_seq: 1,
            replayed_last_seq: 1,
            replay_complete: true,
        };
        MoveRow::from_report(&report, MoveKind::Takeover { planned: false })
            .with_fault_at(9_985_000)
            .with_background_replay(replayed)
            .with_mark("first read", serving + 20.0)
    }

    #[test]
    fn a_timeline_names_its_rows_phases_and_times() {
        let rows = [row(11.5, 820.0), row(16.9, 3281.0)];
        let svg = draw_timeline("takeovers", &rows).unwrap();
        assert_well_formed(&svg);
        let texts = texts(&svg);
        for expected in [
            "takeovers",
            "takeover a → b",
            "detect",
            "fence",
            "scan log",
            "move address",
            "replay (serving meanwhile)",
            "first read",
            "served +11.5 ms",
            "served +16.9 ms",
            "+3.28 s",
            "until clients are served (ms after detection)",
            "the whole move",
        ] {
            assert!(
                texts.iter().any(|t| t == expected),
                "{expected:?} not in {texts:?}"
            );
        }
        // A bar per phase: five phases on each row, in each of the two panels.
        assert!(svg.matches("<rect").count() >= 2 * 2 * 5, "{svg}");
    }

    #[test]
    fn a_short_replay_needs_no_second_panel() {
        let svg = draw_timeline("t", &[row(11.5, 30.0)]).unwrap();
        assert_well_formed(&svg);
        assert!(!texts(&svg).iter().any(|t| t == "the whole move"));
    }

    #[test]
    fn an_outlier_is_cut_off_in_the_zoomed_panel() {
        let rows = [row(11.5, 20.0), row(16.9, 30.0), row(4580.0, 4700.0)];
        let svg = draw_timeline("t", &rows).unwrap();
        assert_well_formed(&svg);
        let texts = texts(&svg);
        assert!(texts.iter().any(|t| t == "served +4.58 s →"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "served +16.9 ms"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "the whole move"), "{texts:?}");
    }

    #[test]
    fn no_rows_is_an_error() {
        assert!(matches!(draw_timeline("t", &[]), Err(DrawError::Empty(_))));
    }
}
