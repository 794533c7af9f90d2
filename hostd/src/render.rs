//! Text rendering of reports for people (the JSON forms are for programs).

use std::fmt::Write;

use shm::inspect::{ControlReport, NodeReport, Problem, RegionReport};

use wire::control::{ClusterStatus, NodeState, NodeStatus};

/// One line of boot progress: how long it has been, and each node's state.
pub fn progress_line(status: &ClusterStatus) -> String {
    format!("[{:5.1} s] {}", status.uptime_s, progress_states(status))
}

/// Each node's state in a few words (what changes between progress lines).
pub fn progress_states(status: &ClusterStatus) -> String {
    let nodes: Vec<String> = status
        .nodes
        .iter()
        .map(|n| match n.state {
            NodeState::Booting => format!("{}: booting", n.name),
            NodeState::Up => format!("{}: agent up", n.name),
            other => format!("{}: {} ({})", n.name, other.as_str(), n.vm),
        })
        .collect();
    nodes.join(", ")
}

/// The status table, in the spirit of `storage failover show` and `crm_mon`.
pub fn status_table(status: &ClusterStatus) -> String {
    let mut out = format!(
        "cluster  epoch {}, hostd pid {}{}, {} ({}), state dir {}\n",
        status.epoch,
        status.hostd_pid,
        if status.adopted {
            " (adopted the running cluster)"
        } else {
            ""
        },
        status.accel,
        status.accel_reason,
        status.state_dir
    );
    if !status.metrics.is_empty() {
        let _ = writeln!(out, "metrics  {}", status.metrics);
    }
    let header = [
        "NODE",
        "NEXT TAKER",
        "STATE",
        "VM",
        "PID",
        "HEARTBEAT",
        "LOG HEAD/FLUSHED",
        "SERVED BY",
        "CLIENTS",
        "NBD",
    ];
    let rows: Vec<[String; 10]> = status
        .nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.next_taker.clone(),
                n.state.as_str().to_owned(),
                n.vm.clone(),
                n.pid.map_or("-".into(), |p| p.to_string()),
                match n.heartbeat_age_ms {
                    Some(age) => format!("#{} {:.1}s ago", n.heartbeat, age as f64 / 1000.0),
                    None => "none yet".into(),
                },
                log_cell(n),
                served_by_cell(n),
                clients_cell(n),
                n.nbd.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        l.trim_end().to_owned() + "\n"
    };
    out.push_str(&line(&header));
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
    }
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "takeover of {}: {} ({}); console {}",
            n.name,
            if n.takeover_possible {
                "possible"
            } else {
                "not possible"
            },
            n.takeover_reason,
            n.console
        );
    }
    for n in &status.nodes {
        if let Some(ip) = &n.service_ip {
            let holder = match (&n.served_by, &n.service_mac) {
                (Some(node), Some(mac)) => format!("held by {node} ({mac})"),
                (Some(node), None) => format!("held by nobody now ({node}, its owner, is not up)"),
                (None, _) => "held by nobody".to_owned(),
            };
            let _ = writeln!(out, "service IP of {}: {ip}, {holder}", n.name);
        }
    }
    for n in &status.nodes {
        if let Some(stopped) = &n.stopped_serving {
            let _ = writeln!(out, "node {} {stopped}", n.name);
        }
    }
    for line in coordinator_lines(status) {
        let _ = writeln!(out, "{line}");
    }
    for n in &status.nodes {
        for line in interconnect_lines(n) {
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some(pid) = status.storage_pid {
        let _ = writeln!(out, "storage daemon pid {pid}");
    }
    for disk in &status.disks {
        let _ = writeln!(out, "{}", disk_line(disk));
    }
    out
}

/// A node's interconnect, one line per peer: each link's state and round trip, and what
/// the test clients saw.
fn interconnect_lines(node: &wire::control::NodeStatus) -> Vec<String> {
    let mut peers: Vec<&str> = node.links.iter().map(|l| l.peer.as_str()).collect();
    peers.dedup();
    peers
        .into_iter()
        .map(|peer| {
            let links: Vec<String> = node
                .links
                .iter()
                .filter(|l| l.peer == peer)
                .map(|l| {
                    let mut text =
                        format!("{} {} {}", l.kind.as_str(), l.link, l.state.as_str());
                    if l.state == wire::control::LinkState::Up && l.rtt_us > 0 {
                        text.push_str(&format!(" {:.2} ms", l.rtt_us as f64 / 1000.0));
                    }
                    if l.cut {
                        text.push_str(" (cut)");
                    }
                    text
                })
                .collect();
            let mut line = format!("interconnect {} -> {peer}: {}", node.name, links.join(", "));
            if let Some(c) = node.link_clients.iter().find(|c| c.peer == peer) {
                line.push_str(&format!(
                    "; stream {} received, {} errors, longest gap {:.1} ms ({:.1} ms in the last 5 s); ping p50 {:.2} ms p99 {:.2} ms; bulk in {} MiB",
                    c.stream_received,
                    c.stream_errors,
                    c.stream_max_gap_us as f64 / 1000.0,
                    c.stream_recent_gap_us as f64 / 1000.0,
                    c.ping_p50_us as f64 / 1000.0,
                    c.ping_p99_us as f64 / 1000.0,
                    c.bulk_bytes_in >> 20
                ));
            }
            line
        })
        .collect()
}

/// The coordinator: its generation, the nodes that are no members or ejected themselves,
/// and the claims hostd has not adopted yet.
fn coordinator_lines(status: &ClusterStatus) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(generation) = status.coordinator_generation {
        let mut line = format!("coordinator  generation {generation}");
        if !status.non_members.is_empty() {
            line.push_str(&format!(
                "; no members: {} (claimed while hostd was away; hostd restarts them as standbys)",
                status.non_members.join(", ")
            ));
        }
        lines.push(line);
    }
    for n in &status.nodes {
        if let Some(ejected) = &n.ejected {
            lines.push(format!("node {} {ejected}", n.name));
        }
    }
    for claim in &status.unadopted_claims {
        lines.push(format!(
            "claim not adopted yet: {} claimed {} from {} at generation {}",
            claim.by, claim.identity, claim.from, claim.generation
        ));
    }
    lines
}

