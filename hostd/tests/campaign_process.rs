//! A short fault campaign with the process backend, through the real hostd binary: every
//! fault kind a process can suffer, then the checker over the recorded history; and one of a
//! 3-node cluster with double faults. (CI also runs one with QEMU guests, from
//! scripts/test.sh.)

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use campaign::checker::{AnomalyKind, Verdict};
use campaign::nemesis::FaultKind;
use campaign::run::{RunConfig, run};
use common::{agent_prerequisite, free_port, one_pair};

/// Runs a process-backend campaign of `cycles` over `nodes` nodes with `kinds`, and checks
/// that it is valid with no anomaly and that each kind fired twice (rounds hold every kind
/// once). Returns the run's directory and report.
fn valid_campaign(
    seed: u64,
    cycles: u64,
    nodes: usize,
    kinds: Vec<FaultKind>,
) -> (tempfile::TempDir, campaign::report::Report) {
    let out = tempfile::tempdir().unwrap();
    let config = RunConfig {
        seed,
        cycles,
        kinds: kinds.clone(),
        backend: "process".into(),
        out_dir: out.path().to_owned(),
        hostd: PathBuf::from(env!("CARGO_BIN_EXE_hostd")),
        writers_per_identity: 2,
        blocks_per_writer: 16,
        ports: (0..nodes).map(|_| free_port()).collect(),
        network: campaign::run::Network::User,
    };
    let finished = run(&config).unwrap();
    if finished.aborted.is_some() || finished.outcome.verdict != Verdict::Valid {
        print_logs(out.path());
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
    for kind in kinds {
        assert_eq!(
            finished.report.faults.get(kind.name()).copied(),
            Some(2),
            "{kind}: {:?}",
            finished.report.faults
        );
    }
    (out, finished.report)
}

#[test]
fn process_campaign_of_every_kind_is_valid() {
    if !agent_prerequisite() {
        return;
    }
    // One campaign at a time: two would starve each other's heartbeats.
    let _one = one_pair();
    let kinds = vec![
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::AgentKill,
        FaultKind::HostdRestart,
        FaultKind::TornTail,
        FaultKind::DoubleKill,
        FaultKind::LinkDown,
    ];
    let (out, report) = valid_campaign(7, 14, 2, kinds);
    assert!(report.takeovers.count >= 4, "{report}");
    assert!(out.path().join("report.json").exists());
    // The figures: the clients over time, and the takeovers' timeline (there were some).
    for figure in ["clients.svg", "takeovers.svg"] {
        let svg = std::fs::read_to_string(out.path().join("figures").join(figure)).unwrap();
        assert!(svg.trim_end().ends_with("</svg>"), "{figure}");
    }
}

/// The faults hostd is away for, each twice: a kill while hostd
/// is away (the partner claims it at the coordinator), a zombie (stopped past detection;
/// the coordinator kills it before the claim is answered, as the process backend has no
/// I/O fence), both stopped and continued together (exactly one wins), and every link cut
/// while hostd is away (nobody may take over). hostd comes back and adopts each outcome.
#[test]
fn process_campaign_without_hostd_is_valid() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let kinds = vec![
        FaultKind::HostdDownKill,
        FaultKind::Zombie,
        FaultKind::BothStop,
        FaultKind::LinksDown,
    ];
    let (_out, report) = valid_campaign(13, 8, 2, kinds);
    // hostd_down_kill and zombie, twice each, were claimed by the agents.
    assert!(report.takeovers_without_hostd.count >= 4, "{report}");
}

/// Three nodes, each kind twice: a kill, a double kill (a node and its first taker), a kill
/// of a node and then of the node that took it over, and a kill of two nodes in quick
/// succession. Every identity must end up on the live node, and back home after.
#[test]
fn process_campaign_of_three_nodes_with_double_faults_is_valid() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let kinds = vec![
        FaultKind::Kill,
        FaultKind::DoubleKill,
        FaultKind::KillTaker,
        FaultKind::KillTwo,
    ];
    // Not the other test's seed: the state directory is named after pid and seed.
    let (out, report) = valid_campaign(11, 8, 3, kinds);
    // Unplanned takeovers, at least: kill 1, double_kill 2 (both identities to the third
    // node), kill_taker 3 (the first node's, then both to the third), kill_two 2; twice.
    assert!(report.takeovers.count >= 2 * (1 + 2 + 3 + 2), "{report}");
    // Writers on all three identities, read back at the end.
    for identity in ["a", "b", "c"] {
        assert!(
            out.path()
                .join("final")
                .join(format!("{identity}.img"))
                .exists()
        );
    }
    let config_text = std::fs::read_to_string(out.path().join("ivha.toml")).unwrap();
    assert_eq!(config_text.matches("[[node]]").count(), 3);
}

/// Prints the tail of each log of a run in `out`.
fn print_logs(out: &Path) {
    for entry in std::fs::read_dir(out.join("logs")).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!("===== {}", entry.path().display());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}
