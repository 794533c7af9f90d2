//! hostd's Prometheus endpoint, read by a real Prometheus text parser (the Python client's,
//! Debian's `python3-prometheus-client`) in both formats it serves: a pair of agent
//! processes is scraped, its node a killed, and scraped again once b has taken a over.
//! Every family must be one docs/metrics.md lists, with the type and labels it gives.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::blocks::{random_blocks, write_blocks};
use common::{NODE_B, PROCESS, Pair, agent_prerequisite, free_port, wait_served_by};
use serde::Deserialize;
use wire::events::Event;

/// Parses the text on stdin with the parser named by argv[1] and prints the families as
/// JSON (values as strings: JSON has no infinities).
const PARSE: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
families = [
    {
        "name": f.name,
        "type": f.type,
        "help": f.documentation,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": repr(float(s.value))}
            for s in f.samples
        ],
    }
    for f in text_string_to_metric_families(sys.stdin.read())
]
print(json.dumps(families))
"#;

/// Debian's python3 first: the Debian package installs the module for it, and another
/// python3 may come first in PATH.
const PYTHONS: [&str; 2] = ["/usr/bin/python3", "python3"];

#[derive(Debug, Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

#[derive(Debug, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: String,
}

impl Sample {
    fn value(&self) -> f64 {
        self.value.parse().unwrap()
    }
}

