//! The population's layout: practices, their small areas and postcodes, who
//! is registered where, and every person's NHS number.
//!
//! Persons are numbered `0..patients` and split into contiguous ranges, one
//! per practice (their *current* practice). A person who moved (about 8%)
//! was previously registered at the practice before theirs in the list, so
//! practice `q` holds its own range plus the movers of range `q + 1`. Both
//! practices regenerate the mover from the same seed, so the two extracts
//! agree without either holding the other's data in memory.
//!
//! Postcodes start with Q, V or X, letters never used first in a real UK
//! postcode, and LSOA codes sit at E019xxxxx, above every real LSOA code: no
//! synthetic address can be mistaken for a real one.

use std::ops::Range;

use super::rng::{Rng, Stream};
use crate::nhs_number::NhsNumber;

/// Share of persons who moved practice within the extract window.
pub const MOVER_SHARE: f64 = 0.08;

/// The share of people registered at no practice in the extract, on top
/// of the registered population: they appear only in provider data
/// (hospital spells, death registrations; [`super::linked`]).
pub const UNREGISTERED_SHARE: f64 = 0.02;

pub struct Practice {
    pub code: String,
    pub lsoas: Range<u32>,
}

pub struct Lsoa {
    pub imd_decile: u8,
    pub postcodes: u16,
}

pub struct Layout {
    pub seed: u64,
    pub practices: Vec<Practice>,
    /// `starts[q]..starts[q + 1]` are the persons currently at practice `q`.
    pub starts: Vec<u64>,
    pub lsoas: Vec<Lsoa>,
    /// The first nine digits of each person's NHS number.
    nhs_prefixes: Vec<u32>,
}

const POSTCODE_AREA: [u8; 3] = *b"QVX";
/// Letters used in the inward part of real postcodes (no C, I, K, M, O, V).
const INWARD_LETTERS: &[u8; 20] = b"ABDEFGHJLNPQRSTUWXYZ";
/// Valid NHS number prefixes per block of 10^6 (e.g. 999 000 000..999 999 999).
const BLOCK: u32 = 1_000_000;

impl Layout {
    pub fn new(seed: u64, practices: u32, patients: u64) -> Layout {
        let n = practices as usize;
        let mut rng = Rng::new(seed, Stream::Layout, 0);

        // List sizes vary between 0.4x and 1.6x the mean, like real practices.
        let weights: Vec<f64> = (0..n).map(|_| 0.4 + 1.2 * rng.unit()).collect();
        let total: f64 = weights.iter().sum();
        let mut sizes: Vec<u64> = weights
            .iter()
            .map(|w| ((w / total) * patients as f64).floor().max(1.0) as u64)
            .collect();
        // Settle rounding so the sizes add up exactly (each practice keeps one).
        let mut assigned: u64 = sizes.iter().sum();
        let mut q = 0;
        while assigned < patients {
            sizes[q % n] += 1;
            assigned += 1;
            q += 1;
        }
        while assigned > patients {
            if sizes[q % n] > 1 {
                sizes[q % n] -= 1;
                assigned -= 1;
            }
            q += 1;
        }
        let mut starts = Vec::with_capacity(n + 1);
        starts.push(0);
        for s in &sizes {
            starts.push(starts.last().copied().unwrap_or(0) + s);
        }

        // ODS-like codes: a letter and five digits, distinct for up to 10^5
        // practices because 13 is coprime with 10^5.
        let base = rng.below(100_000);
        let mut lsoas = Vec::new();
        let practices = (0..n)
            .map(|q| {
                let code = format!("Z{:05}", (base + q as u64 * 13) % 100_000);
                let count = (sizes[q] / 500).clamp(3, 60) as u32;
                let centre = rng.between(1, 10);
                let first = lsoas.len() as u32;
                let per_lsoa = sizes[q] as f64 / f64::from(count);
                for _ in 0..count {
                    lsoas.push(Lsoa {
                        imd_decile: (centre + rng.between(-2, 2)).clamp(1, 10) as u8,
                        postcodes: (per_lsoa / 12.0).clamp(5.0, 3999.0) as u16,
                    });
                }
                Practice {
                    code,
                    lsoas: first..lsoas.len() as u32,
                }
            })
            .collect();

        Layout {
            seed,
            practices,
            starts,
            lsoas,
            // The registered population's numbers, then those of people
            // registered at no practice in the extract (provider data only);
            // the first `patients` are the same either way.
            nhs_prefixes: nhs_prefixes(seed, patients + unregistered(patients)),
        }
    }

