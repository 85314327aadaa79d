//! One practice's collection, as the practice system would run it before
//! anything leaves: Type 1 at source, validate, pseudonymise, generalise,
//! drop, exclude, quarantine — streaming Arrow record batches into Parquet.
//!
//! Two passes: the first reads only the Type 1 codes from the clinical
//! events, so that a dissenting patient is known before any of their rows is
//! considered; the second streams every table. Memory is bounded by the
//! record batch size plus per-patient sets (never per row).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Date32Builder, FixedSizeBinaryBuilder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::CollectError;
use super::receipt::{Receipt, StageSeconds};
use ahash::RandomState;

use crate::calendar::{Day, parse_date, parse_ymd};
use crate::deid::generalise::{PostcodeLookup, generalise_ymd};
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::digest::hex;
use crate::extract::{ExtractError, Kind, PracticeExtract, Table, TableReader, line_of};
use crate::nhs_number::NhsNumber;
use crate::optout::type1::{Type1Code, Type1State};
use crate::policy::{Action, CollectionPolicy, Rule, Type1Codes};
use crate::store::parquet::Writer;

/// Rows per Arrow record batch.
pub const BATCH_ROWS: usize = 64 * 1024;

/// CSV records read at a time (see the stage timers in [`collect_practice`]).
const CHUNK_ROWS: usize = 128;

/// Everything shared by the practices of one run.
pub struct Context<'a> {
    pub policy: &'a CollectionPolicy,
    pub pseudonymiser: &'a Pseudonymiser,
    pub key_id: &'a str,
    pub lookup: Option<&'a PostcodeLookup>,
    /// Patients whose tombstones (from any practice) were active when the run began.
    pub blocked: &'a HashSet<Pseudonym>,
    pub excluded: &'a Exclusions,
    pub store: &'a Path,
    pub quarantine_dir: &'a Path,
}

/// A practice batch written to the store's tables but not yet committed.
#[derive(Debug)]
pub struct Staged {
    pub practice: String,
    pub batch: String,
    /// Relative paths of the written files, per table.
    pub files: Vec<(Table, String)>,
    pub receipt: Receipt,
    /// Pseudonyms of the patients in this batch, sorted (a batch may wait
    /// for its commit behind others: this is its compact form).
    pub patients: Vec<Pseudonym>,
    /// Pseudonyms of patients who dissent here (sent as tombstones).
    pub dissenters: Vec<Pseudonym>,
    /// Patients held back by another practice's tombstone (hex).
    pub withheld: BTreeSet<String>,
}

/// One output column and how it is filled from the extract.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Date {
        col: usize,
        rule: Option<Rule>,
        required: bool,
    },
    Text {
        col: usize,
        required: bool,
    },
    Number {
        col: usize,
    },
    /// Postcode to (lsoa_code, imd_decile): two output columns.
    Area {
        col: usize,
    },
}

struct Plan {
    schema: SchemaRef,
    fills: Vec<Fill>,
    /// Index of the code column checked against the exclusion lists.
    code_col: Option<usize>,
    dropped: Vec<String>,
}

