//! SVG figures for operators: takeover timelines, client operations and latency over time,
//! and samples of a measurement.
//!
//! Each figure is built from typed inputs ([`MoveRow`]s, [`ClientActivity`], [`Samples`])
//! and drawn with `plotters` into an SVG string; callers decide where it goes. Text is left
//! to the SVG viewer's sans-serif font (no font is loaded here), so label widths are
//! estimated and the layout leaves room for that.

mod activity;
mod legend;
mod samples;
mod style;
#[cfg(test)]
mod svg_check;
pub mod timeline;

pub use activity::{ClientActivity, Mark, MarkKind, Series, SeriesStyle, draw_activity};
pub use samples::{Group, Samples, Target, draw_samples};
pub use timeline::{MoveKind, MoveRow, Phase, PhaseSpan, RowMark, draw_timeline, moves_in_log};

use plotters::drawing::DrawingAreaErrorKind;

/// Drawing a figure failed.
#[derive(Debug, thiserror::Error)]
pub enum DrawError {
    /// The input holds nothing the figure could show.
    #[error("there is nothing to draw: {0}")]
    Empty(&'static str),
    /// plotters failed (into a string this can only be a layout problem).
    #[error("plotting failed")]
    Plot(#[from] DrawingAreaErrorKind<std::io::Error>),
}
