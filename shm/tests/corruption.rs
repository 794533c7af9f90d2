//! Corruption tests: a log with known records in a file-backed region is damaged through a
//! second read-write mapping of the same file, and the scan (`NodeRegion::unflushed`) and
//! `inspect` must both stop at the first bad record, name its seq, and return every record
//! before it intact. Nothing may panic.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod common;

use common::{Raw, RegionFile, scan_all, sealed};
use shm::header::HeaderError;
use shm::inspect::{InspectOptions, NodeReport, RegionReport, UnpublishedTail, inspect};
use shm::layout::{
    FORMAT_VERSION, STATIC_HEADER_CRC_OFFSET, control_names, node_header, node_live,
};
use shm::log::record::{
    RECORD_HEADER_LEN, RECORD_MAGIC, RecordHeader, WRITE_PREFIX_LEN, footprint,
};
use shm::{
    Access, ControlError, ControlRegion, Cursor, Entry, LogError, LogScanner, Mapping, NodeError,
    NodeRegion, Record, RecordKind, RegionKind, identify,
};

const REGION_SIZE: u64 = 16 * 1024;

// ---------------------------------------------------------------------------------------
// Raw access and record headers
// ---------------------------------------------------------------------------------------

/// Rewrites the crc of the static header after a field was changed on purpose.
fn reseal_static_header(raw: &Raw) {
    let bytes = raw.read(0, STATIC_HEADER_CRC_OFFSET);
    let crc = crc32c::crc32c(&bytes);
    raw.write(STATIC_HEADER_CRC_OFFSET as u64, &crc.to_le_bytes());
}

/// A record header field: its byte offset and width, as laid out in the ring (see
/// `shm::log::record`; [`record_headers_used_here_match_the_format`] checks this table).
#[derive(Debug, Clone, Copy)]
struct Field {
    name: &'static str,
    offset: u64,
    bits: u32,
}

impl Field {
    const MAGIC: Field = Field::new("magic", 0, 32);
    const KIND: Field = Field::new("kind", 4, 16);
    const FLAGS: Field = Field::new("flags", 6, 16);
    const SEQ: Field = Field::new("seq", 8, 64);
    const LEN: Field = Field::new("len", 16, 32);
    const CRC: Field = Field::new("crc", 20, 32);
    const POS: Field = Field::new("pos", 24, 64);
    const ALL: [Field; 7] = [
        Self::MAGIC,
        Self::KIND,
        Self::FLAGS,
        Self::SEQ,
        Self::LEN,
        Self::CRC,
        Self::POS,
    ];

    const fn new(name: &'static str, offset: u64, bits: u32) -> Self {
        Self { name, offset, bits }
    }
}

/// The bytes of a header of `kind` with a crc over `payload`.
fn header(kind: RecordKind, seq: u64, len: u32, pos: u64, payload: &[u8]) -> [u8; 32] {
    sealed(RecordHeader::new(kind, seq, len, pos), payload)
}

// ---------------------------------------------------------------------------------------
// The damaged log
// ---------------------------------------------------------------------------------------

/// A 16 KiB region (12 KiB ring) whose log has two flushed records and then seven
/// unflushed ones: `C` exactly fills the ring's end, `D` starts the second lap, and the
/// rest follow. The writer is gone (as after a crash); what remains is the region file.
struct Damaged {
    file: RegionFile,
    region: NodeRegion,
    raw: Raw,
    /// The unflushed records, as scanned before any damage.
    records: Vec<Record>,
    flushed: Cursor,
    head: Cursor,
}

/// Data of the `i`th record: never zero at the end, so zeroing a tail is a change.
fn data_of(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 37 + j * 11) as u8 | 1).collect()
}