/// A python3 that has the parsers, or None (the test skips, or fails under CI).
fn python() -> Option<&'static str> {
    let found = PYTHONS.into_iter().find(|python| {
        Command::new(python)
            .args([
                "-c",
                "import prometheus_client.parser, prometheus_client.openmetrics.parser",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
    });
    if found.is_none() {
        let message = "no python3 with the prometheus_client module \
                       (scripts/install-deps.sh installs python3-prometheus-client)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// One HTTP/1.0 exchange; returns the status line's code, the headers and the body.
fn http(address: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// A scrape of `address` in OpenMetrics text (`openmetrics`) or Prometheus text, parsed by
/// `python`; the content type must say which.
fn scrape(python: &str, address: SocketAddr, openmetrics: bool) -> Vec<Family> {
    let accept = if openmetrics {
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
    } else {
        ""
    };
    let (code, head, body) = http(
        address,
        &format!("GET /metrics HTTP/1.0\r\nHost: hostd\r\n{accept}\r\n"),
    );
    assert_eq!(code, 200, "{head}\n{body}");
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0"
    } else {
        "text/plain; version=0.0.4"
    };
    assert!(
        head.to_lowercase()
            .contains(&format!("content-type: {content_type}")),
        "{head}"
    );
    let mut child = Command::new(python)
        .args([
            "-c",
            PARSE,
            if openmetrics { "openmetrics" } else { "text" },
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The families docs/metrics.md lists: name as the parser names it (a counter without
/// `_total`), with type and labels.
fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut families = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `ivha_name` | type | `label`, `label` | meaning |
        let [_, name, kind, labels, _meaning, ..] = cells.as_slice() else {
            continue;
        };
        let Some(name) = name
            .strip_prefix("`ivha_")
            .and_then(|n| n.strip_suffix('`'))
        else {
            continue;
        };
        let name = format!("ivha_{name}");
        let name = match *kind {
            "counter" => name.strip_suffix("_total").unwrap().to_owned(),
            _ => name,
        };
        let labels = labels
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "none")
            .collect();
        families.insert(name, ((*kind).to_owned(), labels));
    }
    assert!(families.len() > 10, "docs/metrics.md lists the metrics");
    families
}

/// Checks every family of a scrape against the documentation; returns them by name.
fn check_documented(families: Vec<Family>) -> BTreeMap<String, Family> {
    let documented = documented();
    let mut by_name = BTreeMap::new();
    for family in families {
        let Some((kind, labels)) = documented.get(&family.name) else {
            panic!("{} is not in docs/metrics.md", family.name);
        };
        assert_eq!(&family.kind, kind, "type of {}", family.name);
        assert!(!family.help.is_empty(), "{} has no help", family.name);
        for sample in &family.samples {
            let names: BTreeSet<String> = sample
                .labels
                .keys()
                .filter(|l| !(family.kind == "histogram" && *l == "le"))
                .cloned()
                .collect();
            assert_eq!(&names, labels, "labels of {}", sample.name);
        }
        by_name.insert(family.name.clone(), family);
    }
    by_name
}

/// The value of the sample `name` with exactly `labels` (plus `le` for a bucket).
fn value(
    families: &BTreeMap<String, Family>,
    family: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    families
        .get(family)?
        .samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(Sample::value)
}

#[test]
fn a_takeover_shows_in_metrics_that_a_prometheus_parser_reads() {
    let Some(python) = python() else { return };
    if !agent_prerequisite() {
        return;
    }
    let port = free_port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    // The flusher paused: a's writes stay in its log, for b to take over and replay.
    let pair = Pair::up_with(
        NODE_B,
        &format!("{PROCESS}[flusher]\npaused = true\n[metrics]\nlisten = \"{address}\"\n"),
    );
    assert_eq!(
        pair.status()["metrics"],
        format!("http://{address}/metrics"),
        "status names the endpoint"
    );

    let mut a = pair.connect(0, "a");
    let size = a.size();
    write_blocks(&mut a, &random_blocks(16, 7, size));
    a.disconnect();

    // Before: both up, a serves itself, nothing moved yet. A tick publishes the writes.
    std::thread::sleep(Duration::from_millis(200));
    let mut epoch_before = 0.0;
    for openmetrics in [false, true] {
        let before = check_documented(scrape(python, address, openmetrics));
        epoch_before = value(&before, "ivha_epoch", "ivha_epoch", &[]).unwrap();
        let state = |node, state| {
            value(
                &before,
                "ivha_node_state",
                "ivha_node_state",
                &[("node", node), ("state", state)],
            )
        };
        assert_eq!(state("a", "up"), Some(1.0));
        assert_eq!(state("a", "fenced"), Some(0.0));
        assert_eq!(state("b", "up"), Some(1.0));
        let served = value(
            &before,
            "ivha_identity_served_by",
            "ivha_identity_served_by",
            &[("identity", "a"), ("node", "a")],
        );
        assert_eq!(served, Some(1.0));
        let head = value(
            &before,
            "ivha_log_head_seq",
            "ivha_log_head_seq",
            &[("node", "a")],
        );
        assert!(head.unwrap() >= 16.0, "a logged the writes: {head:?}");
        let unflushed = value(
            &before,
            "ivha_log_unflushed_bytes",
            "ivha_log_unflushed_bytes",
            &[("node", "a")],
        );
        assert!(unflushed.unwrap() >= 16.0 * 4096.0, "{unflushed:?}");
        let age = value(
            &before,
            "ivha_heartbeat_age_seconds",
            "ivha_heartbeat_age_seconds",
            &[("node", "a")],
        );
        assert!(age.unwrap() < 3.0, "a beats: {age:?}");
        assert!(
            !before.contains_key("ivha_takeovers"),
            "no move before the kill"
        );
    }

    let (code, out, err) = pair.hostd(&["kill", "a", "--signal", "kill"]);
    assert_eq!(code, 0, "hostd kill: {out}{err}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(30));
    // The replay ends in the background; its event comes after the takeover's.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pair
        .events()
        .iter()
        .any(|line| matches!(&line.event, Event::Replayed { node, .. } if node == "a"))
    {
        assert!(Instant::now() < deadline, "no replayed event for a");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));

    for openmetrics in [false, true] {
        let after = check_documented(scrape(python, address, openmetrics));
        let moves = value(
            &after,
            "ivha_takeovers",
            "ivha_takeovers_total",
            &[
                ("identity", "a"),
                ("kind", "unplanned"),
                ("cause", "process_exited"),
            ],
        );
        assert_eq!(moves, Some(1.0), "one unplanned takeover of a");
        let durations = value(
            &after,
            "ivha_takeover_duration_seconds",
            "ivha_takeover_duration_seconds_count",
            &[("identity", "a"), ("kind", "unplanned")],
        );
        assert_eq!(durations, Some(1.0), "its duration was observed");
        let duration = value(
            &after,
            "ivha_takeover_duration_seconds",
            "ivha_takeover_duration_seconds_sum",
            &[("identity", "a"), ("kind", "unplanned")],
        );
        assert!(
            duration.unwrap() > 0.0 && duration.unwrap() < 30.0,
            "{duration:?}"
        );
        let state = |node, state| {
            value(
                &after,
                "ivha_node_state",
                "ivha_node_state",
                &[("node", node), ("state", state)],
            )
        };
        assert_eq!(state("a", "fenced"), Some(1.0), "a is fenced");
        assert_eq!(state("a", "up"), Some(0.0));
        assert_eq!(state("b", "up"), Some(1.0));
        let served = value(
            &after,
            "ivha_identity_served_by",
            "ivha_identity_served_by",
            &[("identity", "a"), ("node", "b")],
        );
        assert_eq!(served, Some(1.0), "b serves a");
        let fences = value(
            &after,
            "ivha_fences",
            "ivha_fences_total",
            &[("node", "a"), ("result", "done")],
        );
        assert_eq!(fences, Some(1.0));
        let records = value(
            &after,
            "ivha_replay_records",
            "ivha_replay_records_total",
            &[("identity", "a")],
        );
        assert!(records.unwrap() >= 16.0, "{records:?}");
        let bytes = value(
            &after,
            "ivha_replay_log_bytes",
            "ivha_replay_log_bytes_total",
            &[("identity", "a")],
        );
        assert!(bytes.unwrap() >= 16.0 * 4096.0, "{bytes:?}");
        let replays = value(
            &after,
            "ivha_replays",
            "ivha_replays_total",
            &[("identity", "a"), ("result", "complete")],
        );
        assert_eq!(replays, Some(1.0));
        let epoch = value(&after, "ivha_epoch", "ivha_epoch", &[]);
        assert_eq!(epoch, Some(epoch_before + 1.0), "one move, one epoch");
    }

    // Anything but GET /metrics is answered, not served.
    let (code, head, _) = http(address, "POST /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    assert_eq!(http(address, "GET / HTTP/1.0\r\n\r\n").0, 404);
    assert_eq!(http(address, "GET /metrics/x HTTP/1.0\r\n\r\n").0, 404);
    let (code, _, body) = http(address, "HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!((code, body.as_str()), (200, ""));
    // The daemon still answers after all this.
    assert_eq!(
        pair.status()["metrics"],
        format!("http://{address}/metrics")
    );
}

#[test]
fn a_taken_metrics_address_is_logged_and_the_pair_runs_without_metrics() {
    if !agent_prerequisite() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let pair = Pair::up_with(
        NODE_B,
        &format!("{PROCESS}[metrics]\nlisten = \"{address}\"\n"),
    );
    let status = pair.status();
    let metrics = status["metrics"].as_str().unwrap();
    assert!(
        metrics.starts_with("not served: cannot listen on ")
            && metrics.contains(&address.to_string()),
        "{metrics}"
    );
    let log = std::fs::read_to_string(pair.state.path().join("hostd.log")).unwrap();
    assert!(
        log.contains("metrics are not served: cannot listen on"),
        "{log}"
    );
    let (code, out, err) = pair.hostd(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("metrics  not served: cannot listen on {address}")),
        "{out}"
    );
}
