//! The cell key method's perturbation table (ONS Census 2021 outputs; ABS
//! TableBuilder).
//!
//! A count `n` is released as `n + v`, where `v` is drawn from the table's
//! row for `n` by the cell's key — a number fixed by *who* is in the cell
//! ([`crate::tre::control::ckm`], the cell key method). Same contributors,
//! same key, same `v`: asking again, in another session or project, gains
//! nothing. One patient more or less
//! changes the key, and `v` is drawn afresh.
//!
//! Each row is the **maximum-entropy** distribution over the perturbations
//! allowed for its count, with mean 0 (released counts are unbiased) and
//! variance `V` where the allowed values can give it:
//!
//! - `|v| ≤ D` (the policy's `max_perturbation`);
//! - `n + v ≥ 0`, and `n + v` never in `1..=js` (`small_values`): a small
//!   count is released as 0 or as more than `js`;
//! - 0 stays 0 (an empty cell has no contributors and no key).
//!
//! Maximum entropy with a mean and a variance is `p(v) ∝ exp(a·v + b·v²)`;
//! `a` and `b` are found by Newton's method on the convex dual, then `a` is
//! refined by bisection so the mean is 0 to machine precision even where
//! the variance cannot be met (the smallest counts, whose allowed values
//! are few). Every count above `js + D` has all of `-D..=D` available, so
//! one row serves them all — the table "folds" there.
//!
//! The R `ptable` package (Enderle, Giessing, Tent) builds the same kind of
//! table; its defaults (D = 2, V = 1, js = 0) are a valid policy here.
//!
//! It lives with the policy rather than with the cell key method in the
//! TRE because it is part of the published rule: the table follows from
//! the rule set's four parameters alone, by the arithmetic here, with no
//! secret and nothing of the TRE. The policy builds it once at load, to
//! refuse parameters for which no table exists (beyond what
//! [`Params::check`] sees, the solver can fail), and the TRE builds the
//! same table from the same parameters when a request runs. It imports
//! nothing of the crate.

use std::fmt;

/// The policy's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// `D`: the largest perturbation.
    pub max_perturbation: u32,
    /// `V`: the target variance of the perturbation.
    pub variance: f64,
    /// `js`: counts 1..=js are never released (they become 0 or > js).
    pub small_values: u32,
    /// `m`: a sum's perturbation is ±m × the cell's largest contribution
    /// × (½ to 1½) ([`crate::tre::control::ckm::magnitude_perturbation`]).
    pub magnitude: f64,
}

impl Params {
    /// Whether a table exists: a count in `1..=js` needs somewhere above
    /// `js` to go, within `D`, to keep its mean at 0.
    pub fn check(&self) -> Result<(), String> {
        if self.max_perturbation == 0 || self.max_perturbation > 50 {
            return Err("max_perturbation must be 1 to 50".into());
        }
        if self.max_perturbation <= self.small_values {
            return Err(format!(
                "max_perturbation ({}) must exceed small_values ({}): a count of 1 must be able to move above small_values",
                self.max_perturbation, self.small_values
            ));
        }
        if !(self.variance > 0.0 && self.variance <= f64::from(self.max_perturbation).powi(2)) {
            return Err(format!(
                "variance must be in (0, max_perturbation²] = (0, {}]",
                self.max_perturbation.pow(2)
            ));
        }
        if !(self.magnitude > 0.0 && self.magnitude <= 10.0) {
            return Err(format!(
                "magnitude must be in (0, 10] (a sum's noise as a fraction of its largest contribution), not {}",
                self.magnitude
            ));
        }
        Ok(())
    }
}

/// One count's distribution: perturbations and the cell-key thresholds
/// (out of 2³²) below which each is chosen.
#[derive(Debug, Clone)]
struct Row {
    perturbations: Vec<i64>,
    probabilities: Vec<f64>,
    /// `upper[k]`: cell keys `< upper[k]` (and ≥ `upper[k - 1]`) choose
    /// `perturbations[k]`; the last is 2³².
    upper: Vec<u64>,
}

/// The table: rows for counts `0..=js + D + 1`; the last row serves every
/// larger count.
#[derive(Clone)]
pub struct PTable {
    params: Params,
    rows: Vec<Row>,
}

