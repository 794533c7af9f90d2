//! The on-ring format of one log record.
//!
//! ```text
//! 0   magic   u32  "IVLR"
//! 4   kind    u16  1 write, 2 trim, 3 write-zeroes, 0xfffe wrap marker
//! 6   flags   u16  0
//! 8   seq     u64  1, 2, 3, ... (a wrap marker carries the seq of the record after it)
//! 16  len     u32  payload bytes
//! 20  crc     u32  crc32c of these 32 bytes (crc field zeroed) and the payload
//! 24  pos     u64  log position of this record: a record read from a stale lap of the
//!                  ring names another position and is rejected
//! 32  payload, then zero padding to a multiple of 8
//! ```
//!
//! Payloads: a write is `export u32, 0 u32, offset u64, data`; a trim or write-zeroes is
//! `export u32, 0 u32, offset u64, length u64`.

use serde::Serialize;

/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 8;
/// Bytes of a write payload before its data.
pub const WRITE_PREFIX_LEN: usize = 16;
/// Bytes of a trim or write-zeroes payload.
pub const RANGE_PAYLOAD_LEN: usize = 24;

/// The first four bytes of every record header.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"IVLR");

/// What a record asks the flusher (or a replaying partner) to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// Write data at an offset of an export's disk.
    Write,
    /// Discard a range (the disk may keep or drop it).
    Trim,
    /// Write zeroes over a range.
    WriteZeroes,
    /// Not a record: the writer skipped the rest of the ring and went on at its start.
    Wrap,
}

impl RecordKind {
    pub fn code(self) -> u16 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Trim => 2,
            RecordKind::WriteZeroes => 3,
            RecordKind::Wrap => 0xfffe,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Trim),
            3 => Some(RecordKind::WriteZeroes),
            0xfffe => Some(RecordKind::Wrap),
            _ => None,
        }
    }
}

/// A decoded record header. Nothing in it is trusted until [`RecordHeader::check`] says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub magic: u32,
    pub kind_code: u16,
    pub flags: u16,
    pub seq: u64,
    pub len: u32,
    pub crc: u32,
    pub pos: u64,
}

impl RecordHeader {
    pub fn new(kind: RecordKind, seq: u64, len: u32, pos: u64) -> Self {
        Self {
            magic: RECORD_MAGIC,
            kind_code: kind.code(),
            flags: 0,
            seq,
            len,
            crc: 0,
            pos,
        }
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.kind_code.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.pos.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(array8(&b[o..o + 8]));
        Self {
            magic: u32_at(0),
            kind_code: u16_at(4),
            flags: u16_at(6),
            seq: u64_at(8),
            len: u32_at(16),
            crc: u32_at(20),
            pos: u64_at(24),
        }
    }

    /// The crc32c this header and `payload` should carry.
    pub fn compute_crc(&self, payload: &[u8]) -> u32 {
        self.compute_crc_parts(&[payload])
    }

    /// The crc32c this header should carry for a payload given in consecutive parts.
    pub fn compute_crc_parts(&self, parts: &[&[u8]]) -> u32 {
        let mut zeroed = *self;
        zeroed.crc = 0;
        let crc = crc32c::crc32c(&zeroed.encode());
        parts
            .iter()
            .fold(crc, |crc, part| crc32c::crc32c_append(crc, part))
    }

    /// Whether the magic is right (a cheap first test of "is this a record at all").
    pub fn has_magic(&self) -> bool {
        self.magic == RECORD_MAGIC
    }
}

/// Bytes a record with a `len`-byte payload occupies in the ring.
pub fn footprint(len: u64) -> u64 {
    (RECORD_HEADER_LEN as u64 + len).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// A record to append. Borrowing the data keeps the write path free of copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    Write {
        export: u32,
        offset: u64,
        data: &'a [u8],
    },
    Trim {
        export: u32,
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        export: u32,
        offset: u64,
        len: u64,
    },
}

