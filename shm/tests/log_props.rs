//! Property tests of the NVRAM write log: what is appended is what is scanned back, across
//! wrap-arounds, full rings, every record size, and whatever bytes the ring holds.
//!
//! Regions are small (8-64 KiB) so that the ring wraps every few records.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{OwnedEntry, RegionFile, scan_all, sealed};
use proptest::prelude::*;
use shm::inspect::NodeReport;
use shm::layout::node_live;
use shm::log::record::{
    RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader, WRITE_PREFIX_LEN, footprint,
};
use shm::{
    Appended, BackPressure, Cursor, LogError, LogScanner, Mapping, NodeRegion, NodeWriter, Record,
    RecordKind,
};

const KIB: u64 = 1024;
/// Footprint of the smallest record an [`shm::Entry`] can make (a write without data).
const MIN_ENTRY_FOOTPRINT: u64 = 48;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A write of `len` data bytes whose content depends on `seed`.
fn patterned(len: usize, seed: u8) -> OwnedEntry {
    OwnedEntry::write(u32::from(seed), len as u64 * 512, pattern(len, seed))
}

/// Deterministic, non-zero-ish bytes (cheaper for proptest than random vectors).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8) ^ 0xa5)
        .collect()
}

/// A region file of `size` bytes, as [`RegionFile::format`] makes it for these tests.
fn region_file(size: u64) -> (RegionFile, NodeRegion) {
    RegionFile::format(size, 0, "props")
}

/// Inspects the region in `file`: it must find no problem and exactly `records` records.
fn inspect_clean(file: &RegionFile, records: usize, context: &str) -> NodeReport {
    let report = file.inspect();
    assert_eq!(report.problem, None, "{context}");
    assert_eq!(report.records.len(), records, "{context}");
    report
}

/// A log under test and the model of what its unflushed part must hold.
struct Log {
    region: NodeRegion,
    writer: NodeWriter,
    /// Unflushed records, oldest first: (position, entry). Seqs follow the flushed cursor.
    model: VecDeque<(u64, OwnedEntry)>,
}

impl Log {
    fn memfd(size: u64) -> Self {
        let region = NodeRegion::format(
            Mapping::create_memfd("log-props", size).unwrap(),
            0,
            "props",
        )
        .unwrap();
        Self::on(region)
    }

    /// A log in a 16 KiB region file, for tests that also look at the file.
    fn in_file() -> (RegionFile, Self) {
        let (file, region) = region_file(16 * KIB);
        (file, Self::on(region))
    }

    fn on(region: NodeRegion) -> Self {
        let writer = region.writer(1).unwrap();
        Self {
            region,
            writer,
            model: VecDeque::new(),
        }
    }

    fn ring(&self) -> u64 {
        self.region.geometry().ring_size
    }

    fn max_payload(&self) -> u64 {
        self.region.geometry().max_payload
    }

    /// Largest data length of a write record.
    fn max_data(&self) -> usize {
        self.max_payload() as usize - WRITE_PREFIX_LEN
    }

    fn head(&self) -> Cursor {
        self.writer.appender.head()
    }

    fn flushed(&self) -> Cursor {
        self.writer.flushed.flushed()
    }

    /// Where the next record of payload `len` goes: (bytes skipped at the ring end, footprint,
    /// whether the ring is too full for it).
    fn placement(&self, len: u64) -> (u64, u64, bool) {
        let size = footprint(len);
        let remaining = self.ring() - self.head().pos % self.ring();
        let skip = if remaining < size { remaining } else { 0 };
        let free = self.ring() - (self.head().pos - self.flushed().pos);
        (skip, size, skip + size > free)
    }

