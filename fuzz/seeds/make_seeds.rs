//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/seed-*`: real
//! traffic and real bytes made by the project's own writers (the NBD server and client
//! talking to each other, log records written by the shm appender, regions formatted by
//! shm, the configurations the scripts write, events written by wire). QMP seeds are QEMU's
//! own words, captured by scripts/fuzz.sh --seeds when QEMU is installed.
//!
//! Usage: make-seeds CORPUS_DIR

use std::fs;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use campaign::nbd_client::NbdClient;
use guest_agent::nbd::handshake::negotiate;
use guest_agent::nbd::protocol::{
    CMD_DISC, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    INFO_NAME, InfoRequest, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_STRUCTURED_REPLY, OptionHeader, Request,
};
use guest_agent::nbd::transmission::{Stats, serve};
use ivha_fuzz::{MemExport, Pipe, REGION_SIZE, registry};
use shm::layout::HEADER_PAGE;
use shm::{Command, CommandKind, ControlRegion, Entry, Mapping, NodeRegion, Owner};
use wire::events::{Event, EventLine};

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: make-seeds CORPUS_DIR"),
    );
    nbd(&dir);
    logs(&dir);
    control(&dir);
    config(&dir);
    events(&dir);
}

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = OptionHeader::new(option, data.len() as u32)
        .encode()
        .to_vec();
    out.extend_from_slice(data);
    out
}

fn req(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    Request::new(command, flags, cookie, offset, length)
        .encode()
        .to_vec()
}

/// The server's answer to a client's handshake bytes.
fn server_handshake(client: &[u8]) -> Vec<u8> {
    let mut out = Pipe::new(&[]);
    let _ = negotiate(&mut BufReader::new(client), &mut out, &registry());
    out.output
}

/// The server's answer to a client's requests, on a fresh export.
fn server_transmission(client: &[u8]) -> Vec<u8> {
    let export = MemExport::new("a", 1 << 16, false, 4096);
    let mut out = Pipe::new(&[]);
    let _ = serve(
        &mut BufReader::new(client),
        &mut out,
        &export,
        &mut Stats::default(),
    );
    out.output
}

fn nbd(dir: &Path) {
    // The campaign's client against the agent's server: run the client on what the server
    // said so far, answer what the client sent, until neither has more to say.
    let mut first = vec![0, 0, 0, 3];
    first.extend(opt(
        OPT_GO,
        &InfoRequest {
            name: "a".to_owned(),
            items: vec![],
        }
        .encode(),
    ));
    let mut server = server_handshake(&first);
    let mut client_bytes = Vec::new();
    for _ in 0..8 {
        let mut pipe = Pipe::new(&server);
        if let Ok(mut client) = NbdClient::negotiate(&mut pipe, "a", "seed") {
            let _ = client.read(0, 512);
            let _ = client.write(4096, &[0xab; 512], true);
            let _ = client.flush();
            let _ = client.read(1 << 12, 4096);
            let _ = client.write(0, &[1; 8], false);
        }
        let sent = pipe.output;
        // The handshake part is the flags and one NBD_OPT_GO.
        let go_len = 4 + 16 + u32::from_be_bytes(sent[16..20].try_into().expect("4")) as usize;
        let mut answer = server_handshake(&sent[..go_len]);
        answer.extend(server_transmission(&sent[go_len..]));
        client_bytes = sent;
        if answer == server {
            break;
        }
        server = answer;
    }
    let go_len = 4 + 16 + u32::from_be_bytes(client_bytes[16..20].try_into().expect("4")) as usize;
    put(dir, "nbd_client", "client-session", &server);
    put(dir, "nbd_handshake", "go", &client_bytes[..go_len]);
    let mut transmission = vec![0u8];
    transmission.extend_from_slice(&client_bytes[go_len..]);
    put(dir, "nbd_transmission", "client-session", &transmission);

    // Every option the server knows, in one negotiation each way it can end.
    let info = InfoRequest {
        name: "ro".to_owned(),
        items: vec![INFO_NAME],
    }
    .encode();
    let mut haggle = vec![0, 0, 0, 1];
    haggle.extend(opt(OPT_LIST, b""));
    haggle.extend(opt(OPT_STRUCTURED_REPLY, b""));
    haggle.extend(opt(OPT_INFO, &info));
    haggle.extend(opt(OPT_GO, &info));
    put(dir, "nbd_handshake", "list-info-go", &haggle);
    let mut name = vec![0, 0, 0, 3];
    name.extend(opt(OPT_EXPORT_NAME, b"a"));
    put(dir, "nbd_handshake", "export-name", &name);
    let mut abort = vec![0, 0, 0, 3];
    abort.extend(opt(OPT_LIST, b""));
    abort.extend(opt(OPT_ABORT, b""));
    put(dir, "nbd_handshake", "abort", &abort);

    // Every command, on a writable and on a read-only export.
    let mut commands = Vec::new();
    commands.extend(req(CMD_WRITE, 1, 1, 100, 8));
    commands.extend_from_slice(b"abcdefgh");
    commands.extend(req(CMD_READ, 0, 2, 96, 16));
    commands.extend(req(CMD_TRIM, 0, 3, 0, 4096));
    commands.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4, 8192, 512));
    commands.extend(req(CMD_FLUSH, 0, 5, 0, 0));
    commands.extend(req(CMD_READ, 0, 6, 65530, 16));
    commands.extend(req(CMD_WRITE, 0, 7, 0, 5000));
    commands.extend(vec![7u8; 5000]);
    commands.extend(req(CMD_DISC, 0, 8, 0, 0));
    for (mode, name) in [
        (0u8, "commands"),
        (1, "commands-read-only"),
        (2, "commands-failing"),
    ] {
        let mut input = vec![mode];
        input.extend_from_slice(&commands);
        put(dir, "nbd_transmission", name, &input);
    }
    // Server replies the client may get wrong: an error reply.
    let mut refused = server_handshake(&client_bytes[..go_len]);
    refused.extend_from_slice(&0x6744_6698u32.to_be_bytes());
    refused.extend_from_slice(&5u32.to_be_bytes());
    refused.extend_from_slice(&1u64.to_be_bytes());
    put(dir, "nbd_client", "error-reply", &refused);
}

