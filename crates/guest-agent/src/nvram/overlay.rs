//! The unflushed writes of one export, by byte range, so reads see every acknowledged write
//! before the flusher has put it on disk.
//!
//! Segments never overlap: a new write cuts whatever it covers out of older segments, so
//! each byte has at most one segment, holding its latest unflushed content and the seq of
//! the log record that wrote it. Once the flusher has synced records up to seq S, every
//! segment with seq ≤ S is on disk and is pruned.
//!
//! Locking contract (see `volume.rs`): a read holds the read lock while it reads the disk and
//! applies the overlay, and pruning takes the write lock, so a reader can never read the disk
//! before the flusher wrote it and apply the overlay after the segment was pruned.

use std::collections::BTreeMap;
use std::sync::Arc;

/// What a segment holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    /// Bytes `data[start..start + len]`.
    Data { data: Arc<[u8]>, start: usize },
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
        let content = match &self.content {
            Content::Data { data, start: at } => Content::Data {
                data: Arc::clone(data),
                start: at + (from - start) as usize,
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

    /// Records that `data` was written at `offset` by log record `seq`.
    pub fn write(&mut self, offset: u64, data: Arc<[u8]>, seq: u64) {
        let end = offset + data.len() as u64;
        self.put(offset, end, seq, Content::Data { data, start: 0 });
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
    /// content.
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
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
            match &segment.content {
                Content::Data { data, start: at } => {
                    let at = at + (from - start) as usize;
                    target.copy_from_slice(&data[at..at + target.len()]);
                }
                Content::Zero => target.fill(0),
            }
        }
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

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(byte: u8, len: usize) -> Arc<[u8]> {
        vec![byte; len].into()
    }

    #[test]
    fn later_writes_win_and_pieces_survive() {
        let mut o = Overlay::new();
        o.write(10, data(1, 20), 1); // [10, 30)
        o.write(15, data(2, 5), 2); // [15, 20)
        o.zero(25, 10, 3); // [25, 35)
        let mut buf = vec![9u8; 40];
        o.apply(0, &mut buf);
        let mut want = vec![9u8; 40];
        want[10..30].fill(1);
        want[15..20].fill(2);
        want[25..35].fill(0);
        assert_eq!(buf, want);
        assert_eq!(o.bytes(), 25);
        // Flushing up to seq 2 leaves only the zeroes (and nothing of seq 1 under them).
        o.prune(2);
        let mut buf = vec![9u8; 40];
        o.apply(0, &mut buf);
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
        o.write(100, (0..50u8).collect::<Vec<_>>().into(), 1);
        let mut buf = vec![0xffu8; 10];
        o.apply(120, &mut buf);
        assert_eq!(buf, (20..30u8).collect::<Vec<_>>());
    }

    proptest! {
        /// The overlay over a disk equals a plain byte array written in the same order,
        /// whatever the writes, zeroes and prunes (prune only after "flushing" to the disk).
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec((0u64..200, 0u64..60, any::<u8>(), any::<bool>()), 1..60),
                                flush_every in 1usize..10) {
            let mut o = Overlay::new();
            let mut model = vec![0xaau8; 300];
            let mut disk = vec![0xaau8; 300];
            let mut log: Vec<(u64, u64, u8, bool, u64)> = Vec::new();
            for (i, (offset, len, byte, zero)) in ops.into_iter().enumerate() {
                let seq = i as u64 + 1;
                if zero {
                    o.zero(offset, len, seq);
                    model[offset as usize..(offset + len) as usize].fill(0);
                } else {
                    o.write(offset, data(byte, len as usize), seq);
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
                o.apply(0, &mut read);
                prop_assert_eq!(&read, &model);
                let total: u64 = o.segments.iter().map(|(k, s)| s.end - k).sum();
                prop_assert_eq!(total, o.bytes());
            }
        }
    }
}
