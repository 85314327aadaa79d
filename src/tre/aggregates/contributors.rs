//! `gpdp_contributors(patient_key)`: the cell key method's aggregate. Per
//! cell, the exact number of distinct contributors and the cell key (the
//! wrapping sum of their record keys, [`super::record_keys`]), in one pass and one
//! Int64, packed as `contributors << 32 | cell key`; [`unpack`] splits it
//! in the plan.
//!
//! This is the whole per-cell cost of the cell key method on top of a
//! threshold rule set, so it is built for it (on events by year over 1M
//! patients, a third of the cost of aggregating by cell and patient first,
//! which is what it replaces):
//! - each cell keeps a plain vector of **fingerprints**, one per run of a
//!   patient's rows: the patient's record key (32 bits), the low 20 bits
//!   of their patient key, and the run's number of rows (12 bits). Who a
//!   fingerprint is (its top 52 bits) tells patients apart — two patients
//!   of one cell share it with probability 2⁻⁵², and would count once: a
//!   blur, never a disclosure — and carries the record key, so record
//!   keys are computed once per run of a patient's rows, not once per
//!   patient and cell; the rows let a count of rows key each patient by
//!   how many rows they have ([`super::record_keys::weighted`]);
//! - a store's rows come grouped by patient and ordered by date, so each
//!   span of consecutive rows with one cell and patient is found in one
//!   tight pass and pushed as one fingerprint with its rows, duplicates
//!   and all;
//! - partial states are tickets for the partitions' cells, not their
//!   fingerprints ([`super::handoff`]);
//! - the final step keeps the vectors it claims without copying them, and
//!   deduplicates each cell once when it is emitted: the fingerprints are
//!   spread into buckets by their top bits (record keys are uniform, so
//!   buckets are even), and in each bucket a bitmap, in cache, finds the
//!   few that share a slot; only those are sorted, which brings one
//!   patient's entries together, to be counted once with their rows
//!   summed; the rest are one patient each.
//!
//! The result is exact however rows are spread over files, partitions and
//! batches: every fingerprint reaches the final step, which removes every
//! duplicate. Record keys, fingerprints and cell keys never leave the
//! plan's output, which only disclosure control reads.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, Int64Builder, ListArray, ListBuilder,
};
use datafusion::arrow::buffer::{BooleanBuffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Operator,
    Signature, Volatility, binary_expr,
};
use datafusion::prelude::lit;

use super::handoff::InFlight;
use super::record_keys::RecordKeys;

