//! The checks after the run, on a copy of the export: the filesystem passes `e2fsck -fn`,
//! every file holds the last version the client reported fsynced (length and CRC32C), and
//! the journal in the filesystem lists exactly the reported versions.
//!
//! A client that unmounted cleanly leaves nothing in ext4's journal. One that did not (its
//! journal aborted after an I/O error, or it was killed) leaves fsynced data there, which
//! neither `e2fsck -n` nor `debugfs` reads: the journal is replayed first, as the next
//! mount would, and the need for it is itself a finding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use client_load::record::FileRecord;
use client_load::workload::{JOURNAL, LOAD_DIR};

use super::tools::{self, ToolError};

/// What the checks found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub fsck_clean: bool,
    /// Files compared with their last reported version, and how many matched.
    pub files_checked: usize,
    pub files_matching: usize,
    /// Records in the journal.
    pub journal_records: usize,
    /// ext4's journal had to be replayed: the client did not unmount cleanly.
    pub journal_recovered: bool,
    /// Each finding, as a sentence.
    pub violations: Vec<String>,
}

/// Errors that keep the checks from running.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("cannot prepare {path} for the extracted files")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks the filesystem image `image` against the versions the client `reported`,
/// extracting its files under `work`.
pub fn verify(
    image: &Path,
    work: &Path,
    reported: &[FileRecord],
) -> Result<Verification, VerifyError> {
    let image_text = image.display().to_string();
    let mut found = Verification::default();
    let header = tools::run("dumpe2fs", &["-h", &image_text])?;
    if needs_recovery(&String::from_utf8_lossy(&header.stdout)) {
        found.journal_recovered = true;
        found.violations.push(
            "the client did not unmount its filesystem cleanly: ext4's journal needed recovery \
             (replayed before the checks, as a mount would)"
                .to_owned(),
        );
        let replay = tools::output("e2fsck", &["-E", "journal_only", "-y", &image_text])?;
        // 0: nothing changed, 1: the journal was replayed.
        if replay.status.code().is_none_or(|code| code > 1) {
            found.violations.push(format!(
                "e2fsck could not replay the journal (exit code {}): {}",
                replay.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&replay.stdout).trim()
            ));
        }
    }
    let fsck = tools::output("e2fsck", &["-f", "-n", &image_text])?;
    found.fsck_clean = fsck.status.success();
    if !found.fsck_clean {
        let said = String::from_utf8_lossy(&fsck.stdout);
        let tail: Vec<&str> = said.lines().rev().take(12).collect();
        found.violations.push(format!(
            "e2fsck -fn found a damaged filesystem (exit code {}): {}",
            fsck.status.code().unwrap_or(-1),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }

    let extracted = work.join("extracted");
    let prepare = |source| VerifyError::Prepare {
        path: extracted.clone(),
        source,
    };
    match std::fs::remove_dir_all(&extracted) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(prepare(error)),
        _ => {}
    }
    std::fs::create_dir_all(&extracted).map_err(prepare)?;
    let into = extracted.display().to_string();
    // debugfs reports a failed request on stderr but exits 0: what is missing shows below.
    tools::run(
        "debugfs",
        &["-R", &format!("rdump /{LOAD_DIR} \"{into}\""), &image_text],
    )?;
    tools::run(
        "debugfs",
        &[
            "-R",
            &format!("dump /{JOURNAL} \"{into}/{JOURNAL}\""),
            &image_text,
        ],
    )?;

    found.violations.extend(check_sequence(reported));
    let (checked, violations) = check_files(reported, &extracted.join(LOAD_DIR));
    found.files_checked = checked;
    found.files_matching = checked - violations.len();
    found.violations.extend(violations);
    let journal = std::fs::read_to_string(extracted.join(JOURNAL));
    match journal {
        Ok(text) => {
            let (records, violations) = check_journal(reported, &text);
            found.journal_records = records;
            found.violations.extend(violations);
        }
        Err(error) => found.violations.push(format!(
            "the filesystem has no readable /{JOURNAL}: {error}"
        )),
    }
    Ok(found)
}

/// Whether `dumpe2fs -h` output says the journal holds transactions to replay.
fn needs_recovery(header: &str) -> bool {
    header
        .lines()
        .filter(|line| line.starts_with("Filesystem features:"))
        .any(|line| line.split_whitespace().any(|word| word == "needs_recovery"))
}

/// Reports must come as seq 1, 2, 3...: a gap means a lost report line, after which the
/// other checks would miss that version.
pub fn check_sequence(reported: &[FileRecord]) -> Vec<String> {
    reported
        .iter()
        .zip(1..)
        .find(|(record, expected)| record.seq != *expected)
        .map(|(record, expected)| {
            format!(
                "the client's reports skip from seq {} to seq {} (a lost report line)",
                expected - 1,
                record.seq
            )
        })
        .into_iter()
        .collect()
}

