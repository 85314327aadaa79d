//! `gpdp link`: collection at a data provider (docs/design.md §9, Data for R&D).
//!
//! Hospital spells (`linked/apcs.csv`) and death registrations
//! (`linked/ons_deaths.csv`) arrive from their providers, not from
//! practices. Each is de-identified where it is, as GP extracts are at the
//! practice: the NHS number is pseudonymised with the **same key and domain**
//! as collection, so `patient_id` joins the GP tables inside the TRE and
//! nowhere else; every column gets the action the collection policy's
//! `[linked.<source>]` section names (the spell identifier is dropped, the
//! date of death generalised to its month); a row that cannot be
//! de-identified — no NHS number, an invalid one, an unreadable date, a
//! code that is not ICD-10 or OPCS-4 — is quarantined on the provider side
//! (`line,reason` only), never stored. The source's Parquet file, its
//! receipt and its audit entry are committed at once, like a practice's
//! batch; linking the same extract again changes nothing.
//!
//! Opt-outs: a Type 1 opt-out stops data leaving the GP *practice*; it does
//! not cover hospital or death records, which are linked whatever the GP
//! record says (a Type 1 patient's provider records are stored, but no GP
//! data of theirs is, so they never meet). The National Data Opt-out does
//! cover them: the TRE's views remove NDOO patients from linked tables in
//! every project it applies to.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Date32Builder, FixedSizeBinaryBuilder, Int64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::SchemaRef;
use serde::Serialize;
use serde_json::json;

use crate::calendar::{Day, parse_date};
use crate::deid::key::{CollectionKey, KeyError};
use crate::deid::pseudonym::{Pseudonymiser, patient_key};
use crate::error::{BadInput, Classify, ExitStatus};
use crate::extract::{Column, Kind, Source};
use crate::nhs_number::NhsNumber;
use crate::policy::{Action, CollectionPolicy, Rule};
use crate::store::guard;
use crate::store::{FileEntry, LinkedEntry, Store, StoreError, now_rfc3339};

/// Rows per Arrow record batch written.
const BATCH_ROWS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
    #[error("writing {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("reading the provider extract again: {0}")]
    Io(#[from] std::io::Error),
}

impl Classify for LinkError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            LinkError::Key(e) => e.exit_status(),
            LinkError::Io(e) => crate::error::io_status(e),
            LinkError::Store(e) => e.exit_status(),
            LinkError::Input { .. } | LinkError::Refused(_) => ExitStatus::BadInput,
            LinkError::Write { .. } => ExitStatus::Internal,
        }
    }
}

/// What linking one source did (also its receipt, `receipts/<batch>.json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkReceipt {
    pub source: String,
    pub batch: String,
    pub key_id: String,
    pub policy_sha256: String,
    pub input_sha256: String,
    pub rows_in: u64,
    pub rows_out: u64,
    /// Distinct patients (pseudonyms) in the stored rows.
    pub patients_out: u64,
    /// Rows quarantined on the provider side, by reason.
    pub quarantined: BTreeMap<String, u64>,
    pub dropped_columns: Vec<String>,
    /// False when the store already held this exact extract, or held
    /// this one back.
    pub changed: bool,
    /// Why the shrink guards held this extract (the source in force stays).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<guard::Held>,
    pub generation: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
}

pub struct LinkOptions {
    pub extract: PathBuf,
    pub store: PathBuf,
    pub key: PathBuf,
    pub policy: CollectionPolicy,
    /// The sources to link (all present ones when empty).
    pub sources: Vec<Source>,
    /// Where quarantined rows are listed (default: `EXTRACT/quarantine`).
    pub quarantine: Option<PathBuf>,
    /// Take a source the shrink guards would hold, recording that in the
    /// audit log with the counts.
    pub accept_shrink: bool,
}