/// `gpdp_contributors(patient)` under `keys`; `weighted`: each patient's
/// key mixed with their number of rows ([`super::record_keys::weighted`]), for
/// counts of rows and of values, whose answers depend on how many rows
/// each patient has, not only on who they are.
pub fn contributors(keys: &RecordKeys, patient: Expr, weighted: bool) -> Expr {
    AggregateUDF::new_from_impl(Contributors {
        keys: Arc::new(keys.clone()),
        weighted,
        in_flight: InFlight::default(),
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
    in_flight: InFlight<Cell>,
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
            in_flight: self.in_flight.clone(),
            cell: Cell::default(),
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[fingerprints]", args.name),
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true))),
                true,
            )),
            Arc::new(Field::new(
                format!("{}[ticket]", args.name),
                DataType::Int64,
                true,
            )),
        ])
    }
    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Cells {
            keys: self.keys.clone(),
            weighted: self.weighted,
            in_flight: self.in_flight.clone(),
            cells: Vec::new(),
            bytes: 0,
        }))
    }
    fn default_value(&self, _: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

/// Bits of a fingerprint that count the patient's rows in one entry.
const ROW_BITS: u32 = 12;
const ROWS: i64 = (1 << ROW_BITS) - 1;

/// A patient's rows in a cell: record key (32 bits), the patient key's
/// low 20 bits, and a count of rows (12 bits, at most [`ROWS`]).
fn fingerprint(record_key: u32, patient: i64, rows: i64) -> i64 {
    let who = (u64::from(record_key) << 20) | (patient as u64 & 0xF_FFFF);
    ((who << ROW_BITS) | rows as u64) as i64
}

/// Who a fingerprint is (without its rows): equal for one patient's
/// entries, whatever their rows; two patients of a cell share it with
/// probability 2⁻⁵², which would count them as one — a blur of one in a
/// cell's count, deterministic, never a disclosure.
fn who(f: i64) -> u64 {
    f as u64 >> ROW_BITS
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

/// One cell's fingerprints: its own (from rows) and whole arrays of them
/// (partitions' partial states, kept as they came).
#[derive(Debug, Default)]
struct Cell {
    own: Vec<i64>,
    merged: Vec<ScalarBuffer<i64>>,
}

/// A partial state whose cells are all handed to `in_flight`: each
/// cell's list is empty and its ticket (null for a cell without
/// fingerprints) claims it.
fn state_of(in_flight: &InFlight<Cell>, cells: impl IntoIterator<Item = Cell>) -> Vec<ArrayRef> {
    let held = cells.into_iter().map(|c| (c.len() > 0).then_some(c));
    let tickets = in_flight.hold_each(held);
    let field = Arc::new(Field::new_list_field(DataType::Int64, true));
    let lists = ListArray::new(
        field,
        OffsetBuffer::new_zeroed(tickets.len()),
        Arc::new(Int64Array::from(Vec::<i64>::new())),
        None,
    );
    vec![Arc::new(lists), Arc::new(tickets)]
}

/// Fingerprints per chunk of a cell's own: 512 KiB.
const CHUNK: usize = if cfg!(test) { 8 } else { 1 << 16 };

/// Fingerprints per bucket when deduplicating: the bucket's bitmaps
/// (16 bits per fingerprint, twice) stay in the core's first cache.
const BUCKET: usize = if cfg!(test) { 16 } else { 4096 };

/// Space [`Cell::packed`] reuses from bucket to bucket and cell to cell.
#[derive(Debug, Default)]
struct Scratch {
    /// The cell's fingerprints, bucket by bucket.
    spread: Vec<i64>,
    /// Slots taken, and slots taken more than once, as bits.
    seen: Vec<u64>,
    twice: Vec<u64>,
    /// Fingerprints in slots taken more than once.
    suspects: Vec<i64>,
}

impl Scratch {
    /// Calls `add(who, rows, true)` once per patient among `bucket`'s
    /// fingerprints (their top `skip` bits are the bucket's), with their
    /// rows summed, and `add(…, false)` for entries that do not count. A
    /// fingerprint's slot is the next bits of its record key, in bitmaps
    /// of 16 bits per fingerprint: one pass marks the slots taken twice,
    /// and only the fingerprints in those (about one in sixteen, and
    /// every duplicate) are sorted to bring one patient's entries
    /// together; the others are one patient each.
    fn distinct(&mut self, bucket: &[i64], skip: u32, add: &mut impl FnMut(u64, i64, bool)) {
        let bits = (16 * bucket.len().max(1))
            .next_power_of_two()
            .trailing_zeros()
            .clamp(6, 64 - skip);
        let slot = |f: i64| ((f as u64) << skip >> (64 - bits)) as usize;
        let words = 1usize << (bits - 6);
        let (seen, twice, suspects) = (&mut self.seen, &mut self.twice, &mut self.suspects);
        seen.clear();
        seen.resize(words, 0);
        twice.clear();
        twice.resize(words, 0);
        for &f in bucket {
            let (w, bit) = (slot(f) >> 6, 1u64 << (slot(f) & 63));
            twice[w] |= seen[w] & bit;
            seen[w] |= bit;
        }
        // Without a branch: every fingerprint is written as a suspect and
        // offered to `add`, and whether it is one decides which counts (a
        // branch mispredicted on each suspect, one in sixteen).
        suspects.clear();
        suspects.resize(bucket.len(), 0);
        let mut n = 0;
        for &f in bucket {
            let s = slot(f);
            let shared = (twice[s >> 6] >> (s & 63)) & 1 != 0;
            suspects[n] = f;
            n += usize::from(shared);
            add(who(f), f & ROWS, !shared);
        }
        suspects.truncate(n);
        // Sorted, one patient's entries are together (who is the top bits).
        suspects.sort_unstable();
        let mut current: Option<(u64, i64)> = None;
        for &f in suspects.iter() {
            let (w, rows) = (who(f), f & ROWS);
            current = match current {
                Some((c, total)) if c == w => Some((c, total + rows)),
                Some((c, total)) => {
                    add(c, total, true);
                    Some((w, rows))
                }
                None => Some((w, rows)),
            };
        }
        if let Some((c, total)) = current {
            add(c, total, true);
        }
    }
}

impl Cell {
    fn len(&self) -> usize {
        self.own.len() + self.merged.iter().map(|a| a.len()).sum::<usize>()
    }

    fn bytes(&self) -> usize {
        (self.own.capacity() + self.merged.iter().map(|a| a.len()).sum::<usize>())
            * size_of::<i64>()
    }

    /// Every fingerprint: its own, then the merged arrays'.
    fn fingerprints(&self) -> impl Iterator<Item = i64> + Clone + '_ {
        let merged = self.merged.iter().flat_map(|a| a.iter().copied());
        self.own.iter().copied().chain(merged)
    }

    /// Adds `rows` rows of the patient `(rk, p)`: one fingerprint, or
    /// more when they are more than one can count. Returns the bytes it
    /// reserved: a full chunk of [`CHUNK`] goes to `merged` as it is and a
    /// new one begins, so fingerprints are never copied as a cell grows.
    fn add(&mut self, rk: u32, p: i64, mut rows: u64) -> usize {
        let mut reserved = 0;
        while rows > 0 {
            if self.own.len() == CHUNK {
                // The full chunk is counted already (its length is its
                // capacity); the new one is not.
                let full = std::mem::replace(&mut self.own, Vec::with_capacity(CHUNK));
                self.merged.push(ScalarBuffer::from(full));
                reserved += CHUNK;
            }
            let (capacity, n) = (self.own.capacity(), rows.min(ROWS as u64));
            self.own.push(fingerprint(rk, p, n as i64));
            reserved += self.own.capacity() - capacity;
            rows -= n;
        }
        reserved
    }

    /// `contributors << 32 | cell key`, each patient once; weighted, each
    /// patient's key is mixed with their rows summed over their entries.
    ///
    /// The fingerprints are spread into buckets of about [`BUCKET`] by the
    /// top bits of their record key, which are uniform
    /// ([`super::layout::spread`]); each bucket is then deduplicated in
    /// the core's cache ([`Scratch::distinct`]). A bitmap of the whole cell, or sorting
    /// buckets of 64, cost a cache miss per fingerprint: a third of the
    /// cell key method's cost on events by year.
    fn packed(&self, weighted: bool, scratch: &mut Scratch) -> i64 {
        use super::layout::{bucket_bits, spread};
        let bits = bucket_bits(self.len(), BUCKET);
        let into = std::mem::take(&mut scratch.spread);
        let (starts, spread) = spread(self.fingerprints(), bits, |f| f as u64, into);
        let (mut patients, mut key) = (0i64, 0u32);
        let mut add = |who: u64, rows: i64, counts: bool| {
            let rk = (who >> 20) as u32;
            let k = match weighted {
                true => super::record_keys::weighted(rk, rows as u64, None),
                false => rk,
            };
            patients += i64::from(counts);
            key = key.wrapping_add(k & u32::from(counts).wrapping_neg());
        };
        for b in 0..1 << bits {
            scratch.distinct(&spread[starts[b]..starts[b + 1]], bits, &mut add);
        }
        scratch.spread = spread;
        (patients << 32) | i64::from(key)
    }

    /// Takes another cell's fingerprints, without copying them.
    fn absorb(&mut self, other: Cell) {
        if !other.own.is_empty() {
            self.merged.push(ScalarBuffer::from(other.own));
        }
        self.merged.extend(other.merged);
    }

    /// Takes a partial state's entry `i`: the fingerprints in its list
    /// (non-null), and the cell its ticket holds in `in_flight`.
    fn merge(&mut self, state: State, i: usize, in_flight: &InFlight<Cell>) -> Result<()> {
        let (lists, tickets) = state;
        if lists.is_valid(i) && !lists.value(i).is_empty() {
            let values = lists.value(i);
            self.merged
                .push(values.as_primitive::<Int64Type>().values().clone());
        }
        if tickets.is_valid(i) {
            self.absorb(in_flight.claim(tickets.value(i), "gpdp_contributors")?);
        }
        Ok(())
    }
}

/// A partial state's two columns: lists of fingerprints and tickets.
type State<'a> = (&'a ListArray, &'a Int64Array);

fn state_columns(state: &[ArrayRef]) -> Result<State<'_>> {
    match state {
        [lists, tickets] => match (lists.as_list_opt::<i32>(), tickets.as_primitive_opt()) {
            (Some(lists), Some(tickets)) => Ok((lists, tickets)),
            _ => exec_err!("gpdp_contributors: a partial state of the wrong types"),
        },
        _ => exec_err!(
            "gpdp_contributors: a partial state of {} columns",
            state.len()
        ),
    }
}