    pub fn patients(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// People registered at no practice in the extract, who appear only in
    /// provider data (`linked/`): indices past the registered population.
    pub fn unregistered(&self) -> Range<u64> {
        self.patients()..self.nhs_prefixes.len() as u64
    }

    pub fn persons_of(&self, q: usize) -> Range<u64> {
        self.starts[q]..self.starts[q + 1]
    }

    /// Whether person `i` moved here from the previous practice in the list.
    /// A pure function of the seed, so either practice can ask.
    pub fn is_mover(&self, i: u64) -> bool {
        self.practices.len() > 1 && Rng::hash_unit(self.seed, Stream::Mover, i) < MOVER_SHARE
    }

    /// The practice a mover came from.
    pub fn previous_practice(&self, q: usize) -> usize {
        (q + self.practices.len() - 1) % self.practices.len()
    }

    pub fn nhs_number(&self, i: u64) -> NhsNumber {
        // Every stored prefix was checked when the list was built.
        NhsNumber::from_prefix(self.nhs_prefixes[i as usize]).unwrap_or_else(|| unreachable!())
    }

    /// Writes the LSOA code of area `l`.
    pub fn lsoa_code(l: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(b"E019");
        let mut buf = itoa::Buffer::new();
        let digits = buf.format(l % 100_000);
        out.extend(std::iter::repeat_n(b'0', 5 - digits.len()));
        out.extend_from_slice(digits.as_bytes());
    }

    /// Writes postcode `k` of area `l`, e.g. `QB12 3XY`.
    pub fn postcode(l: u32, k: u16, out: &mut Vec<u8>) {
        out.push(POSTCODE_AREA[(l % 3) as usize]);
        out.push(INWARD_LETTERS[((l / 3) % 20) as usize]);
        let mut buf = itoa::Buffer::new();
        out.extend_from_slice(buf.format((l / 60) % 99 + 1).as_bytes());
        if l >= 5940 {
            out.push(INWARD_LETTERS[((l / 5940 - 1) % 20) as usize]);
        }
        out.push(b' ');
        out.push(b'0' + (k % 10) as u8);
        out.push(INWARD_LETTERS[((k / 10) % 20) as usize]);
        out.push(INWARD_LETTERS[((k / 200) % 20) as usize]);
    }
}

/// Distinct valid NHS numbers for `patients` persons, in a seeded random
/// order. The 999 range (a widely used test range) holds 909,091 valid
/// numbers; larger populations continue into 998, 997, … — prefixes that are
/// not issued in England either, but not documented as a test range.
fn nhs_prefixes(seed: u64, patients: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed, Stream::NhsNumbers, 0);
    let mut out: Vec<u32> = Vec::with_capacity(patients as usize);
    let mut block = 999u32;
    while (out.len() as u64) < patients && block >= 900 {
        let mut valid: Vec<u32> = (block * BLOCK..(block + 1) * BLOCK)
            .filter(|p| NhsNumber::from_prefix(*p).is_some())
            .collect();
        rng.shuffle(&mut valid);
        let need = (patients - out.len() as u64) as usize;
        out.extend(valid.into_iter().take(need));
        block -= 1;
    }
    out
}

/// How many people registered at no collected practice the providers see,
/// for a registered population of `patients`.
fn unregistered(patients: u64) -> u64 {
    (patients as f64 * UNREGISTERED_SHARE).round() as u64
}

/// How many valid NHS numbers the 999 test range holds.
pub fn test_range_capacity() -> u64 {
    (999 * BLOCK..1000 * BLOCK)
        .filter(|p| NhsNumber::from_prefix(*p).is_some())
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ranges_cover_every_person_once() {
        let layout = Layout::new(3, 7, 1000);
        assert_eq!(layout.patients(), 1000);
        assert_eq!(layout.starts.len(), 8);
        assert!(layout.starts.windows(2).all(|w| w[0] < w[1]));
        let codes: HashSet<_> = layout.practices.iter().map(|p| p.code.clone()).collect();
        assert_eq!(codes.len(), 7);
    }

    #[test]
    fn nhs_numbers_are_valid_distinct_and_in_the_test_range() {
        let layout = Layout::new(3, 2, 5000);
        let numbers: HashSet<_> = (0..5000)
            .map(|i| *layout.nhs_number(i).as_bytes())
            .collect();
        assert_eq!(numbers.len(), 5000);
        assert!(numbers.iter().all(|n| n.starts_with(b"999")));
    }

    #[test]
    fn postcodes_are_distinct_and_never_real() {
        let mut seen = HashSet::new();
        for l in [0u32, 1, 59, 60, 5939, 5940, 12000] {
            for k in [0u16, 9, 10, 199, 200, 3999] {
                let mut pc = Vec::new();
                Layout::postcode(l, k, &mut pc);
                assert!(matches!(pc[0], b'Q' | b'V' | b'X'));
                assert!(seen.insert(pc));
            }
        }
        let mut code = Vec::new();
        Layout::lsoa_code(42, &mut code);
        assert_eq!(code, b"E01900042");
    }
}
