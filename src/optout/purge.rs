//! `gpdp optout purge`: the second phase of erasure.
//!
//! `gpdp optout apply` makes a later opt-out's patient unreachable at once
//! with deletion vectors ([`crate::store::vectors`]); their rows are still
//! in the bytes. The purge rewrites the files that carry a vector without
//! the masked rows — every one by default, or only those whose deleted
//! share has reached `--min-deleted-share` — and drops their vectors, in one
//! manifest commit (a crash leaves the store as it was or as committed). The
//! audit log's `purge` entry holds the proof of erasure, as a deletion's
//! always has: per file, rows and SHA-256 before and after, and the SHA-256
//! of the vector dropped; and the request → erased latency of the requests
//! whose last masked row it erased (a patient some kept vector still masks
//! is not erased yet). A purge with nothing to rewrite changes nothing.
//!
//! Collection erases masked rows too, without a purge: collecting a
//! practice again takes its old batch's files (and vectors) out of force,
//! and deleting a dissenting patient from another batch rewrites its files
//! without the masked rows. That commit's log then holds a `purge` entry
//! with `"by": "collect"` ([`by_collection`]): the rows erased, the
//! patients whose last masked row went with them and their request →
//! erased latency, as a purge's; its proof names each dropped vector and
//! the data file it masked (the files that replace them are in the
//! `collect` and `delete` entries beside it).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Value, json};

use super::list::OptoutError;
use super::request::{REQUEST_SOURCE, erased_latencies};
use crate::deid::pseudonym::Pseudonym;
use crate::policy::Codec;
use crate::store::delete::{Deleter, dropped_vectors};
use crate::store::{Manifest, Store, StoreError, now_rfc3339};

/// What `optout purge` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    /// Files with a vector were purged if their deleted share was at least this.
    pub min_deleted_share: f64,
    /// Practice batches with a file rewritten.
    pub batches_rewritten: u64,
    /// Data files rewritten without their masked rows (their vectors dropped).
    pub files_rewritten: u64,
    /// Vectors left in force: their files' deleted share is below the threshold.
    pub vectors_kept: u64,
    /// Masked rows erased from the bytes, by table.
    pub rows_erased: BTreeMap<String, u64>,
    /// Patients whose masked rows are now all erased.
    pub patients_erased: u64,
    /// Seconds from each erased patient's request (`requested_at`) to this
    /// purge's commit.
    pub latency_erased_median_seconds: Option<f64>,
    pub latency_erased_max_seconds: Option<f64>,
    pub unchanged: bool,
    pub generation: u64,
    pub seconds: f64,
}

/// Purges the store at `store`.
pub fn purge(store: &Path, min_share: f64, codec: Codec) -> Result<PurgeReport, OptoutError> {
    let mut store = Store::open_for_write(store, false)?;
    purge_store(&mut store, min_share, codec)
}

/// Purges an open store (`gpdp optout apply --purge` calls it after its
/// own commit, under the same lock).
pub fn purge_store(
    store: &mut Store,
    min_share: f64,
    codec: Codec,
) -> Result<PurgeReport, OptoutError> {
    let started = Instant::now();
    let mut next = store.manifest.clone();
    let purged = Deleter::new(store, codec).purge(&mut next, min_share)?;
    let mut report = PurgeReport {
        min_deleted_share: min_share,
        batches_rewritten: purged.batches,
        files_rewritten: purged.proof.len() as u64,
        vectors_kept: purged.vectors_kept,
        rows_erased: purged.rows_erased.clone(),
        patients_erased: purged.erased.len() as u64,
        generation: store.manifest.generation,
        ..PurgeReport::default()
    };
    if purged.proof.is_empty() {
        report.unchanged = true;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    // Request → erased, for the requests whose last masked row this erases.
    let requests = store
        .tombstones
        .iter()
        .filter(|t| t.source == REQUEST_SOURCE)
        .map(|t| (t.patient_id, t.recorded_at.as_str()));
    let (median, max) = erased_latencies(requests, &purged.erased, Utc::now());
    report.latency_erased_median_seconds = median;
    report.latency_erased_max_seconds = max;
    next.commit_log = vec![json!({
        "event": "purge",
        "time": now_rfc3339(),
        "reason": "type1_request",
        "min_deleted_share": min_share,
        "batches_rewritten": report.batches_rewritten,
        "files_rewritten": report.files_rewritten,
        "vectors_kept": report.vectors_kept,
        "rows_erased": purged.rows_erased,
        "patients_erased": report.patients_erased,
        "latency_erased_median_seconds": median,
        "latency_erased_max_seconds": max,
        "proof": purged.proof,
    })];
    store.commit(next)?;
    report.generation = store.manifest.generation;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What `by` says in a `purge` entry that a collection's commit logged.
pub const ERASED_BY_COLLECTION: &str = "collect";

/// The `purge` entry (`"by": "collect"`) for a collection commit that
/// takes `next` in force, if it drops deletion vectors
/// ([`dropped_vectors`]; call it before the commit, while the dropped files
/// are on disk): the masked rows erased with their files, and the patients
/// of `requests` (patient and `recorded_at` of each request tombstone in
/// force after the commit) left with no masked row anywhere, with their
/// request → erased latency.
pub fn by_collection<'a>(
    store: &Store,
    next: &Manifest,
    requests: impl Iterator<Item = (Pseudonym, &'a str)>,
    time: &str,
) -> Result<Option<Value>, StoreError> {
    let mut dropped = dropped_vectors(store, next)?;
    if dropped.proof.is_empty() {
        return Ok(None);
    }
    let requests: Vec<(Pseudonym, &str)> = requests.collect();
    let requested: HashSet<Pseudonym> = requests.iter().map(|(p, _)| *p).collect();
    dropped.erased.retain(|p| requested.contains(p));
    let (median, max) = erased_latencies(requests.into_iter(), &dropped.erased, Utc::now());
    Ok(Some(json!({
        "event": "purge",
        "time": time,
        "reason": "type1_request",
        "by": ERASED_BY_COLLECTION,
        "vectors_dropped": dropped.proof.len(),
        "rows_erased": dropped.rows_erased,
        "patients_erased": dropped.erased.len(),
        "latency_erased_median_seconds": median,
        "latency_erased_max_seconds": max,
        "proof": dropped.proof,
    })))
}