    /// `try_append`, checked against the model. `None` when the ring was (rightly) full.
    fn append(&mut self, owned: OwnedEntry) -> Option<Appended> {
        let head = self.head();
        let len = owned.entry().payload_len();
        let (skip, size, full) = self.placement(len);
        let free = self.ring() - (head.pos - self.flushed().pos);
        assert_eq!(self.writer.appender.free_bytes().unwrap(), free);
        match self.writer.appender.try_append(&owned.entry()) {
            Ok(appended) => {
                assert!(!full, "appended although only {free} bytes were free");
                assert_eq!(appended.seq, head.seq + 1);
                assert_eq!(appended.pos, head.pos + skip);
                let end = Cursor {
                    seq: appended.seq,
                    pos: appended.pos + size,
                };
                assert_eq!(appended.head, end);
                assert_eq!(self.head(), end);
                assert_eq!(self.region.head(), Some(end));
                // A record never straddles the ring end.
                assert!(appended.pos % self.ring() + size <= self.ring());
                self.model.push_back((appended.pos, owned));
                Some(appended)
            }
            Err(LogError::Full { needed, free: f }) => {
                assert!(full, "refused although {free} bytes were free");
                assert_eq!(needed, skip + size);
                assert_eq!(f, free);
                assert_eq!(self.head(), head, "a refused append moved the head");
                assert_eq!(self.region.head(), Some(head));
                None
            }
            Err(e) => panic!("unexpected append error: {e}"),
        }
    }

    /// Appends, flushing everything first if the ring is full.
    fn append_flushing(&mut self, owned: OwnedEntry) -> Appended {
        if let Some(a) = self.append(owned.clone()) {
            return a;
        }
        self.flush_all();
        self.append(owned).unwrap()
    }

    /// Everything from flushed to head; panics on any scan error.
    fn scan(&self) -> Vec<Record> {
        scan_all(&self.region)
    }

    /// Scans and compares with the model.
    fn check(&self) -> Vec<Record> {
        let records = self.scan();
        let flushed = self.flushed();
        assert_eq!(self.region.flushed(), Some(flushed));
        assert_eq!(records.len(), self.model.len(), "record count");
        for (i, (record, (pos, owned))) in records.iter().zip(&self.model).enumerate() {
            assert_eq!(
                record.seq,
                flushed.seq + 1 + i as u64,
                "seqs are contiguous"
            );
            assert_eq!(record.pos, *pos, "position of record {}", record.seq);
            assert_eq!(record.entry(), owned.entry(), "record {}", record.seq);
            assert_eq!(record.kind, owned.entry().kind());
            assert_eq!(
                record.end_pos,
                record.pos + footprint(owned.entry().payload_len())
            );
        }
        let end = records.last().map_or(flushed, Record::end);
        assert_eq!(end, self.head(), "the scan ends at the head");
        records
    }

    /// Advances flushed to the end of the `index`th scanned record.
    fn flush_through(&mut self, index: usize) {
        let records = self.check();
        let to = records[index].end();
        self.writer.flushed.advance(to).unwrap();
        self.model.drain(..=index);
        assert_eq!(self.flushed(), to);
        assert_eq!(self.region.flushed(), Some(to));
    }

    fn flush_all(&mut self) {
        if !self.model.is_empty() {
            self.flush_through(self.model.len() - 1);
        }
        assert_eq!(self.flushed(), self.head());
    }

    /// Appends writes (flushing all before each) until the head sits at ring offset
    /// `target` (a multiple of 8, 0 or at least [`MIN_ENTRY_FOOTPRINT`]).
    fn drive_to(&mut self, target: u64) {
        assert!(target % 8 == 0 && (target == 0 || target >= MIN_ENTRY_FOOTPRINT));
        let ring = self.ring();
        let at = |log: &Self| log.head().pos % ring;
        if at(self) == target {
            self.flush_all();
            return;
        }
        // First to the start of a lap.
        if at(self) != 0 {
            if ring - at(self) < MIN_ENTRY_FOOTPRINT {
                // Too little room for any record: one small record skips to the next lap.
                self.flush_all();
                self.append(patterned(0, 0)).unwrap();
            }
            let to_end = ring - at(self);
            self.fill(to_end);
            assert_eq!(at(self), 0);
        }
        self.fill(target);
        self.flush_all();
        assert_eq!(at(self), target);
    }

