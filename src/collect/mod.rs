//! `gpdp collect`: de-identification on collection (DESIGN §3).
//!
//! Each practice is collected as its own batch, as every practice would run
//! its own collector: [`practice`] does the work (Type 1 at source,
//! pseudonymise, generalise, drop, exclude, quarantine) in parallel, one
//! practice per worker; this module commits each finished batch to the store
//! one at a time, so a batch becomes visible all at once or not at all.
//!
//! Committing a batch also honours tombstones both ways: patients who dissent
//! at this practice are deleted from every other practice's batch (closing
//! the known gap where an opt-out recorded at a new practice left data from
//! the old one visible), and patients tombstoned elsewhere are held back from
//! this batch. A patient whose dissent at this practice has been withdrawn has
//! this practice's tombstone lifted.

pub mod practice;
pub mod receipt;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{Value, json};

use self::practice::{Context, Staged, batch_id, collect_practice};
use self::receipt::Receipt;
use crate::deid::generalise::{LookupError, PostcodeLookup};
use crate::deid::key::{CollectionKey, KeyError};
use crate::deid::pseudonym::{Pseudonym, Pseudonymiser, hex};
use crate::error::{Classify, ExitStatus};
use crate::extract::{ExtractError, PracticeExtract, Table, TableReader};
use crate::policy::{Action, CollectionPolicy, Rule};
use crate::progress::Progress;
use crate::store::{BatchEntry, Store, StoreError, Tombstone, now_rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
}

impl From<StoreError> for CollectError {
    fn from(e: StoreError) -> Self {
        CollectError::Store(Box::new(e))
    }
}

impl CollectError {
    fn io(path: &Path, source: std::io::Error) -> CollectError {
        CollectError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn parquet(path: &Path, e: parquet::errors::ParquetError) -> CollectError {
        CollectError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }

    fn arrow(path: &Path, e: arrow::error::ArrowError) -> CollectError {
        CollectError::Write {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

impl Classify for CollectError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            CollectError::Key(e) => e.exit_status(),
            CollectError::Extract(e) => e.exit_status(),
            CollectError::Lookup(e) => e.exit_status(),
            CollectError::Store(e) => e.exit_status(),
            CollectError::Io { .. } | CollectError::Write { .. } => ExitStatus::Internal,
        }
    }
}

pub struct CollectOptions {
    pub extract: PathBuf,
    pub store: PathBuf,
    pub key: PathBuf,
    pub policy: CollectionPolicy,
    /// Only these practices (all when empty).
    pub practices: Vec<String>,
    pub threads: usize,
    /// Where quarantined rows are listed (default: `EXTRACT/quarantine`).
    pub quarantine: Option<PathBuf>,
}

/// What happened to one practice.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A new batch was committed.
    Committed { receipt: Box<Receipt>, deleted_elsewhere: u64 },
    /// The store already holds this exact extract: nothing changed.
    Unchanged { practice: String, batch: String },
}

#[derive(Debug)]
pub struct CollectSummary {
    pub outcomes: Vec<Outcome>,
    pub seconds: f64,
    pub commit_seconds: f64,
    pub generation: u64,
}

impl CollectSummary {
    pub fn receipts(&self) -> impl Iterator<Item = &Receipt> {
        self.outcomes.iter().filter_map(|o| match o {
            Outcome::Committed { receipt, .. } => Some(receipt.as_ref()),
            Outcome::Unchanged { .. } => None,
        })
    }
}

fn uses_lsoa(policy: &CollectionPolicy) -> bool {
    Table::ALL.iter().any(|t| policy.actions(*t).contains(&Action::Generalise(Rule::Lsoa)))
}

