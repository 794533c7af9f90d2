#![allow(clippy::unwrap_used)]

//! `hostd events` as a user runs it: the real binary over a hand-written events.jsonl.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const PAIR_STARTING: &str = r#"{"time_unix_ms":1700000000000,"event":"pair_starting","accel":"tcg","accel_reason":"no vmx/svm in /proc/cpuinfo"}"#;
const A_UP: &str = r#"{"time_unix_ms":1700000001000,"event":"node_state","node":"a","from":"booting","to":"up","detail":"heartbeat 1"}"#;
const B_UP: &str = r#"{"time_unix_ms":1700000001500,"event":"node_state","node":"b","from":"booting","to":"up","detail":"heartbeat 1"}"#;
const TAKEOVER: &str = r#"{"time_unix_ms":1700000002000,"event":"takeover","node":"a","from":"a","to":"b","planned":false,"reason":"QEMU exited (signal 9)","epoch":2,"detected_unix_ms":1700000001900,"timeline_ms":{"fenced":12,"replayed":80,"serving":95},"replayed_records":64,"replayed_first_seq":10,"replayed_last_seq":73,"replay_complete":true}"#;

/// Runs `hostd --state-dir DIR ARGS` in UTC (`TZ=UTC0`), so the clock is predictable.
fn hostd(state_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .env("TZ", "UTC0")
        .env_remove("RUST_LOG")
        .env_remove("IVHA_STATE_DIR")
        .output()
        .expect("hostd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn state_dir_with(lines: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(dir.path().join("events.jsonl"), text).unwrap();
    dir
}

#[test]
fn human_output() {
    let dir = state_dir_with(&[PAIR_STARTING, A_UP, "this is not json", B_UP, TAKEOVER]);
    let (code, stdout, stderr) = hostd(dir.path(), &["events"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        stdout,
        "22:13:20.000  pair starting  accel tcg (no vmx/svm in /proc/cpuinfo)\n\
         22:13:21.000  node a: booting → up (heartbeat 1)\n\
         22:13:21.500  node b: booting → up (heartbeat 1)\n\
         22:13:22.000  takeover  a → b (unplanned: QEMU exited (signal 9)), epoch 2\n\
         \x20               detected  +0 ms\n\
         \x20               fenced    +12 ms\n\
         \x20               replayed  +80 ms   64 records (seq 10..=73)\n\
         \x20               serving   +95 ms\n"
    );
    assert!(
        stderr.contains("line 3") && stderr.contains("not valid JSON"),
        "stderr: {stderr}"
    );
}

#[test]
fn json_node_and_last() {
    let dir = state_dir_with(&[PAIR_STARTING, A_UP, B_UP, TAKEOVER]);

    let (code, stdout, stderr) = hostd(dir.path(), &["events", "--json"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        stdout,
        [PAIR_STARTING, A_UP, B_UP, TAKEOVER].join("\n") + "\n"
    );
    for line in stdout.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(value["time_unix_ms"].is_u64());
    }

    let (code, stdout, _) = hostd(dir.path(), &["events", "--json", "--node", "a"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("{A_UP}\n{TAKEOVER}\n"));

    let (code, stdout, _) = hostd(dir.path(), &["events", "--node", "a"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert_eq!(lines[0], "22:13:21.000  node a: booting → up (heartbeat 1)");
    assert!(lines[1].contains("takeover  a → b"));

    let (code, stdout, _) = hostd(dir.path(), &["events", "--node", "b"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, "22:13:21.500  node b: booting → up (heartbeat 1)\n");

    let (code, stdout, _) = hostd(dir.path(), &["events", "--json", "--last", "1"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("{TAKEOVER}\n"));

    let (code, stdout, _) = hostd(dir.path(), &["events", "--node", "b", "--last", "1"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, "22:13:21.500  node b: booting → up (heartbeat 1)\n");

    let (code, stdout, _) = hostd(dir.path(), &["events", "--last", "2", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("{B_UP}\n{TAKEOVER}\n"));

    // A node the cluster does not have is an error, not an empty history.
    let (code, stdout, stderr) = hostd(dir.path(), &["events", "--node", "zz"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("no node \"zz\" in this state directory (its nodes: a, b)"),
        "{stderr}"
    );
}

#[test]
fn unknown_events_still_print() {
    let dir = state_dir_with(&[
        r#"{"time_unix_ms":1700000000000,"event":"fence_failed","node":"a","reason":"QMP timed out"}"#,
        r#"{"time_unix_ms":1700000000000,"event":"takeover","node":"a","by":"b"}"#,
    ]);
    let (code, stdout, stderr) = hostd(dir.path(), &["events"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        stdout,
        "22:13:20.000  fence_failed  node=a reason=\"QMP timed out\"\n\
         22:13:20.000  takeover  by=b node=a\n"
    );
}

#[test]
fn missing_log_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = hostd(dir.path(), &["events"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    let path = dir.path().join("events.jsonl");
    assert!(
        stderr.contains(&path.display().to_string()),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("no pair has run with this state directory"),
        "stderr: {stderr}"
    );
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn follow_prints_appended_lines() {
    let dir = state_dir_with(&[A_UP]);
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_hostd"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["events", "--follow", "--json"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let timeout = Duration::from_secs(2);
    assert_eq!(lines.recv_timeout(timeout).unwrap(), A_UP);

    // Appended in two writes: nothing is printed until the line is whole.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.jsonl"))
        .unwrap();
    let (head, tail) = B_UP.split_at(30);
    file.write_all(head.as_bytes()).unwrap();
    assert!(lines.recv_timeout(Duration::from_millis(300)).is_err());
    file.write_all(format!("{tail}\n").as_bytes()).unwrap();
    assert_eq!(lines.recv_timeout(timeout).unwrap(), B_UP);

    file.write_all(format!("{TAKEOVER}\n").as_bytes()).unwrap();
    assert_eq!(lines.recv_timeout(timeout).unwrap(), TAKEOVER);
    assert!(child.0.try_wait().unwrap().is_none(), "still following");
}

#[test]
fn svg_draws_the_selected_takeovers() {
    const KILL_A: &str = r#"{"time_unix_ms":1700000001880,"time_unix_us":1700000001880000,"event":"fault_injected","node":"a","signal":"kill"}"#;
    let dir = state_dir_with(&[PAIR_STARTING, A_UP, B_UP, KILL_A, TAKEOVER]);
    let file = dir.path().join("timeline.svg");
    let file_arg = file.to_str().unwrap();
    let (code, stdout, stderr) = hostd(dir.path(), &["events", "--node", "a", "--svg", file_arg]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(stdout, format!("{file_arg}: the timeline of 1 takeover\n"));
    let svg = std::fs::read_to_string(&file).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    for text in [
        "Takeovers of a: phases in ms after detection",
        "22:13:21.900  takeover a → b",
        "detect",
        "fence",
        "replay",
        "served +95 ms",
    ] {
        assert!(
            svg.contains(&format!(">\n{text}\n<")) || svg.contains(&format!(">{text}<")),
            "{text:?} not in {svg}"
        );
    }

    // Nothing to draw: a clear error, and no file.
    let empty = dir.path().join("empty.svg");
    let (code, _, stderr) = hostd(
        dir.path(),
        &["events", "--node", "b", "--svg", empty.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no takeover among the selected events"),
        "{stderr}"
    );
    assert!(!empty.exists());

    // An unwritable place names the file.
    let (code, _, stderr) = hostd(dir.path(), &["events", "--svg", "/nonexistent/dir/t.svg"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot write the timeline to /nonexistent/dir/t.svg"),
        "{stderr}"
    );

    // A picture is not a stream.
    let (code, _, stderr) = hostd(dir.path(), &["events", "--follow", "--svg", file_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
