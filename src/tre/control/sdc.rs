//! Safe outputs, after running: statistical disclosure control, per
//! statistic.
//!
//! Every statistic of every cell arrives with its own parts (counts, sums)
//! and the number of distinct patients who contribute to *it* (see
//! [`crate::tre::compile`]). A statistic is released only if:
//! - more than `redact_at_or_below` patients contribute (0 contributors is
//!   redacted too, so "none" and "few" look alike);
//! - under rule sets that check dominance, its per-patient contributions
//!   pass the N-K and p% rules and no value is negative (ACRO's "review").
//!
//! Counts are then rounded to the nearest `round_to`; means and variances
//! are derived from the controlled parts. A redacted statistic is null
//! (`[REDACTED]` in text). A row whose statistics are all redacted is
//! **withheld**: it is not in the result, and nothing the researcher sees
//! counts withheld rows (the audit log does). ORDER BY and LIMIT apply to
//! the released rows only, so neither can reveal a withheld one, and the
//! row limit counts released rows.

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, Int64Array, Int64Builder, RecordBatch,
    UInt32Array,
};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type, SchemaRef};
use arrow::error::ArrowError;

use super::{
    ColumnKind, Controlled, OperatorOnly, dominance, ordered_and_limited, released_schema,
};
use crate::policy::ptable::PTable;
use crate::policy::tre::Disclosure;
use crate::tre::checked::{Item, Release, StatKind};

/// Where the parts of one statistic are in the compiled plan's output:
/// [`compile`](crate::tre::compile) writes them, [`Control`] reads them.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    /// Count statistics: the count. Others: the number of non-null values. Int64.
    pub count: usize,
    /// Sum of the values (Float64), for sums, means and variances.
    pub sum: Option<usize>,
    /// Sum of the squared values (Float64), for variances.
    pub squares: Option<usize>,
    /// Distinct contributing patients (Int64; capped at threshold + 1 in
    /// the per-cell shape).
    pub contributors: usize,
    /// The dominance rules broken, as a bit mask (Int32), per-patient shape only.
    pub dominance: Option<usize>,
    /// The smallest value (Float64), per-patient shape only: a negative
    /// value sends the cell to review.
    pub minimum: Option<usize>,
    /// The sum of the contributors' record keys (Int64), under the cell key
    /// method only ([`super::ckm::cell_key`] folds it).
    pub cell_key: Option<usize>,
    /// The largest contribution (one patient's sum, Float64), for sums and
    /// means under the cell key method: their noise is scaled to it.
    pub largest: Option<usize>,
    /// For sums and means under the cell key method, the cell key of their
    /// count of values alone (Int64): that count is perturbed as a count
    /// of the same values is, so a mean holds no second draw of it.
    pub count_key: Option<usize>,
}

/// Why a statistic was redacted (for the audit log only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    Threshold,
    Dominance,
    PPercent,
    Negative,
}

impl Why {
    pub fn name(self) -> &'static str {
        match self {
            Why::Threshold => "threshold",
            Why::Dominance => "dominance",
            Why::PPercent => "p_percent",
            Why::Negative => "negative_values",
        }
    }
}

/// One statistic's controlled values over a batch of cells.
enum Values {
    Counts(Int64Array),
    Reals(Float64Array),
}

/// Disclosure control, fed one compiled batch at a time.
pub struct Control<'a> {
    release: &'a Release,
    parts: &'a [Parts],
    rules: &'a Disclosure,
    ptable: Option<PTable>,
    schema: SchemaRef,
    kinds: Vec<ColumnKind>,
    released: Vec<RecordBatch>,
    operator: OperatorOnly,
}

