//! The NVRAM write log: a ring of crc-protected records in a node region.
//!
//! Positions are byte offsets in an endless log; a position's place in the ring is
//! `position % ring_size`. Two published cursors describe the log:
//!
//! - `head` (written by the appender): every record before it is complete. An append copies
//!   the record into the ring and only then publishes the new head, so a writer that dies
//!   mid-append leaves a torn tail that no reader ever looks at.
//! - `flushed` (written by the flusher): every record before it is on disk and synced. The
//!   appender never writes over the ring bytes of records at or after `flushed`: a full ring
//!   is back-pressure, not loss.
//!
//! A record never straddles the end of the ring. When one does not fit in what is left, the
//! appender writes a wrap marker there (if a header fits) and goes on at the ring's start.

mod append;
mod flushed;
pub mod record;
mod scan;

pub use append::{Appended, BackPressure, LogAppender};
pub use flushed::FlushedWriter;
pub use record::{Entry, Record, RecordKind};
pub use scan::{Extent, LogScanner};

use serde::Serialize;

use record::{RECORD_HEADER_LEN, footprint};

/// A point in the log: the seq of the last record before it and its byte position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cursor {
    /// Seq of the last record before this point (0: none yet).
    pub seq: u64,
    /// Log position (bytes since the log began).
    pub pos: u64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {} at position {}", self.seq, self.pos)
    }
}

impl Cursor {
    pub(crate) fn from_words([seq, pos]: [u64; 2]) -> Self {
        Self { seq, pos }
    }

    pub(crate) fn words(self) -> [u64; 2] {
        [self.seq, self.pos]
    }
}

/// Where the ring lies in its region and how large a record may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Byte offset of the ring in the region.
    pub ring_offset: u64,
    /// Ring size in bytes.
    pub ring_size: u64,
    /// Largest payload of one record.
    pub max_payload: u64,
}

impl Geometry {
    /// The largest payload that still always fits, whatever the wrap: half the ring.
    pub fn default_max_payload(ring_size: u64) -> u64 {
        (ring_size / 2)
            .saturating_sub(RECORD_HEADER_LEN as u64)
            .min(u64::from(u32::MAX))
            / record::RECORD_ALIGN
            * record::RECORD_ALIGN
    }

    /// Checks the geometry against a region of `region_size` bytes.
    pub fn validate(&self, region_size: u64) -> Result<(), String> {
        let end = self.ring_offset.checked_add(self.ring_size);
        if self.ring_offset % 8 != 0 || self.ring_size % 8 != 0 {
            return Err(format!(
                "ring offset {} and size {} must be multiples of 8",
                self.ring_offset, self.ring_size
            ));
        }
        if end.is_none_or(|end| end > region_size) {
            return Err(format!(
                "ring at {} of {} bytes does not fit in a region of {} bytes",
                self.ring_offset, self.ring_size, region_size
            ));
        }
        if self.ring_size < 2 * footprint(0) {
            return Err(format!("ring of {} bytes is too small", self.ring_size));
        }
        if self.max_payload > Self::default_max_payload(self.ring_size) {
            return Err(format!(
                "largest payload {} is more than half the ring ({} bytes)",
                self.max_payload, self.ring_size
            ));
        }
        Ok(())
    }

    /// Bytes from `pos` to the end of the ring.
    pub(crate) fn remaining_in_ring(&self, pos: u64) -> u64 {
        self.ring_size - pos % self.ring_size
    }

    /// Byte offset in the region of log position `pos`.
    pub(crate) fn region_offset(&self, pos: u64) -> u64 {
        self.ring_offset + pos % self.ring_size
    }
}

/// Why a log could not be appended to, scanned or advanced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("record payload of {len} bytes is larger than the log's limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("log is full: {needed} bytes needed, {free} free until the flusher catches up")]
    Full { needed: u64, free: u64 },
    #[error("log stayed full for {waited_ms} ms: the flusher is not making progress")]
    BackPressureTimeout { waited_ms: u64 },
    #[error("log cursor {name} could not be read consistently (its writer kept changing it)")]
    CursorUnreadable { name: &'static str },
    #[error("log cursors are inconsistent: {detail}")]
    BadCursors { detail: String },
    #[error("cannot advance the flushed cursor from {from} to {to}: {detail}")]
    BadFlushAdvance {
        from: Cursor,
        to: Cursor,
        detail: String,
    },
    #[error("the log's geometry is unusable: {0}")]
    BadGeometry(String),
    #[error("the log's layout points outside its region (a bug or a corrupt header)")]
    OutOfRegion,
    #[error(
        "log record {seq} at position {pos}: no record header there (magic {magic:#010x}); the log is corrupt from here on"
    )]
    BadMagic { seq: u64, pos: u64, magic: u32 },
    #[error(
        "log record {seq} at position {pos}: crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadCrc {
        seq: u64,
        pos: u64,
        stored: u32,
        computed: u32,
    },
    #[error("log record {seq} at position {pos}: header says it belongs at position {recorded}")]
    WrongPosition { seq: u64, pos: u64, recorded: u64 },
    #[error("log record {seq} at position {pos}: header carries seq {found} instead")]
    SeqGap { seq: u64, pos: u64, found: u64 },
    #[error("log record {seq} at position {pos}: length {len} exceeds {limit} ({why})")]
    BadLength {
        seq: u64,
        pos: u64,
        len: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("log record {seq} at position {pos}: unknown kind {code:#06x}")]
    UnknownKind { seq: u64, pos: u64, code: u16 },
    #[error("log record {seq} at position {pos}: payload does not fit its kind {kind:?}")]
    MalformedPayload {
        seq: u64,
        pos: u64,
        kind: RecordKind,
    },
    #[error("log record {seq} at position {pos}: flags {flags:#06x} are not understood")]
    UnknownFlags { seq: u64, pos: u64, flags: u16 },
    #[error(
        "log record {seq} at position {pos} was overwritten while being read (the log moved on; read again)"
    )]
    Overwritten { seq: u64, pos: u64 },
    #[error("log ends at seq {last} but its head says {head}")]
    HeadMismatch { last: u64, head: u64 },
    #[error(
        "log position {pos}: the writer's jump to the ring's start (to {to}) passes the head at {head}"
    )]
    WrapPastHead { pos: u64, to: u64, head: u64 },
}

