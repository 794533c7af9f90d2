//! The event log writer: appends [`wire::events::EventLine`]s to `STATE_DIR/events.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use wire::events::Event;
use wire::events::EventLine;

/// Appends events to the log; a failure to write is logged, never fatal.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
}

impl EventLog {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn record(&self, event: &Event) {
        let mut text = EventLine::new(event.clone(), wire::time::now_unix_us()).to_json();
        text.push('\n');
        // One write per line with O_APPEND: concurrent readers never see half a line.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        match written {
            Ok(()) => log::info!("event: {}", text.trim_end()),
            Err(error) => log::warn!("cannot record event in {}: {error}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::control::NodeState;

    #[test]
    fn events_are_json_lines_that_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::new(&dir.path().join("events.jsonl"));
        let first = Event::NodeState {
            node: "a".into(),
            from: NodeState::Booting,
            to: NodeState::Up,
            detail: "heartbeat 1".into(),
        };
        let second = Event::PairStopped {
            stopped: vec![("a".into(), "quit cleanly".into())],
        };
        log.record(&first);
        log.record(&second);
        let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        let (lines, bad) = wire::events::parse_log(&text);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].event, first);
        assert_eq!(lines[1].event, second);
        assert!(lines[0].time_unix_ms > 0);
        assert_eq!(lines[0].time_unix_us / 1000, lines[0].time_unix_ms);
    }
}