/// Adds spans of counted rows as `(cell, patient, rows)` to `cells`;
/// returns the bytes the cells grew by. Generic, so that the loop, run
/// for every span, is one loop for each caller.
fn feed(
    cells: &mut [Cell],
    keys: &RecordKeys,
    spans: impl Iterator<Item = (usize, i64, u64)>,
) -> usize {
    let mut bytes = 0usize;
    // The last record key, and whose it is.
    let (mut rk_p, mut rk) = (None, 0u32);
    for (g, p, rows) in spans {
        if rk_p != Some(p) {
            rk_p = Some(p);
            rk = keys.record_key(p);
        }
        bytes += cells[g].add(rk, p, rows) * size_of::<i64>();
    }
    bytes
}

/// Consecutive rows of one cell and one patient, as `(cell, patient,
/// rows)`: a store's rows come grouped by patient and ordered by date,
/// so one patient's rows in a cell are mostly one span.
fn spans<'a>(
    groups: &'a [usize],
    patients: &'a [i64],
) -> impl Iterator<Item = (usize, i64, u64)> + 'a {
    let bounds = super::layout::span_bounds(groups, patients);
    (1..bounds.len()).map(move |k| {
        let (a, b) = (bounds[k - 1] as usize, bounds[k] as usize);
        (groups[a], patients[a], (b - a) as u64)
    })
}

