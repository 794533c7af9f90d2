//! NVRAM write-back: every acknowledged write is readable, flushed in log order, and
//! recovered after a crash.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_agent::export::Export;
use guest_agent::nvram::flusher::{Flusher, FlusherConfig, Release};
use guest_agent::nvram::volume::{Disk, Volume};
use guest_agent::nvram::{Nvram, NvramExport};
use shm::{Access, BackPressure, Mapping, NodeRegion};

const DISK: u64 = 4 << 20;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        NodeRegion::format(
            Mapping::create_file(&dir.path().join("a.region"), 1 << 20).unwrap(),
            0,
            "a",
        )
        .unwrap();
        std::fs::File::create(dir.path().join("a.img"))
            .unwrap()
            .set_len(DISK)
            .unwrap();
        Node { dir }
    }

    fn region_path(&self) -> PathBuf {
        self.dir.path().join("a.region")
    }

    fn disk_path(&self) -> PathBuf {
        self.dir.path().join("a.img")
    }

    /// Starts an "agent": opens the region and disk, recovers, starts the flusher.
    fn start(&self, config: FlusherConfig) -> (Arc<NvramExport>, Flusher, NodeRegion) {
        let region =
            NodeRegion::open(Mapping::open(&self.region_path(), Access::ReadWrite).unwrap())
                .unwrap();
        let writer = region.writer(1).unwrap();
        let nvram = Nvram::new(
            region.clone(),
            writer.appender,
            BackPressure {
                timeout: Duration::from_secs(5),
            },
        );
        let export = nvram.add_volume(Volume::new(0, "a", Disk::open(&self.disk_path()).unwrap()));
        nvram.recover().unwrap();
        let flusher =
            Flusher::spawn(Arc::clone(&nvram), writer.flushed, writer.synced, config).unwrap();
        (export, flusher, region)
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let bytes = std::fs::read(self.disk_path()).unwrap();
        bytes[offset as usize..offset as usize + len].to_vec()
    }
}

fn paused() -> FlusherConfig {
    FlusherConfig {
        paused: true,
        ..FlusherConfig::default()
    }
}

/// Both release modes, flushing at once.
fn releases() -> [FlusherConfig; 2] {
    [Release::Written, Release::Synced].map(|release| FlusherConfig {
        release,
        ..FlusherConfig::default()
    })
}

fn read(export: &dyn Export, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    export.read(offset, &mut buf).unwrap();
    buf
}