    /// Appends a record that ends exactly `room` bytes before the ring's end and leaves it
    /// unflushed; returns the head after it.
    fn leave_room_at_ring_end(&mut self, room: u64) -> Cursor {
        let ring = self.ring();
        self.drive_to(ring - room - 200);
        let head = self.append(patterned(200 - 48, 1)).unwrap().head;
        assert_eq!(ring - head.pos % ring, room);
        head
    }

    /// The region offset of log position `pos`.
    fn region_offset(&self, pos: u64) -> u64 {
        let g = self.region.geometry();
        g.ring_offset + pos % g.ring_size
    }

    /// Appends writes whose footprints add up to exactly `distance` bytes.
    fn fill(&mut self, mut distance: u64) {
        let max_footprint = footprint(self.max_payload());
        while distance > 0 {
            let mut chunk = distance.min(max_footprint);
            if distance - chunk != 0 && distance - chunk < MIN_ENTRY_FOOTPRINT {
                chunk = distance - MIN_ENTRY_FOOTPRINT;
            }
            assert!(chunk >= MIN_ENTRY_FOOTPRINT);
            self.flush_all();
            let before = self.head().pos;
            self.append(patterned((chunk - MIN_ENTRY_FOOTPRINT) as usize, 7))
                .unwrap();
            assert_eq!(
                self.head().pos - before,
                chunk,
                "fill record crossed the ring end"
            );
            distance -= chunk;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn entry_strategy(max_data: usize) -> impl Strategy<Value = OwnedEntry> {
    let data_len = prop_oneof![0..=64usize, 0..=max_data];
    prop_oneof![
        4 => (any::<u32>(), any::<u64>(), data_len, any::<u8>()).prop_map(
            |(export, offset, len, seed)| OwnedEntry::write(export, offset, pattern(len, seed))
        ),
        1 => (any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(export, offset, len)| OwnedEntry::trim(export, offset, len)),
        1 => (any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(export, offset, len)| OwnedEntry::write_zeroes(export, offset, len)),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Append(OwnedEntry),
    /// Advance flushed to the end of the `index`th unflushed record (if any).
    Flush(prop::sample::Index),
}

fn ops(max_data: usize, count: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => entry_strategy(max_data).prop_map(Op::Append),
            1 => any::<prop::sample::Index>().prop_map(Op::Flush),
        ],
        1..count,
    )
}

/// Region sizes of 16 to 64 KiB (multiples of the 4 KiB page).
fn small_region_size() -> impl Strategy<Value = u64> {
    (4u64..=16).prop_map(|pages| pages * 4 * KIB)
}

// ---------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever is appended between flushes is scanned back exactly, in order, with
    /// contiguous seqs; appends fail with `Full` exactly when the ring has no room.
    #[test]
    fn appended_records_scan_back_exactly(size in small_region_size(), ops in ops(4096, 160)) {
        let mut log = Log::memfd(size);
        for op in ops {
            match op {
                Op::Append(owned) => {
                    log.append(owned);
                }
                Op::Flush(index) => {
                    if !log.model.is_empty() {
                        log.flush_through(index.index(log.model.len()));
                    }
                }
            }
            log.check();
        }
    }

    /// `starting_at_seq` skips exactly the records below the seq, and still ends at head.
    #[test]
    fn starting_at_seq_skips_exactly_the_records_below_it(
        size in small_region_size(),
        before in prop::collection::vec(entry_strategy(1024), 0..40),
        unflushed in prop::collection::vec(entry_strategy(1024), 0..12),
        start in any::<prop::sample::Index>(),
    ) {
        let mut log = Log::memfd(size);
        for owned in before {
            log.append_flushing(owned);
        }
        log.flush_all();
        for owned in unflushed {
            if log.append(owned).is_none() {
                break;
            }
        }
        let all = log.check();
        let (flushed, head) = (log.flushed(), log.head());
        // Any seq from 0 to two past the head.
        let seq = start.index((head.seq + 3) as usize) as u64;
        let mut scanner = log.region.unflushed().unwrap().starting_at_seq(seq);
        let got: Vec<Record> = scanner.by_ref().collect::<Result<_, _>>().unwrap();
        let want: Vec<Record> = all.iter().filter(|r| r.seq >= seq).cloned().collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(scanner.position(), head);
        // The same through a scanner built by hand.
        let by_hand: Vec<Record> = LogScanner::new(
            log.region.mapping(), log.region.geometry(), flushed, head,
        )
        .starting_at_seq(seq)
        .collect::<Result<_, _>>()
        .unwrap();
        prop_assert_eq!(by_hand, want);
    }
}

// ---------------------------------------------------------------------------------------
// Wrap-around
// ---------------------------------------------------------------------------------------

#[test]
fn positions_run_past_several_laps() {
    for size in [8 * KIB, 16 * KIB, 20 * KIB] {
        let mut log = Log::memfd(size);
        let mut i = 0usize;
        while log.head().pos < 6 * log.ring() {
            // Sizes that do not divide the ring, so records land all over it.
            let len = (i * 397) % (log.max_data() + 1);
            if log.append(patterned(len, i as u8)).is_none() {
                // Flush about half of what is there, then retry.
                log.flush_through(log.model.len() / 2);
                continue;
            }
            log.check();
            i += 1;
        }
        assert!(
            log.head().seq > 6,
            "{size}: only {} records",
            log.head().seq
        );
    }
}

#[test]
fn a_record_that_exactly_fills_the_ring_end_is_not_skipped() {
    let (file, mut log) = Log::in_file();
    let ring = log.ring();
    let max_footprint = footprint(log.max_payload());
    for room in [MIN_ENTRY_FOOTPRINT, 56, 200, 1000, max_footprint] {
        log.drive_to(ring - room);
        let lap = log.head().pos / ring;
        let data = (room - MIN_ENTRY_FOOTPRINT) as usize;
        let a = log.append(patterned(data, 3)).unwrap();
        assert_eq!(
            a.pos % ring,
            ring - room,
            "room {room}: the record was moved"
        );
        assert_eq!(
            a.head.pos,
            (lap + 1) * ring,
            "room {room}: does not end at the ring end"
        );
        // The next one starts the next lap at offset 0, without a gap.
        let b = log.append(patterned(10, 4)).unwrap();
        assert_eq!(b.pos, (lap + 1) * ring);
        let records = log.check();
        assert_eq!(records.len(), 2);
        inspect_clean(&file, 2, &format!("room {room}"));
        log.flush_all();
    }
}

#[test]
fn less_than_a_header_at_the_ring_end_is_skipped_without_a_marker() {
    let (file, mut log) = Log::in_file();
    let raw = file.raw();
    let ring = log.ring();
    for tail in [8, 16, 24] {
        // One record ends `tail` bytes before the ring end and stays unflushed.
        let end = log.leave_room_at_ring_end(tail);
        let gap = log.region_offset(end.pos);
        let before = raw.read(gap, tail as usize);
        let lap_start = end.pos + tail;
        for kind in 0..3 {
            let owned = match kind {
                0 => patterned(0, 2),
                1 => OwnedEntry::trim(1, 2, 3),
                _ => patterned(100, 2),
            };
            let a = log.append(owned).unwrap();
            if kind == 0 {
                assert_eq!(a.pos, lap_start, "tail {tail}: the record did not wrap");
            }
        }
        assert_eq!(
            raw.read(gap, tail as usize),
            before,
            "tail {tail}: the gap was written"
        );
        log.check();
        // A scan starting right at the gap works too.
        log.flush_through(0);
        assert_eq!(log.flushed().pos % ring, ring - tail);
        assert_eq!(log.check().first().unwrap().pos, lap_start);
        let report = inspect_clean(&file, 3, &format!("tail {tail}"));
        assert_eq!(report.records[0].pos, lap_start);
        log.flush_all();
    }
}

#[test]
fn a_wrap_marker_is_written_when_a_header_fits_but_the_record_does_not() {
    let (file, mut log) = Log::in_file();
    let raw = file.raw();
    for room in [32u64, 40, 48, 96, 1000] {
        // Leave `room` bytes at the ring end, then append a record one word too big for it.
        let head = log.leave_room_at_ring_end(room);
        let data = (room + 8).saturating_sub(MIN_ENTRY_FOOTPRINT) as usize;
        let a = log.append(patterned(data, 9)).unwrap();
        assert_eq!(
            a.pos,
            head.pos + room,
            "room {room}: the record did not wrap"
        );
        let marker = raw.header(log.region_offset(head.pos));
        assert_eq!(marker.magic, RECORD_MAGIC, "room {room}: no wrap marker");
        assert_eq!(marker.kind_code, RecordKind::Wrap.code());
        assert_eq!(marker.flags, 0);
        assert_eq!(marker.seq, a.seq, "a wrap marker carries the seq after it");
        assert_eq!(marker.len, 0);
        assert_eq!(marker.pos, head.pos);
        assert_eq!(marker.crc, marker.compute_crc(&[]));
        let records = log.check();
        assert_eq!(records.len(), 2, "the marker is not a record");
        // A scan starting at the marker skips it.
        log.flush_through(0);
        assert_eq!(log.check()[0].seq, a.seq);
        let report = inspect_clean(&file, 1, &format!("room {room}"));
        assert_eq!(report.records[0].seq, a.seq);
        log.flush_all();
    }
}

// ---------------------------------------------------------------------------------------
// Full ring and back-pressure
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_ring_refuses_appends_until_the_flusher_frees_space() {
    for data in [1000usize, 0, 4000] {
        let mut log = Log::memfd(16 * KIB);
        let owned = patterned(data, 5);
        let mut refusals = 0;
        // Several laps of: fill until refused, then free the oldest record(s).
        while log.head().pos < 4 * log.ring() {
            if log.append(owned.clone()).is_some() {
                log.check();
                continue;
            }
            refusals += 1;
            // Still refused, and nothing changed.
            let head = log.head();
            assert!(matches!(
                log.writer.appender.try_append(&owned.entry()),
                Err(LogError::Full { .. })
            ));
            assert_eq!(log.head(), head);
            log.check();
            // Free one record at a time until the append fits.
            while log.append(owned.clone()).is_none() {
                let freed = footprint(log.model.front().unwrap().1.entry().payload_len());
                let free = log.writer.appender.free_bytes().unwrap();
                log.flush_through(0);
                // Freed: the record and any skipped tail of the ring before the next one.
                assert!(log.writer.appender.free_bytes().unwrap() >= free + freed);
            }
            log.check();
        }
        assert!(
            refusals >= 4,
            "data {data}: the ring was full only {refusals} times"
        );
    }
}

#[test]
fn append_gives_up_after_its_back_pressure_timeout_and_counts_the_wait() {
    let mut log = Log::memfd(16 * KIB);
    let owned = patterned(1500, 1);
    while log.append(owned.clone()).is_some() {}
    assert_eq!(log.region.stats().backpressure_waits, 0);
    let short = BackPressure {
        timeout: Duration::from_millis(20),
    };
    for attempt in 1..=2u64 {
        let head = log.head();
        let err = log
            .writer
            .appender
            .append(&owned.entry(), short)
            .unwrap_err();
        let LogError::BackPressureTimeout { waited_ms } = err else {
            panic!("expected a back-pressure timeout, got {err}");
        };
        assert!(waited_ms >= 20, "waited only {waited_ms} ms");
        assert_eq!(log.head(), head);
        let stats = log.region.stats();
        assert_eq!(stats.backpressure_waits, attempt);
        assert!(
            stats.backpressure_wait_ns >= attempt * 20_000_000,
            "{stats:?}"
        );
        log.check();
    }
    // With room, append() goes straight through and counts nothing.
    log.flush_all();
    let stats = log.region.stats();
    let a = log.writer.appender.append(&owned.entry(), short).unwrap();
    log.model.push_back((a.pos, owned));
    log.check();
    assert_eq!(log.region.stats(), stats);
}

// ---------------------------------------------------------------------------------------
// Record sizes
// ---------------------------------------------------------------------------------------

#[test]
fn every_record_size_round_trips_and_larger_ones_are_refused() {
    for size in [8 * KIB, 16 * KIB] {
        let mut log = Log::memfd(size);
        let max_data = log.max_data();
        assert!(
            max_data >= 2000,
            "{size}: max payload {}",
            log.max_payload()
        );
        for len in 0..=max_data {
            let a = log.append(patterned(len, len as u8)).unwrap();
            let records = log.check();
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].data.len(), len);
            assert_eq!(records[0].seq, a.seq);
            log.flush_all();
        }
        assert!(
            log.head().pos > 100 * log.ring(),
            "{size}: wrapped too rarely"
        );
        too_large_is_refused(&mut log);
    }
}