/// [`spans`] of rows given one by one (those a filter or nulls left).
fn merged(rows: impl Iterator<Item = (usize, i64)>) -> impl Iterator<Item = (usize, i64, u64)> {
    let mut rows = rows.peekable();
    std::iter::from_fn(move || {
        let (g, p) = rows.next()?;
        let mut n = 1;
        while rows.next_if(|&(h, q)| h == g && q == p).is_some() {
            n += 1;
        }
        Some((g, p, n))
    })
}

/// One accumulator for a query without GROUP BY.
#[derive(Debug)]
struct OneCell {
    keys: Arc<RecordKeys>,
    weighted: bool,
    in_flight: InFlight<Cell>,
    cell: Cell,
}

impl Accumulator for OneCell {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = patient_keys(&values[0])?.iter().flatten().map(|p| (0, p));
        feed(
            std::slice::from_mut(&mut self.cell),
            &self.keys,
            merged(rows),
        );
        Ok(())
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        let packed = self.cell.packed(self.weighted, &mut Scratch::default());
        Ok(ScalarValue::Int64(Some(packed)))
    }
    fn size(&self) -> usize {
        size_of::<Self>() + self.cell.bytes()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let state = state_of(&self.in_flight, [std::mem::take(&mut self.cell)]);
        state
            .iter()
            .map(|column| ScalarValue::try_from_array(column, 0))
            .collect()
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let state = state_columns(states)?;
        for i in 0..state.0.len() {
            self.cell.merge(state, i, &self.in_flight)?;
        }
        Ok(())
    }
}

/// The grouped form: a [`Cell`] per group.
struct Cells {
    keys: Arc<RecordKeys>,
    weighted: bool,
    in_flight: InFlight<Cell>,
    cells: Vec<Cell>,
    /// The cells' memory, kept as it grows (DataFusion asks after every
    /// batch; summing over every group each time would cost more).
    bytes: usize,
}

