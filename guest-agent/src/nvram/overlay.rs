//! The unflushed writes of one export, by byte range, so reads see every acknowledged write
//! before the flusher has put it on disk.
//!
//! Segments never overlap: a new write cuts whatever it covers out of older segments, so
//! each byte has at most one segment, holding where its latest unflushed content is and the
//! seq of the log record that wrote it. A write's bytes are not copied: the segment points
//! at the record's data in the log, which stays there until the flusher releases the record.
//! Once the flusher has applied records up to seq S, every segment with seq ≤ S is on disk
//! and is pruned.
//!
//! Locking contract (see `volume.rs`): a read holds the read lock while it reads the disk and
//! applies the overlay, and pruning takes the write lock, so a reader can never read the disk
//! before the flusher wrote it and apply the overlay after the segment was pruned. The
//! flusher prunes *before* it releases records from the log, and releases no record whose
//! segment is not in place yet (`Nvram::indexed`), so a segment never points at log space
//! the appender may reuse.

use std::collections::BTreeMap;

/// Where the overlay reads a write's bytes: the node's log.
pub trait LogBytes {
    /// Copies the log's bytes at log position `pos` into `buf`; false if it cannot.
    fn read_log(&self, pos: u64, buf: &mut [u8]) -> bool;
}

impl LogBytes for shm::NodeRegion {
    fn read_log(&self, pos: u64, buf: &mut [u8]) -> bool {
        shm::NodeRegion::read_log(self, pos, buf)
    }
}

/// What a segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    /// The log's bytes from log position `pos` on.
    Log { pos: u64 },
    /// Zeroes (write-zeroes, or a trim: ivha exports read trimmed ranges as zeroes).
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    end: u64,
    seq: u64,
    content: Content,
}

impl Segment {
    /// The part of this segment (which starts at `start`) from `from` to `to`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Segment {
        let content = match self.content {
            Content::Log { pos } => Content::Log {
                pos: pos + (from - start),
            },
            Content::Zero => Content::Zero,
        };
        Segment {
            end: to,
            seq: self.seq,
            content,
        }
    }
}

/// Unflushed extents of one export.
#[derive(Debug, Default)]
pub struct Overlay {
    segments: BTreeMap<u64, Segment>,
    bytes: u64,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that log record `seq` wrote `len` bytes at `offset`, whose data is at log
    /// position `data_pos`.
    pub fn write(&mut self, offset: u64, len: u64, data_pos: u64, seq: u64) {
        self.put(offset, offset + len, seq, Content::Log { pos: data_pos });
    }

    /// Records that `len` bytes at `offset` read as zeroes from log record `seq` on.
    pub fn zero(&mut self, offset: u64, len: u64, seq: u64) {
        self.put(offset, offset + len, seq, Content::Zero);
    }

    fn put(&mut self, start: u64, end: u64, seq: u64, content: Content) {
        if start >= end {
            return;
        }
        self.cut(start, end);
        self.bytes += end - start;
        self.segments.insert(start, Segment { end, seq, content });
    }

    /// Removes `[start, end)` from every segment, keeping the parts outside it.
    fn cut(&mut self, start: u64, end: u64) {
        // The segment starting before `start` may reach into the range.
        let first = self
            .segments
            .range(..start)
            .next_back()
            .filter(|(_, s)| s.end > start)
            .map(|(k, _)| *k);
        let keys: Vec<u64> = first
            .into_iter()
            .chain(self.segments.range(start..end).map(|(k, _)| *k))
            .collect();
        for key in keys {
            let Some(old) = self.segments.remove(&key) else {
                continue;
            };
            self.bytes -= old.end - key;
            if key < start {
                self.bytes += start - key;
                self.segments.insert(key, old.slice(key, key, start));
            }
            if old.end > end {
                self.bytes += old.end - end;
                self.segments.insert(end, old.slice(key, end, old.end));
            }
        }
    }

    /// Overwrites the parts of `buf` (the disk's bytes at `offset`) that have unflushed
    /// content, reading written bytes from `log`; false if the log could not be read.
    #[must_use]
    pub fn apply(&self, offset: u64, buf: &mut [u8], log: &impl LogBytes) -> bool {
        let end = offset + buf.len() as u64;
        let first = self
            .segments
            .range(..offset)
            .next_back()
            .filter(|(_, s)| s.end > offset);
        let rest = self.segments.range(offset..end);
        for (&start, segment) in first.into_iter().chain(rest) {
            let from = start.max(offset);
            let to = segment.end.min(end);
            let target = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match segment.content {
                Content::Log { pos } => {
                    if !log.read_log(pos + (from - start), target) {
                        return false;
                    }
                }
                Content::Zero => target.fill(0),
            }
        }
        true
    }

