#![allow(clippy::unwrap_used)]

//! `hostd inspect` as a user runs it: the real binary, real region files.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use shm::{BackPressure, Entry, Mapping, NodeRegion};

fn hostd(state_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args(args)
        .env("IVHA_STATE_DIR", state_dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("hostd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A state directory with node `a`'s region holding `records` unflushed writes after
/// `flushed` flushed ones.
fn cluster_with_log(flushed: u64, records: u64) -> (tempfile::TempDir, NodeRegion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("regions")).unwrap();
    let path = dir.path().join("regions/a.region");
    let region = NodeRegion::format(Mapping::create_file(&path, 1 << 20).unwrap(), 0, "a").unwrap();
    let mut w = region.writer(42).unwrap();
    w.heartbeat.beat();
    for i in 0..flushed + records {
        let data = vec![i as u8; 512];
        let appended = w
            .appender
            .append(
                &Entry::Write {
                    export: 0,
                    offset: i * 512,
                    data: &data,
                },
                BackPressure::default(),
            )
            .unwrap();
        if i < flushed {
            w.flushed.advance(appended.head).unwrap();
        }
    }
    (dir, region)
}

#[test]
fn json_report_has_the_contracted_fields() {
    let (dir, _region) = cluster_with_log(3, 5);
    let (code, stdout, stderr) = hostd(dir.path(), &["inspect", "a", "--json"]);
    assert_eq!(code, 0, "stderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["region"], "node");
    assert_eq!(report["header"]["name"], "a");
    assert_eq!(report["head_seq"], 8);
    assert_eq!(report["flushed_seq"], 3);
    assert_eq!(report["boot_id"], 42);
    assert_eq!(report["heartbeat"]["counter"], 1);
    assert!(report["problem"].is_null());
    let records = report["records"].as_array().unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [4, 5, 6, 7, 8]);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["kind"], "write");
        assert_eq!(r["export"], 0);
        assert_eq!(r["offset"], (3 + i as u64) * 512);
        assert_eq!(r["len"], 512);
        assert_eq!(r["crc_ok"], true);
    }
}

#[test]
fn text_report_and_limit() {
    let (dir, _region) = cluster_with_log(0, 4);
    let (code, stdout, _) = hostd(dir.path(), &["inspect", "a", "--limit", "2"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("head seq 4"), "{stdout}");
    assert!(stdout.contains("more records"), "{stdout}");
    assert!(stdout.contains("problems    none"), "{stdout}");
}

#[test]
fn a_corrupt_record_is_named_and_exits_3() {
    let (dir, region) = cluster_with_log(0, 4);
    // Flip a data bit of record 3 through a second mapping, as a stray write would.
    let third = region.unflushed().unwrap().nth(2).unwrap().unwrap();
    let geometry = region.geometry();
    let at = geometry.ring_offset + third.pos % geometry.ring_size + 32 + 16 + 7;
    let path = dir.path().join("regions/a.region");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    let (code, stdout, _) = hostd(dir.path(), &["inspect", "a", "--json"]);
    assert_eq!(code, 3);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["problem"]["seq"], 3);
    let crc: Vec<bool> = report["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["crc_ok"].as_bool().unwrap())
        .collect();
    assert_eq!(crc, [true, true, false]);
    let (_, text, _) = hostd(dir.path(), &["inspect", "a"]);
    assert!(text.contains("log record 3"), "{text}");
}

#[test]
fn missing_nodes_and_garbage_files_get_clear_messages() {
    let (dir, _region) = cluster_with_log(0, 1);
    let (code, _, stderr) = hostd(dir.path(), &["inspect", "b"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no region for node \"b\""), "{stderr}");

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5a; 65536]).unwrap();
    let (code, stdout, _) = hostd(dir.path(), &["inspect", garbage.to_str().unwrap()]);
    assert_eq!(code, 3);
    assert!(stdout.contains("not an ivha region"), "{stdout}");

    // Too short to be a region: a finding about the file (exit 3), not a failure to run.
    let tiny = dir.path().join("tiny");
    std::fs::write(&tiny, b"short").unwrap();
    let (code, stdout, _) = hostd(dir.path(), &["inspect", tiny.to_str().unwrap()]);
    assert_eq!(code, 3);
    assert!(stdout.contains("at least 8192 bytes"), "{stdout}");
}

#[test]
fn truncated_regions_and_corrupt_cursors_are_findings_in_words() {
    let (dir, _region) = cluster_with_log(1, 3);
    let path = dir.path().join("regions/a.region");
    let whole = std::fs::read(&path).unwrap();

    // Cut to half: the header names the size it should have.
    std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
    let (code, stdout, _) = hostd(dir.path(), &["inspect", "a"]);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("bytes are mapped"), "{stdout}");
    // Cut to a size no region has.
    std::fs::write(&path, &whole[..10_000]).unwrap();
    let (code, stdout, _) = hostd(dir.path(), &["inspect", "a"]);
    assert_eq!(code, 3, "{stdout}");

    // A head whose seq is 2^63: the cursors cannot both be right, and no count is made of them.
    let mut bytes = whole.clone();
    let head = shm::layout::node_live::HEAD.offset() as usize;
    let generation = u64::from_le_bytes(bytes[head..head + 8].try_into().unwrap());
    let seq_word = head + 8 + (generation & 1) as usize * 16;
    bytes[seq_word..seq_word + 8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (code, stdout, _) = hostd(dir.path(), &["inspect", "a"]);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("cannot fit in"), "{stdout}");
    assert!(!stdout.contains("9223372036854775808 records"), "{stdout}");
    assert!(!stdout.contains("Cursor {"), "{stdout}");
}

#[test]
fn inspect_leaves_the_region_untouched() {
    let (dir, _region) = cluster_with_log(2, 3);
    let path = dir.path().join("regions/a.region");
    let before = std::fs::read(&path).unwrap();
    let (code, _, _) = hostd(dir.path(), &["inspect", "a", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
