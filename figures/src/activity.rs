//! Client operations per second and their latency over time, with the faults and the
//! takeovers marked: what clients saw during a run.

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::DrawError;
use crate::legend::{self, Swatch};
use crate::style;

/// Height of the two panels together.
const PANELS_HEIGHT: u32 = 640;
/// Marks are labelled while there are at most this many of a kind (more would overlap).
const MAX_LABELLED_MARKS: usize = 40;
/// Labels of neighbouring marks go on this many levels, so that close marks stay legible.
const LABEL_LEVELS: usize = 3;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesStyle {
    /// A thick line: the main measure.
    Bold,
    /// A thin line: a secondary measure in the same colour.
    Thin,
    /// Dots: sparse values, such as errors.
    Dots,
}

/// A named series of `(seconds since the start, value)` points, in time order. A NaN value
/// breaks the line (no data there, such as a time without completions).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// The series' colour: the n-th of the palette, so that series of one client group
    /// share it across panels.
    pub palette_index: usize,
    pub style: SeriesStyle,
}

impl Series {
    fn color(&self) -> RGBColor {
        style::SERIES[self.palette_index % style::SERIES.len()]
    }

    fn swatch(&self) -> Swatch {
        match self.style {
            SeriesStyle::Bold => Swatch::Line(self.color(), 2),
            SeriesStyle::Thin => Swatch::Line(self.color(), 1),
            SeriesStyle::Dots => Swatch::Dot(self.color()),
        }
    }
}

/// What a vertical mark shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// A fault was injected.
    Fault,
    /// An identity was served again after a takeover.
    Takeover,
}

impl MarkKind {
    fn color(self) -> RGBColor {
        match self {
            MarkKind::Fault => style::VERMILLION,
            MarkKind::Takeover => style::GREEN,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MarkKind::Fault => "fault injected",
            MarkKind::Takeover => "takeover: served again",
        }
    }
}

/// A moment marked across both panels.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Seconds since the start.
    pub at_s: f64,
    pub kind: MarkKind,
    pub label: String,
}

/// What clients did over a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientActivity {
    pub title: String,
    /// Top panel: operations per second.
    pub ops_per_s: Vec<Series>,
    /// Bottom panel, on a logarithmic scale: latency in milliseconds.
    pub latency_ms: Vec<Series>,
    pub marks: Vec<Mark>,
}

/// The figure of `activity` as an SVG document.
pub fn draw_activity(activity: &ClientActivity) -> Result<String, DrawError> {
    let all = || activity.ops_per_s.iter().chain(&activity.latency_ms);
    if all().all(|series| series.points.is_empty()) {
        return Err(DrawError::Empty("no client operation"));
    }
    let end_s = all()
        .flat_map(|series| series.points.iter().map(|(t, _)| *t))
        .chain(activity.marks.iter().map(|mark| mark.at_s))
        .fold(1.0, f64::max);
    let mut items: Vec<legend::Item> = all()
        .map(|series| legend::Item {
            swatch: series.swatch(),
            name: series.name.clone(),
        })
        .collect();
    for kind in [MarkKind::Fault, MarkKind::Takeover] {
        if activity.marks.iter().any(|mark| mark.kind == kind) {
            items.push(legend::Item {
                swatch: Swatch::Line(kind.color(), 2),
                name: kind.name().to_owned(),
            });
        }
    }
    let legend_height = legend::lines(&items, style::WIDTH) * legend::LINE_HEIGHT + 8;
    let height = PANELS_HEIGHT + 40 + legend_height;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (style::WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&activity.title, style::title())?;
        let (panels, legend_area) = root.split_vertically(root.dim_in_pixel().1 - legend_height);
        let (top, bottom) = panels.split_vertically(panels.dim_in_pixel().1 * 45 / 100);
        draw_ops(&top, activity, end_s)?;
        draw_latency(&bottom, activity, end_s)?;
        legend::draw(&legend_area, &items)?;
        root.present()?;
    }
    Ok(svg)
}

