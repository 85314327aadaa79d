//! `gpdp_contributors(patient_key)`: the cell key method's aggregate. Per
//! cell, the exact number of distinct contributors and the cell key (the
//! wrapping sum of their record keys, [`super::ckm`]), in one pass and one
//! Int64, packed as `contributors << 32 | cell key`; [`unpack`] splits it
//! in the plan.
//!
//! This is the whole per-cell cost of the cell key method on top of a
//! threshold rule set, so it is built for it (on events by year over 1M
//! patients, a third of the cost of aggregating by cell and patient first,
//! which is what it replaces):
//! - each cell keeps a plain vector of **fingerprints**, one per patient:
//!   the patient's record key in the high 32 bits, the low 32 bits of
//!   their patient key below. A fingerprint tells patients apart as well
//!   as the 64-bit patient key does (two patients of one cell share one
//!   with probability 2⁻⁶⁴; they would count once — a blur, never a
//!   disclosure) and carries the record key, so record keys are computed
//!   once per run of a patient's rows, not once per patient and cell;
//! - a store's rows come grouped by patient and ordered by date, so a row
//!   with the previous row's cell and patient is skipped with one
//!   comparison; the others are pushed, duplicates and all;
//! - partial states are the vectors as they are; the final step keeps the
//!   partitions' arrays without copying them, and deduplicates each cell
//!   once when it is emitted: one pass buckets the fingerprints by their
//!   top bits (record keys are uniform, so buckets are small and in cache)
//!   and each bucket is sorted on its own.
//!
//! The result is exact however rows are spread over files, partitions and
//! batches: every fingerprint reaches the final step, which removes every
//! duplicate. Record keys, fingerprints and cell keys never leave the
//! plan's output, which only disclosure control reads.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, Int64Builder, ListArray, ListBuilder,
};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Operator,
    Signature, Volatility, binary_expr,
};
use datafusion::prelude::lit;

use super::ckm::RecordKeys;

/// `gpdp_contributors(patient)` under `keys`; `weighted`: each patient's
/// key mixed with their number of rows ([`super::ckm::weighted`]), for
/// counts of rows and of values, whose answers depend on how many rows
/// each patient has, not only on who they are.
pub fn contributors(keys: &RecordKeys, patient: Expr, weighted: bool) -> Expr {
    AggregateUDF::new_from_impl(Contributors {
        keys: Arc::new(keys.clone()),
        weighted,
        signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
    })
    .call(vec![patient])
}

