//! `gpdp_bounded(patient, key…, (rows, value?)…)`: differential privacy's
//! aggregate. It bounds every patient's contribution and sums the bounded
//! contributions into every cell of the group keys' public domains, in one
//! aggregate without GROUP BY, so that the noise of [`crate::tre::control::dp`] covers
//! any one patient ([`Spec`] holds the bounds, fixed by
//! [`crate::tre::control::dp::plan`] before anything runs):
//! - a patient counts in at most `groups` cells: when they have rows in
//!   more, the cells of least [`rank`] — a fixed hash of the patient and
//!   the cell, so the choice depends on that patient alone;
//! - in each cell at most `max_rows` of their rows count (a count of rows
//!   or values adds `min(rows, max_rows)`), and a sum adds their mean
//!   (less the bounds' midpoint, for a mean) times the same capped rows,
//!   over values clamped to the column's bounds.
//!
//! It replaces an aggregate by cell and patient, a window or a join to
//! keep each patient's first cells, and an aggregate by cell (on events by
//! year over 1M patients, a tenth of their cost):
//! - a store's rows come grouped by patient, so a **run** of one patient's
//!   rows is summed in place into that run's few entries — one per cell
//!   it touches — and no row is hashed;
//! - partial states are the entries (patient, cell, rows and sums per
//!   statistic) as they are, handed over by ticket
//!   ([`super::handoff`]); the final step links the runs of each
//!   patient (one hash lookup per run: a patient's rows split over files
//!   or partitions give several), merges their cells, applies the bounds
//!   and adds the patient into the cells' totals.
//!
//! The result is exact however rows are spread over files, partitions and
//! batches: every entry reaches the final step, which sees each patient's
//! cells whole before bounding them. Rows whose keys lie outside the
//! domains (or are null) are left out, as the plan's domain filter would.
//! The result is one list of the totals of every cell (counts, then sums,
//! cell by cell in the order [`crate::tre::control::dp::control`] releases them: the
//! last key varies fastest), which only disclosure control reads.

use std::hash::Hasher;
use std::sync::Arc;

use ahash::AHashMap;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, ListArray, RecordBatch,
};
use datafusion::arrow::buffer::{OffsetBuffer, ScalarBuffer};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Expr, Signature, Volatility,
};
use siphasher::sip::SipHasher13;

use super::handoff::InFlight;

/// What one statistic adds per patient and cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adds {
    /// 1 when the patient has a row that counts (a count of patients).
    Patient,
    /// Their rows that count, at most `max_rows` (counts of rows, values).
    Rows,
    /// Their rows, and their values' mean less `centre` times those rows,
    /// over values clamped to `[lo, hi]` (sums and means).
    Sum { lo: f64, hi: f64, centre: f64 },
}

/// The bounds and the cells of one release.
#[derive(Debug)]
pub struct Spec {
    /// Each group key's public domain, as text, in key order.
    pub domains: Vec<Vec<String>>,
    /// Per statistic, in release order.
    pub statistics: Vec<Adds>,
    /// The most cells a patient counts in, when `bound_groups`.
    pub groups: u32,
    pub bound_groups: bool,
    /// The most rows of a patient a cell counts.
    pub max_rows: u32,
}

impl Spec {
    fn cells(&self) -> usize {
        self.domains.iter().map(Vec::len).product()
    }

    fn width(&self) -> usize {
        self.statistics.len()
    }

    /// Sums per entry: one per statistic when the release has a sum, else none.
    fn sum_width(&self) -> usize {
        match self
            .statistics
            .iter()
            .any(|s| matches!(s, Adds::Sum { .. }))
        {
            true => self.width(),
            false => 0,
        }
    }
}

/// `gpdp_bounded(patient, key…, then per statistic its rows that count
/// (Boolean) and, for a sum, its value (Float64))` under `spec`.
pub fn bounded(spec: Spec, args: Vec<Expr>) -> Expr {
    AggregateUDF::new_from_impl(Bounded {
        spec: Arc::new(spec),
        in_flight: InFlight::default(),
        signature: Signature::variadic_any(Volatility::Immutable),
    })
    .call(args)
}

/// The totals of every cell from the plan's output: `(counts, sums)`,
/// each `cells × statistics`, cell by cell.
pub fn totals(
    batches: &[RecordBatch],
    cells: usize,
    statistics: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = cells * statistics;
    let mut found = None;
    for b in batches {
        if b.num_rows() == 0 {
            continue;
        }
        let list = b.column(0).as_list::<i32>();
        if b.num_rows() != 1 || found.is_some() || list.value_length(0) as usize != 2 * n {
            return exec_err!("the bounded aggregate gave an unexpected shape");
        }
        let values = list.value(0);
        let values = values.as_primitive::<Float64Type>().values();
        found = Some((values[..n].to_vec(), values[n..].to_vec()));
    }
    Ok(found.unwrap_or_else(|| (vec![0.0; n], vec![0.0; n])))
}

/// A fixed hash of a patient and a cell (SplitMix64's finaliser over the
/// patient and the cell's identity, a SipHash of its key values): the
/// order in which a patient's cells are kept.
pub fn rank(patient: i64, cell: u64) -> u64 {
    use super::record_keys::mix;
    mix(mix(patient as u64) ^ cell)
}

#[derive(Debug)]
struct Bounded {
    spec: Arc<Spec>,
    in_flight: InFlight<Vec<Segment>>,
    signature: Signature,
}

// Two calls are the same aggregate only when they share their bounds.
impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.spec, &other.spec)
    }
}
impl Eq for Bounded {}
impl std::hash::Hash for Bounded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.spec).hash(state);
    }
}