impl fmt::Debug for PTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PTable")
            .field("params", &self.params)
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl PTable {
    pub fn new(params: Params) -> Result<PTable, String> {
        params.check()?;
        let d = i64::from(params.max_perturbation);
        let js = i64::from(params.small_values);
        let rows = (0..=js + d + 1)
            .map(|n| {
                let allowed: Vec<i64> = (-d..=d)
                    .filter(|v| {
                        let out = n + v;
                        if n == 0 {
                            return *v == 0;
                        }
                        out >= 0 && !(1..=js).contains(&out)
                    })
                    .collect();
                row(&allowed, params.variance)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PTable { params, rows })
    }

    pub fn params(&self) -> Params {
        self.params
    }

    /// The released count for a true count and its cell key.
    pub fn perturb(&self, count: i64, cell_key: u32) -> i64 {
        if count <= 0 {
            return 0;
        }
        let row = &self.rows[(count as usize).min(self.rows.len() - 1)];
        let k = row.upper.partition_point(|&u| u <= u64::from(cell_key));
        count + row.perturbations[k]
    }

    /// Each row's distribution, for documentation and the report:
    /// `(count, [(perturbation, probability)])`; the last row stands for
    /// every larger count.
    pub fn rows(&self) -> impl Iterator<Item = (usize, Vec<(i64, f64)>)> + '_ {
        self.rows.iter().enumerate().map(|(n, r)| {
            (
                n,
                r.perturbations
                    .iter()
                    .copied()
                    .zip(r.probabilities.iter().copied())
                    .collect(),
            )
        })
    }
}

/// The maximum-entropy distribution over `values` with mean 0 and variance
/// as close to `variance` as they allow.
fn row(values: &[i64], variance: f64) -> Result<Row, String> {
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    let (neg, pos) = (v.iter().any(|&x| x < 0.0), v.iter().any(|&x| x > 0.0));
    let p = if v.len() == 1 {
        vec![1.0]
    } else if !(neg && pos) {
        return Err(format!(
            "perturbations {values:?} cannot have mean 0 (increase max_perturbation)"
        ));
    } else {
        let (mut a, mut b) = (0.0f64, 0.0f64);
        // Newton on the dual: minimise log Z(a, b) − b·V.
        for _ in 0..200 {
            let (m1, m2, m3, m4) = moments(&v, a, b);
            let (g1, g2) = (m1, m2 - variance);
            if g1.abs() < 1e-13 && g2.abs() < 1e-11 {
                break;
            }
            // Hessian: the covariance of (v, v²).
            let h11 = m2 - m1 * m1;
            let h12 = m3 - m1 * m2;
            let h22 = m4 - m2 * m2;
            let det = h11 * h22 - h12 * h12;
            if det.abs() < 1e-300 {
                break;
            }
            let da = (h22 * g1 - h12 * g2) / det;
            let db = (h11 * g2 - h12 * g1) / det;
            // Damped: the variance may be out of reach (b runs away).
            let step = 1.0 / (1.0 + (da.abs() + db.abs()) / 4.0);
            a -= step * da;
            b = (b - step * db).clamp(-20.0, 20.0);
        }
        // Mean exactly 0: E[v] rises with a, so bisect a with b fixed.
        let (mut lo, mut hi) = (-200.0f64, 200.0f64);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if moments(&v, mid, b).0 < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        a = (lo + hi) / 2.0;
        weights(&v, a, b)
    };
    let mut upper = Vec::with_capacity(p.len());
    let mut cumulative = 0.0;
    for (i, q) in p.iter().enumerate() {
        cumulative += q;
        upper.push(if i + 1 == p.len() {
            1u64 << 32
        } else {
            ((cumulative * 4_294_967_296.0).round() as u64).min(1u64 << 32)
        });
    }
    Ok(Row {
        perturbations: values.to_vec(),
        probabilities: p,
        upper,
    })
}