fn draw_ops(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    activity: &ClientActivity,
    end_s: f64,
) -> Result<(), DrawError> {
    let highest = activity
        .ops_per_s
        .iter()
        .flat_map(|series| series.points.iter().map(|(_, v)| *v))
        .fold(1.0, f64::max);
    // Room above the data for the fault labels.
    let top = highest * 1.4;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(20)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end_s, 0.0..top)?;
    chart
        .configure_mesh()
        .light_line_style(style::LIGHT_GREY.mix(0.5))
        .bold_line_style(style::LIGHT_GREY)
        .label_style(style::label(style::BLACK))
        .y_desc("operations/s")
        .x_label_formatter(&|s| format!("{s:.0} s"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for mark in &activity.marks {
        chart.draw_series(vertical(mark, 0.0, top))?;
    }
    for series in &activity.ops_per_s {
        draw_series(&mut chart, series)?;
    }
    let faults: Vec<&Mark> = activity
        .marks
        .iter()
        .filter(|mark| mark.kind == MarkKind::Fault)
        .collect();
    if faults.len() <= MAX_LABELLED_MARKS {
        for (index, mark) in faults.into_iter().enumerate() {
            let level = (index % LABEL_LEVELS) as f64;
            let y = top * (0.97 - 0.07 * level);
            let text = Text::new(mark.label.clone(), (3, 0), style::label(mark.kind.color()));
            chart.draw_series(std::iter::once(EmptyElement::at((mark.at_s, y)) + text))?;
        }
    }
    Ok(())
}

fn draw_latency(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    activity: &ClientActivity,
    end_s: f64,
) -> Result<(), DrawError> {
    let values = || {
        activity
            .latency_ms
            .iter()
            .flat_map(|series| series.points.iter().map(|(_, v)| *v))
            .filter(|v| *v > 0.0)
    };
    let lowest = values().fold(f64::INFINITY, f64::min);
    let lowest = if lowest.is_finite() {
        lowest * 0.7
    } else {
        0.1
    };
    let highest = values().fold(lowest * 10.0, f64::max);
    // Room above the data (a factor: the scale is logarithmic) for the takeover labels.
    let top = highest * 8.0;
    let mut chart = ChartBuilder::on(area)
        .margin(8)
        .margin_right(20)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end_s, (lowest..top).log_scale())?;
    chart
        .configure_mesh()
        .light_line_style(style::LIGHT_GREY.mix(0.5))
        .bold_line_style(style::LIGHT_GREY)
        .label_style(style::label(style::BLACK))
        .x_desc("seconds since the start")
        .y_desc("latency, ms (log scale)")
        .x_label_formatter(&|s| format!("{s:.0} s"))
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()?;
    for mark in &activity.marks {
        chart.draw_series(vertical(mark, lowest, top))?;
    }
    for series in &activity.latency_ms {
        let positive = Series {
            points: series
                .points
                .iter()
                .copied()
                .map(|(t, v)| (t, if v > 0.0 { v } else { f64::NAN }))
                .collect(),
            ..series.clone()
        };
        draw_series(&mut chart, &positive)?;
    }
    let takeovers: Vec<&Mark> = activity
        .marks
        .iter()
        .filter(|mark| mark.kind == MarkKind::Takeover)
        .collect();
    if takeovers.len() <= MAX_LABELLED_MARKS {
        for (index, mark) in takeovers.into_iter().enumerate() {
            // Levels in factors of the log scale: 0.9, 0.5, 0.28 of the top.
            let level = (index % LABEL_LEVELS) as i32;
            let y = top * 0.9 * 0.55_f64.powi(level);
            let text = Text::new(mark.label.clone(), (3, 0), style::label(mark.kind.color()));
            chart.draw_series(std::iter::once(EmptyElement::at((mark.at_s, y)) + text))?;
        }
    }
    Ok(())
}