impl Damaged {
    fn new() -> Self {
        let (file, region) = RegionFile::format(REGION_SIZE, 0, "a");
        let ring = region.geometry().ring_size;
        {
            let mut w = region.writer(7).unwrap();
            let mut append = |i: usize, data_len: usize| {
                let data = data_of(i, data_len);
                w.appender
                    .try_append(&Entry::Write {
                        export: i as u32,
                        offset: i as u64 * 4096,
                        data: &data,
                    })
                    .unwrap()
            };
            // A and B fill the ring up to 200 bytes before its end, and are flushed.
            append(0, 6000 - 48);
            let b = append(1, 6088 - 48);
            assert_eq!(b.head.pos, ring - 200);
            w.flushed.advance(b.head).unwrap();
            // C fills the ring's end exactly; D..I follow in the second lap.
            let c = append(2, 200 - 48);
            assert_eq!(c.head.pos, ring);
            for (i, len) in [(3, 60), (4, 0), (5, 300), (6, 1000), (7, 17), (8, 500)] {
                append(i, len);
            }
            // Plus a trim and a write-zeroes, so that not every record is a write.
            w.appender
                .try_append(&Entry::Trim {
                    export: 9,
                    offset: 512,
                    len: 4096,
                })
                .unwrap();
            w.appender
                .try_append(&Entry::WriteZeroes {
                    export: 10,
                    offset: 1024,
                    len: 8192,
                })
                .unwrap();
        }
        let records = scan_all(&region);
        assert_eq!(records.len(), 9);
        let raw = file.raw();
        Self {
            flushed: region.flushed().unwrap(),
            head: region.head().unwrap(),
            file,
            region,
            raw,
            records,
        }
    }

    fn record(&self, seq: u64) -> &Record {
        self.records.iter().find(|r| r.seq == seq).unwrap()
    }

    /// The region byte offset of `field` of the record with `seq`.
    fn offset(&self, seq: u64, field: u64) -> u64 {
        let g = self.region.geometry();
        let record = self.record(seq);
        g.ring_offset + record.pos % g.ring_size + field
    }

    fn payload_offset(&self, seq: u64) -> u64 {
        self.offset(seq, RECORD_HEADER_LEN as u64)
    }

    /// Payload bytes of the record with `seq` (its footprint also has padding after them).
    fn payload_len(&self, seq: u64) -> u64 {
        let record = self.record(seq);
        let len = record.entry().payload_len();
        assert_eq!(footprint(len), record.end_pos - record.pos);
        len
    }

    fn inspect(&self) -> NodeReport {
        self.file.inspect()
    }

    fn scan(&self) -> Vec<Result<Record, LogError>> {
        // Bounded: a scanner that never ends is a failure too.
        self.region.unflushed().unwrap().take(100).collect()
    }

    /// The region scans and inspects clean, with every record as first written.
    fn assert_intact(&self) {
        let scanned: Vec<Record> = self.scan().into_iter().map(Result::unwrap).collect();
        assert_eq!(scanned, self.records);
        let report = self.inspect();
        assert_eq!(report.problem, None);
        assert_eq!(report.records.len(), self.records.len());
        assert!(report.records.iter().all(|r| r.crc_ok));
    }

    /// Scans and inspects the damaged region: both must return exactly the records before
    /// `bad_seq`, then an error about `bad_seq`, and nothing after it. Returns the error.
    fn assert_stops_at(&self, bad_seq: u64, context: &str) -> LogError {
        let good: Vec<&Record> = self.records.iter().filter(|r| r.seq < bad_seq).collect();
        let results = self.scan();
        let outline: Vec<Result<u64, &LogError>> = results
            .iter()
            .map(|r| r.as_ref().map(|record| record.seq))
            .collect();
        assert_eq!(
            results.len(),
            good.len() + 1,
            "{context}: expected {} good records and an error, got {outline:?}",
            good.len()
        );
        for (result, want) in results.iter().zip(&good) {
            assert_eq!(result.as_ref().unwrap(), *want, "{context}");
        }
        let error = results.last().unwrap().clone().unwrap_err();
        assert_eq!(error.seq(), Some(bad_seq), "{context}: {error}");
        let text = error.to_string();
        assert!(
            text.contains(&format!("record {bad_seq}")),
            "{context}: the message does not name record {bad_seq}: {text}"
        );

        let report = self.inspect();
        let problem = report.problem.as_ref().unwrap_or_else(|| {
            panic!("{context}: inspect found no problem");
        });
        assert_eq!(problem.seq, Some(bad_seq), "{context}: {}", problem.message);
        assert_eq!(problem.message, text, "{context}");
        for (summary, want) in report.records.iter().zip(&good) {
            assert_eq!(summary.seq, want.seq, "{context}");
            assert_eq!(summary.pos, want.pos, "{context}");
            assert_eq!(summary.kind, Some(want.kind), "{context}");
            assert_eq!(summary.export, Some(want.export), "{context}");
            assert_eq!(summary.offset, Some(want.offset), "{context}");
            assert_eq!(summary.len, want.len, "{context}");
            assert!(summary.crc_ok, "{context}");
        }
        match &error {
            // A record with a bad crc is listed (flagged); other damage is not listed.
            LogError::BadCrc { .. } => {
                assert_eq!(report.records.len(), good.len() + 1, "{context}");
                let bad = report.records.last().unwrap();
                assert_eq!(bad.seq, bad_seq, "{context}");
                assert_eq!(bad.pos, self.record(bad_seq).pos, "{context}");
                assert!(!bad.crc_ok, "{context}");
            }
            _ => assert_eq!(report.records.len(), good.len(), "{context}"),
        }
        error
    }