/// Normalised `exp(a·v + b·v²)`, computed stably.
fn weights(v: &[f64], a: f64, b: f64) -> Vec<f64> {
    let e: Vec<f64> = v.iter().map(|&x| a * x + b * x * x).collect();
    let top = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = e.iter().map(|x| (x - top).exp()).collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

/// E[v], E[v²], E[v³], E[v⁴] under `exp(a·v + b·v²)`.
fn moments(v: &[f64], a: f64, b: f64) -> (f64, f64, f64, f64) {
    weights(v, a, b)
        .iter()
        .zip(v)
        .fold((0.0, 0.0, 0.0, 0.0), |(m1, m2, m3, m4), (p, &x)| {
            (
                m1 + p * x,
                m2 + p * x * x,
                m3 + p * x * x * x,
                m4 + p * x * x * x * x,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parameters D (`max_perturbation`), V (`variance`) and js
    /// (`small_values`), at magnitude 0.5.
    fn params(max_perturbation: u32, variance: f64, small_values: u32) -> Params {
        Params {
            max_perturbation,
            variance,
            small_values,
            magnitude: 0.5,
        }
    }

    fn stats(row: &[(i64, f64)]) -> (f64, f64, f64) {
        let total: f64 = row.iter().map(|(_, p)| p).sum();
        let mean: f64 = row.iter().map(|(v, p)| *v as f64 * p).sum();
        let var: f64 = row
            .iter()
            .map(|(v, p)| (*v as f64 - mean).powi(2) * p)
            .sum();
        (total, mean, var)
    }

    #[test]
    fn large_counts_have_the_target_variance_and_maximum_entropy_shape() {
        let t = PTable::new(params(5, 3.0, 4)).unwrap();
        let (n, last) = t.rows().last().unwrap();
        assert_eq!(n, 10, "js + D + 1");
        let (total, mean, var) = stats(&last);
        assert!((total - 1.0).abs() < 1e-12);
        assert!(mean.abs() < 1e-12, "{mean}");
        assert!((var - 3.0).abs() < 1e-9, "{var}");
        // Symmetric, peaked at 0 (V = 3 < the uniform's 10 over -5..=5).
        for k in 0..5 {
            assert!((last[k].1 - last[10 - k].1).abs() < 1e-12);
            assert!(last[k].1 < last[k + 1].1);
        }
    }

    #[test]
    fn small_counts_never_come_out_small_and_zero_stays_zero() {
        let t = PTable::new(params(5, 3.0, 4)).unwrap();
        for key in (0..u32::MAX).step_by(9_999_991) {
            assert_eq!(t.perturb(0, key), 0);
            for n in 1..40 {
                let out = t.perturb(n, key);
                assert!(out == 0 || out > 4, "{n} -> {out}");
                assert!((out - n).abs() <= 5);
            }
        }
    }

    #[test]
    fn the_cell_key_chooses_by_the_cumulative_distribution() {
        let t = PTable::new(params(2, 1.0, 0)).unwrap();
        // Frequencies over evenly spread keys match the row.
        let (_, row) = t.rows().nth(10.min(t.rows().count() - 1)).unwrap();
        let keys = 1_000_000u64;
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..keys {
            let key = (i * (1u64 << 32) / keys) as u32;
            *seen.entry(t.perturb(100, key) - 100).or_insert(0u64) += 1;
        }
        for (v, p) in row {
            let f = seen.get(&v).copied().unwrap_or(0) as f64 / keys as f64;
            assert!((f - p).abs() < 1e-5, "{v}: {f} vs {p}");
        }
    }

    #[test]
    fn impossible_parameters_are_refused() {
        let bad = |d, v, js| PTable::new(params(d, v, js)).is_err();
        assert!(bad(0, 1.0, 0));
        assert!(bad(3, 1.0, 3), "a count of 1 could not leave 1..=3 upwards");
        assert!(bad(2, 0.0, 0));
        assert!(bad(2, 5.0, 0), "variance above D²");
    }

    proptest! {
        #[test]
        fn every_row_is_a_distribution_with_mean_zero(
            d in 1u32..8, js_frac in 0.0f64..1.0, v_frac in 0.05f64..1.0,
        ) {
            let js = ((f64::from(d) - 1.0) * js_frac).floor() as u32;
            let variance = v_frac * f64::from(d * d);
            let t = PTable::new(params(d, variance, js)).unwrap();
            for (n, row) in t.rows() {
                let (total, mean, _) = stats(&row);
                prop_assert!((total - 1.0).abs() < 1e-9);
                prop_assert!(mean.abs() < 1e-9, "row {} mean {}", n, mean);
                for (v, p) in row {
                    prop_assert!(p >= 0.0);
                    let out = n as i64 + v;
                    prop_assert!(out >= 0 && (out == 0 || out > i64::from(js)) || n == 0);
                }
            }
        }
    }
}