/// A vertical line at the mark, from `low` to `high`.
fn vertical<DB: DrawingBackend, Y: Clone + 'static>(
    mark: &Mark,
    low: Y,
    high: Y,
) -> LineSeries<DB, (f64, Y)> {
    LineSeries::new(
        [(mark.at_s, low), (mark.at_s, high)],
        mark.kind.color().mix(0.8).stroke_width(1),
    )
}

/// Draws `series` as its style says.
fn draw_series<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    series: &Series,
) -> Result<(), DrawError>
where
    Y: Ranged<ValueType = f64>,
{
    let color = series.color();
    match series.style {
        SeriesStyle::Bold | SeriesStyle::Thin => {
            let width = if series.style == SeriesStyle::Bold {
                2
            } else {
                1
            };
            for stretch in series.points.split(|(_, value)| value.is_nan()) {
                chart.draw_series(LineSeries::new(
                    stretch.iter().copied(),
                    color.stroke_width(width),
                ))?;
            }
        }
        SeriesStyle::Dots => {
            chart.draw_series(
                series
                    .points
                    .iter()
                    .filter(|(_, value)| !value.is_nan())
                    .map(|&point| Circle::new(point, 3, color.filled())),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::svg_check::{assert_well_formed, texts};

    fn activity() -> ClientActivity {
        let ramp = |scale: f64| {
            (0..60)
                .map(|i| (i as f64, scale + i as f64 % 7.0))
                .collect()
        };
        ClientActivity {
            title: "campaign seed 1".into(),
            ops_per_s: vec![
                Series {
                    name: "a: ok/s".into(),
                    points: ramp(300.0),
                    palette_index: 0,
                    style: SeriesStyle::Bold,
                },
                Series {
                    name: "errors/s".into(),
                    points: vec![(20.0, 4.0)],
                    palette_index: 5,
                    style: SeriesStyle::Dots,
                },
            ],
            latency_ms: vec![
                Series {
                    name: "a: max".into(),
                    points: ramp(2.0),
                    palette_index: 0,
                    style: SeriesStyle::Bold,
                },
                Series {
                    name: "a: p50".into(),
                    points: vec![(1.0, 0.4), (2.0, 0.0), (3.0, 0.5)],
                    palette_index: 0,
                    style: SeriesStyle::Thin,
                },
            ],
            marks: vec![
                Mark {
                    at_s: 20.0,
                    kind: MarkKind::Fault,
                    label: "1 kill a".into(),
                },
                Mark {
                    at_s: 20.05,
                    kind: MarkKind::Takeover,
                    label: "a → b".into(),
                },
            ],
        }
    }

    #[test]
    fn activity_shows_series_and_labelled_marks() {
        let svg = draw_activity(&activity()).unwrap();
        assert_well_formed(&svg);
        let texts = texts(&svg);
        for expected in [
            "campaign seed 1",
            "operations/s",
            "latency, ms (log scale)",
            "a: ok/s",
            "errors/s",
            "a: p50",
            "1 kill a",
            "a → b",
            "fault injected",
            "takeover: served again",
        ] {
            assert!(
                texts.iter().any(|t| t == expected),
                "{expected:?} not in {texts:?}"
            );
        }
    }

    #[test]
    fn many_marks_go_unlabelled() {
        let mut many = activity();
        many.marks = (0..=MAX_LABELLED_MARKS)
            .map(|i| Mark {
                at_s: i as f64,
                kind: MarkKind::Fault,
                label: format!("fault {i}"),
            })
            .collect();
        let svg = draw_activity(&many).unwrap();
        assert!(!texts(&svg).iter().any(|t| t == "fault 3"));
    }

    #[test]
    fn no_operation_is_an_error() {
        let empty = ClientActivity {
            title: "t".into(),
            ..ClientActivity::default()
        };
        assert!(matches!(draw_activity(&empty), Err(DrawError::Empty(_))));
    }
}
