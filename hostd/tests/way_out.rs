#![allow(clippy::unwrap_used)]

//! Every state has a way out, with agents as host processes: states an adversarial pass
//! found with none. Each test names the finding it covers.

mod common;

use std::time::{Duration, Instant};

use common::blocks::{random_blocks, verify_blocks, write_blocks};
use common::{NODE_B, PROCESS, Pair, agent_prerequisite, one_pair, served_by, wait_served_by};
use wire::events::Event;

/// `hostd up --detach` again on the pair's state directory, with its configuration.
fn up_again(pair: &Pair) -> (i32, String, String) {
    let config = pair.state.path().join("ivha.toml");
    pair.hostd(&[
        "up",
        "--detach",
        "--timeout",
        "60",
        "--config",
        config.to_str().unwrap(),
    ])
}

/// Finding 1: an identity held by its partner at `down` is served at its own address
/// after the next `up`, with every acknowledged write.
#[test]
fn an_identity_held_away_is_served_at_its_address_after_down_and_up() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PROCESS);
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(32, 11, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();
    let (code, out, err) = pair.hostd(&["takeover", "a"]);
    assert_eq!(code, 0, "hostd takeover: {out}{err}");
    let (code, out, err) = pair.hostd(&["down"]);
    assert_eq!(code, 0, "hostd down: {out}{err}");
    let (code, out, err) = up_again(&pair);
    assert_eq!(code, 0, "hostd up again: {out}{err}");
    assert_eq!(served_by(&pair, "a"), "b");
    // Pair::connect retries for 30 s, then fails the test: nothing listened before.
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after down and up");
    let (code, out, err) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "hostd giveback: {out}{err}");
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after giveback");
}

