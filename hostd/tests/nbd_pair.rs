//! Real NBD clients (qemu-io, nbdinfo, nbdcopy) against a pair started by the real `hostd`:
//! with the process backend (agents as host processes) and with real QEMU guests.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Pair, agent_prerequisite, nbd_uri, prerequisites, run, tool};

/// qemu-io with several commands; fails the test if any command or pattern check failed.
fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for c in commands {
        args.push("-c".to_owned());
        args.push(c.clone());
    }
    args.push(uri.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("verification failed") && !out.to_lowercase().contains("error"),
        "qemu-io reported a problem:\n{out}"
    );
    out
}

/// Random blocks at distinct random offsets: (offset, pattern byte).
fn random_blocks(count: usize, seed: u64, disk: u64) -> Vec<(u64, u8)> {
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut blocks: Vec<(u64, u8)> = Vec::new();
    while blocks.len() < count {
        let offset = (next() % (disk / 4096)) * 4096;
        if blocks.iter().all(|(o, _)| *o != offset) {
            blocks.push((offset, (next() % 255 + 1) as u8));
        }
    }
    blocks
}

/// The checks every backend must pass: qemu-io patterns (aligned, unaligned, FUA), flush,
/// discard, write-zeroes, nbdinfo, and an nbdcopy round trip with equal checksums. Returns
/// the 8 MiB nbdcopy wrote last, at offset 0.
fn client_checks(pair: &Pair) -> Vec<u8> {
    let uri = nbd_uri(pair, 0, "a");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k".into(),
            "write -P 0x11 1000 512".into(),
            "write -f -P 0x22 70000 3000".into(),
            "flush".into(),
            "read -P 0xab 0 1000".into(),
            "read -P 0x11 1000 512".into(),
            "read -P 0xab 1512 64024".into(),
            "read -P 0x22 70000 3000".into(),
            "discard 131072 65536".into(),
            "read -P 0 131072 65536".into(),
            "write -P 0x33 200000 8192".into(),
            "write -z 201000 1000".into(),
            "read -P 0x33 200000 1000".into(),
            "read -P 0 201000 1000".into(),
            "read -P 0x33 202000 6192".into(),
        ],
    );

    let info = run("nbdinfo", &["--size", &uri]);
    assert_eq!(info.trim(), (64u64 << 20).to_string(), "nbdinfo --size");
    let list = run(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", pair.ports[0])],
    );
    assert!(
        list.contains("export=\"a\"") || list.contains("export=a"),
        "{list}"
    );

    // 8 MiB of random bytes in and out again.
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let mut data = vec![0u8; 8 << 20];
    let mut state = 0x1234_5678_9abc_def1u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    std::fs::File::create(&input)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let at = "nbd://127.0.0.1:PORT/a".replace("PORT", &pair.ports[0].to_string());
    run("nbdcopy", &[input.to_str().unwrap(), &at]);
    run("nbdcopy", &[&at, output.to_str().unwrap()]);
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), 64 << 20, "nbdcopy copies the whole export");
    assert!(back[..data.len()] == data[..], "nbdcopy round trip differs");
    data
}

#[test]
fn process_backend_serves_real_clients() {
    if !agent_prerequisite() || !["qemu-io", "nbdinfo", "nbdcopy"].iter().all(|t| tool(t)) {
        return;
    }
    let pair = Pair::up_with("[[node]]\nname = \"b\"\n", "backend = \"process\"\n");
    client_checks(&pair);
    // b's export is separate and untouched.
    let uri_b = nbd_uri(&pair, 1, "b");
    qemu_io(&uri_b, &["read -P 0 0 64k".into()]);
}

#[test]
fn a_guest_serves_real_clients_and_its_flusher_reaches_the_disk() {
    if !prerequisites() || !["qemu-io", "nbdinfo", "nbdcopy"].iter().all(|t| tool(t)) {
        return;
    }
    let pair = Pair::up_with("[[node]]\nname = \"b\"\n", "");
    let data = client_checks(&pair);
    // The flusher writes through the guest's virtio disk to the image on the host.
    let region = pair.region("a");
    pair.wait_for("a's log to be flushed", Duration::from_secs(60), |_| {
        region.flushed() == region.head()
    });
    let image = std::fs::read(pair.state.path().join("disks/a.img")).unwrap();
    assert!(
        image[..data.len()] == data[..],
        "the flushed data is not on a's disk image"
    );
    let b_image = std::fs::read(pair.state.path().join("disks/b.img")).unwrap();
    assert!(b_image.iter().all(|b| *b == 0), "b's disk was written");
}

#[test]
fn with_the_flusher_paused_acknowledged_writes_live_in_the_log() {
    if !prerequisites() || !tool("qemu-io") {
        return;
    }
    let pair = Pair::up_with("[[node]]\nname = \"b\"\n", "[flusher]\npaused = true\n");
    let uri = nbd_uri(&pair, 0, "a");
    let blocks = random_blocks(64, 0x5eed, 64 << 20);
    let writes: Vec<String> = blocks
        .iter()
        .map(|(o, p)| format!("write -P {p} {o} 4k"))
        .collect();
    qemu_io(&uri, &writes);
    let reads: Vec<String> = blocks
        .iter()
        .map(|(o, p)| format!("read -P {p} {o} 4k"))
        .collect();
    qemu_io(&uri, &reads);
    // Every write is an unflushed record in a's region, and none reached the disk.
    let region = pair.region("a");
    let head = region.head().unwrap();
    assert_eq!(region.flushed().unwrap().seq, 0);
    assert!(head.seq >= 64, "only {} records logged", head.seq);
    let image = std::fs::read(pair.state.path().join("disks/a.img")).unwrap();
    for (offset, _) in &blocks {
        let block = &image[*offset as usize..*offset as usize + 4096];
        assert!(
            block.iter().all(|b| *b == 0),
            "block at {offset} reached the disk"
        );
    }
    let (code, stdout, _) = pair.hostd(&["inspect", "a", "--json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let writes = report["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "write" && r["len"] == 4096 && r["crc_ok"] == true)
        .count();
    assert!(writes >= 64, "inspect lists {writes} 4 KiB writes");
}