#[test]
fn near_maximum_records_round_trip_in_a_large_region() {
    let mut log = Log::memfd(64 * KIB * KIB);
    let max_data = log.max_data();
    assert_eq!(footprint(log.max_payload()), log.ring() / 2);
    // Two largest records fill the ring exactly; the next one starts the second lap.
    for (i, len) in [max_data, max_data - 1, max_data - 7, max_data - 8, max_data]
        .into_iter()
        .enumerate()
    {
        log.append_flushing(patterned(len, i as u8));
        let records = log.check();
        assert_eq!(records.last().unwrap().data.len(), len);
    }
    assert!(log.head().pos > log.ring());
    too_large_is_refused(&mut log);
}

/// Payloads one byte over the limit, and far over it, give `TooLarge` and change nothing.
fn too_large_is_refused(log: &mut Log) {
    let max = log.max_payload();
    let head = log.head();
    let stats = log.region.stats();
    for data_len in [
        max as usize - WRITE_PREFIX_LEN + 1,
        max as usize,
        2 * max as usize,
    ] {
        let owned = patterned(data_len, 0);
        let want = LogError::TooLarge {
            len: data_len as u64 + WRITE_PREFIX_LEN as u64,
            max,
        };
        assert_eq!(
            log.writer.appender.try_append(&owned.entry()),
            Err(want.clone())
        );
        assert_eq!(
            log.writer
                .appender
                .append(&owned.entry(), BackPressure::default()),
            Err(want)
        );
    }
    assert_eq!(log.head(), head);
    assert_eq!(log.region.stats(), stats);
    log.check();
}