fn list_of(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(t, true)))
}

impl AggregateUDFImpl for Bounded {
    fn name(&self) -> &str {
        "gpdp_bounded"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(list_of(DataType::Float64))
    }
    fn is_nullable(&self) -> bool {
        false
    }
    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Entries::new(
            self.spec.clone(),
            self.in_flight.clone(),
        )))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        // A partition's entries stay in memory; its state is a ticket.
        Ok(vec![Arc::new(Field::new(
            format!("{}[ticket]", args.name),
            DataType::Int64,
            true,
        ))])
    }
}

/// No cell: a key outside its domain, or null.
const MISS: u32 = u32::MAX;

/// How one key's values find their place in its domain.
#[derive(Debug)]
enum Lookup {
    /// Integers over a short range: a table from `min`.
    Dense {
        min: i64,
        table: Vec<u32>,
    },
    Ints(AHashMap<i64, u32>),
    /// Text whose domain values are all short: by their bytes, packed.
    Short(Short),
    Text(AHashMap<String, u32>),
    /// Any other type: compared with each value of the domain.
    Values(Vec<ScalarValue>),
}

impl Lookup {
    fn new(domain: &[String], t: &DataType) -> Result<Lookup> {
        let values = domain
            .iter()
            .map(|v| ScalarValue::try_from_string(v.clone(), t))
            .collect::<Result<Vec<_>>>()?;
        if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            return Ok(match Short::new(domain) {
                Some(short) => Lookup::Short(short),
                None => Lookup::Text(domain.iter().cloned().zip(0..).collect()),
            });
        }
        if !t.is_integer() {
            return Ok(Lookup::Values(values));
        }
        let ints = values
            .iter()
            .map(|v| match v.cast_to(&DataType::Int64)? {
                ScalarValue::Int64(Some(i)) => Ok(i),
                other => exec_err!("domain value {other} of an integer key"),
            })
            .collect::<Result<Vec<i64>>>()?;
        let (min, max) = match (ints.iter().min(), ints.iter().max()) {
            (Some(&a), Some(&b)) => (a, b),
            _ => return Ok(Lookup::Ints(AHashMap::new())),
        };
        if max.abs_diff(min) < 1 << 16 {
            let mut table = vec![MISS; (max - min) as usize + 1];
            for (i, v) in ints.iter().enumerate() {
                table[(v - min) as usize] = i as u32;
            }
            Ok(Lookup::Dense { min, table })
        } else {
            Ok(Lookup::Ints(ints.into_iter().zip(0..).collect()))
        }
    }

    /// Each row's place in the domain, or [`MISS`].
    fn places(&self, array: &ArrayRef) -> Result<Vec<u32>> {
        match self {
            Lookup::Dense { min, table } => {
                let ints = datafusion::arrow::compute::cast(array, &DataType::Int64)?;
                Ok(ints
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| {
                        v.and_then(|v| v.checked_sub(*min))
                            .and_then(|o| usize::try_from(o).ok())
                            .and_then(|o| table.get(o).copied())
                            .unwrap_or(MISS)
                    })
                    .collect())
            }
            Lookup::Ints(map) => {
                let ints = datafusion::arrow::compute::cast(array, &DataType::Int64)?;
                Ok(ints
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.and_then(|v| map.get(&v).copied()).unwrap_or(MISS))
                    .collect())
            }
            Lookup::Short(short) => Ok(match array.data_type() {
                DataType::Utf8 => short.places(array.as_string::<i32>().iter()),
                DataType::LargeUtf8 => short.places(array.as_string::<i64>().iter()),
                DataType::Utf8View => short.places(array.as_string_view().iter()),
                other => return exec_err!("a text key read as {other}"),
            }),
            Lookup::Text(map) => Ok(match array.data_type() {
                DataType::Utf8 => text_places(map, array.as_string::<i32>().iter()),
                DataType::LargeUtf8 => text_places(map, array.as_string::<i64>().iter()),
                DataType::Utf8View => text_places(map, array.as_string_view().iter()),
                other => return exec_err!("a text key read as {other}"),
            }),
            Lookup::Values(values) => {
                let mut places = vec![MISS; array.len()];
                for (i, v) in values.iter().enumerate() {
                    let hit = eq(array, &v.to_scalar()?)?;
                    for row in hit.values().set_indices() {
                        if hit.is_valid(row) {
                            places[row] = i as u32;
                        }
                    }
                }
                Ok(places)
            }
        }
    }
}

/// The places of a text domain whose values are at most 15 bytes, by
/// their bytes and length packed into 128 bits: a small open-addressing
/// table, in cache, with no string hashed or compared (a general map of
/// strings was a tenth of the partitions' work on patients by sex and
/// age band).
#[derive(Debug)]
struct Short {
    bits: u32,
    slots: Vec<(u128, u32)>,
}

impl Short {
    const LONGEST: usize = 15;

    fn new(domain: &[String]) -> Option<Short> {
        if domain.iter().any(|v| v.len() > Self::LONGEST) {
            return None;
        }
        let bits = (4 * domain.len())
            .next_power_of_two()
            .trailing_zeros()
            .max(4);
        let mut short = Short {
            bits,
            slots: vec![(0, MISS); 1 << bits],
        };
        for (place, v) in (0..).zip(domain) {
            let key = Self::pack(v)?;
            let mut i = short.slot(key);
            while short.slots[i].1 != MISS && short.slots[i].0 != key {
                i = (i + 1) & (short.slots.len() - 1);
            }
            if short.slots[i].1 == MISS {
                short.slots[i] = (key, place);
            }
        }
        Some(short)
    }

