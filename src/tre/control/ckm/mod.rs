//! The cell key method (ONS Census 2021; ABS TableBuilder): a record key
//! per patient, a cell key per statistic, and the perturbation the cell
//! key draws.
//!
//! A **record key** is a 32-bit number fixed for each patient by a secret
//! only the TRE holds — the perturbation key, a 32-byte file from `gpdp
//! keygen` that is never the collection key (the store's key id tells them
//! apart, and the same file is refused). The **cell key** of a statistic is
//! the wrapping sum of the record keys of its distinct contributors — each
//! mixed with how much the patient contributes unless the statistic counts
//! patients ([`weighted`]): the same records give the same key in every
//! query, session and project; one patient or one row more gives a key
//! unrelated to the last. The perturbation is then looked up by (count,
//! cell key) in the perturbation table ([`ptable`]), which the policy
//! derives from the rule set's parameters.
//!
//! The compiled plan computes record keys and sums them into cell keys
//! ([`record_keys`], beside the aggregate kernels that use them). This
//! module folds a cell key from the plan's sum ([`cell_key`]), perturbs
//! sums by it ([`magnitude_perturbation`]), and binds a store's answers to
//! one perturbation key in its audit log ([`bind`], [`rotate`]). Cell
//! keys, record keys and perturbations are never released or logged.
//!
//! [`weighted`]: crate::tre::aggregates::record_keys::weighted
//! [`record_keys`]: crate::tre::aggregates::record_keys
//! [`ptable`]: crate::policy::ptable

use std::path::Path;

use crate::policy::tre::Disclosure;
use crate::tre::aggregates::record_keys::{RecordKeys, mix};
use crate::tre::checked::{Release, StatKind};
use crate::tre::error::{Refusal, TreError};

/// The audit log's record of which perturbation key a store's answers are
/// drawn with: the first use, and every deliberate rotation.
const KEY_EVENTS: [&str; 2] = ["\"perturbation_key\"", "\"perturbation_key_rotated\""];

/// The perturbation key id the log binds a store to: the first one used,
/// or the last a rotation named; `None` before any use. An unreadable
/// line in the log leaves it unknown: fail closed.
#[derive(Default)]
struct Bound {
    id: Option<String>,
    unreadable: bool,
}

fn bound_id(state: &mut Bound, entry: &serde_json::Value) {
    if entry.is_null() {
        state.unreadable = true;
        return;
    }
    match entry["event"].as_str() {
        Some("perturbation_key") if state.id.is_none() => {
            state.id = entry["key_id"].as_str().map(str::to_owned);
        }
        Some("perturbation_key_rotated") => {
            state.id = entry["to"].as_str().map(str::to_owned);
        }
        _ => {}
    }
}

/// Binds `store`'s cell-key answers to `keys`: the first use records the
/// key's id in the audit log, and any other key is refused
/// (`perturbation_key_changed`). A new key gives every cell a fresh draw,
/// and two draws of one cell average to half the noise's variance — so a
/// TRE started with another key (a typo, a regenerated file, a second
/// TRE over a copy) must not answer, and changing the key is a deliberate,
/// logged step ([`rotate`]).
pub fn bind(store: &Path, keys: &RecordKeys) -> Result<(), TreError> {
    use crate::store::log::AuditLog;
    let outcome = AuditLog::at(store)
        .append_folded(&KEY_EVENTS, bound_id, |bound: &Bound| {
            match (bound.unreadable, &bound.id) {
                (true, _) => Err(Refusal::new(
                    "perturbation_key_changed",
                    "the audit log cannot be read, so the perturbation key this store's answers are bound to is unknown; nothing was run",
                )),
                (false, Some(id)) if id == keys.id() => Ok(vec![]),
                (false, Some(_)) => Err(Refusal::new(
                    "perturbation_key_changed",
                    "this TRE was started with a perturbation key other than the one this store's cell-key answers are drawn with: fresh noise on the same cells could be averaged away; start it with the bound key, or rotate the key deliberately (`gpdp rotate-perturbation-key`)",
                )),
                (false, None) => Ok(vec![serde_json::json!({
                    "event": "perturbation_key",
                    "time": crate::store::now_rfc3339(),
                    "key_id": keys.id(),
                })]),
            }
        })
        .map_err(TreError::internal)?;
    outcome.map_err(TreError::Refused)
}