// ---------------------------------------------------------------------------------------
// Arbitrary ring contents
// ---------------------------------------------------------------------------------------

/// Something done to the ring or the cursors of a valid log.
#[derive(Debug, Clone)]
enum Damage {
    /// Bytes written at a ring offset.
    Bytes {
        at: prop::sample::Index,
        bytes: Vec<u8>,
    },
    /// Every ring byte replaced by a pattern.
    Garbage { seed: u8 },
    /// A plausible header at an aligned ring offset (magic right, position right for the
    /// lap of the head), or at the flushed cursor when `at` is `None`, possibly with a
    /// valid crc.
    Header {
        at: Option<prop::sample::Index>,
        kind: u16,
        flags: u16,
        seq_delta: i8,
        len: u32,
        fix_crc: bool,
    },
    /// Published cursors replaced.
    Cursors { flushed: Cursor, head: Cursor },
    /// Published cursors replaced by a plausible pair: aligned, at most a ring apart, with
    /// a few records between them, anywhere in the position space (including its top).
    CursorPair {
        base: u64,
        span: prop::sample::Index,
        seq: u64,
        records: u64,
    },
    /// The head moved a few words into or past the record at `index` (a torn or corrupt
    /// head cursor), claiming that record complete or not.
    HeadInto {
        index: prop::sample::Index,
        delta: u64,
        complete: bool,
    },
}