pub fn run(opts: &CollectOptions, progress: &Progress) -> Result<CollectSummary, CollectError> {
    let started = Instant::now();
    let key = CollectionKey::load(&opts.key)?;
    let pseudonymiser = Pseudonymiser::new(&key);
    let key_id = pseudonymiser.key_id();
    let practices = crate::extract::practices(&opts.extract, &opts.practices)?;
    // Check every input before touching the store: a missing file or column
    // is bad input, and bad input changes nothing.
    for p in &practices {
        for t in Table::ALL {
            TableReader::open(&p.path(t), t)?;
        }
    }
    let reference = opts.extract.join("reference/postcode_lsoa.csv");
    let (lookup, reference_sha) = if uses_lsoa(&opts.policy) {
        let lookup = PostcodeLookup::load(&reference)?;
        (Some(lookup), crate::store::sha256_file(&reference)?.0)
    } else {
        (None, String::new())
    };
    let quarantine_dir = opts.quarantine.clone().unwrap_or_else(|| opts.extract.join("quarantine"));

    std::fs::create_dir_all(&opts.store).map_err(|e| CollectError::io(&opts.store, e))?;
    let mut store = Store::open_for_write(&opts.store, true)?;
    if let Some(existing) = &store.manifest.key_id {
        if existing != &key_id {
            return Err(StoreError::KeyMismatch {
                store: existing.clone(),
                given: key_id,
            }
            .into());
        }
    }
    let blocked = store.tombstoned();
    let current: HashMap<String, BatchEntry> = store.manifest.batches.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut batch_patients = load_batch_patients(&store)?;

    let store_root = store.root().to_owned();
    let ctx = Context {
        policy: &opts.policy,
        pseudonymiser: &pseudonymiser,
        key_id: &key_id,
        lookup: lookup.as_ref(),
        blocked: &blocked,
        store: &store_root,
        quarantine_dir: &quarantine_dir,
    };
    let bar = progress.bar(practices.len() as u64, "practices");
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let threads = opts.threads.clamp(1, practices.len());
    let (tx, rx) = mpsc::channel::<Result<Work, CollectError>>();
    let mut outcomes = Vec::new();
    let mut commit_seconds = 0.0;
    let mut first_error = None;

    std::thread::scope(|scope| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (ctx, practices, next, stop, current, blocked) = (&ctx, &practices, &next, &stop, &current, &blocked);
            let reference_sha = reference_sha.as_str();
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= practices.len() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = prepare(ctx, &practices[i], reference_sha, current.get(&practices[i].code), blocked);
                    if tx.send(result).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for work in rx {
            let result = work.and_then(|w| match w {
                Work::Unchanged { practice, batch } => Ok(Outcome::Unchanged { practice, batch }),
                Work::Staged(staged) => {
                    let t = Instant::now();
                    let r = commit(&mut store, *staged, &mut batch_patients, opts.policy.codec, &key_id);
                    commit_seconds += t.elapsed().as_secs_f64();
                    r
                }
            });
            bar.inc(1);
            match result {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    bar.finish_and_clear();
    if let Some(e) = first_error {
        // Staged files of uncommitted batches are unreferenced: remove them.
        let _ = store.collect_garbage();
        return Err(e);
    }
    outcomes.sort_by(|a, b| practice_of(a).cmp(practice_of(b)));
    Ok(CollectSummary {
        outcomes,
        seconds: started.elapsed().as_secs_f64(),
        commit_seconds,
        generation: store.manifest.generation,
    })
}

fn practice_of(o: &Outcome) -> &str {
    match o {
        Outcome::Committed { receipt, .. } => &receipt.practice,
        Outcome::Unchanged { practice, .. } => practice,
    }
}

enum Work {
    Staged(Box<Staged>),
    Unchanged { practice: String, batch: String },
}

/// Names the batch and, unless the store already holds exactly it, collects it.
fn prepare(ctx: &Context, practice: &PracticeExtract, reference_sha: &str, current: Option<&BatchEntry>, blocked: &HashSet<Pseudonym>) -> Result<Work, CollectError> {
    let t = Instant::now();
    let batch = batch_id(ctx, practice, reference_sha)?;
    let hash_seconds = t.elapsed().as_secs_f64();
    if let Some(entry) = current {
        // A patient deleted from this batch whose tombstone has since been
        // lifted must come back, so the batch is not a no-op then.
        let lifted = entry.deleted_patients.iter().any(|p| !blocked.iter().any(|b| hex(b) == *p));
        if entry.batch == batch && !lifted {
            return Ok(Work::Unchanged {
                practice: practice.code.clone(),
                batch,
            });
        }
    }
    collect_practice(ctx, practice, batch, hash_seconds).map(|s| Work::Staged(Box::new(s)))
}

/// Patients of every committed batch, for finding which batches a new
/// tombstone touches without reading the data files.
fn load_batch_patients(store: &Store) -> Result<HashMap<String, HashSet<Pseudonym>>, CollectError> {
    let mut out = HashMap::new();
    for (practice, entry) in &store.manifest.batches {
        let Some(file) = entry.files.get(Table::Patients.name()) else { continue };
        let path = store.path(&file.path);
        let ids = crate::store::parquet::patient_ids(&path).map_err(|e| CollectError::parquet(&path, e))?;
        out.insert(practice.clone(), ids.into_iter().collect());
    }
    Ok(out)
}

/// Commits one staged batch together with the tombstone changes it brings.
fn commit(store: &mut Store, staged: Staged, batch_patients: &mut HashMap<String, HashSet<Pseudonym>>, codec: crate::policy::Codec, key_id: &str) -> Result<Outcome, CollectError> {
    let source = format!("type1:{}", staged.practice);
    let now = now_rfc3339();

    // Tombstones: lift this practice's for patients it now collects (their
    // dissent here was withdrawn); add one for each patient dissenting here.
    let mut tombstones = store.tombstones.clone();
    let before = tombstones.len();
    tombstones.retain(|t| !(t.source == source && staged.patients.contains(&t.patient_id)));
    let lifted = before - tombstones.len();
    let existing: HashSet<(Pseudonym, &str)> = store.tombstones.iter().map(|t| (t.patient_id, t.source.as_str())).collect();
    let added: Vec<Pseudonym> = staged.dissenters.iter().filter(|p| !existing.contains(&(**p, source.as_str()))).copied().collect();
    tombstones.extend(added.iter().map(|p| Tombstone {
        patient_id: *p,
        source: source.clone(),
        recorded_at: now.clone(),
    }));
    let active: HashSet<Pseudonym> = tombstones.iter().map(|t| t.patient_id).collect();

    let mut next = store.manifest.clone();
    next.key_id = Some(key_id.to_owned());
    let mut log: Vec<Value> = Vec::new();

    // This batch: hold back anyone tombstoned since the batch was prepared.
    let late: HashSet<Pseudonym> = staged.patients.iter().filter(|p| active.contains(*p)).copied().collect();
    let mut files = BTreeMap::new();
    let mut deleted_here = staged.withheld.clone();
    let mut superseded_staging = Vec::new();
    for (table, relative) in &staged.files {
        let relative = if late.is_empty() {
            relative.clone()
        } else {
            superseded_staging.push(store.path(relative));
            rewrite(store, relative, &late, codec)?.0
        };
        files.insert(table.name().to_owned(), store.file_entry(relative)?);
    }
    deleted_here.extend(late.iter().map(|p| hex(p)));
    let mut patients = staged.patients.clone();
    patients.retain(|p| !late.contains(p));

    // Every other batch: delete the patients who dissent here.
    let added_set: HashSet<Pseudonym> = added.iter().copied().collect();
    let mut proof = Vec::new();
    let mut deleted_elsewhere = 0u64;
    for (practice, entry) in next.batches.iter_mut() {
        if practice == &staged.practice {
            continue;
        }
        let Some(members) = batch_patients.get_mut(practice) else { continue };
        let hit: HashSet<Pseudonym> = members.intersection(&added_set).copied().collect();
        if hit.is_empty() {
            continue;
        }
        deleted_elsewhere += hit.len() as u64;
        for (table, file) in entry.files.iter_mut() {
            let (relative, rw) = rewrite(store, &file.path, &hit, codec)?;
            let new = store.file_entry(relative)?;
            proof.push(json!({
                "practice": practice, "table": table,
                "rows_before": rw.rows_before, "rows_after": rw.rows_after,
                "sha256_before": file.sha256, "sha256_after": new.sha256,
            }));
            *file = new;
        }
        entry.deleted_patients.extend(hit.iter().map(|p| hex(p)));
        members.retain(|p| !hit.contains(p));
    }

    let receipt_rel = format!("receipts/{}.json", staged.batch);
    let receipt_path = store.path(&receipt_rel);
    let receipt_json = serde_json::to_string_pretty(&staged.receipt).unwrap_or_default() + "\n";
    std::fs::write(&receipt_path, receipt_json).map_err(|e| CollectError::io(&receipt_path, e))?;

    if lifted > 0 || !added.is_empty() {
        next.tombstones = Some(store.write_tombstones(&tombstones, codec)?);
    }
    let r = &staged.receipt;
    log.push(json!({
        "event": "collect",
        "time": now,
        "practice": staged.practice,
        "batch": staged.batch,
        "key_id": key_id,
        "policy_sha256": r.policy_sha256,
        "rows_in": r.rows_in,
        "rows_out": files.iter().map(|(t, f)| (t.clone(), json!(f.rows))).collect::<serde_json::Map<_, _>>(),
        "patients_out": patients.len(),
        "type1_excluded_patients": r.type1_excluded_patients,
        "quarantined": r.quarantined,
        "excluded_codes": r.excluded_codes,
        "tombstones_added": added.len(),
        "tombstones_lifted": lifted,
        "files": files.iter().map(|(t, f)| (t.clone(), json!(f.sha256))).collect::<serde_json::Map<_, _>>(),
    }));
    if !proof.is_empty() {
        log.push(json!({
            "event": "delete",
            "time": now,
            "reason": "type1_dissent",
            "source": source,
            "patients": deleted_elsewhere,
            "proof": proof,
        }));
    }
    next.batches.insert(
        staged.practice.clone(),
        BatchEntry {
            batch: staged.batch.clone(),
            practice: staged.practice.clone(),
            policy_sha256: r.policy_sha256.clone(),
            collected_at: r.finished.clone(),
            receipt: receipt_rel,
            files,
            deleted_patients: deleted_here,
        },
    );
    next.commit_log = log;
    store.commit(next)?;
    for path in superseded_staging {
        std::fs::remove_file(&path).map_err(|e| CollectError::io(&path, e))?;
    }
    store.tombstones = tombstones;
    batch_patients.insert(staged.practice.clone(), patients);
    Ok(Outcome::Committed {
        receipt: Box::new(staged.receipt),
        deleted_elsewhere,
    })
}

/// Rewrites a data file without some patients under a new name for the next
/// generation; returns the new relative path and the row counts.
fn rewrite(store: &Store, relative: &str, remove: &HashSet<Pseudonym>, codec: crate::policy::Codec) -> Result<(String, crate::store::parquet::Rewrite), CollectError> {
    let generation = store.manifest.generation + 1;
    let stem = relative.trim_end_matches(".parquet");
    let stem = stem.rsplit_once(".g").map_or(stem, |(s, g)| if g.bytes().all(|b| b.is_ascii_digit()) { s } else { stem });
    let new_rel = format!("{stem}.g{generation}.parquet");
    let (src, dst) = (store.path(relative), store.path(&new_rel));
    let rw = crate::store::parquet::rewrite_without(&src, &dst, remove, codec).map_err(|e| CollectError::parquet(&dst, e))?;
    Ok((new_rel, rw))
}

/// Totals over the committed receipts, for the command's summary.
pub fn totals(summary: &CollectSummary) -> Value {
    let mut rows_in = 0u64;
    let mut rows_out = 0u64;
    let mut quarantined: BTreeMap<String, u64> = BTreeMap::new();
    let mut excluded: BTreeMap<String, u64> = BTreeMap::new();
    let (mut patients_out, mut type1, mut tombstones) = (0u64, 0u64, 0u64);
    for r in summary.receipts() {
        rows_in += r.rows_in_total();
        rows_out += r.rows_out_total();
        patients_out += r.patients_out;
        type1 += r.type1_excluded_patients;
        tombstones += r.tombstones_emitted;
        for (k, v) in &r.quarantined {
            *quarantined.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.excluded_codes {
            *excluded.entry(k.clone()).or_default() += v;
        }
    }
    json!({
        "practices_committed": summary.receipts().count(),
        "practices_unchanged": summary.outcomes.len() - summary.receipts().count(),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "patients_out": patients_out,
        "type1_excluded_patients": type1,
        "tombstones_emitted": tombstones,
        "quarantined": quarantined,
        "excluded_codes": excluded,
        "seconds": summary.seconds,
        "rows_per_second": rows_in as f64 / summary.seconds.max(1e-9),
        "store_generation": summary.generation,
    })
}

