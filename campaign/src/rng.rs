//! A small seeded random number generator (SplitMix64): the same seed gives the same fault
//! schedule and the same workload choices on every machine, with no dependency.

/// SplitMix64's increment: the state advances by it before each output.
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: scrambles one state into 64 random-looking bits.
pub fn mix(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SplitMix64 step from state `x`: a stateless hash of `x`, for patterns that must be
/// regenerated from a seed and a position.
pub fn splitmix64(x: u64) -> u64 {
    mix(x.wrapping_add(GAMMA))
}

/// SplitMix64 (Steele, Lea and Flood, 2014): fast, and good enough to choose faults.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed`; `stream` separates independent sequences from one seed (the
    /// schedule, each writer).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng {
            state: seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F),
        };
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// A number in `0..bound` (`bound` > 0; 0 gives 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for bounds far below 2^64.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_streams_differ() {
        let a: Vec<u64> = (0..8).map(|_| Rng::new(42, 0).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut one = Rng::new(42, 0);
        let mut two = Rng::new(42, 1);
        let first: Vec<u64> = (0..4).map(|_| one.next_u64()).collect();
        let second: Vec<u64> = (0..4).map(|_| two.next_u64()).collect();
        assert_ne!(first, second);
    }

    #[test]
    fn bounds_hold_and_cover_the_range() {
        let mut rng = Rng::new(7, 0);
        let mut seen = [false; 6];
        for _ in 0..1000 {
            let n = rng.between(3, 8);
            assert!((3..=8).contains(&n));
            seen[(n - 3) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(rng.below(0), 0);
    }
}
