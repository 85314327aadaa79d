//! Safe outputs: statistical disclosure control on every released cell.
//!
//! Each result row (cell) carries the number of distinct patients behind it,
//! computed alongside the query (never guessed from the values). A cell
//! describing `redact_at_or_below` patients or fewer is suppressed: every
//! statistic in it (counts, sums, averages) is withheld and the row says why;
//! the group keys stay, so a reader can see that the cell exists. Counts in
//! released cells are rounded to the nearest `round_to` (OpenSAFELY: redact
//! ≤ 7, round to 5). Rule sets with dominance checks (ACRO) also suppress a
//! row whose sums or averages break the N-K or p% rule
//! ([`super::dominance`]). Each suppression names its rule.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema};

use super::dominance;
use crate::policy::tre::Disclosure;

/// What an output column is, as the plan guard determined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A group key: released as is.
    Key,
    /// A count of rows or patients: rounded.
    Count,
    /// Any other aggregate or derived statistic: released as is unless suppressed.
    Statistic,
}

/// The released result and what was held back.
#[derive(Debug, Clone)]
pub struct Controlled {
    pub batch: RecordBatch,
    /// Per row: `Some(reason)` if the row's statistics were suppressed.
    pub suppressed: Vec<Option<String>>,
    pub suppressed_cells: usize,
}

/// What stands behind each result row, computed alongside the query.
pub struct Behind {
    /// Distinct patients (capped just above the threshold).
    pub patients: Int64Array,
    /// The dominance rules the row's sums and averages break (bit mask of
    /// [`dominance::NK`] and [`dominance::P_PERCENT`]), when the rule set
    /// checks them.
    pub dominance: Option<Int64Array>,
}

/// Why row `i` may not be released, if it may not.
fn reason(i: usize, behind: &Behind, rules: &Disclosure) -> Option<String> {
    let patients = &behind.patients;
    let n = if patients.is_null(i) {
        0
    } else {
        patients.value(i).max(0) as u64
    };
    if n <= rules.redact_at_or_below {
        return Some(format!(
            "{}: {} distinct patients or fewer (threshold {})",
            rules.name, rules.redact_at_or_below, rules.redact_at_or_below
        ));
    }
    // A missing mask is treated as every rule broken: fail closed.
    let mask = behind
        .dominance
        .as_ref()
        .map(|d| if d.is_null(i) { -1 } else { d.value(i) as i32 });
    match (mask, rules.dominance, rules.p_percent) {
        (Some(m), Some(d), _) if m & dominance::NK != 0 => Some(format!(
            "{}: dominance: the {} largest contributions exceed {}% of a sum or average",
            rules.name,
            d.n,
            d.k * 100.0
        )),
        (Some(m), _, Some(p)) if m & dominance::P_PERCENT != 0 => Some(format!(
            "{}: p% rule: a sum or average could be estimated to within {}% of its largest contribution",
            rules.name,
            p * 100.0
        )),
        _ => None,
    }
}