fn cursor_strategy() -> impl Strategy<Value = Cursor> {
    let pos = prop_oneof![
        0..=256 * KIB,
        (0..=256 * KIB).prop_map(|p| p & !7),
        any::<u64>(),
        any::<u64>().prop_map(|p| p & !7),
        (0..=64 * KIB).prop_map(|d| (u64::MAX - d) & !7),
    ];
    let seq = prop_oneof![0..=64u64, any::<u64>()];
    (seq, pos).prop_map(|(seq, pos)| Cursor { seq, pos })
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    let len = prop_oneof![
        0..=64u32,
        0..=8192u32,
        Just(u32::MAX),
        any::<u32>(),
        Just(6112),
        Just(6113),
        Just(16),
        Just(24),
    ];
    let kind = prop_oneof![
        Just(RecordKind::Write.code()),
        Just(RecordKind::Trim.code()),
        Just(RecordKind::WriteZeroes.code()),
        Just(RecordKind::Wrap.code()),
        any::<u16>(),
    ];
    prop_oneof![
        4 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..48))
            .prop_map(|(at, bytes)| Damage::Bytes { at, bytes }),
        1 => any::<u8>().prop_map(|seed| Damage::Garbage { seed }),
        4 => (
            prop::option::weighted(0.6, any::<prop::sample::Index>()),
            kind,
            prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
            -2i8..=2,
            len,
            any::<bool>(),
        )
            .prop_map(|(at, kind, flags, seq_delta, len, fix_crc)| Damage::Header {
                at,
                kind,
                flags,
                seq_delta,
                len,
                fix_crc,
            }),
        2 => (cursor_strategy(), cursor_strategy())
            .prop_map(|(flushed, head)| Damage::Cursors { flushed, head }),
        2 => (
            prop_oneof![0..=256 * KIB, any::<u64>(), (0..=256 * KIB).prop_map(|d| u64::MAX - d)],
            any::<prop::sample::Index>(),
            prop_oneof![0..=64u64, any::<u64>()],
            0..4u64,
        )
            .prop_map(|(base, span, seq, records)| Damage::CursorPair { base, span, seq, records }),
        2 => (any::<prop::sample::Index>(), (0..=12u64).prop_map(|w| w * 8), any::<bool>())
            .prop_map(|(index, delta, complete)| Damage::HeadInto { index, delta, complete }),
    ]
}

