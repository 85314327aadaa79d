//! A later opt-out request, as both phases of erasure see it: the
//! tombstone source that marks it, and how its latencies are summarised
//! (apply: request → unreachable; purge, or a collection that drops the
//! files their vectors masked: request → erased).

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::deid::pseudonym::Pseudonym;

/// The tombstone source of opt-outs applied with `gpdp optout apply`.
pub const REQUEST_SOURCE: &str = "type1-request";

/// The median and the longest of `seconds` (sorted here).
pub(crate) fn median_max(mut seconds: Vec<f64>) -> (Option<f64>, Option<f64>) {
    seconds.sort_by(f64::total_cmp);
    (
        seconds.get(seconds.len() / 2).copied(),
        seconds.last().copied(),
    )
}

/// The median and the longest of the seconds from each of `erased`'s
/// request (`requests`: patient and `recorded_at` of their request
/// tombstone; a patient without one is not counted) to `done`.
pub(crate) fn erased_latencies<'a>(
    requests: impl Iterator<Item = (Pseudonym, &'a str)>,
    erased: &HashSet<Pseudonym>,
    done: DateTime<Utc>,
) -> (Option<f64>, Option<f64>) {
    let mut requested: std::collections::BTreeMap<_, DateTime<Utc>> = Default::default();
    for (p, at) in requests.filter(|(p, _)| erased.contains(p)) {
        if let Ok(at) = DateTime::parse_from_rfc3339(at) {
            requested.insert(p, at.with_timezone(&Utc));
        }
    }
    median_max(
        requested
            .values()
            .map(|at| (done - *at).num_milliseconds().max(0) as f64 / 1000.0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median is the middle of the sorted seconds (the upper of the two
    /// middles of an even count), the longest the last; none of nothing.
    #[test]
    fn the_median_and_the_longest_of_latencies() {
        assert_eq!(median_max(vec![]), (None, None));
        assert_eq!(median_max(vec![4.0]), (Some(4.0), Some(4.0)));
        assert_eq!(median_max(vec![9.5, 0.25, 3.0]), (Some(3.0), Some(9.5)));
        assert_eq!(
            median_max(vec![7.0, 2.0, 40.0, 5.0]),
            (Some(7.0), Some(40.0))
        );
    }

    /// Request → erased counts each erased patient once, from their
    /// request's `recorded_at` to `done`, in seconds to the millisecond; a
    /// patient not erased, or whose request time cannot be read, is not
    /// counted, and a clock that went backwards counts 0, never less.
    #[test]
    fn request_to_erased_is_measured_for_the_erased_patients_alone() {
        let done = DateTime::parse_from_rfc3339("2026-12-08T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let requests = [
            ([1u8; 32], "2026-12-08T09:59:58.500Z"),
            ([2u8; 32], "2026-12-08T09:00:00Z"),
            ([3u8; 32], "2026-12-08T09:59:30Z"),
            ([4u8; 32], "2026-12-07T10:00:00Z"),
            ([5u8; 32], "not a time"),
            ([6u8; 32], "2026-12-08T10:00:05Z"),
        ];
        let erased: HashSet<Pseudonym> =
            [[1u8; 32], [2u8; 32], [3u8; 32], [5u8; 32], [6u8; 32]].into();
        // Erased and readable: 1.5 s, 3,600 s, 30 s, and 0 (a request after `done`).
        assert_eq!(
            erased_latencies(requests.iter().map(|(p, at)| (*p, *at)), &erased, done),
            (Some(30.0), Some(3600.0))
        );
        let none: HashSet<Pseudonym> = HashSet::new();
        assert_eq!(
            erased_latencies(requests.iter().map(|(p, at)| (*p, *at)), &none, done),
            (None, None)
        );
    }
}
