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
//! Rows that a later rewrite of the same file erases first — a collection's
//! deletion of another patient, which drops masked rows with the file's
//! vector — are erased too, and proven in that `delete` entry; their
//! request → erased latency is not recorded (only a purge records it).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::list::OptoutError;
use super::request::{REQUEST_SOURCE, median_max};
use crate::policy::Codec;
use crate::store::delete::Deleter;
use crate::store::{Store, now_rfc3339};

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
    let done = Utc::now();
    let mut requested: BTreeMap<_, DateTime<Utc>> = BTreeMap::new();
    for t in store
        .tombstones
        .iter()
        .filter(|t| t.source == REQUEST_SOURCE && purged.erased.contains(&t.patient_id))
    {
        if let Ok(at) = DateTime::parse_from_rfc3339(&t.recorded_at) {
            requested.insert(t.patient_id, at.with_timezone(&Utc));
        }
    }
    let (median, max) = median_max(
        requested
            .values()
            .map(|at| (done - *at).num_milliseconds().max(0) as f64 / 1000.0)
            .collect(),
    );
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
