//! Dominance checks for sums and averages (ACRO-style rule sets).
//!
//! A released sum or average can disclose one contributor when a few records
//! make up nearly all of it. [`dominance`] runs alongside the query: for every
//! summed or averaged column of a cell it keeps the total and the largest
//! contributions, then reports which rule the cell breaks as a bit mask:
//! [`NK`] (the `n` largest contributions exceed `k` of the total) and
//! [`P_PERCENT`] (the total minus the two largest is less than `p` times the
//! largest). As in ACRO, contributions are the cell's records and a cell
//! whose total is not positive is not checked.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, Float64Builder, ListBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Expr, Signature, Volatility,
};

use crate::policy::tre::Disclosure;

/// Bit set when the N-K dominance rule is broken.
pub const NK: i32 = 1;
/// Bit set when the p% rule is broken.
pub const P_PERCENT: i32 = 2;

/// `gpdp_dominance(x1, …)`: the rules (bit mask) that any of the columns breaks.
pub fn dominance(columns: Vec<Expr>, rules: &Disclosure) -> Expr {
    AggregateUDF::new_from_impl(Dominance::new(rules)).call(columns)
}

/// The rule parameters, as bits so the function can be compared and hashed.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Dominance {
    n: usize,
    k_bits: Option<u64>,
    p_bits: Option<u64>,
    signature: Signature,
}

impl Dominance {
    fn new(rules: &Disclosure) -> Self {
        Self {
            n: rules.dominance.map_or(1, |d| d.n.max(1)),
            k_bits: rules.dominance.map(|d| d.k.to_bits()),
            p_bits: rules.p_percent.map(f64::to_bits),
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }

    /// How many of the largest contributions to keep.
    fn top(&self) -> usize {
        self.n.max(2)
    }
}

impl AggregateUDFImpl for Dominance {
    fn name(&self) -> &str {
        "gpdp_dominance"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }
    fn is_nullable(&self) -> bool {
        false
    }
    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Cell {
            n: self.n,
            k: self.k_bits.map(f64::from_bits),
            p: self.p_bits.map(f64::from_bits),
            top: self.top(),
            columns: vec![Contributions::default(); args.exprs.len()],
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok((0..args.input_fields.len())
            .map(|i| {
                Arc::new(Field::new(
                    format!("{}[{i}]", args.name),
                    DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
                    true,
                ))
            })
            .collect())
    }
    fn default_value(&self, _: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int32(Some(0)))
    }
}

/// One column's total and its largest contributions, largest first.
#[derive(Debug, Clone, Default)]
struct Contributions {
    total: f64,
    largest: Vec<f64>,
}

impl Contributions {
    fn add(&mut self, x: f64, keep: usize) {
        self.total += x;
        if self.largest.len() < keep || self.largest.last().is_some_and(|&l| x > l) {
            let at = self.largest.partition_point(|&l| l >= x);
            self.largest.insert(at, x);
            self.largest.truncate(keep);
        }
    }

    /// The rules this column breaks.
    fn broken(&self, n: usize, k: Option<f64>, p: Option<f64>) -> i32 {
        if self.total <= 0.0 {
            return 0;
        }
        let mut mask = 0;
        if let Some(k) = k {
            let top_n: f64 = self.largest.iter().take(n).sum();
            if top_n > k * self.total {
                mask |= NK;
            }
        }
        if let Some(p) = p {
            let first = self.largest.first().copied().unwrap_or(0.0);
            let rest = self.total - self.largest.iter().take(2).sum::<f64>();
            if rest < p * first {
                mask |= P_PERCENT;
            }
        }
        mask
    }
}

#[derive(Debug)]
struct Cell {
    n: usize,
    k: Option<f64>,
    p: Option<f64>,
    top: usize,
    columns: Vec<Contributions>,
}

impl Accumulator for Cell {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        for (column, values) in self.columns.iter_mut().zip(values) {
            let as_f64 = cast(values, &DataType::Float64)?;
            for x in as_f64.as_primitive::<Float64Type>().iter().flatten() {
                column.add(x, self.top);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mask = self
            .columns
            .iter()
            .fold(0, |m, c| m | c.broken(self.n, self.k, self.p));
        Ok(ScalarValue::Int32(Some(mask)))
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.columns.len() * (size_of::<Contributions>() + self.top * 8)
    }