/// Compares each file in `dir` with the last version reported under its name; returns how
/// many were compared and what differed.
pub fn check_files(reported: &[FileRecord], dir: &Path) -> (usize, Vec<String>) {
    let mut last: BTreeMap<&str, &FileRecord> = BTreeMap::new();
    for record in reported {
        last.insert(&record.file, record);
    }
    let violations = last
        .values()
        .filter_map(|record| {
            let holds = match std::fs::read(dir.join(&record.file)) {
                Ok(bytes) => bytes,
                Err(error) => {
                    return Some(format!(
                        "{}: fsynced as seq {} but not in the filesystem: {error}",
                        record.file, record.seq
                    ));
                }
            };
            let crc = crc32c::crc32c(&holds);
            (holds.len() as u64 != record.len || crc != record.crc32c).then(|| {
                format!(
                    "{}: fsynced as seq {} with {} bytes, crc32c {:08x}, but the filesystem holds {} bytes, crc32c {crc:08x}",
                    record.file,
                    record.seq,
                    record.len,
                    record.crc32c,
                    holds.len()
                )
            })
        })
        .collect();
    (last.len(), violations)
}

/// Compares the journal's text with the reported versions (the same records in the same
/// order); returns how many records it holds and what differed.
pub fn check_journal(reported: &[FileRecord], text: &str) -> (usize, Vec<String>) {
    let mut violations = Vec::new();
    let mut journal = Vec::new();
    for (number, line) in text.lines().enumerate() {
        match line.parse::<FileRecord>() {
            Ok(record) => journal.push(record),
            Err(error) => violations.push(format!(
                "journal line {} is not a record ({error}): {line:?}",
                number + 1
            )),
        }
    }
    let differ = journal.iter().zip(reported).position(|(j, r)| j != r);
    if let Some(index) = differ {
        violations.push(format!(
            "journal record {} is \"{}\" but the client reported \"{}\"",
            index + 1,
            journal[index],
            reported[index]
        ));
    } else if journal.len() < reported.len() {
        violations.push(format!(
            "the journal ends after {} records, but the client reported {} fsynced (first missing: \"{}\")",
            journal.len(),
            reported.len(),
            reported[journal.len()]
        ));
    } else if journal.len() > reported.len() {
        violations.push(format!(
            "the journal has {} records the client never reported (first: \"{}\")",
            journal.len() - reported.len(),
            journal[reported.len()]
        ));
    }
    (journal.len(), violations)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(seq: u64, file: &str, bytes: &[u8]) -> FileRecord {
        FileRecord {
            seq,
            file: file.into(),
            len: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        }
    }

    #[test]
    fn files_must_hold_their_last_reported_version() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f0"), b"new").unwrap();
        std::fs::write(dir.path().join("f1"), b"stale").unwrap();
        let reported = [
            record(1, "f0", b"old"),
            record(2, "f1", b"stale"),
            record(3, "f0", b"new"),
            record(4, "f1", b"fresh"),
            record(5, "f2", b"gone"),
        ];
        let (checked, violations) = check_files(&reported, dir.path());
        assert_eq!(checked, 3);
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[0].starts_with("f1: fsynced as seq 4 with 5 bytes"));
        assert!(violations[1].starts_with("f2: fsynced as seq 5 but not in the filesystem"));
    }

    #[test]
    fn the_journal_must_list_exactly_the_reported_versions() {
        let reported = [record(1, "f0", b"a"), record(2, "f1", b"b")];
        let text: String = reported.iter().map(|r| format!("{r}\n")).collect();
        assert_eq!(check_journal(&reported, &text), (2, vec![]));

        let (records, short) = check_journal(&reported, &format!("{}\n", reported[0]));
        assert_eq!(records, 1);
        assert!(short[0].contains("ends after 1 records"), "{short:?}");

        let longer = format!("{text}{}\n", record(3, "f2", b"c"));
        assert!(check_journal(&reported, &longer).1[0].contains("never reported"));

        let other = format!("{}\n{}\n", reported[0], record(2, "f1", b"x"));
        assert!(check_journal(&reported, &other).1[0].starts_with("journal record 2 is"));

        let torn = format!("{text}seq=3 file=f2 len=1\n");
        assert!(check_journal(&reported, &torn).1[0].starts_with("journal line 3 is not a record"));
    }

    #[test]
    fn a_journal_to_replay_is_seen_in_the_features() {
        let dirty = "Filesystem state:         clean\n\
                     Filesystem features:      has_journal ext_attr needs_recovery extent 64bit\n";
        assert!(needs_recovery(dirty));
        assert!(!needs_recovery(&dirty.replace("needs_recovery ", "")));
        assert!(!needs_recovery("Journal features: needs_recovery\n"));
    }

    #[test]
    fn a_gap_in_the_reports_is_found() {
        let reported = [record(1, "f0", b"a"), record(3, "f1", b"b")];
        assert_eq!(
            check_sequence(&reported),
            vec!["the client's reports skip from seq 1 to seq 3 (a lost report line)"]
        );
        assert!(check_sequence(&reported[..1]).is_empty());
    }
}