    /// The bytes, then the length in the top byte: equal only for equal
    /// text. `None` for text longer than any domain value can be.
    fn pack(v: &str) -> Option<u128> {
        let bytes = v.as_bytes();
        if bytes.len() > Self::LONGEST {
            return None;
        }
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        b[15] = bytes.len() as u8;
        Some(u128::from_le_bytes(b))
    }

    fn slot(&self, key: u128) -> usize {
        let folded = (key as u64) ^ ((key >> 64) as u64).rotate_left(29);
        (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.bits)) as usize
    }

    fn place(&self, key: u128) -> u32 {
        let mut i = self.slot(key);
        loop {
            match self.slots[i] {
                (_, MISS) => return MISS,
                (k, place) if k == key => return place,
                _ => i = (i + 1) & (self.slots.len() - 1),
            }
        }
    }

    fn places<'a>(&self, values: impl Iterator<Item = Option<&'a str>>) -> Vec<u32> {
        values
            .map(|v| v.and_then(Self::pack).map_or(MISS, |k| self.place(k)))
            .collect()
    }
}

/// Places of text values; consecutive equal values are looked up once.
fn text_places<'a>(
    map: &AHashMap<String, u32>,
    values: impl Iterator<Item = Option<&'a str>>,
) -> Vec<u32> {
    let mut last: Option<(&str, u32)> = None;
    values
        .map(|v| match (v, last) {
            (None, _) => MISS,
            (Some(v), Some((l, place))) if l == v => place,
            (Some(v), _) => {
                let place = map.get(v).copied().unwrap_or(MISS);
                last = Some((v, place));
                place
            }
        })
        .collect()
}

/// Entries made from rows: per entry its patient and cell; per entry and
/// statistic the rows that count and (only when the release has sums)
/// their clamped values' sum.
#[derive(Debug, Default)]
struct Own {
    patients: Vec<i64>,
    cells: Vec<u32>,
    rows: Vec<i64>,
    sums: Vec<f64>,
    /// The first entry of the current run (the last patient's rows).
    run: usize,
    /// The run's cells below 64, as bits: a cell not among them is new
    /// to the run without looking.
    seen: u64,
}

/// Entries per chunk: a full chunk is set aside as a [`Segment`] and a
/// new one begun, so entries are never copied as they grow (which cost
/// more than making them, on events by year).
const CHUNK: usize = if cfg!(test) { 4 } else { 1 << 16 };

impl Own {
    /// The entry of `cell` in the current run of `patient`, made if new;
    /// a full chunk goes to `done` first (a run it splits is joined again
    /// in the final step, like one split over files).
    fn entry(
        &mut self,
        patient: i64,
        cell: u32,
        (width, sum_width): (usize, usize),
        done: &mut Vec<Segment>,
    ) -> usize {
        let n = self.patients.len();
        let in_run = self.run < n && self.patients[self.run] == patient;
        let bit = 1u64.checked_shl(cell).unwrap_or(0);
        if !in_run {
            self.seen = 0;
        } else if (bit == 0 || self.seen & bit != 0)
            && let Some(e) = (self.run..n).find(|&e| self.cells[e] == cell)
        {
            return e;
        }
        if n == CHUNK {
            // A new chunk begins a new run (`take` leaves `run` at 0).
            done.push(self.take());
        }
        if self.patients.capacity() == 0 {
            self.patients.reserve_exact(CHUNK);
            self.cells.reserve_exact(CHUNK);
            self.rows.reserve_exact(CHUNK * width);
            self.sums.reserve_exact(CHUNK * sum_width);
        }
        let n = self.patients.len();
        if !in_run {
            self.run = n;
        }
        self.seen |= bit;
        self.patients.push(patient);
        self.cells.push(cell);
        self.rows.resize(self.rows.len() + width, 0);
        self.sums.resize(self.sums.len() + sum_width, 0.0);
        n
    }

    fn take(&mut self) -> Segment {
        let own = std::mem::take(self);
        Segment {
            patients: own.patients.into(),
            cells: own.cells.into(),
            rows: own.rows.into(),
            sums: own.sums.into(),
        }
    }
}

/// Entries as they came, from rows or from a partition's partial state
/// (kept without copying).
#[derive(Debug, Clone)]
struct Segment {
    patients: ScalarBuffer<i64>,
    cells: ScalarBuffer<u32>,
    rows: ScalarBuffer<i64>,
    sums: ScalarBuffer<f64>,
}

impl Segment {
    fn bytes(&self) -> usize {
        self.patients.inner().capacity()
            + self.cells.inner().capacity()
            + self.rows.inner().capacity()
            + self.sums.inner().capacity()
    }
}

/// The accumulator: entries of runs of patients' rows.
#[derive(Debug)]
struct Entries {
    spec: Arc<Spec>,
    in_flight: InFlight<Vec<Segment>>,
    /// Each key's lookup, made for the type its first batch has.
    lookups: Vec<Option<(DataType, Lookup)>>,
    own: Own,
    /// Full chunks of `own`.
    done: Vec<Segment>,
    merged: Vec<Segment>,
}

impl Entries {
    fn new(spec: Arc<Spec>, in_flight: InFlight<Vec<Segment>>) -> Entries {
        Entries {
            in_flight,
            lookups: (0..spec.domains.len()).map(|_| None).collect(),
            spec,
            own: Own::default(),
            done: Vec::new(),
            merged: Vec::new(),
        }
    }