fn plan(table: Table, policy: &CollectionPolicy) -> Plan {
    let mut fields = vec![
        Field::new("patient_id", DataType::FixedSizeBinary(32), false),
        // The first 8 bytes of the pseudonym as a number: lets the TRE count
        // distinct patients per released cell with a fast integer
        // accumulator. Two patients sharing a key (odds ~1e-8 at 1M patients)
        // would be counted once: the error can only make suppression stricter.
        Field::new("patient_key", DataType::Int64, false),
    ];
    // The practice is a property of the registration, so only the patients
    // table names it (as a pseudonym); events link to it through patient_id.
    if table == Table::Patients {
        fields.push(Field::new(
            "practice_id",
            DataType::FixedSizeBinary(32),
            false,
        ));
    }
    let mut fills = Vec::new();
    let mut dropped = Vec::new();
    let mut code_col = None;
    for (i, (col, action)) in table
        .columns()
        .iter()
        .zip(policy.actions(table))
        .enumerate()
    {
        if col.kind == Kind::Code {
            code_col = Some(i);
        }
        match (col.kind, *action) {
            (_, Action::Drop) => dropped.push(col.name.to_owned()),
            (Kind::NhsNumber, _) => {}
            (Kind::BirthDate, Action::Generalise(rule)) => {
                let name = if rule == Rule::Year {
                    "birth_year"
                } else {
                    "birth_month"
                };
                fields.push(Field::new(name, DataType::Date32, !col.required));
                fills.push(Fill::Date {
                    col: i,
                    rule: Some(rule),
                    required: col.required,
                });
            }
            (Kind::Date | Kind::BirthDate, a) => {
                fields.push(Field::new(col.name, DataType::Date32, !col.required));
                let rule = if let Action::Generalise(r) = a {
                    Some(r)
                } else {
                    None
                };
                fills.push(Fill::Date {
                    col: i,
                    rule,
                    required: col.required,
                });
            }
            (Kind::Postcode, _) => {
                fields.push(Field::new("lsoa_code", DataType::Utf8, true));
                fields.push(Field::new("imd_decile", DataType::UInt8, true));
                fills.push(Fill::Area { col: i });
            }
            (Kind::Number, _) => {
                fields.push(Field::new(col.name, DataType::Float64, true));
                fills.push(Fill::Number { col: i });
            }
            (
                Kind::Sex
                | Kind::Category
                | Kind::Code
                | Kind::Name
                | Kind::FreeText
                | Kind::RecordId,
                _,
            ) => {
                fields.push(Field::new(col.name, DataType::Utf8, !col.required));
                fills.push(Fill::Text {
                    col: i,
                    required: col.required,
                });
            }
        }
    }
    Plan {
        schema: Arc::new(Schema::new(fields)),
        fills,
        code_col,
        dropped,
    }
}

/// The output schema of a table under a policy (for readers and tests).
pub fn output_schema(table: Table, policy: &CollectionPolicy) -> SchemaRef {
    plan(table, policy).schema
}

/// Arrow builders for one table's output, flushed every [`BATCH_ROWS`] rows.
struct Builders {
    ids: FixedSizeBinaryBuilder,
    keys: Int64Builder,
    /// Only for the patients table.
    practice: Option<FixedSizeBinaryBuilder>,
    cols: Vec<ColBuilder>,
    rows: usize,
}

enum ColBuilder {
    Date(Date32Builder),
    Text(StringBuilder),
    Number(Float64Builder),
    Area(StringBuilder, UInt8Builder),
}

impl Builders {
    fn new(plan: &Plan, table: Table) -> Builders {
        let cols = plan
            .fills
            .iter()
            .map(|f| match f {
                Fill::Date { .. } => ColBuilder::Date(Date32Builder::with_capacity(BATCH_ROWS)),
                Fill::Text { .. } => {
                    ColBuilder::Text(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 8))
                }
                Fill::Number { .. } => {
                    ColBuilder::Number(Float64Builder::with_capacity(BATCH_ROWS))
                }
                Fill::Area { .. } => ColBuilder::Area(
                    StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 9),
                    UInt8Builder::with_capacity(BATCH_ROWS),
                ),
            })
            .collect();
        Builders {
            ids: FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32),
            keys: Int64Builder::with_capacity(BATCH_ROWS),
            practice: (table == Table::Patients)
                .then(|| FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32)),
            cols,
            rows: 0,
        }
    }

    /// Writes the rows built so far (if any) as one record batch.
    fn flush(
        &mut self,
        schema: &SchemaRef,
        writer: &mut Writer,
        path: &Path,
    ) -> Result<(), CollectError> {
        if self.rows == 0 {
            return Ok(());
        }
        let batch = self
            .finish(schema)
            .map_err(|e| CollectError::arrow(path, e))?;
        writer
            .write(&batch)
            .map_err(|e| CollectError::parquet(path, e))
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut arrays: Vec<ArrayRef> =
            vec![Arc::new(self.ids.finish()), Arc::new(self.keys.finish())];
        if let Some(p) = &mut self.practice {
            arrays.push(Arc::new(p.finish()));
        }
        for c in &mut self.cols {
            match c {
                ColBuilder::Date(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Text(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Number(b) => arrays.push(Arc::new(b.finish())),
                ColBuilder::Area(l, d) => {
                    arrays.push(Arc::new(l.finish()));
                    arrays.push(Arc::new(d.finish()));
                }
            }
        }
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), arrays)
    }
}

