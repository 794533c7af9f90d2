//! The log scanner (`shm::LogScanner`), as a replaying partner, the flusher and `inspect`
//! run it: over a ring of untrusted bytes between two untrusted cursors.
//! Input: flushed seq, flushed pos, head seq, head pos (u64 LE each), largest payload (u32
//! LE), then the ring's bytes (12 KiB ring at offset 4096 of a 16 KiB region).
//! Properties: records come in seq order from the flushed cursor, inside [flushed, head),
//! within the payload limit; each re-encodes (header with its crc, payload) to the bytes in
//! the ring; a scan that ends without error ends at the head; the headers-only scan
//! (`extents`) returns the same records' extents, up to where the full scan stopped (or
//! further: it does not check crcs), and never past the head.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use ivha_fuzz::{REGION_SIZE, u64_at};
use libfuzzer_sys::fuzz_target;
use shm::layout::HEADER_PAGE;
use shm::log::record::{RECORD_HEADER_LEN, RecordHeader};
use shm::{Cursor, Geometry, LogScanner, Mapping, RecordKind};

const PARAMS: usize = 36;
const RING: u64 = REGION_SIZE - HEADER_PAGE;

fn region() -> &'static Mapping {
    static REGION: OnceLock<Mapping> = OnceLock::new();
    REGION.get_or_init(|| Mapping::create_memfd("fuzz-log", REGION_SIZE).expect("memfd"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < PARAMS {
        return;
    }
    let from = Cursor {
        seq: u64_at(data, 0),
        pos: u64_at(data, 8),
    };
    let to = Cursor {
        seq: u64_at(data, 16),
        pos: u64_at(data, 24),
    };
    let max_payload = u64::from(u32::from_le_bytes(data[32..36].try_into().expect("4")));
    let mut ring = vec![0u8; RING as usize];
    let given = &data[PARAMS..];
    ring[..given.len().min(RING as usize)]
        .copy_from_slice(&given[..given.len().min(RING as usize)]);
    let mapping = region();
    mapping
        .file()
        .write_all_at(&ring, HEADER_PAGE)
        .expect("write ring");
    let geometry = Geometry {
        ring_offset: HEADER_PAGE,
        ring_size: RING,
        max_payload,
    };
    let mut scan = LogScanner::new(mapping, geometry, from, to);
    let mut last = from;
    let mut clean = true;
    let mut extents = LogScanner::new(mapping, geometry, from, to).extents();
    for item in scan.by_ref() {
        let Ok(record) = item else {
            clean = false;
            continue;
        };
        let extent = extents
            .next()
            .and_then(Result::ok)
            .expect("the headers-only scan returns every record the full scan does");
        assert_eq!(
            (
                extent.seq,
                extent.kind,
                extent.export,
                extent.offset,
                extent.len,
                extent.data_pos
            ),
            (
                record.seq,
                record.kind,
                record.export,
                record.offset,
                record.len,
                record.data_pos
            ),
            "extent of record {}",
            record.seq
        );
        assert_eq!(record.seq, last.seq + 1, "seq order");
        assert!(
            record.pos >= last.pos && record.end_pos <= to.pos,
            "{record:?}"
        );
        assert!(record.data.len() as u64 <= max_payload);
        // Re-encode and compare with the ring.
        let entry = record.entry();
        let (fixed, fixed_len, rest) = entry.payload_parts();
        let mut header = RecordHeader::new(
            record.kind,
            record.seq,
            entry.payload_len() as u32,
            record.pos,
        );
        header.crc = header.compute_crc_parts(&[&fixed[..fixed_len], rest]);
        let at = (record.pos % RING) as usize;
        assert_eq!(
            header.encode()[..],
            ring[at..at + RECORD_HEADER_LEN],
            "header"
        );
        let payload_at = at + RECORD_HEADER_LEN;
        assert_eq!(
            fixed[..fixed_len],
            ring[payload_at..payload_at + fixed_len],
            "fixed part"
        );
        let data_at = payload_at + fixed_len;
        assert_eq!(rest, &ring[data_at..data_at + rest.len()], "data");
        last = record.end();
    }
    if clean {
        assert_eq!(scan.position(), to, "a clean scan ends at the head");
        assert!(extents.next().is_none(), "nothing past a clean scan's end");
    }
    for extent in extents.flatten() {
        assert!(
            extent.kind != RecordKind::Write || extent.data_pos + extent.len <= to.pos,
            "a write's data past the head: {extent:?}"
        );
    }
});
