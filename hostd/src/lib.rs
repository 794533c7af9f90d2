//! The ivha host daemon and CLI.
//!
//! `hostd up` launches the pair and runs the daemon ([`daemon`]); the other subcommands talk
//! to it over its control socket ([`protocol`]) or, like `inspect`, read regions directly.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod protocol;
pub mod render;
pub mod state_dir;
