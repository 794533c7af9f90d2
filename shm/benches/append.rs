#![allow(clippy::unwrap_used)]
//! Throughput of `LogAppender::try_append` for write records of 64 B, 4 KiB and 64 KiB,
//! into a 64 MiB node region backed by a tmpfs file (`/dev/shm`).
//!
//! The flusher is simulated outside the measured part: appends are timed in batches of at
//! most half a ring (so a batch can never find the ring full, wrap included), and after each
//! batch the flushed cursor is advanced to the head, untimed. Timing a batch instead of each
//! append keeps `Instant::now()` out of the per-append cost; `latency_table` has the
//! per-append distribution.
//!
//! Before measuring, one full lap of the ring is written, so tmpfs page allocation and
//! first-touch faults are not counted (a running node's ring is warm after one lap).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shm::log::FlushedWriter;
use shm::log::record::footprint;
use shm::{Entry, LogAppender, Mapping, NodeRegion};

const REGION_SIZE: u64 = 64 << 20;
const SIZES: [usize; 3] = [64, 4096, 65536];

struct Log {
    _dir: tempfile::TempDir,
    _region: NodeRegion,
    appender: LogAppender,
    flushed: FlushedWriter,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ivha-bench-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let mapping = Mapping::create_file(&dir.path().join("node"), REGION_SIZE).unwrap();
        let region = NodeRegion::format(mapping, 1, "bench").unwrap();
        let writer = region.writer(0xb0075).unwrap();
        let mut log = Self {
            _dir: dir,
            _region: region,
            appender: writer.appender,
            flushed: writer.flushed,
        };
        log.prefault();
        log
    }

    fn prefault(&mut self) {
        let data = vec![0x5a; 65536];
        let entry = Entry::Write {
            export: 0,
            offset: 0,
            data: &data,
        };
        let ring = self.appender.geometry().ring_size;
        let mut written = 0;
        while written <= ring {
            self.append_batch(&entry, 1);
            written += footprint(entry.payload_len());
        }
    }

    /// Appends `entry` `count` times, timing only the appends, then frees the ring space.
    /// `count` must be at most [`Log::batch_limit`].
    fn append_batch(&mut self, entry: &Entry<'_>, count: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..count {
            black_box(self.appender.try_append(black_box(entry)).unwrap());
        }
        let elapsed = start.elapsed();
        self.flushed.advance(self.appender.head()).unwrap();
        elapsed
    }

    /// Most appends of `entry` that surely fit in an empty ring, whatever the wrap.
    fn batch_limit(&self, entry: &Entry<'_>) -> u64 {
        (self.appender.geometry().ring_size / 2 / footprint(entry.payload_len())).max(1)
    }
}

fn bench_append(c: &mut Criterion) {
    let mut log = Log::new();
    let mut group = c.benchmark_group("try_append");
    for size in SIZES {
        let data: Vec<u8> = (0..size).map(|i| (i * 131 + 7) as u8).collect();
        let entry = Entry::Write {
            export: 1,
            offset: 4096,
            data: &data,
        };
        let limit = log.batch_limit(&entry);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &entry, |b, entry| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(limit);
                    total += log.append_batch(entry, n);
                    left -= n;
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