    /// Flips `bit` of the byte at `offset`, checks the scan stops at `bad_seq` with an error
    /// `accept` accepts, then flips it back and checks the log is whole again.
    fn flip_and_check(
        &self,
        offset: u64,
        bit: u32,
        bad_seq: u64,
        context: &str,
        accept: impl Fn(&LogError) -> bool,
    ) {
        self.raw.flip_bit(offset, bit);
        let error = self.assert_stops_at(bad_seq, context);
        assert!(accept(&error), "{context}: unexpected error {error:?}");
        self.raw.flip_bit(offset, bit);
        self.assert_intact();
    }
}

/// Seqs of the first unflushed record (at the ring's end), one in the middle and the last.
fn targets(log: &Damaged) -> [u64; 3] {
    let first = log.records[0].seq;
    let last = log.records.last().unwrap().seq;
    [first, first + 3, last]
}

// ---------------------------------------------------------------------------------------
// Bit flips
// ---------------------------------------------------------------------------------------

#[test]
fn the_fixture_is_intact_and_wraps() {
    let log = Damaged::new();
    log.assert_intact();
    let ring = log.region.geometry().ring_size;
    assert_eq!(
        log.records[0].end_pos, ring,
        "C ends exactly at the ring's end"
    );
    assert_eq!(log.records[1].pos, ring, "D starts the second lap");
    assert_eq!(log.flushed.seq, 2);
    assert_eq!(log.head.seq, 11);
}

#[test]
fn a_flipped_payload_bit_is_a_crc_error_naming_the_record() {
    let log = Damaged::new();
    for seq in targets(&log) {
        let len = log.payload_len(seq);
        let at = log.payload_offset(seq);
        // The export, the disk offset, the first data byte, the middle and the last byte.
        for (byte, bit) in [(0, 0), (8, 7), (16, 3), (len / 2, 5), (len - 1, 1)] {
            let context = format!("record {seq}, payload byte {byte} bit {bit}");
            log.flip_and_check(at + byte, bit, seq, &context, |e| {
                matches!(e, LogError::BadCrc { .. })
            });
        }
    }
}

#[test]
fn the_report_of_a_bad_crc_lists_the_bad_record_after_the_good_ones() {
    let log = Damaged::new();
    let bad = log.records[4].seq;
    log.raw.flip_bit(log.payload_offset(bad) + 20, 2);
    log.assert_stops_at(bad, "payload flip");
    let report = log.inspect();
    let problem = report.problem.clone().unwrap();
    assert_eq!(problem.seq, Some(bad));
    assert!(
        problem.message.contains("crc mismatch"),
        "{}",
        problem.message
    );
    let flags: Vec<(u64, bool)> = report.records.iter().map(|r| (r.seq, r.crc_ok)).collect();
    let want: Vec<(u64, bool)> = log
        .records
        .iter()
        .take_while(|r| r.seq <= bad)
        .map(|r| (r.seq, r.seq != bad))
        .collect();
    assert_eq!(flags, want);
    // What can still be said about the bad record comes from its (intact) header.
    let summary = report.records.last().unwrap();
    let record = log.record(bad);
    assert_eq!(summary.kind, Some(RecordKind::Write));
    assert_eq!(summary.export, Some(record.export));
    assert_eq!(summary.offset, Some(record.offset));
    assert_eq!(summary.len, record.len);
    assert_eq!(report.unpublished_tail, None);
    assert_eq!(report.head, Some(log.head));
    assert_eq!(report.flushed, Some(log.flushed));
}

