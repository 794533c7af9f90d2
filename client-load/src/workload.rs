//! The workload: one file after another, each made durable before it is reported.
//!
//! A file version is written to `.tmp-NAME`, fsynced, renamed over `NAME`, then the
//! directory is fsynced and a journal line appended and fsynced. Only then is it reported:
//! whatever was reported must be on the disk, whatever the server did meanwhile. Names
//! cycle through `slots`, so the filesystem does not fill however long the run.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::content;
use crate::control::{ControlError, Reporter, StopSignal};
use crate::options::Options;
use crate::record::{FileRecord, Fsynced, Line};

/// The workload's directory under `--dir`.
pub const LOAD_DIR: &str = "load";
/// The journal under `--dir`.
pub const JOURNAL: &str = "journal.log";

/// Errors that end the workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot create the directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot fsync {path}")]
    Fsync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot report to the host")]
    Report(#[from] ControlError),
}

/// Runs until `stop` is set or `options.max_ops` files are done; returns how many were.
pub fn run(
    options: &Options,
    reporter: &mut Reporter,
    stop: &StopSignal,
) -> Result<u64, WorkloadError> {
    let started = Instant::now();
    let dir = options.dir.join(LOAD_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| WorkloadError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let journal_path = options.dir.join(JOURNAL);
    let mut journal = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&journal_path)
        .map_err(|source| WorkloadError::Open {
            path: journal_path.clone(),
            source,
        })?;
    // The new directory and journal entries must be durable before any file in them is.
    fsync_dir(&options.dir)?;
    reporter.send(&Line::Started {
        seed: options.seed,
        slots: options.slots,
        max_kib: options.max_kib,
    })?;
    let mut ops = 0;
    while !stop.requested() && options.max_ops.is_none_or(|max| ops < max) {
        ops += 1;
        let start_ms = ms_since(started);
        let record = write_file(options, &dir, ops)?;
        append_journal(&mut journal, &journal_path, &record)?;
        let end_ms = ms_since(started);
        reporter.send(&Line::Fsynced(Fsynced {
            record,
            start_ms,
            end_ms,
        }))?;
        if options.pause_ms > 0 {
            std::thread::sleep(Duration::from_millis(options.pause_ms));
        }
    }
    reporter.send(&Line::Stopped { ops })?;
    Ok(ops)
}

/// The file name of slot `slot`.
pub fn slot_name(slot: u64) -> String {
    format!("f{slot:05}")
}

fn write_file(options: &Options, dir: &Path, seq: u64) -> Result<FileRecord, WorkloadError> {
    let bytes = content::file_bytes(options.seed, seq, options.max_kib);
    let name = slot_name((seq - 1) % options.slots);
    let tmp = dir.join(format!(".tmp-{name}"));
    let path = dir.join(&name);
    let mut file = File::create(&tmp).map_err(|source| WorkloadError::Open {
        path: tmp.clone(),
        source,
    })?;
    file.write_all(&bytes)
        .map_err(|source| WorkloadError::Write {
            path: tmp.clone(),
            source,
        })?;
    file.sync_all().map_err(|source| WorkloadError::Fsync {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| WorkloadError::Rename {
        from: tmp.clone(),
        to: path.clone(),
        source,
    })?;
    fsync_dir(dir)?;
    Ok(FileRecord {
        seq,
        file: name,
        len: bytes.len() as u64,
        crc32c: crc32c::crc32c(&bytes),
    })
}

fn append_journal(
    journal: &mut File,
    path: &Path,
    record: &FileRecord,
) -> Result<(), WorkloadError> {
    writeln!(journal, "{record}").map_err(|source| WorkloadError::Write {
        path: path.to_owned(),
        source,
    })?;
    journal.sync_data().map_err(|source| WorkloadError::Fsync {
        path: path.to_owned(),
        source,
    })
}

fn fsync_dir(dir: &Path) -> Result<(), WorkloadError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| WorkloadError::Fsync {
            path: dir.to_owned(),
            source,
        })
}

fn ms_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reported_file_is_on_disk_as_reported() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report");
        let options = Options {
            dir: dir.path().join("fs"),
            control: Some(report.clone()),
            stop_from: None,
            seed: 5,
            slots: 3,
            max_kib: 2,
            pause_ms: 0,
            max_ops: Some(7),
        };
        let mut reporter = Reporter::open(Some(&report)).unwrap();
        let ops = run(&options, &mut reporter, &StopSignal::default()).unwrap();
        assert_eq!(ops, 7);
        let lines: Vec<Line> = std::fs::read_to_string(&report)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(matches!(
            lines[0],
            Line::Started {
                seed: 5,
                slots: 3,
                max_kib: 2
            }
        ));
        assert_eq!(lines.last(), Some(&Line::Stopped { ops: 7 }));
        let ops: Vec<&Fsynced> = lines
            .iter()
            .filter_map(|l| match l {
                Line::Fsynced(op) => Some(op),
                _ => None,
            })
            .collect();
        assert_eq!(ops.len(), 7);
        // The last version of each of the three names is what the directory holds.
        for op in &ops[4..] {
            let bytes = std::fs::read(options.dir.join(LOAD_DIR).join(&op.record.file)).unwrap();
            assert_eq!(bytes.len() as u64, op.record.len);
            assert_eq!(crc32c::crc32c(&bytes), op.record.crc32c);
            assert!(op.end_ms >= op.start_ms);
        }
        let journal: Vec<FileRecord> = std::fs::read_to_string(options.dir.join(JOURNAL))
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let reported: Vec<FileRecord> = ops.iter().map(|op| op.record.clone()).collect();
        assert_eq!(journal, reported);
    }
}
