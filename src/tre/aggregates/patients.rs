//! The patient count behind every released cell, capped at what disclosure
//! control needs to know.
//!
//! A cell is released only if more than `redact_at_or_below` distinct patients
//! stand behind it. So the plan guard does not need `count(DISTINCT patient)`
//! (a hash set of every patient in every group: on 20M events that set is
//! most of the query's cost); it needs to know whether a group reaches
//! `cap = redact_at_or_below + 1` distinct patients. [`patients_at_least`]
//! keeps at most `cap` patients per group and ignores a group's rows once it
//! has them, which turns the check into one comparison per row.
//!
//! Patients are compared on `patient_key` (Int64) or, where only
//! `patient_id` survives, on a 64-bit hash of it. Both are truncations of the
//! keyed pseudonym, so two patients can in principle share one; that only
//! ever merges two patients into one, making a cell look *smaller*: it can
//! cause an extra suppression, never a release of a cell that is too small.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, Int64Builder, ListArray, ListBuilder,
};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility,
};

/// `gpdp_patients(patient)`: the number of distinct patients, capped at `cap`.
pub fn patients_at_least(patient: Expr, cap: u64) -> Expr {
    AggregateUDF::new_from_impl(PatientsAtLeast::new(cap)).call(vec![patient])
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PatientsAtLeast {
    cap: usize,
    signature: Signature,
}

impl PatientsAtLeast {
    fn new(cap: u64) -> Self {
        Self {
            cap: cap.max(1) as usize,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

fn state_field(name: &str) -> FieldRef {
    Arc::new(Field::new(
        format!("{name}[patients]"),
        DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
        true,
    ))
}

impl AggregateUDFImpl for PatientsAtLeast {
    fn name(&self) -> &str {
        "gpdp_patients"
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
        Ok(Box::new(Single {
            cap: self.cap,
            seen: Vec::new(),
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![state_field(args.name)])
    }
    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups {
            cap: self.cap,
            seen: Vec::new(),
        }))
    }
    fn default_value(&self, _: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

/// The patient identities of one input column, as 64-bit keys.
enum Keys<'a> {
    Int(&'a Int64Array),
    Hashed(Vec<Option<i64>>),
}

impl Keys<'_> {
    fn of(values: &ArrayRef) -> Result<Keys<'_>> {
        let hash = |bytes: &[u8]| HASHER.hash_one(bytes) as i64;
        Ok(match values.data_type() {
            DataType::Int64 => Keys::Int(values.as_primitive::<Int64Type>()),
            DataType::FixedSizeBinary(_) => Keys::Hashed(
                values
                    .as_fixed_size_binary()
                    .iter()
                    .map(|v| v.map(hash))
                    .collect(),
            ),
            DataType::Utf8 => Keys::Hashed(
                values
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.map(|s| hash(s.as_bytes())))
                    .collect(),
            ),
            DataType::LargeUtf8 => Keys::Hashed(
                values
                    .as_string::<i64>()
                    .iter()
                    .map(|v| v.map(|s| hash(s.as_bytes())))
                    .collect(),
            ),
            DataType::Utf8View => Keys::Hashed(
                values
                    .as_string_view()
                    .iter()
                    .map(|v| v.map(|s| hash(s.as_bytes())))
                    .collect(),
            ),
            other => return exec_err!("gpdp_patients cannot count patients by {other}"),
        })
    }

    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Keys::Int(a) => a.is_valid(i).then(|| a.value(i)),
            Keys::Hashed(v) => v[i],
        }
    }
}

/// Fixed seeds: keys only need to agree within one process.
static HASHER: ahash::RandomState = ahash::RandomState::with_seeds(
    0x6770_6470_2f76_3100,
    0x7061_7469_656e_7473,
    0x6361_7070_6564_0000,
    0x7364_6300_0000_0001,
);

fn insert(seen: &mut Vec<i64>, cap: usize, key: i64) {
    if seen.len() < cap && !seen.contains(&key) {
        seen.push(key);
    }
}

fn to_state(sets: &[Vec<i64>]) -> ArrayRef {
    let mut builder = ListBuilder::new(Int64Builder::new());
    for set in sets {
        builder.values().append_slice(set);
        builder.append(true);
    }
    Arc::new(builder.finish())
}

fn counts(sets: &[Vec<i64>]) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(
        sets.iter().map(|s| s.len() as i64),
    ))
}

/// One accumulator per group (no GROUP BY).
#[derive(Debug)]
struct Single {
    cap: usize,
    seen: Vec<i64>,
}

