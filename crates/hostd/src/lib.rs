//! The ivha host daemon and CLI.
//!
//! Today it decodes regions (`hostd inspect`); launching the pair, monitoring and takeover
//! arrive with the issues that build them.

pub mod cli;
pub mod render;
pub mod state_dir;
