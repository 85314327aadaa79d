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

use arrow::array::{ArrayRef, Date32Builder, FixedSizeBinaryBuilder, Float64Builder, RecordBatch, StringBuilder, UInt8Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::CollectError;
use super::receipt::{Receipt, StageSeconds};
use crate::calendar::{Day, parse_date};
use crate::deid::generalise::{PostcodeLookup, generalise_date};
use crate::deid::pseudonym::{Pseudonym, PseudonymCache, Pseudonymiser, hex};
use crate::extract::{Kind, PracticeExtract, Table, TableReader, line_of};
use crate::nhs_number::NhsNumber;
use crate::optout::type1::{Type1Code, Type1State};
use crate::policy::{Action, CollectionPolicy, Rule};
use crate::store::parquet::Writer;

/// Rows per Arrow record batch.
pub const BATCH_ROWS: usize = 64 * 1024;

/// Everything shared by the practices of one run.
pub struct Context<'a> {
    pub policy: &'a CollectionPolicy,
    pub pseudonymiser: &'a Pseudonymiser,
    pub key_id: &'a str,
    pub lookup: Option<&'a PostcodeLookup>,
    /// Patients whose tombstones (from any practice) were active when the run began.
    pub blocked: &'a HashSet<Pseudonym>,
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
    /// Pseudonyms of the patients in this batch.
    pub patients: HashSet<Pseudonym>,
    /// Pseudonyms of patients who dissent here (sent as tombstones).
    pub dissenters: Vec<Pseudonym>,
    /// Patients held back by another practice's tombstone (hex).
    pub withheld: BTreeSet<String>,
}