    /// The cell of each row, or [`MISS`].
    fn cells_of(&mut self, keys: &[ArrayRef], rows: usize) -> Result<Vec<u32>> {
        let mut cells = vec![0u32; rows];
        for (k, array) in keys.iter().enumerate() {
            let lookup = match &self.lookups[k] {
                Some((t, l)) if t == array.data_type() => l,
                _ => {
                    let l = Lookup::new(&self.spec.domains[k], array.data_type())?;
                    &self.lookups[k].insert((array.data_type().clone(), l)).1
                }
            };
            let size = self.spec.domains[k].len() as u32;
            for (cell, place) in cells.iter_mut().zip(lookup.places(array)?) {
                *cell = match (*cell, place) {
                    (MISS, _) | (_, MISS) => MISS,
                    (c, p) => c * size + p,
                };
            }
        }
        Ok(cells)
    }

    /// Every segment, the rows' own last.
    fn segments(&mut self) -> Vec<Segment> {
        let mut all = std::mem::take(&mut self.merged);
        all.append(&mut self.done);
        if !self.own.patients.is_empty() {
            all.push(self.own.take());
        }
        all
    }
}

/// One statistic's inputs in a batch: which rows count (`None`: all),
/// and for a sum its values and bounds.
struct Inputs<'a> {
    counts: Option<&'a BooleanArray>,
    values: Option<(&'a [f64], f64, f64)>,
}

impl Inputs<'_> {
    /// The rows that count among `rows`, and their clamped values' sum.
    fn over(&self, rows: std::ops::Range<usize>) -> (i64, f64) {
        if self.counts.is_none() && self.values.is_none() {
            return (rows.len() as i64, 0.0);
        }
        let (mut n, mut sum) = (0, 0.0);
        for row in rows {
            if self
                .counts
                .is_some_and(|c| !(c.is_valid(row) && c.value(row)))
            {
                continue;
            }
            n += 1;
            if let Some((v, lo, hi)) = self.values {
                sum += v[row].clamp(lo, hi);
            }
        }
        (n, sum)
    }
}

impl Accumulator for Entries {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let keys = self.spec.domains.len();
        let Some(patients) = values
            .first()
            .and_then(|p| p.as_primitive_opt::<Int64Type>())
        else {
            return exec_err!("gpdp_bounded bounds patients by patient_key (Int64)");
        };
        let mut cells = self.cells_of(&values[1..=keys], patients.len())?;
        if let Some(nulls) = patients.nulls() {
            for row in nulls.iter().enumerate().filter(|(_, v)| !v).map(|(r, _)| r) {
                cells[row] = MISS;
            }
        }
        let spec = Arc::clone(&self.spec);
        let (width, sum_width) = (spec.width(), spec.sum_width());
        let mut inputs = Vec::with_capacity(width);
        let mut at = keys + 1;
        for s in &spec.statistics {
            let Some(counts) = values.get(at).and_then(|a| a.as_boolean_opt()) else {
                return exec_err!("gpdp_bounded: statistic inputs out of shape");
            };
            at += 1;
            let every = counts.null_count() == 0 && counts.true_count() == counts.len();
            let values = match *s {
                Adds::Sum { lo, hi, .. } => {
                    let v = values
                        .get(at)
                        .and_then(|a| a.as_primitive_opt::<Float64Type>());
                    at += 1;
                    match v {
                        Some(v) => Some((v.values().as_ref(), lo, hi)),
                        None => return exec_err!("gpdp_bounded: a sum without Float64 values"),
                    }
                }
                _ => None,
            };
            inputs.push(Inputs {
                counts: (!every).then_some(counts),
                values,
            });
        }
        let (own, done) = (&mut self.own, &mut self.done);
        let ids = patients.values();
        // Spans of rows of one patient and one cell go to one entry.
        for span in super::layout::span_bounds(&cells, ids).windows(2) {
            let (a, b) = (span[0] as usize, span[1] as usize);
            let (cell, p) = (cells[a], ids[a]);
            if cell != MISS {
                let e = own.entry(p, cell, (width, sum_width), done);
                for (s, input) in inputs.iter().enumerate() {
                    let (rows, sum) = input.over(a..b);
                    own.rows[e * width + s] += rows;
                    if sum_width > 0 {
                        own.sums[e * sum_width + s] += sum;
                    }
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let segments = self.segments();
        let (counts, sums) = bounded_totals(&self.spec, &segments);
        let mut all = counts;
        all.extend(sums);
        let n = all.len();
        Ok(ScalarValue::List(Arc::new(ListArray::new(
            Arc::new(Field::new_list_field(DataType::Float64, true)),
            OffsetBuffer::from_lengths([n]),
            Arc::new(Float64Array::from(all)),
            None,
        ))))
    }

    fn size(&self) -> usize {
        size_of::<Self>()
            + self.own.patients.capacity() * size_of::<i64>()
            + self.own.cells.capacity() * size_of::<u32>()
            + self.own.rows.capacity() * size_of::<i64>()
            + self.own.sums.capacity() * size_of::<f64>()
            + self
                .done
                .iter()
                .chain(&self.merged)
                .map(Segment::bytes)
                .sum::<usize>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        // The segments go as they are, by ticket (`super::handoff`).
        let segments = self.segments();
        let ticket = (!segments.is_empty()).then(|| self.in_flight.hold(segments));
        Ok(vec![ScalarValue::Int64(ticket)])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(tickets) = states
            .first()
            .and_then(|t| t.as_primitive_opt::<Int64Type>())
        else {
            return exec_err!("gpdp_bounded: a partial state out of shape");
        };
        for ticket in tickets.iter().flatten() {
            let segments = self.in_flight.claim(ticket, "gpdp_bounded")?;
            self.merged.extend(segments);
        }
        Ok(())
    }
}

/// A run: entries `start..end` of one segment, all of one patient.
#[derive(Debug, Clone, Copy)]
struct Run {
    segment: u32,
    start: u32,
    end: u32,
}

/// Every patient bounded and added into the cells: `(counts, sums)`,
/// each `cells × statistics`. Each patient's runs are [`link`]ed, then
/// the runs are split between threads in storage order: each thread
/// totals the patients whose last run is in its share, and the totals
/// are added.
fn bounded_totals(spec: &Spec, segments: &[Segment]) -> (Vec<f64>, Vec<f64>) {
    let size = spec.cells() * spec.width();
    let mut runs = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let p = &s.patients;
        let mut start = 0;
        for e in 1..=p.len() {
            if e == p.len() || p[e] != p[start] {
                runs.push(Run {
                    segment: i as u32,
                    start: start as u32,
                    end: e as u32,
                });
                start = e;
            }
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let (mut counts, mut sums) = (vec![0.0; size], vec![0.0; size]);
    if size == 0 {
        return (counts, sums);
    }
    let (next, head) = link(&runs, segments, threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let share = runs.len() * t / threads..runs.len() * (t + 1) / threads;
                let (runs, next, head) = (&runs, &next, &head);
                scope.spawn(move || Patients::new(spec, segments).total(runs, next, head, share))
            })
            .collect();
        for part in parts {
            let (c, s) = part.join().expect("a thread totalling patients panicked");
            counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
            sums.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
    });
    (counts, sums)
}

/// Runs per bucket when linking: a bucket's table (twice as many
/// slots of 16 bytes) stays in the core's cache.
const BUCKET: usize = if cfg!(test) { 4 } else { 4096 };

/// Links each patient's runs: `next[r]` is the patient's run before `r`
/// (`u32::MAX` if none), and `head[r]` whether `r` is their last run,
/// which stands for them. Runs are spread into buckets by a hash of
/// their patient, in order, and the buckets are linked on every thread
/// at once, each with a table small enough to stay in cache: one table
/// of every patient cost a cache miss per run, the largest part of the
/// final step.
fn link(runs: &[Run], segments: &[Segment], threads: usize) -> (Vec<u32>, Vec<bool>) {
    use super::layout::{bucket_bits, spread};
    use super::record_keys::mix;
    let patient = |r: &Run| segments[r.segment as usize].patients[r.start as usize];
    let bits = bucket_bits(runs.len(), BUCKET);
    // Each bucket's runs with their patient, in storage order.
    let runs_of = runs.iter().map(patient).zip(0u32..);
    let (starts, spread) = spread(runs_of, bits, |(p, _)| mix(p as u64), Vec::new());
    let buckets = 1usize << bits;
    // Per thread, the (run, the patient's run before it) pairs it found.
    let repeats: Vec<Vec<(u32, u32)>> = std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let (spread, starts) = (&spread, &starts);
                scope.spawn(move || {
                    let mut table = LastRun::default();
                    let mut repeats = Vec::new();
                    for b in (t..buckets).step_by(threads) {
                        let ours = &spread[starts[b]..starts[b + 1]];
                        table.clear(ours.len());
                        for &(p, r) in ours {
                            if let Some(prev) = table.insert(mix(p as u64), p, r) {
                                repeats.push((r, prev));
                            }
                        }
                    }
                    repeats
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|p| p.join().expect("a thread linking runs panicked"))
            .collect()
    });
    let (mut next, mut head) = (vec![u32::MAX; runs.len()], vec![true; runs.len()]);
    for (r, prev) in repeats.into_iter().flatten() {
        next[r as usize] = prev;
        head[prev as usize] = false;
    }
    (next, head)
}