fn wait_flushed(region: &NodeRegion) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while region.flushed() != region.head() {
        assert!(Instant::now() < deadline, "the flusher did not catch up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn acknowledged_writes_are_readable_before_the_flusher_runs() {
    let node = Node::new();
    let (export, _flusher, region) = node.start(paused());
    export.write(4096, &[7u8; 4096], false).unwrap();
    export.write(5000, b"unaligned", true).unwrap();
    export.write_zeroes(4096 + 100, 10, false, true).unwrap();
    let got = read(export.as_ref(), 4096, 4096);
    let mut want = vec![7u8; 4096];
    want[904..913].copy_from_slice(b"unaligned");
    want[100..110].fill(0);
    assert_eq!(got, want);
    // Nothing reached the disk: it is all in the log.
    assert_eq!(node.disk_bytes(4096, 4096), vec![0u8; 4096]);
    assert_eq!(region.head().unwrap().seq, 3);
    assert_eq!(region.flushed().unwrap().seq, 0);
}

#[test]
fn the_flusher_puts_everything_on_disk_in_log_order() {
    for config in releases() {
        the_flusher_puts_everything_on_disk_in_log_order_with(config);
    }
}

fn the_flusher_puts_everything_on_disk_in_log_order_with(config: FlusherConfig) {
    let node = Node::new();
    let (export, _flusher, region) = node.start(config);
    for i in 0..200u64 {
        export.write((i % 7) * 512, &[i as u8; 512], false).unwrap();
    }
    export.trim(0, 512).unwrap();
    wait_flushed(&region);
    let mut want = vec![0u8; 7 * 512];
    for i in 193..200u64 {
        let at = ((i % 7) * 512) as usize;
        want[at..at + 512].fill(i as u8);
    }
    want[..512].fill(0);
    assert_eq!(node.disk_bytes(0, 7 * 512), want, "{config:?}");
    assert_eq!(read(export.as_ref(), 0, 7 * 512), want, "{config:?}");
}

#[test]
fn a_restarted_agent_serves_and_flushes_what_the_crashed_one_acknowledged() {
    for config in releases() {
        a_restarted_agent_serves_and_flushes_what_the_crashed_one_acknowledged_with(config);
    }
}

fn a_restarted_agent_serves_and_flushes_what_the_crashed_one_acknowledged_with(
    config: FlusherConfig,
) {
    let node = Node::new();
    {
        let (export, flusher, _region) = node.start(paused());
        for i in 0..64u64 {
            export
                .write(i * 4096 * 3, &[(i + 1) as u8; 4096], false)
                .unwrap();
        }
        // A crash: nothing is flushed, nothing is shut down in order.
        drop(flusher);
        std::mem::forget(export);
    }
    let (export, _flusher, region) = node.start(config);
    for i in 0..64u64 {
        assert_eq!(
            read(export.as_ref(), i * 4096 * 3, 4096),
            vec![(i + 1) as u8; 4096],
            "block {i}, {config:?}"
        );
    }
    wait_flushed(&region);
    for i in 0..64u64 {
        assert_eq!(
            node.disk_bytes(i * 4096 * 3, 4096),
            vec![(i + 1) as u8; 4096],
            "block {i} on disk, {config:?}"
        );
    }
}

#[test]
fn concurrent_writers_to_one_block_end_as_the_log_orders_them() {
    let node = Node::new();
    let (export, _flusher, region) = node.start(FlusherConfig::default());
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let export = Arc::clone(&export);
            s.spawn(move || {
                for _ in 0..200 {
                    export.write(8192, &[t; 1024], false).unwrap();
                }
            });
        }
    });
    // Whatever the interleaving, what clients read is the last logged write, and so is the disk.
    let last = {
        let scanned: Vec<_> = region.unflushed().unwrap().map(Result::unwrap).collect();
        scanned.last().map(|r| r.data[0])
    };
    let seen = read(export.as_ref(), 8192, 1024);
    assert!(seen.iter().all(|b| *b == seen[0]), "a torn block");
    wait_flushed(&region);
    assert_eq!(node.disk_bytes(8192, 1024), seen);
    if let Some(last) = last {
        assert_eq!(seen[0], last);
    }
}

#[test]
fn reads_match_a_model_while_the_flusher_races() {
    for config in releases() {
        reads_match_a_model_while_the_flusher_races_with(config);
    }
}