impl<'a> Control<'a> {
    pub fn new(release: &'a Release, parts: &'a [Parts], rules: &'a Disclosure) -> Control<'a> {
        let (schema, kinds) = released_schema(release, None);
        Control {
            release,
            parts,
            rules,
            // Rebuilt per query (a dozen small rows: microseconds); the
            // policy checked at load that it can be built.
            ptable: rules
                .ckm
                .map(|p| PTable::new(p).expect("the policy validated its ptable")),
            schema,
            kinds,
            released: Vec::new(),
            operator: OperatorOnly::default(),
        }
    }

    /// Controls one batch of the compiled plan's output (keys, then parts).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<(), ArrowError> {
        let rows = batch.num_rows();
        self.operator.groups += rows;
        let values: Vec<Values> = self
            .release
            .statistics
            .iter()
            .zip(self.parts)
            .map(|(s, p)| self.statistic(batch, s.kind, p))
            .collect::<Result<_, _>>()?;
        let released_statistics: Vec<usize> = self
            .release
            .outputs
            .iter()
            .filter_map(|o| match o.item {
                Item::Statistic(s) => Some(s),
                Item::Key(_) => None,
            })
            .collect();
        let is_valid = |v: &Values, i: usize| match v {
            Values::Counts(a) => a.is_valid(i),
            Values::Reals(a) => a.is_valid(i),
        };
        let keep: Vec<u32> = (0..rows)
            .filter(|&i| released_statistics.iter().any(|&s| is_valid(&values[s], i)))
            .map(|i| i as u32)
            .collect();
        self.operator.withheld_rows += rows - keep.len();
        if keep.is_empty() {
            return Ok(());
        }
        let keep = UInt32Array::from(keep);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.release.outputs.len());
        for o in &self.release.outputs {
            let column: ArrayRef = match o.item {
                Item::Key(k) => take(batch.column(k).as_ref(), &keep, None)?,
                Item::Statistic(s) => match &values[s] {
                    Values::Counts(a) => take(a, &keep, None)?,
                    Values::Reals(a) => take(a, &keep, None)?,
                },
            };
            columns.push(column);
        }
        // Keys keep their type; a dictionary or view type may differ from
        // the declared one only in encoding, which the cast settles.
        let columns = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c)
                } else {
                    arrow::compute::cast(&c, f.data_type())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.released
            .push(RecordBatch::try_new(self.schema.clone(), columns)?);
        Ok(())
    }

    /// The controlled values of one statistic: null where redacted.
    fn statistic(
        &mut self,
        batch: &RecordBatch,
        kind: StatKind,
        p: &Parts,
    ) -> Result<Values, ArrowError> {
        let int = |i: usize| -> Result<Int64Array, ArrowError> {
            Ok(arrow::compute::cast(batch.column(i), &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone())
        };
        let real = |i: usize| -> Result<Float64Array, ArrowError> {
            Ok(arrow::compute::cast(batch.column(i), &DataType::Float64)?
                .as_primitive::<Float64Type>()
                .clone())
        };
        let count = int(p.count)?;
        let contributors = int(p.contributors)?;
        let mask = p
            .dominance
            .map(|i| {
                Ok::<_, ArrowError>(
                    arrow::compute::cast(batch.column(i), &DataType::Int32)?
                        .as_primitive::<Int32Type>()
                        .clone(),
                )
            })
            .transpose()?;
        let minimum = p.minimum.map(real).transpose()?;
        let total = p.sum.map(real).transpose()?;
        let squares = p.squares.map(real).transpose()?;
        let rows = batch.num_rows();
        // Under the cell key method every count is perturbed by the cell's
        // key, the number of contributors too, before the threshold: what
        // decides and what is released are both noisy. No key (a cell key
        // expected but missing) fails closed: redacted.
        let cell_keys = p.cell_key.map(int).transpose()?;
        // A sum's or mean's count of values has the key of a count of
        // those values ([`Parts::count_key`]).
        let count_keys = p.count_key.map(int).transpose()?;
        let key_in = |keys: &Option<Int64Array>, i: usize| {
            keys.as_ref()
                .filter(|k| k.is_valid(i))
                .map(|k| super::ckm::cell_key(k.value(i)))
        };
        let key_at = |i: usize| key_in(&cell_keys, i);
        let noisy = |x: i64, i: usize| -> Option<i64> {
            match &self.ptable {
                None => Some(x),
                Some(t) => key_at(i).map(|key| t.perturb(x, key)),
            }
        };
        // Whether a sum or mean is released is decided by its contributors
        // perturbed as those of a count of its values are (by the count's
        // key): one draw decides for one set of records, so a mean is never
        // released where the count of the same values is redacted — a
        // second, independent threshold draw over the same patients would
        // tell more about how many there are.
        let decides = |x: i64, i: usize| -> Option<i64> {
            match (&self.ptable, &count_keys) {
                (Some(t), Some(_)) => key_in(&count_keys, i).map(|key| t.perturb(x, key)),
                _ => noisy(x, i),
            }
        };
        let mut why: Vec<Option<Why>> = Vec::with_capacity(rows);
        for i in 0..rows {
            let exact = if contributors.is_valid(i) {
                contributors.value(i)
            } else {
                0
            };
            let n = decides(exact, i).unwrap_or(0);
            let reason = if n <= self.rules.redact_at_or_below as i64 {
                Some(Why::Threshold)
            } else if minimum
                .as_ref()
                .is_some_and(|m| m.is_valid(i) && m.value(i) < 0.0)
            {
                Some(Why::Negative)
            } else {
                // A missing mask where one is expected breaks every rule: fail closed.
                match mask
                    .as_ref()
                    .map(|m| if m.is_valid(i) { m.value(i) } else { -1 })
                {
                    Some(m) if m & dominance::NK != 0 => Some(Why::Dominance),
                    Some(m) if m & dominance::P_PERCENT != 0 => Some(Why::PPercent),
                    _ => None,
                }
            };
            if let Some(w) = reason {
                *self
                    .operator
                    .redacted_by_reason
                    .entry(w.name())
                    .or_default() += 1;
            }
            why.push(reason);
        }
        let get = |a: &Option<Float64Array>, i: usize| {
            a.as_ref().filter(|a| a.is_valid(i)).map(|a| a.value(i))
        };
        Ok(match kind {
            StatKind::Rows | StatKind::Patients | StatKind::Values => {
                let mut b = Int64Builder::with_capacity(rows);
                for (i, w) in why.iter().enumerate() {
                    b.append_option(
                        (w.is_none() && count.is_valid(i))
                            .then(|| noisy(count.value(i), i))
                            .flatten()
                            .map(|c| round(c, self.rules.round_to)),
                    );
                }
                Values::Counts(b.finish())
            }
            _ => {
                let largest = p.largest.map(real).transpose()?;
                let mut b = Float64Builder::with_capacity(rows);
                for (i, w) in why.iter().enumerate() {
                    let n = if count.is_valid(i) { count.value(i) } else { 0 };
                    let value = match (w, get(&total, i), &self.ptable) {
                        // From the count as released (rounded), never the
                        // exact one: a sum over its mean would give it away.
                        (None, Some(s), None) => {
                            let released = round(n, self.rules.round_to);
                            derive(kind, released, s, get(&squares, i))
                        }
                        // The cell key method: the perturbed sum over the
                        // count of values perturbed as a count of them is
                        // (no second draw of it). No key or no largest
                        // contribution fails closed (redacted).
                        (None, Some(s), Some(t)) => {
                            match (key_at(i), get(&largest, i), key_in(&count_keys, i)) {
                                (Some(key), Some(top), Some(count_key)) => {
                                    let n = t.perturb(n, count_key);
                                    let m = t.params().magnitude;
                                    let s = s + super::ckm::magnitude_perturbation(key, top, m);
                                    derive(kind, n, s, None)
                                }
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    b.append_option(value.map(settle));
                }
                Values::Reals(b.finish())
            }
        })
    }

    /// The released result: released rows in order, within the limit.
    pub fn finish(self, max_rows: usize) -> Result<Result<Controlled, usize>, ArrowError> {
        let batch = concat_batches(&self.schema, &self.released)?;
        let identity: Vec<usize> = (0..self.release.outputs.len()).collect();
        let (batch, redacted_cells) =
            ordered_and_limited(&batch, self.release, &identity, &self.kinds)?;
        if batch.num_rows() > max_rows {
            return Ok(Err(batch.num_rows()));
        }
        Ok(Ok(Controlled {
            batch,
            kinds: self.kinds,
            redacted_cells,
            operator: self.operator,
        }))
    }
}

/// A released real to 10 significant digits. A sum adds values in the
/// order the partitions deliver them, which can differ between runs in
/// the last bits: the same question must give the same answer every time
/// (under the cell key method, one answer per set of contributors), and
/// the digits past the tenth carry nothing a researcher needs.
fn settle(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 9 - x.abs().log10().floor() as i32;
    if digits > 300 {
        return x;
    }
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// A sum, mean, variance or standard deviation from its parts.
fn derive(kind: StatKind, n: i64, sum: f64, squares: Option<f64>) -> Option<f64> {
    let n_f = n as f64;
    match kind {
        StatKind::Sum => Some(sum),
        StatKind::Mean if n > 0 => Some(sum / n_f),
        StatKind::Variance | StatKind::StdDev if n > 1 => {
            let mean = sum / n_f;
            let var = ((squares? - n_f * mean * mean) / (n_f - 1.0)).max(0.0);
            Some(if kind == StatKind::StdDev {
                var.sqrt()
            } else {
                var
            })
        }
        _ => None,
    }
}

/// Nearest multiple of `base` (halves round up); 0 stays 0.
pub fn round(x: i64, base: u64) -> i64 {
    let b = base.max(1) as i64;
    ((x + b / 2).div_euclid(b)) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rounding_is_to_the_nearest_base() {
        assert_eq!(round(0, 5), 0);
        assert_eq!(round(2, 5), 0);
        assert_eq!(round(3, 5), 5);
        assert_eq!(round(1234, 5), 1235);
        assert_eq!(round(8, 5), 10);
    }

    #[test]
    fn released_reals_keep_ten_significant_digits_whatever_their_last_bits() {
        let a = 15723.831690733643_f64;
        let b = 15723.831690733645_f64;
        assert_ne!(a, b);
        assert_eq!(settle(a), settle(b));
        assert_eq!(settle(a), 15723.83169);
        assert_eq!(settle(0.1 + 0.2), 0.3);
        assert_eq!(settle(-63.503820224454486), -63.50382022);
        assert_eq!(settle(1.5e15 + 3.0), 1.5e15);
        assert_eq!(settle(0.0), 0.0);
        assert!(settle(f64::NAN).is_nan());
        assert_eq!(settle(1e-310), 1e-310);
    }

    #[test]
    fn parts_give_means_and_variances() {
        // 1, 2, 3, 4: sum 10, squares 30, mean 2.5, sample variance 5/3.
        assert_eq!(derive(StatKind::Mean, 4, 10.0, None), Some(2.5));
        let v = derive(StatKind::Variance, 4, 10.0, Some(30.0)).unwrap();
        assert!((v - 5.0 / 3.0).abs() < 1e-12);
        let s = derive(StatKind::StdDev, 4, 10.0, Some(30.0)).unwrap();
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(derive(StatKind::Variance, 1, 10.0, Some(100.0)), None);
    }

    proptest! {
        /// Rounded counts are multiples of the base and within half a base.
        #[test]
        fn rounded_counts_are_close_multiples(x in 0i64..1_000_000, base in 1u64..20) {
            let r = round(x, base);
            prop_assert_eq!(r % base as i64, 0);
            prop_assert!((r - x).abs() <= base as i64 / 2 + 1);
        }
    }
}