/// A validated value waiting to be appended (all of a row's values are
/// checked before any is appended, so a bad row never half-enters a batch).
/// Text borrows the record it was checked in (checked once, as UTF-8).
#[derive(Clone, Copy)]
enum Value<'l> {
    Date(Option<Day>),
    Text(Option<&'l str>),
    Number(Option<f64>),
    Area(Option<(&'l str, u8)>),
}

/// What happens to a patient's rows at this practice.
#[derive(Clone, Copy)]
enum Verdict {
    /// No valid patients row for this number here.
    Unknown,
    /// Type 1 dissent in this practice's record: nothing leaves.
    Dissents,
    /// Tombstoned by another practice or a later opt-out: held back.
    Blocked(Pseudonym),
    Leaves(Pseudonym),
}

/// The exclusion lists as a fast lookup on the code's digits: a sorted list
/// searched by binary search (a few dozen codes; faster than hashing).
pub struct Exclusions {
    codes: Vec<(u64, usize)>,
    categories: Vec<String>,
}

impl Exclusions {
    pub fn new(policy: &CollectionPolicy) -> Exclusions {
        let mut categories: Vec<String> = policy.excluded_codes.values().cloned().collect();
        categories.sort();
        categories.dedup();
        let mut codes: Vec<(u64, usize)> = policy
            .excluded_codes
            .iter()
            .filter_map(|(code, cat)| {
                Some((
                    code.parse::<u64>().ok()?,
                    categories.iter().position(|c| c == cat)?,
                ))
            })
            .collect();
        codes.sort_unstable();
        Exclusions { codes, categories }
    }

    /// The exclusion category of a code (digits only, as validated).
    pub fn category(&self, code: &[u8]) -> Option<&str> {
        if code.is_empty() || code.len() > 19 {
            return None;
        }
        let n = code.iter().try_fold(0u64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
        })?;
        let i = self.codes.binary_search_by_key(&n, |(c, _)| *c).ok()?;
        Some(self.categories[self.codes[i].1].as_str())
    }
}

/// Counters for one practice.
#[derive(Default)]
struct Counts {
    receipt: Receipt,
    quarantine: Vec<u8>,
}

impl Counts {
    fn quarantine(&mut self, table: Table, line: u64, reason: &str) {
        *self
            .receipt
            .quarantined
            .entry(reason.to_owned())
            .or_default() += 1;
        *self
            .receipt
            .quarantined_by_table
            .entry(table.name().to_owned())
            .or_default()
            .entry(reason.to_owned())
            .or_default() += 1;
        let _ = writeln!(self.quarantine, "{},{line},{reason}", table.name());
    }
}

/// What the first look at a practice's files finds: the batch id and every
/// patient's Type 1 state.
pub struct Inputs {
    pub batch: String,
    pub type1: HashMap<[u8; 10], Type1State, RandomState>,
    pub hash_seconds: f64,
    pub type1_seconds: f64,
}

/// Reads a practice's files once as raw bytes: hashes them into the batch id
/// (the same extract under the same key and policy always gives the same
/// id) and, in the clinical events, finds the Type 1 codes.
///
/// The Type 1 search looks for the code bytes anywhere (memchr's memmem) and
/// parses only the lines that contain one, so it costs little more than the
/// hash. A line is a Type 1 row only if its code column holds the code.
///
/// Fail safe: a dissent code whose date cannot be read counts as the latest
/// code (it cannot be shown to be superseded); a withdrawal with an
/// unreadable date is ignored (it cannot be shown to be later).
pub fn scan_inputs(
    ctx: &Context,
    practice: &PracticeExtract,
    reference_sha: &str,
) -> Result<Inputs, CollectError> {
    let t = Instant::now();
    let mut batch = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        b"gpdp/v1/batch".as_slice(),
        ctx.key_id.as_bytes(),
        ctx.policy.sha256.as_bytes(),
        practice.code.as_bytes(),
        reference_sha.as_bytes(),
    ] {
        batch.update(part);
        batch.update(b"\0");
    }
    let mut type1 = HashMap::default();
    let mut type1_seconds = 0.0;
    for table in Table::ALL {
        let path = practice.path(table);
        let started = Instant::now();
        let sha = if table == Table::ClinicalEvents {
            let reader = TableReader::open(&path, table)?;
            let columns = [
                reader.column_index(0),
                reader.column_index(1),
                reader.column_index(2),
            ];
            let sha = scan_events(&path, columns, &ctx.policy.type1, &mut type1)?;
            type1_seconds = started.elapsed().as_secs_f64();
            sha
        } else {
            crate::store::sha256_file(&path)
                .map_err(|e| CollectError::Store(Box::new(e)))?
                .0
        };
        batch.update(sha.as_bytes());
        batch.update(b"\0");
    }
    Ok(Inputs {
        batch: hex(&batch.finish().as_ref()[..16]),
        type1,
        hash_seconds: (t.elapsed().as_secs_f64() - type1_seconds).max(0.0),
        type1_seconds,
    })
}