/// Links each source of `opts.extract/linked/` into the store.
pub fn link(opts: &LinkOptions) -> Result<Vec<LinkReceipt>, LinkError> {
    let key = CollectionKey::load(&opts.key)?;
    let p = Pseudonymiser::new(&key);
    let sources: Vec<Source> = if opts.sources.is_empty() {
        Source::ALL
            .into_iter()
            .filter(|s| input(&opts.extract, *s).is_file())
            .collect()
    } else {
        opts.sources.clone()
    };
    if sources.is_empty() {
        return Err(LinkError::Refused(format!(
            "no provider extract in {}: expected linked/apcs.csv or linked/ons_deaths.csv (made by `gpdp synth`)",
            opts.extract.display()
        )));
    }
    let mut planned = Vec::with_capacity(sources.len());
    for s in &sources {
        let Some(actions) = opts.policy.linked_actions(*s) else {
            return Err(LinkError::Refused(format!(
                "the collection policy has no [linked.{}] section: nothing of it may be linked until every column has an action",
                s.name()
            )));
        };
        planned.push((*s, actions));
        if !input(&opts.extract, *s).is_file() {
            return Err(LinkError::Input {
                path: input(&opts.extract, *s),
                message: "no such file".into(),
            });
        }
    }
    // Linked data joins a collected store: a path that holds none is a
    // typo, never a new store holding only the linked sources.
    let mut store = Store::open_for_write(&opts.store, false)?;
    store.manifest.check_key(&p.key_id())?;
    let quarantine_dir = opts
        .quarantine
        .clone()
        .unwrap_or_else(|| opts.extract.join("quarantine"));
    let mut receipts = Vec::new();
    for (source, actions) in planned {
        receipts.push(link_source(
            &mut store,
            &p,
            opts,
            &quarantine_dir,
            source,
            actions,
        )?);
    }
    Ok(receipts)
}

fn input(extract: &Path, source: Source) -> PathBuf {
    extract
        .join("linked")
        .join(format!("{}.csv", source.name()))
}

