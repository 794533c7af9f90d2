//! Reading records back: the flusher, a replaying partner and `inspect` all use this.

use super::record::{RANGE_PAYLOAD_LEN, RECORD_HEADER_LEN, RecordHeader, RecordKind, footprint};
use super::{Cursor, Geometry, LogError, Record};
use crate::layout::node_live;
use crate::mapping::Mapping;

/// Iterates over the records between two cursors, checking each one.
///
/// Nothing read from the ring is trusted: magic, position, seq continuity, kind, length
/// (against the log's limit, the ring's end and the end cursor) and crc are all checked
/// before a record is returned. The first bad record ends the scan with an error naming its
/// seq; the iterator returns `None` after that.
#[derive(Debug)]
pub struct LogScanner<'m> {
    mapping: &'m Mapping,
    geometry: Geometry,
    next: Cursor,
    end: Cursor,
    skip_before_seq: u64,
    pending_error: Option<LogError>,
    done: bool,
    /// Whether a write's data is read and crc-checked (see [`LogScanner::extents`]).
    read_data: bool,
}

/// Where a record's change lands and where its data lies, from its header and fixed part
/// alone: what a survivor needs to serve a dead node's log before it has replayed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub seq: u64,
    pub kind: RecordKind,
    pub export: u32,
    /// Byte offset on the export's disk.
    pub offset: u64,
    /// Bytes affected on the disk.
    pub len: u64,
    /// Log position of a write's data.
    pub data_pos: u64,
}

impl<'m> LogScanner<'m> {
    /// Scans from `from` (a record boundary, normally the flushed cursor) to `to` (normally
    /// the head), both read from the region by the caller.
    pub fn new(mapping: &'m Mapping, geometry: Geometry, from: Cursor, to: Cursor) -> Self {
        Self {
            mapping,
            geometry,
            next: from,
            end: to,
            skip_before_seq: 0,
            pending_error: geometry
                .validate(mapping.len())
                .map_err(LogError::BadGeometry)
                .and_then(|()| super::check_cursors(&geometry, from, to))
                .err(),
            done: false,
            read_data: true,
        }
    }