/// Splits one CSV line into `record`: by commas when it has no quotes (the
/// usual case), with a full CSV parser otherwise.
fn split_line(line: &[u8], record: &mut csv::ByteRecord) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if memchr::memchr(b'"', line).is_none() {
        record.clear();
        for field in line.split(|b| *b == b',') {
            record.push_field(field);
        }
        return true;
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(line);
    reader.read_byte_record(record).unwrap_or(false)
}

/// Hashes the clinical events file and records every Type 1 code in it.
/// `columns` are the file positions of nhs_number, date and the code.
fn scan_events(
    path: &Path,
    columns: [usize; 3],
    codes: &Type1Codes,
    states: &mut HashMap<[u8; 10], Type1State, RandomState>,
) -> Result<String, CollectError> {
    use std::io::Read;
    let read_err = |source| {
        CollectError::Extract(ExtractError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let finders: Vec<(memchr::memmem::Finder, Type1Code)> = codes
        .dissent
        .iter()
        .map(|c| (c.as_str(), Type1Code::Dissent))
        .chain(
            codes
                .withdrawn
                .iter()
                .map(|c| (c.as_str(), Type1Code::Withdrawn)),
        )
        .map(|(c, k)| (memchr::memmem::Finder::new(c.as_bytes()).into_owned(), k))
        .collect();
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf: Vec<u8> = Vec::with_capacity(8 << 20);
    let mut chunk = vec![0u8; 4 << 20];
    let mut record = csv::ByteRecord::new();
    loop {
        let n = file.read(&mut chunk).map_err(read_err)?;
        sha.update(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
        // Scan whole lines only; keep a partial last line for the next read.
        let complete = if n == 0 {
            buf.len()
        } else {
            memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1)
        };
        for (finder, kind) in &finders {
            let mut next_line = 0;
            for hit in finder.find_iter(&buf[..complete]) {
                if hit < next_line {
                    continue; // a second hit on a line already read
                }
                let start = memchr::memrchr(b'\n', &buf[..hit]).map_or(0, |i| i + 1);
                let end = memchr::memchr(b'\n', &buf[hit..complete]).map_or(complete, |i| hit + i);
                next_line = end;
                let line = &buf[start..end];
                if !split_line(line, &mut record) || record.get(columns[2]) != Some(finder.needle())
                {
                    continue;
                }
                let Ok(nhs) = NhsNumber::parse(record.get(columns[0]).unwrap_or_default()) else {
                    continue;
                };
                match (parse_date(record.get(columns[1]).unwrap_or_default()), kind) {
                    (Some(day), _) => states
                        .entry(*nhs.as_bytes())
                        .or_default()
                        .record(day, *kind),
                    (None, Type1Code::Dissent) => states
                        .entry(*nhs.as_bytes())
                        .or_default()
                        .record(Day::MAX, *kind),
                    (None, Type1Code::Withdrawn) => {}
                }
            }
        }
        buf.drain(..complete);
        if n == 0 {
            break;
        }
    }
    Ok(hex(sha.finish().as_ref()))
}

/// Collects one practice into staged files under `ctx.store`.
pub fn collect_practice(
    ctx: &Context,
    practice: &PracticeExtract,
    inputs: Inputs,
) -> Result<Staged, CollectError> {
    let Inputs {
        batch,
        type1,
        hash_seconds,
        type1_seconds,
    } = inputs;
    let started = Instant::now();
    let started_at = crate::store::now_rfc3339();
    let mut counts = Counts::default();
    let mut stages = StageSeconds {
        hash_inputs: hash_seconds,
        type1: type1_seconds,
        ..StageSeconds::default()
    };
    let dissenting: HashSet<[u8; 10], RandomState> = type1
        .iter()
        .filter(|(_, s)| s.dissents())
        .map(|(n, _)| *n)
        .collect();

    let practice_id = ctx.pseudonymiser.practice(&practice.code);
    let mut pseudonyms_computed = 0u64;
    let mut known: HashSet<[u8; 10], RandomState> = HashSet::default();
    // Each distinct NHS number is judged (and hashed) once per batch; rows
    // come grouped by patient, so the last verdict answers most rows
    // without even a hash-map lookup.
    let mut verdicts: HashMap<[u8; 10], Verdict, RandomState> = HashMap::default();
    let mut collected: HashSet<Pseudonym> = HashSet::new();
    let mut withheld: HashSet<Pseudonym> = HashSet::new();
    let mut files = Vec::new();
    let mut bytes_in = 0u64;
    let mut chunk = vec![csv::ByteRecord::new(); CHUNK_ROWS];

    for table in Table::ALL {
        let path = practice.path(table);
        bytes_in += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut reader = TableReader::open(&path, table)?;
        let plan = plan(table, ctx.policy);
        let mut last: Option<([u8; 10], Verdict)> = None;
        counts
            .receipt
            .dropped_columns
            .insert(table.name().into(), plan.dropped.clone());
        if !reader.unknown_columns.is_empty() {
            counts
                .receipt
                .unknown_columns
                .insert(table.name().into(), reader.unknown_columns.clone());
        }
        let relative = format!("tables/{}/{batch}.parquet", table.name());
        let tmp = ctx.store.join(format!("{relative}.tmp"));
        let mut writer = Writer::create(&tmp, plan.schema.clone(), ctx.policy.codec)
            .map_err(|e| CollectError::parquet(&tmp, e))?;
        let mut builders = Builders::new(&plan, table);
        let mut postcode_scratch = Vec::new();
        let mut last_nhs: Option<NhsNumber> = None;
        let (mut rows_in, mut rows_out, mut type1_withheld) = (0u64, 0u64, 0u64);

        // Records are read a chunk at a time, so that reading and parsing CSV
        // is timed apart from what is done with the rows, at two clock reads
        // a chunk.
        loop {
            let t = Instant::now();
            let mut n = 0;
            while n < chunk.len() && reader.read(&mut chunk[n])? {
                n += 1;
            }
            stages.read_parse += t.elapsed().as_secs_f64();
            if n == 0 {
                break;
            }
            let t = Instant::now();
            let timed_apart = stages.pseudonymise + stages.parquet_write;
            let mut values: Vec<Value> = Vec::with_capacity(plan.fills.len());
            for record in &chunk[..n] {
                rows_in += 1;
                let line = line_of(record);
                if record.len() != reader.arity {
                    counts.quarantine(table, line, "wrong_column_count");
                    continue;
                }
                // Rows come grouped by patient: a number equal to the last
                // valid one is that valid number (a valid number is exactly
                // its ten digits), so it is not checked again.
                let raw = reader.field(record, 0);
                let nhs = match last_nhs {
                    Some(n) if n.as_bytes() == raw => n,
                    _ => match NhsNumber::parse(raw) {
                        Ok(n) => *last_nhs.insert(n),
                        Err(e) => {
                            counts.quarantine(table, line, e.reason());
                            continue;
                        }
                    },
                };
                // Validate every value that would leave before anything else.
                values.clear();
                let mut problem = None;
                for fill in &plan.fills {
                    let v = match *fill {
                        Fill::Date {
                            col,
                            rule,
                            required,
                        } => {
                            let raw = reader.field(record, col);
                            match (raw.is_empty(), parse_ymd(raw)) {
                                (true, _) if required => Err("missing_value"),
                                (true, _) => Ok(Value::Date(None)),
                                (false, Some(ymd)) => {
                                    Ok(Value::Date(Some(generalise_ymd(ymd, rule))))
                                }
                                (false, None) => Err("malformed_date"),
                            }
                        }
                        Fill::Text { col, required } => {
                            match std::str::from_utf8(reader.field(record, col)) {
                                Ok("") if required => Err("missing_value"),
                                Ok("") => Ok(Value::Text(None)),
                                Ok(s)
                                    if Some(col) == plan.code_col
                                        && !s.bytes().all(|b| b.is_ascii_digit()) =>
                                {
                                    Err("invalid_code")
                                }
                                Ok(s)
                                    if table.columns()[col].kind == Kind::Sex
                                        && !matches!(s, "M" | "F" | "I" | "U") =>
                                {
                                    Err("invalid_value")
                                }
                                Ok(s) => Ok(Value::Text(Some(s))),
                                Err(_) => Err("invalid_value"),
                            }
                        }
                        Fill::Number { col } => {
                            let raw = reader.field(record, col);
                            if raw.is_empty() {
                                Ok(Value::Number(None))
                            } else {
                                std::str::from_utf8(raw)
                                    .ok()
                                    .and_then(|s| s.parse::<f64>().ok())
                                    .filter(|x| x.is_finite())
                                    .map(|x| Value::Number(Some(x)))
                                    .ok_or("invalid_number")
                            }
                        }
                        Fill::Area { col } => {
                            let raw = reader.field(record, col);
                            let area = ctx.lookup.and_then(|l| l.get(raw, &mut postcode_scratch));
                            if area.is_none() && !raw.is_empty() {
                                counts.receipt.unmatched_postcodes += 1;
                            }
                            Ok(Value::Area(area))
                        }
                    };
                    match v {
                        Ok(v) => values.push(v),
                        Err(reason) => {
                            problem = Some(reason);
                            break;
                        }
                    }
                }
                if let Some(reason) = problem {
                    counts.quarantine(table, line, reason);
                    continue;
                }
                if table == Table::Patients {
                    known.insert(*nhs.as_bytes());
                }
                let verdict = match last {
                    Some((n, v)) if n == *nhs.as_bytes() => v,
                    _ => {
                        let v = *verdicts.entry(*nhs.as_bytes()).or_insert_with(|| {
                            if !known.contains(nhs.as_bytes()) {
                                Verdict::Unknown
                            } else if dissenting.contains(nhs.as_bytes()) {
                                Verdict::Dissents
                            } else {
                                let t = Instant::now();
                                let id = ctx.pseudonymiser.patient(&nhs);
                                pseudonyms_computed += 1;
                                stages.pseudonymise += t.elapsed().as_secs_f64();
                                if ctx.blocked.contains(&id) {
                                    Verdict::Blocked(id)
                                } else {
                                    Verdict::Leaves(id)
                                }
                            }
                        });
                        last = Some((*nhs.as_bytes(), v));
                        v
                    }
                };
                let id = match verdict {
                    // No valid registration row for this number at this practice: fail closed.
                    Verdict::Unknown => {
                        counts.quarantine(table, line, "unknown_patient");
                        continue;
                    }
                    Verdict::Dissents => {
                        type1_withheld += 1;
                        continue;
                    }
                    Verdict::Blocked(id) => {
                        withheld.insert(id);
                        counts.receipt.withheld_by_tombstone.rows += 1;
                        continue;
                    }
                    Verdict::Leaves(id) => id,
                };
                if let Some(col) = plan.code_col
                    && let Some(category) = ctx.excluded.category(reader.field(record, col))
                {
                    *counts
                        .receipt
                        .excluded_codes
                        .entry(category.to_owned())
                        .or_default() += 1;
                    continue;
                }

                builders
                    .ids
                    .append_value(id)
                    .map_err(|e| CollectError::arrow(&tmp, e))?;
                builders
                    .keys
                    .append_value(crate::deid::pseudonym::patient_key(&id));
                if let Some(p) = &mut builders.practice {
                    p.append_value(practice_id)
                        .map_err(|e| CollectError::arrow(&tmp, e))?;
                }
                for (b, v) in builders.cols.iter_mut().zip(&values) {
                    match (b, v) {
                        (ColBuilder::Date(b), Value::Date(d)) => b.append_option(*d),
                        (ColBuilder::Text(b), Value::Text(s)) => b.append_option(*s),
                        (ColBuilder::Number(b), Value::Number(x)) => b.append_option(*x),
                        (ColBuilder::Area(l, d), Value::Area(a)) => {
                            l.append_option(a.map(|a| a.0));
                            d.append_option(a.map(|a| a.1));
                        }
                        _ => unreachable!("builders follow the plan"),
                    }
                }
                builders.rows += 1;
                rows_out += 1;
                if table == Table::Patients {
                    collected.insert(id);
                }
                if builders.rows == BATCH_ROWS {
                    let t = Instant::now();
                    builders.flush(&plan.schema, &mut writer, &tmp)?;
                    stages.parquet_write += t.elapsed().as_secs_f64();
                }
            }
            stages.validate_generalise += t.elapsed().as_secs_f64()
                - (stages.pseudonymise + stages.parquet_write - timed_apart);
        }
        let t = Instant::now();
        builders.flush(&plan.schema, &mut writer, &tmp)?;
        writer
            .finish()
            .map_err(|e| CollectError::parquet(&tmp, e))?;
        stages.parquet_write += t.elapsed().as_secs_f64();
        let dest = ctx.store.join(&relative);
        std::fs::rename(&tmp, &dest).map_err(|e| CollectError::io(&dest, e))?;
        files.push((table, relative));
        counts.receipt.rows_in.insert(table.name().into(), rows_in);
        counts
            .receipt
            .rows_out
            .insert(table.name().into(), rows_out);
        counts
            .receipt
            .type1_withheld_rows
            .insert(table.name().into(), type1_withheld);
    }

    let dissenters: Vec<Pseudonym> = {
        let mut d: Vec<_> = type1
            .iter()
            .filter(|(_, s)| s.dissents())
            .filter_map(|(n, _)| NhsNumber::parse(n).ok())
            .map(|n| ctx.pseudonymiser.patient(&n))
            .collect();
        d.sort_unstable();
        d
    };
    let quarantine_file = write_quarantine(ctx.quarantine_dir, &practice.code, &counts.quarantine)?;

    let r = &mut counts.receipt;
    r.practice = practice.code.clone();
    r.batch = batch.clone();
    r.key_id = ctx.key_id.to_owned();
    r.policy_sha256 = ctx.policy.sha256.clone();
    r.patients_in = known.len() as u64;
    r.patients_out = collected.len() as u64;
    r.type1_excluded_patients = known.iter().filter(|n| dissenting.contains(*n)).count() as u64;
    r.withheld_by_tombstone.patients = withheld.len() as u64;
    r.pseudonyms_computed = pseudonyms_computed + dissenters.len() as u64;
    r.tombstones_emitted = dissenters.len() as u64;
    r.quarantine_file = quarantine_file.display().to_string();
    r.bytes_in = bytes_in;
    r.started = started_at;
    r.finished = crate::store::now_rfc3339();
    r.seconds = started.elapsed().as_secs_f64() + hash_seconds;
    r.stage_seconds = stages;
    let mut patients: Vec<Pseudonym> = collected.into_iter().collect();
    patients.sort_unstable();
    Ok(Staged {
        practice: practice.code.clone(),
        batch,
        files,
        receipt: counts.receipt,
        patients,
        dissenters,
        withheld: withheld.iter().map(|p| hex(p)).collect(),
    })
}

/// Writes the practice-side quarantine list (table, line, reason): never
/// into the store, and never the row's content (the line number finds it).
fn write_quarantine(dir: &Path, practice: &str, rows: &[u8]) -> Result<PathBuf, CollectError> {
    std::fs::create_dir_all(dir).map_err(|e| CollectError::io(dir, e))?;
    let path = dir.join(format!("{practice}.csv"));
    let tmp = dir.join(format!(".{practice}.csv.tmp"));
    let mut text = b"table,line,reason\n".to_vec();
    text.extend_from_slice(rows);
    std::fs::write(&tmp, &text).map_err(|e| CollectError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CollectError::io(&path, e))?;
    Ok(path)
}