/// Flips every bit of `field` in each of the [`targets`], one at a time: the scan must stop
/// at that record with an error `accept` takes (given the intact record and the bit), and
/// the log must be whole again once the bit is flipped back.
fn flip_each_bit(field: Field, accept: impl Fn(&Record, u32, &LogError) -> bool) {
    let log = Damaged::new();
    for seq in targets(&log) {
        let record = log.record(seq);
        for bit in 0..field.bits {
            let at = log.offset(seq, field.offset) + u64::from(bit / 8);
            let context = format!("{seq} {} bit {bit}", field.name);
            log.flip_and_check(at, bit % 8, seq, &context, |e| accept(record, bit, e));
        }
    }
}

#[test]
fn a_flipped_magic_bit_is_a_bad_magic() {
    flip_each_bit(Field::MAGIC, |_, _, e| {
        matches!(e, LogError::BadMagic { .. })
    });
}

#[test]
fn a_flipped_kind_bit_is_an_unknown_kind_or_a_crc_error() {
    flip_each_bit(Field::KIND, |_, _, e| {
        matches!(e, LogError::UnknownKind { .. } | LogError::BadCrc { .. })
    });
}

#[test]
fn a_flipped_flags_bit_is_an_unknown_flag() {
    flip_each_bit(Field::FLAGS, |_, _, e| {
        matches!(e, LogError::UnknownFlags { .. } | LogError::BadCrc { .. })
    });
}

/// BUG(shm): `LogError::SeqGap` is the one record error whose message does not say
/// "record {seq}" (src/log/mod.rs, the `SeqGap` variant): this test fails until it does.
#[test]
fn a_flipped_seq_bit_is_a_seq_gap_naming_the_expected_record() {
    flip_each_bit(
        Field::SEQ,
        |record, bit, e| matches!(e, LogError::SeqGap { found, .. } if *found == record.seq ^ (1 << bit)),
    );
}

#[test]
fn a_flipped_len_bit_is_a_bad_length_or_a_crc_error() {
    flip_each_bit(Field::LEN, |_, _, e| {
        matches!(e, LogError::BadLength { .. } | LogError::BadCrc { .. })
    });
}

#[test]
fn a_flipped_crc_bit_is_a_crc_error() {
    flip_each_bit(Field::CRC, |_, _, e| matches!(e, LogError::BadCrc { .. }));
}

#[test]
fn a_flipped_pos_bit_is_a_wrong_position() {
    flip_each_bit(
        Field::POS,
        |record, bit, e| matches!(e, LogError::WrongPosition { recorded, .. } if *recorded == record.pos ^ (1 << bit)),
    );
}

// ---------------------------------------------------------------------------------------
// Truncation and absurd lengths
// ---------------------------------------------------------------------------------------

#[test]
fn a_head_inside_a_record_stops_the_scan_at_that_record() {
    let log = Damaged::new();
    for seq in targets(&log) {
        let record = log.record(seq).clone();
        let size = record.end_pos - record.pos;
        // Into the header, to the payload's start, into the payload, one word short.
        for delta in [8, 16, 24, 32, 40, size - 8] {
            if delta >= size {
                continue;
            }
            // Whether the head claims the record complete (its seq) or not (the one before),
            // the record it cuts is the one named.
            for head_seq in [seq, seq - 1] {
                let context = format!("head (seq {head_seq}) {delta} bytes into record {seq}");
                let head = Cursor {
                    seq: head_seq,
                    pos: record.pos + delta,
                };
                log.raw.publish_head(head);
                if (head.seq - log.flushed.seq) * 32 > head.pos - log.flushed.pos {
                    // The cursors alone are impossible (more records than bytes for them):
                    // refused before any record is read.
                    let results = log.scan();
                    assert!(
                        matches!(results[..], [Err(LogError::BadCursors { .. })]),
                        "{context}: {results:?}"
                    );
                    continue;
                }
                let error = log.assert_stops_at(seq, &context);
                assert!(
                    matches!(error, LogError::BadLength { .. }),
                    "{context}: {error:?}"
                );
                let report = log.inspect();
                assert_eq!(report.head.map(|h| h.pos), Some(record.pos + delta));
            }
        }
    }
    log.raw.publish_head(log.head);
    log.assert_intact();
}

