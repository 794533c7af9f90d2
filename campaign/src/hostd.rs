//! Driving a pair through the `hostd` command line, as an operator would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wire::control::{ClusterStatus, NodeState, NodeStatus};
use wire::events::EventLine;

/// Errors talking to hostd.
#[derive(Debug, thiserror::Error)]
pub enum HostdError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`hostd {args}` failed (exit code {code}): {stderr}")]
    Failed {
        args: String,
        code: i32,
        stderr: String,
    },
    #[error("`hostd {args}` printed something that is not JSON")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read hostd's events {path}")]
    Events {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line} is not an event this version knows: {error}")]
    BadEvent {
        path: PathBuf,
        line: usize,
        error: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}; last status: {status}")]
    Timeout {
        what: String,
        timeout: Duration,
        status: String,
    },
}

/// One cluster's `hostd`, by binary and state directory.
#[derive(Debug, Clone)]
pub struct Hostd {
    pub binary: PathBuf,
    pub state_dir: PathBuf,
}

impl Hostd {
    /// Runs `hostd ARGS`; its stdout on success.
    pub fn run(&self, args: &[&str]) -> Result<String, HostdError> {
        let out = Command::new(&self.binary)
            .args(args)
            .env("IVHA_STATE_DIR", &self.state_dir)
            .output()
            .map_err(|source| HostdError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(HostdError::Failed {
                args: args.join(" "),
                code: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// `hostd up --detach` (with `config`, or adopting what runs when `None`).
    pub fn up(&self, config: Option<&Path>) -> Result<String, HostdError> {
        let mut args = vec!["up", "--detach", "--timeout", "180"];
        let config_text;
        if let Some(config) = config {
            config_text = config.display().to_string();
            args.extend(["--config", config_text.as_str()]);
        }
        self.run(&args)
    }

    /// `hostd status --json`.
    pub fn status(&self) -> Result<ClusterStatus, HostdError> {
        let text = self.run(&["status", "--json"])?;
        serde_json::from_str(&text).map_err(|source| HostdError::Json {
            args: "status --json".into(),
            source,
        })
    }

    /// The status of node `name` within `status`.
    pub fn node<'a>(status: &'a ClusterStatus, name: &str) -> Option<&'a NodeStatus> {
        status.nodes.iter().find(|n| n.name == name)
    }

    /// Whether every node is up and serves its own identity.
    pub fn healthy(status: &ClusterStatus) -> bool {
        status
            .nodes
            .iter()
            .all(|n| n.state == NodeState::Up && n.served_by.as_deref() == Some(&n.name))
    }

    /// Polls the status until `check` holds.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&ClusterStatus) -> bool,
    ) -> Result<ClusterStatus, HostdError> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Ok(status) = self.status() {
                if check(&status) {
                    return Ok(status);
                }
                last = Some(status);
            }
            if Instant::now() >= deadline {
                return Err(HostdError::Timeout {
                    what: what.to_owned(),
                    timeout,
                    status: last.as_ref().map_or_else(|| "none".to_owned(), summary),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// hostd's structured events so far (`STATE/events.jsonl`), oldest first. A line that
    /// is not an event this version knows is an error: the checker's input would silently
    /// lack it otherwise.
    pub fn events(&self) -> Result<Vec<EventLine>, HostdError> {
        let path = self.state_dir.join("events.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(HostdError::Events { path, source }),
        };
        let (events, bad) = wire::events::parse_log(&text);
        match bad.into_iter().next() {
            None => Ok(events),
            Some(bad) => Err(HostdError::BadEvent {
                path,
                line: bad.number,
                error: bad.error,
            }),
        }
    }

    /// Node `name`'s region file.
    pub fn region_path(&self, name: &str) -> PathBuf {
        self.state_dir
            .join("regions")
            .join(format!("{name}.region"))
    }
}

/// A status in one line, for error messages.
pub fn summary(status: &ClusterStatus) -> String {
    serde_json::to_string(status).unwrap_or_default()
}
