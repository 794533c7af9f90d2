//! A short fault campaign with the process backend, through the real hostd binary: every
//! fault kind a process can suffer, then the checker over the recorded history. (CI also
//! runs one with QEMU guests, from scripts/test.sh.)

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use campaign::checker::{AnomalyKind, Verdict};
use campaign::nemesis::FaultKind;
use campaign::run::{RunConfig, run};
use common::{agent_prerequisite, free_port};

#[test]
fn process_campaign_of_every_kind_is_valid() {
    if !agent_prerequisite() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let kinds = vec![
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::AgentKill,
        FaultKind::HostdRestart,
        FaultKind::TornTail,
        FaultKind::DoubleKill,
    ];
    let config = RunConfig {
        seed: 7,
        cycles: 12,
        kinds: kinds.clone(),
        backend: "process".into(),
        out_dir: out.path().to_owned(),
        hostd: PathBuf::from(env!("CARGO_BIN_EXE_hostd")),
        writers_per_identity: 2,
        blocks_per_writer: 16,
        ports: [free_port(), free_port()],
    };
    let finished = run(&config).unwrap();
    let print_logs = || {
        for entry in std::fs::read_dir(out.path().join("logs"))
            .unwrap()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("===== {}", entry.path().display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    };
    if finished.aborted.is_some() || finished.outcome.verdict != Verdict::Valid {
        print_logs();
    }
    assert_eq!(finished.aborted, None);
    assert_eq!(
        finished.outcome.verdict,
        Verdict::Valid,
        "{}",
        finished.outcome
    );
    for kind in AnomalyKind::ALL {
        assert_eq!(
            finished.report.anomalies.get(&kind).copied().unwrap_or(0),
            0
        );
    }
    // Each kind fired twice (rounds hold every kind once), and the kills were taken over.
    for kind in kinds {
        assert_eq!(
            finished.report.faults.get(kind.name()).copied(),
            Some(2),
            "{kind}: {:?}",
            finished.report.faults
        );
    }
    assert!(finished.report.takeovers.count >= 4, "{}", finished.report);
    assert!(out.path().join("report.json").exists());
    // The figures: the clients over time, and the takeovers' timeline (there were some).
    for figure in ["clients.svg", "takeovers.svg"] {
        let svg = std::fs::read_to_string(out.path().join("figures").join(figure)).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"), "{figure}");
    }
}
