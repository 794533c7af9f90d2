//! The measurement's figures: a timeline row per trial (`takeover-timelines.svg`) and every
//! trial's kill → first read by kind and size (`first-read.svg`).

use std::path::{Path, PathBuf};

use figures::{Group, MoveKind, MoveRow, Samples, Target};

use super::trial::Trial;
use super::{MeasureError, TARGET_P50_MS};

/// The trials of one kind of fault and one log size.
#[derive(Debug)]
pub struct TrialSeries<'a> {
    /// `kill` or `hang`.
    pub fault: &'static str,
    pub unflushed_mib: u64,
    pub trials: &'a [Trial],
}

/// Writes the figures of `series` into `dir` (created if needed); returns the files.
pub fn write_figures(dir: &Path, series: &[TrialSeries<'_>]) -> Result<Vec<PathBuf>, MeasureError> {
    std::fs::create_dir_all(dir).map_err(|source| MeasureError::WriteFigure {
        path: dir.to_owned(),
        source,
    })?;
    let rows = timeline_rows(series);
    let timeline = figures::draw_timeline(
        "Takeovers of a's identity, one row per trial (ms after detection)",
        &rows,
    )
    .map_err(MeasureError::DrawFigure)?;
    let samples =
        figures::draw_samples(&first_read_samples(series)).map_err(MeasureError::DrawFigure)?;
    let mut written = Vec::new();
    for (name, svg) in [
        ("takeover-timelines.svg", timeline),
        ("first-read.svg", samples),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, svg).map_err(|source| MeasureError::WriteFigure {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// A row per trial: hostd's timeline, detection from the kill request (t0), the client's
/// first good read as a mark.
fn timeline_rows(series: &[TrialSeries<'_>]) -> Vec<MoveRow> {
    let mut rows = Vec::new();
    for one in series {
        for (number, trial) in one.trials.iter().enumerate() {
            let Some(report) = &trial.takeover else {
                continue;
            };
            let detected_after_t0 =
                report.detected_unix_ms as f64 - trial.t0_unix_us as f64 / 1000.0;
            let mut row = MoveRow::from_report(report, MoveKind::Takeover { planned: false })
                .with_fault_at(trial.t0_unix_us)
                .with_mark(
                    "client's first good read",
                    trial.first_read - detected_after_t0,
                );
            if let Some(replayed) = trial.replayed {
                row = row.with_background_replay(replayed);
            }
            row.label = format!("{} {} MiB #{}", one.fault, one.unflushed_mib, number + 1);
            rows.push(row);
        }
    }
    rows
}

/// Kill → first read of every trial, a group per series, with the target for SIGKILLs.
fn first_read_samples(series: &[TrialSeries<'_>]) -> Samples {
    let groups = series
        .iter()
        .filter(|one| !one.trials.is_empty())
        .map(|one| Group {
            name: format!(
                "{}, {} MiB",
                if one.fault == "hang" {
                    "SIGSTOP"
                } else {
                    "SIGKILL"
                },
                one.unflushed_mib
            ),
            values: one.trials.iter().map(|trial| trial.first_read).collect(),
        })
        .collect();
    Samples {
        title: "Kill → first good read through a's address, every trial".to_owned(),
        y_label: "ms".to_owned(),
        groups,
        targets: vec![Target {
            label: format!("target: SIGKILL p50 < {TARGET_P50_MS:.0} ms"),
            value: TARGET_P50_MS,
        }],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wire::control::{MoveReport, Timeline};

    fn trial(first_read: f64) -> Trial {
        Trial {
            first_read,
            replayed: Some(820.0),
            t0_unix_us: 9_985_000,
            takeover: Some(MoveReport {
                node: "a".into(),
                from: "a".into(),
                to: "b".into(),
                planned: false,
                reason: String::new(),
                epoch: 2,
                detected_unix_ms: 10_000,
                timeline_ms: Timeline {
                    fenced: Some(0.7),
                    scanned: Some(9.6),
                    serving: Some(11.5),
                    ..Timeline::default()
                },
                replayed_records: 1,
                replayed_first_seq: 1,
                replayed_last_seq: 1,
                replay_complete: true,
            }),
            ..Trial::default()
        }
    }

    #[test]
    fn rows_start_at_the_kill_and_mark_the_first_read() {
        let trials = [trial(45.0), trial(50.0)];
        let series = [TrialSeries {
            fault: "kill",
            unflushed_mib: 16,
            trials: &trials,
        }];
        let rows = timeline_rows(&series);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].label, "kill 16 MiB #2");
        assert_eq!(rows[0].phases[0].start_ms, -15.0);
        assert_eq!(rows[0].marks[0].at_ms, 30.0);
        let dir = tempfile::tempdir().unwrap();
        let written = write_figures(dir.path(), &series).unwrap();
        assert_eq!(written.len(), 2);
        let samples = std::fs::read_to_string(&written[1]).unwrap();
        assert!(samples.contains("SIGKILL, 16 MiB"));
    }
}