/// Applies `damage` to the log in `file` through a second mapping.
fn apply(damage: &Damage, file: &RegionFile, region: &NodeRegion) {
    let raw = file.raw();
    let g = region.geometry();
    let ring = g.ring_size;
    match damage {
        Damage::Bytes { at, bytes } => {
            let offset = at.index(ring as usize) as u64;
            let n = bytes.len().min((ring - offset) as usize);
            raw.write(g.ring_offset + offset, &bytes[..n]);
        }
        Damage::Garbage { seed } => {
            raw.write(g.ring_offset, &pattern(ring as usize, *seed));
        }
        Damage::Header {
            at,
            kind,
            flags,
            seq_delta,
            len,
            fix_crc,
        } => {
            let head = region.head().unwrap_or_default();
            let flushed = region.flushed().unwrap_or_default();
            let (offset, pos) = match at {
                // An aligned offset with room for a header, at a position between flushed
                // and head when there is one (else in head's lap).
                Some(at) => {
                    let offset = (at.index((ring / 8) as usize) as u64 * 8).min(ring - 32);
                    let mut pos = (head.pos - head.pos % ring).wrapping_add(offset);
                    if pos >= head.pos && head.pos >= ring {
                        pos -= ring;
                    }
                    if pos < flushed.pos {
                        pos = pos.wrapping_add(ring);
                    }
                    (offset, pos)
                }
                None if flushed.pos % ring <= ring - 32 => (flushed.pos % ring, flushed.pos),
                None => return,
            };
            let seq = flushed.seq.wrapping_add(1).wrapping_add(*seq_delta as u64);
            let h = RecordHeader {
                kind_code: *kind,
                flags: *flags,
                ..RecordHeader::new(RecordKind::Write, seq, *len, pos)
            };
            let bytes = if *fix_crc {
                let available = (ring - offset - 32) as usize;
                let payload = raw.read(g.ring_offset + offset + 32, (*len as usize).min(available));
                sealed(h, &payload)
            } else {
                h.encode()
            };
            raw.write(g.ring_offset + offset, &bytes);
        }
        Damage::Cursors { flushed, head } => {
            raw.publish_flushed(*flushed);
            raw.publish_head(*head);
        }
        Damage::CursorPair {
            base,
            span,
            seq,
            records,
        } => {
            let from = base & !7;
            let span = (span.index((ring / 8) as usize + 1) as u64 * 8).min(!7 - from);
            raw.publish(node_live::FLUSHED.offset(), [*seq, from]);
            raw.publish(
                node_live::HEAD.offset(),
                [seq.saturating_add(*records), from + span],
            );
        }
        Damage::HeadInto {
            index,
            delta,
            complete,
        } => {
            let Ok(scanner) = region.unflushed() else {
                return;
            };
            let records: Vec<Record> = scanner.map_while(Result::ok).collect();
            if records.is_empty() {
                return;
            }
            let record = &records[index.index(records.len())];
            let seq = if *complete {
                record.seq
            } else {
                record.seq - 1
            };
            raw.publish(node_live::HEAD.offset(), [seq, record.pos + delta]);
        }
    }
}