impl Cells {
    fn feed(&mut self, spans: impl Iterator<Item = (usize, i64, u64)>) {
        self.bytes += feed(&mut self.cells, &self.keys, spans);
    }

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
        match counted(keys, opt_filter) {
            None => self.feed(spans(group_indices, keys.values())),
            Some(rows) => self.feed(merged(
                rows.set_indices()
                    .map(|i| (group_indices[i], keys.value(i))),
            )),
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let cells = self.take(emit_to);
        let mut scratch = Scratch::default();
        Ok(Arc::new(Int64Array::from_iter_values(
            cells.iter().map(|c| c.packed(self.weighted, &mut scratch)),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let cells = self.take(emit_to);
        Ok(state_of(&self.in_flight, cells))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let state = state_columns(values)?;
        self.cells.resize_with(total_num_groups, Cell::default);
        for (i, &g) in group_indices.iter().enumerate() {
            let before = self.cells[g].bytes();
            self.cells[g].merge(state, i, &self.in_flight)?;
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
        let mut builder = ListBuilder::with_capacity(Int64Builder::new(), keys.len());
        for i in 0..keys.len() {
            if counted.as_ref().is_none_or(|r| r.value(i)) {
                let p = keys.value(i);
                builder
                    .values()
                    .append_value(fingerprint(self.keys.record_key(p), p, 1));
            }
            builder.append(true);
        }
        let tickets = Int64Array::new_null(keys.len());
        Ok(vec![Arc::new(builder.finish()), Arc::new(tickets)])
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.cells.capacity() * size_of::<Cell>() + self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{SessionConfig, SessionContext, col, lit};
    use proptest::prelude::*;

    type Row = (i64, Option<i64>, bool);

    /// `(group, contributors, cell key)` per group, over `partitions`
    /// partitions, rows filtered to those whose flag is set.
    async fn grouped(rows: &[Row], partitions: usize, weighted: bool) -> Vec<(i64, i64, u32)> {
        aggregated(rows, partitions, weighted, SessionConfig::new(), true).await
    }

    /// [`grouped`] under `config`, or without GROUP BY (one cell, the
    /// `Accumulator` form) when not `by_group`.
    async fn aggregated(
        rows: &[Row],
        partitions: usize,
        weighted: bool,
        config: SessionConfig,
        by_group: bool,
    ) -> Vec<(i64, i64, u32)> {
        let keys = RecordKeys::from_bytes(&[7; 32]);
        let ctx = SessionContext::new_with_config(config);
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
                // Batches of at most 250 rows.
                (a..b)
                    .step_by(250)
                    .map(|at| batch.slice(at, 250.min(b - at)))
                    .collect()
            })
            .collect();
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
        let mut aggregate = contributors(&keys, col("p"), weighted);
        if let Expr::AggregateFunction(call) = &mut aggregate {
            call.params.filter = Some(Box::new(col("f")));
        }
        let source = ctx.read_table(Arc::new(table)).unwrap();
        let df = match by_group {
            true => source.aggregate(vec![col("g")], vec![aggregate.alias("x")]),
            false => source
                .aggregate(vec![], vec![aggregate.alias("x")])
                .and_then(|df| df.select(vec![lit(0i64).alias("g"), col("x")])),
        }
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
                        crate::tre::aggregates::record_keys::weighted(rk, n, None)
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
    fn a_patients_rows_beyond_one_entry_are_summed() {
        // 5,000 rows of one patient in one cell: more than an entry counts
        // (4,095), so several entries, summed when emitted.
        let mut rows: Vec<Row> = vec![(0, Some(42), true); 5_000];
        rows.push((0, Some(7), true));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for partitions in [1, 2] {
            assert_eq!(
                rt.block_on(grouped(&rows, partitions, true)),
                direct(&rows, true)
            );
        }
    }

    #[test]
    fn large_cells_stay_exact() {
        // Beyond the sizes the proptest reaches: bitmaps of many words,
        // duplicates scattered across partitions and runs.
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

    #[test]
    fn partial_states_arrive_whole_whichever_way_they_travel() {
        // Partial states by ticket from several partitions, with and
        // without a repartition by group, as rows converted straight to
        // states (skipping the partial aggregate), and into the one-cell
        // form; cells cross chunks ([`CHUNK`] is 8 in tests).
        let rows: Vec<Row> = (0..3_000i64)
            .map(|i| (i % 4, Some((i * 7_919) % 613), i % 7 != 0))
            .collect();
        let skip = || {
            let mut c = SessionConfig::new();
            c.options_mut()
                .execution
                .skip_partial_aggregation_probe_ratio_threshold = 0.0;
            c.options_mut()
                .execution
                .skip_partial_aggregation_probe_rows_threshold = 1;
            c
        };
        let configs = [
            SessionConfig::new().with_target_partitions(1),
            SessionConfig::new().with_target_partitions(4),
            skip(),
        ];
        let one_cell: Vec<Row> = rows.iter().map(|&(_, p, f)| (0, p, f)).collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for weighted in [false, true] {
            for config in &configs {
                for partitions in [1, 3] {
                    let by_group = aggregated(&rows, partitions, weighted, config.clone(), true);
                    assert_eq!(rt.block_on(by_group), direct(&rows, weighted));
                    let whole = aggregated(&rows, partitions, weighted, config.clone(), false);
                    assert_eq!(rt.block_on(whole), direct(&one_cell, weighted));
                }
            }
        }
    }
}