#[test]
fn a_zeroed_payload_tail_is_a_crc_error() {
    let log = Damaged::new();
    for seq in targets(&log) {
        let len = log.payload_len(seq);
        let cut = len.min(24);
        let at = log.payload_offset(seq) + len - cut;
        let saved = log.raw.read(at, cut as usize);
        log.raw.write(at, &vec![0u8; cut as usize]);
        let error = log.assert_stops_at(seq, &format!("record {seq} zeroed tail"));
        assert!(matches!(error, LogError::BadCrc { .. }), "{error:?}");
        log.raw.write(at, &saved);
        log.assert_intact();
    }
}

#[test]
fn absurd_lengths_are_bad_lengths_not_huge_allocations() {
    let log = Damaged::new();
    let max = log.region.geometry().max_payload;
    let set_len = |seq: u64, len: u32| {
        log.raw
            .write(log.offset(seq, Field::LEN.offset), &len.to_le_bytes());
    };
    let check = |seq: u64, len: u32, limit: u64, why: &str| {
        let original = log.raw.read(log.offset(seq, Field::LEN.offset), 4);
        set_len(seq, len);
        let context = format!("record {seq} with length {len}");
        let error = log.assert_stops_at(seq, &context);
        match &error {
            LogError::BadLength {
                len: l,
                limit: lim,
                why: w,
                ..
            } => {
                assert_eq!(*l, u64::from(len), "{context}");
                assert_eq!(*lim, limit, "{context}");
                assert!(w.contains(why), "{context}: {w}");
            }
            other => panic!("{context}: {other:?}"),
        }
        log.raw.write(log.offset(seq, Field::LEN.offset), &original);
        log.assert_intact();
    };
    let [first, middle, last] = targets(&log);
    for seq in [first, middle, last] {
        check(seq, u32::MAX, max, "record limit");
        check(seq, max as u32 + 1, max, "record limit");
    }
    // C exactly fills the ring's end: one word more runs past it.
    let c = log.record(first);
    let room = c.end_pos - c.pos - RECORD_HEADER_LEN as u64;
    check(first, room as u32 + 1, room, "ring's end");
    check(first, max as u32, room, "ring's end");
    // The last record: anything longer runs past the head.
    let l = log.record(last);
    let room = l.end_pos - l.pos - RECORD_HEADER_LEN as u64;
    check(last, room as u32 + 8, room, "head");
    check(last, 5000, room, "head");
}

// ---------------------------------------------------------------------------------------
// A writer that died mid-append
// ---------------------------------------------------------------------------------------

#[test]
fn a_torn_tail_is_reported_but_not_scanned() {
    let log = Damaged::new();
    let head = log.head;
    let g = log.region.geometry();
    // A well-formed record for seq head+1 at the head, of which only part of the payload
    // made it to the ring before the writer died. The head was never published.
    let mut payload = vec![0u8; WRITE_PREFIX_LEN];
    payload.extend(data_of(99, 484));
    let header = header(
        RecordKind::Write,
        head.seq + 1,
        payload.len() as u32,
        head.pos,
        &payload,
    );
    let at = g.ring_offset + head.pos % g.ring_size;
    log.raw.write(at, &header);
    log.raw.write(at + 32, &payload[..100]);

    log.assert_intact();
    let report = log.inspect();
    assert_eq!(report.problem, None);
    assert_eq!(
        report.unpublished_tail,
        Some(UnpublishedTail {
            seq: head.seq + 1,
            pos: head.pos,
            payload_len: payload.len() as u32,
        })
    );
    // A writer that takes over appends over the torn record with the same seq.
    let mut w = log.region.writer(8).unwrap();
    let appended = w
        .appender
        .try_append(&Entry::Write {
            export: 1,
            offset: 2,
            data: &[3; 40],
        })
        .unwrap();
    assert_eq!((appended.seq, appended.pos), (head.seq + 1, head.pos));
    let scanned: Vec<Record> = log.scan().into_iter().map(Result::unwrap).collect();
    assert_eq!(scanned.len(), log.records.len() + 1);
    assert_eq!(log.inspect().unpublished_tail, None);
}