/// Scans from `from` to `to` and checks the scanner's promises on whatever it finds.
fn scan_anything(region: &NodeRegion, from: Cursor, to: Cursor, skip_below: u64) {
    let ring = region.geometry().ring_size;
    let scanner =
        LogScanner::new(region.mapping(), region.geometry(), from, to).starting_at_seq(skip_below);
    let mut last: Option<Cursor> = None;
    let mut errors = 0;
    // Every record takes at least a header: a scan that returns more items than that is lost.
    let most = (ring / RECORD_HEADER_LEN as u64) as usize + 2;
    for item in scanner.take(most + 1) {
        assert_eq!(errors, 0, "items after an error");
        match item {
            Ok(record) => {
                assert!(record.seq >= skip_below);
                assert!(record.pos >= from.pos && record.end_pos <= to.pos);
                assert!(record.kind != RecordKind::Wrap);
                if let Some(prev) = last {
                    assert!(record.seq > prev.seq && record.pos >= prev.pos);
                }
                last = Some(record.end());
            }
            Err(e) => {
                errors += 1;
                // Every error renders; errors about a record name it.
                let text = e.to_string();
                if let Some(seq) = e.seq() {
                    assert!(text.contains(&seq.to_string()), "{text}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the ring and cursor words hold, scanning and inspecting return records or
    /// an error: they never panic, loop or allocate absurdly.
    #[test]
    fn scanning_arbitrary_bytes_never_panics(
        size in prop_oneof![Just(8 * KIB), Just(16 * KIB), Just(24 * KIB)],
        records in prop::collection::vec(entry_strategy(2000), 0..24),
        flush in any::<prop::sample::Index>(),
        damages in prop::collection::vec(damage_strategy(), 1..6),
        from in cursor_strategy(),
        to in cursor_strategy(),
        skip_below in prop_oneof![Just(0u64), 0..64u64, any::<u64>()],
    ) {
        let (file, region) = region_file(size);
        {
            let mut log = Log::on(region.clone());
            for owned in records {
                log.append_flushing(owned);
            }
            if !log.model.is_empty() {
                log.flush_through(flush.index(log.model.len()));
            }
        }
        for damage in &damages {
            apply(damage, &file, &region);
        }
        // Through the published cursors.
        if let Ok(scanner) = region.unflushed() {
            let (from, to) = (scanner.position(), scanner.end());
            drop(scanner);
            scan_anything(&region, from, to, 0);
            scan_anything(&region, from, to, skip_below);
        }
        let report = file.inspect();
        if let Some(problem) = &report.problem {
            prop_assert!(!problem.message.is_empty());
        }
        // Through arbitrary cursors handed to the scanner directly.
        scan_anything(&region, from, to, skip_below);
        let head = region.head().unwrap_or_default();
        scan_anything(&region, from, head, 0);
        // The region can still be taken over, or refuses with an error.
        let _ = region.writer(2);
    }
}