/// One disk's reservation: who holds it and who may write.
fn disk_line(disk: &wire::control::DiskStatus) -> String {
    format!(
        "disk {}: reservation held by {}, writable by {} (generation {})",
        disk.name,
        disk.holder.as_deref().unwrap_or("nobody"),
        if disk.registered.is_empty() {
            "nobody".to_owned()
        } else {
            disk.registered.join(", ")
        },
        disk.generation
    )
}

/// Log cursors, and how long the log has been full when it is.
fn log_cell(n: &NodeStatus) -> String {
    let mut cell = format!(
        "{}/{}",
        n.head_seq.map_or("?".into(), |s| s.to_string()),
        n.flushed_seq.map_or("?".into(), |s| s.to_string())
    );
    if let Some(full_ms) = n.log_full_ms {
        let _ = write!(
            cell,
            " FULL {:.1}s, {} write{} waiting",
            full_ms as f64 / 1000.0,
            n.writes_waiting,
            if n.writes_waiting == 1 { "" } else { "s" }
        );
    }
    cell
}

/// The identity's owner, and its state when that means nobody serves the identity now.
fn served_by_cell(n: &NodeStatus) -> String {
    match (&n.served_by, n.served_by_state) {
        (None, _) => "nobody".into(),
        (Some(owner), None | Some(NodeState::Up)) => owner.clone(),
        (Some(owner), Some(state)) => format!("{owner} ({}: not serving)", state.as_str()),
    }
}

/// Open NBD connections, and refusals and idle closes when there were any.
fn clients_cell(n: &NodeStatus) -> String {
    let mut notes = Vec::new();
    if n.nbd_refused > 0 {
        notes.push(format!("{} refused", n.nbd_refused));
    }
    if n.nbd_idle_closed > 0 {
        notes.push(format!("{} closed idle", n.nbd_idle_closed));
    }
    if notes.is_empty() {
        n.nbd_connections.to_string()
    } else {
        format!("{} ({})", n.nbd_connections, notes.join(", "))
    }
}

/// Renders any region report.
pub fn region_report(report: &RegionReport) -> String {
    match report {
        RegionReport::Node(node) => node_report(node),
        RegionReport::Control(control) => control_report(control),
        RegionReport::Unknown {
            source,
            size,
            problem,
        } => {
            let mut out = format!("region {source} ({})\n", bytes(*size));
            problem_line(&mut out, Some(problem));
            out
        }
    }
}