/// Finding 2: both nodes die one after the other; with no live node to take anything
/// over, hostd restarts them by itself, and both addresses serve every acknowledged write.
#[test]
fn a_double_failure_recovers_without_an_operator() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PROCESS);
    let mut written = Vec::new();
    for (index, name) in ["a", "b"].into_iter().enumerate() {
        let mut client = pair.connect(index, name);
        let blocks = random_blocks(32, 20 + index as u64, client.size());
        write_blocks(&mut client, &blocks);
        client.disconnect();
        written.push(blocks);
    }
    let (code, out, err) = pair.hostd(&["kill", "a"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_served_by(&pair, "a", "b", Duration::from_secs(30));
    // Finding 18: the process backend's nodes are agent processes, not QEMU.
    let reason = pair
        .events()
        .into_iter()
        .find_map(|line| match line.event {
            Event::Takeover(report) => Some(report.reason),
            _ => None,
        })
        .unwrap();
    assert!(reason.starts_with("agent process exited"), "{reason}");
    let (code, out, err) = pair.hostd(&["kill", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    pair.wait_for("b fenced", Duration::from_secs(30), |status| {
        Pair::node(status, "b")["state"] == "fenced"
    });
    // Both identities come back on some live node, then serve everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = pair.status();
        let served = ["a", "b"].iter().all(|name| {
            let holder = Pair::node(&status, name)["served_by"]
                .as_str()
                .unwrap_or("");
            Pair::node(&status, holder)["state"] == "up"
        });
        if served {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (index, name) in ["a", "b"].into_iter().enumerate() {
        verify_blocks(
            &mut pair.connect(index, name),
            &written[index],
            "after the double failure",
        );
    }
    let restarts = pair
        .events()
        .into_iter()
        .filter(|line| matches!(line.event, Event::NodeRestarted { .. }))
        .count();
    assert!(restarts >= 1, "{:#?}", pair.events());
}

/// Finding 2, with automatic restarts off: `hostd giveback` restarts the node itself, even
/// while the node holding its identity is fenced, and the identity comes home.
#[test]
fn giveback_restarts_its_node_when_the_holder_is_dead_too() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("{PROCESS}[recovery]\nrestart_limit = 0\n"));
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(32, 31, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();
    pair.hostd(&["kill", "a"]);
    wait_served_by(&pair, "a", "b", Duration::from_secs(30));
    pair.hostd(&["kill", "b"]);
    pair.wait_for("b fenced", Duration::from_secs(30), |status| {
        Pair::node(status, "b")["state"] == "fenced"
    });
    let (code, out, err) = pair.hostd(&["giveback", "a"]);
    assert_eq!(code, 0, "hostd giveback a: {out}{err}");
    assert_eq!(served_by(&pair, "a"), "a");
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after giveback");
}

/// Finding 4: a second `hostd up --detach` on a running state directory fails, every time,
/// with the reason, and leaves the running daemon alone.
#[test]
fn a_second_up_fails_with_the_reason() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PROCESS);
    let pid = pair.status()["hostd_pid"].clone();
    for _ in 0..3 {
        let (code, out, err) = up_again(&pair);
        assert_ne!(code, 0, "a second up succeeded: {out}");
        assert!(err.contains("already running"), "{err}");
    }
    assert_eq!(pair.status()["hostd_pid"], pid);
}

/// Findings 9 and 18: `hostd down` with no daemon says there is nothing to stop and exits
/// 0; `--purge` removes the regions without a daemon; with nodes still running it says
/// how to stop them.
#[test]
fn down_works_without_a_daemon() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, PROCESS);
    pair.kill_hostd();
    let (code, _, err) = pair.hostd(&["down"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("still run") && err.contains("adopts them"),
        "{err}"
    );
    let (code, out, err) = up_again(&pair);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = pair.hostd(&["down"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = pair.hostd(&["down"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing runs"), "{out}");
    assert!(pair.state.path().join("regions/a.region").exists());
    let (code, out, err) = pair.hostd(&["down", "--purge"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed"), "{out}");
    assert!(!pair.state.path().join("regions").exists());
    assert!(!pair.state.path().join("disks/a.img").exists());
}

/// Finding 5: a node's port taken by another program fails `up` at once, naming the port,
/// with no node left running.
#[test]
fn a_taken_port_fails_up_at_once() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let state = tempfile::Builder::new()
        .prefix("ivha-vmtest-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let config = state.path().join("ivha.toml");
    std::fs::write(
        &config,
        format!(
            "{PROCESS}[regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n\
             [[node]]\nname = \"a\"\nnbd_port = {taken}\n[[node]]\nname = \"b\"\nnbd_port = {}\n",
            common::free_port()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args(["up", "--detach", "--timeout", "60", "--config"])
        .arg(&config)
        .env("IVHA_STATE_DIR", state.path())
        .env("IVHA_AGENT_BINARY", common::agent_binary())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(stderr.contains(&format!("127.0.0.1:{taken}")), "{stderr}");
    let runs = std::fs::read_dir(state.path().join("run"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name() != "config.json")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(runs, 0, "a node process was recorded");
    drop(squatter);
}

/// Finding 3: clients that connect and idle cannot cut a node off. Over the per-export
/// limit a client is refused with a reason (and counted); connections that never negotiate
/// are closed past their own limit; the node's other export and a new client after the idle
/// ones are closed are served; status shows the counts.
#[test]
fn idle_clients_are_bounded_refused_counted_and_closed() {
    if !agent_prerequisite() {
        return;
    }
    const LIMIT: usize = 16;
    const NEGOTIATING: usize = 4;
    let _one = one_pair();
    let limits = format!(
        "{PROCESS}[nbd]\nmax_connections = {LIMIT}\nmax_negotiating = {NEGOTIATING}\nidle_timeout_s = 8\n"
    );
    let pair = Pair::up_with(NODE_B, &limits);
    let mut a = pair.connect(0, "a");
    let blocks = random_blocks(16, 31, a.size());
    write_blocks(&mut a, &blocks);
    a.disconnect();

    let connect =
        || campaign::nbd_client::NbdClient::connect(pair.addr(0), "a", Duration::from_secs(5));
    let idle: Vec<_> = (0..LIMIT)
        .map(|i| connect().unwrap_or_else(|e| panic!("idle client {i}: {e}")))
        .collect();
    let mut refused = 0;
    for _ in 0..3 * LIMIT {
        match connect() {
            Ok(_) => panic!("a client over the limit of {LIMIT} was served"),
            Err(error) => {
                let text = error.to_string();
                assert!(
                    text.contains("its limit"),
                    "refused without the reason: {text}"
                );
                refused += 1;
            }
        }
    }
    // Connections that never negotiate: past the limit they are closed at once.
    let silent: Vec<_> = (0..3 * NEGOTIATING)
        .map(|_| std::net::TcpStream::connect(pair.addr(0)).unwrap())
        .collect();
    let mut closed = 0;
    for stream in &silent {
        use std::io::Read;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut greeting = [0u8; 18];
        // Admitted ones are greeted; refused ones read as closed.
        match (&*stream).read(&mut greeting) {
            Ok(0) => closed += 1,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(error) => panic!("reading the greeting: {error}"),
        }
    }
    assert!(
        closed >= 2 * NEGOTIATING,
        "only {closed} of {} silent connections were closed",
        silent.len()
    );
    drop(silent);

    // The node's threads stay bounded by the limits (one per connection).
    let pid = pair.pids[0];
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(
        threads <= LIMIT + NEGOTIATING + 16,
        "agent a runs {threads} threads"
    );
    // Another export of the cluster is unaffected.
    pair.connect(1, "b").disconnect();

    // The agent publishes its counters with each heartbeat.
    let expected = (refused + 2 * NEGOTIATING) as u64;
    pair.wait_for("a's refusals counted", Duration::from_secs(10), |status| {
        Pair::node(status, "a")["nbd_refused"].as_u64() >= Some(expected)
    });
    let status = pair.status();
    let node = Pair::node(&status, "a");
    assert!(
        node["nbd_connections"].as_u64().unwrap() >= LIMIT as u64,
        "{node}"
    );
    let counted = node["nbd_refused"].as_u64().unwrap();
    assert!(
        counted >= (refused + 2 * NEGOTIATING) as u64,
        "{refused} refused clients and {closed} closed silent ones, {counted} counted: {node}"
    );
    let (code, table, _) = pair.hostd(&["status"]);
    assert_eq!(code, 0);
    assert!(table.contains(&format!("{counted} refused")), "{table}");

    // The idle clients are closed after the timeout, counted, and room is made.
    pair.wait_for("idle clients closed", Duration::from_secs(20), |status| {
        Pair::node(status, "a")["nbd_idle_closed"].as_u64() >= Some(LIMIT as u64)
    });
    drop(idle);
    verify_blocks(&mut pair.connect(0, "a"), &blocks, "after the idle clients");
}

/// Finding 17: a write waiting for log space shows in `hostd status` while it waits (the
/// log FULL, and how many writes wait), not only once its wait has ended. And the way out:
/// a planned takeover of the node drains the paused log, letting the waiting write through,
/// instead of waiting behind it for the back-pressure timeout (a minute).
#[test]
fn a_full_log_shows_in_status_and_a_takeover_drains_it() {
    if !agent_prerequisite() {
        return;
    }
    let _one = one_pair();
    let pair = Pair::up_with(NODE_B, &format!("{PROCESS}[flusher]\npaused = true\n"));
    let addr = pair.addr(0);
    // 16 MiB region, 1 MiB writes, nothing flushed: the log fills and a write waits.
    let writer = std::thread::spawn(move || {
        let mut client =
            campaign::nbd_client::NbdClient::connect(addr, "a", Duration::from_secs(120)).unwrap();
        let mut acknowledged = Vec::new();
        for i in 0..32u64 {
            let block = (i << 20, vec![i as u8 + 1; 1 << 20]);
            if client.write(block.0, &block.1, false).is_err() {
                break;
            }
            acknowledged.push(block);
        }
        acknowledged
    });
    pair.wait_for("a's log full", Duration::from_secs(30), |status| {
        let a = Pair::node(status, "a");
        a["log_full_ms"].is_u64() && a["writes_waiting"].as_u64() >= Some(1)
    });
    let (code, table, _) = pair.hostd(&["status"]);
    assert_eq!(code, 0);
    assert!(table.contains("FULL"), "{table}");
    assert!(table.contains("1 write waiting"), "{table}");
    assert!(!writer.is_finished(), "the write should still be waiting");

    let started = Instant::now();
    let (code, out, err) = pair.hostd(&["takeover", "a"]);
    assert_eq!(code, 0, "hostd takeover: {out}{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the takeover took {:?}",
        started.elapsed()
    );
    let acknowledged = writer.join().unwrap();
    assert!(acknowledged.len() > 10, "{} writes", acknowledged.len());
    verify_blocks(
        &mut pair.connect(0, "a"),
        &acknowledged,
        "after the takeover",
    );
}

/// Finding 8 (the rest): when the agents never come up, `up` ends with their own words
/// (the end of each node's console and process output), not only a status table.
#[test]
fn up_shows_why_the_agents_did_not_come_up() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.sh");
    std::fs::write(
        &agent,
        "#!/bin/sh\necho 'agent: cannot open the disk: a pretend failure' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("ivha.toml");
    std::fs::write(
        &config,
        format!(
            "{PROCESS}[regions]\nnode_mib = 16\n[disks]\nsize_mib = 64\n\
             [[node]]\nname = \"a\"\nnbd_port = {}\n[[node]]\nname = \"b\"\nnbd_port = {}\n",
            common::free_port(),
            common::free_port()
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let hostd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
            .args(args)
            .env("IVHA_STATE_DIR", &state)
            .env("IVHA_AGENT_BINARY", &agent)
            .output()
            .unwrap()
    };
    let up = hostd(&[
        "up",
        "--detach",
        "--timeout",
        "3",
        "--config",
        config.to_str().unwrap(),
    ]);
    let _ = hostd(&["down", "--purge"]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert_eq!(up.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("agent: cannot open the disk: a pretend failure"),
        "{stderr}"
    );
}
