//! ivha's wire formats, each defined once and read typed by every reader:
//!
//! - [`agent`]: the guest agent's settings, as flags and as kernel arguments;
//! - [`control`]: hostd's control socket, one JSON request line and one JSON response line
//!   (`hostd status`, `kill`, `takeover`, `giveback`, `down`);
//! - [`events`]: hostd's event log, `events.jsonl`;
//! - [`state_dir`]: where a cluster keeps its files, and [`records`]: the run records hostd
//!   leaves there (`run/NODE.json`);
//! - [`interconnect`]: the agents' interconnect settings and how its links are addressed;
//! - [`network`]: service IPs, as the configuration, status and the agent's settings
//!   name them;
//! - [`coordinator`]: the storage daemon's coordinator (membership, owners, claims);
//! - [`storage`]: the storage daemon's plan and control socket ([`json_line`]: the client
//!   side of both control sockets);
//! - [`nbd`]: the NBD protocol's constants, shared by the agent's server and the campaign's
//!   client;
//! - [`time`]: the wall clock all of them are stamped with, and [`error_chain`]: errors as
//!   the binaries print them and the socket and events carry them.

pub mod agent;
pub mod control;
pub mod coordinator;
pub mod error_chain;
pub mod events;
pub mod interconnect;
pub mod json_line;
pub mod nbd;
pub mod network;
pub mod records;
pub mod state_dir;
pub mod storage;
pub mod time;