    /// Drops every segment written by a record with seq ≤ `flushed_seq` (now on disk).
    pub fn prune(&mut self, flushed_seq: u64) {
        let before = self.segments.len();
        let mut freed = 0;
        self.segments.retain(|start, s| {
            let keep = s.seq > flushed_seq;
            if !keep {
                freed += s.end - start;
            }
            keep
        });
        self.bytes -= freed;
        if self.segments.len() < before {
            log::trace!(
                "overlay: pruned {} segments up to seq {flushed_seq}",
                before - self.segments.len()
            );
        }
    }

    /// Bytes covered by unflushed content.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A log that only grows: positions are indexes.
    #[derive(Default)]
    struct FakeLog(Vec<u8>);

    impl FakeLog {
        /// Appends `bytes`; returns their log position.
        fn append(&mut self, bytes: &[u8]) -> u64 {
            self.0.extend_from_slice(bytes);
            (self.0.len() - bytes.len()) as u64
        }
    }

    impl LogBytes for FakeLog {
        fn read_log(&self, pos: u64, buf: &mut [u8]) -> bool {
            let Some(bytes) = self.0.get(pos as usize..pos as usize + buf.len()) else {
                return false;
            };
            buf.copy_from_slice(bytes);
            true
        }
    }

    fn write(o: &mut Overlay, log: &mut FakeLog, offset: u64, bytes: &[u8], seq: u64) {
        let pos = log.append(bytes);
        o.write(offset, bytes.len() as u64, pos, seq);
    }

    #[test]
    fn later_writes_win_and_pieces_survive() {
        let mut o = Overlay::new();
        let mut log = FakeLog::default();
        write(&mut o, &mut log, 10, &[1; 20], 1); // [10, 30)
        write(&mut o, &mut log, 15, &[2; 5], 2); // [15, 20)
        o.zero(25, 10, 3); // [25, 35)
        let mut buf = vec![9u8; 40];
        assert!(o.apply(0, &mut buf, &log));
        let mut want = vec![9u8; 40];
        want[10..30].fill(1);
        want[15..20].fill(2);
        want[25..35].fill(0);
        assert_eq!(buf, want);
        assert_eq!(o.bytes(), 25);
        // Flushing up to seq 2 leaves only the zeroes (and nothing of seq 1 under them).
        o.prune(2);
        let mut buf = vec![9u8; 40];
        assert!(o.apply(0, &mut buf, &log));
        let mut want = vec![9u8; 40];
        want[25..35].fill(0);
        assert_eq!(buf, want);
        assert_eq!(o.bytes(), 10);
        o.prune(3);
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn reads_that_start_inside_a_segment() {
        let mut o = Overlay::new();
        let mut log = FakeLog::default();
        log.append(&[0xee; 7]); // the write's data does not start the log
        write(&mut o, &mut log, 100, &(0..50u8).collect::<Vec<_>>(), 1);
        let mut buf = vec![0xffu8; 10];
        assert!(o.apply(120, &mut buf, &log));
        assert_eq!(buf, (20..30u8).collect::<Vec<_>>());
    }

    #[test]
    fn an_unreadable_log_fails_the_read() {
        let mut o = Overlay::new();
        o.write(0, 10, 1 << 40, 1);
        let mut buf = vec![0u8; 10];
        assert!(!o.apply(0, &mut buf, &FakeLog::default()));
    }

    proptest! {
        /// The overlay over a disk equals a plain byte array written in the same order,
        /// whatever the writes, zeroes and prunes (prune only after "flushing" to the disk).
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec((0u64..200, 0u64..60, any::<u8>(), any::<bool>()), 1..60),
                                flush_every in 1usize..10) {
            let mut o = Overlay::new();
            let mut fake_log = FakeLog::default();
            let mut model = vec![0xaau8; 300];
            let mut disk = vec![0xaau8; 300];
            let mut log: Vec<(u64, u64, u8, bool, u64)> = Vec::new();
            for (i, (offset, len, byte, zero)) in ops.into_iter().enumerate() {
                let seq = i as u64 + 1;
                if zero {
                    o.zero(offset, len, seq);
                    model[offset as usize..(offset + len) as usize].fill(0);
                } else {
                    write(&mut o, &mut fake_log, offset, &vec![byte; len as usize], seq);
                    model[offset as usize..(offset + len) as usize].fill(byte);
                }
                log.push((offset, len, byte, zero, seq));
                if i % flush_every == 0 {
                    // The flusher applies the log to the disk in order, then prunes.
                    for (offset, len, byte, zero, _) in log.drain(..) {
                        disk[offset as usize..(offset + len) as usize].fill(if zero { 0 } else { byte });
                    }
                    o.prune(seq);
                }
                let mut read = disk.clone();
                prop_assert!(o.apply(0, &mut read, &fake_log));
                prop_assert_eq!(&read, &model);
                let total: u64 = o.segments.iter().map(|(k, s)| s.end - k).sum();
                prop_assert_eq!(total, o.bytes());
            }
        }
    }
}
