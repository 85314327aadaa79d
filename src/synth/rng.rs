//! Deterministic random streams for the generator.
//!
//! Every person, practice and list is drawn from its own stream, seeded from
//! `(seed, stream kind, index)`. Nothing depends on the order in which
//! threads run, so the output is byte-identical for a given seed whatever
//! the thread count. Sampling helpers are written out here (rather than
//! using `rand`'s distributions) so that values stay stable across crate
//! upgrades: the generator's output is part of the test fixtures.

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Which kind of thing a stream draws for; keeps streams independent.
#[derive(Clone, Copy)]
#[repr(u64)]
pub enum Stream {
    Layout = 1,
    NhsNumbers = 2,
    Person = 3,
    Mover = 4,
    Practice = 5,
    BadRows = 6,
    Linked = 7,
}

pub struct Rng(Xoshiro256PlusPlus);

/// SplitMix64 finaliser: spreads nearby integers over the whole `u64` range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64, stream: Stream, index: u64) -> Rng {
        let s = mix(mix(seed ^ mix(stream as u64)) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Rng(Xoshiro256PlusPlus::seed_from_u64(s))
    }

    /// A single well-mixed draw for `(seed, stream, index)` without building a
    /// full generator: used for cheap per-person decisions made twice.
    pub fn hash_unit(seed: u64, stream: Stream, index: u64) -> f64 {
        let z =
            mix(mix(seed ^ mix(stream as u64)) ^ mix(index.wrapping_add(0x632b_e59b_d9b4_e019)));
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias below 2^-40 for our n).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: i32, hi: i32) -> i32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64 + 1) as i32
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Index drawn with the given (not necessarily normalised) weights.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    /// Approximately normal (Box-Muller), clamped to `[lo, hi]`.
    pub fn normal(&mut self, mean: f64, sd: f64, lo: f64, hi: f64) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (mean + sd * z).clamp(lo, hi)
    }

    /// Exponential waiting time with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::new(7, Stream::Person, 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::new(7, Stream::Person, 3).next_u64(),
            Rng::new(7, Stream::Person, 4).next_u64()
        );
        assert_ne!(
            Rng::new(7, Stream::Person, 3).next_u64(),
            Rng::new(8, Stream::Person, 3).next_u64()
        );
        assert_ne!(
            Rng::new(7, Stream::Person, 3).next_u64(),
            Rng::new(7, Stream::Mover, 3).next_u64()
        );
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::new(1, Stream::Layout, 0);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let x = rng.below(7) as usize;
            seen[x] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn weighted_follows_weights() {
        let mut rng = Rng::new(2, Stream::Layout, 0);
        let n = 20_000;
        let hits = (0..n).filter(|_| rng.weighted(&[1.0, 3.0]) == 1).count();
        let share = hits as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }
}