    /// Per column: `[total, largest…]`.
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(self
            .columns
            .iter()
            .map(|c| {
                let mut b = ListBuilder::new(Float64Builder::new());
                b.values().append_value(c.total);
                b.values().append_slice(&c.largest);
                b.append(true);
                ScalarValue::List(Arc::new(b.finish()))
            })
            .collect())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        for (column, state) in self.columns.iter_mut().zip(states) {
            for row in state.as_list::<i32>().iter().flatten() {
                let row: &Float64Array = row.as_primitive::<Float64Type>();
                let Some((total, largest)) = row.values().split_first() else {
                    continue;
                };
                // Merge the other side's largest as contributions, then fix
                // the total (they are already counted in it).
                let before = column.total;
                for &x in largest {
                    column.add(x, self.top);
                }
                column.total = before + total;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(xs: &[f64]) -> Contributions {
        let mut c = Contributions::default();
        for &x in xs {
            c.add(x, 2);
        }
        c
    }

    #[test]
    fn one_large_contribution_breaks_both_rules() {
        // 2 largest = 1010 of 1030 (98% > 90%); rest 20 < 10% of 1000.
        assert_eq!(
            of(&[1000.0, 10.0, 5.0, 5.0, 5.0, 5.0]).broken(2, Some(0.9), Some(0.1)),
            NK | P_PERCENT
        );
    }

    #[test]
    fn even_contributions_break_neither() {
        let even = of(&[10.0; 20]);
        assert_eq!(even.total, 200.0);
        assert_eq!(even.largest, vec![10.0, 10.0]);
        assert_eq!(even.broken(2, Some(0.9), Some(0.1)), 0);
    }

    #[test]
    fn each_rule_can_break_alone() {
        // 2 largest = 200 of 205 (97.6%); the rest, 5, is under 10% of 100.
        let c = of(&[100.0, 100.0, 2.5, 2.5]);
        assert_eq!(c.broken(2, Some(0.99), Some(0.1)), P_PERCENT);
        assert_eq!(c.broken(2, Some(0.9), None), NK);
    }

    #[test]
    fn non_positive_totals_are_not_checked() {
        assert_eq!(of(&[-5.0, 1.0]).broken(2, Some(0.9), Some(0.1)), 0);
    }

    /// Through DataFusion, over several partitions (so states are merged).
    #[test]
    fn cells_are_checked_across_partitions() {
        use datafusion::prelude::{SessionContext, col};
        let rules = Disclosure {
            name: "acro",
            redact_at_or_below: 9,
            round_to: 5,
            dominance: Some(crate::policy::tre::Dominance { n: 2, k: 0.9 }),
            p_percent: Some(0.1),
            ckm: None,
            dp: None,
            cell_budget: None,
        };
        // Group 0: one dominant record among many; group 1: even.
        let mut g = vec![0i64; 30];
        let mut x: Vec<f64> = vec![1.0; 30];
        x[17] = 5000.0;
        g.extend([1i64; 30]);
        x.extend([4.0; 30]);
        let batch = arrow::array::RecordBatch::try_from_iter([
            ("g", Arc::new(arrow::array::Int64Array::from(g)) as ArrayRef),
            ("x", Arc::new(Float64Array::from(x)) as ArrayRef),
        ])
        .unwrap();
        let parts: Vec<_> = (0..4).map(|k| vec![batch.slice(k * 15, 15)]).collect();
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt.block_on(async {
            SessionContext::new()
                .read_table(Arc::new(table))
                .unwrap()
                .aggregate(
                    vec![col("g")],
                    vec![dominance(vec![col("x")], &rules).alias("d")],
                )
                .unwrap()
                .sort(vec![col("g").sort(true, false)])
                .unwrap()
                .collect()
                .await
                .unwrap()
        });
        let masks: Vec<i32> = out
            .iter()
            .flat_map(|b| {
                b.column(1)
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(masks, vec![NK | P_PERCENT, 0]);
    }
}