/// Renders a node region report.
pub fn node_report(r: &NodeReport) -> String {
    let mut out = String::new();
    let Some(h) = &r.header else {
        let _ = writeln!(out, "node region {} ({})", r.source, bytes(r.size));
        problem_line(&mut out, r.problem.as_ref());
        return out;
    };
    let _ = writeln!(
        out,
        "node region {} (node {}) at {}, {}",
        h.name,
        h.node_id,
        r.source,
        bytes(r.size)
    );
    let _ = writeln!(
        out,
        "  format      v{}, ring of {} at offset {}, records up to {}",
        h.version,
        bytes(h.geometry.ring_size),
        h.geometry.ring_offset,
        bytes(h.geometry.max_payload)
    );
    let _ = writeln!(out, "  boot id     {:#018x}", r.boot_id);
    match r.heartbeat {
        Some(hb) if hb.counter > 0 => {
            let _ = writeln!(
                out,
                "  heartbeat   #{} ({} ago by the writer's clock)",
                hb.counter,
                age(hb.unix_ns)
            );
        }
        Some(_) => out.push_str("  heartbeat   never beat\n"),
        None => out.push_str("  heartbeat   unreadable\n"),
    }
    for peer in &r.peers {
        let _ = writeln!(
            out,
            "  peer        last read node {} with boot id {:#018x} at heartbeat #{}",
            peer.node_id.unwrap_or_default(),
            peer.boot_id,
            peer.heartbeat
        );
    }
    if let (Some(head), Some(flushed)) = (r.head, r.flushed) {
        let _ = writeln!(
            out,
            "  log         head seq {} @{}, flushed seq {} @{}: {} records, {} unflushed",
            head.seq,
            head.pos,
            flushed.seq,
            flushed.pos,
            r.unflushed_records,
            bytes(r.unflushed_bytes)
        );
    }
    match r.synced {
        Some(synced) if synced.unix_ns > 0 => {
            let _ = writeln!(
                out,
                "  synced      up to seq {} on the disk's media ({} ago by the writer's clock)",
                synced.seq,
                age(synced.unix_ns)
            );
        }
        Some(_) => {
            out.push_str("  synced      never (the disk's media may lack anything logged)\n")
        }
        None => out.push_str("  synced      unreadable\n"),
    }
    let _ = writeln!(
        out,
        "  pressure    {} waits for ring space, {:.1} ms waited",
        r.stats.backpressure_waits,
        r.stats.backpressure_wait_ns as f64 / 1e6
    );
    if let Some(ack) = r.ack.filter(|a| a.command_seq > 0) {
        let _ = writeln!(
            out,
            "  ack         command {} at epoch {}: status {}, seqs {}..{}",
            ack.command_seq, ack.epoch, ack.status, ack.first_seq, ack.last_seq
        );
    }
    if r.records.is_empty() {
        out.push_str("  records     none unflushed\n");
    } else {
        out.push_str("  records (unflushed)\n");
        let _ = writeln!(
            out,
            "    {:>10} {:>12} {:<12} {:>6} {:>14} {:>10}  crc",
            "seq", "pos", "kind", "export", "offset", "len"
        );
        for rec in &r.records {
            let kind = rec
                .kind
                .map_or_else(|| "?".to_owned(), |k| format!("{k:?}").to_lowercase());
            let _ = writeln!(
                out,
                "    {:>10} {:>12} {:<12} {:>6} {:>14} {:>10}  {}",
                rec.seq,
                rec.pos,
                kind,
                rec.export.map_or("?".into(), |e| e.to_string()),
                rec.offset.map_or("?".into(), |o| o.to_string()),
                rec.len,
                if rec.crc_ok { "ok" } else { "BAD" }
            );
        }
        if r.records_truncated {
            out.push_str("    ... (more records; raise --limit to list them)\n");
        }
    }
    if let Some(tail) = &r.unpublished_tail {
        let _ = writeln!(
            out,
            "  torn tail   record {} at @{} ({} bytes) was being appended but never published (never acknowledged)",
            tail.seq, tail.pos, tail.payload_len
        );
    }
    problem_line(&mut out, r.problem.as_ref());
    out
}