fn link_source(
    store: &mut Store,
    p: &Pseudonymiser,
    opts: &LinkOptions,
    quarantine_dir: &Path,
    source: Source,
    actions: &[Action],
) -> Result<LinkReceipt, LinkError> {
    let (policy, extract) = (&opts.policy, opts.extract.as_path());
    let started = Instant::now();
    let path = input(extract, source);
    let (input_sha, _) = crate::store::sha256_file(&path)?;
    let batch = batch_id(p, policy, source, &input_sha);
    let mut receipt = LinkReceipt {
        source: source.name().into(),
        batch: batch.clone(),
        key_id: p.key_id(),
        policy_sha256: policy.sha256.clone(),
        input_sha256: input_sha,
        dropped_columns: source
            .columns()
            .iter()
            .zip(actions)
            .filter(|(_, a)| **a == Action::Drop)
            .map(|(c, _)| c.name.to_owned())
            .collect(),
        generation: store.manifest.generation,
        ..LinkReceipt::default()
    };
    if store
        .manifest
        .linked
        .get(source.name())
        .is_some_and(|l| l.batch == batch)
    {
        receipt.seconds = started.elapsed().as_secs_f64();
        return Ok(receipt);
    }

    let relative = format!("tables/{}/{batch}.parquet", source.name());
    let out = store.path(&relative);
    let mut lines = Vec::new();
    let written = write_source(
        &path,
        &out,
        source,
        actions,
        p,
        policy.codec,
        &mut receipt,
        &mut lines,
    );
    let (sha256, bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            return Err(e);
        }
    };
    // The shrink guards: a provider file cut short, mostly quarantined, or
    // with far fewer rows than the one in force is held, and the source in
    // force stays (crate::store::guard).
    let quarantined: u64 = receipt.quarantined.values().sum();
    let in_force = store
        .manifest
        .linked
        .get(source.name())
        .map(|l| l.file.rows);
    let held = guard::truncated([path.as_path()])?
        .or_else(|| guard::quarantine_share(&policy.guards, receipt.rows_in, quarantined))
        .or_else(|| {
            in_force
                .and_then(|before| guard::shrink(&policy.guards, "rows", before, receipt.rows_out))
        });
    if let Some(held) = &held {
        store
            .audit()
            .append(&[json!({
                "event": if opts.accept_shrink { "link_accepted_shrink" } else { "link_held" },
                "time": now_rfc3339(),
                "source": source.name(),
                "batch": batch,
                "rule": held.rule,
                "detail": held.detail,
                "rows_in_force": in_force,
                "rows_in": receipt.rows_in,
                "rows_out": receipt.rows_out,
                "quarantined": quarantined,
            })])
            .map_err(StoreError::from)?;
        if !opts.accept_shrink {
            let _ = std::fs::remove_file(&out);
            receipt.held = Some(held.clone());
            receipt.seconds = started.elapsed().as_secs_f64();
            return Ok(receipt);
        }
    }
    std::fs::create_dir_all(quarantine_dir).map_err(|e| LinkError::Write {
        path: quarantine_dir.to_owned(),
        message: e.to_string(),
    })?;
    let q = quarantine_dir.join(format!("linked-{}.csv", source.name()));
    std::fs::write(&q, [b"line,reason\n".as_slice(), &lines].concat()).map_err(|e| {
        LinkError::Write {
            path: q.clone(),
            message: e.to_string(),
        }
    })?;

    receipt.changed = true;
    receipt.seconds = started.elapsed().as_secs_f64();
    receipt.rows_per_second = receipt.rows_in as f64 / receipt.seconds.max(1e-9);
    let receipt_rel = format!("receipts/{batch}.json");
    let receipt_path = store.path(&receipt_rel);
    let mut next = store.manifest.clone();
    receipt.generation = next.generation + 1;
    std::fs::write(
        &receipt_path,
        serde_json::to_vec_pretty(&receipt).unwrap_or_default(),
    )
    .map_err(|e| LinkError::Write {
        path: receipt_path.clone(),
        message: e.to_string(),
    })?;
    next.key_id.get_or_insert_with(|| p.key_id());
    next.linked.insert(
        source.name().into(),
        LinkedEntry {
            batch: batch.clone(),
            policy_sha256: policy.sha256.clone(),
            linked_at: now_rfc3339(),
            receipt: receipt_rel,
            file: FileEntry {
                path: relative,
                rows: receipt.rows_out,
                bytes,
                sha256: sha256.clone(),
            },
        },
    );
    next.commit_log = vec![json!({
        "event": "link",
        "time": now_rfc3339(),
        "source": source.name(),
        "batch": batch,
        "rows_in": receipt.rows_in,
        "rows_out": receipt.rows_out,
        "patients_out": receipt.patients_out,
        "quarantined": receipt.quarantined,
        "dropped_columns": receipt.dropped_columns,
        "policy_sha256": policy.sha256,
        "sha256": sha256,
    })];
    store.commit(next)?;
    Ok(receipt)
}

/// The batch name: the key id, the policy and the input's checksum, so the
/// same extract linked again is recognised.
fn batch_id(p: &Pseudonymiser, policy: &CollectionPolicy, source: Source, input: &str) -> String {
    let text = format!(
        "gpdp/v1/link\0{}\0{}\0{}\0{input}",
        p.key_id(),
        policy.sha256,
        source.name()
    );
    format!(
        "{}-{}",
        source.name(),
        &crate::digest::sha256_hex(text.as_bytes())[..16]
    )
}

/// One column being built.
enum Builder {
    Date(Date32Builder),
    Number(Int64Builder),
    Text(StringBuilder),
}

/// One row's value of a kept column, checked.
enum Value<'a> {
    Date(Option<Day>),
    Number(Option<i64>),
    Text(Option<&'a str>),
}