impl Entry<'_> {
    pub fn kind(&self) -> RecordKind {
        match self {
            Entry::Write { .. } => RecordKind::Write,
            Entry::Trim { .. } => RecordKind::Trim,
            Entry::WriteZeroes { .. } => RecordKind::WriteZeroes,
        }
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> u64 {
        match self {
            Entry::Write { data, .. } => (WRITE_PREFIX_LEN + data.len()) as u64,
            Entry::Trim { .. } | Entry::WriteZeroes { .. } => RANGE_PAYLOAD_LEN as u64,
        }
    }

    /// The fixed part of the payload (all of it for ranges), and the data that follows it.
    pub fn payload_parts(&self) -> ([u8; RANGE_PAYLOAD_LEN], usize, &[u8]) {
        let mut fixed = [0u8; RANGE_PAYLOAD_LEN];
        match *self {
            Entry::Write {
                export,
                offset,
                data,
            } => {
                fixed[0..4].copy_from_slice(&export.to_le_bytes());
                fixed[8..16].copy_from_slice(&offset.to_le_bytes());
                (fixed, WRITE_PREFIX_LEN, data)
            }
            Entry::Trim {
                export,
                offset,
                len,
            }
            | Entry::WriteZeroes {
                export,
                offset,
                len,
            } => {
                fixed[0..4].copy_from_slice(&export.to_le_bytes());
                fixed[8..16].copy_from_slice(&offset.to_le_bytes());
                fixed[16..24].copy_from_slice(&len.to_le_bytes());
                (fixed, RANGE_PAYLOAD_LEN, &[])
            }
        }
    }
}

/// A record read back from the ring, crc verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Log position of the record's header.
    pub pos: u64,
    pub kind: RecordKind,
    pub export: u32,
    /// Byte offset on the export's disk.
    pub offset: u64,
    /// Bytes affected on the disk (data length for a write).
    pub len: u64,
    /// The data of a write; empty for other kinds.
    pub data: Vec<u8>,
    /// Log position of the data (where it stays until the flushed cursor passes it).
    pub data_pos: u64,
    /// Log position just past the record.
    pub end_pos: u64,
}

impl Record {
    /// The cursor just past this record: what the flusher publishes once it is on disk.
    pub fn end(&self) -> super::Cursor {
        super::Cursor {
            seq: self.seq,
            pos: self.end_pos,
        }
    }

    /// Borrowed view, as it was appended.
    pub fn entry(&self) -> Entry<'_> {
        match self.kind {
            RecordKind::Trim => Entry::Trim {
                export: self.export,
                offset: self.offset,
                len: self.len,
            },
            RecordKind::WriteZeroes => Entry::WriteZeroes {
                export: self.export,
                offset: self.offset,
                len: self.len,
            },
            RecordKind::Write | RecordKind::Wrap => Entry::Write {
                export: self.export,
                offset: self.offset,
                data: &self.data,
            },
        }
    }

    /// Decodes a payload whose crc was already checked, read as its fixed part (up to
    /// [`Record::fixed_len`] bytes) and the rest. `None` if its shape is wrong for its kind
    /// (a bug in the writer, or a crc collision on garbage). Public for the fuzz targets
    /// (`fuzz/`) only.
    #[doc(hidden)]
    pub fn from_parts(
        seq: u64,
        pos: u64,
        kind: RecordKind,
        fixed: &[u8],
        rest: Vec<u8>,
    ) -> Option<Self> {
        let end_pos = pos + footprint((fixed.len() + rest.len()) as u64);
        let export = u32::from_le_bytes(fixed.get(0..4)?.try_into().ok()?);
        // The word after the export is always written as zero: anything else is not a record
        // this writer made (and would not re-encode to the bytes it came from).
        if fixed.get(4..8)? != [0; 4] {
            return None;
        }
        let offset = u64::from_le_bytes(array8(fixed.get(8..16)?));
        let (len, data) = match kind {
            RecordKind::Write if fixed.len() == WRITE_PREFIX_LEN => (rest.len() as u64, rest),
            RecordKind::Trim | RecordKind::WriteZeroes
                if fixed.len() == RANGE_PAYLOAD_LEN && rest.is_empty() =>
            {
                (u64::from_le_bytes(array8(&fixed[16..24])), Vec::new())
            }
            _ => return None,
        };
        Some(Self {
            seq,
            pos,
            kind,
            export,
            offset,
            len,
            data,
            data_pos: pos + (RECORD_HEADER_LEN + fixed.len()) as u64,
            end_pos,
        })
    }

    /// Like [`Record::from_parts`] for a payload of `payload_len` bytes whose data was not
    /// read: `data` stays empty while `len` and the positions are those of the whole record.
    /// Only for [`super::scan::Extent`]s, which carry no data.
    pub(crate) fn from_parts_without_data(
        seq: u64,
        pos: u64,
        kind: RecordKind,
        fixed: &[u8],
        payload_len: usize,
    ) -> Option<Self> {
        let data_len = payload_len.checked_sub(fixed.len())?;
        let mut record = match kind {
            // The shape checks of a write do not depend on its data.
            RecordKind::Write => Self::from_parts(seq, pos, kind, fixed, Vec::new())?,
            _ if data_len == 0 => return Self::from_parts(seq, pos, kind, fixed, Vec::new()),
            _ => return None,
        };
        record.len = data_len as u64;
        record.end_pos = pos + footprint(payload_len as u64);
        Some(record)
    }

    /// Bytes of a payload of `len` bytes that come before a write's data: scanners read
    /// them apart, so the data lands in its own buffer without being moved. Public for the
    /// fuzz targets (`fuzz/`) only.
    #[doc(hidden)]
    pub fn fixed_len(kind: RecordKind, len: usize) -> usize {
        match kind {
            RecordKind::Write => WRITE_PREFIX_LEN.min(len),
            _ => RANGE_PAYLOAD_LEN.min(len),
        }
    }
}