impl LogError {
    /// The seq of the record the error is about, if it is about one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            LogError::BadMagic { seq, .. }
            | LogError::BadCrc { seq, .. }
            | LogError::WrongPosition { seq, .. }
            | LogError::SeqGap { seq, .. }
            | LogError::BadLength { seq, .. }
            | LogError::UnknownKind { seq, .. }
            | LogError::MalformedPayload { seq, .. }
            | LogError::UnknownFlags { seq, .. }
            | LogError::Overwritten { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// Checks that a (flushed, head) pair can describe a log of this geometry.
pub(crate) fn check_cursors(
    geometry: &Geometry,
    flushed: Cursor,
    head: Cursor,
) -> Result<(), LogError> {
    let bad = |detail: String| Err(LogError::BadCursors { detail });
    // Positions count bytes written since the region was formatted; nothing real comes
    // near 2^64, and keeping far from it lets every `pos + size` below be plain addition.
    if head.pos > u64::MAX - 2 * geometry.ring_size {
        return bad(format!(
            "head position {} is beyond any log's reach",
            head.pos
        ));
    }
    if flushed.pos > head.pos || flushed.seq > head.seq {
        return bad(format!("flushed ({flushed}) is past head ({head})"));
    }
    if head.pos - flushed.pos > geometry.ring_size {
        return bad(format!(
            "{} unflushed bytes do not fit in a ring of {} bytes",
            head.pos - flushed.pos,
            geometry.ring_size
        ));
    }
    if flushed.pos % record::RECORD_ALIGN != 0 || head.pos % record::RECORD_ALIGN != 0 {
        return bad(format!(
            "positions {} and {} are not record aligned",
            flushed.pos, head.pos
        ));
    }
    // Every record takes at least a header's worth of ring.
    let most_records = (head.pos - flushed.pos) / footprint(0);
    if head.seq - flushed.seq > most_records {
        return bad(format!(
            "{} records cannot fit in {} bytes",
            head.seq - flushed.seq,
            head.pos - flushed.pos
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::node_live;
    use crate::mapping::Mapping;
    use crate::node::NodeRegion;
    use crate::published::PublishedWriter;

    fn log_with(records: usize) -> (NodeRegion, Vec<Record>) {
        let region =
            NodeRegion::format(Mapping::create_memfd("log", 65536).unwrap(), 0, "a").unwrap();
        let mut w = region.writer(1).unwrap();
        for i in 0..records {
            let data = vec![i as u8; 100 + i];
            w.appender
                .try_append(&Entry::Write {
                    export: 1,
                    offset: i as u64,
                    data: &data,
                })
                .unwrap();
        }
        let scanned = region.unflushed().unwrap().map(Result::unwrap).collect();
        (region, scanned)
    }

    #[test]
    fn a_head_inside_a_record_is_an_error_not_a_panic() {
        let (region, records) = log_with(3);
        let mut head = PublishedWriter::new(node_live::HEAD, region.mapping());
        // Head 8 bytes into record 3's header: seq 3 claimed, its bytes not all covered.
        head.publish(region.mapping(), [3, records[2].pos + 8]);
        let results: Vec<_> = region.unflushed().unwrap().collect();
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok() && results[1].is_ok());
        let error = results[2].clone().unwrap_err();
        assert!(
            matches!(error, LogError::BadLength { seq: 3, .. }),
            "{error}"
        );
    }

    #[test]
    fn an_unusable_geometry_is_refused_up_front() {
        let (region, _) = log_with(1);
        let zero = Geometry {
            ring_offset: 4096,
            ring_size: 0,
            max_payload: 0,
        };
        let head = region.head().unwrap();
        let mut scan = LogScanner::new(region.mapping(), zero, Cursor::default(), head);
        assert!(matches!(scan.next(), Some(Err(LogError::BadGeometry(_)))));
        assert!(scan.next().is_none());
    }

    #[test]
    fn starting_at_seq_skips_earlier_records() {
        let (region, records) = log_with(5);
        let from_three: Vec<u64> = region
            .unflushed()
            .unwrap()
            .starting_at_seq(3)
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(from_three, [3, 4, 5]);
        assert_eq!(records[4].entry().kind(), RecordKind::Write);
    }
}