impl Accumulator for Single {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let keys = Keys::of(&values[0])?;
        for i in 0..values[0].len() {
            if self.seen.len() >= self.cap {
                break;
            }
            if let Some(k) = keys.get(i) {
                insert(&mut self.seen, self.cap, k);
            }
        }
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.seen.len() as i64)))
    }
    fn size(&self) -> usize {
        size_of::<Self>() + self.seen.capacity() * size_of::<i64>()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = to_state(std::slice::from_ref(&self.seen));
        Ok(vec![ScalarValue::List(Arc::new(
            list.as_list::<i32>().clone(),
        ))])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = states[0].as_list::<i32>();
        for row in lists.iter().flatten() {
            for k in row.as_primitive::<Int64Type>().iter().flatten() {
                insert(&mut self.seen, self.cap, k);
            }
        }
        Ok(())
    }
}

/// The grouped form: one small vector of patient keys per group.
struct Groups {
    cap: usize,
    seen: Vec<Vec<i64>>,
}

impl Groups {
    fn each(
        &mut self,
        rows: usize,
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
        mut add: impl FnMut(&mut Vec<i64>, usize, usize),
    ) {
        self.seen.resize_with(total_num_groups, Vec::new);
        for (i, &g) in group_indices.iter().enumerate().take(rows) {
            if filter.is_some_and(|f| !f.is_valid(i) || !f.value(i)) {
                continue;
            }
            let set = &mut self.seen[g];
            if set.len() < self.cap {
                add(set, self.cap, i);
            }
        }
    }
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let keys = Keys::of(&values[0])?;
        self.each(
            values[0].len(),
            group_indices,
            opt_filter,
            total_num_groups,
            |set, cap, i| {
                if let Some(k) = keys.get(i) {
                    insert(set, cap, k);
                }
            },
        );
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        Ok(counts(&emit_to.take_needed(&mut self.seen)))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![to_state(&emit_to.take_needed(&mut self.seen))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let lists: &ListArray = values[0].as_list::<i32>();
        self.each(
            lists.len(),
            group_indices,
            None,
            total_num_groups,
            |set, cap, i| {
                if lists.is_valid(i) {
                    let row = lists.value(i);
                    for k in row.as_primitive::<Int64Type>().iter().flatten() {
                        insert(set, cap, k);
                    }
                }
            },
        );
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let keys = Keys::of(&values[0])?;
        let sets: Vec<Vec<i64>> = (0..values[0].len())
            .map(|i| {
                let kept = opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i));
                match keys.get(i) {
                    Some(k) if kept => vec![k],
                    _ => Vec::new(),
                }
            })
            .collect();
        Ok(vec![to_state(&sets)])
    }

    fn size(&self) -> usize {
        size_of::<Self>()
            + self.seen.capacity() * size_of::<Vec<i64>>()
            + self.seen.len() * self.cap * size_of::<i64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{SessionContext, col};
    use proptest::prelude::*;

    async fn grouped(rows: &[(i64, i64)], cap: u64) -> Vec<(i64, i64)> {
        let ctx = SessionContext::new();
        let (groups, patients): (Vec<i64>, Vec<i64>) = rows.iter().copied().unzip();
        let batch = arrow::array::RecordBatch::try_from_iter([
            ("g", Arc::new(Int64Array::from(groups)) as ArrayRef),
            ("p", Arc::new(Int64Array::from(patients)) as ArrayRef),
        ])
        .unwrap();
        // Several partitions, so the merge path runs too.
        let parts: Vec<_> = (0..3)
            .map(|k| {
                let n = batch.num_rows();
                let (a, b) = (n * k / 3, n * (k + 1) / 3);
                vec![batch.slice(a, b - a)]
            })
            .collect();
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
        let df = ctx
            .read_table(Arc::new(table))
            .unwrap()
            .aggregate(
                vec![col("g")],
                vec![patients_at_least(col("p"), cap).alias("n")],
            )
            .unwrap();
        let mut out = Vec::new();
        for b in df.collect().await.unwrap() {
            let g = b.column(0).as_primitive::<Int64Type>();
            let n = b.column(1).as_primitive::<Int64Type>();
            out.extend((0..b.num_rows()).map(|i| (g.value(i), n.value(i))));
        }
        out.sort();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Equals min(count(DISTINCT p), cap) per group, across partitions.
        #[test]
        fn equals_capped_distinct_count(
            rows in prop::collection::vec((0i64..4, 0i64..12), 1..200),
            cap in 1u64..10,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(grouped(&rows, cap));
            let mut want = std::collections::BTreeMap::<i64, std::collections::BTreeSet<i64>>::new();
            for (g, p) in &rows {
                want.entry(*g).or_default().insert(*p);
            }
            let want: Vec<(i64, i64)> = want
                .into_iter()
                .map(|(g, s)| (g, (s.len() as i64).min(cap as i64)))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}