#[test]
fn a_torn_tail_behind_a_wrap_marker_is_reported() {
    let log = Damaged::new();
    let g = log.region.geometry();
    let ring = g.ring_size;
    // Pretend the last published record ended 64 bytes before the ring's end: flush
    // everything and move both cursors there (a fresh log in that state looks the same).
    let end = Cursor {
        seq: log.head.seq,
        pos: 2 * ring - 64,
    };
    log.raw.publish_head(end);
    log.raw.publish_flushed(end);
    // The dead writer wrote a wrap marker there and began the record at the next lap.
    let marker = header(RecordKind::Wrap, end.seq + 1, 0, end.pos, &[]);
    log.raw.write(g.ring_offset + ring - 64, &marker);
    let payload = vec![7u8; 200];
    let header = header(RecordKind::Write, end.seq + 1, 200, 2 * ring, &payload);
    log.raw.write(g.ring_offset, &header);
    log.raw.write(g.ring_offset + 32, &payload[..50]);

    assert_eq!(log.scan(), []);
    let report = log.inspect();
    assert_eq!(report.problem, None);
    assert_eq!(report.records, []);
    assert_eq!(
        report.unpublished_tail,
        Some(UnpublishedTail {
            seq: end.seq + 1,
            pos: 2 * ring,
            payload_len: 200,
        })
    );
}

// ---------------------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------------------

#[test]
fn inconsistent_cursors_are_an_error_not_a_panic() {
    let log = Damaged::new();
    let bad_pairs = [
        // Flushed past head.
        (log.head, log.flushed),
        // More than a ring apart.
        (
            log.flushed,
            Cursor {
                seq: log.head.seq,
                pos: log.flushed.pos + 2 * log.region.geometry().ring_size,
            },
        ),
        // Unaligned.
        (
            log.flushed,
            Cursor {
                seq: log.head.seq,
                pos: log.head.pos - 3,
            },
        ),
        // More records than bytes.
        (
            log.flushed,
            Cursor {
                seq: log.head.seq + 10_000,
                pos: log.head.pos,
            },
        ),
    ];
    for (flushed, head) in bad_pairs {
        log.raw.publish_flushed(flushed);
        log.raw.publish_head(head);
        let results = log.scan();
        assert_eq!(results.len(), 1, "{flushed:?} {head:?}: {results:?}");
        let error = results[0].clone().unwrap_err();
        assert!(
            matches!(error, LogError::BadCursors { .. }),
            "{flushed:?} {head:?}: {error:?}"
        );
        let report = log.inspect();
        assert!(report.problem.is_some(), "{flushed:?} {head:?}");
        assert_eq!(report.records, []);
    }
    // Head claims more records than there are: the scan returns them all, then says so.
    log.raw.publish_flushed(log.flushed);
    log.raw.publish_head(Cursor {
        seq: log.head.seq + 1,
        pos: log.head.pos,
    });
    let results = log.scan();
    assert_eq!(results.len(), log.records.len() + 1);
    assert!(matches!(
        results.last().unwrap(),
        Err(LogError::HeadMismatch { .. })
    ));
    log.raw.publish_head(log.head);
    log.assert_intact();
}

/// The highest record-aligned log position.
const TOP_POS: u64 = !7;

/// A region whose cursors sit at the very top of the position space (corrupt words: a
/// real log never gets there) must give an error, not an arithmetic overflow.
fn top_of_position_space(region_size: u64, write: impl Fn(&Raw, u64, u64)) -> NodeReport {
    let (file, region) = RegionFile::format(region_size, 0, "a");
    let g = region.geometry();
    write(&file.raw(), g.ring_offset, g.ring_size);
    if let Ok(scanner) = region.unflushed() {
        for item in scanner.take(100) {
            let _ = item;
        }
    }
    let head = region.head().unwrap();
    for from in [Cursor::default(), region.flushed().unwrap()] {
        for item in LogScanner::new(region.mapping(), g, from, head).take(100) {
            let _ = item;
        }
    }
    file.inspect()
}

/// BUG(shm): `inspect`'s `unpublished_tail` (src/inspect.rs, `pos += remaining_in_ring`)
/// overflows when a garbage head cursor sits in the last words of the position space and
/// the ring size divides 2^64 (an 8 KiB region): a panic in debug builds.
#[test]
fn a_garbage_head_at_the_top_of_the_position_space_is_inspected_without_overflow() {
    let report = top_of_position_space(8192, |raw, _, _| {
        raw.publish(node_live::HEAD.offset(), [5, TOP_POS]);
    });
    assert!(report.problem.is_some());
}

