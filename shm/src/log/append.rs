//! The one writer of a log's records and of its head cursor.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::record::{RECORD_HEADER_LEN, RecordHeader, RecordKind, footprint};
use super::{Cursor, Entry, Geometry, LogError};
use crate::layout::node_live;
use crate::mapping::Mapping;
use crate::published::PublishedWriter;

/// Where an appended record landed. Once `append` returns it, the record is published:
/// any reader, and a partner replaying after this process dies, will find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// Log position of the record's header.
    pub pos: u64,
    /// Log position of a write's data (the bytes stay there, unchanged, until the flushed
    /// cursor passes the record; see [`crate::NodeRegion::read_log`]).
    pub data_pos: u64,
    /// The new head: just past this record.
    pub head: Cursor,
    /// Ring bytes holding unflushed records now, this one included (from the flushed
    /// cursor the append read to find room: a moment old, so at most this many).
    pub unflushed: u64,
}

/// How an append waits when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackPressure {
    /// Give up (with [`LogError::BackPressureTimeout`]) after waiting this long.
    pub timeout: Duration,
}

impl Default for BackPressure {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
        }
    }
}

/// Appends records to a node's log. There is one per region; it is not `Clone`.
#[derive(Debug)]
pub struct LogAppender {
    mapping: Arc<Mapping>,
    geometry: Geometry,
    head: Cursor,
    head_writer: PublishedWriter<2>,
    waits: u64,
    wait_ns: u64,
}

impl LogAppender {
    /// Takes over appending, continuing from the published head.
    pub(crate) fn resume(mapping: Arc<Mapping>, geometry: Geometry) -> Result<Self, LogError> {
        let head = node_live::HEAD
            .read(&mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "head" })?;
        let flushed = node_live::FLUSHED
            .read(&mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "flushed" })?;
        super::check_cursors(&geometry, flushed, head)?;
        let appender = Self {
            head_writer: PublishedWriter::new(node_live::HEAD, &mapping),
            waits: mapping.load(node_live::BACKPRESSURE_WAITS),
            wait_ns: mapping.load(node_live::BACKPRESSURE_WAIT_NS),
            mapping,
            geometry,
            head,
        };
        // A wait of an earlier writer ended with it.
        appender.store_stat(node_live::LOG_FULL_SINCE_NS, 0);
        Ok(appender)
    }

    /// The head as this appender last published it.
    pub fn head(&self) -> Cursor {
        self.head
    }

    /// The geometry of the log.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Appends `entry` if the ring has room now; [`LogError::Full`] if not.
    pub fn try_append(&mut self, entry: &Entry<'_>) -> Result<Appended, LogError> {
        let len = entry.payload_len();
        if len > self.geometry.max_payload {
            return Err(LogError::TooLarge {
                len,
                max: self.geometry.max_payload,
            });
        }
        let size = footprint(len);
        let remaining = self.geometry.remaining_in_ring(self.head.pos);
        let skip = if remaining < size { remaining } else { 0 };
        let needed = skip + size;
        let free = self.free_bytes()?;
        if needed > free {
            return Err(LogError::Full { needed, free });
        }

        let seq = self.head.seq + 1;
        if skip >= RECORD_HEADER_LEN as u64 {
            // A header that says "go on at the ring's start"; with less room than a header
            // left, readers skip without one.
            let mut marker = RecordHeader::new(RecordKind::Wrap, seq, 0, self.head.pos);
            marker.crc = marker.compute_crc(&[]);
            self.write_at(self.head.pos, &marker.encode())?;
        }
        let pos = self.head.pos + skip;

        let (fixed, fixed_len, data) = entry.payload_parts();
        let fixed = &fixed[..fixed_len];
        let mut header = RecordHeader::new(entry.kind(), seq, len as u32, pos);
        header.crc = header.compute_crc_parts(&[fixed, data]);
        let payload_at = pos + RECORD_HEADER_LEN as u64;
        self.write_at(payload_at, fixed)?;
        self.write_at(payload_at + fixed.len() as u64, data)?;
        let written = RECORD_HEADER_LEN as u64 + len;
        if written < size {
            // Zero the alignment padding, so the ring holds no stale bytes between records.
            let padding = [0u8; 8];
            self.write_at(pos + written, &padding[..(size - written) as usize])?;
        }
        self.write_at(pos, &header.encode())?;

        // Publish: a release store after all the copies above.
        let head = Cursor {
            seq,
            pos: pos + size,
        };
        if !self.head_writer.publish(&self.mapping, head.words()) {
            return Err(LogError::OutOfRegion);
        }
        self.head = head;
        Ok(Appended {
            seq,
            pos,
            data_pos: payload_at + fixed.len() as u64,
            head,
            unflushed: self.geometry.ring_size - (free - needed),
        })
    }

    /// Appends `entry`, waiting for the flusher to free ring space if needed. Every wait is
    /// counted in the region as it starts, and the time it started stays there until it
    /// ends (see [`crate::node::NodeStats`]).
    pub fn append(
        &mut self,
        entry: &Entry<'_>,
        back_pressure: BackPressure,
    ) -> Result<Appended, LogError> {
        let full = match self.try_append(entry) {
            Err(LogError::Full { .. }) => Instant::now(),
            done => return done,
        };
        self.waits += 1;
        self.store_stat(node_live::BACKPRESSURE_WAITS, self.waits);
        self.store_stat(node_live::LOG_FULL_SINCE_NS, crate::node::unix_ns().max(1));
        let mut pause = Duration::from_micros(1);
        let result = loop {
            match self.try_append(entry) {
                Err(LogError::Full { .. }) => {}
                done => break done,
            }
            let waited = full.elapsed();
            if waited >= back_pressure.timeout {
                break Err(LogError::BackPressureTimeout {
                    waited_ms: waited.as_millis() as u64,
                });
            }
            if pause < Duration::from_micros(64) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
            }
            pause = (pause * 2).min(Duration::from_millis(1));
        };
        self.wait_ns += full.elapsed().as_nanos() as u64;
        self.store_stat(node_live::BACKPRESSURE_WAIT_NS, self.wait_ns);
        self.store_stat(node_live::LOG_FULL_SINCE_NS, 0);
        result
    }

    /// Ring bytes that can be written without touching unflushed records.
    pub fn free_bytes(&self) -> Result<u64, LogError> {
        let flushed = node_live::FLUSHED
            .read(&self.mapping)
            .map(Cursor::from_words)
            .ok_or(LogError::CursorUnreadable { name: "flushed" })?;
        let used = self
            .head
            .pos
            .checked_sub(flushed.pos)
            .filter(|used| *used <= self.geometry.ring_size)
            .ok_or_else(|| LogError::BadCursors {
                detail: format!(
                    "flushed ({flushed}) is not within the ring behind head ({})",
                    self.head
                ),
            })?;
        Ok(self.geometry.ring_size - used)
    }

    fn write_at(&self, pos: u64, bytes: &[u8]) -> Result<(), LogError> {
        if self
            .mapping
            .write_bytes(self.geometry.region_offset(pos), bytes)
        {
            Ok(())
        } else {
            Err(LogError::OutOfRegion)
        }
    }

    fn store_stat(&self, offset: u64, value: u64) {
        if let Some(word) = self.mapping.word(offset) {
            word.store(value, Ordering::Release);
        }
    }
}