/// Checks one field; `Err` is the quarantine reason.
fn check<'a>(c: &Column, raw: &'a str, rule: Option<Rule>) -> Result<Value<'a>, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() {
        return if c.required {
            Err(match c.kind {
                Kind::Date => "missing_date",
                _ => "missing_value",
            })
        } else {
            Ok(match c.kind {
                Kind::Date | Kind::BirthDate => Value::Date(None),
                Kind::Number => Value::Number(None),
                _ => Value::Text(None),
            })
        };
    }
    Ok(match c.kind {
        Kind::Date | Kind::BirthDate => {
            let day = parse_date(raw.as_bytes()).ok_or("malformed_date")?;
            Value::Date(Some(match rule {
                Some(Rule::Month) => crate::calendar::month_start(day),
                Some(Rule::Year) => crate::calendar::year_start_of(day),
                _ => day,
            }))
        }
        Kind::Number => Value::Number(Some(
            raw.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or("malformed_number")?,
        )),
        Kind::Code => {
            if !raw.split(';').all(is_clinical_code) {
                return Err("malformed_code");
            }
            Value::Text(Some(raw))
        }
        _ => {
            if raw.len() > 64 {
                return Err("malformed_value");
            }
            Value::Text(Some(raw))
        }
    })
}

/// ICD-10 (`E119`, `I10X`) or OPCS-4 (`W371`) without dots: a capital
/// letter, two digits, and at most two more digits or `X`.
fn is_clinical_code(code: &str) -> bool {
    let b = code.as_bytes();
    (3..=5).contains(&b.len())
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && b[3..].iter().all(|c| c.is_ascii_digit() || *c == b'X')
}

