//! One practice's collection, as the practice system would run it before
//! anything leaves: Type 1 at source, then each table through the
//! de-identification engine ([`crate::deid`]: validate, pseudonymise,
//! generalise, drop, quarantine), the exclusion lists, and the patients
//! held back — streaming Arrow record batches into Parquet.
//!
//! Two passes: the first reads only the Type 1 codes from the clinical
//! events, so that a dissenting patient is known before any of their rows is
//! considered; the second streams every table. Memory is bounded by the
//! record batch size plus per-patient sets (never per row).
//!
//! This is the throughput-critical path: records are read as bytes a chunk
//! at a time, each distinct NHS number is judged (and hashed, with the
//! HMAC key state built once) once per batch, and nothing is allocated per
//! row.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::CollectError;
use super::receipt::{Receipt, StageSeconds};
use ahash::RandomState;

use crate::calendar::{Day, parse_date};
use crate::deid::builders::Builders;
use crate::deid::generalise::PostcodeLookup;
use crate::deid::plan::Plan;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::deid::row::{Checker, Exclusions, Value};
use crate::digest::hex;
use crate::extract::{ExtractError, PracticeExtract, Table, TableReader, line_of};
use crate::nhs_number::NhsNumber;
use crate::optout::type1::{Type1Code, Type1State};
use crate::policy::{CollectionPolicy, Type1Codes};
use crate::store::parquet::Writer;

/// CSV records read at a time (see the stage timers in [`Run::table`]).
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
    let started = Instant::now();
    let started_at = crate::store::now_rfc3339();
    let mut run = Run {
        ctx,
        practice,
        counts: Counts::default(),
        stages: StageSeconds {
            hash_inputs: inputs.hash_seconds,
            type1: inputs.type1_seconds,
            ..StageSeconds::default()
        },
        dissenting: inputs
            .type1
            .iter()
            .filter(|(_, s)| s.dissents())
            .map(|(n, _)| *n)
            .collect(),
        practice_id: ctx.pseudonymiser.practice(&practice.code),
        pseudonyms_computed: 0,
        known: HashSet::default(),
        verdicts: HashMap::default(),
        collected: HashSet::new(),
        withheld: HashSet::new(),
        files: Vec::new(),
        bytes_in: 0,
    };
    let mut chunk = vec![csv::ByteRecord::new(); CHUNK_ROWS];
    for table in Table::ALL {
        run.table(table, &inputs.batch, &mut chunk)?;
    }
    run.finish(inputs, started, started_at)
}

/// One practice's collection under way: what its tables share.
struct Run<'a> {
    ctx: &'a Context<'a>,
    practice: &'a PracticeExtract,
    counts: Counts,
    stages: StageSeconds,
    /// NHS numbers whose latest Type 1 code here is a dissent.
    dissenting: HashSet<[u8; 10], RandomState>,
    practice_id: Pseudonym,
    pseudonyms_computed: u64,
    /// NHS numbers with a valid patients row here.
    known: HashSet<[u8; 10], RandomState>,
    /// Each distinct NHS number is judged (and hashed) once per batch.
    verdicts: HashMap<[u8; 10], Verdict, RandomState>,
    collected: HashSet<Pseudonym>,
    withheld: HashSet<Pseudonym>,
    files: Vec<(Table, String)>,
    bytes_in: u64,
}

/// Rows of one table.
#[derive(Default)]
struct Tally {
    rows_in: u64,
    rows_out: u64,
    type1_withheld: u64,
}

