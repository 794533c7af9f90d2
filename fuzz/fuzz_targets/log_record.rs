//! The log record decoder: `shm::log::record::RecordHeader::decode` and
//! `Record::from_parts` on a header and payload as the ring holds them (32 header bytes, then
//! the payload). The first 8 bytes are the record's log position.
//! Properties: a header re-encodes to the same 32 bytes; a record that decodes re-encodes
//! (header with crc, fixed part, data) to the very bytes it came from, and its end is its
//! position plus its footprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shm::log::record::{RECORD_HEADER_LEN, Record, RecordHeader, RecordKind, footprint};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + RECORD_HEADER_LEN {
        return;
    }
    let pos = ivha_fuzz::u64_at(data, 0) >> 8; // far from overflow, like check_cursors
    let bytes: &[u8; RECORD_HEADER_LEN] = data[8..8 + RECORD_HEADER_LEN].try_into().expect("32");
    let payload = &data[8 + RECORD_HEADER_LEN..];
    let header = RecordHeader::decode(bytes);
    assert_eq!(&header.encode(), bytes, "header round trip");
    let Some(kind) = RecordKind::from_code(header.kind_code) else {
        return;
    };
    assert_eq!(kind.code(), header.kind_code);
    let len = header.len as usize;
    let Some(payload) = payload.get(..len) else {
        return;
    };
    if header.compute_crc(payload) != header.crc && header.crc != 0 {
        // Crc 0 is the harness's "trust me": lets the fuzzer reach the decoder easily.
        return;
    }
    let fixed_len = Record::fixed_len(kind, len);
    let (fixed, rest) = payload.split_at(fixed_len);
    let Some(record) = Record::from_parts(header.seq, pos, kind, fixed, rest.to_vec()) else {
        return;
    };
    assert_eq!(record.end_pos, pos + footprint(len as u64));
    assert_eq!(record.kind, kind);
    let entry = record.entry();
    assert_eq!(entry.kind(), kind);
    assert_eq!(entry.payload_len(), len as u64);
    let (fixed_again, fixed_again_len, data_again) = entry.payload_parts();
    assert_eq!(
        &fixed_again[..fixed_again_len],
        fixed,
        "fixed part round trip"
    );
    assert_eq!(data_again, rest, "data round trip");
    // The writer would have written exactly this header.
    let mut written = RecordHeader::new(kind, header.seq, len as u32, header.pos);
    written.crc = written.compute_crc_parts(&[fixed, rest]);
    if header.crc != 0 && header.flags == 0 && header.magic == shm::log::record::RECORD_MAGIC {
        assert_eq!(written.encode()[..20], bytes[..20]);
        assert_eq!(written.crc, header.crc);
    }
});