fn region_bytes(mapping: &Mapping) -> Vec<u8> {
    let mut bytes = vec![0u8; mapping.len() as usize];
    mapping
        .file()
        .read_exact_at(&mut bytes, 0)
        .expect("read region");
    bytes
}

fn logs(dir: &Path) {
    for (name, writes, flush_every) in [("fresh", 3usize, 0usize), ("wrapped", 40, 2)] {
        let mapping = Mapping::create_memfd("seed", REGION_SIZE).expect("memfd");
        let region = NodeRegion::format(mapping, 0, "a").expect("format");
        let mut w = region.writer(7).expect("writer");
        w.heartbeat.beat();
        for i in 0..writes {
            let data = vec![0x40 + i as u8; 100 + 37 * (i % 20)];
            let entry = match i % 4 {
                0 | 1 => Entry::Write {
                    export: 0,
                    offset: 4096 * i as u64,
                    data: &data,
                },
                2 => Entry::Trim {
                    export: 0,
                    offset: 512,
                    len: 8192,
                },
                _ => Entry::WriteZeroes {
                    export: 1,
                    offset: 0,
                    len: 4096,
                },
            };
            w.appender.try_append(&entry).expect("append");
            if flush_every > 0 && i % flush_every == 1 {
                // Flush all but the last record, so the log wraps around the ring.
                let records: Vec<_> = region
                    .unflushed()
                    .expect("scan")
                    .map(|r| r.expect("record"))
                    .collect();
                if records.len() > 1 {
                    w.flushed
                        .advance(records[records.len() - 2].end())
                        .expect("advance");
                }
            }
        }
        let bytes = region_bytes(region.mapping());
        let mut node = vec![0u8];
        node.extend_from_slice(&bytes);
        put(dir, "node_region", name, &node);

        let (flushed, head) = region.log_cursors().expect("cursors");
        let mut scan = Vec::new();
        for v in [flushed.seq, flushed.pos, head.seq, head.pos] {
            scan.extend_from_slice(&v.to_le_bytes());
        }
        scan.extend_from_slice(&(region.geometry().max_payload as u32).to_le_bytes());
        scan.extend_from_slice(&bytes[HEADER_PAGE as usize..]);
        put(dir, "log_scan", name, &scan);

        let ring = &bytes[HEADER_PAGE as usize..];
        for record in region.unflushed().expect("scan") {
            let record = record.expect("record");
            let at = (record.pos % ring.len() as u64) as usize;
            let len = (record.end_pos - record.pos) as usize;
            let mut input = (record.pos << 8).to_le_bytes().to_vec();
            input.extend_from_slice(&ring[at..at + len]);
            put(
                dir,
                "log_record",
                &format!("{name}-{}-{:?}", record.seq, record.kind),
                &input,
            );
        }
    }
}

