//! `gpdp link`: collection at a data provider (docs/design.md §9, Data for R&D).
//!
//! Hospital spells (`linked/apcs.csv`) and death registrations
//! (`linked/ons_deaths.csv`) arrive from their providers, not from
//! practices. Each is de-identified where it is, as GP extracts are at the
//! practice, and by the same engine ([`crate::deid`]): the NHS number is
//! pseudonymised with the **same key and domain** as collection, so
//! `patient_id` joins the GP tables inside the TRE and nowhere else; every
//! column gets the action the collection policy's `[linked.<source>]`
//! section names (the spell identifier is dropped, the date of death
//! generalised to its month) and is stored typed as GP columns are (a
//! number as `Float64`); a row that cannot be de-identified — no NHS
//! number, an invalid one, an unreadable date, a code that is not ICD-10
//! or OPCS-4, a count that is not a whole number — is quarantined on the
//! provider side (`line,reason` only), never stored. This module keeps
//! what is the provider's own: reading its file (fields trimmed, the
//! header matched by name), the shrink guards, and committing the
//! source's Parquet file, its receipt and its audit entry at once, like a
//! practice's batch; linking the same extract again changes nothing.
//!
//! Opt-outs: a Type 1 opt-out stops data leaving the GP *practice*; it does
//! not cover hospital or death records, which are linked whatever the GP
//! record says (a Type 1 patient's provider records are stored, but no GP
//! data of theirs is, so they never meet). The National Data Opt-out does
//! cover them: the TRE's views remove NDOO patients from linked tables in
//! every project it applies to.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::deid::builders::Builders;
use crate::deid::key::{CollectionKey, KeyError};
use crate::deid::plan::Plan;
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser};
use crate::deid::row::Checker;
use crate::error::{BadInput, Classify, ExitStatus};
use crate::extract::Source;
use crate::policy::{Action, CollectionPolicy};
use crate::store::guard;
use crate::store::parquet::Writer;
use crate::store::{FileEntry, LinkedEntry, Store, StoreError, now_rfc3339};

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
    let plan = Plan::source(source, actions);
    let mut receipt = LinkReceipt {
        source: source.name().into(),
        batch: batch.clone(),
        key_id: p.key_id(),
        policy_sha256: policy.sha256.clone(),
        input_sha256: input_sha,
        dropped_columns: plan.dropped.clone(),
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
    let written = open(&path, source, &mut receipt).and_then(|file| {
        write_source(file, &out, &plan, p, policy.codec, &mut receipt, &mut lines)
    });
    let (sha256, bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            return Err(e);
        }
    };
    if let Some(held) = guard(store, opts, source, &path, &receipt)?
        && !opts.accept_shrink
    {
        let _ = std::fs::remove_file(&out);
        receipt.held = Some(held);
        receipt.seconds = started.elapsed().as_secs_f64();
        return Ok(receipt);
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
    let file = FileEntry {
        path: relative,
        rows: receipt.rows_out,
        bytes,
        sha256,
    };
    commit(store, p, policy, file, &mut receipt)?;
    Ok(receipt)
}

/// The shrink guards: a provider file cut short, mostly quarantined, or
/// with far fewer rows than the one in force is held, and the source in
/// force stays (crate::store::guard). A hold (or, with `accept_shrink`, a
/// take despite one) is recorded in the audit log with the counts.
fn guard(
    store: &mut Store,
    opts: &LinkOptions,
    source: Source,
    path: &Path,
    receipt: &LinkReceipt,
) -> Result<Option<guard::Held>, LinkError> {
    let guards = &opts.policy.guards;
    let quarantined: u64 = receipt.quarantined.values().sum();
    let in_force = store
        .manifest
        .linked
        .get(source.name())
        .map(|l| l.file.rows);
    let held = guard::truncated([path])?
        .or_else(|| guard::quarantine_share(guards, receipt.rows_in, quarantined))
        .or_else(|| {
            in_force.and_then(|before| guard::shrink(guards, "rows", before, receipt.rows_out))
        });
    if let Some(held) = &held {
        store
            .audit()
            .append(&[json!({
                "event": if opts.accept_shrink { "link_accepted_shrink" } else { "link_held" },
                "time": now_rfc3339(),
                "source": source.name(),
                "batch": receipt.batch,
                "rule": held.rule,
                "detail": held.detail,
                "rows_in_force": in_force,
                "rows_in": receipt.rows_in,
                "rows_out": receipt.rows_out,
                "quarantined": quarantined,
            })])
            .map_err(StoreError::from)?;
    }
    Ok(held)
}