/// The contributors and the cell key packed by [`contributors`], as two
/// Int64 expressions.
pub fn unpack(packed: Expr) -> (Expr, Expr) {
    (
        binary_expr(packed.clone(), Operator::BitwiseShiftRight, lit(32i64)),
        binary_expr(packed, Operator::BitwiseAnd, lit(0xFFFF_FFFFi64)),
    )
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Contributors {
    keys: Arc<RecordKeys>,
    weighted: bool,
    signature: Signature,
}

impl AggregateUDFImpl for Contributors {
    fn name(&self) -> &str {
        if self.weighted {
            "gpdp_contributors_by_rows"
        } else {
            "gpdp_contributors"
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn is_nullable(&self) -> bool {
        false
    }
    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(OneCell {
            keys: self.keys.clone(),
            weighted: self.weighted,
            cell: Cell::default(),
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |what: &str| {
            Arc::new(Field::new(
                format!("{}[{what}]", args.name),
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                true,
            ))
        };
        Ok(vec![list("fingerprints"), list("rows")])
    }
    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Cells {
            keys: self.keys.clone(),
            weighted: self.weighted,
            cells: Vec::new(),
            bytes: 0,
        }))
    }
    fn default_value(&self, _: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

/// A patient's fingerprint: record key high, patient key's low bits low.
fn fingerprint(record_key: u32, patient: i64) -> i64 {
    ((u64::from(record_key) << 32) | (patient as u64 & 0xFFFF_FFFF)) as i64
}

fn patient_keys(values: &ArrayRef) -> Result<&Int64Array> {
    match values.data_type() {
        DataType::Int64 => Ok(values.as_primitive::<Int64Type>()),
        other => exec_err!("gpdp_contributors counts patients by patient_key, not {other}"),
    }
}

/// The rows that count: non-null, and passing the FILTER if there is one
/// (`None`: every row).
fn counted(keys: &Int64Array, filter: Option<&BooleanArray>) -> Option<BooleanBuffer> {
    let passed = filter.map(|f| match f.nulls() {
        Some(n) => f.values() & n.inner(),
        None => f.values().clone(),
    });
    match (keys.logical_nulls(), passed) {
        (None, None) => None,
        (Some(n), Some(f)) => Some(n.inner() & &f),
        (Some(n), None) => Some(n.inner().clone()),
        (None, Some(f)) => Some(f),
    }
}

/// A partial state's fingerprints and (weighted) their rows.
type Merged = (ArrayRef, Option<ArrayRef>);

/// One cell's fingerprints: its own (from rows, with each one's number of
/// rows when weighted) and whole arrays of them (partitions' partial
/// states, kept as they came).
#[derive(Debug, Default)]
struct Cell {
    own: Vec<i64>,
    rows: Vec<i64>,
    merged: Vec<Merged>,
}

impl Cell {
    fn len(&self) -> usize {
        self.own.len() + self.merged.iter().map(|(a, _)| a.len()).sum::<usize>()
    }

    fn bytes(&self) -> usize {
        (self.own.capacity() + self.rows.capacity()) * size_of::<i64>()
            + self
                .merged
                .iter()
                .map(|(a, r)| (a.len() + r.as_ref().map_or(0, |r| r.len())) * size_of::<i64>())
                .sum::<usize>()
    }

    /// Every `(fingerprint, rows)`; rows are 1 unless weighted.
    fn each(&self, mut f: impl FnMut(i64, i64)) {
        let ones = std::iter::repeat(&1i64);
        if self.rows.is_empty() {
            self.own
                .iter()
                .zip(ones.clone())
                .for_each(|(&x, &n)| f(x, n));
        } else {
            self.own.iter().zip(&self.rows).for_each(|(&x, &n)| f(x, n));
        }
        for (a, r) in &self.merged {
            let a = a.as_primitive::<Int64Type>().values().iter();
            match r {
                Some(r) => a
                    .zip(r.as_primitive::<Int64Type>().values())
                    .for_each(|(&x, &n)| f(x, n)),
                None => a.zip(ones.clone()).for_each(|(&x, &n)| f(x, n)),
            }
        }
    }

    /// `contributors << 32 | cell key`, deduplicating by buckets of the
    /// fingerprints' top bits in `scratch`; weighted, each patient's key
    /// is mixed with their rows summed over their duplicates.
    fn packed(&self, weighted: bool, scratch: &mut Vec<(i64, i64)>) -> i64 {
        let n = self.len();
        let bits = (n / 64).next_power_of_two().trailing_zeros().min(16);
        let bucket = |f: i64| {
            if bits == 0 {
                0
            } else {
                ((f as u64) >> (64 - bits)) as usize
            }
        };
        let mut starts = vec![0usize; (1 << bits) + 1];
        self.each(|f, _| starts[bucket(f) + 1] += 1);
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut next = starts.clone();
        scratch.clear();
        scratch.resize(n, (0, 0));
        self.each(|f, rows| {
            let b = bucket(f);
            scratch[next[b]] = (f, rows);
            next[b] += 1;
        });
        let (mut patients, mut key) = (0i64, 0u32);
        let mut add = |f: i64, rows: i64| {
            let rk = (f as u64 >> 32) as u32;
            patients += 1;
            key = key.wrapping_add(match weighted {
                true => super::ckm::weighted(rk, rows as u64, None),
                false => rk,
            });
        };
        for b in 0..1 << bits {
            let run = &mut scratch[starts[b]..starts[b + 1]];
            run.sort_unstable_by_key(|&(f, _)| f);
            let mut current: Option<(i64, i64)> = None;
            for &(f, rows) in run.iter() {
                current = match current {
                    Some((g, total)) if g == f => Some((g, total + rows)),
                    Some((g, total)) => {
                        add(g, total);
                        Some((f, rows))
                    }
                    None => Some((f, rows)),
                };
            }
            if let Some((g, total)) = current {
                add(g, total);
            }
        }
        (patients << 32) | i64::from(key)
    }

    /// Every fingerprint (and its rows), as one entry of a partial state.
    fn append_to(
        &self,
        fingerprints: &mut ListBuilder<Int64Builder>,
        rows: &mut ListBuilder<Int64Builder>,
    ) {
        fingerprints.values().append_slice(&self.own);
        rows.values().append_slice(&self.rows);
        for (a, r) in &self.merged {
            fingerprints
                .values()
                .append_slice(a.as_primitive::<Int64Type>().values());
            if let Some(r) = r {
                rows.values()
                    .append_slice(r.as_primitive::<Int64Type>().values());
            }
        }
        fingerprints.append(true);
        rows.append(true);
    }

    /// Takes a partial state's entry `i` (weighted: with its rows).
    fn merge(&mut self, fingerprints: &ListArray, rows: &ListArray, i: usize, weighted: bool) {
        if fingerprints.is_valid(i) && !fingerprints.value(i).is_empty() {
            let r = (weighted && rows.is_valid(i)).then(|| rows.value(i));
            self.merged.push((fingerprints.value(i), r));
        }
    }
}

fn to_state<'a>(cells: impl ExactSizeIterator<Item = &'a Cell>) -> [ArrayRef; 2] {
    let mut fingerprints = ListBuilder::with_capacity(Int64Builder::new(), cells.len());
    let mut rows = ListBuilder::with_capacity(Int64Builder::new(), cells.len());
    for c in cells {
        c.append_to(&mut fingerprints, &mut rows);
    }
    [Arc::new(fingerprints.finish()), Arc::new(rows.finish())]
}

fn lists(states: &[ArrayRef]) -> (&ListArray, &ListArray) {
    (states[0].as_list::<i32>(), states[1].as_list::<i32>())
}

/// One accumulator for a query without GROUP BY.
#[derive(Debug)]
struct OneCell {
    keys: Arc<RecordKeys>,
    weighted: bool,
    cell: Cell,
}

impl Accumulator for OneCell {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        for p in patient_keys(&values[0])?.iter().flatten() {
            let f = fingerprint(self.keys.record_key(p), p);
            match (self.cell.own.last() == Some(&f), self.weighted) {
                (true, true) => *self.cell.rows.last_mut().expect("one per fingerprint") += 1,
                (true, false) => {}
                (false, weighted) => {
                    self.cell.own.push(f);
                    if weighted {
                        self.cell.rows.push(1);
                    }
                }
            }
        }
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        let packed = self.cell.packed(self.weighted, &mut Vec::new());
        Ok(ScalarValue::Int64(Some(packed)))
    }
    fn size(&self) -> usize {
        size_of::<Self>() + self.cell.bytes()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(to_state(std::iter::once(&self.cell))
            .into_iter()
            .map(|a| ScalarValue::List(Arc::new(a.as_list::<i32>().clone())))
            .collect())
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (fingerprints, rows) = lists(states);
        for i in 0..fingerprints.len() {
            self.cell.merge(fingerprints, rows, i, self.weighted);
        }
        Ok(())
    }
}

/// The grouped form: a [`Cell`] per group.
struct Cells {
    keys: Arc<RecordKeys>,
    weighted: bool,
    cells: Vec<Cell>,
    /// The cells' memory, kept as it grows (DataFusion asks after every
    /// batch; summing over every group each time would cost more).
    bytes: usize,
}

impl Cells {
    fn take(&mut self, emit_to: EmitTo) -> Vec<Cell> {
        let taken = emit_to.take_needed(&mut self.cells);
        self.bytes -= taken.iter().map(Cell::bytes).sum::<usize>();
        taken
    }
}

impl GroupsAccumulator for Cells {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let keys = patient_keys(&values[0])?;
        self.cells.resize_with(total_num_groups, Cell::default);
        let (cells, keys_of, weighted) = (&mut self.cells, &self.keys, self.weighted);
        let mut bytes = 0usize;
        // The previous row's cell and patient, and the last record key.
        let (mut last_g, mut last_p) = (usize::MAX, 0i64);
        let (mut rk_p, mut rk) = (None, 0u32);
        let mut push = |g: usize, p: i64| {
            let cell = &mut cells[g];
            if g == last_g && p == last_p {
                // The same patient's next row in the same cell.
                if weighted {
                    *cell.rows.last_mut().expect("one per fingerprint") += 1;
                }
                return;
            }
            (last_g, last_p) = (g, p);
            if rk_p != Some(p) {
                rk_p = Some(p);
                rk = keys_of.record_key(p);
            }
            let before = cell.own.capacity() + cell.rows.capacity();
            cell.own.push(fingerprint(rk, p));
            if weighted {
                cell.rows.push(1);
            }
            bytes += (cell.own.capacity() + cell.rows.capacity() - before) * size_of::<i64>();
        };
        match counted(keys, opt_filter) {
            None => {
                for (&g, &p) in group_indices.iter().zip(keys.values()) {
                    push(g, p);
                }
            }
            Some(rows) => {
                for i in rows.set_indices() {
                    push(group_indices[i], keys.value(i));
                }
            }
        }
        self.bytes += bytes;
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let cells = self.take(emit_to);
        let mut scratch = Vec::new();
        Ok(Arc::new(Int64Array::from_iter_values(
            cells.iter().map(|c| c.packed(self.weighted, &mut scratch)),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(to_state(self.take(emit_to).iter()).into())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let (fingerprints, rows) = lists(values);
        self.cells.resize_with(total_num_groups, Cell::default);
        for (i, &g) in group_indices.iter().enumerate() {
            let before = self.cells[g].bytes();
            self.cells[g].merge(fingerprints, rows, i, self.weighted);
            self.bytes += self.cells[g].bytes() - before;
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let keys = patient_keys(&values[0])?;
        let counted = counted(keys, opt_filter);
        let mut fingerprints = ListBuilder::with_capacity(Int64Builder::new(), keys.len());
        let mut rows = ListBuilder::with_capacity(Int64Builder::new(), keys.len());
        for i in 0..keys.len() {
            if counted.as_ref().is_none_or(|r| r.value(i)) {
                let p = keys.value(i);
                fingerprints
                    .values()
                    .append_value(fingerprint(self.keys.record_key(p), p));
                if self.weighted {
                    rows.values().append_value(1);
                }
            }
            fingerprints.append(true);
            rows.append(true);
        }
        Ok(vec![
            Arc::new(fingerprints.finish()),
            Arc::new(rows.finish()),
        ])
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.cells.capacity() * size_of::<Cell>() + self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{SessionContext, col};
    use proptest::prelude::*;

    type Row = (i64, Option<i64>, bool);

    /// `(group, contributors, cell key)` per group, over `partitions`
    /// partitions, rows filtered to those whose flag is set.
    async fn grouped(rows: &[Row], partitions: usize, weighted: bool) -> Vec<(i64, i64, u32)> {
        let keys = RecordKeys::from_bytes(&[7; 32]);
        let ctx = SessionContext::new();
        let batch = arrow::array::RecordBatch::try_from_iter([
            (
                "g",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "p",
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.1))) as ArrayRef,
            ),
            (
                "f",
                Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.2)))) as ArrayRef,
            ),
        ])
        .unwrap();
        let parts: Vec<_> = (0..partitions)
            .map(|k| {
                let n = batch.num_rows();
                let (a, b) = (n * k / partitions, n * (k + 1) / partitions);
                vec![batch.slice(a, b - a)]
            })
            .collect();
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
        let mut aggregate = contributors(&keys, col("p"), weighted);
        if let Expr::AggregateFunction(call) = &mut aggregate {
            call.params.filter = Some(Box::new(col("f")));
        }
        let df = ctx
            .read_table(Arc::new(table))
            .unwrap()
            .aggregate(vec![col("g")], vec![aggregate.alias("x")])
            .unwrap();
        let mut out = Vec::new();
        for b in df.collect().await.unwrap() {
            let g = b.column(0).as_primitive::<Int64Type>();
            let x = b.column(1).as_primitive::<Int64Type>();
            out.extend(
                (0..b.num_rows()).map(|i| (g.value(i), x.value(i) >> 32, x.value(i) as u32)),
            );
        }
        out.sort();
        out
    }

    /// The same, computed directly: distinct patients and the sum of
    /// their record keys (weighted: mixed with their number of rows).
    fn direct(rows: &[Row], weighted: bool) -> Vec<(i64, i64, u32)> {
        use std::collections::BTreeMap;
        let keys = RecordKeys::from_bytes(&[7; 32]);
        let mut cells = BTreeMap::<i64, BTreeMap<i64, u64>>::new();
        for &(g, p, f) in rows {
            let cell = cells.entry(g).or_default();
            if let (Some(p), true) = (p, f) {
                *cell.entry(p).or_default() += 1;
            }
        }
        cells
            .into_iter()
            .map(|(g, patients)| {
                let key = patients.iter().fold(0u32, |k, (&p, &n)| {
                    let rk = keys.record_key(p);
                    k.wrapping_add(if weighted {
                        crate::tre::ckm::weighted(rk, n, None)
                    } else {
                        rk
                    })
                });
                (g, patients.len() as i64, key)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Equals count(DISTINCT p) FILTER (WHERE f) and the wrapping sum of
        /// the distinct patients' record keys, per group, across partitions;
        /// patients' rows come in runs (as in a store) or scattered.
        #[test]
        fn equals_the_distinct_patients_and_their_record_keys(
            rows in prop::collection::vec(
                (0i64..4, prop::option::weighted(0.9, 0i64..40), prop::bool::weighted(0.8)),
                1..300,
            ),
            runs in prop::bool::ANY,
            partitions in 1usize..4,
            weighted in prop::bool::ANY,
        ) {
            let mut rows = rows;
            if runs {
                rows.sort_by_key(|r| r.1);
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            prop_assert_eq!(
                rt.block_on(grouped(&rows, partitions, weighted)),
                direct(&rows, weighted)
            );
        }
    }

    #[test]
    fn large_cells_use_buckets_and_stay_exact() {
        // Beyond the sizes the proptest reaches: many buckets, duplicates
        // scattered across partitions and runs.
        let rows: Vec<Row> = (0..40_000i64)
            .map(|i| (i % 3, Some((i * 7_919) % 9_973 * 1_000_003), i % 11 != 0))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for weighted in [false, true] {
            assert_eq!(
                rt.block_on(grouped(&rows, 3, weighted)),
                direct(&rows, weighted)
            );
        }
    }
}
