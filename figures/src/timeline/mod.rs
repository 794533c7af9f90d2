//! Takeover and giveback timelines: one row per identity move, its phases as bars on a
//! common axis of milliseconds after the failure was detected.

mod draw;
mod from_log;
mod row;

pub use draw::draw_timeline;
pub use from_log::moves_in_log;
pub use row::{MoveKind, MoveRow, Phase, PhaseSpan, RowMark};