#[allow(clippy::too_many_arguments)]
fn write_source(
    path: &Path,
    out: &Path,
    source: Source,
    actions: &[Action],
    p: &Pseudonymiser,
    codec: crate::policy::Codec,
    receipt: &mut LinkReceipt,
    quarantine: &mut Vec<u8>,
) -> Result<(String, u64), LinkError> {
    let bad_input = |message: String| LinkError::Input {
        path: path.to_owned(),
        message,
    };
    let write_err = |message: String| LinkError::Write {
        path: out.to_owned(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| bad_input(e.to_string()))?;
    let header = reader
        .headers()
        .map_err(|e| bad_input(e.to_string()))?
        .clone();
    let columns = source.columns();
    let mut index = Vec::with_capacity(columns.len());
    for c in columns {
        let i = header.iter().position(|h| h == c.name).ok_or_else(|| {
            bad_input(format!(
                "the header has no column {:?} (the {} extract needs: {})",
                c.name,
                source.name(),
                columns
                    .iter()
                    .map(|c| c.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        index.push(i);
    }
    for h in header.iter() {
        if !columns.iter().any(|c| c.name == h) {
            receipt
                .dropped_columns
                .push(format!("{h} (not in the format)"));
        }
    }
    let schema = crate::store::schema::linked_schema(source, actions);
    let mut writer = crate::store::parquet::Writer::create(out, schema.clone(), codec)
        .map_err(|e| write_err(e.to_string()))?;
    let kept: Vec<(usize, &Column, Option<Rule>)> = columns
        .iter()
        .zip(actions)
        .enumerate()
        .filter_map(|(i, (c, a))| match a {
            Action::Keep => Some((i, c, None)),
            Action::Generalise(rule) => Some((i, c, Some(*rule))),
            _ => None,
        })
        .collect();
    let new_builders = || -> Vec<Builder> {
        kept.iter()
            .map(|(_, c, _)| match c.kind {
                Kind::Date | Kind::BirthDate => Builder::Date(Date32Builder::new()),
                Kind::Number => Builder::Number(Int64Builder::new()),
                _ => Builder::Text(StringBuilder::new()),
            })
            .collect()
    };
    let mut ids = FixedSizeBinaryBuilder::new(32);
    let mut keys = Int64Builder::new();
    let mut builders = new_builders();
    let mut pseudonyms: HashMap<[u8; 10], [u8; 32]> = HashMap::new();
    let mut record = csv::StringRecord::new();
    let mut line = 1u64;
    let mut pending = 0usize;
    let nhs_at = columns
        .iter()
        .position(|c| c.kind == Kind::NhsNumber)
        .unwrap_or(0);
    loop {
        let more = reader
            .read_record(&mut record)
            .map_err(|e| bad_input(format!("line {}: {e}", line + 1)))?;
        if !more || pending == BATCH_ROWS {
            if pending > 0 {
                flush(
                    &schema,
                    &mut ids,
                    &mut keys,
                    &mut builders,
                    &mut writer,
                    &write_err,
                )?;
                pending = 0;
            }
            if !more {
                break;
            }
        }
        line += 1;
        receipt.rows_in += 1;
        let mut reason: Option<&'static str> = None;
        if record.len() != header.len() {
            reason = Some("wrong_column_count");
        }
        let raw_nhs = record.get(index[nhs_at]).unwrap_or("").trim();
        let nhs = if reason.is_some() {
            None
        } else if raw_nhs.is_empty() {
            reason = Some("missing_nhs_number");
            None
        } else {
            match NhsNumber::parse(raw_nhs.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    reason = Some("invalid_nhs_number");
                    None
                }
            }
        };
        let mut values: Vec<Value> = Vec::with_capacity(kept.len());
        if reason.is_none() {
            for (i, c, rule) in &kept {
                match check(c, record.get(index[*i]).unwrap_or(""), *rule) {
                    Ok(v) => values.push(v),
                    Err(r) => {
                        reason = Some(r);
                        break;
                    }
                }
            }
        }
        let (Some(nhs), None) = (nhs, reason) else {
            let r = reason.unwrap_or("invalid_nhs_number");
            *receipt.quarantined.entry(r.to_owned()).or_default() += 1;
            quarantine.extend_from_slice(format!("{line},{r}\n").as_bytes());
            continue;
        };
        // A patient has several spells: one HMAC each, not one a row.
        let id = *pseudonyms
            .entry(*nhs.as_bytes())
            .or_insert_with(|| p.patient(&nhs));
        ids.append_value(id).map_err(|e| write_err(e.to_string()))?;
        keys.append_value(patient_key(&id));
        for (b, v) in builders.iter_mut().zip(values.drain(..)) {
            match (b, v) {
                (Builder::Date(b), Value::Date(d)) => b.append_option(d),
                (Builder::Number(b), Value::Number(n)) => b.append_option(n),
                (Builder::Text(b), Value::Text(t)) => b.append_option(t),
                _ => return Err(write_err("a value of the wrong type".into())),
            }
        }
        receipt.rows_out += 1;
        pending += 1;
    }
    receipt.patients_out = pseudonyms.len() as u64;
    writer.finish().map_err(|e| write_err(e.to_string()))
}

fn flush(
    schema: &SchemaRef,
    ids: &mut FixedSizeBinaryBuilder,
    keys: &mut Int64Builder,
    builders: &mut [Builder],
    writer: &mut crate::store::parquet::Writer,
    write_err: &dyn Fn(String) -> LinkError,
) -> Result<(), LinkError> {
    let mut columns: Vec<ArrayRef> = vec![Arc::new(ids.finish()), Arc::new(keys.finish())];
    for b in builders.iter_mut() {
        columns.push(match b {
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Number(b) => Arc::new(b.finish()),
            Builder::Text(b) => Arc::new(b.finish()),
        });
    }
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| write_err(e.to_string()))?;
    writer.write(&batch).map_err(|e| write_err(e.to_string()))
}

/// `--source` values.
pub fn parse_source(name: &str) -> Result<Source, BadInput> {
    Source::from_name(name)
        .ok_or_else(|| BadInput(format!("--source {name:?}: not apcs or ons_deaths")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clinical_codes_are_icd10_or_opcs4_without_dots() {
        for ok in [
            "E119", "I10X", "W371", "J46X", "C61X", "X599", "F03X", "O800",
        ] {
            assert!(is_clinical_code(ok), "{ok}");
        }
        for bad in ["E11.9", "e119", "E1", "", "9434765919", "E119 ", "ABCD"] {
            assert!(!is_clinical_code(bad), "{bad}");
        }
    }
}