/// Each patient's last run so far, in one bucket: an open-addressing
/// table with the key and the run side by side, placed by the low bits
/// of the patient's hash (its top bits chose the bucket).
#[derive(Default)]
struct LastRun {
    slots: Vec<(i64, u32)>,
}

impl LastRun {
    const EMPTY: u32 = u32::MAX;

    /// Empties the table, sized for `n` patients (twice over, so a probe
    /// always ends).
    fn clear(&mut self, n: usize) {
        let size = (2 * n).next_power_of_two().max(16);
        self.slots.clear();
        self.slots.resize(size, (0, Self::EMPTY));
    }

    /// Sets `patient`'s last run (`hash` is theirs); returns the one it
    /// replaces.
    fn insert(&mut self, hash: u64, patient: i64, run: u32) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.1 == Self::EMPTY {
                *slot = (patient, run);
                return None;
            }
            if slot.0 == patient {
                return Some(std::mem::replace(&mut slot.1, run));
            }
            i = (i + 1) & mask;
        }
    }
}

/// One thread's patients and its scratch space.
struct Patients<'a> {
    spec: &'a Spec,
    segments: &'a [Segment],
    /// Cell identities for ranks: a hash of their key values.
    identity: Vec<u64>,
    /// A patient's cells when their entries had to be merged: cell, then
    /// rows and sums per statistic.
    cells: Vec<u32>,
    rows: Vec<i64>,
    sums: Vec<f64>,
    /// Entries of one patient, as (cell, segment, entry).
    mine: Vec<(u32, u32, u32)>,
    ranked: Vec<(u64, usize)>,
    /// Per cell, the last patient (`tick`) with an entry in it.
    seen: Vec<u32>,
    tick: u32,
}

/// One patient's entries, one per cell: cells, then rows and sums per
/// statistic.
struct Contribution<'a> {
    patient: i64,
    cells: &'a [u32],
    rows: &'a [i64],
    sums: &'a [f64],
}