fn reads_match_a_model_while_the_flusher_races_with(config: FlusherConfig) {
    let node = Node::new();
    let (export, _flusher, region) = node.start(config);
    let mut model = vec![0u8; 256 * 1024];
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3000u64 {
        let offset = next() % (model.len() as u64 - 8192);
        let len = 1 + next() % 8192;
        match next() % 5 {
            0 => {
                export.write_zeroes(offset, len, false, false).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            1 => {
                export.trim(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|j| (i ^ j) as u8).collect();
                export.write(offset, &data, false).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
        }
        if i % 50 == 0 {
            assert_eq!(
                read(export.as_ref(), 0, model.len()),
                model,
                "after op {i}, {config:?}"
            );
        }
    }
    wait_flushed(&region);
    assert_eq!(read(export.as_ref(), 0, model.len()), model, "{config:?}");
    assert_eq!(node.disk_bytes(0, model.len()), model, "{config:?}");
}

#[test]
fn a_full_log_waits_for_the_flusher_instead_of_failing() {
    for config in releases() {
        a_full_log_waits_for_the_flusher_instead_of_failing_with(FlusherConfig {
            delay: Duration::from_millis(20),
            ..config
        });
    }
}

fn a_full_log_waits_for_the_flusher_instead_of_failing_with(config: FlusherConfig) {
    let node = Node::new();
    let (export, _flusher, region) = node.start(config);
    // 4 MiB of writes through a 1 MiB region: the ring fills again and again.
    for i in 0..1024u64 {
        export
            .write((i % 512) * 4096, &[(i % 251) as u8; 4096], false)
            .unwrap();
    }
    wait_flushed(&region);
    assert!(
        region.stats().backpressure_waits > 0,
        "the ring never filled, {config:?}"
    );
    assert_eq!(
        node.disk_bytes(511 * 4096, 4096),
        vec![(1023 % 251) as u8; 4096],
        "{config:?}"
    );
}

fn wait_synced(region: &NodeRegion, seq: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while region.synced().unwrap().seq < seq {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn released_on_write_the_disks_are_synced_every_interval() {
    let node = Node::new();
    let (export, _flusher, region) = node.start(FlusherConfig {
        release: Release::Written,
        sync_interval: Duration::from_millis(100),
        ..FlusherConfig::default()
    });
    assert_eq!(region.synced().unwrap().seq, 0, "nothing was synced yet");
    for round in 1..=3u64 {
        export
            .write(round * 4096, &[round as u8; 4096], false)
            .unwrap();
        wait_flushed(&region);
        let head = region.head().unwrap().seq;
        assert!(
            wait_synced(&region, head, Duration::from_secs(5)),
            "round {round}: the syncer did not cover seq {head}: {:?}",
            region.synced()
        );
        assert!(region.synced().unwrap().unix_ns > 0);
    }
}

#[test]
fn released_on_write_a_stopping_flusher_syncs_what_it_released() {
    let node = Node::new();
    let (export, flusher, region) = node.start(FlusherConfig {
        release: Release::Written,
        // Longer than the test: only the last sync, at stop, can cover the writes.
        sync_interval: Duration::from_secs(3600),
        ..FlusherConfig::default()
    });
    for i in 0..32u64 {
        export.write(i * 4096, &[i as u8; 4096], false).unwrap();
    }
    wait_flushed(&region);
    let head = region.head().unwrap().seq;
    assert!(
        region.synced().unwrap().seq < head,
        "synced before its interval"
    );
    drop(flusher);
    assert_eq!(region.synced().unwrap().seq, head);
}

#[test]
fn released_on_sync_synced_keeps_up_with_flushed() {
    let node = Node::new();
    let (export, _flusher, region) = node.start(FlusherConfig {
        release: Release::Synced,
        ..FlusherConfig::default()
    });
    for i in 0..32u64 {
        export.write(i * 4096, &[i as u8; 4096], false).unwrap();
    }
    wait_flushed(&region);
    assert!(region.synced().unwrap().seq >= region.flushed().unwrap().seq);
}

/// Overlay segments point into the log: the flusher must drop them before the appender may
/// reuse their log space. Each cycle starts on an empty log with the one write of a block
/// that only ever holds one pattern, then fills the ring behind it with other writes. The
/// flusher's batch then starts with that record, and the blocked appender reuses its space
/// the moment the batch is released, while a reader keeps reading the block.
#[test]
fn reads_never_see_log_space_reused_under_them() {
    for config in releases() {
        reads_never_see_log_space_reused_under_them_with(FlusherConfig {
            // Batches far apart: the ring fills and the appender waits for space.
            delay: Duration::from_millis(20),
            ..config
        });
    }
}

fn reads_never_see_log_space_reused_under_them_with(config: FlusherConfig) {
    let node = Node::new();
    let (export, _flusher, region) = node.start(config);
    const STABLE: u64 = 0;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for _cycle in 0..8 {
                wait_flushed(&region);
                export.write(STABLE, &[0x5a; 4096], false).unwrap();
                // A 1 MiB ring holds about 250 of these: 300 make the appender wait.
                for i in 0..300u64 {
                    export
                        .write((1 + i % 200) * 4096, &[0xc3; 4096], false)
                        .unwrap();
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut reads = 0u64;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let got = read(export.as_ref(), STABLE, 4096);
            assert!(
                got.iter().all(|b| *b == 0x5a) || (reads == 0 && got.iter().all(|b| *b == 0)),
                "read {reads} saw reused log space ({config:?})"
            );
            if got[0] == 0x5a {
                reads += 1;
            }
        }
        writer.join().unwrap();
        assert!(reads > 0, "the reader never saw the block ({config:?})");
    });
}
