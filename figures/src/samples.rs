//! Samples of a measurement, group by group: every value as a dot, the median as a bar,
//! and targets as dashed lines (for example kill → first read per trial, by log size).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::DrawError;
use crate::legend::{self, Swatch};
use crate::style;

/// Height of the chart.
const CHART_HEIGHT: u32 = 480;

/// The values of one group, such as the trials of one log size.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub values: Vec<f64>,
}

/// A value the samples should stay under, drawn across the figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub label: String,
    pub value: f64,
}

/// A figure of samples.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Samples {
    pub title: String,
    /// What the values are, with their unit.
    pub y_label: String,
    pub groups: Vec<Group>,
    pub targets: Vec<Target>,
}

/// The median (nearest rank) of `values`.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = sorted.len().div_ceil(2);
    sorted.get(rank.checked_sub(1)?).copied()
}

/// The figure of `samples` as an SVG document.
pub fn draw_samples(samples: &Samples) -> Result<String, DrawError> {
    if samples.groups.iter().all(|group| group.values.is_empty()) {
        return Err(DrawError::Empty("no sample"));
    }
    let count = samples.groups.len();
    let highest = samples
        .groups
        .iter()
        .flat_map(|group| group.values.iter().copied())
        .chain(samples.targets.iter().map(|target| target.value))
        .fold(1.0, f64::max);
    let items = [
        legend::Item {
            swatch: Swatch::Dot(style::BLUE),
            name: "one trial".to_owned(),
        },
        legend::Item {
            swatch: Swatch::Line(style::BLACK, 3),
            name: "median (value beside it)".to_owned(),
        },
        legend::Item {
            swatch: Swatch::Line(style::VERMILLION, 1),
            name: "target".to_owned(),
        },
    ];
    let legend_height = legend::LINE_HEIGHT + 8;
    let height = CHART_HEIGHT + 40 + legend_height;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (style::WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&samples.title, style::title())?;
        let (area, legend_area) = root.split_vertically(root.dim_in_pixel().1 - legend_height);
        let centers: Vec<f64> = (0..count).map(|index| index as f64).collect();
        let mut chart = ChartBuilder::on(&area)
            .margin(8)
            .margin_right(20)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(
                style::CentredAxis::new(-0.5..count as f64 - 0.5, centers),
                0.0..highest * 1.15,
            )?;
        let name_of = |x: &f64| {
            let index = x.round();
            samples
                .groups
                .get(index as usize)
                .filter(|_| index >= 0.0)
                .map_or_else(String::new, |group| group.name.clone())
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(style::LIGHT_GREY.mix(0.5))
            .bold_line_style(style::LIGHT_GREY)
            .label_style(style::label(style::BLACK))
            .y_desc(samples.y_label.as_str())
            .x_label_formatter(&name_of)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for target in &samples.targets {
            chart.draw_series(DashedLineSeries::new(
                [(-0.5, target.value), (count as f64 - 0.5, target.value)],
                6,
                4,
                style::VERMILLION.stroke_width(1),
            ))?;
            let above = style::label(style::VERMILLION).pos(Pos::new(HPos::Left, VPos::Bottom));
            let text = Text::new(target.label.clone(), (4, -3), above);
            chart.draw_series(std::iter::once(
                EmptyElement::at((-0.5, target.value)) + text,
            ))?;
        }
        for (index, group) in samples.groups.iter().enumerate() {
            let center = index as f64;
            let count = group.values.len();
            chart.draw_series(group.values.iter().enumerate().map(|(n, &value)| {
                // Dots side by side in trial order, so equal values stay visible.
                let x = if count > 1 {
                    center - 0.3 + 0.6 * n as f64 / (count - 1) as f64
                } else {
                    center
                };
                Circle::new((x, value), 4, style::BLUE.mix(0.7).filled())
            }))?;
            if let Some(median) = median(&group.values) {
                chart.draw_series(LineSeries::new(
                    [(center - 0.38, median), (center + 0.38, median)],
                    style::BLACK.stroke_width(3),
                ))?;
                let text = Text::new(
                    style::duration_ms(median),
                    (6, 0),
                    style::label_after(style::BLACK),
                );
                chart.draw_series(std::iter::once(
                    EmptyElement::at((center + 0.38, median)) + text,
                ))?;
            }
        }
        legend::draw(&legend_area, &items)?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::svg_check::{assert_well_formed, texts};

    #[test]
    fn samples_show_groups_medians_and_targets() {
        let samples = Samples {
            title: "kill → first read".into(),
            y_label: "ms".into(),
            groups: vec![
                Group {
                    name: "SIGKILL, 0 MiB".into(),
                    values: vec![45.5, 40.0, 95.0],
                },
                Group {
                    name: "SIGKILL, 64 MiB".into(),
                    values: vec![49.5],
                },
            ],
            targets: vec![Target {
                label: "target: p50 < 60 ms".into(),
                value: 60.0,
            }],
        };
        let svg = draw_samples(&samples).unwrap();
        assert_well_formed(&svg);
        let texts = texts(&svg);
        for expected in [
            "kill → first read",
            "SIGKILL, 0 MiB",
            "SIGKILL, 64 MiB",
            "45.5 ms",
            "49.5 ms",
            "target: p50 < 60 ms",
        ] {
            assert!(
                texts.iter().any(|t| t == expected),
                "{expected:?} not in {texts:?}"
            );
        }
        assert_eq!(
            svg.matches("<circle").count(),
            4 + 1,
            "a dot per trial, one in the legend"
        );
    }

    #[test]
    fn medians_are_nearest_rank() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(1.0));
        assert_eq!(median(&[]), None);
    }
}