/// Rotates the perturbation key `store`'s answers are bound to, from
/// `from` (which must be the bound key: only its holder may retire it) to
/// `to`, with the operator's reason, in the audit log.
pub fn rotate(
    store: &Path,
    from: &RecordKeys,
    to: &RecordKeys,
    reason: &str,
) -> Result<(), TreError> {
    use crate::store::log::AuditLog;
    let outcome = AuditLog::at(store)
        .append_folded(&KEY_EVENTS, bound_id, |bound: &Bound| {
            match (bound.unreadable, &bound.id) {
                (false, Some(id)) if id == from.id() && from.id() != to.id() => {
                    Ok(vec![serde_json::json!({
                        "event": "perturbation_key_rotated",
                        "time": crate::store::now_rfc3339(),
                        "from": from.id(),
                        "to": to.id(),
                        "reason": reason,
                    })])
                }
                (false, Some(id)) if id == from.id() => Err(Refusal::new(
                    "perturbation_key_changed",
                    "the new key is the key in force: nothing to rotate",
                )),
                (false, Some(_)) => Err(Refusal::new(
                    "perturbation_key_changed",
                    "--from is not the key this store's answers are bound to: only the bound key can be rotated",
                )),
                (false, None) => Err(Refusal::new(
                    "perturbation_key_changed",
                    "no perturbation key is bound to this store yet (it is bound on first use): start the TRE with the key you want",
                )),
                (true, _) => Err(Refusal::new(
                    "perturbation_key_changed",
                    "the audit log cannot be read, so the bound key is unknown",
                )),
            }
        })
        .map_err(TreError::internal)?;
    outcome.map_err(TreError::Refused)
}

/// Refuses, before anything runs, a release the cell key method has no
/// perturbation for: it perturbs counts and sums (a mean is the perturbed
/// sum over the perturbed count), so variances and standard deviations are
/// not released under it. (Differential privacy refuses them in
/// [`dp::plan`](super::dp::plan).)
pub fn check_statistics(release: &Release, rules: &Disclosure) -> Result<(), Refusal> {
    if rules.ckm.is_some()
        && release
            .statistics
            .iter()
            .any(|s| matches!(s.kind, StatKind::Variance | StatKind::StdDev))
    {
        return Err(Refusal::new(
            "statistic_not_available",
            format!(
                "variances and standard deviations are not released under the cell key method ({}): it perturbs counts and sums; ask for counts, sums or means",
                rules.name
            ),
        ));
    }
    Ok(())
}

/// The cell key from the plan's sum of record keys: the wrapping 32-bit sum.
pub fn cell_key(sum_of_record_keys: i64) -> u32 {
    sum_of_record_keys as u64 as u32
}

/// The perturbation of a sum (and so of a mean, the perturbed sum over the
/// perturbed count): `±m × largest × (½ + f)`, where `largest` is the
/// cell's largest contribution (one patient's total), and the sign and
/// `f ∈ [0, 1)` come from the cell key through a mixing function (so they
/// are unrelated to the count's perturbation, which reads the key
/// directly). Its mean is 0; it is never less than half of `m × largest`,
/// so no patient's contribution — the largest least of all — comes out
/// exactly; and, as for counts, the same contributors give the same value
/// every time. This follows the ABS and Destatis approach for magnitude
/// tables (noise scaled to the largest contributions, drawn by the cell
/// key; Thompson, Broadfoot and Elazar 2013; Giessing 2016) with one
/// contributor and a uniform draw.
pub fn magnitude_perturbation(cell_key: u32, largest: f64, m: f64) -> f64 {
    let z = mix(u64::from(cell_key) ^ 0x9E37_79B9_7F4A_7C15);
    let sign = if z & 1 == 0 { 1.0 } else { -1.0 };
    let f = (z >> 11) as f64 / (1u64 << 53) as f64;
    sign * m * largest.abs() * (0.5 + f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tre::aggregates::record_keys::RecordKeys;

    #[test]
    fn record_keys_depend_on_the_key_and_spread_evenly() {
        let a = RecordKeys::from_bytes(&[1; 32]);
        let b = RecordKeys::from_bytes(&[2; 32]);
        assert_eq!(a.record_key(42), a.record_key(42));
        assert_ne!(a.record_key(42), b.record_key(42));
        // Cell keys of 1..=n patients: the top bit is set about half the time.
        let mut sum = 0i64;
        let mut high = 0;
        for p in 0..10_000i64 {
            sum += i64::from(a.record_key(p * 7919));
            high += (cell_key(sum) >> 31) as usize;
        }
        assert!((4_700..5_300).contains(&high), "{high}");
    }

    #[test]
    fn magnitude_perturbations_are_centred_and_bounded() {
        let (m, largest) = (0.5, 80.0);
        let mut sum = 0.0;
        for key in (0..u32::MAX).step_by(65_537) {
            let v = magnitude_perturbation(key, largest, m);
            assert!((0.25 * largest..0.75 * largest).contains(&v.abs()), "{v}");
            assert_eq!(v, magnitude_perturbation(key, largest, m));
            sum += v;
        }
        let draws = f64::from(u32::MAX / 65_537 + 1);
        // Mean 0 within 4 standard errors (sd about 0.52 × 40).
        assert!(
            (sum / draws).abs() < 4.0 * 21.0 / draws.sqrt(),
            "{}",
            sum / draws
        );
    }
}