impl<'a> Patients<'a> {
    fn new(spec: &'a Spec, segments: &'a [Segment]) -> Patients<'a> {
        let identity = (0..spec.cells())
            .map(|c| {
                let mut h = SipHasher13::new();
                let mut rest = c;
                for d in spec.domains.iter().rev() {
                    h.write(d[rest % d.len()].as_bytes());
                    h.write_u8(0xff);
                    rest /= d.len();
                }
                h.finish()
            })
            .collect();
        Patients {
            spec,
            segments,
            identity,
            cells: Vec::new(),
            rows: Vec::new(),
            sums: Vec::new(),
            mine: Vec::new(),
            ranked: Vec::new(),
            seen: vec![0; spec.cells()],
            tick: 0,
        }
    }

    /// The totals of the patients whose last run is in `share`.
    fn total(
        mut self,
        runs: &[Run],
        next: &[u32],
        head: &[bool],
        share: std::ops::Range<usize>,
    ) -> (Vec<f64>, Vec<f64>) {
        let (width, sum_width) = (self.spec.width(), self.spec.sum_width());
        let size = self.spec.cells() * width;
        let (mut counts, mut sums) = (vec![0.0; size], vec![0.0; size]);
        let segments = self.segments;
        for i in share.filter(|&i| head[i]) {
            let run = runs[i];
            let (a, b) = (run.start as usize, run.end as usize);
            let segment = &segments[run.segment as usize];
            // Most patients have one run with one entry per cell: read in
            // place; the others are merged first.
            let in_place = next[i] == u32::MAX && self.distinct(&segment.cells[a..b]);
            if !in_place {
                self.gather(runs, next, i);
            }
            let c = match in_place {
                true => Contribution {
                    patient: segment.patients[a],
                    cells: &segment.cells[a..b],
                    rows: &segment.rows[a * width..b * width],
                    sums: &segment.sums[a * sum_width..b * sum_width],
                },
                false => Contribution {
                    patient: segment.patients[a],
                    cells: &self.cells,
                    rows: &self.rows,
                    sums: &self.sums,
                },
            };
            add(
                self.spec,
                &self.identity,
                &mut self.ranked,
                &c,
                &mut counts,
                &mut sums,
            );
        }
        (counts, sums)
    }

    /// Whether no cell repeats (a run joined from chunks can repeat one).
    fn distinct(&mut self, cells: &[u32]) -> bool {
        self.tick = self.tick.wrapping_add(1);
        if self.tick == 0 {
            self.seen.fill(0);
            self.tick = 1;
        }
        let mut distinct = true;
        for &cell in cells {
            let seen = &mut self.seen[cell as usize];
            distinct &= *seen != self.tick;
            *seen = self.tick;
        }
        distinct
    }

    /// One patient's entries from all their runs, merged to one per cell.
    fn gather(&mut self, runs: &[Run], next: &[u32], first: usize) {
        let (width, sum_width) = (self.spec.width(), self.spec.sum_width());
        self.mine.clear();
        let mut r = first as u32;
        while r != u32::MAX {
            let run = runs[r as usize];
            let s = &self.segments[run.segment as usize];
            self.mine
                .extend((run.start..run.end).map(|e| (s.cells[e as usize], run.segment, e)));
            r = next[r as usize];
        }
        // Sorted, a cell's entries are together.
        self.mine.sort_unstable();
        self.cells.clear();
        self.rows.clear();
        self.sums.clear();
        for &(cell, segment, e) in &self.mine {
            let s = &self.segments[segment as usize];
            let e = e as usize;
            let rows = &s.rows[e * width..(e + 1) * width];
            let sums = &s.sums[e * sum_width..(e + 1) * sum_width];
            if self.cells.last() == Some(&cell) {
                let k = self.cells.len() - 1;
                self.rows[k * width..]
                    .iter_mut()
                    .zip(rows)
                    .for_each(|(a, b)| *a += b);
                self.sums[k * sum_width..]
                    .iter_mut()
                    .zip(sums)
                    .for_each(|(a, b)| *a += b);
            } else {
                self.cells.push(cell);
                self.rows.extend_from_slice(rows);
                self.sums.extend_from_slice(sums);
            }
        }
    }
}