/// One output column and how it is filled from the extract.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Date { col: usize, rule: Option<Rule>, required: bool },
    Text { col: usize, required: bool },
    Number { col: usize },
    /// Postcode to (lsoa_code, imd_decile): two output columns.
    Area { col: usize },
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
        Field::new("practice_id", DataType::FixedSizeBinary(32), false),
    ];
    let mut fills = Vec::new();
    let mut dropped = Vec::new();
    let mut code_col = None;
    for (i, (col, action)) in table.columns().iter().zip(policy.actions(table)).enumerate() {
        if col.kind == Kind::Code {
            code_col = Some(i);
        }
        match (col.kind, *action) {
            (_, Action::Drop) => dropped.push(col.name.to_owned()),
            (Kind::NhsNumber, _) => {}
            (Kind::BirthDate, Action::Generalise(rule)) => {
                let name = if rule == Rule::Year { "birth_year" } else { "birth_month" };
                fields.push(Field::new(name, DataType::Date32, !col.required));
                fills.push(Fill::Date { col: i, rule: Some(rule), required: col.required });
            }
            (Kind::Date | Kind::BirthDate, a) => {
                fields.push(Field::new(col.name, DataType::Date32, !col.required));
                let rule = if let Action::Generalise(r) = a { Some(r) } else { None };
                fills.push(Fill::Date { col: i, rule, required: col.required });
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
            (Kind::Sex | Kind::Category | Kind::Code | Kind::Name | Kind::FreeText, _) => {
                fields.push(Field::new(col.name, DataType::Utf8, !col.required));
                fills.push(Fill::Text { col: i, required: col.required });
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
    practice: FixedSizeBinaryBuilder,
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
    fn new(plan: &Plan) -> Builders {
        let cols = plan
            .fills
            .iter()
            .map(|f| match f {
                Fill::Date { .. } => ColBuilder::Date(Date32Builder::with_capacity(BATCH_ROWS)),
                Fill::Text { .. } => ColBuilder::Text(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 8)),
                Fill::Number { .. } => ColBuilder::Number(Float64Builder::with_capacity(BATCH_ROWS)),
                Fill::Area { .. } => ColBuilder::Area(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 9), UInt8Builder::with_capacity(BATCH_ROWS)),
            })
            .collect();
        Builders {
            ids: FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32),
            practice: FixedSizeBinaryBuilder::with_capacity(BATCH_ROWS, 32),
            cols,
            rows: 0,
        }
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(self.ids.finish()), Arc::new(self.practice.finish())];
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
/// Text values are re-read from the record when appended (they were checked
/// to be UTF-8 here), so this holds no borrow of the record.
#[derive(Clone, Copy)]
enum Value<'l> {
    Date(Option<Day>),
    /// The extract column holding the text, if present.
    Text(Option<usize>),
    Number(Option<f64>),
    Area(Option<(&'l str, u8)>),
}

/// Counters for one practice.
#[derive(Default)]
struct Counts {
    receipt: Receipt,
    quarantine: Vec<u8>,
}

impl Counts {
    fn quarantine(&mut self, table: Table, line: u64, reason: &str) {
        *self.receipt.quarantined.entry(reason.to_owned()).or_default() += 1;
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

/// Hashes the inputs of a practice's collection into its batch id: the
/// same extract under the same key and policy always gives the same id.
pub fn batch_id(ctx: &Context, practice: &PracticeExtract, reference_sha: &str) -> Result<String, CollectError> {
    let mut ctx_hash = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [b"gpdp/v1/batch".as_slice(), ctx.key_id.as_bytes(), ctx.policy.sha256.as_bytes(), practice.code.as_bytes(), reference_sha.as_bytes()] {
        ctx_hash.update(part);
        ctx_hash.update(b"\0");
    }
    for table in Table::ALL {
        let path = practice.path(table);
        let (sha, _) = crate::store::sha256_file(&path).map_err(|e| CollectError::Store(Box::new(e)))?;
        ctx_hash.update(sha.as_bytes());
        ctx_hash.update(b"\0");
    }
    Ok(hex(&ctx_hash.finish().as_ref()[..16]))
}

/// First pass: every patient's Type 1 state from this practice's clinical events.
///
/// Fail safe: a dissent code whose date cannot be read counts as the latest
/// code (it cannot be shown to be superseded); a withdrawal with an
/// unreadable date is ignored (it cannot be shown to be later).
fn scan_type1(ctx: &Context, practice: &PracticeExtract) -> Result<HashMap<[u8; 10], Type1State>, CollectError> {
    let table = Table::ClinicalEvents;
    let mut reader = TableReader::open(&practice.path(table), table)?;
    let (dissent, withdrawn) = (&ctx.policy.type1.dissent, &ctx.policy.type1.withdrawn);
    let mut states: HashMap<[u8; 10], Type1State> = HashMap::new();
    let mut record = csv::ByteRecord::new();
    while reader.read(&mut record)? {
        let code = reader.field(&record, 2);
        let kind = if dissent.iter().any(|c| c.as_bytes() == code) {
            Type1Code::Dissent
        } else if withdrawn.iter().any(|c| c.as_bytes() == code) {
            Type1Code::Withdrawn
        } else {
            continue;
        };
        let Ok(nhs) = NhsNumber::parse(reader.field(&record, 0)) else {
            continue;
        };
        match (parse_date(reader.field(&record, 1)), kind) {
            (Some(day), _) => states.entry(*nhs.as_bytes()).or_default().record(day, kind),
            (None, Type1Code::Dissent) => states.entry(*nhs.as_bytes()).or_default().record(Day::MAX, kind),
            (None, Type1Code::Withdrawn) => {}
        }
    }
    Ok(states)
}

/// Collects one practice into staged files under `ctx.store`.
pub fn collect_practice(ctx: &Context, practice: &PracticeExtract, batch: String, hash_seconds: f64) -> Result<Staged, CollectError> {
    let started = Instant::now();
    let started_at = crate::store::now_rfc3339();
    let mut counts = Counts::default();
    let mut stages = StageSeconds {
        hash_inputs: hash_seconds,
        ..StageSeconds::default()
    };

    let t = Instant::now();
    let type1 = scan_type1(ctx, practice)?;
    stages.type1 = t.elapsed().as_secs_f64();
    let dissenting: HashSet<[u8; 10]> = type1.iter().filter(|(_, s)| s.dissents()).map(|(n, _)| *n).collect();

    let practice_id = ctx.pseudonymiser.practice(&practice.code);
    let mut cache = PseudonymCache::new(1 << 20);
    let mut known: HashSet<[u8; 10]> = HashSet::new();
    let mut collected: HashSet<Pseudonym> = HashSet::new();
    let mut withheld: HashSet<Pseudonym> = HashSet::new();
    let mut files = Vec::new();
    let mut bytes_in = 0u64;
    let transform_started = Instant::now();

    for table in Table::ALL {
        let path = practice.path(table);
        bytes_in += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut reader = TableReader::open(&path, table)?;
        let plan = plan(table, ctx.policy);
        counts.receipt.dropped_columns.insert(table.name().into(), plan.dropped.clone());
        if !reader.unknown_columns.is_empty() {
            counts.receipt.unknown_columns.insert(table.name().into(), reader.unknown_columns.clone());
        }
        let relative = format!("tables/{}/{batch}.parquet", table.name());
        let tmp = ctx.store.join(format!("{relative}.tmp"));
        let mut writer = Writer::create(&tmp, plan.schema.clone(), ctx.policy.codec).map_err(|e| CollectError::parquet(&tmp, e))?;
        let mut builders = Builders::new(&plan);
        let mut record = csv::ByteRecord::new();
        let mut values: Vec<Value> = Vec::with_capacity(plan.fills.len());
        let mut postcode_scratch = Vec::new();
        let (mut rows_in, mut rows_out, mut type1_withheld) = (0u64, 0u64, 0u64);

        while reader.read(&mut record)? {
            rows_in += 1;
            let line = line_of(&record);
            if record.len() != reader.arity {
                counts.quarantine(table, line, "wrong_column_count");
                continue;
            }
            let nhs = match NhsNumber::parse(reader.field(&record, 0)) {
                Ok(n) => n,
                Err(e) => {
                    counts.quarantine(table, line, e.reason());
                    continue;
                }
            };
            // Validate every value that would leave before anything else.
            values.clear();
            let mut problem = None;
            for fill in &plan.fills {
                let v = match *fill {
                    Fill::Date { col, rule, required } => {
                        let raw = reader.field(&record, col);
                        match (raw.is_empty(), parse_date(raw)) {
                            (true, _) if required => Err("missing_value"),
                            (true, _) => Ok(Value::Date(None)),
                            (false, Some(d)) => Ok(Value::Date(Some(rule.map_or(d, |r| generalise_date(d, r))))),
                            (false, None) => Err("malformed_date"),
                        }
                    }
                    Fill::Text { col, required } => match std::str::from_utf8(reader.field(&record, col)) {
                        Ok("") if required => Err("missing_value"),
                        Ok("") => Ok(Value::Text(None)),
                        Ok(s) if Some(col) == plan.code_col && !s.bytes().all(|b| b.is_ascii_digit()) => Err("invalid_code"),
                        Ok(s) if table.columns()[col].kind == Kind::Sex && !matches!(s, "M" | "F" | "I" | "U") => Err("invalid_value"),
                        Ok(_) => Ok(Value::Text(Some(col))),
                        Err(_) => Err("invalid_value"),
                    },
                    Fill::Number { col } => {
                        let raw = reader.field(&record, col);
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
                        let raw = reader.field(&record, col);
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
            } else if !known.contains(nhs.as_bytes()) {
                // No valid registration row for this number at this practice: fail closed.
                counts.quarantine(table, line, "unknown_patient");
                continue;
            }
            if dissenting.contains(nhs.as_bytes()) {
                type1_withheld += 1;
                continue;
            }
            let t = Instant::now();
            let before = cache.hashed;
            let id = cache.get(ctx.pseudonymiser, &nhs);
            if cache.hashed != before {
                stages.pseudonymise += t.elapsed().as_secs_f64();
            }
            if ctx.blocked.contains(&id) {
                withheld.insert(id);
                counts.receipt.withheld_by_tombstone.rows += 1;
                continue;
            }
            if let Some(col) = plan.code_col {
                let code = std::str::from_utf8(reader.field(&record, col)).unwrap_or("");
                if let Some(category) = ctx.policy.excluded_codes.get(code) {
                    *counts.receipt.excluded_codes.entry(category.clone()).or_default() += 1;
                    continue;
                }
            }

            builders.ids.append_value(id).map_err(|e| CollectError::arrow(&tmp, e))?;
            builders.practice.append_value(practice_id).map_err(|e| CollectError::arrow(&tmp, e))?;
            for (b, v) in builders.cols.iter_mut().zip(&values) {
                match (b, v) {
                    (ColBuilder::Date(b), Value::Date(d)) => b.append_option(*d),
                    (ColBuilder::Text(b), Value::Text(col)) => b.append_option(col.map(|c| std::str::from_utf8(reader.field(&record, c)).unwrap_or_default())),
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
                let rb = builders.finish(&plan.schema).map_err(|e| CollectError::arrow(&tmp, e))?;
                writer.write(&rb).map_err(|e| CollectError::parquet(&tmp, e))?;
                stages.parquet_write += t.elapsed().as_secs_f64();
            }
        }
        let t = Instant::now();
        if builders.rows > 0 {
            let rb = builders.finish(&plan.schema).map_err(|e| CollectError::arrow(&tmp, e))?;
            writer.write(&rb).map_err(|e| CollectError::parquet(&tmp, e))?;
        }
        writer.finish().map_err(|e| CollectError::parquet(&tmp, e))?;
        stages.parquet_write += t.elapsed().as_secs_f64();
        let dest = ctx.store.join(&relative);
        std::fs::rename(&tmp, &dest).map_err(|e| CollectError::io(&dest, e))?;
        files.push((table, relative));
        counts.receipt.rows_in.insert(table.name().into(), rows_in);
        counts.receipt.rows_out.insert(table.name().into(), rows_out);
        counts.receipt.type1_withheld_rows.insert(table.name().into(), type1_withheld);
    }
    stages.read_transform = (transform_started.elapsed().as_secs_f64() - stages.parquet_write - stages.pseudonymise).max(0.0);

    let dissenters: Vec<Pseudonym> = {
        let mut d: Vec<_> = type1.iter().filter(|(_, s)| s.dissents()).filter_map(|(n, _)| NhsNumber::parse(n).ok()).map(|n| ctx.pseudonymiser.patient(&n)).collect();
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
    r.pseudonyms_computed = cache.hashed + dissenters.len() as u64;
    r.tombstones_emitted = dissenters.len() as u64;
    r.quarantine_file = quarantine_file.display().to_string();
    r.bytes_in = bytes_in;
    r.started = started_at;
    r.finished = crate::store::now_rfc3339();
    r.seconds = started.elapsed().as_secs_f64() + hash_seconds;
    r.stage_seconds = stages;
    Ok(Staged {
        practice: practice.code.clone(),
        batch,
        files,
        receipt: counts.receipt,
        patients: collected,
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