/// Renders a control region report.
pub fn control_report(r: &ControlReport) -> String {
    let mut out = format!("control region at {}, {}\n", r.source, bytes(r.size));
    if r.header.is_some() {
        let _ = writeln!(out, "  epoch       {}", r.epoch);
        for owner in &r.owners {
            let _ = writeln!(
                out,
                "  identity    {} served by {} (since epoch {})",
                owner.identity,
                owner.owner.as_deref().unwrap_or("nobody"),
                owner.raw.map_or(0, |o| o.epoch)
            );
        }
        for command in &r.commands {
            if let Some(c) = command.command.filter(|c| c.seq > 0) {
                let _ = writeln!(
                    out,
                    "  command     to {}: #{} {:?} identity {} at epoch {}",
                    command.node, c.seq, c.kind, c.identity, c.epoch
                );
            }
        }
    }
    problem_line(&mut out, r.problem.as_ref());
    out
}

fn problem_line(out: &mut String, problem: Option<&Problem>) {
    match problem {
        Some(p) => {
            let _ = writeln!(out, "  PROBLEM     {}", p.message);
        }
        None => out.push_str("  problems    none\n"),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    // Exact units only: an operator comparing sizes should never see rounding.
    let mut value = n;
    let mut unit = 0;
    while value >= 1024 && value % 1024 == 0 && unit < UNITS.len() - 1 {
        value /= 1024;
        unit += 1;
    }
    if value < 1024 || unit == UNITS.len() - 1 {
        return format!("{value} {}", UNITS[unit]);
    }
    // Not a whole number of any larger unit: show both, so nothing is hidden.
    let (mut scaled, mut unit) = (value as f64, unit);
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1} {} ({n} B)", UNITS[unit])
}