    /// Returns each record's extent without reading a write's data or checking its crc:
    /// everything else is checked as before. A record below the head was published whole
    /// (the head is stored after its payload), so only memory corruption could make its
    /// crc fail; a replay applying the data reads it again through a checking scan.
    pub fn extents(mut self) -> impl Iterator<Item = Result<Extent, LogError>> + 'm {
        self.read_data = false;
        self.map(|record| {
            record.map(|r| Extent {
                seq: r.seq,
                kind: r.kind,
                export: r.export,
                offset: r.offset,
                len: r.len,
                data_pos: r.data_pos,
            })
        })
    }

    /// Returns records without their data (left in the ring at `data_pos`, `data` empty)
    /// and without checking the data's crc; everything else is checked as before. For a
    /// reader that trusts these bytes as it trusts its own memory: the flusher, for records
    /// its own agent appended (a software crc costs a TCG guest about 7 ns a byte).
    pub fn without_data(mut self) -> Self {
        self.read_data = false;
        self
    }

    /// Skips (still checking) records whose seq is below `seq`.
    pub fn starting_at_seq(mut self, seq: u64) -> Self {
        self.skip_before_seq = seq;
        self
    }

    /// The cursor just past the last record returned (or skipped).
    pub fn position(&self) -> Cursor {
        self.next
    }

    /// Where the scan stops.
    pub fn end(&self) -> Cursor {
        self.end
    }

    fn read_record(&mut self) -> Result<Option<Record>, LogError> {
        loop {
            let expected = self.next.seq + 1;
            if self.next.pos >= self.end.pos {
                if self.next.seq != self.end.seq {
                    return Err(LogError::HeadMismatch {
                        last: self.next.seq,
                        head: self.end.seq,
                    });
                }
                return Ok(None);
            }
            let pos = self.next.pos;
            let remaining = self.geometry.remaining_in_ring(pos);
            // The writer goes on at the ring's start only if its head is there or past it.
            let wrap = |to: u64| LogError::WrapPastHead {
                pos,
                to,
                head: self.end.pos,
            };
            if remaining < RECORD_HEADER_LEN as u64 {
                // Too little room for a header: the writer went on at the ring's start.
                if pos + remaining > self.end.pos {
                    return Err(wrap(pos + remaining));
                }
                self.next.pos += remaining;
                continue;
            }
            let header = self.read_header(pos)?;
            if !header.has_magic() {
                return Err(LogError::BadMagic {
                    seq: expected,
                    pos,
                    magic: header.magic,
                });
            }
            if header.pos != pos {
                return Err(LogError::WrongPosition {
                    seq: expected,
                    pos,
                    recorded: header.pos,
                });
            }
            let Some(kind) = RecordKind::from_code(header.kind_code) else {
                return Err(LogError::UnknownKind {
                    seq: expected,
                    pos,
                    code: header.kind_code,
                });
            };
            if header.seq != expected {
                return Err(LogError::SeqGap {
                    seq: expected,
                    pos,
                    found: header.seq,
                });
            }
            if header.flags != 0 {
                return Err(LogError::UnknownFlags {
                    seq: expected,
                    pos,
                    flags: header.flags,
                });
            }
            let len = u64::from(header.len);
            let bad_length = |limit, why| LogError::BadLength {
                seq: expected,
                pos,
                len,
                limit,
                why,
            };
            if kind == RecordKind::Wrap {
                if len != 0 {
                    return Err(bad_length(0, "a wrap marker has no payload"));
                }
                self.check_crc(&header, pos, &[])?;
                if pos + remaining > self.end.pos {
                    return Err(wrap(pos + remaining));
                }
                self.next.pos += remaining;
                continue;
            }
            if len > self.geometry.max_payload {
                return Err(bad_length(
                    self.geometry.max_payload,
                    "the log's record limit",
                ));
            }
            let size = footprint(len);
            if size > remaining {
                return Err(bad_length(
                    remaining - RECORD_HEADER_LEN as u64,
                    "the room left before the ring's end",
                ));
            }
            if pos + size > self.end.pos {
                return Err(bad_length(
                    (self.end.pos - pos).saturating_sub(RECORD_HEADER_LEN as u64),
                    "the room left before the head",
                ));
            }
            // The fixed part and a write's data are read apart, so the data needs no move.
            let payload_at = pos + RECORD_HEADER_LEN as u64;
            let fixed_len = Record::fixed_len(kind, len as usize);
            let mut fixed = [0u8; RANGE_PAYLOAD_LEN];
            let fixed = &mut fixed[..fixed_len];
            if !self
                .mapping
                .read_bytes(self.geometry.region_offset(payload_at), fixed)
            {
                return Err(LogError::OutOfRegion);
            }
            let malformed = LogError::MalformedPayload {
                seq: expected,
                pos,
                kind,
            };
            let record = if self.read_data {
                let mut rest = vec![0u8; len as usize - fixed_len];
                if !self.mapping.read_bytes(
                    self.geometry.region_offset(payload_at + fixed_len as u64),
                    &mut rest,
                ) {
                    return Err(LogError::OutOfRegion);
                }
                self.check_crc(&header, pos, &[fixed, &rest])?;
                Record::from_parts(expected, pos, kind, fixed, rest).ok_or(malformed)?
            } else {
                Record::from_parts_without_data(expected, pos, kind, fixed, len as usize)
                    .ok_or(malformed)?
            };
            self.next = record.end();
            if record.seq >= self.skip_before_seq {
                return Ok(Some(record));
            }
        }
    }

    fn read_header(&self, pos: u64) -> Result<RecordHeader, LogError> {
        let mut bytes = [0u8; RECORD_HEADER_LEN];
        if !self
            .mapping
            .read_bytes(self.geometry.region_offset(pos), &mut bytes)
        {
            return Err(LogError::OutOfRegion);
        }
        Ok(RecordHeader::decode(&bytes))
    }

    fn check_crc(
        &self,
        header: &RecordHeader,
        pos: u64,
        payload: &[&[u8]],
    ) -> Result<(), LogError> {
        let computed = header.compute_crc_parts(payload);
        if computed == header.crc {
            return Ok(());
        }
        Err(LogError::BadCrc {
            seq: self.next.seq + 1,
            pos,
            stored: header.crc,
            computed,
        })
    }

    /// A live writer may reuse ring space once the flusher has passed it. If that happened
    /// while we read, the record was overwritten, not corrupt.
    fn corrupt_or_overwritten(&self, error: LogError) -> LogError {
        let (Some(seq), pos) = (error.seq(), self.next.pos) else {
            return error;
        };
        match node_live::FLUSHED
            .read(self.mapping)
            .map(Cursor::from_words)
        {
            Some(flushed) if flushed.pos > pos => LogError::Overwritten { seq, pos },
            _ => error,
        }
    }
}

impl Iterator for LogScanner<'_> {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(error) = self.pending_error.take() {
            self.done = true;
            return Some(Err(error));
        }
        match self
            .read_record()
            .map_err(|e| self.corrupt_or_overwritten(e))
        {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}
