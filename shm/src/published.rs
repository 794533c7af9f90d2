//! Multi-word values published by one writer and read by anyone, crash-safely.
//!
//! Several shared values are pairs or tuples (a log cursor is `(seq, position)`, a heartbeat
//! is `(counter, time)`). One writer owns each; readers run in other processes or guests and
//! may never write (their mapping is read-only), and the writer may die at any instruction.
//!
//! Layout: a generation word, then two slots of `N` words. The writer fills the slot the
//! generation does *not* point at, then release-stores `generation + 1`, which points at it.
//! A reader acquire-loads the generation, copies that slot and loads the generation again:
//! unchanged means the copy is whole. A writer that dies mid-update leaves the generation
//! pointing at the last complete slot, so a dead writer's value is always readable.
//!
//! No read-modify-write instructions are used: under TCG they are not atomic against another
//! QEMU process mapping the same memory, and a reader's mapping is read-only anyway.

use std::sync::atomic::{Ordering, fence};

use crate::mapping::Mapping;

/// Bytes taken in the region by a published value of `n` words.
pub const fn published_size(n: usize) -> u64 {
    (8 + 2 * 8 * n) as u64
}

/// How many times a reader retries while the writer keeps publishing. A live writer would
/// have to publish twice during one few-word copy to force a retry, so this is plenty.
const READ_ATTEMPTS: usize = 1000;

/// Location of a published value of `N` words in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published<const N: usize> {
    offset: u64,
}

impl<const N: usize> Published<N> {
    /// A published value whose generation word is at `offset` (8-byte aligned).
    pub const fn at(offset: u64) -> Self {
        Self { offset }
    }

    /// Offset of the generation word.
    pub const fn offset(&self) -> u64 {
        self.offset
    }

    /// First byte after this value.
    pub const fn end(&self) -> u64 {
        self.offset + published_size(N)
    }

    fn slot_word(&self, generation: u64, index: usize) -> u64 {
        self.offset + 8 + ((generation & 1) as usize * N + index) as u64 * 8
    }

    /// Reads a consistent snapshot. Returns `None` if the writer published continuously
    /// through every attempt, or if the value lies outside the mapping.
    pub fn read(&self, mapping: &Mapping) -> Option<[u64; N]> {
        let generation_word = mapping.word(self.offset)?;
        for _ in 0..READ_ATTEMPTS {
            let before = generation_word.load(Ordering::Acquire);
            let mut value = [0u64; N];
            for (i, v) in value.iter_mut().enumerate() {
                *v = mapping
                    .word(self.slot_word(before, i))?
                    .load(Ordering::Relaxed);
            }
            // Orders the slot loads before the second generation load (seqlock reader).
            fence(Ordering::Acquire);
            if generation_word.load(Ordering::Relaxed) == before {
                return Some(value);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The generation: how many times the value was published since the region was made.
    pub fn generation(&self, mapping: &Mapping) -> u64 {
        mapping.load(self.offset)
    }
}

/// The one writer of a published value. Holding it (`&mut`) is holding the right to write.
#[derive(Debug)]
pub struct PublishedWriter<const N: usize> {
    location: Published<N>,
    generation: u64,
}

impl<const N: usize> PublishedWriter<N> {
    /// Takes over writing the value at `location`, continuing from its current generation.
    pub fn new(location: Published<N>, mapping: &Mapping) -> Self {
        Self {
            generation: location.generation(mapping),
            location,
        }
    }

    /// Publishes `value`: readers see either the previous value or this one, never a mix.
    /// Returns false if the value lies outside the mapping (a layout bug).
    pub fn publish(&mut self, mapping: &Mapping, value: [u64; N]) -> bool {
        let next = self.generation.wrapping_add(1);
        // Orders the previous generation store before the slot stores below, so a reader
        // that sees any of them also sees that generation change (seqlock writer).
        fence(Ordering::Release);
        for (i, v) in value.iter().enumerate() {
            match mapping.word(self.location.slot_word(next, i)) {
                Some(word) => word.store(*v, Ordering::Relaxed),
                None => return false,
            }
        }
        match mapping.word(self.location.offset) {
            Some(word) => word.store(next, Ordering::Release),
            None => return false,
        }
        self.generation = next;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Access, MIN_REGION_SIZE};

    #[test]
    fn fresh_value_reads_as_zero_and_publishes_round_trip() {
        let m = Mapping::create_memfd("p", MIN_REGION_SIZE).unwrap();
        let p = Published::<3>::at(128);
        assert_eq!(p.read(&m), Some([0, 0, 0]));
        let mut w = PublishedWriter::new(p, &m);
        for i in 1..10u64 {
            assert!(w.publish(&m, [i, i * 2, i * 3]));
            assert_eq!(p.read(&m), Some([i, i * 2, i * 3]));
            assert_eq!(p.generation(&m), i);
        }
    }

    #[test]
    fn a_writer_dying_mid_update_leaves_the_last_whole_value() {
        let m = Mapping::create_memfd("p", MIN_REGION_SIZE).unwrap();
        let p = Published::<2>::at(0);
        let mut w = PublishedWriter::new(p, &m);
        assert!(w.publish(&m, [7, 8]));
        // Simulate a writer that filled half of the next slot and died.
        m.word(p.slot_word(2, 0))
            .unwrap()
            .store(99, Ordering::Relaxed);
        assert_eq!(p.read(&m), Some([7, 8]));
        // A new writer resumes from the published generation.
        let mut w2 = PublishedWriter::new(p, &m);
        assert!(w2.publish(&m, [9, 10]));
        assert_eq!(p.read(&m), Some([9, 10]));
    }

    #[test]
    fn readers_never_see_a_torn_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let writer_map = Mapping::create_file(&path, MIN_REGION_SIZE).unwrap();
        let reader_map = Mapping::open(&path, Access::ReadOnly).unwrap();
        let p = Published::<4>::at(256);
        let shape = |i: u64| [i, !i, i.rotate_left(7), i ^ 0x5555];
        let mut w = PublishedWriter::new(p, &writer_map);
        w.publish(&writer_map, shape(0));
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 1..200_000u64 {
                    w.publish(&writer_map, shape(i));
                }
            });
            let mut last = 0;
            for _ in 0..200_000 {
                if let Some(value) = p.read(&reader_map) {
                    let a = value[0];
                    assert_eq!(value, shape(a), "torn read");
                    assert!(a >= last, "values went backwards");
                    last = a;
                }
            }
        });
    }

    #[test]
    fn out_of_bounds_values_are_refused() {
        let m = Mapping::create_memfd("p", MIN_REGION_SIZE).unwrap();
        let p = Published::<2>::at(MIN_REGION_SIZE - 16);
        assert_eq!(p.read(&m), None);
        assert!(!PublishedWriter::new(p, &m).publish(&m, [1, 2]));
    }
}