impl Run<'_> {
    /// Streams one table into its staged Parquet file.
    ///
    /// Records are read a chunk at a time, so that reading and parsing CSV
    /// is timed apart from what is done with the rows, at two clock reads
    /// a chunk.
    fn table(
        &mut self,
        table: Table,
        batch: &str,
        chunk: &mut [csv::ByteRecord],
    ) -> Result<(), CollectError> {
        let path = self.practice.path(table);
        self.bytes_in += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut reader = TableReader::open(&path, table)?;
        let plan = Plan::table(table, self.ctx.policy.actions(table));
        let receipt = &mut self.counts.receipt;
        receipt
            .dropped_columns
            .insert(table.name().into(), plan.dropped.clone());
        if !reader.unknown_columns.is_empty() {
            receipt
                .unknown_columns
                .insert(table.name().into(), reader.unknown_columns.clone());
        }
        let relative = format!("tables/{}/{batch}.parquet", table.name());
        let tmp = self.ctx.store.join(format!("{relative}.tmp"));
        let mut writer = Writer::create(&tmp, plan.schema.clone(), self.ctx.policy.codec)
            .map_err(|e| CollectError::parquet(&tmp, e))?;
        let mut builders = Builders::new(&plan, Some(self.practice_id));
        let mut checker = Checker::new(&plan, self.ctx.lookup);
        // Rows come grouped by patient, so the last verdict answers most
        // rows without even a hash-map lookup.
        let mut last: Option<([u8; 10], Verdict)> = None;
        let mut tally = Tally::default();
        loop {
            let t = Instant::now();
            let mut n = 0;
            while n < chunk.len() && reader.read(&mut chunk[n])? {
                n += 1;
            }
            self.stages.read_parse += t.elapsed().as_secs_f64();
            if n == 0 {
                break;
            }
            let t = Instant::now();
            let timed_apart = self.stages.pseudonymise + self.stages.parquet_write;
            let mut values: Vec<Value> = Vec::with_capacity(plan.fills.len());
            for record in &chunk[..n] {
                tally.rows_in += 1;
                let line = line_of(record);
                // Validate every value that would leave before anything else.
                let complete = record.len() == reader.arity;
                let nhs = match checker.check(complete, |i| reader.field(record, i), &mut values) {
                    Ok(nhs) => nhs,
                    Err(reason) => {
                        self.counts.quarantine(table, line, reason);
                        continue;
                    }
                };
                let code = plan.code_col.map(|col| reader.field(record, col));
                let Some(id) = self.admit(table, line, &nhs, code, &mut last, &mut tally) else {
                    continue;
                };
                let full = builders
                    .append(&id, &values)
                    .map_err(|e| CollectError::arrow(&tmp, e))?;
                tally.rows_out += 1;
                if table == Table::Patients {
                    self.collected.insert(id);
                }
                if full {
                    let t = Instant::now();
                    write(&mut builders, &mut writer, &tmp)?;
                    self.stages.parquet_write += t.elapsed().as_secs_f64();
                }
            }
            self.stages.validate_generalise += t.elapsed().as_secs_f64()
                - (self.stages.pseudonymise + self.stages.parquet_write - timed_apart);
        }
        let t = Instant::now();
        write(&mut builders, &mut writer, &tmp)?;
        writer
            .finish()
            .map_err(|e| CollectError::parquet(&tmp, e))?;
        self.stages.parquet_write += t.elapsed().as_secs_f64();
        let dest = self.ctx.store.join(&relative);
        std::fs::rename(&tmp, &dest).map_err(|e| CollectError::io(&dest, e))?;
        self.files.push((table, relative));
        let r = &mut self.counts.receipt;
        r.unmatched_postcodes += checker.unmatched_postcodes;
        r.rows_in.insert(table.name().into(), tally.rows_in);
        r.rows_out.insert(table.name().into(), tally.rows_out);
        r.type1_withheld_rows
            .insert(table.name().into(), tally.type1_withheld);
        Ok(())
    }

    /// Whether a checked row leaves, and under which pseudonym: not if its
    /// patient is unknown here (quarantined: fail closed), dissents here,
    /// is tombstoned, or its code is on an exclusion list (each counted).
    #[inline]
    fn admit(
        &mut self,
        table: Table,
        line: u64,
        nhs: &NhsNumber,
        code: Option<&[u8]>,
        last: &mut Option<([u8; 10], Verdict)>,
        tally: &mut Tally,
    ) -> Option<Pseudonym> {
        if table == Table::Patients {
            self.known.insert(*nhs.as_bytes());
        }
        let verdict = match *last {
            Some((n, v)) if n == *nhs.as_bytes() => v,
            _ => {
                let v = self.verdict(nhs);
                *last = Some((*nhs.as_bytes(), v));
                v
            }
        };
        let id = match verdict {
            // No valid registration row for this number at this practice: fail closed.
            Verdict::Unknown => {
                self.counts.quarantine(table, line, "unknown_patient");
                return None;
            }
            Verdict::Dissents => {
                tally.type1_withheld += 1;
                return None;
            }
            Verdict::Blocked(id) => {
                self.withheld.insert(id);
                self.counts.receipt.withheld_by_tombstone.rows += 1;
                return None;
            }
            Verdict::Leaves(id) => id,
        };
        if let Some(code) = code
            && let Some(category) = self.ctx.excluded.category(code)
        {
            *self
                .counts
                .receipt
                .excluded_codes
                .entry(category.to_owned())
                .or_default() += 1;
            return None;
        }
        Some(id)
    }

    /// The verdict on a patient, judged (and hashed) once per batch.
    fn verdict(&mut self, nhs: &NhsNumber) -> Verdict {
        if let Some(v) = self.verdicts.get(nhs.as_bytes()) {
            return *v;
        }
        let v = if !self.known.contains(nhs.as_bytes()) {
            Verdict::Unknown
        } else if self.dissenting.contains(nhs.as_bytes()) {
            Verdict::Dissents
        } else {
            let t = Instant::now();
            let id = self.ctx.pseudonymiser.patient(nhs);
            self.pseudonyms_computed += 1;
            self.stages.pseudonymise += t.elapsed().as_secs_f64();
            if self.ctx.blocked.contains(&id) {
                Verdict::Blocked(id)
            } else {
                Verdict::Leaves(id)
            }
        };
        self.verdicts.insert(*nhs.as_bytes(), v);
        v
    }

    /// The receipt, the quarantine list and the staged batch.
    fn finish(
        self,
        inputs: Inputs,
        started: Instant,
        started_at: String,
    ) -> Result<Staged, CollectError> {
        let (ctx, practice) = (self.ctx, self.practice);
        let dissenters: Vec<Pseudonym> = {
            let mut d: Vec<_> = inputs
                .type1
                .iter()
                .filter(|(_, s)| s.dissents())
                .filter_map(|(n, _)| NhsNumber::parse(n).ok())
                .map(|n| ctx.pseudonymiser.patient(&n))
                .collect();
            d.sort_unstable();
            d
        };
        let mut counts = self.counts;
        let quarantine_file =
            write_quarantine(ctx.quarantine_dir, &practice.code, &counts.quarantine)?;
        let r = &mut counts.receipt;
        r.practice = practice.code.clone();
        r.batch = inputs.batch.clone();
        r.key_id = ctx.key_id.to_owned();
        r.policy_sha256 = ctx.policy.sha256.clone();
        r.patients_in = self.known.len() as u64;
        r.patients_out = self.collected.len() as u64;
        r.type1_excluded_patients = self
            .known
            .iter()
            .filter(|n| self.dissenting.contains(*n))
            .count() as u64;
        r.withheld_by_tombstone.patients = self.withheld.len() as u64;
        r.pseudonyms_computed = self.pseudonyms_computed + dissenters.len() as u64;
        r.tombstones_emitted = dissenters.len() as u64;
        r.quarantine_file = quarantine_file.display().to_string();
        r.bytes_in = self.bytes_in;
        r.started = started_at;
        r.finished = crate::store::now_rfc3339();
        r.seconds = started.elapsed().as_secs_f64() + inputs.hash_seconds;
        r.stage_seconds = self.stages;
        let mut patients: Vec<Pseudonym> = self.collected.into_iter().collect();
        patients.sort_unstable();
        Ok(Staged {
            practice: practice.code.clone(),
            batch: inputs.batch,
            files: self.files,
            receipt: counts.receipt,
            patients,
            dissenters,
            withheld: self.withheld.iter().map(|p| hex(p)).collect(),
        })
    }
}

/// Writes the rows built so far (if any) as one record batch.
fn write(builders: &mut Builders, writer: &mut Writer, path: &Path) -> Result<(), CollectError> {
    match builders.finish() {
        Ok(Some(batch)) => writer
            .write(&batch)
            .map_err(|e| CollectError::parquet(path, e)),
        Ok(None) => Ok(()),
        Err(e) => Err(CollectError::arrow(path, e)),
    }
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
