//! How a store's rows lie, and the two passes over them that both
//! patient-bounding aggregates make ([`super::bounded`] for differential
//! privacy, [`super::contributors`] for the cell key method):
//! - [`span_bounds`]: a store keeps one patient's rows together, ordered
//!   by date, so consecutive rows with one key and one patient (a span)
//!   are summed at once rather than row by row;
//! - [`spread`]: items are spread into buckets by the top bits of a
//!   uniform hash, keeping their order, so that each bucket's work stays
//!   in the core's cache instead of missing it once per item.

/// Where each span of consecutive rows with one key and one patient
/// begins, then the number of rows: spans are `bounds.windows(2)`. Found
/// without a branch per row — a loop that stopped at each span's end
/// mispredicted once per span, a store's rows having a few per span.
pub(crate) fn span_bounds<K: PartialEq>(keys: &[K], patients: &[i64]) -> Vec<u32> {
    let n = keys.len().min(patients.len());
    if n == 0 {
        return Vec::new();
    }
    let mut bounds = vec![0u32; n + 1];
    let mut k = 1;
    let pairs = keys[1..n].iter().zip(&keys[..n - 1]);
    let people = patients[1..n].iter().zip(&patients[..n - 1]);
    for (i, ((k1, k0), (p1, p0))) in (1u32..).zip(pairs.zip(people)) {
        bounds[k] = i;
        k += usize::from((k1 != k0) | (p1 != p0));
    }
    bounds[k] = n as u32;
    bounds.truncate(k + 1);
    bounds
}

/// The bits of bucket number that give buckets of about `per_bucket` of
/// `n` items (at most 2¹⁶ buckets).
pub(crate) fn bucket_bits(n: usize, per_bucket: usize) -> u32 {
    (n / per_bucket)
        .next_power_of_two()
        .trailing_zeros()
        .min(16)
}

/// `items` (read twice: to count, then to place) in buckets by the top
/// `bits` bits of `hash(item)`, each bucket in the items' order: bucket
/// `b` is `spread[starts[b]..starts[b + 1]]`. Returns `(starts, spread)`;
/// `spread` is `into`, emptied and refilled.
pub(crate) fn spread<T: Copy + Default>(
    items: impl Iterator<Item = T> + Clone,
    bits: u32,
    hash: impl Fn(T) -> u64,
    mut into: Vec<T>,
) -> (Vec<usize>, Vec<T>) {
    let bucket = |item: T| hash(item).checked_shr(64 - bits).unwrap_or(0) as usize;
    let mut starts = vec![0usize; (1 << bits) + 1];
    items.clone().for_each(|item| starts[bucket(item) + 1] += 1);
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut at = starts.clone();
    into.clear();
    into.resize(starts[starts.len() - 1], T::default());
    items.for_each(|item| {
        let b = bucket(item);
        into[at[b]] = item;
        at[b] += 1;
    });
    (starts, into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_bounds_split_where_the_key_or_the_patient_changes() {
        assert_eq!(span_bounds::<u32>(&[], &[]), Vec::<u32>::new());
        assert_eq!(span_bounds(&[5u32], &[1]), vec![0, 1]);
        let keys = [1u32, 1, 2, 2, 2, 1, 1];
        let patients = [7i64, 7, 7, 8, 8, 8, 8];
        assert_eq!(span_bounds(&keys, &patients), vec![0, 2, 3, 5, 7]);
    }

    #[test]
    fn spread_keeps_every_item_in_its_bucket_in_order() {
        let items: Vec<u64> = (0..1000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for bits in [0, 1, 5] {
            let (starts, spread) = spread(items.iter().copied(), bits, |x| x, vec![7; 3]);
            assert_eq!(starts.len(), (1 << bits) + 1);
            assert_eq!(spread.len(), items.len());
            for b in 0..1usize << bits {
                let want: Vec<u64> = items
                    .iter()
                    .copied()
                    .filter(|&x| x.checked_shr(64 - bits).unwrap_or(0) as usize == b)
                    .collect();
                assert_eq!(&spread[starts[b]..starts[b + 1]], want.as_slice());
            }
        }
    }
}