/// Commits a written source: its receipt, its manifest entry (replacing
/// the source in force) and its audit entry, at once.
fn commit(
    store: &mut Store,
    p: &Pseudonymiser,
    policy: &CollectionPolicy,
    file: FileEntry,
    receipt: &mut LinkReceipt,
) -> Result<(), LinkError> {
    let batch = receipt.batch.clone();
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
    let sha256 = file.sha256.clone();
    next.linked.insert(
        receipt.source.clone(),
        LinkedEntry {
            batch: batch.clone(),
            policy_sha256: policy.sha256.clone(),
            linked_at: now_rfc3339(),
            receipt: receipt_rel,
            file,
        },
    );
    next.commit_log = vec![json!({
        "event": "link",
        "time": now_rfc3339(),
        "source": receipt.source,
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
    Ok(())
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

/// A provider file opened: its reader, the number of fields a row has, and
/// where each column of the format is in it.
struct ProviderFile {
    path: PathBuf,
    reader: csv::Reader<std::fs::File>,
    width: usize,
    index: Vec<usize>,
}

/// Opens a provider file and finds the format's columns in its header;
/// header columns the format does not define are recorded as dropped.
fn open(path: &Path, source: Source, receipt: &mut LinkReceipt) -> Result<ProviderFile, LinkError> {
    let bad_input = |message: String| LinkError::Input {
        path: path.to_owned(),
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
    Ok(ProviderFile {
        path: path.to_owned(),
        reader,
        width: header.len(),
        index,
    })
}

/// De-identifies a provider file into `out` through the engine
/// ([`crate::deid`]): each row checked against the plan (fields trimmed
/// first: provider files are assembled by hand more often than exported),
/// quarantined (`line,reason` into `quarantine`) or stored under its
/// pseudonym. Returns the written file's SHA-256 and size.
fn write_source(
    file: ProviderFile,
    out: &Path,
    plan: &Plan,
    p: &Pseudonymiser,
    codec: crate::policy::Codec,
    receipt: &mut LinkReceipt,
    quarantine: &mut Vec<u8>,
) -> Result<(String, u64), LinkError> {
    let write_err = |message: String| LinkError::Write {
        path: out.to_owned(),
        message,
    };
    let ProviderFile {
        path,
        mut reader,
        width,
        index,
    } = file;
    let mut writer =
        Writer::create(out, plan.schema.clone(), codec).map_err(|e| write_err(e.to_string()))?;
    let mut builders = Builders::new(plan, None);
    let mut checker = Checker::new(plan, None);
    // A patient has several spells: one HMAC each, not one a row.
    let mut pseudonyms: HashMap<[u8; 10], Pseudonym> = HashMap::new();
    let mut record = csv::StringRecord::new();
    let mut line = 1u64;
    loop {
        let more = reader
            .read_record(&mut record)
            .map_err(|e| LinkError::Input {
                path: path.clone(),
                message: format!("line {}: {e}", line + 1),
            })?;
        if !more {
            break;
        }
        line += 1;
        receipt.rows_in += 1;
        let mut values = Vec::with_capacity(plan.fills.len());
        let field = |i: usize| record.get(index[i]).unwrap_or("").trim().as_bytes();
        let nhs = match checker.check(record.len() == width, field, &mut values) {
            Ok(nhs) => nhs,
            Err(r) => {
                *receipt.quarantined.entry(r.to_owned()).or_default() += 1;
                quarantine.extend_from_slice(format!("{line},{r}\n").as_bytes());
                continue;
            }
        };
        let id = *pseudonyms
            .entry(*nhs.as_bytes())
            .or_insert_with(|| p.patient(&nhs));
        if builders
            .append(&id, &values)
            .map_err(|e| write_err(e.to_string()))?
        {
            write(&mut builders, &mut writer, out)?;
        }
        receipt.rows_out += 1;
    }
    write(&mut builders, &mut writer, out)?;
    receipt.patients_out = pseudonyms.len() as u64;
    writer.finish().map_err(|e| write_err(e.to_string()))
}

/// Writes the rows built so far (if any) as one record batch.
fn write(builders: &mut Builders, writer: &mut Writer, out: &Path) -> Result<(), LinkError> {
    let write_err = |message: String| LinkError::Write {
        path: out.to_owned(),
        message,
    };
    match builders.finish().map_err(|e| write_err(e.to_string()))? {
        Some(batch) => writer.write(&batch).map_err(|e| write_err(e.to_string())),
        None => Ok(()),
    }
}

/// `--source` values.
pub fn parse_source(name: &str) -> Result<Source, BadInput> {
    Source::from_name(name)
        .ok_or_else(|| BadInput(format!("--source {name:?}: not apcs or ons_deaths")))
}
