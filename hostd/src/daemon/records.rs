//! What a hostd leaves in the state directory so that the next one can adopt the running
//! cluster: one record per node process (`run/NODE.json`, [`RunRecord`]: pid and start
//! time) and the configuration the cluster was started with (`run/config.json`).
//!
//! The guests do not depend on hostd to serve: a hostd killed even with SIGKILL leaves them
//! running, and a new one finds them here. The start time makes a recycled pid harmless:
//! a record only matches the process it was written for.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use wire::records::RunRecord;

use super::topology::NodeId;
use crate::config::Config;
use crate::state_dir::StateDir;

/// Errors writing the records. Reading is forgiving: a missing or unreadable record only
/// means there is nothing to adopt.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the start time of process {pid}")]
    StartTime {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

fn record_path(state: &StateDir, node: &str) -> PathBuf {
    state.run_dir().join(format!("{node}.json"))
}

fn config_path(state: &StateDir) -> PathBuf {
    state.run_dir().join("config.json")
}

/// Writes `value` as JSON to `path` atomically (a reader never sees half a file): a new
/// file renamed over the old, its directory made if missing. Every record hostd keeps in
/// the state directory goes through here.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.new");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// [`write_json`] for the run records.
fn write_record(path: &Path, value: &impl Serialize) -> Result<(), RecordError> {
    write_json(path, value).map_err(|source| RecordError::Write {
        path: path.to_owned(),
        source,
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(value) => Some(value),
        Err(error) => {
            log::warn!("ignoring {}: {error}", path.display());
            None
        }
    }
}

/// Records that node `node` runs as process `pid`, started when its region showed boot id
/// and heartbeat `before`.
pub fn save_record(
    state: &StateDir,
    node: &str,
    pid: u32,
    before: (u64, u64),
) -> Result<(), RecordError> {
    let start_time =
        qemu::process_start_time(pid).map_err(|source| RecordError::StartTime { pid, source })?;
    let record = RunRecord {
        pid,
        start_time,
        boot_id_before: before.0,
        heartbeat_before: before.1,
    };
    write_record(&record_path(state, node), &record)
}

/// The record of node `node`, if there is one.
pub fn load_record(state: &StateDir, node: &str) -> Option<RunRecord> {
    read_json(&record_path(state, node))
}

/// Forgets node `node`'s process (it was stopped on purpose).
pub fn remove_record(state: &StateDir, node: &str) {
    let path = record_path(state, node);
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot remove {}: {error}", path.display());
    }
}

/// Records the configuration the pair is started with.
pub fn save_config(state: &StateDir, config: &Config) -> Result<(), RecordError> {
    write_record(&config_path(state), config)
}

/// The configuration the running pair was started with.
pub fn load_config(state: &StateDir) -> Option<Config> {
    read_json(&config_path(state))
}

/// Whether the process a record names still runs (same pid, same start time). An error
/// means it cannot be told: then nothing may be assumed dead.
pub fn is_running(record: &RunRecord) -> Result<bool, RecordError> {
    match qemu::process_state_and_start_time(record.pid) {
        Ok((state, start_time)) => Ok(start_time == record.start_time && !is_zombie(state)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(RecordError::StartTime {
            pid: record.pid,
            source,
        }),
    }
}

/// Whether a process in `state` exited but was not reaped yet (its parent, init, reaps it
/// soon).
fn is_zombie(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

/// The nodes of `config` that have a running process to adopt, with their records. Empty
/// when nothing runs: then the cluster is launched afresh.
pub fn running_nodes(
    state: &StateDir,
    config: &Config,
) -> Result<Vec<(NodeId, RunRecord)>, RecordError> {
    let mut running = Vec::new();
    for (index, node) in config.nodes.iter().enumerate() {
        if let Some(record) = load_record(state, &node.name)
            && is_running(&record)?
        {
            running.push((NodeId::from_index(index), record));
        }
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_match_only_their_own_process() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let config = Config::default();
        assert!(running_nodes(&state, &config).unwrap().is_empty());
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        save_record(&state, &config.nodes[0].name, sleeper.id(), (5, 6)).unwrap();
        let found = running_nodes(&state, &config).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0.index(), 0);
        assert_eq!(found[0].1.pid, sleeper.id());
        // Another process with the same pid would have another start time.
        let recycled = RunRecord {
            start_time: found[0].1.start_time + 1,
            ..found[0].1
        };
        assert!(!is_running(&recycled).unwrap());
        assert_eq!(
            (found[0].1.boot_id_before, found[0].1.heartbeat_before),
            (5, 6)
        );
        sleeper.kill().unwrap();
        // Not reaped yet: a zombie does not count as running.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !running_nodes(&state, &config).unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie counts as running"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sleeper.wait().unwrap();
        assert!(running_nodes(&state, &config).unwrap().is_empty());
        remove_record(&state, &config.nodes[0].name);
        assert!(load_record(&state, &config.nodes[0].name).is_none());
        remove_record(&state, &config.nodes[0].name);
    }

    #[test]
    fn config_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(load_config(&state).is_none());
        let mut config = Config::default();
        config.heartbeat.timeout_ms = 1234;
        save_config(&state, &config).unwrap();
        assert_eq!(load_config(&state), Some(config));
        std::fs::write(record_path(&state, "a"), b"{not json").unwrap();
        assert!(load_record(&state, "a").is_none());
    }
}