/// Adds one patient into the cells' totals, bounded: when they have more
/// than `groups` cells, only the `groups` of least [`rank`]; in each, at
/// most `max_rows` rows.
fn add(
    spec: &Spec,
    identity: &[u64],
    ranked: &mut Vec<(u64, usize)>,
    c: &Contribution,
    counts: &mut [f64],
    sums: &mut [f64],
) {
    let (width, sum_width) = (spec.width(), spec.sum_width());
    let max_rows = i64::from(spec.max_rows);
    let mut one = |k: usize| {
        let cell = c.cells[k] as usize;
        for (s, adds) in spec.statistics.iter().enumerate() {
            let n = c.rows[k * width + s];
            if n == 0 {
                continue;
            }
            let capped = n.min(max_rows) as f64;
            let at = cell * width + s;
            match *adds {
                Adds::Patient => counts[at] += 1.0,
                Adds::Rows => counts[at] += capped,
                Adds::Sum { centre, .. } => {
                    counts[at] += capped;
                    let total = c.sums[k * sum_width + s];
                    sums[at] += (total / n as f64 - centre) * capped;
                }
            }
        }
    };
    let groups = spec.groups.max(1) as usize;
    if spec.bound_groups && c.cells.len() > groups {
        ranked.clear();
        ranked.extend(
            c.cells
                .iter()
                .enumerate()
                .map(|(k, &cell)| (rank(c.patient, identity[cell as usize]), k)),
        );
        ranked.select_nth_unstable(groups - 1);
        ranked[..groups].iter().for_each(|&(_, k)| one(k));
    } else {
        (0..c.cells.len()).for_each(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::prelude::{SessionContext, col, lit};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A row: patient, year (2000–2004; 2009 is outside the domain), sex
    /// (null sometimes), whether it counts, and its value.
    type Row = (i64, i64, Option<&'static str>, bool, f64);

    const YEARS: [&str; 5] = ["2000", "2001", "2002", "2003", "2004"];
    const SEXES: [&str; 2] = ["F", "M"];
    const LO: f64 = 0.0;
    const HI: f64 = 10.0;

    fn spec(groups: u32, max_rows: u32) -> Spec {
        Spec {
            domains: vec![
                YEARS.iter().map(|s| s.to_string()).collect(),
                SEXES.iter().map(|s| s.to_string()).collect(),
            ],
            statistics: vec![
                Adds::Patient,
                Adds::Rows,
                Adds::Sum {
                    lo: LO,
                    hi: HI,
                    centre: 5.0,
                },
            ],
            groups,
            bound_groups: true,
            max_rows,
        }
    }

    /// Totals through DataFusion, the rows split over `partitions`.
    async fn through_plan(rows: &[Row], partitions: usize, spec: Spec) -> (Vec<f64>, Vec<f64>) {
        let (cells, width) = (spec.cells(), spec.width());
        let batch = RecordBatch::try_from_iter([
            (
                "p",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            (
                "year",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))) as ArrayRef,
            ),
            (
                "sex",
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))) as ArrayRef,
            ),
            (
                "f",
                Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.3)))) as ArrayRef,
            ),
            (
                "v",
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4))) as ArrayRef,
            ),
        ])
        .unwrap();
        let parts: Vec<_> = (0..partitions)
            .map(|k| {
                let n = batch.num_rows();
                let (a, b) = (n * k / partitions, n * (k + 1) / partitions);
                // Small batches, so that runs cross batches too.
                (a..b)
                    .step_by(3)
                    .map(|i| batch.slice(i, 3.min(b - i)))
                    .collect()
            })
            .collect();
        let table = datafusion::datasource::MemTable::try_new(batch.schema(), parts).unwrap();
        let args = vec![
            col("p"),
            col("year"),
            col("sex"),
            lit(true),
            col("f"),
            col("f"),
            col("v"),
        ];
        let df = SessionContext::new()
            .read_table(Arc::new(table))
            .unwrap()
            .aggregate(vec![], vec![bounded(spec, args).alias("t")])
            .unwrap();
        totals(&df.collect().await.unwrap(), cells, width).unwrap()
    }

    /// The same, computed directly from each patient's rows per cell.
    fn direct(rows: &[Row], spec: &Spec) -> (Vec<f64>, Vec<f64>) {
        let width = spec.width();
        let mut per: BTreeMap<i64, BTreeMap<usize, [f64; 5]>> = BTreeMap::new();
        for &(p, year, sex, f, v) in rows {
            let (Some(y), Some(s)) = (
                YEARS.iter().position(|y| *y == year.to_string()),
                sex.and_then(|s| SEXES.iter().position(|x| *x == s)),
            ) else {
                continue;
            };
            let e = per.entry(p).or_default().entry(y * 2 + s).or_default();
            e[0] += 1.0; // rows, every row counts (lit(true))
            if f {
                e[1] += 1.0;
                e[2] += v.clamp(LO, HI);
            }
        }
        let (mut counts, mut sums) = (vec![0.0; 10 * width], vec![0.0; 10 * width]);
        let identity = Patients::new(spec, &[]).identity;
        for (p, cells) in per {
            let mut cells: Vec<_> = cells.into_iter().collect();
            cells.sort_by_key(|(c, _)| rank(p, identity[*c]));
            cells.truncate(spec.groups as usize);
            for (c, e) in cells {
                let max = f64::from(spec.max_rows);
                counts[c * width] += 1.0;
                counts[c * width + 1] += e[1].min(max);
                if e[1] > 0.0 {
                    counts[c * width + 2] += e[1].min(max);
                    sums[c * width + 2] += (e[2] / e[1] - 5.0) * e[1].min(max);
                }
            }
        }
        (counts, sums)
    }

    fn rows() -> impl Strategy<Value = Vec<Row>> {
        let row = (
            0i64..12,
            prop_oneof![2000i64..2005, Just(2009)],
            prop_oneof![
                Just(Some("F")),
                Just(Some("M")),
                Just(None),
                Just(Some("X"))
            ],
            any::<bool>(),
            -5.0f64..15.0,
        );
        (prop::collection::vec(row, 0..120), any::<bool>()).prop_map(|(mut rows, runs)| {
            if runs {
                // As a store keeps them: each patient's rows together.
                rows.sort_by_key(|r| r.0);
            }
            rows
        })
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every patient bounded to `groups` cells (the least ranked) and
        /// `max_rows` rows per cell, however their rows are spread over
        /// partitions, batches and chunks, and in runs or scattered.
        #[test]
        fn equals_each_patient_bounded_directly(
            rows in rows(),
            partitions in 1usize..4,
            groups in 1u32..4,
            max_rows in 1u32..4,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = runtime.block_on(through_plan(&rows, partitions, spec(groups, max_rows)));
            let want = direct(&rows, &spec(groups, max_rows));
            prop_assert!(close(&got.0, &want.0), "counts {:?} vs {:?}", got.0, want.0);
            prop_assert!(close(&got.1, &want.1), "sums {:?} vs {:?}", got.1, want.1);
        }
    }

    #[test]
    fn the_last_run_table_keeps_each_patients_latest_run() {
        // Full to half its slots, with hashes that collide in the low bits.
        let mut table = LastRun::default();
        table.clear(1000);
        for run in 0..1000u32 {
            let p = i64::from(run);
            assert_eq!(table.insert((p as u64) << 40, p, run), None);
        }
        assert_eq!(table.insert(7 << 40, 7, 5000), Some(7));
        assert_eq!(table.insert(7 << 40, 7, 5001), Some(5000));
        // Emptied, it knows no one.
        table.clear(10);
        assert_eq!(table.insert(7 << 40, 7, 1), None);
    }

    #[test]
    fn runs_are_linked_to_each_patients_earlier_runs() {
        // Patients 0..40, each with a run in 1–3 segments of ten runs.
        let segments: Vec<Segment> = (0..3i64)
            .map(|s| {
                let patients: Vec<i64> = (0..40).filter(|p| p % 3 >= s).collect();
                let n = patients.len();
                Segment {
                    patients: patients.into(),
                    cells: vec![0u32; n].into(),
                    rows: vec![1i64; n].into(),
                    sums: Vec::<f64>::new().into(),
                }
            })
            .collect();
        let mut runs = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            runs.extend((0..s.patients.len() as u32).map(|e| Run {
                segment: i as u32,
                start: e,
                end: e + 1,
            }));
        }
        let patient =
            |r: usize| segments[runs[r].segment as usize].patients[runs[r].start as usize];
        for threads in 1..=3 {
            let (next, head) = link(&runs, &segments, threads);
            let mut seen = BTreeMap::new();
            for (r, _) in runs.iter().enumerate().filter(|&(r, _)| head[r]) {
                let mut chain = vec![r];
                while next[*chain.last().unwrap()] != u32::MAX {
                    chain.push(next[*chain.last().unwrap()] as usize);
                }
                let want: Vec<usize> = (0..runs.len())
                    .rev()
                    .filter(|&q| patient(q) == patient(r))
                    .collect();
                assert_eq!(chain, want, "patient {}", patient(r));
                assert!(seen.insert(patient(r), ()).is_none());
            }
            assert_eq!(seen.len(), 40);
        }
    }

    #[test]
    fn keys_of_every_type_find_their_place_in_the_domain() {
        use datafusion::arrow::array::{Int32Array, StringViewArray};
        let domain = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: Vec<(Vec<String>, ArrayRef, Vec<u32>)> = vec![
            (
                domain(&["true", "false"]),
                Arc::new(BooleanArray::from(vec![Some(false), None, Some(true)])),
                vec![1, MISS, 0],
            ),
            (
                domain(&["1", "2", "10"]),
                Arc::new(Int32Array::from(vec![Some(10), Some(3), None, Some(1)])),
                vec![2, MISS, MISS, 0],
            ),
            (
                // Far apart: a table would be too large.
                domain(&["-5", "1000000000"]),
                Arc::new(Int64Array::from(vec![1_000_000_000, -5, 0])),
                vec![1, 0, MISS],
            ),
            (
                domain(&["F", "M"]),
                Arc::new(StringViewArray::from(vec![
                    Some("M"),
                    Some("M"),
                    Some("X"),
                    None,
                ])),
                vec![1, 1, MISS, MISS],
            ),
            (
                // Packed by bytes and length: a prefix, a value with a
                // trailing NUL and one too long to pack are not in it.
                domain(&["16-29", "1", "", "fifteen bytes!!"]),
                Arc::new(StringArray::from(vec![
                    "1",
                    "16-2",
                    "1\0",
                    "",
                    "fifteen bytes!!",
                    "sixteen bytes!!!",
                    "16-29",
                ])),
                vec![1, MISS, MISS, 2, 3, MISS, 0],
            ),
            (
                // A value longer than 15 bytes: looked up as text.
                domain(&["1091811000000102", "73211009"]),
                Arc::new(StringArray::from(vec![
                    "73211009",
                    "1091811000000102",
                    "7321100",
                ])),
                vec![1, 0, MISS],
            ),
        ];
        for (domain, array, want) in cases {
            let lookup = Lookup::new(&domain, array.data_type()).unwrap();
            assert_eq!(
                lookup.places(&array).unwrap(),
                want,
                "{}",
                array.data_type()
            );
        }
        let text = |v: &[&str]| Lookup::new(&domain(v), &DataType::Utf8).unwrap();
        assert!(matches!(text(&["F", "M"]), Lookup::Short(_)));
        assert!(matches!(text(&["1091811000000102"]), Lookup::Text(_)));
    }

    #[test]
    fn a_patient_with_rows_in_every_cell_counts_in_the_allowed_number() {
        let rows: Vec<Row> = (0..1000)
            .map(|i| {
                (
                    42,
                    2000 + i % 5,
                    Some(SEXES[(i / 5 % 2) as usize]),
                    true,
                    100.0,
                )
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (counts, sums) = runtime.block_on(through_plan(&rows, 2, spec(3, 2)));
        let width = 3;
        let patients: f64 = (0..10).map(|c| counts[c * width]).sum();
        let rows_counted: f64 = (0..10).map(|c| counts[c * width + 1]).sum();
        assert_eq!(patients, 3.0, "one patient, in at most 3 cells");
        assert_eq!(rows_counted, 6.0, "at most 2 rows in each");
        // Values clamped to 10, less the centre 5, over 2 rows in 3 cells.
        let total: f64 = sums.iter().sum();
        assert!((total - 30.0).abs() < 1e-9, "{total}");
    }
}