fn control(dir: &Path) {
    let mapping = Mapping::create_memfd("seed", REGION_SIZE).expect("memfd");
    let region = ControlRegion::format(mapping, &["a", "b"], &["a", "b"]).expect("format");
    let mut w = region.writer().expect("writer");
    w.set_epoch(3);
    w.set_owner(
        0,
        Owner {
            node: Some(1),
            epoch: 3,
        },
    )
    .expect("owner");
    w.issue(
        1,
        Command {
            seq: 1,
            kind: CommandKind::TakeOver,
            identity: 0,
            epoch: 3,
            argument: 0,
        },
    )
    .expect("issue");
    let mut input = vec![0u8];
    input.extend_from_slice(&region_bytes(region.mapping()));
    put(dir, "control_region", "pair-after-takeover", &input);
}

fn config(dir: &Path) {
    // What scripts/demo.sh, measure-takeover.sh and bench-nbd.sh write.
    let demo = "[flusher]\npaused = true\n[[node]]\nname = \"a\"\nnbd_port = 21809\n[[node]]\nname = \"b\"\nnbd_port = 21810\n";
    let measure = "[flusher]\npaused = true\n[regions]\nnode_mib = 64\n[disks]\nsize_mib = 256\n[heartbeat]\ninterval_ms = 100\ntimeout_ms = 1000\n[[node]]\nname = \"a\"\nnbd_port = 10809\n[[node]]\nname = \"b\"\nnbd_port = 10810\n";
    let bench = "backend = \"process\"\n[regions]\nnode_mib = 64\n[disks]\nsize_mib = 1024\ndir = \"/tmp/images/host\"\n[flusher]\nrelease = \"host\"\n[[node]]\nname = \"a\"\nnbd_port = 10811\n[[node]]\nname = \"b\"\nnbd_port = 10812\n";
    put(dir, "config", "demo", demo.as_bytes());
    put(dir, "config", "measure-takeover", measure.as_bytes());
    put(dir, "config", "bench-nbd", bench.as_bytes());
    let defaults = toml::to_string(&hostd::config::Config::default()).expect("defaults");
    put(dir, "config", "defaults", defaults.as_bytes());
}

fn events(dir: &Path) {
    let report: wire::control::MoveReport = serde_json::from_str(
        r#"{"node":"a","from":"a","to":"b","planned":false,"reason":"QEMU exited","epoch":2,
            "detected_unix_ms":1700000000000,"timeline_ms":{"fenced":1.5,"serving":20.25},
            "replayed_records":16,"replayed_first_seq":1,"replayed_last_seq":16,"replay_complete":true}"#,
    )
    .expect("a move report");
    let lines = [
        Event::PairStarting {
            accel: "tcg".into(),
            accel_reason: "no /dev/kvm".into(),
        },
        Event::ServingStarted {
            identity: "a".into(),
            node: "a".into(),
            epoch: 1,
        },
        Event::FaultInjected {
            node: "a".into(),
            signal: "kill".into(),
        },
        Event::Takeover(report.clone()),
        Event::Giveback(report),
        Event::PairAdopted {
            nodes: vec![("a".into(), "adopted".into())],
        },
        Event::PairStopped {
            stopped: vec![("a".into(), "quit cleanly".into())],
        },
    ];
    let mut log = String::new();
    for (n, event) in lines.into_iter().enumerate() {
        log.push_str(&EventLine::new(event, 1_700_000_000_000_000 + 1000 * n as u64).to_json());
        log.push('\n');
    }
    put(dir, "events", "session", log.as_bytes());
    // `hostd events` also shows events this version does not know, skips bad lines and
    // reads a last line whose newline is missing.
    log.push_str("{\"time_unix_ms\":1700000000000,\"event\":\"fence_failed\",\"node\":\"a\"}\n");
    log.push_str("not json\n[1]\n\n");
    log.push_str("{\"time_unix_ms\":1700000000000,\"event\":\"node_state\"");
    put(dir, "event_log_cli", "session", log.as_bytes());
}
