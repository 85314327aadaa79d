//! A later opt-out request, as both phases of erasure see it: the
//! tombstone source that marks it, and how its latencies are summarised
//! (apply: request → unreachable; purge: request → erased).

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