fn array8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_crc_covers_every_field() {
        let h = RecordHeader::new(RecordKind::Write, 42, 100, 4096);
        assert_eq!(RecordHeader::decode(&h.encode()), h);
        let payload = [7u8; 100];
        let crc = h.compute_crc(&payload);
        for field in 0..6 {
            let mut changed = h;
            match field {
                0 => changed.kind_code = RecordKind::Trim.code(),
                1 => changed.seq += 1,
                2 => changed.len += 1,
                3 => changed.pos += 8,
                4 => changed.flags = 1,
                _ => changed.magic ^= 1,
            }
            assert_ne!(changed.compute_crc(&payload), crc, "field {field}");
        }
        let mut other = payload;
        other[99] ^= 0x80;
        assert_ne!(h.compute_crc(&other), crc);
        // The crc field itself does not feed the crc.
        let mut with_crc = h;
        with_crc.crc = crc;
        assert_eq!(with_crc.compute_crc(&payload), crc);
    }

    #[test]
    fn footprints_are_aligned() {
        assert_eq!(footprint(0), 32);
        assert_eq!(footprint(1), 40);
        assert_eq!(footprint(8), 40);
        assert_eq!(footprint(9), 48);
    }

    #[test]
    fn unknown_kind_codes_are_not_kinds() {
        for k in [
            RecordKind::Write,
            RecordKind::Trim,
            RecordKind::WriteZeroes,
            RecordKind::Wrap,
        ] {
            assert_eq!(RecordKind::from_code(k.code()), Some(k));
        }
        assert_eq!(RecordKind::from_code(0), None);
        assert_eq!(RecordKind::from_code(4), None);
    }

    #[test]
    fn malformed_payloads_do_not_decode() {
        let parts = |kind, len: usize| {
            let fixed_len = Record::fixed_len(kind, len);
            Record::from_parts(1, 0, kind, &vec![0; fixed_len], vec![0; len - fixed_len])
        };
        assert!(parts(RecordKind::Write, 15).is_none());
        assert!(parts(RecordKind::Trim, 16).is_none());
        assert!(parts(RecordKind::WriteZeroes, 25).is_none());
        assert!(parts(RecordKind::Wrap, 24).is_none());
        assert!(parts(RecordKind::Write, 16).unwrap().data.is_empty());
        let r = parts(RecordKind::Write, 16 + 4096).unwrap();
        assert_eq!((r.len, r.data.len()), (4096, 4096));
        assert_eq!(parts(RecordKind::Trim, 24).unwrap().len, 0);
    }

    #[test]
    fn a_payload_whose_reserved_word_is_not_zero_does_not_decode() {
        // Found by fuzzing (fuzz target log_record): a write whose payload's second word (after
        // the export, always written as zero) was not zero decoded, and re-encoded to other
        // bytes than the ones whose crc was checked.
        let fixed = [
            0, 0, 0, 40, 0, 0, 254, 255, 255, 255, 255, 255, 255, 255, 0, 0,
        ];
        assert!(Record::from_parts(1, 0, RecordKind::Write, &fixed, vec![0xca; 32]).is_none());
        let mut range = [0u8; RANGE_PAYLOAD_LEN];
        range[7] = 1;
        assert!(Record::from_parts(1, 0, RecordKind::Trim, &range, Vec::new()).is_none());
        range[7] = 0;
        assert!(Record::from_parts(1, 0, RecordKind::Trim, &range, Vec::new()).is_some());
    }
}
