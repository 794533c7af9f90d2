//! The ivha host daemon and CLI.
//!
//! `hostd up` launches the pair and runs the daemon ([`daemon`]); the other subcommands talk
//! to it over its control socket (`wire::control`) or, like `inspect`, read regions directly.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod network;
pub mod programs;
pub mod render;
pub mod storage;
pub use wire::state_dir;
