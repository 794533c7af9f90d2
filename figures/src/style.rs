//! What every figure shares: sizes, fonts and the palette (Okabe-Ito: tells apart for
//! colour-blind readers too).

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{IntoFont, RGBColor, TextStyle};

/// Figure width in pixels.
pub const WIDTH: u32 = 1000;
/// Font size of titles, and of labels and ticks.
pub const TITLE_SIZE: u32 = 20;
pub const LABEL_SIZE: u32 = 14;
/// The font: the viewer's sans-serif (an SVG names it; no font file is read here).
pub const FAMILY: &str = "sans-serif";

pub const BLACK: RGBColor = RGBColor(0, 0, 0);
pub const GREY: RGBColor = RGBColor(0x99, 0x99, 0x99);
pub const LIGHT_GREY: RGBColor = RGBColor(0xdd, 0xdd, 0xdd);
pub const ORANGE: RGBColor = RGBColor(0xe6, 0x9f, 0x00);
pub const SKY_BLUE: RGBColor = RGBColor(0x56, 0xb4, 0xe9);
pub const GREEN: RGBColor = RGBColor(0x00, 0x9e, 0x73);
pub const YELLOW: RGBColor = RGBColor(0xf0, 0xe4, 0x42);
pub const BLUE: RGBColor = RGBColor(0x00, 0x72, 0xb2);
pub const VERMILLION: RGBColor = RGBColor(0xd5, 0x5e, 0x00);
pub const PURPLE: RGBColor = RGBColor(0xcc, 0x79, 0xa7);

/// Colours for series without a colour of their own, in order.
pub const SERIES: [RGBColor; 6] = [BLUE, ORANGE, GREEN, PURPLE, SKY_BLUE, VERMILLION];

/// The text style of titles.
pub fn title() -> TextStyle<'static> {
    (FAMILY, TITLE_SIZE).into_font().into()
}

/// The text style of labels, in `color`.
pub fn label(color: RGBColor) -> TextStyle<'static> {
    (FAMILY, LABEL_SIZE).into_font().color(&color)
}

/// The text style of labels that start at their point and are centred on it vertically.
pub fn label_after(color: RGBColor) -> TextStyle<'static> {
    label(color).pos(Pos::new(HPos::Left, VPos::Center))
}

/// About how wide `text` is at the label size, in pixels (an estimate: the viewer picks
/// the font).
pub fn label_width(text: &str) -> u32 {
    let chars = u32::try_from(text.chars().count()).unwrap_or(u32::MAX);
    chars.saturating_mul(LABEL_SIZE * 6 / 10).saturating_add(8)
}

/// `12 ms`, `12.3 ms`, `1.25 s`: milliseconds for people.
pub fn duration_ms(ms: f64) -> String {
    if ms.abs() >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms.abs() >= 100.0 || ms.fract() == 0.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// A linear axis whose ticks are exactly the given centres (of rows, or of groups), so
/// that each gets its label.
#[derive(Debug, Clone)]
pub struct CentredAxis {
    range: Range<f64>,
    centres: Vec<f64>,
}

impl CentredAxis {
    /// The axis over `range` with ticks at `centres`.
    pub fn new(range: Range<f64>, centres: Vec<f64>) -> Self {
        CentredAxis { range, centres }
    }
}

impl Ranged for CentredAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        RangedCoordf64::from(self.range.clone()).map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        // Every centre: the figures size themselves so that the labels fit.
        self.centres.clone()
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ms(12.0), "12 ms");
        assert_eq!(duration_ms(12.34), "12.3 ms");
        assert_eq!(duration_ms(820.4), "820 ms");
        assert_eq!(duration_ms(3281.0), "3.28 s");
    }
}