fn age(unix_ns: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    match now.checked_sub(unix_ns) {
        Some(ns) => format!("{:.2} s", ns as f64 / 1e9),
        None => "in the future".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(67104768), "64.0 MiB (67104768 B)");
        assert_eq!(bytes(33552352), "32.0 MiB (33552352 B)");
    }

    fn node(name: &str) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            next_taker: "b".into(),
            state: NodeState::Up,
            health: String::new(),
            vm: "running".into(),
            pid: Some(1),
            heartbeat: 7,
            heartbeat_age_ms: Some(50),
            boot_id: 1,
            peer_boot_id: 2,
            peer_heartbeat: 3,
            head_seq: Some(12),
            last_ack_seq: 0,
            flushed_seq: Some(10),
            served_by: Some(name.into()),
            served_by_state: Some(NodeState::Up),
            nbd_connections: 0,
            nbd_refused: 0,
            nbd_idle_closed: 0,
            log_full_ms: None,
            writes_waiting: 0,
            nbd: "nbd://127.0.0.1:1/a".into(),
            service_ip: None,
            service_mac: None,
            stopped_serving: None,
            ejected: None,
            links: Vec::new(),
            link_clients: Vec::new(),
            takeover_possible: true,
            takeover_reason: "taker b is up".into(),
            console: "c".into(),
        }
    }

    #[test]
    fn status_says_who_does_not_serve_and_what_is_stuck() {
        let healthy = node("a");
        assert_eq!(served_by_cell(&healthy), "a");
        assert_eq!(clients_cell(&healthy), "0");
        assert_eq!(log_cell(&healthy), "12/10");

        let troubled = NodeStatus {
            served_by: Some("b".into()),
            served_by_state: Some(NodeState::Fenced),
            nbd_connections: 128,
            nbd_refused: 4000,
            nbd_idle_closed: 2,
            log_full_ms: Some(2345),
            writes_waiting: 5,
            ..node("a")
        };
        assert_eq!(served_by_cell(&troubled), "b (fenced: not serving)");
        assert_eq!(clients_cell(&troubled), "128 (4000 refused, 2 closed idle)");
        assert_eq!(log_cell(&troubled), "12/10 FULL 2.3s, 5 writes waiting");
        let table = status_table(&ClusterStatus {
            epoch: 2,
            metrics: "http://127.0.0.1:9187/metrics".into(),
            ..cluster(vec![troubled])
        });
        assert!(table.contains("CLIENTS"), "{table}");
        assert!(
            table.contains("metrics  http://127.0.0.1:9187/metrics\n"),
            "{table}"
        );
        assert!(table.contains("b (fenced: not serving)"), "{table}");
    }

    /// A cluster status at epoch 1 with `nodes` and no metrics.
    fn cluster(nodes: Vec<NodeStatus>) -> ClusterStatus {
        ClusterStatus {
            epoch: 1,
            state_dir: "/s".into(),
            hostd_pid: 1,
            accel: "tcg".into(),
            accel_reason: String::new(),
            uptime_s: 1.0,
            adopted: false,
            metrics: String::new(),
            nodes,
            storage_pid: None,
            disks: Vec::new(),
            coordinator_generation: None,
            non_members: Vec::new(),
            unadopted_claims: Vec::new(),
        }
    }

    #[test]
    fn the_coordinator_shows_its_generation_ejections_and_claims_not_adopted() {
        assert!(!status_table(&cluster(Vec::new())).contains("coordinator"));
        let ejected = NodeStatus {
            ejected: Some(
                "ejected itself at generation 3: the coordinator says it is no member".into(),
            ),
            ..node("a")
        };
        let table = status_table(&ClusterStatus {
            coordinator_generation: Some(3),
            non_members: vec!["a".into()],
            unadopted_claims: vec![wire::control::ClaimStatus {
                identity: "a".into(),
                by: "b".into(),
                from: "a".into(),
                generation: 3,
            }],
            ..cluster(vec![ejected, node("b")])
        });
        assert!(
            table
                .contains("coordinator  generation 3; no members: a (claimed while hostd was away"),
            "{table}"
        );
        assert!(
            table.contains("node a ejected itself at generation 3: the coordinator says"),
            "{table}"
        );
        assert!(
            table.contains("claim not adopted yet: b claimed a from a at generation 3\n"),
            "{table}"
        );
    }

    #[test]
    fn disks_show_their_holder_and_writers() {
        let table = status_table(&ClusterStatus {
            storage_pid: Some(77),
            disks: vec![wire::control::DiskStatus {
                name: "a".into(),
                holder: Some("b".into()),
                registered: vec!["b".into(), "c".into()],
                generation: 5,
            }],
            ..cluster(Vec::new())
        });
        assert!(table.contains("storage daemon pid 77\n"), "{table}");
        assert!(
            table.contains("disk a: reservation held by b, writable by b, c (generation 5)\n"),
            "{table}"
        );
    }

    #[test]
    fn status_lists_every_node_of_a_cluster_and_its_next_taker() {
        // b died and c took its identity over; c's list is a, b.
        let a = NodeStatus {
            next_taker: "c".into(),
            takeover_reason: "taker c is up and reads its region".into(),
            ..node("a")
        };
        let b = NodeStatus {
            state: NodeState::Fenced,
            served_by: Some("c".into()),
            next_taker: "a".into(),
            takeover_possible: false,
            takeover_reason: "b does not hold its identity now (c does)".into(),
            nbd: "nbd://127.0.0.1:2/b".into(),
            ..node("b")
        };
        let c = NodeStatus {
            next_taker: "a".into(),
            takeover_reason: "taker a is up and reads its region".into(),
            nbd: "nbd://127.0.0.1:3/c".into(),
            ..node("c")
        };
        let table = status_table(&cluster(vec![a, b, c]));
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("NODE  NEXT TAKER  STATE"), "{table}");
        let row = |name: &str| {
            let row = lines
                .iter()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no row for {name}: {table}"));
            row.split_whitespace().take(3).collect::<Vec<_>>()
        };
        assert_eq!(row("a"), ["a", "c", "up"]);
        assert_eq!(row("b"), ["b", "a", "fenced"]);
        assert_eq!(row("c"), ["c", "a", "up"]);
        assert!(table.contains("nbd://127.0.0.1:3/c"), "{table}");
        assert!(
            table.contains(
                "takeover of b: not possible (b does not hold its identity now (c does)); console c"
            ),
            "{table}"
        );
        assert!(
            table.contains("takeover of a: possible (taker c is up and reads its region)"),
            "{table}"
        );
        assert!(!table.contains("service IP"), "user mode: {table}");
        let bridged = NodeStatus {
            service_ip: Some("10.77.0.11".into()),
            service_mac: Some("52:54:00:00:77:01".into()),
            stopped_serving: None,
            links: Vec::new(),
            link_clients: Vec::new(),
            served_by: Some("b".into()),
            ..node("a")
        };
        let table = status_table(&cluster(vec![bridged]));
        assert!(
            table.contains("service IP of a: 10.77.0.11, held by b (52:54:00:00:77:01)"),
            "{table}"
        );
    }
}
