//! What the workload writes: pseudo-random lengths and bytes, fixed by the seed and the
//! operation's number, so that a run can be repeated and no two versions of a file look
//! alike (a stale block cannot pass for a fresh one).

/// splitmix64: small, fast and good enough to tell versions apart.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The stream of operation `seq` of the run with `seed`.
    pub fn for_op(seed: u64, seq: u64) -> Self {
        Rng(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `1..=max` (1 when `max` is 0).
    pub fn up_to(&mut self, max: u64) -> u64 {
        1 + self.next_u64() % max.max(1)
    }
}

/// The bytes of operation `seq`: 1 byte to `max_kib` KiB, not block-aligned on purpose (the
/// tail of a partial block must survive too).
pub fn file_bytes(seed: u64, seq: u64, max_kib: u64) -> Vec<u8> {
    let mut rng = Rng::for_op(seed, seq);
    let len = rng.up_to(max_kib.saturating_mul(1024));
    let mut bytes = Vec::with_capacity(len as usize + 8);
    while (bytes.len() as u64) < len {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    bytes.truncate(len as usize);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_fixed_by_seed_and_seq() {
        assert_eq!(file_bytes(1, 5, 64), file_bytes(1, 5, 64));
        assert_ne!(file_bytes(1, 5, 64), file_bytes(1, 6, 64));
        assert_ne!(file_bytes(1, 5, 64), file_bytes(2, 5, 64));
        for seq in 0..200 {
            let len = file_bytes(3, seq, 4).len();
            assert!((1..=4096).contains(&len), "{len}");
        }
        assert_eq!(file_bytes(3, 1, 0).len(), 1);
    }
}