/// Applies the rule set to a result whose rows have `behind` behind them.
pub fn control(
    batch: &RecordBatch,
    kinds: &[ColumnKind],
    behind: &Behind,
    rules: &Disclosure,
) -> Result<Controlled, arrow::error::ArrowError> {
    let rows = batch.num_rows();
    let suppressed: Vec<Option<String>> = (0..rows).map(|i| reason(i, behind, rules)).collect();
    let mut fields = Vec::with_capacity(kinds.len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(kinds.len());
    for ((field, column), kind) in batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .zip(kinds)
    {
        match kind {
            ColumnKind::Key => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
            ColumnKind::Count => {
                let as_int = cast(column, &DataType::Int64)?;
                let values = as_int.as_primitive::<Int64Type>();
                let rounded: Int64Array = (0..rows)
                    .map(|i| {
                        (suppressed[i].is_none() && values.is_valid(i))
                            .then(|| round(values.value(i), rules.round_to))
                    })
                    .collect();
                fields.push(Field::new(field.name(), DataType::Int64, true));
                columns.push(Arc::new(rounded));
            }
            ColumnKind::Statistic => {
                let keep: arrow::array::BooleanArray =
                    (0..rows).map(|i| Some(suppressed[i].is_none())).collect();
                let nulls = new_null_array(column.data_type(), rows);
                let masked = arrow::compute::kernels::zip::zip(&keep, column, &nulls)?;
                fields.push(Field::new(field.name(), field.data_type().clone(), true));
                columns.push(masked);
            }
        }
    }
    let suppressed_cells = suppressed.iter().filter(|s| s.is_some()).count();
    Ok(Controlled {
        batch: RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?,
        suppressed,
        suppressed_cells,
    })
}

/// Nearest multiple of `base` (halves round up); 0 stays 0.
pub fn round(x: i64, base: u64) -> i64 {
    let b = base.max(1) as i64;
    ((x + b / 2).div_euclid(b)) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use proptest::prelude::*;

    const OS: Disclosure = Disclosure {
        name: "opensafely",
        redact_at_or_below: 7,
        round_to: 5,
        dominance: None,
        p_percent: None,
    };

    #[test]
    fn small_cells_are_suppressed_and_counts_rounded() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sex", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new("mean", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["F", "M", "I"])),
                Arc::new(Int64Array::from(vec![1234, 8, 3])),
                Arc::new(Float64Array::from(vec![55.5, 60.1, 70.0])),
            ],
        )
        .unwrap();
        let behind = Behind {
            patients: Int64Array::from(vec![1000, 8, 3]),
            dominance: None,
        };
        let c = control(
            &batch,
            &[ColumnKind::Key, ColumnKind::Count, ColumnKind::Statistic],
            &behind,
            &OS,
        )
        .unwrap();
        let n = c.batch.column(1).as_primitive::<Int64Type>();
        assert_eq!((n.value(0), n.value(1)), (1235, 10));
        assert!(n.is_null(2) && c.batch.column(2).is_null(2));
        assert_eq!(c.batch.column(0).as_string::<i32>().value(2), "I");
        assert_eq!(c.suppressed_cells, 1);
    }

    #[test]
    fn dominated_cells_are_suppressed_naming_the_rule() {
        let acro = Disclosure {
            name: "acro",
            redact_at_or_below: 9,
            round_to: 5,
            dominance: Some(crate::policy::tre::Dominance { n: 2, k: 0.9 }),
            p_percent: Some(0.1),
        };
        let schema = Arc::new(Schema::new(vec![Field::new(
            "total",
            DataType::Float64,
            true,
        )]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Float64Array::from(vec![10.0, 20.0, 30.0, 40.0]))],
        )
        .unwrap();
        let behind = Behind {
            patients: Int64Array::from(vec![50, 50, 50, 50]),
            dominance: Some(Int64Array::from(vec![
                Some(0),
                Some(dominance::NK as i64),
                Some(dominance::P_PERCENT as i64),
                None,
            ])),
        };
        let c = control(&batch, &[ColumnKind::Statistic], &behind, &acro).unwrap();
        assert_eq!(c.suppressed[0], None);
        assert!(
            c.suppressed[1]
                .as_deref()
                .unwrap()
                .contains("dominance: the 2 largest")
        );
        assert!(c.suppressed[2].as_deref().unwrap().contains("p% rule"));
        assert!(c.suppressed[3].is_some(), "a missing mask fails closed");
        assert_eq!(c.suppressed_cells, 3);
    }

    proptest! {
        /// A released count is never from a cell of 1..=7 patients, and is a multiple of 5.
        #[test]
        fn released_counts_are_safe(counts in prop::collection::vec((0i64..200, 0i64..200), 1..40)) {
            let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
            let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(counts.iter().map(|c| c.0).collect::<Vec<_>>()))]).unwrap();
            let behind = Behind {
                patients: Int64Array::from(counts.iter().map(|c| c.1).collect::<Vec<_>>()),
                dominance: None,
            };
            let c = control(&batch, &[ColumnKind::Count], &behind, &OS).unwrap();
            let n = c.batch.column(0).as_primitive::<Int64Type>();
            for (i, (_, p)) in counts.iter().enumerate() {
                if n.is_valid(i) {
                    prop_assert!(*p > 7);
                    prop_assert_eq!(n.value(i) % 5, 0);
                }
            }
        }
    }
}