/// BUG(shm): the scanner's `next.pos += remaining` after a wrap marker (src/log/scan.rs)
/// overflows when the marker sits in the last partial lap of the position space.
#[test]
fn a_wrap_marker_at_the_top_of_the_position_space_is_an_error_not_an_overflow() {
    let report = top_of_position_space(REGION_SIZE, |raw, ring_offset, ring| {
        // The last lap that fits in u64 ends 2^64 mod ring bytes short of its ring's end.
        let lap_start = u64::MAX - u64::MAX % ring;
        let pos = lap_start + 64;
        let flushed = Cursor { seq: 0, pos };
        let head = Cursor {
            seq: 1,
            pos: TOP_POS,
        };
        assert!(head.pos - flushed.pos <= ring);
        raw.write(ring_offset + 64, &header(RecordKind::Wrap, 1, 0, pos, &[]));
        raw.publish_flushed(flushed);
        raw.publish_head(head);
    });
    assert!(report.problem.is_some());
}

/// BUG(shm): the scanner's `pos + size > self.end.pos` (src/log/scan.rs) overflows for a
/// record whose end would lie past 2^64.
#[test]
fn a_record_at_the_top_of_the_position_space_is_an_error_not_an_overflow() {
    let report = top_of_position_space(8192, |raw, ring_offset, ring| {
        // Ring of 4096 bytes: the last lap ends exactly at 2^64. A 128-byte record in its
        // last 128 bytes would end at 2^64.
        let pos = 0u64.wrapping_sub(128);
        let payload = vec![1u8; 96];
        let at = ring_offset + pos % ring;
        raw.write(at, &header(RecordKind::Write, 1, 96, pos, &payload));
        raw.write(at + 32, &payload);
        raw.publish(node_live::FLUSHED.offset(), [0, pos]);
        raw.publish(node_live::HEAD.offset(), [1, TOP_POS]);
    });
    assert!(report.problem.is_some());
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

#[test]
fn a_header_from_another_version_is_refused_by_its_version() {
    let log = Damaged::new();
    for version in [0, FORMAT_VERSION + 1, u32::MAX] {
        log.raw
            .write(node_header::VERSION as u64, &version.to_le_bytes());
        reseal_static_header(&log.raw);
        let error = NodeRegion::open(log.file.mapping(Access::ReadOnly)).unwrap_err();
        assert!(
            matches!(
                &error,
                NodeError::Header {
                    source: HeaderError::Version { found, supported },
                    ..
                } if *found == version && *supported == FORMAT_VERSION
            ),
            "{error:?}"
        );
        let message = wire::error_chain::one_line(&error);
        assert!(message.contains("version"), "{message}");
        let report = log.inspect();
        assert!(report.header.is_none());
        let problem = report.problem.unwrap();
        assert_eq!(problem.seq, None);
        assert!(problem.message.contains("version"), "{}", problem.message);
        // Still recognised as a node region by its magic, but not identified.
        let mapping = log.file.mapping(Access::ReadOnly);
        assert_eq!(identify(&mapping), RegionKind::Unknown);
        assert!(matches!(
            inspect(mapping, InspectOptions::default()),
            RegionReport::Node(_)
        ));
    }
    log.raw
        .write(node_header::VERSION as u64, &FORMAT_VERSION.to_le_bytes());
    reseal_static_header(&log.raw);
    log.assert_intact();
}

#[test]
fn a_static_header_with_a_bad_crc_is_refused() {
    let log = Damaged::new();
    // A field (the name), then the crc itself.
    for offset in [
        node_header::NAME as u64,
        STATIC_HEADER_CRC_OFFSET as u64 + 2,
    ] {
        log.raw.flip_bit(offset, 4);
        let error = NodeRegion::open(log.file.mapping(Access::ReadOnly)).unwrap_err();
        assert!(
            matches!(
                &error,
                NodeError::Header {
                    source: HeaderError::Crc { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            wire::error_chain::one_line(&error).contains("checksum"),
            "{error}"
        );
        let report = log.inspect();
        assert!(report.header.is_none());
        assert!(report.problem.unwrap().message.contains("checksum"));
        log.raw.flip_bit(offset, 4);
        log.assert_intact();
    }
}

#[test]
fn a_file_of_garbage_is_an_unknown_region_with_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..REGION_SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let mapping = || Mapping::open(&path, Access::ReadOnly).unwrap();
    match inspect(mapping(), InspectOptions::default()) {
        RegionReport::Unknown { problem, size, .. } => {
            assert_eq!(size, REGION_SIZE);
            assert_eq!(problem.seq, None);
            assert!(
                problem.message.contains("not an ivha region"),
                "{}",
                problem.message
            );
        }
        other => panic!("garbage was decoded as {other:?}"),
    }
    assert_eq!(identify(&mapping()), RegionKind::Unknown);
    assert!(NodeRegion::open(mapping()).is_err());
    assert!(ControlRegion::open(mapping()).is_err());

    // Garbage behind a node magic: a node report that names the header problem.
    let mut bytes = bytes;
    bytes[..8].copy_from_slice(b"IVHANODE");
    std::fs::write(&path, &bytes).unwrap();
    match inspect(mapping(), InspectOptions::default()) {
        RegionReport::Node(report) => {
            assert!(report.header.is_none());
            assert!(report.problem.is_some());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_control_region_with_a_flipped_name_byte_is_refused_by_its_crc() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.region");
    ControlRegion::format(
        Mapping::create_file(&path, 65536).unwrap(),
        &["alpha", "beta"],
        &["vol0"],
    )
    .unwrap();
    let raw = Raw::open(&path);
    let open = || ControlRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap());
    let name_bytes = [
        control_names::NODES,
        control_names::NODES + 16 + 3,
        control_names::IDENTITIES,
        // A byte of an unused name slot is covered too.
        control_names::IDENTITIES + 7 * 16,
    ];
    for offset in name_bytes {
        raw.flip_bit(offset, 1);
        let error = open().unwrap_err();
        assert!(
            matches!(
                &error,
                ControlError::Header {
                    source: HeaderError::NameTableCrc { .. },
                    ..
                }
            ),
            "byte {offset}: {error:?}"
        );
        match inspect(
            Mapping::open(&path, Access::ReadOnly).unwrap(),
            InspectOptions::default(),
        ) {
            RegionReport::Control(report) => {
                assert!(report.header.is_none());
                assert!(report.problem.unwrap().message.contains("checksum"));
            }
            other => panic!("{other:?}"),
        }
        raw.flip_bit(offset, 1);
        assert_eq!(open().unwrap().header().nodes, ["alpha", "beta"]);
    }
}

#[test]
fn footprints_used_here_match_the_format() {
    // The fixture's arithmetic relies on these.
    assert_eq!(RECORD_HEADER_LEN, 32);
    assert_eq!(footprint(16), 48);
    assert_eq!(footprint(16 + 60), 112);
}

#[test]
fn record_headers_used_here_match_the_format() {
    // The field table above covers the header exactly, field after field.
    let mut next = 0;
    for field in Field::ALL {
        assert_eq!(field.offset, next, "{}", field.name);
        next += u64::from(field.bits / 8);
    }
    assert_eq!(next, RECORD_HEADER_LEN as u64);
    // Each field's bytes hold its little-endian value.
    let (seq, pos) = (0x0102_0304_0506_0708, 0x1122_3344_5566_7788);
    let payload = [5u8; 24];
    let bytes = header(RecordKind::Trim, seq, 24, pos, &payload);
    let crc = RecordHeader::decode(&bytes).crc;
    for (field, value) in Field::ALL.into_iter().zip([
        u64::from(RECORD_MAGIC),
        u64::from(RecordKind::Trim.code()),
        0,
        seq,
        24,
        u64::from(crc),
        pos,
    ]) {
        let at = field.offset as usize;
        let width = field.bits as usize / 8;
        assert_eq!(
            bytes[at..at + width],
            value.to_le_bytes()[..width],
            "{}",
            field.name
        );
    }
    assert_eq!(&bytes[..4], b"IVLR");
    // The crc, computed here and not by the library: crc32c of the header with its crc
    // field zeroed, then of the payload.
    let mut zeroed = bytes;
    zeroed[20..24].fill(0);
    assert_eq!(
        crc,
        crc32c::crc32c_append(crc32c::crc32c(&zeroed), &payload)
    );
}
